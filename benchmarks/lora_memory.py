"""LoRA against full fine-tuning on a gpt2-124m-shaped model (random weights): memory and step time on the CPU.

Both variants are what `lmforge train --train.init_from BASE` runs: a Trainer built from the same base checkpoint,
the same batches and the same AdamW (lmforge.train.optim), timed through Trainer.train_step (forward, backward,
clipping, optimizer step). LoRA is r=8, alpha=16 on q, k, v and o (lmforge.lora.apply_lora, through --lora.*);
QLoRA the same on the base's block layers in 4 bits (--lora.quantize nf4).

Each variant runs in a fresh subprocess, so its peak resident memory is its own. Measured per variant:
trainable parameters, optimizer state bytes (AdamW's exp_avg and exp_avg_sq, allocated at the first step), the
peak RSS of the training steps (VmHWM, reset through /proc/self/clear_refs once the Trainer is built, so loading
the base does not count; weights and the Python runtime do), the process's whole peak (ru_maxrss), and the median
step time. The model keeps block_size 1024 (GPT-2's position table); the sequences are shorter (--seqs, default
128, 256 and 512 tokens) so a step takes seconds on two CPU cores, and the comparison is made at each length:
LoRA saves the weights' gradients and AdamW's moments (3x the trained weights), not the activations, so its share
of full fine-tuning's memory grows with the tokens per step.

    python benchmarks/lora_memory.py --json-out benchmarks/results/lora_memory-cpu.json
    python benchmarks/lora_memory.py --layers 2 --width 64 --heads 2 --vocab 512 --seqs 32   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.checkpoint import save_checkpoint  # noqa: E402
from lmforge.config import ModelConfig, RunConfig, load_run_config  # noqa: E402
from lmforge.data.batches import TokenBatches  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.nf4 import NF4Linear  # noqa: E402
from lmforge.plan import reset_peak_rss, status_kib  # noqa: E402  (the peak RSS of what follows)
from lmforge.train import Trainer  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)

LORA = {"lora.r": 8, "lora.alpha": 16, "lora.targets": "q,k,v,o"}
CHECKPOINTED = {"train.activation_checkpointing": "true"}
# Full fine-tuning and LoRA as they are, then both with activation checkpointing (which cuts what grows with the
# tokens per step: the activations, most of LoRA's peak at long sequences).
# QLoRA: LoRA on the base's block layers in 4 bits (lora.quantize nf4).
VARIANTS = {"full": {}, "lora": LORA, "full-checkpointed": CHECKPOINTED, "lora-checkpointed": {**LORA, **CHECKPOINTED},
            "qlora": {**LORA, "lora.quantize": "nf4"}}
TARGET = 0.40  # issue 10: LoRA's peak training memory at most 40% of full fine-tuning's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768, help="n_embd")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--block", type=int, default=1024, help="model.block_size (the position table)")
    p.add_argument("--seqs", default="128,256,512",
                   help="comma-separated tokens per training sequence (each at most --block), one comparison each")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per variant (1: on a CPU shared with other processes, more threads wait on "
                        "each other; see benchmarks/train_throughput.py)")
    p.add_argument("--loss-chunk", type=int, default=None,
                   help="train.loss_chunk of every variant (default: the config's; 0: the whole logits)")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: VARIANT,SEQ,BASE_CKPT,WORK_DIR
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ memory
def mib(kib: int) -> float:
    return round(kib / 1024, 1)


# ------------------------------------------------------------------------------------- one variant
def measure(variant: str, seq: int, base: Path, work: Path, args: argparse.Namespace) -> dict:
    """Build the Trainer of `variant` on `base`, run 1 + args.steps steps on `seq`-token sequences; its numbers."""
    rss_runtime = status_kib("VmRSS")  # Python, torch and lmforge imported, nothing built
    overrides = {"train.init_from": str(base), "train.run_dir": str(work / f"{variant}-{seq}"), "train.device": "cpu",
                 "train.num_threads": args.threads, "train.batch_size": args.batch, "train.max_steps": args.steps + 1,
                 "train.seed": 0, **VARIANTS[variant]}
    if args.loss_chunk is not None:
        overrides["train.loss_chunk"] = args.loss_chunk
    config = load_run_config(None, {k: str(v) for k, v in overrides.items()})
    tokens = np.random.default_rng(0).integers(0, args.vocab, size=args.batch * (seq + 1) * 8, dtype=np.uint16)
    trainer = Trainer(config, train_data=TokenBatches(tokens, seq, args.batch, seed=0), val_batches=[],
                      progress=False, tensorboard=False)
    rss_built = status_kib("VmRSS")
    reset_peak_rss()
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        trainer.train_step()
        trainer.step += 1
        times.append(time.perf_counter() - t0)
    model, optimizer = trainer.raw_model, trainer.optimizer
    state_bytes = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    quantized = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return {
        "quantized_weights": sum(m.in_features * m.out_features for m in quantized),
        "quantized_bytes": sum(t.nbytes for m in quantized for t in m.buffers()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "optimizer_state_bytes": state_bytes,
        "peak_training_rss_mib": mib(status_kib("VmHWM")),
        "rss_after_build_mib": mib(rss_built),
        "rss_runtime_mib": mib(rss_runtime),
        "process_peak_rss_mib": mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),  # KiB on Linux
        "step_seconds_median": round(statistics.median(times[1:]), 3),
        "step_seconds": [round(t, 3) for t in times],  # the first one warms up (and allocates AdamW's state)
        "final_loss": trainer.step_loss,
    }


def run_variant(variant: str, seq: int, base: Path, work: Path, argv: list[str]) -> dict:
    """`measure` in a fresh Python process (its peak RSS is its own); its JSON from the last line of stdout."""
    cmd = [sys.executable, __file__, *argv, "--child", f"{variant},{seq},{base},{work}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_base(root: Path, args: argparse.Namespace) -> tuple[Path, ModelConfig]:
    """A random-weight GPT of the benchmark's shape saved as a weights-only checkpoint (what `init_from` reads)."""
    config = ModelConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.layers, n_head=args.heads,
                         n_embd=args.width, activation="gelu_tanh")
    torch.manual_seed(0)
    save_checkpoint(root / "base", 0, GPT(config), None, RunConfig(model=config), {"tokens_seen": 0})
    return root / "base", config


def compare(full: dict, lora: dict) -> dict:
    """LoRA over full fine-tuning: the peak training RSS, the same less the bare runtime (Python, torch), step time."""
    above = [v["peak_training_rss_mib"] - v["rss_runtime_mib"] for v in (lora, full)]
    ratio = lora["peak_training_rss_mib"] / full["peak_training_rss_mib"]
    return {"peak_training_rss_ratio": round(ratio, 3), "peak_training_rss_above_runtime_ratio": round(above[0] / above[1], 3),
            "step_time_ratio": round(lora["step_seconds_median"] / full["step_seconds_median"], 3),
            "meets_target": ratio <= TARGET}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        variant, seq, base, work = args.child.split(",")
        print(json.dumps(measure(variant, int(seq), Path(base), Path(work), args)))
        return {}
    seqs = [int(s) for s in args.seqs.split(",")]
    if max(seqs) > args.block:
        raise SystemExit(f"--seqs {args.seqs} has a length above --block {args.block}: lower it")
    torch.set_num_threads(args.threads)  # what each variant uses (train.num_threads), for machine()'s record
    started_on = machine()
    by_length = {}
    with tempfile.TemporaryDirectory(prefix="lora-memory-") as tmp:
        base, config = write_base(Path(tmp), args)
        for seq in seqs:
            variants = {v: run_variant(v, seq, base, Path(tmp), argv) for v in VARIANTS}
            by_length[str(seq)] = {"variants": variants, **compare(variants["full"], variants["lora"]),
                                   "checkpointed": compare(variants["full"], variants["lora-checkpointed"]),
                                   "both_checkpointed": compare(variants["full-checkpointed"],
                                                                variants["lora-checkpointed"]),
                                   "qlora": compare(variants["full"], variants["qlora"]),
                                   "qlora_vs_lora": compare(variants["lora"], variants["qlora"])}
            full = variants["full"]["peak_training_rss_mib"]
            for name in ("lora", "lora-checkpointed", "qlora"):
                lora = variants[name]["peak_training_rss_mib"]
                print(f"{seq} tokens x batch {args.batch}: {name}/full peak training RSS {lora} / {full} MiB = "
                      f"{lora / full:.1%} (target <= {TARGET:.0%})", file=sys.stderr)
    summary = {
        "benchmark": "lora_memory", "machine": {**started_on, "load_average_at_end": load_average()},
        "model": {"n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
                  "vocab_size": config.vocab_size, "block_size": config.block_size, "weights": "random"},
        "batch_size": args.batch, "timed_steps": args.steps, "threads": args.threads,
        "loss_chunk": args.loss_chunk if args.loss_chunk is not None else RunConfig().train.loss_chunk,
        "optimizer": "lmforge AdamW (fused), defaults of `lmforge train`", "lora": LORA, "variants": VARIANTS,
        "target_ratio": TARGET, "sequence_tokens": by_length,
    }
    print(json.dumps(summary, indent=2))
    if args.json_out:
        atomic_write_text(Path(args.json_out), json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
