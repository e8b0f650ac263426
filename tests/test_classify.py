"""The classify task end to end: `lmforge prepare --task classify` (labels, stratified split, bad records), padded
batches with an attention mask, the classification loss (class weights), training from a base language model
(learning, exact resume), and `lmforge classify` / lmforge.load(run).classify."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.data.batches import Examples, pad_labelled_examples
from lmforge.data.tasks import load_examples, read_task_manifest
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer
from lmforge.train import Trainer
from lmforge.train.loss import balanced_class_weights, cross_entropy_sum
from tiny_training import step_losses, tiny_config, write_prepared_data

GOOD, BAD = ["good", "great", "nice", "fine"], ["bad", "awful", "poor", "sad"]
FILLER = ["a", "so", "day", "it", "was"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny base language model (byte tokenizer, block_size 32) trained for one step: its run directory."""
    root = tmp_path_factory.mktemp("base")
    data = write_prepared_data(root / "pre", {"train": ["hello world " * 20], "val": ["hello there " * 5],
                                              "test": ["goodbye " * 5]})
    Trainer(tiny_config(root / "base", **{"data.path": str(data), "train.max_steps": 1, "model.block_size": 32}),
            progress=False, tensorboard=False).fit()
    return root / "base"


def sentiment_records(n: int, seed: int = 0) -> list[dict]:
    """Short texts holding one word of their class: 2/3 pos, 1/3 neg (a majority baseline of 0.67)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        label = "neg" if i % 3 == 0 else "pos"
        words = [rng.choice(FILLER), rng.choice(GOOD if label == "pos" else BAD)]
        rng.shuffle(words)
        records.append({"text": " ".join(words), "label": label})
    return records


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def prepare(base: Path, out: Path, *inputs: Path, extra: tuple = ()) -> int:
    return main(["prepare", *map(str, inputs), "--task", "classify", "--tokenizer", str(base), "--out", str(out),
                 "--keep-duplicates", *map(str, extra)])


# ---------------------------------------------------------------------------------------------- prepare
def test_the_stratified_split_keeps_the_label_proportions(base, tmp_path):
    records = [{"text": f"text {i}", "label": "a" if i < 90 else "b"} for i in range(120)]
    assert prepare(base, tmp_path / "out", write_jsonl(tmp_path / "r.jsonl", records),
                   extra=("--split", "0.8,0.1,0.1")) == 0
    manifest = read_task_manifest(tmp_path / "out")
    assert manifest["label_counts"] == {"train": {"a": 72, "b": 24}, "val": {"a": 9, "b": 3},
                                        "test": {"a": 9, "b": 3}}
    for split, counts in manifest["label_counts"].items():  # the stored labels agree with the manifest
        assert np.bincount(load_examples(tmp_path / "out", split).labels).tolist() == [counts["a"], counts["b"]]


def test_labels_are_sorted_with_stable_ids_and_each_example_keeps_its_label(base, tmp_path):
    records = [{"text": f"w{i}", "label": ["zeta", "alpha", 7][i % 3]} for i in range(30)]  # an integer label too
    assert prepare(base, tmp_path / "one", write_jsonl(tmp_path / "a.jsonl", records)) == 0
    assert prepare(base, tmp_path / "two", write_jsonl(tmp_path / "b.jsonl", records[::-1]), extra=("--seed", 5)) == 0
    names = read_task_manifest(tmp_path / "one")["labels"]
    assert names == ["7", "alpha", "zeta"] and read_task_manifest(tmp_path / "two")["labels"] == names
    tok, truth = Tokenizer.load(tmp_path / "one" / "tokenizer.json"), {r["text"]: str(r["label"]) for r in records}
    for out in ("one", "two"):
        seen = {}
        for split in ("train", "val", "test"):
            ex = load_examples(tmp_path / out, split)
            for i in range(len(ex)):
                ids = ex.tokens[ex.offsets[i]:ex.offsets[i + 1]].tolist()
                assert ids[0] == tok.start_id and ids[-1] == tok.end_id  # [start] text [end]
                seen[tok.decode(ids[1:-1])] = names[int(ex.labels[i])]
        assert seen == truth


BAD_LINES = [{"text": "good one", "label": "pos"}, {"text": "bad one", "label": "neg"}, {"text": "no label"},
             "{broken", {"text": "fine", "label": ["pos"]}, {"text": "typo", "label": "postive"},
             {"text": "great", "label": "pos"}, {"text": "awful", "label": "neg"}]


def test_a_bad_record_or_a_label_seen_once_is_an_error_naming_file_and_line(base, tmp_path, capsys):
    for lines, line, reason in [(BAD_LINES[:3], 3, "no field 'label'"), (BAD_LINES[:2] + BAD_LINES[3:4], 3,
                                "not valid JSON"), (BAD_LINES[:2] + BAD_LINES[4:5], 3, "field 'label' (label) is a list"),
                                (BAD_LINES[:2] + BAD_LINES[5:], 3, "label 'postive' has only this 1 example")]:
        src = write_jsonl(tmp_path / "bad.jsonl", lines)
        assert prepare(base, tmp_path / "out", src) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{src}:{line}: {reason}" in err[0] and "--skip-bad" in err[0], err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_skip_bad_counts_and_lists_bad_records_and_lone_labels(base, tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES + [{"text": "nice", "label": "pos"}])
    assert prepare(base, tmp_path / "out", src, extra=("--skip-bad",)) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [b["where"] for b in report["bad"]] == [f"{src}:{n}" for n in (3, 4, 5, 6)]
    assert report["labels"] == ["neg", "pos"] and report["bad_records"] == 4
    assert sum(s["examples"] for s in report["splits"].values()) == 5


# ---------------------------------------------------------------------------------------- batches, loss
def tiny_classifier(num_labels: int = 3) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, head="classify",
                           num_labels=num_labels)).eval()


def test_left_and_right_padded_batches_give_the_same_logits_and_loss():
    lengths = [3, 9, 5, 1]
    rng = np.random.default_rng(0)
    examples = Examples(rng.integers(3, 32, sum(lengths)), np.concatenate([[0], np.cumsum(lengths)]), None,
                        np.array([0, 2, 1, 2]))
    model, index = tiny_classifier(), np.arange(4)
    right, left = (pad_labelled_examples(examples, index, pad_id=1, side=side) for side in ("right", "left"))
    assert right[2].tolist() != left[2].tolist() and torch.equal(right[1], left[1])
    with torch.no_grad():
        logits = {side: model(x, attention_mask=mask) for side, (x, _, mask) in (("right", right), ("left", left))}
        alone = torch.cat([model(right[0][r:r + 1, :n]) for r, n in enumerate(lengths)])  # each row unpadded
    torch.testing.assert_close(logits["right"], logits["left"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["right"], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cross_entropy_sum(logits["right"], right[1]), cross_entropy_sum(logits["left"], left[1]))


def test_class_weights_change_the_loss_as_the_formula_says():
    weights = balanced_class_weights([30, 10, 20])  # n / (K * n_k), n = 60, K = 3
    torch.testing.assert_close(weights, torch.tensor([60 / 90, 60 / 30, 60 / 60]))
    logits, labels = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1, 2, 0, 1])
    nll = -torch.log_softmax(logits, -1)[torch.arange(6), labels]
    torch.testing.assert_close(cross_entropy_sum(logits, labels, weights), (weights[labels] * nll).sum())
    torch.testing.assert_close(cross_entropy_sum(logits, labels), nll.sum())


# ------------------------------------------------------------------------------------------ end to end
TRAIN = {"train.max_steps": 60, "train.batch_size": 16, "train.save_interval": 30, "train.keep_last": 5,
         "train.eval_interval": 30, "train.eval_batches": 8, "optim.lr": 3e-3}


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    assert prepare(base, root / "data", write_jsonl(root / "r.jsonl", sentiment_records(300)),
                   extra=("--split", "0.8,0.1,0.1")) == 0
    values = {**TRAIN, "data.path": str(root / "data"), "train.init_from": str(base)}
    full = Trainer(tiny_config(root / "full", **values), progress=False, tensorboard=False)
    full.fit()
    return root, values, full


def test_a_classifier_fine_tuned_from_a_base_model_learns_a_separable_task(trained):
    root, _, full = trained
    counts = read_task_manifest(root / "data")["label_counts"]["val"]
    majority = max(counts.values()) / sum(counts.values())
    assert full.val_metrics["val_accuracy"] >= majority + 0.2, (full.val_metrics, majority)
    evals = [json.loads(line) for line in (root / "full" / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in evals if e["kind"] == "eval"][-1]
    assert last["step"] == 60 and last["val_accuracy"] == full.val_metrics["val_accuracy"] and "val_macro_f1" in last
    state = json.loads((root / "full" / "checkpoints" / "step-00000060" / "state.json").read_text())
    assert state["task"] == {"task": "classify", "labels": ["neg", "pos"]}


def test_a_classifier_run_resumes_bit_identically(trained):
    root, values, full = trained
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "full" / "checkpoints" / "step-00000030", root / "resumed" / "checkpoints" / "step-00000030")
    resumed = Trainer(tiny_config(root / "resumed", **{**values, "train.resume": "auto"}), progress=False,
                      tensorboard=False)
    resumed.fit()
    assert [step for step, _ in resumed.history] == list(range(31, 61))
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 30]
    assert resumed.val_loss == full.val_loss and resumed.val_metrics == full.val_metrics
    assert step_losses(root / "resumed")[60] == step_losses(root / "full")[60]


def test_balanced_class_weights_give_the_weighted_val_loss(trained):
    root, values, full = trained
    weighted = Trainer(tiny_config(root / "weighted", **{**values, "train.max_steps": 1, "train.class_weights":
                                                          "balanced"}), progress=False, tensorboard=False)
    counts = read_task_manifest(root / "data")["label_counts"]["train"]
    w = torch.tensor([sum(counts.values()) / (2 * counts[k]) for k in ("neg", "pos")])
    total = count = 0.0
    with torch.no_grad():
        for x, y, mask in weighted.val_batches:
            nll = -torch.log_softmax(weighted.raw_model.eval()(x, attention_mask=mask), -1)[torch.arange(len(y)), y]
            total, count = total + float((w[y] * nll).sum()), count + len(y)
    assert weighted.evaluate() == pytest.approx(total / count, rel=1e-5)


def test_lmforge_classify_prints_labels_with_probabilities_and_load_classifies(trained, tmp_path, capsys):
    root, _, _ = trained
    texts = tmp_path / "texts.txt"
    texts.write_text("so awful\n\nit great\n", encoding="utf-8")
    assert main(["classify", str(root / "full"), "--text", "a good day", "--file", str(texts), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["a good day", "so awful", "it great"]
    for r in rows:
        probs = [p["probability"] for p in r["predictions"]]
        assert sorted(p["label"] for p in r["predictions"]) == ["neg", "pos"] and sum(probs) == pytest.approx(1.0)
        assert probs == sorted(probs, reverse=True) and r["label"] == r["predictions"][0]["label"]
    assert [r["label"] for r in rows] == ["pos", "neg", "pos"]
    ranked = lmforge.load(str(root / "full"), device="cpu").classify(["so awful", "a good day"], top_k=1)
    assert [[label for label, _ in r] for r in ranked] == [["neg"], ["pos"]]
    assert ranked[0][0][1] == pytest.approx(rows[1]["predictions"][0]["probability"], rel=1e-5)
    assert main(["generate", str(root / "full"), "--device", "cpu"]) == 2
    assert "is a classifier" in capsys.readouterr().err


def test_eval_of_a_classifier_writes_predictions_metrics_and_a_confusion_matrix(trained, capsys):
    from lmforge.eval.metrics import classification_metrics
    from lmforge.generate import load

    root, _, full = trained
    capsys.readouterr()
    assert main(["eval", str(root / "full"), "--split", "val", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    out = root / "full" / "eval" / "val"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert printed == json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = ["neg", "pos"]
    expected = classification_metrics([labels.index(r["prediction"]) for r in rows],
                                      [labels.index(r["reference"]) for r in rows], labels)
    assert {k: printed[k] for k in expected} == expected and printed["examples"] == len(rows)
    assert printed["accuracy"] == pytest.approx(full.val_metrics["val_accuracy"])  # the trainer's eval agrees
    classifier = load(str(root / "full"))
    texts = [r["input"] for r in rows]
    assert [c[0][0] for c in classifier.classify(texts)] == [r["prediction"] for r in rows]
    assert [c[0][1] for c in classifier.classify(texts)] == pytest.approx([r["probability"] for r in rows], abs=1e-5)
