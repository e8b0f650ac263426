"""The LM head fused with its loss (train.loss_chunk) against the whole logits, and against Hugging Face's GPT-2.

On a gpt2-124m-shaped model (random weights, GPT-2's 50,257-token vocabulary), one training step as each runs it:
lmforge's Trainer.train_step (forward, backward, clipping, AdamW) with train.loss_chunk 0 (the head makes every
logit, then F.cross_entropy) and with the default chunk (lmforge.head_loss: the loss and its gradients a chunk of
tokens at a time), and transformers' GPT2LMHeadModel(labels=...) with torch's fused AdamW and the same clipping,
the loop a user of HF would write. Each variant runs in a fresh subprocess, so its peak resident memory is its own:
VmHWM reset (/proc/self/clear_refs) once the model and optimizer are built, so it measures the training steps
(weights and the Python runtime included). Also the median step time; variants alternate over --rounds fresh
processes, so a change in the machine's load falls on all of them.

    python benchmarks/fused_loss.py --json-out benchmarks/results/fused_loss-cpu.json
    python benchmarks/fused_loss.py --layers 2 --width 64 --heads 2 --vocab 512 --seq 32 --batch 2   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.config import load_run_config  # noqa: E402
from lmforge.data.batches import TokenBatches  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.plan import reset_peak_rss, status_kib  # noqa: E402  (the peak RSS of what follows)
from lmforge.train import Trainer  # noqa: E402
from lora_memory import mib, write_base  # noqa: E402  (benchmarks/lora_memory.py: the same gpt2-shaped base)
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)

VARIANTS = ("lmforge-fused", "lmforge-whole-logits", "hf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768, help="n_embd")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--block", type=int, default=1024, help="model.block_size (the position table)")
    p.add_argument("--seq", type=int, default=512, help="tokens per training sequence (at most --block)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--chunk", type=int, default=None, help="train.loss_chunk of the fused variant (default: "
                                                             "the config's default)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step, per process")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, taking turns")
    p.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: VARIANT,BASE_CKPT,WORK_DIR
    return p.parse_args(argv)


def lmforge_step(variant: str, base: Path, work: Path, args: argparse.Namespace):
    overrides = {"train.init_from": str(base), "train.run_dir": str(work / variant), "train.device": "cpu",
                 "train.num_threads": args.threads, "train.batch_size": args.batch, "train.max_steps": args.steps + 1,
                 "train.seed": 0}
    if variant == "lmforge-whole-logits":
        overrides["train.loss_chunk"] = 0
    elif args.chunk is not None:
        overrides["train.loss_chunk"] = args.chunk
    config = load_run_config(None, {k: str(v) for k, v in overrides.items()})
    tokens = np.random.default_rng(0).integers(0, args.vocab, size=args.batch * (args.seq + 1) * 8, dtype=np.uint16)
    trainer = Trainer(config, train_data=TokenBatches(tokens, args.seq, args.batch, seed=0), val_batches=[],
                      progress=False, tensorboard=False)

    def step() -> float:
        loss_sum, count, _, _ = trainer.train_step()
        trainer.step += 1
        return float(loss_sum / count)
    return step, config.train.loss_chunk


def hf_step(args: argparse.Namespace):
    """GPT2LMHeadModel of the same shape (dropout off), labels=input: HF's loss makes the whole fp32 logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=args.vocab, n_positions=args.block, n_embd=args.width, n_layer=args.layers,
                        n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=True)
    data = torch.from_numpy(np.random.default_rng(0).integers(0, args.vocab, size=(8, args.batch, args.seq)))
    count = [0]

    def step() -> float:
        x = data[count[0] % 8]
        count[0] += 1
        loss = model(input_ids=x, labels=x).loss  # HF shifts the labels: seq - 1 predictions per row
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)
    return step


def measure(variant: str, base: Path, work: Path, args: argparse.Namespace) -> dict:
    """Build `variant`, run 1 + args.steps steps; peak training RSS and step times."""
    torch.set_num_threads(args.threads)
    rss_runtime = status_kib("VmRSS")
    step, chunk = (hf_step(args), None) if variant == "hf" else lmforge_step(variant, base, work, args)
    rss_built = status_kib("VmRSS")
    reset_peak_rss()
    times, losses = [], []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    return {"peak_training_rss_mib": mib(status_kib("VmHWM")), "rss_after_build_mib": mib(rss_built),
            "rss_runtime_mib": mib(rss_runtime), "step_seconds": [round(t, 3) for t in times],
            "losses": losses, **({} if variant == "hf" else {"loss_chunk": chunk})}


def run_variant(variant: str, base: Path, work: Path, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--child", f"{variant},{base},{work}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(1)})
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        variant, base, work = args.child.split(",")
        print(json.dumps(measure(variant, Path(base), Path(work), args)))
        return {}
    if args.seq > args.block:
        raise SystemExit(f"--seq {args.seq} is above --block {args.block}: lower it")
    torch.set_num_threads(args.threads)
    started_on = machine()
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="fused-loss-") as tmp:
        base, config = write_base(Path(tmp), args)
        for r in range(args.rounds):
            for variant in VARIANTS:
                runs[variant].append(run_variant(variant, base, Path(tmp) / f"round{r}", argv))
                print(f"round {r + 1}: {variant}: peak {runs[variant][-1]['peak_training_rss_mib']} MiB, steps "
                      f"{runs[variant][-1]['step_seconds']} s", file=sys.stderr)
    results = {}
    for variant, done in runs.items():
        results[variant] = {"peak_training_rss_mib": max(d["peak_training_rss_mib"] for d in done),
                            "rss_after_build_mib": max(d["rss_after_build_mib"] for d in done),
                            "step_seconds_median": round(statistics.median(t for d in done
                                                                           for t in d["step_seconds"][1:]), 3),
                            "runs": done}
    fused, whole, hf = (results[v] for v in VARIANTS)

    def above_build(v: dict) -> float:  # what the training steps add to the built model and optimizer
        return v["peak_training_rss_mib"] - v["rss_after_build_mib"]
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    summary = {
        "benchmark": "fused_loss", "machine": {**started_on, "load_average_at_end": load_average()},
        "model": {"n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
                  "vocab_size": config.vocab_size, "block_size": config.block_size, "weights": "random"},
        "batch_size": args.batch, "sequence_tokens": args.seq, "timed_steps_per_process": args.steps,
        "rounds": args.rounds, "threads": args.threads, "fp32_logits_of_one_step_mib": round(logits_mib, 1),
        "variants": results,
        "peak_rss_fused_over_whole_logits": round(fused["peak_training_rss_mib"] / whole["peak_training_rss_mib"], 3),
        "peak_rss_fused_over_hf": round(fused["peak_training_rss_mib"] / hf["peak_training_rss_mib"], 3),
        "saved_mib_vs_whole_logits": round(whole["peak_training_rss_mib"] - fused["peak_training_rss_mib"], 1),
        "saved_mib_vs_hf": round(hf["peak_training_rss_mib"] - fused["peak_training_rss_mib"], 1),
        "above_build_mib": {v: round(above_build(results[v]), 1) for v in VARIANTS},
        "step_time_fused_over_whole_logits": round(fused["step_seconds_median"] / whole["step_seconds_median"], 3),
        "step_time_fused_over_hf": round(fused["step_seconds_median"] / hf["step_seconds_median"], 3),
    }
    print(json.dumps(summary, indent=2))
    if args.json_out:
        atomic_write_text(Path(args.json_out), json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
