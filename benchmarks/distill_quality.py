"""What distillation buys: a small student trained on Shakespeare (char tokenizer) from the data alone, and taught by
a larger teacher, at the same steps; the loss over the whole val split of each (CPU).

The teacher (default 4 layers, 4 heads, 256 wide, context 128) is trained first with lmforge's defaults; then the
student (2 layers, 2 heads, 64 wide) is trained --student-steps steps in each variant, the same seed, batches and
schedule:

  data        train.distill_from unset: the cross-entropy of the data's next tokens (the usual training)
  distill     the teacher's distribution alone (distill_alpha 1, forward KL: Hinton's, TRL's beta 0)
  mixed       half each (distill_alpha 0.5), temperature 2

Reported: each run's whole-val loss (lmforge.eval.perplexity.evaluate_tokens over non-overlapping windows), the
student variants' gap to the data-only student, and the wall time of each (a distilled step also runs the teacher).

    python benchmarks/distill_quality.py --json-out benchmarks/results/distill_quality-cpu.json
    python benchmarks/distill_quality.py --teacher-steps 50 --student-steps 50   # quick
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

from lmforge.config import load_run_config  # noqa: E402
from lmforge.data.shards import load_split  # noqa: E402
from lmforge.eval.perplexity import evaluate_tokens  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.train import Trainer  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)
from quality_shakespeare import ensure_data  # noqa: E402

VARIANTS = {"data": {}, "distill": {"train.distill_alpha": "1.0"},
            "mixed": {"train.distill_alpha": "0.5", "train.distill_temperature": "2"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "shakespeare-char"), help="prepared dataset (made if missing)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "distill-quality"), help="run directories go here")
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--teacher-width", type=int, default=256)
    p.add_argument("--teacher-heads", type=int, default=4)
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--layers", type=int, default=2, help="the student's")
    p.add_argument("--width", type=int, default=64, help="the student's")
    p.add_argument("--heads", type=int, default=2, help="the student's")
    p.add_argument("--student-steps", type=int, default=1000)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def train(args: argparse.Namespace, name: str, layers: int, width: int, heads: int, steps: int,
          extra: dict[str, str]) -> dict:
    run = Path(args.runs) / name
    config = load_run_config(None, {
        "data.path": args.data, "model.n_layer": str(layers), "model.n_embd": str(width), "model.n_head": str(heads),
        "model.block_size": str(args.block), "train.batch_size": str(args.batch), "train.max_steps": str(steps),
        "train.run_dir": str(run), "train.resume": "none", "train.save_interval": "0", "train.keep_last": "1",
        "train.eval_interval": "0", "train.plot": "false", "train.num_threads": str(args.threads),
        "train.device": "cpu", "optim.lr": "3e-3", **extra})
    if run.exists():  # the benchmark's own run directory from an earlier invocation
        import shutil

        shutil.rmtree(run)
    trainer = Trainer(config, progress=False, tensorboard=False)
    start = time.time()
    trainer.fit()
    wall = time.time() - start
    whole = evaluate_tokens(trainer.raw_model, load_split(Path(args.data), "val"), args.block, batch_size=16)
    out = {"steps": steps, "val_loss_whole_split": round(whole["loss"], 4), "train_wall_s": round(wall, 1),
           "val_tokens": whole["tokens"]}
    if trainer.teacher is not None:
        out["val_distill_divergence_fixed_batches"] = round(trainer.val_metrics["val_distill_divergence"], 4)
    print(f"[{name}] whole-val loss {out['val_loss_whole_split']} after {steps} steps, {wall:.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ensure_data(Path(args.data))
    started_on = machine()
    teacher = train(args, "teacher", args.teacher_layers, args.teacher_width, args.teacher_heads, args.teacher_steps,
                    {})
    students = {}
    for name, extra in VARIANTS.items():
        distill = {"train.distill_from": str(Path(args.runs) / "teacher"), **extra} if extra else {}
        students[name] = train(args, f"student-{name}", args.layers, args.width, args.heads, args.student_steps,
                               distill)
    plain = students["data"]["val_loss_whole_split"]
    summary = {"benchmark": "distill_quality", "machine": {**started_on, "load_average_at_end": load_average()},
               "teacher_model": {"n_layer": args.teacher_layers, "n_embd": args.teacher_width,
                                 "n_head": args.teacher_heads},
               "student_model": {"n_layer": args.layers, "n_embd": args.width, "n_head": args.heads},
               "block_size": args.block, "batch_size": args.batch, "lr": 3e-3, "variants": VARIANTS,
               "teacher": teacher, "students": students,
               "gain_over_data_only": {name: round(plain - s["val_loss_whole_split"], 4)
                                       for name, s in students.items() if name != "data"}}
    print(json.dumps(summary, indent=2))
    if args.json_out:
        atomic_write_text(Path(args.json_out), json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
