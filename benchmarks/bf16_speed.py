"""bf16 against fp32 in lmforge's own Trainer step on the CPU: speed, and the loss after 2000 steps.

The config: 6 layers, 6 heads, 384 wide, block 256, batch 8 (10.7 M parameters) on the built-in Shakespeare char
shards (vocabulary 65), every other setting lmforge's default (learned positions, LayerNorm, GELU, AdamW with
clipping, cosine schedule).

speed    one Trainer per precision (fp32, bf16-mixed, bf16-compute; same seed, so the same weights and batches;
         with --compile also each one with train.compile, against eager and compiled fp32),
         timed by Trainer.train_step (data, forward, loss, backward, guard, clipping, AdamW: the step users run)
         in rounds that alternate the order of the precisions, in one process; the median of the per-round
         ratios fp32 ms / bf16 ms is reported, with the load average at start and end (the machine is shared).
quality  a full run of max_steps (default 2000) per precision (--compile: compiled) with Trainer.fit, then the
         loss over the whole val split (lmforge.eval.perplexity.evaluate_tokens); runs of different precisions may
         be separate processes (their losses do not depend on timing).
compare  the quality runs' evaluations so far (metrics.jsonl: loss on the fixed val batches every eval_interval
         steps) side by side at each step both reached, for runs stopped before max_steps.
matmul   for a CPU without bf16 matrix instructions (lmforge.distributed.has_fast_bf16 False, e.g. AVX2 only), where
         a bf16 Trainer step would take minutes: torch.mm GFLOP/s in fp32 and bf16 on a few shapes (128, 384, 1024
         square; 2048x384x1536, a width-384 MLP product of B*T=2048 tokens), the median of a few repeats after a
         warm-up (one or two of a slow bf16 product), and the decoding Linear layers at batch 1 and 8 (width 384):
         nn.Linear in fp32 and bf16 against generate.quantize.Int8Linear (int8 weights, bf16 activations). `speed`
         refuses such a CPU and points here.

    python benchmarks/bf16_speed.py speed --json-out benchmarks/results/bf16_speed-cpu.json
    python benchmarks/bf16_speed.py quality --precisions fp32 --json-out benchmarks/results/bf16_quality-fp32-cpu.json
    python benchmarks/bf16_speed.py compare --precisions fp32,bf16-compute --json-out benchmarks/results/bf16_quality-cpu.json
    python benchmarks/bf16_speed.py matmul --json-out benchmarks/results/bf16_speed-cpu-amd-avx2.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from lmforge.config import load_run_config  # noqa: E402
from lmforge.data.shards import load_split  # noqa: E402
from lmforge.distributed import has_fast_bf16  # noqa: E402
from lmforge.eval.perplexity import evaluate_tokens  # noqa: E402
from lmforge.generate.quantize import Int8Linear  # noqa: E402
from lmforge.train.trainer import Trainer  # noqa: E402
from machine import load_average, machine, report  # noqa: E402  (benchmarks/machine.py)
from quality_shakespeare import ensure_data  # noqa: E402

CONFIG = {"model.n_layer": "6", "model.n_head": "6", "model.n_embd": "384", "model.block_size": "256",
          "train.batch_size": "8", "train.device": "cpu"}
PRECISIONS = ("fp32", "bf16-mixed", "bf16-compute")
MATMUL_SHAPES = ((128, 128, 128), (384, 384, 384), (1024, 1024, 1024), (2048, 384, 1536))  # (m, k, n): (m, k) @ (k, n)
LINEAR_SHAPES = ((384, 384), (384, 1536), (1536, 384))  # (in, out) of a width-384 block's attention and MLP layers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("speed", "quality", "compare", "matmul"))
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated, from " + ", ".join(PRECISIONS))
    p.add_argument("--data", default=str(ROOT / "data" / "shakespeare-char"), help="prepared dataset (made if missing)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "bf16-speed"), help="run directories go here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    p.add_argument("--compile", action="store_true", help="speed: also time each precision with train.compile "
                   "(torch.compile; named PRECISION+compile in the output); quality: train with it")
    p.add_argument("--rounds", type=int, default=7, help="speed: alternating rounds")
    p.add_argument("--steps", type=int, default=5, help="speed: steps per precision per round")
    p.add_argument("--max-steps", type=int, default=2000, help="quality: steps per run")
    p.add_argument("--seconds", type=float, default=0.3, help="matmul: time to spend repeating each measurement "
                   "(at least 2 repeats after the warm-up; a slow bf16 product gets only those)")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def make_trainer(precision: str, args: argparse.Namespace, run: str, extra: dict[str, str]) -> Trainer:
    run_dir = Path(args.runs) / run
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own output directory
    config = load_run_config(None, {**CONFIG, "data.path": args.data, "train.precision": precision,
                                    "train.run_dir": str(run_dir), "train.num_threads": str(args.threads), **extra})
    return Trainer(config, progress=False, tensorboard=False)


def time_steps(trainer: Trainer, n: int) -> float:
    """Seconds per Trainer.train_step over n steps (the loop's own bookkeeping: step count)."""
    t0 = time.perf_counter()
    for _ in range(n):
        trainer.train_step()
        trainer.step += 1
    return (time.perf_counter() - t0) / n


def speed(args: argparse.Namespace, precisions: list[str]) -> dict:
    variants = [(p, False) for p in precisions] + ([(p, True) for p in precisions] if args.compile else [])
    trainers = {p + ("+compile" if compiled else ""):
                make_trainer(p, args, f"speed-{p}{'-compile' if compiled else ''}",
                             {"train.max_steps": "100000", "train.compile": str(compiled).lower()})
                for p, compiled in variants}
    precisions = list(trainers)
    for trainer in trainers.values():
        time_steps(trainer, 3)  # warm-up: allocator, oneDNN primitives, torch.compile's graphs
    per_round: dict[str, list[float]] = {p: [] for p in precisions}
    for r in range(args.rounds):
        for p in (precisions if r % 2 == 0 else precisions[::-1]):
            per_round[p].append(time_steps(trainers[p], args.steps))
        print(f"round {r}: " + ", ".join(f"{p} {per_round[p][-1] * 1000:.0f} ms" for p in precisions)
              + f"; load {load_average()}", flush=True)
    out: dict = {"ms_per_step": {p: round(statistics.median(v) * 1000, 1) for p, v in per_round.items()},
                 "ms_per_step_per_round": {p: [round(t * 1000, 1) for t in v] for p, v in per_round.items()}}
    for base in ("fp32", "fp32+compile"):  # each variant against eager fp32 and against compiled fp32
        if base not in precisions:
            continue
        out[f"speedup_vs_{base}"] = {}
        for p in precisions:
            if p == base:
                continue
            ratios = [a / b for a, b in zip(per_round[base], per_round[p])]
            out[f"speedup_vs_{base}"][p] = {"median": round(statistics.median(ratios), 2),
                                            "min": round(min(ratios), 2), "max": round(max(ratios), 2)}
    tokens = int(CONFIG["train.batch_size"]) * int(CONFIG["model.block_size"])
    out["tokens_per_s"] = {p: round(tokens / (ms / 1000)) for p, ms in out["ms_per_step"].items()}
    return out


def quality(args: argparse.Namespace, precisions: list[str]) -> dict:
    val = load_split(Path(args.data), "val")
    out = {}
    for precision in precisions:
        p = precision + ("+compile" if args.compile else "")  # --compile: each run with train.compile
        trainer = make_trainer(precision, args, f"quality-{p.replace('+', '-')}",
                               {"train.max_steps": str(args.max_steps), "train.save_interval": "0",
                                "train.keep_last": "1", "train.compile": str(args.compile).lower()})
        start = time.time()
        summary = trainer.fit()
        wall = time.time() - start
        whole = evaluate_tokens(trainer.raw_model, val, trainer.config.model.block_size, batch_size=16)
        out[p] = {"steps": summary["steps"], "train_wall_s": round(wall, 1), "train_loss": round(summary["train_loss"], 4),
                  "val_loss_fixed_batches": round(summary["val_loss"], 4),
                  "val_loss_whole_split": round(whole["loss"], 4), "val_tokens": whole["tokens"]}
        print(f"[{p}] whole-val loss {out[p]['val_loss_whole_split']} after {summary['steps']} steps, {wall:.0f} s",
              flush=True)
    return out


def compare(args: argparse.Namespace, precisions: list[str]) -> dict:
    curves = {}
    for p in precisions:
        lines = (Path(args.runs) / f"quality-{p.replace('+', '-')}" / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip().endswith("}")]
        curves[p] = {r["step"]: r["val_loss"] for r in records if r.get("kind") == "eval"}
    common = sorted(set.intersection(*(set(c) for c in curves.values())))
    first = precisions[0]
    rows = [{"step": step, **{p: round(curves[p][step], 4) for p in precisions},
             **{f"{p}_minus_{first}": round(curves[p][step] - curves[first][step], 4) for p in precisions[1:]}}
            for step in common]
    for row in rows:
        print(row, flush=True)
    return {"val_loss_fixed_batches_at_common_steps": rows,
            "steps_reached": {p: max(c, default=0) for p, c in curves.items()}}


def seconds_per_call(f, seconds: float, max_repeats: int = 1000) -> tuple[float, int]:
    """(median seconds of f(), repeats) over about `seconds` of repeats (at least 2) after one warm-up call."""
    f()
    times: list[float] = []
    while (sum(times) < seconds or len(times) < 2) and len(times) < max_repeats:
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def matmul(args: argparse.Namespace, precisions: list[str]) -> dict:
    torch.manual_seed(0)
    products = []
    for m, k, n in MATMUL_SHAPES:
        row: dict = {"shape": f"{m}x{k}x{n}"}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            s, repeats = seconds_per_call(lambda: torch.mm(a, b), args.seconds)
            row[f"{name}_ms"] = round(s * 1000, 3)
            row[f"{name}_gflops"] = round(2 * m * k * n / s / 1e9, 2)
            row[f"{name}_repeats"] = repeats
        row["bf16_slower_x"] = round(row["bf16_ms"] / row["fp32_ms"], 1)
        products.append(row)
        print(row, f"load {load_average()}", flush=True)
    layers = []
    for fan_in, fan_out in LINEAR_SHAPES:
        linear = torch.nn.Linear(fan_in, fan_out)
        variants = {"fp32": linear, "bf16": copy.deepcopy(linear).to(torch.bfloat16), "int8": Int8Linear(linear)}
        for batch in (1, 8):
            x = torch.randn(batch, fan_in)
            inputs = {"fp32": x, "bf16": x.to(torch.bfloat16), "int8": x}
            row = {"in": fan_in, "out": fan_out, "batch": batch}
            with torch.no_grad():
                for name, layer in variants.items():
                    s, _ = seconds_per_call(lambda: layer(inputs[name]), args.seconds)
                    row[f"{name}_us"] = round(s * 1e6, 1)
            row["bf16_slower_x"] = round(row["bf16_us"] / row["fp32_us"], 2)
            row["int8_slower_x"] = round(row["int8_us"] / row["fp32_us"], 2)
            layers.append(row)
            print(row, flush=True)
    return {"has_fast_bf16": has_fast_bf16(torch.device("cpu")), "matmul": products, "decode_linear": layers}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")
    if args.part == "speed" and not has_fast_bf16(torch.device("cpu")) and precisions != ["fp32"]:
        print("bf16_speed.py speed: this CPU has no bf16 matrix instructions (has_fast_bf16 is False), so a bf16 "
              "Trainer step takes minutes; measure it with `bf16_speed.py matmul` instead", file=sys.stderr)
        raise SystemExit(2)
    if args.part in ("speed", "quality"):
        ensure_data(Path(args.data))
    summary = {"benchmark": f"bf16_{args.part}", "machine": machine(), "config": CONFIG}
    if args.part == "matmul":
        summary["config"] = {"matmul_shapes_mkn": [list(s) for s in MATMUL_SHAPES],
                             "linear_shapes_in_out": [list(s) for s in LINEAR_SHAPES], "seconds": args.seconds}
    summary[args.part] = {"speed": speed, "quality": quality, "compare": compare, "matmul": matmul}[args.part](
        args, precisions)
    report(summary, args.json_out, indent=2)
    return summary


if __name__ == "__main__":
    main()
