"""Muon's optimizer step on a model's hidden matrices: torch.optim.Muon against lmforge's BatchedMuon, in one process.

The matrices are those Muon trains in a real model (the blocks' attn.qkv, attn.proj, mlp.fc, mlp.proj weights of a
preset built by lmforge, with the recipe's widths), each with a random gradient; each optimizer steps the same
parameters over the same gradients, turns alternating between them so that load from other processes falls on all
alike. Timed (median ms per step over --rounds rounds):
  torch          torch.optim.Muon: one matrix at a time, its Newton-Schulz iteration always in bfloat16
  batched-bf16   lmforge's step (train/muon.py): one batched iteration per matrix shape, in bfloat16
  batched-fp32   the same in float32 (what optim.muon_ns_dtype auto picks on a CPU without bf16 hardware)
  single-fp32    lmforge's step in float32 with each matrix in its own parameter group, so nothing is batched:
                 what batching itself gives
and the ratios to torch's. Also recorded: what optim.muon_ns_dtype auto picks on this machine.

    python benchmarks/muon_step.py --json-out benchmarks/results/muon_step-cpu-amd-avx2.json
    python benchmarks/muon_step.py --quick                      # 2 rounds of 1 step: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.config import RunConfig, apply_overrides, read_config_file, run_config_from_dict  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.train.muon import BatchedMuon  # noqa: E402
from lmforge.train.optim import muon_ns_dtype, param_groups  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)

VARIANTS = {"torch": None, "batched-bf16": torch.bfloat16, "batched-fp32": torch.float32, "single-fp32": torch.float32}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="shakespeare-char", help="a built-in recipe or a config file (the model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per variant per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--quick", action="store_true", help="2 rounds of 1 step: a check that it runs")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 1
    return args


def model_config(args: argparse.Namespace) -> RunConfig:
    overrides = {"model.vocab_size": "65", **dict(item.split("=", 1) for item in args.set)}
    return run_config_from_dict(apply_overrides(read_config_file(args.config), overrides))


def optimizer(variant: str, shapes: list[torch.Size], config: RunConfig) -> tuple[torch.optim.Optimizer, list]:
    """A Muon over fresh parameters of `shapes`, each with a fixed random gradient (the same for every variant)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    o = config.optim
    kwargs = dict(lr=o.muon_lr, momentum=o.muon_momentum, weight_decay=o.muon_weight_decay,
                  adjust_lr_fn=o.muon_adjust_lr)
    if VARIANTS[variant] is None:
        return torch.optim.Muon(params, **kwargs), params
    groups = [{"params": [p]} for p in params] if variant.startswith("single") else params  # batching is per group
    return BatchedMuon(groups, ns_dtype=VARIANTS[variant], **kwargs), params


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    here = machine()
    config = model_config(args)
    model = GPT(config.model)
    hidden = next(g for g in param_groups(model, 0.0, muon=True) if g.get("muon"))
    shapes = [p.shape for p in hidden["params"]]
    opts = {name: optimizer(name, shapes, config)[0] for name in VARIANTS}
    for opt in opts.values():  # the first step makes the momentum buffers
        opt.step()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                opts[name].step()
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.1f} ms" for n in VARIANTS), flush=True)
    ms = {name: round(statistics.median(t), 2) for name, t in times.items()}
    auto = "bf16" if muon_ns_dtype("auto", torch.device("cpu")) == torch.bfloat16 else "fp32"
    summary = {
        "benchmark": "muon_step", "machine": here, "config": args.config, "overrides": args.set,
        "matrices": len(shapes), "shapes": [list(s) for s in sorted({tuple(s) for s in shapes})], "rounds": args.rounds,
        "steps_per_round": args.steps, "ms_per_step": ms,
        "speedup_vs_torch": {name: round(ms["torch"] / ms[name], 2) for name in VARIANTS if name != "torch"},
        "auto_ns_dtype_here": auto,
        "auto_speedup_vs_torch": round(ms["torch"] / ms[f"batched-{auto}"], 2),
    }
    here["load_average_at_end"] = load_average()
    print(json.dumps({k: summary[k] for k in ("ms_per_step", "speedup_vs_torch", "auto_ns_dtype_here")}))
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
