"""What a small model learns, measured by multiple-choice questions during training (train.choices_file).

lmforge's Shakespeare char recipe (configs/shakespeare-char.yaml: 4 layers, 128 wide, context 64) trains on the char
shards for --steps steps while `train.choices_file` scores --questions cloze questions at each evaluation: a line of
a play from the held-out test split with its last word cut off, and four choices, the true word and three words
drawn from the ends of other test lines, as often as they end them (chance: 0.25). The untrained model is scored
first with `lmforge eval --choices`' own function on the same questions.

Reported: the untrained scores, then val loss, acc and acc_norm at each evaluation, and the time.

    python benchmarks/choices_shakespeare.py --json-out benchmarks/results/choices_shakespeare-cpu-X.json
    python benchmarks/choices_shakespeare.py --quick     # 20 steps, 24 questions: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from lmforge.config import load_run_config  # noqa: E402
from lmforge.data.shards import load_split, read_manifest  # noqa: E402
from lmforge.eval.choices import ChoiceTask, evaluate_choices, read_choice_examples  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402
from lmforge.train import Trainer  # noqa: E402
from lmforge.train.trainer import with_vocab_size  # noqa: E402
from machine import machine, report  # noqa: E402  (benchmarks/machine.py)
from quality_shakespeare import ensure_data  # noqa: E402  (the char Shakespeare shards, made once)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "data" / "shakespeare-char"))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--questions", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="20 steps, evaluations every 10, 24 questions")
    p.add_argument("--json-out", help="also write the summary here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_interval, args.questions = 20, 10, 24
    return args


def cloze_questions(text: str, n: int, seed: int = 0) -> list[dict]:
    """n questions from lines of `text`: the line without its last word, the word among three others drawn from the
    words that end other lines, as often as they do (so the right word is not shorter or longer than the others on
    average), the line at most 60 characters (the model's context is 64)."""
    lines = [line.strip() for line in text.splitlines()]
    cut = [m for m in (re.fullmatch(r"(.{12,50} )([A-Za-z']{2,12})([.,;:!?]?)", line) for line in lines) if m]
    words = [m.group(2) for m in cut]  # as often as they end lines: the true words' lengths, so no length bias
    rng = random.Random(seed)
    out = []
    for m in rng.sample(cut, min(n, len(cut))):
        wrong: list[str] = []
        while len(wrong) < 3:
            word = rng.choice(words)
            if word != m.group(2) and word not in wrong:
                wrong.append(word)
        answer = rng.randrange(4)
        out.append({"context": m.group(1).rstrip(), "choices": wrong[:answer] + [m.group(2)] + wrong[answer:],
                    "answer": answer})
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = Path(args.data)
    ensure_data(data)
    torch.set_num_threads(args.threads)
    here = machine()
    tokenizer = Tokenizer.load(data / "tokenizer.json")
    test_text = tokenizer.decode(load_split(data, "test").tolist())  # plays the model never trains on
    with tempfile.TemporaryDirectory(prefix="choices_shakespeare-") as work:
        work = Path(work)
        quiz = work / "cloze.jsonl"
        questions = cloze_questions(test_text, args.questions)
        quiz.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
        config = load_run_config("shakespeare-char", {
            "data.path": str(data), "train.run_dir": str(work / "run"), "train.max_steps": str(args.steps),
            "train.eval_interval": str(args.eval_interval), "train.save_interval": "0", "train.resume": "none",
            "train.choices_file": str(quiz), "train.choices_examples": str(len(questions)),
            "train.num_threads": str(args.threads), "train.plot": "false", "train.device": "cpu"})
        config = with_vocab_size(config, int(read_manifest(data)["vocab_size"]))
        task = ChoiceTask(str(quiz))
        examples = read_choice_examples(quiz, task)
        torch.manual_seed(config.train.seed)
        untrained, _ = evaluate_choices(GPT(config.model).eval(), tokenizer, examples, task)
        started = time.perf_counter()
        Trainer(config, progress=False, tensorboard=False).fit()
        seconds = time.perf_counter() - started
        records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    evals: dict[int, dict] = {}
    for r in records:
        if r["kind"] == "eval":
            evals.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k.startswith("val_")})
    curve = [{"step": step, "val_loss": round(v["val_loss"], 4), "acc": round(v["val_choices_acc"], 4),
              "acc_norm": round(v["val_choices_acc_norm"], 4)} for step, v in sorted(evals.items())]
    summary = {
        "benchmark": "choices_shakespeare", "machine": here, "recipe": "shakespeare-char",
        "steps": args.steps, "eval_interval": args.eval_interval, "questions": len(questions), "chance": 0.25,
        "example_question": questions[0],
        "parameters": sum(p.numel() for p in GPT(config.model).parameters()),
        "acc_stderr_at_final": round(math.sqrt(curve[-1]["acc"] * (1 - curve[-1]["acc"]) / max(len(questions) - 1, 1)),
                                     4),
        "untrained": {"acc": round(untrained["acc"], 4), "acc_norm": round(untrained["acc_norm"], 4)},
        "curve": curve, "final": curve[-1], "train_seconds": round(seconds, 1),
    }
    return report(summary, args.json_out)


if __name__ == "__main__":
    main()
