"""Time to quality on Shakespeare (char): how soon lmforge's best recipe reaches the val loss that a nanoGPT-like
baseline ends at, the two trained in one job, taking turns.

Budget: 2000 steps of 12 x 64 tokens (1.54 M tokens) each, char-small (4 layers, 4 heads, 128 wide), the built-in
Shakespeare char shards (prepared if missing).
  baseline  char-small set up as nanoGPT's shakespeare-char: learned positions, LayerNorm, GELU, no bias, AdamW at
            lr 1e-3, cosine to 1e-4 after 100 warm-up steps (BASELINE below)
  recipe    the built-in recipe shakespeare-char (lmforge's best), with any --set KEY=VALUE on top of it

Both are real Trainers in this one process, taking turns every --eval-every steps: a baton handed over at the
trainers' on_eval hook, so only one computes at a time and a change in the machine's load falls on both alike. Each
one's clock runs only while it holds the baton. The baseline's loss over the WHOLE validation split is measured once,
at the end, off its clock: that is the target.

At the end of each of its turns the recipe is evaluated as a user watching for that target would: its trainer's own
estimate on --screen-batches fixed val batches (on its clock, as in any run), then its whole-val loss (timed, with
its clock stopped). Two ways of watching are then charged from those measurements:
  screened     a whole-val evaluation only at turns whose estimate is at or below the target, until one confirms
               it: the estimates and every whole-val evaluation run count against the recipe (the reported ratio)
  every turn   a whole-val evaluation at every turn, all of them counted (how this benchmark measured before)
Reported: each one's final whole-val loss, the baseline's wall time for the budget, the recipe's wall time to the
first whole-val evaluation at or below the target under each way of watching, and its ratio to the baseline's
(issue 13's targets: ratio <= 0.4, recipe's final whole-val loss <= 1.62). The screened time is never earlier than
the true crossing: a turn counts only once a whole-val evaluation confirms it.

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
SCREEN_BATCHES = 20  # the recipe's train.eval_batches: 20 x 12 x 64 = 15,360 val tokens


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shakespeare-char", help="prepared dataset (made if missing)")
    p.add_argument("--runs", default="runs/time-to-quality", help="parent of the two run directories (replaced)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the recipe (repeatable), e.g. optim.name=muon")
    p.add_argument("--steps", type=int, default=BUDGET["train.max_steps"], help="optimizer steps of each run")
    p.add_argument("--eval-every", type=int, default=100,
                   help="steps per turn; the recipe's whole-val loss is measured at the end of each of its turns")
    p.add_argument("--screen-batches", type=int, default=SCREEN_BATCHES,
                   help="fixed val batches of the recipe trainer's own estimate at each turn (its eval_batches)")
    p.add_argument("--val-tokens", type=int, default=0, help="evaluate the first N val tokens; 0 = the whole split")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--quick", action="store_true", help="a smoke run: --steps 40 --eval-every 10 --val-tokens 8192")
    p.add_argument("--tag", default="", help="a label for the results (e.g. muon)")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.val_tokens, args.screen_batches = 40, 10, 8192, 2
    if args.steps < 1 or args.eval_every < 1 or args.val_tokens < 0 or args.screen_batches < 1:
        p.error("--steps, --eval-every and --screen-batches must be positive, --val-tokens 0 or positive")
    return args


def run_config(name: str, args: argparse.Namespace, run_dir: Path, vocab_size: int):
    """The RunConfig of `name` (baseline | recipe) with the budget, one turn per eval_interval, every step logged
    (metrics.jsonl shows the turns), no checkpoints on the way. The recipe trainer's own evaluation reads
    --screen-batches fixed val batches (its estimate), the baseline's one (its whole-val loss is measured here)."""
    raw = BASELINE if name == "baseline" else read_config_file(RECIPE)
    extra = dict(item.split("=", 1) for item in args.set) if name == "recipe" else {}
    overrides = {**{k: str(v) for k, v in BUDGET.items()}, "train.max_steps": str(args.steps),
                 "data.path": args.data, "train.run_dir": str(run_dir), "train.resume": "none",
                 "train.save_interval": "0", "train.keep_last": "1", "train.eval_interval": str(args.eval_every),
                 "train.eval_batches": str(args.screen_batches if name == "recipe" else 1),
                 "train.log_interval": "1", "train.patience": "0",
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


def train_in_turns(configs: dict[str, Any], hooks: dict[str, Callable[[int, dict[str, Any]], None]], baton: Baton,
                   trainers: dict[str, Trainer]) -> None:
    """Build a Trainer per config (into `trainers`) and run each one's fit() in its own thread, one at a time: each
    hands the baton over after each of its evaluations, having called its hook inside its turn. When one run
    fails, the others stop at their next evaluation, and the first error is raised here."""
    errors: list[BaseException] = []

    def turn_over(name: str) -> Callable[[int, dict[str, Any]], None]:
        def on_eval(step: int, measured: dict[str, Any]) -> None:
            hooks[name](step, measured)
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


def first_reached(curve: list[dict[str, float]], target: float, screened: bool, baseline_s: float) -> dict[str, Any]:
    """The first turn of `curve` whose whole-val loss is at or below `target`, and the recipe's wall time to it with
    the whole-val evaluations that way of watching runs: at every turn, or (screened) only at turns whose estimate
    is at or below the target. None everywhere if no turn gets there."""
    charged, evaluations = 0.0, 0
    for point in curve:
        if screened and point["val_loss_estimate"] > target:
            continue
        charged += point["whole_val_s"]
        evaluations += 1
        if point["val_loss"] <= target:
            wall_s = point["wall_s"] + charged
            return {"step": point["step"], "wall_s": round(wall_s, 2), "ratio": round(wall_s / baseline_s, 3),
                    "whole_val_evaluations": evaluations, "whole_val_s": round(charged, 2),
                    "ratio_training_only": round(point["wall_s"] / baseline_s, 3)}
    return dict.fromkeys(("step", "wall_s", "ratio", "whole_val_evaluations", "whole_val_s", "ratio_training_only"))


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
    curve: list[dict[str, float]] = []  # the recipe at the end of each of its turns
    end_s: dict[str, float] = {}
    off_clock = [0.0]  # the recipe's whole-val evaluations so far: timed, then taken off its clock

    def recipe_hook(step: int, measured: dict[str, Any]) -> None:
        started = time.perf_counter()
        loss = evaluate_tokens(trainers["recipe"].raw_model, val, configs["recipe"].model.block_size, batch_size=64)
        whole_val_s = time.perf_counter() - started
        off_clock[0] += whole_val_s
        wall_s = baton.elapsed("recipe") - off_clock[0]  # its steps and its trainer's estimates
        curve.append({"step": step, "wall_s": round(wall_s, 2), "val_loss_estimate": round(measured["val_loss"], 4),
                      "val_loss": round(loss["loss"], 4), "whole_val_s": round(whole_val_s, 2)})
        if step == args.steps:
            end_s["recipe"] = wall_s
        print(f"[recipe] step {step}: estimate {measured['val_loss']:.4f}, whole-val {loss['loss']:.4f} at "
              f"{curve[-1]['wall_s']} s (+{whole_val_s:.2f} s to evaluate the whole split)", flush=True)

    def baseline_hook(step: int, measured: dict[str, Any]) -> None:
        if step == args.steps:
            end_s["baseline"] = baton.elapsed("baseline")

    train_in_turns(configs, {"baseline": baseline_hook, "recipe": recipe_hook}, baton, trainers)
    baseline_loss = round(evaluate_tokens(trainers["baseline"].raw_model, val, configs["baseline"].model.block_size,
                                          batch_size=64)["loss"], 4)
    reached = {way: first_reached(curve, baseline_loss, way == "screened", end_s["baseline"])
               for way in ("screened", "every_turn")}
    summary = {
        "benchmark": "time_to_quality", "tag": args.tag or None, "quick": args.quick,
        "budget": {"steps": args.steps, "batch_size": BUDGET["train.batch_size"],
                   "block_size": BUDGET["model.block_size"], "eval_every": args.eval_every},
        "val_tokens": len(val), "screen_batches": args.screen_batches, "recipe_overrides": args.set,
        "baseline": {**describe(configs["baseline"]), "val_loss_whole_split": baseline_loss,
                     "wall_s": round(end_s["baseline"], 2)},
        "recipe": {**describe(configs["recipe"]), "val_loss_whole_split": curve[-1]["val_loss"],
                   "wall_s": round(end_s["recipe"], 2), "whole_val_s": round(off_clock[0], 2),
                   "evaluations": len(curve), "curve": curve},
        "recipe_reaches_baseline": reached["screened"],
        "recipe_reaches_baseline_whole_val_every_turn": reached["every_turn"],
        "targets": {"ratio": TARGET_RATIO, "val_loss": TARGET_LOSS,
                    "ratio_met": reached["screened"]["ratio"] is not None
                    and reached["screened"]["ratio"] <= TARGET_RATIO,
                    "val_loss_met": curve[-1]["val_loss"] <= TARGET_LOSS},
        "machine": here,
    }
    here["load_average_at_end"] = load_average()
    screened, every = reached["screened"], reached["every_turn"]
    print(f"baseline: whole-val {baseline_loss} in {summary['baseline']['wall_s']} s; recipe: whole-val "
          f"{summary['recipe']['val_loss_whole_split']} at the end; reaches the baseline's loss at step "
          f"{screened['step']} after {screened['wall_s']} s (ratio {screened['ratio']}, screened), step "
          f"{every['step']} after {every['wall_s']} s (ratio {every['ratio']}, whole-val every turn)", flush=True)
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
