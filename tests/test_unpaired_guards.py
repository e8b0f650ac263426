"""Guards for unpaired preference data (KTO) that tests/test_unpaired.py leaves open: labels kept with their
completions when --drop-long drops examples, dedupe keyed on where the prompt ends, mismatched rows cut from the
right to block_size + 1 (unpaired_batch, training and val batches), the desirable labels required and checked on
load, the trainer's val rewards of unequal kinds and `lmforge eval` on the first examples only (both against
evaluate_unpaired), val_reward_margin accepted as best_metric, and the batch line's row count."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_for_inference
from lmforge.data.batches import Examples, ExampleBatches, fixed_example_batches, unpaired_batch
from lmforge.data.tasks import load_examples
from lmforge.errors import DataError
from lmforge.eval.preference import evaluate_unpaired
from lmforge.train import Trainer
from test_tasks import write_jsonl
from test_unpaired import base, kto, kto_run, prepare_unpaired, texts, unpaired, unpaired_records  # noqa: F401


def test_drop_long_keeps_each_label_with_its_completion(base, tmp_path):
    """--drop-long drops some examples of a split: every kept completion still carries its own record's label (the
    labels follow the examples kept, not the first ones of the split)."""
    records = unpaired_records(40)
    for i, r in enumerate(unpaired_records(12, seed=5)):  # long completions, labelled against the pattern
        records.insert(3 * i + 1, {"prompt": r["prompt"] + "z", "completion": r["prompt"].upper() * 12,
                                   "label": i % 3 == 0})
    assert prepare_unpaired(base, tmp_path / "data", write_jsonl(tmp_path / "u.jsonl", records),
                            extra=("--drop-long", "--split", "0.5,0.25,0.25")) == 0
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert sum(s["dropped"] for s in report["splits"].values()) == 12
    expected = {(r["prompt"] + "\n", r["completion"]): r["label"] for r in records}
    rows = [row for split in ("train", "val", "test") for row in texts(tmp_path / "data", split)]
    assert len(rows) == 40
    assert [(p, c, d) for p, c, d in rows if expected[(p, c)] != d] == []


def test_dedupe_tells_apart_texts_that_only_split_differently(base, tmp_path):
    """Two records whose prompt + completion concatenate to the same text, with the prompt ending elsewhere, are
    different examples: neither is removed as a duplicate of the other."""
    records = unpaired_records(20) + [{"prompt": "ab", "completion": "cd\nef", "label": True},
                                      {"prompt": "ab\ncd", "completion": "ef", "label": True}]
    assert prepare_unpaired(base, tmp_path / "data", write_jsonl(tmp_path / "u.jsonl", records)) == 0
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert report["duplicates"] == 0
    assert sum(s["examples"] for s in report["splits"].values()) == 22


def test_mismatched_rows_are_cut_from_the_right_to_max_length(unpaired):
    """A mismatched row longer than max_length keeps its first max_length tokens (the prompt, then the start of the
    other completion): the model never sees a row longer than it takes, and the labels are the kept completion."""
    ex = load_examples(unpaired, "train")
    index = np.arange(6)
    partners = np.array([3, 0, 5, 1, 2, 4])
    max_length = 7
    _, _, kl_x, kl_y, _ = unpaired_batch(ex, index, partners, 0, max_length)
    assert kl_x.shape[1] <= max_length - 1
    cut = 0
    for r, (e, f) in enumerate(zip(index, partners)):
        prompt, _ = ex.prompt_and_completion(int(e))
        _, completion = ex.prompt_and_completion(int(f))
        ids = (prompt + completion)[:max_length]
        cut += len(prompt + completion) > max_length
        assert kl_x[r, :len(ids) - 1].tolist() == ids[:-1]
        assert kl_y[r][kl_y[r] != -100].tolist() == ids[len(prompt):]
    assert cut > 0  # the case is exercised


def test_unpaired_batches_need_the_desirable_labels(unpaired):
    """Examples without desirable labels (not prepared with --task unpaired) cannot be drawn as unpaired batches."""
    ex = load_examples(unpaired, "train")
    bare = Examples(ex.tokens, ex.offsets, ex.prompt_lengths)
    with pytest.raises(DataError, match="desirable label"):
        ExampleBatches(bare, 16, 4, unpaired=True)


@pytest.mark.parametrize("damage", ["a label of 2", "one label short"])
def test_a_damaged_desirable_array_is_refused_on_load(unpaired, tmp_path, damage):
    """load_examples checks the stored desirable array: one value per example, each 0 or 1."""
    from safetensors.numpy import load_file, save_file

    data = tmp_path / "data"
    shutil.copytree(unpaired, data)
    arrays = load_file(data / "val.safetensors")
    if damage == "a label of 2":
        arrays["desirable"] = arrays["desirable"].copy()
        arrays["desirable"][3] = 2
    else:
        arrays["desirable"] = arrays["desirable"][:-1].copy()
    save_file(arrays, data / "val.safetensors", metadata={"format": "lmforge-task-v1"})
    with pytest.raises(DataError, match="damaged"):
        load_examples(data, "val")


def test_val_rewards_of_unequal_kinds_and_eval_of_the_first_examples(kto_run, base, unpaired):
    """On 7 val completions (unequal numbers of desirable and undesirable ones) the trainer's val loss, reference
    point and mean rewards of each kind are evaluate_unpaired's on the first 7 examples (max_examples: the first one's
    mismatched row takes the 7th's completion), and each kind's reward is the mean of its own completions'."""
    examples = load_examples(unpaired, "val")
    T = kto_run.config.model.block_size
    model, tokenizer, _ = load_for_inference(kto_run.last_checkpoint)
    reference, _, _ = load_for_inference(base)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.end_id
    saved = kto_run.val_batches, kto_run.val_metrics, kto_run.val_loss
    try:
        kto_run.val_batches = fixed_example_batches(examples, T, 7, 1, pad_id=pad, unpaired=True)
        val_loss = kto_run.evaluate()
        val_metrics = dict(kto_run.val_metrics)
    finally:
        kto_run.val_batches, kto_run.val_metrics, kto_run.val_loss = saved
    metrics, rows = evaluate_unpaired(model, reference, tokenizer, examples, kto_run.preference_loss, T + 1,
                                      batch_size=3, max_examples=7)
    assert len(rows) == 7 and metrics["desirable"] not in (0, 7)  # 7 is odd: the kinds are never equal in number
    good = np.mean([r["reward"] for r in rows if r["desirable"]])
    bad = np.mean([r["reward"] for r in rows if not r["desirable"]])
    assert metrics["desirable_reward"] == pytest.approx(good, abs=1e-5)
    assert metrics["undesirable_reward"] == pytest.approx(bad, abs=1e-5)
    assert val_loss == pytest.approx(metrics["loss"], abs=1e-5)
    assert val_metrics["val_kl"] == pytest.approx(metrics["kl"], abs=1e-5)
    assert val_metrics["val_desirable_reward"] == pytest.approx(good, abs=1e-5)
    assert val_metrics["val_undesirable_reward"] == pytest.approx(bad, abs=1e-5)
    assert torch.isfinite(torch.tensor(val_metrics["val_reward_margin"]))


def test_the_reward_margin_selects_the_best_checkpoint_of_unpaired_data(base, unpaired, tmp_path):
    """train.best_metric=val_reward_margin is measured on unpaired data (evaluate_unpaired logs it): a KTO run may
    select its best checkpoint by it."""
    trainer = Trainer(kto(tmp_path / "run", unpaired, base, **{"train.best_metric": "val_reward_margin"}),
                      progress=False, tensorboard=False)
    assert trainer.config.train.best_metric == "val_reward_margin"


def test_mismatched_rows_of_training_and_val_batches_are_as_long_as_the_examples(base, tmp_path):
    """Training and val batches cut a mismatched row longer than the model takes to block_size + 1 tokens, the
    longest an example may be, not shorter: the row keeps all of its prompt and as much of the other completion."""
    rng = np.random.default_rng(0)
    sizes = [(14, 2) if rng.integers(2) else (2, 14) for _ in range(24)]  # a long prompt or a long completion
    records = [{"prompt": "".join(rng.choice(list("abcdef"), p)), "completion": "".join(rng.choice(list("ABCDEF"), c)),
                "label": i % 2 == 0} for i, (p, c) in enumerate(sizes)]
    assert prepare_unpaired(base, tmp_path / "data", write_jsonl(tmp_path / "u.jsonl", records),
                            extra=("--split", "0.5,0.25,0.25")) == 0
    ex = load_examples(tmp_path / "data", "train")
    T = 16
    assert int(ex.lengths.max()) <= T + 1
    stream = ExampleBatches(ex, T, 4, shuffle=False, unpaired=True)
    batches = [(stream.example_index(stream.position, 4), stream.next_batch()) for _ in range(2)]
    val = fixed_example_batches(ex, T, 4, 2, unpaired=True)
    batches += [(np.arange(4 * k, 4 * k + 4), b) for k, b in enumerate(val)]
    cut = 0
    for k, (order, (_, _, kl_x, kl_y, _)) in enumerate(batches):
        partners = np.roll(order, 1) if k < 2 else (order - 1) % 8
        for r, (e, f) in enumerate(zip(order.tolist(), partners.tolist())):
            prompt, _ = ex.prompt_and_completion(e)
            _, completion = ex.prompt_and_completion(f)
            ids = (prompt + completion)[:T + 1]
            cut += len(prompt + completion) > T + 1
            assert kl_x[r, :len(ids) - 1].tolist() == ids[:-1]
            assert kl_y[r][kl_y[r] != -100].tolist() == ids[len(prompt):]
    assert cut > 0  # some rows were longer than the model takes


@pytest.mark.parametrize("loss", ["kto", "apo_zero_unpaired"])
def test_the_batch_line_counts_mismatched_rows_only_for_kto(base, unpaired, tmp_path, capsys, loss):
    """The run's batch line: B completions, plus B mismatched rows for kto (which scores them), and the tokens per
    step of the rows trained on; apo_zero_unpaired scores no mismatched rows."""
    trainer = Trainer(kto(tmp_path / "run", unpaired, base, **{"train.preference_loss": loss, "train.max_steps": 1}),
                      progress=False, tensorboard=False)
    capsys.readouterr()
    trainer.fit()
    T = trainer.config.model.block_size
    rows = 16 if loss == "kto" else 8
    what = "8 completions + 8 mismatched rows" if loss == "kto" else "8 completions"
    assert f"batch: {what} x {T} tokens = {rows * T:,} tokens/step" in capsys.readouterr().out
