"""Training throughput on the CPU: lmforge GPT against Hugging Face GPT2LMHeadModel, in one process.

Both models get the same config, the same weights (copied with lmforge.interop.hf_gpt2), the same
batches, the same loss (mean cross-entropy on logits computed outside the model) and the same optimizer
(AdamW, same hyperparameters, fused). Rounds alternate between them (and swap which goes first), so
load from other processes on a shared machine hits both alike; medians of the per-round tokens/s and the
median of the per-round ratios are reported.

Also measured: the fp32 matrix-product rate of this machine (a large torch.mm, same threads), the MFU of
lmforge against it (flops_per_token * tokens/s / peak), and bf16-mixed (torch.autocast on the CPU)
against fp32 for lmforge on the larger config. Prints one JSON summary at the end.

    python benchmarks/train_throughput.py                 # both configs, ~5-10 minutes on 2 busy cores
    python benchmarks/train_throughput.py --quick         # fewer rounds, to check that it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.interop.hf_gpt2 import to_hf_config, to_hf_state_dict  # noqa: E402
from lmforge.model import GPT, flops_per_token  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)

CONFIGS = {
    # name: (model config, batch size)
    "char-small": (dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128), 12),
    "6l-384": (dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384), 8),
}
# fused: one kernel over all tensors; on the CPU 7-20x faster than foreach (which loops per tensor there)
ADAMW = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per comparison")
    p.add_argument("--seconds", type=float, default=3.0, help="target length of one timed round")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: on a CPU shared with other busy processes, torch's "
                        "default of one thread per core loses 2-7x to threads waiting on each other); 0 = default")
    p.add_argument("--activation", default="gelu_tanh", choices=("gelu", "gelu_tanh"),
                   help="MLP activation (GPT-2's own is gelu_tanh = HF gelu_new)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16-mixed comparison")
    p.add_argument("--compile", action="store_true",
                   help="also time lmforge under torch.compile (train.compile=true) against eager HF")
    p.add_argument("--quick", action="store_true", help="3 rounds of ~1 s: a check that it runs")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ timing
def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of an n x n x n torch.mm in `dtype` (median of `repeats` after a warm-up)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def make_step(model: torch.nn.Module, hf: bool, bf16: bool,
              forward: torch.nn.Module | None = None) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One training step (forward, mean cross-entropy, backward, AdamW) on (x, y) of shape (B, T).

    `forward` is what computes the logits (default `model`; e.g. torch.compile(model) shares its parameters).
    """
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    forward = model if forward is None else forward

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = forward(input_ids=x).logits if hf else forward(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def alternate(steps: dict[str, Callable], batches: list[tuple[torch.Tensor, torch.Tensor]], rounds: int,
              seconds: float) -> dict[str, list[float]]:
    """tokens/s of each step function per round; rounds alternate the order of the functions."""
    B, T = batches[0][0].shape
    names = list(steps)
    # Warm-up (allocator, oneDNN primitives) and a steps-per-round count that lasts about `seconds`.
    n_steps = {}
    for name in names:
        steps[name](*batches[0])
        t0 = time.perf_counter()
        steps[name](*batches[1])
        n_steps[name] = time.perf_counter() - t0
    per_round = max(2, int(seconds / max(min(n_steps.values()), 1e-4)))
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            for i in range(per_round):
                steps[name](*batches[i % len(batches)])
            results[name].append(per_round * B * T / (time.perf_counter() - t0))
    return results


def summarise(results: dict[str, list[float]], a: str, b: str) -> dict:
    """Medians of tokens/s, and the median of the per-round ratios a/b."""
    ratios = [x / y for x, y in zip(results[a], results[b])]
    return {f"{a}_tokens_per_s": round(statistics.median(results[a]), 1),
            f"{b}_tokens_per_s": round(statistics.median(results[b]), 1),
            "ratio": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
            "rounds": len(ratios)}


# ---------------------------------------------------------------------------------------- models
def build_pair(config: ModelConfig, seed: int) -> tuple[GPT, torch.nn.Module, float]:
    """(lmforge GPT, HF GPT2LMHeadModel with the same weights, max |logits difference| on one batch)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    ours = GPT(config)
    hf = GPT2LMHeadModel(GPT2Config(**to_hf_config(config), attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias") and not k.endswith("masked_bias")]
    if missing or unexpected:
        raise SystemExit(f"weight conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_embeddings:
        hf.tie_weights()
    ours.train(), hf.train()
    x = torch.randint(0, config.vocab_size, (2, config.block_size))
    with torch.no_grad():
        diff = (ours(x) - hf(input_ids=x).logits).abs().max().item()
    return ours, hf, diff


def compare_config(name: str, args: argparse.Namespace, peak_fp32: float, peak_bf16: float) -> dict:
    overrides, B = CONFIGS[name]
    config = ModelConfig(**overrides, dropout=0.0, activation=args.activation)
    T = config.block_size
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        tokens = torch.randint(0, config.vocab_size, (B, T + 1), generator=gen)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))

    ours, hf, logits_diff = build_pair(config, seed=0)
    first_losses = {"lmforge": make_step(ours, False, False)(*batches[0]),
                    "hf": make_step(hf, True, False)(*batches[0])}  # same weights, same batch: same loss
    ours, hf, _ = build_pair(config, seed=0)  # fresh weights again for the timed runs
    results = alternate({"lmforge": make_step(ours, False, False), "hf": make_step(hf, True, False)},
                        batches, args.rounds, args.seconds)
    fpt = flops_per_token(config)
    out = {"config": {**overrides, "batch_size": B, "activation": args.activation},
           "params": sum(p.numel() for p in ours.parameters()), "flops_per_token": fpt,
           "max_logits_diff": logits_diff,
           "first_step_loss": {k: round(v, 6) for k, v in first_losses.items()},
           "fp32": summarise(results, "lmforge", "hf")}
    out["fp32"]["mfu_lmforge"] = round(fpt * out["fp32"]["lmforge_tokens_per_s"] / peak_fp32, 3)
    out["fp32"]["mfu_hf"] = round(fpt * out["fp32"]["hf_tokens_per_s"] / peak_fp32, 3)
    out["fp32"]["per_round"] = {k: [round(v) for v in vs] for k, vs in results.items()}
    print(f"[{name}] fp32 lmforge {out['fp32']['lmforge_tokens_per_s']:,.0f} tok/s, "
          f"HF {out['fp32']['hf_tokens_per_s']:,.0f} tok/s, ratio {out['fp32']['ratio']} "
          f"({out['fp32']['ratio_min']}..{out['fp32']['ratio_max']}), MFU {out['fp32']['mfu_lmforge']}", flush=True)

    if args.compile:
        from lmforge.distributed import apply_compile

        ours, hf, _ = build_pair(config, seed=0)
        compiled = make_step(ours, False, False, forward=apply_compile(ours))
        t0 = time.perf_counter()
        compiled(*batches[0])
        compile_s = time.perf_counter() - t0
        res = alternate({"lmforge_compiled": compiled, "hf": make_step(hf, True, False)},
                        batches, args.rounds, args.seconds)
        out["fp32_compiled"] = summarise(res, "lmforge_compiled", "hf")
        out["fp32_compiled"]["compile_s"] = round(compile_s, 1)
        print(f"[{name}] fp32 lmforge compiled {out['fp32_compiled']['lmforge_compiled_tokens_per_s']:,.0f} tok/s, "
              f"HF eager {out['fp32_compiled']['hf_tokens_per_s']:,.0f}: {out['fp32_compiled']['ratio']}x", flush=True)

    if name == "6l-384" and not args.no_bf16:
        torch.manual_seed(0)
        fp32_model, bf16_model = GPT(config), GPT(config)
        bf16_model.load_state_dict(fp32_model.state_dict())
        res = alternate({"bf16": make_step(bf16_model, False, True), "fp32": make_step(fp32_model, False, False)},
                        batches, args.rounds, args.seconds)
        out["bf16_mixed"] = summarise(res, "bf16", "fp32")
        out["bf16_mixed"]["mfu_bf16_vs_bf16_peak"] = round(fpt * out["bf16_mixed"]["bf16_tokens_per_s"] / peak_bf16, 3)
        print(f"[{name}] bf16-mixed {out['bf16_mixed']['bf16_tokens_per_s']:,.0f} tok/s vs fp32 "
              f"{out['bf16_mixed']['fp32_tokens_per_s']:,.0f}: {out['bf16_mixed']['ratio']}x", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 3, 1.0
    if args.threads:
        torch.set_num_threads(args.threads)
    here = machine()
    peaks_fp32 = [matmul_peak(torch.float32)]
    peak_bf16 = matmul_peak(torch.bfloat16)
    print(f"{here['cpu']}, threads {here['torch_threads']}, load average {here['load_average_at_start']}; "
          f"fp32 mm {peaks_fp32[0] / 1e9:.1f} GFLOP/s, bf16 mm {peak_bf16 / 1e9:.1f} GFLOP/s", flush=True)
    summary = {"benchmark": "train_throughput", "machine": here, "adamw": ADAMW, "rounds": args.rounds, "round_seconds": args.seconds, "configs": {}}
    for name in args.configs.split(","):
        summary["configs"][name] = compare_config(name, args, max(peaks_fp32), peak_bf16)
        peaks_fp32.append(matmul_peak(torch.float32))
    # MFU against the best fp32 rate seen (the least disturbed by other processes): a conservative MFU.
    peak = max(peaks_fp32)
    for name, res in summary["configs"].items():
        res["fp32"]["mfu_lmforge"] = round(res["flops_per_token"] * res["fp32"]["lmforge_tokens_per_s"] / peak, 3)
        res["fp32"]["mfu_hf"] = round(res["flops_per_token"] * res["fp32"]["hf_tokens_per_s"] / peak, 3)
    summary["peak_fp32_gflops"] = round(peak / 1e9, 1)
    summary["peak_fp32_gflops_samples"] = [round(p / 1e9, 1) for p in peaks_fp32]
    summary["peak_bf16_gflops"] = round(peak_bf16 / 1e9, 1)
    here["load_average_at_end"] = load_average()
    summary["targets"] = {
        "fp32_ratio_vs_hf>=1.3": {n: r["fp32"]["ratio"] >= 1.3 for n, r in summary["configs"].items()},
        "mfu_lmforge>=0.70": {n: r["fp32"]["mfu_lmforge"] >= 0.70 for n, r in summary["configs"].items()},
        "bf16_vs_fp32>=1.5": {n: r["bf16_mixed"]["ratio"] >= 1.5 for n, r in summary["configs"].items()
                              if "bf16_mixed" in r},
        "compiled_fp32_ratio_vs_hf>=1.3": {n: r["fp32_compiled"]["ratio"] >= 1.3
                                           for n, r in summary["configs"].items() if "fp32_compiled" in r},
    }
    text = json.dumps(summary)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
