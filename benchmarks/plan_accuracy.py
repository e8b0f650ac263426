"""How close `lmforge plan` comes to real training runs on this CPU, and the plan of four model sizes.

Accuracy: for char-small, llama-small and gpt2-124m (random weights, random tokens), and gpt2-124m fine-tuned with LoRA,
with DPO on random pairs, with both, and with KTO on random unpaired completions (lmforge.plan.measure starts them
from a random base), each in a fresh
process with one torch thread, `lmforge.plan.plan` predicts the peak resident memory and the step time of training on this CPU, and
`lmforge.plan.measure` runs 1 + --steps real steps through lmforge's Trainer (forward, backward, clipping, AdamW).
Predicted peak RSS = what the process holds besides the model once the Trainer is built (measured) + the plan's
weights, gradients, optimizer state and activations. Targets (issue 12): memory within 20%, step time within 30%.

Table: the plan of char-small, GPT-2 124M, GPT-2 1.5B and a 7B Llama trained on their compute-optimal token count
(20 tokens per parameter): FLOPs, memory, and the time on this CPU (fp32, measured peak) against one H100
(bf16-mixed, 40% MFU), for the README's "Why training takes so much compute".

Per-GPU memory under DDP and FSDP ("parallel"): GPT-2 124M and a Llama-3.2-1B-like model (PARALLEL) on 1, 2 and
8 H100s, fp32 and bf16-mixed, with and without activation checkpointing, as `lmforge plan --gpus K --parallel
ddp|fsdp` computes it (no timing: --parallel-only recomputes just this key of an existing results file).

    python benchmarks/plan_accuracy.py --json-out benchmarks/results/plan_accuracy-cpu.json
    python benchmarks/plan_accuracy.py --parallel-only --json-out benchmarks/results/plan_accuracy-cpu.json
    python benchmarks/plan_accuracy.py --configs gpt2-124m-kto --json-out benchmarks/results/plan_accuracy-kto-cpu.json
    python benchmarks/plan_accuracy.py --configs gpt2-124m-reward \
        --json-out benchmarks/results/plan_accuracy-reward-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.config import load_run_config  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.plan import GPUS, measure, plan  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)

MEASURED = {  # name: overrides of `lmforge train` (a few steps each, one thread)
    "char-small": {"preset": "char-small", "model.vocab_size": 65, "train.batch_size": 12},
    "llama-small": {"preset": "llama-small", "model.vocab_size": 8192, "train.batch_size": 4},
    "gpt2-124m": {"preset": "gpt2-124m", "train.batch_size": 1},
    # fine-tuning (plan and measure start from a random base): LoRA r 8 on q and v, DPO on 1 pair (2 sequences) with
    # its frozen reference, and the two together (the reference is the model with its adapters off)
    "gpt2-124m-lora": {"preset": "gpt2-124m", "train.batch_size": 1, "lora.r": 8, "train.init_from": "random"},
    "gpt2-124m-dpo": {"preset": "gpt2-124m", "train.batch_size": 1, "task": "preference"},
    "gpt2-124m-lora-dpo": {"preset": "gpt2-124m", "train.batch_size": 1, "lora.r": 8, "train.init_from": "random",
                           "task": "preference"},
    # KTO on 2 unpaired completions: their 2 mismatched rows through the policy (no gradients) and the reference
    "gpt2-124m-kto": {"preset": "gpt2-124m", "train.batch_size": 2, "task": "unpaired", "train.preference_loss": "kto"},
    # a reward model on 1 pair (2 whole sequences): a one-output head, no reference, no logits
    "gpt2-124m-reward": {"preset": "gpt2-124m", "train.batch_size": 1, "task": "preference",
                         "train.objective": "reward"},
}
TABLE = {  # name: overrides; batch of about 0.5M tokens per step on the H100 through grad_accum
    "char-small": {"preset": "char-small", "model.vocab_size": 65, "train.batch_size": 64},
    "gpt2-124m": {"preset": "gpt2-124m", "train.batch_size": 16, "train.grad_accum": 32},
    "gpt2-1.5b": {"preset": "gpt2-124m", "model.n_layer": 48, "model.n_head": 25, "model.n_embd": 1600,
                  "train.batch_size": 4, "train.grad_accum": 128},
    "llama-7b": {"preset": "llama-small", "model.vocab_size": 32000, "model.block_size": 4096, "model.n_layer": 32,
                 "model.n_head": 32, "model.n_kv_head": 32, "model.n_embd": 4096, "model.mlp_hidden": 11008,
                 "model.tie_embeddings": False, "train.batch_size": 1, "train.grad_accum": 128},
}
TARGETS = {"memory": 0.20, "step_time": 0.30}
# name: overrides; the micro-batch is per GPU. llama-1b has Llama 3.2 1B's shape: 16 layers, 2048 wide, 32 query
# heads and 8 key/value heads of 64, SwiGLU 8192, a 128,256-token vocabulary, tied embeddings (1,235,814,400
# parameters, Meta's count), here at a 2048-token context.
PARALLEL = {
    "gpt2-124m": {"preset": "gpt2-124m", "train.batch_size": 8},
    "llama-1b": {"preset": "llama-small", "model.vocab_size": 128256, "model.block_size": 2048, "model.n_layer": 16,
                 "model.n_head": 32, "model.n_kv_head": 8, "model.n_embd": 2048, "model.mlp_hidden": 8192,
                 "train.batch_size": 4},
}
PARALLEL_GPUS = (1, 2, 8)


def config(overrides: dict, **more: object):
    values = {**overrides, "train.run_dir": tempfile.mkdtemp(prefix="plan-accuracy-"), "train.num_threads": 1, **more}
    return load_run_config(None, {k: str(v) for k, v in values.items()})


def child(name: str, steps: int) -> dict:
    """Plan and measure one config in this (fresh) process."""
    overrides = dict(MEASURED[name])
    task = overrides.pop("task", "tokens")
    cfg = config(overrides)
    predicted = plan(cfg, device="cpu", task=task)
    measured = measure(cfg, steps, task=task)
    memory = measured["runtime_rss"] + predicted.total_memory
    return {
        "parameters": predicted.parameters, "trained_parameters": predicted.trained_parameters, "task": task,
        "batch_size": cfg.train.batch_size, "block_size": cfg.model.block_size,
        "predicted_peak_rss_mib": round(memory / 2 ** 20, 1),
        "measured_peak_rss_mib": round(measured["peak_rss"] / 2 ** 20, 1),
        "runtime_rss_mib": round(measured["runtime_rss"] / 2 ** 20, 1),
        "predicted_training_memory_mib": round(predicted.total_memory / 2 ** 20, 1),
        "memory_ratio": round(memory / measured["peak_rss"], 3),
        "predicted_step_s": round(predicted.step_time, 4), "measured_step_s": round(measured["step_time"], 4),
        "step_time_ratio": round(predicted.step_time / measured["step_time"], 3),
        "measured_peak_gflops": round(predicted.peak_flops / 1e9, 1), "mfu_assumed": predicted.mfu,
        "bandwidth_gb_s": round(predicted.bandwidth / 1e9, 2),
    }


def table_row(name: str) -> dict:
    cfg = config(TABLE[name])
    tokens = 20 * plan(cfg, device="h100").parameters  # compute-optimal
    cpu = plan(config(TABLE[name], **{"train.precision": "fp32"}), tokens=tokens, device="cpu")
    gpu = plan(config(TABLE[name], **{"train.precision": "bf16-mixed"}), tokens=tokens, device="h100")
    return {
        "parameters": cpu.parameters, "parameters_m": round(cpu.parameters / 1e6, 1),
        "tokens": tokens, "tokens_b": round(tokens / 1e9, 3), "flops_per_token": cpu.flops_per_token,
        "total_flops": cpu.total_flops, "total_flops_e18": round(cpu.total_flops / 1e18, 4),
        "tokens_per_step": gpu.tokens_per_step,
        "cpu_memory_gib": round(cpu.total_memory / 2 ** 30, 2),
        "cpu_memory_checkpointed_gib": round(cpu.total_memory_checkpointed / 2 ** 30, 2),
        "cpu_days": round(cpu.total_time / 86400, 1), "cpu_years": round(cpu.total_time / 86400 / 365, 1),
        "h100_memory_gib": round(gpu.total_memory / 2 ** 30, 2),
        "h100_memory_checkpointed_gib": round(gpu.total_memory_checkpointed / 2 ** 30, 2),
        "h100_hours": round(gpu.total_time / 3600, 2), "h100_days": round(gpu.total_time / 86400, 1),
        "fits_one_h100": gpu.total_memory_checkpointed <= gpu.device_memory,
        "cpu_notes": cpu.notes, "h100_notes": gpu.notes,
    }


def parallel_table(device: str = "h100") -> dict:
    """Per-GPU memory (GiB) of each PARALLEL model: {name: {precision: {"1" | "ddp-K" | "fsdp-K": sizes}}}."""
    models = {}
    for name, overrides in PARALLEL.items():
        row: dict = {}
        for precision in ("fp32", "bf16-mixed"):
            cells = {}
            for gpus in PARALLEL_GPUS:
                for parallel in (("ddp",) if gpus == 1 else ("ddp", "fsdp")):
                    p = plan(config(overrides, **{"train.precision": precision}), device=device, gpus=gpus,
                             parallel=parallel)
                    cells["1" if gpus == 1 else f"{parallel}-{gpus}"] = {
                        key: round(getattr(p, key) / 2 ** 30, 2) for key in
                        ("weights", "gradients", "optimizer", "state", "activations", "activations_checkpointed",
                         "total_memory", "total_memory_checkpointed")}
                    cells["1" if gpus == 1 else f"{parallel}-{gpus}"]["fits"] = p.total_memory <= p.device_memory
            row[precision] = cells
        m = config(overrides).model
        models[name] = {"parameters": p.parameters, "parameters_m": round(p.parameters / 1e6, 1),
                        "micro_batch_per_gpu": config(overrides).train.batch_size, "block_size": m.block_size,
                        "dims": {"n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head,
                                 "n_kv_head": m.n_kv_head, "hidden": m.hidden_dim, "vocab_size": m.vocab_size},
                        **row}
    return {"device": device, "device_memory_gb": round(GPUS[device].memory / 1e9), "gpus": list(PARALLEL_GPUS),
            "unit": "GiB per GPU", "models": models}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per config after one warm-up step")
    p.add_argument("--configs", default=",".join(MEASURED))
    p.add_argument("--json-out", default=None)
    p.add_argument("--parallel-only", action="store_true",
                   help="recompute only the 'parallel' key (per-GPU memory under DDP/FSDP) of --json-out, no timing")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.parallel_only:
        if not args.json_out or not Path(args.json_out).exists():
            raise SystemExit("--parallel-only updates an existing results file: give it with --json-out")
        summary = json.loads(Path(args.json_out).read_text(encoding="utf-8"))
        summary["parallel"] = parallel_table()
        print(json.dumps(summary["parallel"], indent=2))
        atomic_write_text(Path(args.json_out), json.dumps(summary, indent=2) + "\n")
        return
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    started = machine()
    accuracy = {}
    for name in args.configs.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["memory_within_target"] = abs(row["memory_ratio"] - 1) <= TARGETS["memory"]
        row["step_time_within_target"] = abs(row["step_time_ratio"] - 1) <= TARGETS["step_time"]
        accuracy[name] = row
        print(name, json.dumps(row), file=sys.stderr)
    summary = {"benchmark": "plan_accuracy", "machine": {**started, "load_average_at_end": load_average()},
               "targets": TARGETS, "timed_steps": args.steps, "threads": 1, "accuracy": accuracy,
               "table": {name: table_row(name) for name in TABLE}, "parallel": parallel_table()}
    summary["machine"]["load_average_at_end"] = load_average()
    print(json.dumps(summary, indent=2))
    if args.json_out:
        atomic_write_text(Path(args.json_out), json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
