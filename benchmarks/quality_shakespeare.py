"""Quality on Shakespeare (char tokenizer): validation loss after a fixed token budget, per recipe.

Budget: 2000 steps of 12 x 64 tokens (1.54 M tokens) of the char-small model (4 layers, 4 heads, 128 wide).
Each recipe trains with the real Trainer; afterwards the loss over the WHOLE validation split is computed
(lmforge.eval.perplexity.evaluate_tokens, non-overlapping windows of block_size). The wall-clock time to
reach a val loss of 1.89 is read from the trainer's periodic evals (its fixed validation batches).

Recipes (RECIPES below):
  baseline    lmforge's defaults for preset char-small (learned positions, LayerNorm, GELU, lr 1e-3 cosine)
  rope        the defaults with RoPE and lr 3e-3
  hand-tuned  RoPE, SwiGLU, RMSNorm, lr 5e-3, 128 wide (the shakespeare-char recipe before the sweep)
  recipe      the sweep's best (benchmarks/configs/shakespeare-char-sweep.yaml: the shakespeare-char recipe before
              issue 13's options; target <= 1.85, aim 1.80)
  word2vec    the recipe with data.embedding_init=word2vec (compare with `recipe`: none vs word2vec)

    python benchmarks/quality_shakespeare.py --threads 1 \\
        --json-out benchmarks/results/quality_shakespeare-cpu.json     # all five, one thread (~15-30 min)
    python benchmarks/quality_shakespeare.py --recipes recipe --set optim.lr=4e-3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from lmforge.config import apply_overrides, read_config_file, run_config_from_dict  # noqa: E402
from lmforge.data.shards import load_split, read_manifest  # noqa: E402
from lmforge.eval.perplexity import evaluate_tokens  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.train.trainer import Trainer, with_vocab_size  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)

RECIPE = str(ROOT / "benchmarks" / "configs" / "shakespeare-char-sweep.yaml")  # the sweep's best (96 wide, AdamW)
# Each recipe: the config it starts from (a preset or a built-in recipe) and its overrides.
RECIPES = {
    "baseline": ({"preset": "char-small"}, {}),
    "rope": ({"preset": "char-small"}, {"model.pos_encoding": "rope", "optim.lr": "3e-3"}),
    "hand-tuned": ({"preset": "char-small"}, {"model.pos_encoding": "rope", "model.mlp": "swiglu",
                                               "model.norm": "rmsnorm", "optim.lr": "5e-3"}),
    "recipe": (RECIPE, {}),
    "word2vec": (RECIPE, {"data.embedding_init": "word2vec"}),
}
BUDGET = {"train.max_steps": 2000, "train.batch_size": 12, "train.grad_accum": 1, "model.block_size": 64}
TARGET, AIM, TIME_TO = 1.85, 1.80, 1.89


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shakespeare-char", help="prepared dataset (made if missing)")
    p.add_argument("--runs", default="runs/quality-shakespeare", help="parent directory of the run directories")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of: {', '.join(RECIPES)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every recipe (repeatable), e.g. optim.lr=4e-3")
    p.add_argument("--tag", default="", help="suffix for the run directories and the JSON")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def ensure_data(path: Path) -> None:
    if (path / "manifest.json").is_file():
        return
    from lmforge.data.prepare import prepare

    prepare(inputs=[], out=str(path), dataset="shakespeare", tokenizer="char", progress=False)


def recipe_config(name: str, data: Path, run_dir: Path, extra: dict[str, str]) -> dict:
    """The raw config dict of a recipe, with the fixed token budget and the data/run paths."""
    base, own = RECIPES[name]
    raw = dict(base) if isinstance(base, dict) else read_config_file(base)
    overrides = {**BUDGET, "data.path": str(data), "train.run_dir": str(run_dir), "train.resume": "none",
                 "train.save_interval": "0", "train.keep_last": "1", **own, **extra}
    if isinstance(base, dict):
        overrides.setdefault("train.eval_interval", "100")  # as the recipe evaluates, for the time to 1.89
    return apply_overrides(raw, overrides)


def time_to_loss(metrics_file: Path, start: float, threshold: float) -> tuple[int | None, float | None]:
    """(step, seconds since start) of the first periodic eval with val_loss <= threshold."""
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval" and record["val_loss"] <= threshold:
            return record["step"], round(record["time"] - start, 1)
    return None, None


def run_recipe(name: str, args: argparse.Namespace, extra: dict[str, str]) -> dict:
    data = Path(args.data)
    run_dir = Path(args.runs) / (name + (f"-{args.tag}" if args.tag else ""))
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()  # a fresh curve for this run
    config = run_config_from_dict(recipe_config(name, data, run_dir, extra))
    if args.threads:
        config.train.num_threads = args.threads
    manifest = read_manifest(data)
    config = with_vocab_size(config, int(manifest["vocab_size"]))

    start = time.time()
    trainer = Trainer(config, progress=False, tensorboard=False)  # copies word vectors in when asked
    embedding = trainer.embedding_report or {"source": "none", "coverage": 0.0, "rows_initialised": 0, "cached": False}
    summary = trainer.fit()
    model = trainer.raw_model
    train_s = time.time() - start
    whole_val = evaluate_tokens(model, load_split(data, "val"), config.model.block_size, batch_size=64)
    step_189, seconds_189 = time_to_loss(run_dir / "metrics.jsonl", start, TIME_TO)
    result = {
        "recipe": name, "run_dir": str(run_dir), "overrides": extra,
        "model": {k: getattr(config.model, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "pos_encoding",
                                                        "norm", "mlp", "activation", "dropout", "tie_embeddings")},
        "optim": {k: getattr(config.optim, k) for k in ("lr", "min_lr", "schedule", "warmup_steps", "weight_decay",
                                                        "beta1", "beta2", "grad_clip")},
        "embedding_init": {k: embedding[k] for k in ("source", "coverage", "rows_initialised", "cached")},
        "tokens": summary["tokens_seen"], "train_wall_s": round(train_s, 1),
        "val_loss_fixed_batches": round(summary["val_loss"], 4),
        "val_loss_whole_split": round(whole_val["loss"], 4), "val_tokens": whole_val["tokens"],
        f"step_to_{TIME_TO}": step_189, f"wall_s_to_{TIME_TO}": seconds_189,
        f"meets_{TARGET}": whole_val["loss"] <= TARGET,
    }
    print(f"[{name}] whole-val loss {result['val_loss_whole_split']} (fixed batches "
          f"{result['val_loss_fixed_batches']}), {result['train_wall_s']} s, {TIME_TO} at step {step_189} "
          f"after {seconds_189} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = dict(item.split("=", 1) for item in args.set)
    unknown = [name for name in args.recipes.split(",") if name not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe {', '.join(unknown)}; --recipes takes {', '.join(RECIPES)}")
    ensure_data(Path(args.data))
    here = machine()
    results = {name: run_recipe(name, args, extra) for name in args.recipes.split(",")}
    summary = {"benchmark": "quality_shakespeare", "budget": BUDGET, "target": TARGET, "aim": AIM,
               "machine": here, "results": results}
    here["load_average_at_end"] = load_average()
    if "recipe" in results and "word2vec" in results:
        summary["word2vec_minus_none"] = round(results["word2vec"]["val_loss_whole_split"]
                                               - results["recipe"]["val_loss_whole_split"], 4)
    print(json.dumps(summary))
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
