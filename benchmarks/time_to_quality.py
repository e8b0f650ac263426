"""Time to quality on Shakespeare (char): how soon lmforge's best recipe reaches the val loss that a nanoGPT-like
baseline ends at, the two trained in one job, taking turns.

Budget: 2000 steps of 12 x 64 tokens (1.54 M tokens) each, char-small (4 layers, 4 heads, 128 wide), the built-in
Shakespeare char shards (prepared if missing).
  baseline  char-small set up as nanoGPT's shakespeare-char: learned positions, LayerNorm, GELU, no bias, AdamW at
            lr 1e-3, cosine to 1e-4 after 100 warm-up steps (BASELINE below)
  recipe    the built-in recipe shakespeare-char (lmforge's best), with any --set KEY=VALUE on top of it

Both are real Trainers in this one process, taking turns every --eval-every steps: a baton handed over at the
trainers' on_eval hook, so only one computes at a time and a change in the machine's load falls on both alike. Each
one's clock runs only while it holds the baton. At the end of each of its turns the recipe's loss over the WHOLE
validation split is measured inside its turn, so evaluation time counts against the recipe; the baseline's is measured
once, at the end, off its clock. Reported: each one's final whole-val loss, the baseline's wall time for the budget,
the recipe's wall time (its evaluations included) to its first evaluation at or below the baseline's final whole-val
loss, and their ratio (issue 13's targets: ratio <= 0.4, recipe's final whole-val loss <= 1.62).

    python benchmarks/time_to_quality.py --threads 1 --json-out benchmarks/results/time_to_quality-cpu.json
    python benchmarks/time_to_quality.py --set optim.name=muon --set model.qk_norm=true --tag muon-qknorm ...
    python benchmarks/time_to_quality.py --quick        # a smoke run: 40 steps each, 8192 val tokens
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from lmforge.config import apply_overrides, read_config_file, run_config_from_dict  # noqa: E402
from lmforge.data.shards import load_split, read_manifest  # noqa: E402
from lmforge.eval.perplexity import evaluate_tokens  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.train.trainer import StopTraining, Trainer, with_vocab_size  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)
from quality_shakespeare import ensure_data  # noqa: E402  (the char Shakespeare shards, made once)

RECIPE = "shakespeare-char"  # the built-in recipe (src/lmforge/configs/shakespeare-char.yaml)
BASELINE = {"preset": "char-small", "model": {"pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu",
                                              "bias": False, "dropout": 0.0},
            "optim": {"name": "adamw", "lr": 1e-3, "min_lr": 1e-4, "schedule": "cosine", "warmup_steps": 100,
                      "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0}}
BUDGET = {"train.max_steps": 2000, "train.batch_size": 12, "train.grad_accum": 1, "model.block_size": 64}
TARGET_RATIO, TARGET_LOSS = 0.4, 1.62  # issue 13
RUNS = ("baseline", "recipe")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shakespeare-char", help="prepared dataset (made if missing)")
    p.add_argument("--runs", default="runs/time-to-quality", help="parent of the two run directories (replaced)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the recipe (repeatable), e.g. optim.name=muon")
    p.add_argument("--steps", type=int, default=BUDGET["train.max_steps"], help="optimizer steps of each run")
    p.add_argument("--eval-every", type=int, default=100,
                   help="steps per turn; the recipe's whole-val loss is measured at the end of each of its turns")
    p.add_argument("--val-tokens", type=int, default=0, help="evaluate the first N val tokens; 0 = the whole split")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--quick", action="store_true", help="a smoke run: --steps 40 --eval-every 10 --val-tokens 8192")
    p.add_argument("--tag", default="", help="a label for the results (e.g. muon)")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.val_tokens = 40, 10, 8192
    if args.steps < 1 or args.eval_every < 1 or args.val_tokens < 0:
        p.error("--steps and --eval-every must be positive, --val-tokens 0 or positive")
    return args


def run_config(name: str, args: argparse.Namespace, run_dir: Path, vocab_size: int):
    """The RunConfig of `name` (baseline | recipe) with the budget, one turn per eval_interval, every step logged
    (metrics.jsonl shows the turns), no checkpoints on the way. The trainer's own evaluation reads one fixed batch:
    the whole-val loss is measured here."""
    raw = BASELINE if name == "baseline" else read_config_file(RECIPE)
    extra = dict(item.split("=", 1) for item in args.set) if name == "recipe" else {}
    overrides = {**{k: str(v) for k, v in BUDGET.items()}, "train.max_steps": str(args.steps),
                 "data.path": args.data, "train.run_dir": str(run_dir), "train.resume": "none",
                 "train.save_interval": "0", "train.keep_last": "1", "train.eval_interval": str(args.eval_every),
                 "train.eval_batches": "1", "train.log_interval": "1", "train.patience": "0",
                 **({"train.num_threads": str(args.threads)} if args.threads else {}), **extra}
    return with_vocab_size(run_config_from_dict(apply_overrides(raw, overrides)), vocab_size)


class Baton:
    """Runs that take turns: only the holder computes, and each one's clock runs only while it holds the baton."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names, self.holder = names, names[0]
        self.clock = dict.fromkeys(names, 0.0)
        self.since = 0.0
        self.finished: set[str] = set()
        self.changed = threading.Condition()

    def take(self, name: str) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.holder == name)
            self.since = time.perf_counter()

    def elapsed(self, name: str) -> float:
        """Seconds `name` has held the baton, this turn included (call it while holding it)."""
        return self.clock[name] + time.perf_counter() - self.since

    def hand_over(self, name: str, finished: bool = False) -> None:
        """End `name`'s turn: the next unfinished run takes over (`name` again if it is the only one left)."""
        with self.changed:
            self.clock[name] = self.elapsed(name)
            if finished:
                self.finished.add(name)
            i = self.names.index(name)
            waiting = [n for n in self.names[i + 1:] + self.names[:i + 1] if n not in self.finished]
            self.holder = waiting[0] if waiting else None
            self.changed.notify_all()


def train_in_turns(configs: dict[str, Any], hooks: dict[str, Callable[[int], None]], baton: Baton,
                   trainers: dict[str, Trainer]) -> None:
    """Build a Trainer per config (into `trainers`) and run each one's fit() in its own thread, one at a time: each
    hands the baton over after each of its evaluations, having called its hook inside its turn. When one run
    fails, the others stop at their next evaluation, and the first error is raised here."""
    errors: list[BaseException] = []

    def turn_over(name: str) -> Callable[[int, dict[str, Any]], None]:
        def on_eval(step: int, measured: dict[str, Any]) -> None:
            hooks[name](step)
            baton.hand_over(name)
            baton.take(name)
            if errors:
                raise StopTraining(f"{errors[0]!r} in the other run")
        return on_eval

    def run(name: str) -> None:
        try:
            baton.take(name)
            trainers[name].fit()
        except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(e)
        finally:
            baton.hand_over(name, finished=True)

    for name, config in configs.items():
        trainers[name] = Trainer(config, progress=False, tensorboard=False, on_eval=turn_over(name))
    threads = [threading.Thread(target=run, args=(name,), name=name) for name in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def describe(config: Any) -> dict[str, Any]:
    """The settings that differ between the two runs (and the options issue 13 measures)."""
    return {"model": {k: getattr(config.model, k) for k in (
                "n_layer", "n_head", "n_embd", "block_size", "pos_encoding", "norm", "mlp", "bias", "qk_norm",
                "zero_init_proj", "logit_softcap", "tie_embeddings")},
            "optim": {k: getattr(config.optim, k) for k in (
                "name", "lr", "min_lr", "schedule", "warmup_steps", "weight_decay", "muon_lr", "muon_momentum",
                "muon_weight_decay")},
            "precision": config.train.precision, "compile": config.train.compile}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data, runs = Path(args.data), Path(args.runs)
    ensure_data(data)
    for name in RUNS:  # a fresh run each time: remove what an earlier run of this script wrote
        if (runs / name / "config.yaml").is_file():
            shutil.rmtree(runs / name)
    vocab_size = int(read_manifest(data)["vocab_size"])
    val = load_split(data, "val")
    val = val[:args.val_tokens] if args.val_tokens else val
    here = machine()
    configs = {name: run_config(name, args, runs / name, vocab_size) for name in RUNS}
    trainers: dict[str, Trainer] = {}
    baton = Baton(RUNS)
    curve: list[dict[str, float]] = []  # the recipe's whole-val loss at the end of each of its turns
    end_s: dict[str, float] = {}

    eval_s = [0.0]  # the recipe's time spent in its whole-val evaluations so far

    def recipe_hook(step: int) -> None:
        started = time.perf_counter()
        loss = evaluate_tokens(trainers["recipe"].raw_model, val, configs["recipe"].model.block_size, batch_size=64)
        eval_s[0] += time.perf_counter() - started
        curve.append({"step": step, "wall_s": round(baton.elapsed("recipe"), 2), "val_loss": round(loss["loss"], 4),
                      "eval_s": round(eval_s[0], 2)})
        if step == args.steps:
            end_s["recipe"] = baton.elapsed("recipe")
        print(f"[recipe] step {step}: whole-val {loss['loss']:.4f} at {curve[-1]['wall_s']} s", flush=True)

    def baseline_hook(step: int) -> None:
        if step == args.steps:
            end_s["baseline"] = baton.elapsed("baseline")

    train_in_turns(configs, {"baseline": baseline_hook, "recipe": recipe_hook}, baton, trainers)
    baseline_loss = evaluate_tokens(trainers["baseline"].raw_model, val, configs["baseline"].model.block_size,
                                    batch_size=64)["loss"]
    reached = next((point for point in curve if point["val_loss"] <= baseline_loss), None)
    ratio = round(reached["wall_s"] / end_s["baseline"], 3) if reached else None
    summary = {
        "benchmark": "time_to_quality", "tag": args.tag or None, "quick": args.quick,
        "budget": {"steps": args.steps, "batch_size": BUDGET["train.batch_size"],
                   "block_size": BUDGET["model.block_size"], "eval_every": args.eval_every},
        "val_tokens": len(val), "recipe_overrides": args.set,
        "baseline": {**describe(configs["baseline"]), "val_loss_whole_split": round(baseline_loss, 4),
                     "wall_s": round(end_s["baseline"], 2)},
        "recipe": {**describe(configs["recipe"]), "val_loss_whole_split": curve[-1]["val_loss"],
                   "wall_s": round(end_s["recipe"], 2), "evaluations": len(curve), "curve": curve},
        "recipe_reaches_baseline": {"step": reached["step"] if reached else None,
                                    "wall_s": reached["wall_s"] if reached else None, "ratio": ratio,
                                    # of which its whole-val evaluations, and the ratio without them
                                    "eval_s": reached["eval_s"] if reached else None,
                                    "ratio_training_only": round((reached["wall_s"] - reached["eval_s"])
                                                                 / end_s["baseline"], 3) if reached else None},
        "targets": {"ratio": TARGET_RATIO, "val_loss": TARGET_LOSS,
                    "ratio_met": ratio is not None and ratio <= TARGET_RATIO,
                    "val_loss_met": curve[-1]["val_loss"] <= TARGET_LOSS},
        "machine": here,
    }
    here["load_average_at_end"] = load_average()
    print(f"baseline: whole-val {summary['baseline']['val_loss_whole_split']} in {summary['baseline']['wall_s']} s; "
          f"recipe: whole-val {summary['recipe']['val_loss_whole_split']} in {summary['recipe']['wall_s']} s, "
          f"reaches the baseline's loss at step {summary['recipe_reaches_baseline']['step']} after "
          f"{summary['recipe_reaches_baseline']['wall_s']} s (ratio {ratio})", flush=True)
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
