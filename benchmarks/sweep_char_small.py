"""A sweep against the hand-tuned recipe: Shakespeare char-small at the recipe's budget, a fixed wall-clock budget.

Every trial trains the hand-tuned recipe (benchmarks/configs/shakespeare-char-hand-tuned.yaml: the shakespeare-char
recipe then; 2000 steps x 12 x 64 tokens, char-small) with values drawn from configs/sweeps/char-small.yaml (lr, min_lr, warm-up, weight decay, beta2, positional encoding, norm, MLP,
width), `--workers` processes sharing the cores, the median pruner on the trainer's evaluations. No trial starts
after the budget (the running ones finish; the elapsed time is recorded). Then the best trial's final model is
evaluated on the WHOLE validation split (lmforge.eval.perplexity.evaluate_tokens, as benchmarks/quality_shakespeare.py
does for its recipes) and compared with the hand-tuned recipe's figure read from quality_shakespeare-cpu.json.

    python benchmarks/sweep_char_small.py --budget-minutes 60 --workers 2 \\
        --json-out benchmarks/results/sweep_char_small-cpu.json            # the measurement (an hour)
    python benchmarks/sweep_char_small.py --budget-minutes 5 --tag smoke   # a smoke run of the script
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.data.shards import load_split  # noqa: E402
from lmforge.eval.perplexity import evaluate_tokens  # noqa: E402
from lmforge.sweep import create_sweep, report, run_sweep, summary_table  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)
from quality_shakespeare import ensure_data  # noqa: E402  (the char Shakespeare shards, made once)

RECIPE = str(ROOT / "benchmarks" / "configs" / "shakespeare-char-hand-tuned.yaml")  # the recipe then
SPACE = ROOT / "configs" / "sweeps" / "char-small.yaml"
RECIPE_RESULT = ROOT / "benchmarks" / "results" / "quality_shakespeare-cpu.json"
RECIPE_RUN = "hand-tuned"  # RoPE, SwiGLU, RMSNorm, lr 5e-3, 128 wide


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shakespeare-char", help="prepared dataset (made if missing)")
    p.add_argument("--out", default="sweeps/char-small-benchmark", help="sweep directory (replaced)")
    p.add_argument("--budget-minutes", type=float, default=60.0, help="no trial starts after this (default 60)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--trials", type=int, default=500, help="upper bound on trials; the budget ends the sweep first")
    p.add_argument("--pruner", default="median", help="median | hyperband | none")
    p.add_argument("--startup-trials", type=int, default=5, help="trials finished before any is pruned")
    p.add_argument("--tag", default="", help="a label for the results (e.g. smoke)")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def recipe_whole_val() -> float:
    """The hand-tuned recipe's whole-val loss, as benchmarks/quality_shakespeare.py measured it."""
    return json.loads(RECIPE_RESULT.read_text())["results"][RECIPE_RUN]["val_loss_whole_split"]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    ensure_data(data)
    if out.exists():
        shutil.rmtree(out)  # a benchmark measures a fresh sweep
    here = machine()
    overrides = {"data.path": str(data), "train.save_interval": "0", "train.keep_last": "1"}
    sweep = create_sweep(RECIPE, overrides, str(SPACE), out, trials=args.trials, pruner=args.pruner,
                         startup_trials=args.startup_trials)
    start = time.time()
    run_sweep(sweep, workers=args.workers, timeout=args.budget_minutes * 60)
    elapsed = time.time() - start
    summary = report(sweep)
    print(summary_table(summary, sweep.load_study().get_trials(deepcopy=False)))
    best = summary["best"]
    result = {"benchmark": "sweep_char_small", "tag": args.tag or None, "budget_minutes": args.budget_minutes,
              "elapsed_minutes": round(elapsed / 60, 2), "workers": args.workers, "pruner": args.pruner,
              "startup_trials": args.startup_trials, "space": SPACE.read_text(), "recipe": RECIPE,
              "budget": "2000 steps x 12 x 64 tokens, char-small, seed 1337",
              "trials_run": summary["trials"], "trials_complete": summary["complete"],
              "trials_pruned": summary["pruned"], "trials_failed": summary["failed"],
              "steps_run": summary["steps_run"], "steps_full": summary["steps_full"],
              "steps_saved_by_pruning": summary["steps_saved"], "recipe_val_loss_whole_split": recipe_whole_val(),
              "machine": here}
    if best is not None:
        model, _, config = load_for_inference(best["run_dir"])
        whole = evaluate_tokens(model, load_split(data, "val"), config.model.block_size, batch_size=64)
        result["best"] = {"trial": best["number"], "params": best["params"], "run_dir": best["run_dir"],
                          "val_loss_fixed_batches": round(best["value"], 4),
                          "val_loss_whole_split": round(whole["loss"], 4), "val_tokens": whole["tokens"]}
        result["best_minus_recipe"] = round(whole["loss"] - result["recipe_val_loss_whole_split"], 4)
    here["load_average_at_end"] = load_average()
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
