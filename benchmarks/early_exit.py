"""Self-speculative decoding (LayerSkip) on the CPU: what training the early exit buys, in one process.

The same GPT-2-style char model as benchmarks/speculative_decoding.py (6 layers, width 384, a 256-token context,
learned positions, LayerNorm, tanh GELU) is trained twice on the Shakespeare char shards, --steps steps of 8 x 256
tokens each, with the same seed and batches: plain, and with the early-exit loss (train.early_exit_layer = half its
layers, train.early_exit_weight --weight). Reported for each: the whole model's val loss and its early exit's (the
first half of the layers read by the final norm and head; measured for the plain model too), on the same 40 val
batches. Then, on one thread, each of --prompts val passages of 64 characters is continued by --new greedy tokens
(no end token) in four ways, rounds alternating their order:

    plain               the plain model, plain greedy decoding (KV cache)
    plain-early-exit    the plain model drafting with its own first half (assistant_early_exit), 3 guesses a step
    trained             the model trained with the early-exit loss, plain greedy decoding
    trained-early-exit  the same model drafting with its first half

Each early-exit way's tokens are compared with its model's plain greedy tokens (they should be identical up to
float rounding in near ties). Reported: tokens/s (median of rounds), each model's speed-up from self-speculation,
the share of guesses kept.

    python benchmarks/early_exit.py --json-out benchmarks/results/early_exit-cpu-X.json
    python benchmarks/early_exit.py --quick     # small models, 2 prompts, 1 round: a check that it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.data.batches import fixed_batches  # noqa: E402
from lmforge.data.shards import load_split, read_manifest  # noqa: E402
from lmforge.generate import GenerateConfig, make_rows  # noqa: E402
from lmforge.generate.api import decode_events  # noqa: E402
from lmforge.generate.speculative import early_exit  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from machine import machine, report  # noqa: E402  (benchmarks/machine.py)
from quality_shakespeare import ensure_data  # noqa: E402  (the char Shakespeare shards, made once)
import speculative_decoding as speculative  # noqa: E402
from speculative_decoding import GPT2_STYLE, MODELS, QUICK_MODELS, agreement, alternate  # noqa: E402

GUESSES = 3  # tokens the early exit guesses per step (half the model's depth per guess: few guesses pay)
VAL_BATCHES = 40


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shakespeare-char", help="prepared char dataset (made if missing)")
    p.add_argument("--runs", default="runs/early-exit", help="parent of the two run directories (replaced)")
    p.add_argument("--reuse", action="store_true", help="use the runs already trained under --runs")
    p.add_argument("--steps", type=int, default=900, help="training steps of each model")
    p.add_argument("--weight", type=float, default=0.2, help="train.early_exit_weight of the trained model")
    p.add_argument("--train-threads", type=int, default=0, help="torch threads for training; 0 = torch's default")
    p.add_argument("--threads", type=int, default=1, help="torch threads for decoding")
    p.add_argument("--prompts", type=int, default=6, help="val passages continued")
    p.add_argument("--new", type=int, default=176, help="new tokens per prompt (64 + new + guesses within the "
                   "256-token context: no window slide)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (medians are reported)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: a small model (2 layers / 64 wide), 30 steps, 2 prompts, 32 tokens, 1 round")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.prompts, args.new, args.rounds = 30, 2, 32, 1
    if min(args.steps, args.prompts, args.new, args.rounds, args.threads) < 1 or args.new > 176:
        p.error("--steps, --prompts, --new, --rounds and --threads must be positive, --new at most 176")
    return args


def shape(args: argparse.Namespace) -> dict[str, int]:
    return (QUICK_MODELS if args.quick else MODELS)["target"]


def train(name: str, args: argparse.Namespace, vocab_size: int) -> Path:
    """The run directory of the plain model ("plain") or of the one trained with the early-exit loss ("trained"):
    speculative_decoding's target model and recipe, the same seed and batches."""
    extra = {"train.early_exit_layer": str(shape(args)["n_layer"] // 2),
             "train.early_exit_weight": str(args.weight)} if name == "trained" else {}
    return speculative.train(name, args, vocab_size, shape(args), extra)


@torch.inference_mode()
def val_losses(model: GPT, batches: list, layers: int) -> dict[str, float]:
    """Mean cross-entropy of the whole model and of its early exit after `layers` layers, over the same batches."""
    cut = early_exit(model, layers)
    totals = {"model": 0.0, "early_exit": 0.0}
    count = 0
    for x, y in batches:
        totals["model"] += float(F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum"))
        totals["early_exit"] += float(F.cross_entropy(cut(x).flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    return {k: round(v / count, 4) for k, v in totals.items()}


def runner(model: GPT, prompts: list[list[int]], config: GenerateConfig, counts: dict[str, int]
           ) -> Callable[[], list[list[int]]]:
    def run() -> list[list[int]]:
        out = []
        for prompt in prompts:
            rows = make_rows(model, [prompt], config)
            for _ in decode_events(model, rows, config):
                pass
            counts["drafted"] += rows[0].drafted
            counts["accepted"] += rows[0].accepted
            out.append(rows[0].tokens)
        return out
    return run


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = Path(args.data)
    ensure_data(data)
    vocab_size = read_manifest(data)["vocab_size"]
    started = time.perf_counter()
    reused = args.reuse and all((Path(args.runs) / name / "checkpoints").is_dir() for name in ("plain", "trained"))
    runs = {name: train(name, args, vocab_size) for name in ("plain", "trained")}
    train_s = None if reused else round(time.perf_counter() - started, 1)
    torch.set_num_threads(args.threads)
    here = machine()
    models = {name: load_for_inference(run, "cpu")[0] for name, run in runs.items()}
    tokenizer = load_for_inference(runs["plain"], "cpu")[1]
    layers = shape(args)["n_layer"] // 2
    T = models["plain"].config.block_size
    val = load_split(data, "val")
    batches = fixed_batches(val, T, 8, VAL_BATCHES, seed=0)
    losses = {name: val_losses(model, batches, layers) for name, model in models.items()}

    step = (len(val) - 64) // args.prompts
    prompts = [[tokenizer.start_id] + [int(t) for t in val[i * step:i * step + 63]] for i in range(args.prompts)]
    greedy = GenerateConfig(greedy=True, max_new_tokens=args.new)
    speculating = GenerateConfig(greedy=True, max_new_tokens=args.new, assistant_early_exit=layers,
                                 num_assistant_tokens=GUESSES)
    counts = {f"{name}-early-exit": {"drafted": 0, "accepted": 0} for name in models}
    runners = {}
    for name, model in models.items():
        runners[name] = runner(model, prompts, greedy, {"drafted": 0, "accepted": 0})
        runners[f"{name}-early-exit"] = runner(model, prompts, speculating, counts[f"{name}-early-exit"])
    for c in counts.values():
        c["drafted"] = c["accepted"] = 0
    seconds, outputs, warmup = alternate(runners, args.rounds)
    tokens = args.prompts * args.new
    tps = {name: round(tokens / statistics.median(s), 1) for name, s in seconds.items()}
    summary = {
        "benchmark": "early_exit", "machine": here, "data": str(data), "train_steps": args.steps,
        "train_seconds": train_s, "model": {**GPT2_STYLE, **shape(args)}, "early_exit_layer": layers,
        "early_exit_weight": args.weight, "val_batches": VAL_BATCHES, "val_loss": losses,
        "prompts": args.prompts, "prompt_tokens": 64, "new_tokens": args.new, "rounds": args.rounds,
        "decode_threads": args.threads, "guesses_per_step": GUESSES, "tokens_per_s": tps,
        "seconds_per_round": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
        "warmup_seconds": warmup,
        "speedup_vs_plain_decoding": {name: round(tps[f"{name}-early-exit"] / tps[name], 3) for name in models},
        "trained_early_exit_vs_plain_model": round(tps["trained-early-exit"] / tps["plain"], 3),
        "acceptance": {name: round(c["accepted"] / c["drafted"], 3) if c["drafted"] else None
                       for name, c in counts.items()},
        "greedy_vs_plain_decoding": {f"{name}-early-exit": agreement(outputs[f"{name}-early-exit"], outputs[name])
                                     for name in models},
        "sample_text": {name: tokenizer.decode(prompts[0][1:] + outputs[name][0]) for name in models},
    }
    return report(summary, args.json_out)


if __name__ == "__main__":
    main()
