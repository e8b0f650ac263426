"""Training throughput on the CPU: lmforge's own Trainer step beside Hugging Face GPT2LMHeadModel, in one process.

lmforge is timed as users run it: a real `Trainer` on the prepared Shakespeare char shards (data/shakespeare-char,
prepared if missing), each step one turn of its loop (`Trainer.advance`: batch from the shards, forward, loss,
backward, non-finite guard, gradient-norm clipping, scheduled lr, fused AdamW, metrics and TensorBoard every
log_interval steps). The reference is a plain loop around GPT2LMHeadModel with the same weights at the start
(copied with lmforge.interop.hf_gpt2), the same batches (the same seeded stream of windows from the same shards),
mean cross-entropy and fused AdamW with the same hyperparameters, and nothing else (no clipping, guard or logging).
Rounds alternate between them (and swap which goes first), so load from other processes on a shared machine hits
both alike; medians of the per-round tokens/s and of the per-round ratios are reported.

MFU: the fp32 matrix-product rate of this machine (a 2048^3 torch.mm, same threads) is measured before the first
round and after every round pair, in this process; each round's MFU is flops_per_token * tokens/s over the higher
of the two rates measured around it, and the median over rounds is reported (also the MFU against the best rate of
the whole run). --profile-steps runs torch.profiler over that many Trainer steps of char-small and splits the
step's CPU time by kind of op (matrix products, attention, optimizer, the rest), with the rate the matrix products
reach on their own. The larger config also times the Trainer with --precision bf16-mixed against fp32.

    python benchmarks/train_throughput.py --json-out benchmarks/results/train_throughput-cpu-1thread.json
    python benchmarks/train_throughput.py --quick         # fewer, shorter rounds, to check that it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.config import run_config_from_dict  # noqa: E402
from lmforge.data.batches import TokenBatches  # noqa: E402
from lmforge.data.shards import load_split  # noqa: E402
from lmforge.distributed import has_fast_bf16  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.interop.hf_gpt2 import to_hf_config, to_hf_state_dict  # noqa: E402
from lmforge.model import count_parameters, flops_per_token  # noqa: E402
from lmforge.train.trainer import Trainer  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)
from quality_shakespeare import ensure_data  # noqa: E402  (the char Shakespeare shards, made once)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    # name: (model config, batch size)
    "char-small": (dict(block_size=64, n_layer=4, n_head=4, n_embd=128), 12),
    "6l-384": (dict(block_size=256, n_layer=6, n_head=6, n_embd=384), 8),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--data", default=str(ROOT / "data" / "shakespeare-char"), help="prepared token shards")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per comparison")
    p.add_argument("--seconds", type=float, default=3.0, help="target length of one timed round")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (train.num_threads; default 1: on a CPU shared with other busy processes, "
                        "torch's default of one thread per core loses 2-7x to threads waiting on each other); "
                        "0 = torch's default")
    p.add_argument("--activation", default="gelu", choices=("gelu", "gelu_tanh"),
                   help="MLP activation: gelu (exact; char-small's own) or gelu_tanh (GPT-2's gelu_new, 4x slower "
                        "than exact gelu on an AVX-512 CPU with torch 2.13)")
    p.add_argument("--profile-steps", type=int, default=30,
                   help="Trainer steps of char-small under torch.profiler; 0: none")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16-mixed comparison")
    p.add_argument("--compile", action="store_true",
                   help="also time the Trainer with train.compile=true against eager HF")
    p.add_argument("--quick", action="store_true", help="3 rounds of ~1 s, 10 profiled steps: a check that it runs")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ timing
def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of `repeats` n x n x n torch.mm in `dtype` after a warm-up, over their whole time: like a round's
    tokens/s, an average over whatever else the machine did meanwhile."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return repeats * 2 * n**3 / (time.perf_counter() - t0)


def alternate(steps: dict[str, Callable[[], object]], tokens_per_step: int, rounds: int,
              seconds: float) -> tuple[dict[str, list[float]], list[float]]:
    """({name: tokens/s per round}, fp32 matmul FLOP/s measured before the first round and after each round pair).
    Rounds alternate the order of the step functions."""
    names = list(steps)
    step_s = {}
    for name in names:  # warm-up (allocator, oneDNN primitives), and a steps-per-round count lasting about `seconds`
        steps[name]()
        t0 = time.perf_counter()
        steps[name]()
        step_s[name] = time.perf_counter() - t0
    per_round = max(2, int(seconds / max(min(step_s.values()), 1e-4)))
    results: dict[str, list[float]] = {name: [] for name in names}
    peaks = [matmul_peak()]
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            for _ in range(per_round):
                steps[name]()
            results[name].append(per_round * tokens_per_step / (time.perf_counter() - t0))
        peaks.append(matmul_peak())
    return results, peaks


def summarise(results: dict[str, list[float]], a: str, b: str) -> dict:
    """Medians of tokens/s, and the median of the per-round ratios a/b."""
    ratios = [x / y for x, y in zip(results[a], results[b])]
    return {f"{a}_tokens_per_s": round(statistics.median(results[a]), 1),
            f"{b}_tokens_per_s": round(statistics.median(results[b]), 1),
            "ratio": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
            "rounds": len(ratios), "per_round": {k: [round(v) for v in vs] for k, vs in results.items()}}


def round_mfu(rates: list[float], peaks: list[float], fpt: int) -> list[float]:
    """MFU of each round against the higher of the matmul rates measured just before and just after it."""
    return [round(fpt * rate / max(peaks[r], peaks[r + 1]), 3) for r, rate in enumerate(rates)]


# ---------------------------------------------------------------------------------------- runners
def build_trainer(name: str, args: argparse.Namespace, run_dir: Path, **train: object) -> Trainer:
    """A Trainer of config `name` on the shards, begun (run_dir, metrics, TensorBoard), that never evaluates or
    saves while timed (max_steps is never reached), logging every 10 steps as by default."""
    overrides, B = CONFIGS[name]
    raw = {"model": {**overrides, "dropout": 0.0, "activation": args.activation}, "data": {"path": args.data},
           "train": {"run_dir": str(run_dir), "batch_size": B, "max_steps": 10**9, "eval_interval": 0,
                     "save_interval": 0, "num_threads": args.threads, "device": "cpu", **train}}
    trainer = Trainer(run_config_from_dict(raw), progress=False)
    trainer.begin()
    return trainer


def hf_reference(trainer: Trainer) -> tuple[torch.nn.Module, Callable[[], float]]:
    """(GPT2LMHeadModel with the trainer's current weights, one plain training step of it on the trainer's stream
    of batches, returning the loss)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config, tc, optim = trainer.raw_model.config, trainer.config.train, trainer.config.optim
    hf = GPT2LMHeadModel(GPT2Config(**to_hf_config(config), attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(trainer.raw_model.state_dict(), config), strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias") and not k.endswith("masked_bias")]
    if missing or unexpected:
        raise SystemExit(f"weight conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_embeddings:
        hf.tie_weights()
    hf.train()
    batches = TokenBatches(load_split(trainer.config.data.path, "train"), config.block_size, tc.batch_size,
                           seed=tc.seed, sampling=trainer.config.data.sampling)  # the trainer's own stream
    optimizer = torch.optim.AdamW(hf.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                  weight_decay=optim.weight_decay, fused=True)

    def step() -> float:
        x, y = batches.next_batch()
        logits = hf(input_ids=x).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return hf, step


# --------------------------------------------------------------------------------------- profile
def kind_of(op: str) -> str:
    if op in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matmul"
    if "scaled_dot_product" in op:
        return "attention"
    if "adam" in op.lower() or op.startswith("aten::_foreach") or op.startswith("Optimizer."):
        return "optimizer"
    return "rest"


def profile_steps(trainer: Trainer, steps: int, peak: float) -> dict:
    """torch.profiler over `steps` Trainer steps: self CPU time per step by kind of op, the ten costliest ops, and
    the rate of the matrix products alone (6 * N_matmul FLOPs per token, N_matmul = the weights of the products)
    against `peak`, and the MFU ceiling that rate and attention's leave even if all other work were free."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.advance()
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    kinds: dict[str, float] = {}
    for e in events:
        kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + e.self_cpu_time_total / 1e3 / steps  # ms/step
    total = sum(kinds.values())
    config = trainer.raw_model.config
    tokens = trainer.config.train.batch_size * config.block_size
    tied_head = config.vocab_size * config.n_embd if config.tie_embeddings else 0  # the LM head's product
    n_matmul = count_parameters(config).non_embedding + tied_head
    matmul_flops, attention_flops = 6 * n_matmul * tokens, (flops_per_token(config) - 6 * n_matmul) * tokens
    seconds = {k: v / 1e3 for k, v in kinds.items()}
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    return {
        "steps": steps, "wall_ms_per_step_profiled": round(wall * 1e3, 2),
        "self_cpu_ms_per_step": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "share": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_ops_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / steps, 2) for e in top},
        "matmul_gflops": round(matmul_flops / seconds["matmul"] / 1e9, 1),
        "matmul_vs_peak": round(matmul_flops / seconds["matmul"] / peak, 3),
        "attention_gflops": round(attention_flops / seconds.get("attention", 1e-12) / 1e9, 1),
        # the MFU a step would reach if everything but its matrix products and attention took no time at all
        "mfu_ceiling_matmul_and_attention_only": round(
            (matmul_flops + attention_flops) / (seconds["matmul"] + seconds.get("attention", 0.0)) / peak, 3),
    }


# ---------------------------------------------------------------------------------------- configs
def compare_config(name: str, args: argparse.Namespace, work: Path) -> dict:
    trainer = build_trainer(name, args, work / f"{name}-lmforge")
    config = trainer.raw_model.config
    tokens = trainer.config.train.batch_size * config.block_size
    hf, hf_step = hf_reference(trainer)
    x, _ = TokenBatches(load_split(args.data, "val"), config.block_size, 2, seed=0).next_batch()
    with torch.no_grad():
        logits_diff = (trainer.raw_model(x) - hf(input_ids=x).logits).abs().max().item()
    trainer.advance()  # the same weights and the same first batch: the same loss
    first = {"lmforge": round(trainer.step_loss, 6), "hf": round(hf_step(), 6)}
    results, peaks = alternate({"lmforge": trainer.advance, "hf": hf_step}, tokens, args.rounds, args.seconds)
    fpt = flops_per_token(config)
    fp32 = summarise(results, "lmforge", "hf")
    mfu = {k: round_mfu(results[k], peaks, fpt) for k in results}
    fp32.update({"mfu_lmforge": statistics.median(mfu["lmforge"]), "mfu_hf": statistics.median(mfu["hf"]),
                 "mfu_lmforge_per_round": mfu["lmforge"], "mfu_hf_per_round": mfu["hf"],
                 "mfu_lmforge_vs_best_peak": round(fpt * fp32["lmforge_tokens_per_s"] / max(peaks), 3),
                 "peak_fp32_gflops_samples": [round(p / 1e9, 1) for p in peaks]})
    out = {"config": {**CONFIGS[name][0], "vocab_size": config.vocab_size, "batch_size": tokens // config.block_size,
                      "activation": args.activation, "bias": config.bias, "tie_embeddings": config.tie_embeddings},
           "params": sum(p.numel() for p in trainer.raw_model.parameters()), "flops_per_token": fpt,
           "max_logits_diff": logits_diff, "first_step_loss": first, "fp32": fp32}
    print(f"[{name}] fp32 Trainer {fp32['lmforge_tokens_per_s']:,.0f} tok/s, HF loop {fp32['hf_tokens_per_s']:,.0f} "
          f"tok/s, ratio {fp32['ratio']} ({fp32['ratio_min']}..{fp32['ratio_max']}), MFU {fp32['mfu_lmforge']} "
          f"(HF {fp32['mfu_hf']}), load {load_average()}", flush=True)
    if name == "char-small" and args.profile_steps:
        out["profile"] = profile_steps(trainer, args.profile_steps, max(peaks))
        print(f"[{name}] profile: {out['profile']['share']}, matmuls at {out['profile']['matmul_vs_peak']} of the "
              f"peak, MFU ceiling {out['profile']['mfu_ceiling_matmul_and_attention_only']}", flush=True)
    trainer.logger.close()

    if args.compile:
        compiled = build_trainer(name, args, work / f"{name}-compiled", compile=True)
        t0 = time.perf_counter()
        compiled.advance()
        compile_s = time.perf_counter() - t0
        _, hf_step = hf_reference(compiled)
        res, _ = alternate({"lmforge_compiled": compiled.advance, "hf": hf_step}, tokens, args.rounds, args.seconds)
        out["fp32_compiled"] = {**summarise(res, "lmforge_compiled", "hf"), "compile_s": round(compile_s, 1)}
        compiled.logger.close()
        print(f"[{name}] fp32 compiled Trainer {out['fp32_compiled']['lmforge_compiled_tokens_per_s']:,.0f} tok/s, HF "
              f"eager {out['fp32_compiled']['hf_tokens_per_s']:,.0f}: {out['fp32_compiled']['ratio']}x", flush=True)

    if name == "6l-384" and not args.no_bf16 and not has_fast_bf16(torch.device("cpu")):
        out["bf16_mixed"] = {"skipped": "this CPU has no bf16 matrix instructions (benchmarks/bf16_speed.py matmul)"}
    elif name == "6l-384" and not args.no_bf16:
        bf16 = build_trainer(name, args, work / f"{name}-bf16", precision="bf16-mixed")
        fp32_trainer = build_trainer(name, args, work / f"{name}-fp32")
        res, _ = alternate({"bf16": bf16.advance, "fp32": fp32_trainer.advance}, tokens, args.rounds, args.seconds)
        out["bf16_mixed"] = summarise(res, "bf16", "fp32")
        bf16.logger.close(), fp32_trainer.logger.close()
        print(f"[{name}] bf16-mixed Trainer {out['bf16_mixed']['bf16_tokens_per_s']:,.0f} tok/s vs fp32 "
              f"{out['bf16_mixed']['fp32_tokens_per_s']:,.0f}: {out['bf16_mixed']['ratio']}x", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.profile_steps = 3, 1.0, min(args.profile_steps, 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_data(Path(args.data))
    here = machine()
    print(f"{here['cpu']}, threads {here['torch_threads']}, load average {here['load_average_at_start']}", flush=True)
    summary = {"benchmark": "train_throughput", "machine": here, "data": args.data, "rounds": args.rounds,
               "round_seconds": args.seconds, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="train_throughput-") as work:
        for name in args.configs.split(","):
            summary["configs"][name] = compare_config(name, args, Path(work))
    here["load_average_at_end"] = load_average()
    summary["targets"] = {
        "mfu_lmforge>=0.8": {n: r["fp32"]["mfu_lmforge"] >= 0.8 for n, r in summary["configs"].items()},
        "fp32_ratio_vs_hf>=1.3": {n: r["fp32"]["ratio"] >= 1.3 for n, r in summary["configs"].items()},
    }
    text = json.dumps(summary)
    print(text)
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
