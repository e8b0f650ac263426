"""Multiple-choice scoring on the CPU: `lmforge eval --choices` against lm-evaluation-harness's `hf` model, in one
process, on the same weights and the same questions.

A GPT-2-style model (--layers x --width, a 256-token context, random weights: speed does not depend on them) with a
byte-level BPE vocabulary (--vocab tokens) trained here on Shakespeare's works, is saved as an lmforge checkpoint and
exported to Hugging Face. The questions are a HellaSwag-like quiz made from Shakespeare's text: --examples contexts
of three lines each, and four choices, the line that follows and three lines drawn from elsewhere.

Timed on --threads threads, rounds alternating their order, each with its model already loaded:

    lmforge     eval.choices.evaluate_choices: read, encode, score (the LM head only at the choices' positions)
    harness     lm_eval.simple_evaluate on an HFLM wrapping the exported GPT2LMHeadModel, the same task read from
                the same file (its own encoding, batching and full-vocabulary log-softmax at every position)
    harness-scoring   HFLM.loglikelihood alone on the same (context, " " + choice) requests: encoding and scoring,
                without the harness's task set-up around them

both with batch size --batch-size. Reported: seconds (median), questions/s, the ratio, the largest difference of
any choice's log-likelihood between the two, and whether acc and acc_norm agree.

    python benchmarks/choices_speed.py --json-out benchmarks/results/choices_speed-cpu-X.json
    python benchmarks/choices_speed.py --quick     # a small model, 24 questions, one round: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from lmforge.checkpoint import load_for_inference, save_checkpoint  # noqa: E402
from lmforge.config import ModelConfig, RunConfig  # noqa: E402
from lmforge.data.corpus import shakespeare_files  # noqa: E402
from lmforge.eval.choices import ChoiceTask, evaluate_choices, read_choice_examples  # noqa: E402
from lmforge.interop.hf_export import export_hf  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.tokenizer import train_bpe  # noqa: E402
from machine import machine, report  # noqa: E402  (benchmarks/machine.py)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--examples", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 layers, width 64, vocabulary 1024, 24 questions, 1 round")
    p.add_argument("--json-out", help="also write the summary here")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.vocab, args.examples, args.rounds = 2, 64, 1024, 24, 1
    return args


def quiz(lines: list[str], n: int, seed: int = 0) -> list[dict]:
    """n questions: three consecutive lines, then the true next line among three others drawn at random."""
    rng = random.Random(seed)
    out = []
    for i in rng.sample(range(len(lines) - 4), n):
        right, wrong = lines[i + 3], [lines[j] for j in rng.sample(range(len(lines)), 3)]
        answer = rng.randrange(4)
        choices = wrong[:answer] + [right] + wrong[answer:]
        out.append({"context": "\n".join(lines[i:i + 3]) + "\n", "choices": choices, "answer": answer})
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="choices_speed-") as work:
        return run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    texts = [p.read_text(encoding="utf-8") for p in shakespeare_files()]
    lines = [line.strip() for text in texts for line in text.splitlines() if len(line.strip()) > 20]
    torch.set_num_threads(args.threads)
    here = machine()
    tok = train_bpe(texts, args.vocab)
    tok.save(work / "tokenizer.json")
    config = ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=args.layers,
                         n_head=max(args.width // 64, 1), n_embd=args.width, activation="gelu_tanh", dropout=0.0)
    torch.manual_seed(0)
    save_checkpoint(work / "run", 1, GPT(config), None, RunConfig(model=config), {}, work / "tokenizer.json")
    export_hf(work / "run", work / "hf")
    questions = quiz(lines, args.examples)
    path = work / "quiz.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    (work / "tasks").mkdir()
    (work / "tasks" / "quiz.yaml").write_text(
        f"task: quiz\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
        f"output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        f"target_delimiter: ' '\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")

    model, tokenizer, _ = load_for_inference(work / "run", "cpu")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    harness = HFLM(pretrained=hf_model, tokenizer=transformers.AutoTokenizer.from_pretrained(work / "hf"),
                   batch_size=args.batch_size, add_bos_token=True, device="cpu")
    manager = TaskManager(include_path=str(work / "tasks"), include_defaults=False)
    task = ChoiceTask(str(path))
    out: dict[str, Any] = {}

    def ours() -> None:
        out["lmforge"] = evaluate_choices(model, tokenizer, read_choice_examples(path, task), task,
                                          batch_size=args.batch_size)

    def theirs() -> None:
        out["harness"] = lm_eval.simple_evaluate(model=harness, tasks=["quiz"], task_manager=manager, log_samples=True,
                                                 batch_size=args.batch_size, verbosity="ERROR")

    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood", doc=q, arguments=(q["context"], " " + c), idx=j)
                for q in questions for j, c in enumerate(q["choices"])]

    def theirs_scoring() -> None:
        out["harness-scoring"] = harness.loglikelihood(requests, disable_tqdm=True)

    runners = {"lmforge": ours, "harness": theirs, "harness-scoring": theirs_scoring}
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for name in runners:  # warm-up: first calls pay for lazy imports and allocations
        runners[name]()
    for r in range(args.rounds):
        for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            started = time.perf_counter()
            runners[name]()
            seconds[name].append(time.perf_counter() - started)

    metrics, rows = out["lmforge"]
    samples = sorted(out["harness"]["samples"]["quiz"], key=lambda s: s["doc_id"])
    results = out["harness"]["results"]["quiz"]
    diff = max(abs(a - b[0][0]) for row, s in zip(rows, samples) for a, b in zip(row["loglikelihoods"], s["resps"]))
    median = {name: statistics.median(s) for name, s in seconds.items()}
    summary = {
        "benchmark": "choices_speed", "machine": here,
        "model": {"n_layer": args.layers, "n_embd": args.width, "block_size": 256, "vocab_size": tok.vocab_size},
        "questions": args.examples, "choices": metrics["choices"], "batch_size": args.batch_size,
        "rounds": args.rounds, "seconds": {k: [round(v, 3) for v in s] for k, s in seconds.items()},
        "questions_per_s": {k: round(args.examples / v, 1) for k, v in median.items()},
        "lmforge_vs_harness": round(median["harness"] / median["lmforge"], 2),
        "lmforge_vs_harness_scoring": round(median["harness-scoring"] / median["lmforge"], 2),
        "max_loglikelihood_diff": diff,
        "max_loglikelihood_diff_scoring": max(abs(a - b[0]) for a, b in zip(
            [v for row in rows for v in row["loglikelihoods"]], out["harness-scoring"])),
        "acc": {"lmforge": metrics["acc"], "harness": results["acc,none"]},
        "acc_norm": {"lmforge": metrics["acc_norm"], "harness": results["acc_norm,none"]},
        "same_acc": metrics["acc"] == results["acc,none"] and metrics["acc_norm"] == results["acc_norm,none"],
        "truncated": metrics["truncated"],
    }
    return report(summary, args.json_out)


if __name__ == "__main__":
    main()
