"""Hand-fused elementwise ops in the recipe's training step: do they pay on this CPU?

Issue 13 asks whether fused RoPE / norm / activation kernels speed up the shakespeare-char recipe's step. In eager
PyTorch on a CPU, "fused" means fewer passes over memory: an autograd Function whose backward is written out, so it
saves one tensor and computes its gradient in two or three ops instead of autograd's chain through each op. This
script times lmforge's real Trainer step (Trainer.advance, one turn of its loop: batch, forward, loss, backward,
guard, clipping, scheduled lr, Muon + AdamW, metrics) on the recipe, with the model's own ops (eager) and with these hand-fused ones swapped in:
  relu2    relu(x)^2: saves relu(x) and returns 2 relu(x) g (one multiply-add instead of pow's and relu's backward)
  rmsnorm  x / rms(x) * w: saves x / rms(x) and 1 / rms(x); dx = (g w - x_hat mean(g w x_hat)) / rms(x)
  both     the two together
Turns alternate between them in one process (medians over --rounds of --steps steps each). Before timing, each
fused op is checked against the model's own op in float64 (outputs and gradients). torch.compile, which fuses for
real, is measured by benchmarks/train_throughput.py and time_to_quality.py.

    python benchmarks/fused_ops.py --json-out benchmarks/results/fused_ops-cpu-amd-avx2.json
    python benchmarks/fused_ops.py --quick       # 2 rounds of 2 steps: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

import lmforge.model as lmforge_model  # noqa: E402
from lmforge.config import apply_overrides, read_config_file, run_config_from_dict  # noqa: E402
from lmforge.data.shards import read_manifest  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.train.trainer import Trainer, with_vocab_size  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)
from quality_shakespeare import ensure_data  # noqa: E402  (the char Shakespeare shards, made once)

VARIANTS = ("eager", "relu2", "rmsnorm", "both")


class FusedReLU2(torch.autograd.Function):
    """relu(h)^2 with its backward written out: d/dh = 2 relu(h) (zero where h < 0)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        r = torch.relu(h)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return (r + r).mul_(g)


class FusedRMSNorm(torch.autograd.Function):
    """x / rms(x) * w over the last dimension, rms(x) = sqrt(mean(x^2) + eps), with its backward written out."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        inv = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))
        x_hat = x * inv
        ctx.save_for_backward(x_hat, inv, w)
        return x_hat * w

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_hat, inv, w = ctx.saved_tensors
        g_hat = g * w
        dw = (g * x_hat).reshape(-1, w.numel()).sum(0)
        dx = (g_hat - x_hat * (g_hat * x_hat).mean(-1, keepdim=True)).mul_(inv)
        return dx, dw, None


EAGER_MLP, EAGER_RMSNORM = lmforge_model.MLP.forward, nn.RMSNorm.forward


def fused_mlp(self, x: torch.Tensor) -> torch.Tensor:
    """lmforge's MLP.forward for mlp relu2, with FusedReLU2."""
    return self.drop(self.proj(FusedReLU2.apply(self.fc(x))))


def fused_rmsnorm(self, x: torch.Tensor) -> torch.Tensor:
    eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps  # nn.RMSNorm's default
    return FusedRMSNorm.apply(x, self.weight, eps)


def use(variant: str) -> None:
    """Swap the ops of `variant` into every model (the class methods, so the Trainer's model picks them up)."""
    lmforge_model.MLP.forward = fused_mlp if variant in ("relu2", "both") else EAGER_MLP
    nn.RMSNorm.forward = fused_rmsnorm if variant in ("rmsnorm", "both") else EAGER_RMSNORM


def check_against_autograd() -> dict[str, float]:
    """Largest difference, in float64, between each fused op and the model's own (output and input gradients)."""
    torch.manual_seed(0)
    h = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 16, dtype=torch.float64)
    diffs = {}
    for name, fused, eager in (
            ("relu2", lambda: FusedReLU2.apply(h), lambda: F.relu(h).square()),
            ("rmsnorm", lambda: FusedRMSNorm.apply(h, w, 1e-6), lambda: F.rms_norm(h, (16,), w, 1e-6))):
        results = []
        for f in (fused, eager):
            out = f()
            grads = torch.autograd.grad(out, (h, w) if name == "rmsnorm" else (h,), g)
            results.append((out, *grads))
        diffs[name] = max(float((a - b).detach().abs().max()) for a, b in zip(*results))
    return diffs


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "shakespeare-char"), help="prepared token shards")
    p.add_argument("--rounds", type=int, default=9, help="alternating rounds")
    p.add_argument("--steps", type=int, default=15, help="timed Trainer steps per variant per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 steps: a check that it runs")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 2
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be positive")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    ensure_data(data)
    differences = check_against_autograd()
    here = machine()
    with tempfile.TemporaryDirectory() as tmp:
        raw = apply_overrides(read_config_file("shakespeare-char"), {
            "data.path": str(data), "train.run_dir": str(Path(tmp) / "run"), "train.resume": "none",
            "train.max_steps": "100000", "train.save_interval": "0", "train.eval_interval": "0",
            "train.num_threads": str(args.threads)})
        config = with_vocab_size(run_config_from_dict(raw), int(read_manifest(data)["vocab_size"]))
        trainer = Trainer(config, progress=False, tensorboard=False)
        trainer.begin()
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        try:
            for r in range(args.rounds):
                for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                    use(variant)
                    trainer.advance()  # warm
                    started = time.perf_counter()
                    for _ in range(args.steps):
                        trainer.advance()
                    times[variant].append((time.perf_counter() - started) / args.steps * 1e3)
        finally:
            use("eager")
    ms = {v: round(statistics.median(t), 2) for v, t in times.items()}
    summary = {
        "benchmark": "fused_ops", "config": "shakespeare-char", "threads": args.threads, "rounds": args.rounds,
        "steps_per_round": args.steps, "max_abs_diff_float64": differences, "ms_per_step": ms,
        "per_round_ms": {v: [round(x, 2) for x in t] for v, t in times.items()},
        "speedup_vs_eager": {v: round(ms["eager"] / ms[v], 3) for v in VARIANTS if v != "eager"},
        "machine": {**here, "load_average_at_end": load_average()},
    }
    print("ms per Trainer step: " + ", ".join(f"{v} {ms[v]}" for v in VARIANTS)
          + "; speed-up over eager: " + ", ".join(f"{v} {x}x" for v, x in summary["speedup_vs_eager"].items()),
          flush=True)
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
