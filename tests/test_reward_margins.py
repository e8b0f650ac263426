"""Per-pair margins for reward models (a "margin" field of preference records; TRL's RewardTrainer column, Llama 2's
preference strength): stored with the prepared pairs, and the reward model's loss -log sigmoid(r_w - r_l - m).

Checked: `prepare` keeps each record's margin on both examples of its pair (0 for a record without one, nothing at all
when no record has one); a margin that is not a finite number is a bad record named in one line; the loss and its
gradient equal TRL's RewardTrainer with a margin; the first training step's loss and `lmforge eval`'s are the formula
on each pair scored alone; a damaged margins tensor is refused.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from lmforge.cli import main
from lmforge.data.tasks import FORMAT, load_examples
from lmforge.errors import DataError
from lmforge.files import sha256_file
from lmforge.preference_loss import reward_model_loss
from lmforge.train import Trainer
from test_preference import base, prepare_pairs, preference_records  # noqa: F401 (fixture)
from test_reward_model import reward_config, scored_alone
from test_tasks import write_jsonl


def margin_records(n: int = 60) -> list[dict]:
    """The capitals pairs, each with a margin from its word's length (every third without one)."""
    records = preference_records(n)
    for i, r in enumerate(records):
        if i % 3:
            r["margin"] = 0.5 * len(r["prompt"]) - 1 if i % 2 else len(r["prompt"])
    return records


@pytest.fixture(scope="module")
def margin_pairs(base, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("margins")
    assert prepare_pairs(base, root / "data", write_jsonl(root / "pairs.jsonl", margin_records())) == 0
    return root / "data"


def test_prepare_keeps_each_pairs_margin_on_both_its_examples(margin_pairs, base, tmp_path):
    """Every pair of every split carries its record's margin (found by its prompt) on both rows, 0 without one; data
    of records without margins stores none."""
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(margin_pairs / "tokenizer.json")
    want = {r["prompt"]: float(r.get("margin", 0.0)) for r in margin_records()}
    seen = 0
    for split in ("train", "val", "test"):
        ex = load_examples(margin_pairs, split)
        assert ex.margins is not None and ex.margins.dtype == np.float32 and ex.margins.shape == (len(ex),)
        for i in range(0, len(ex), 2):
            prompt, _ = ex.prompt_and_completion(i)
            word = tok.decode(prompt).strip()
            assert ex.margins[i] == ex.margins[i + 1] == pytest.approx(want[word])
            seen += 1
    assert seen == len(want) and len({m for m in want.values()}) > 3
    report = json.loads((margin_pairs / "report.json").read_text())
    assert report["pairs_with_margin"] == sum("margin" in r for r in margin_records()) == 40
    from lmforge.data.preference import format_preference_report

    assert "margins: 40 of 60 pairs" in format_preference_report(report)
    plain = tmp_path / "plain"
    assert prepare_pairs(base, plain, write_jsonl(tmp_path / "p.jsonl", preference_records(30))) == 0
    assert load_examples(plain, "train").margins is None
    assert "margins" not in load_file(plain / "train.safetensors")


@pytest.mark.parametrize("margin", ["1.5", True, float("nan"), [1]])
def test_a_margin_that_is_not_a_finite_number_is_a_bad_record(base, tmp_path, capsys, margin):
    records = preference_records(20)
    records[4]["margin"] = margin
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    capsys.readouterr()
    assert prepare_pairs(base, tmp_path / "data", path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pairs.jsonl:5" in err[0] and "'margin'" in err[0] and "finite number" in err[0]
    assert not (tmp_path / "data").exists()


def test_the_loss_with_a_margin_and_its_gradient_are_trls():
    """-log sigmoid(r_w - r_l - m), mean over the pairs: TRL's RewardTrainer.compute_loss with a "margin" input, value
    and gradient; a margin moves the loss."""
    import types

    from trl import RewardTrainer

    torch.manual_seed(0)
    rewards = torch.randn(6, 1)
    margin = torch.tensor([0.0, 1.5, -0.5, 2.0, 0.25, 3.0])
    ours = rewards.clone().requires_grad_()
    theirs = rewards.clone().requires_grad_()
    got = reward_model_loss(ours[0::2, 0], ours[1::2, 0], 0.0, margin[0::2]).mean()
    trainer = object.__new__(RewardTrainer)
    trainer.__dict__.update(model=types.SimpleNamespace(training=False), args=types.SimpleNamespace(
        center_rewards_coefficient=None), _metrics={"eval": defaultdict(list)}, _total_train_tokens=0)
    trainer.accelerator = types.SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    order = torch.tensor([0, 2, 4, 1, 3, 5])  # TRL's batch: every chosen row, then every rejected one

    def model(**inputs):
        return types.SimpleNamespace(logits=theirs[order])
    want = trainer.compute_loss(model, {"attention_mask": torch.ones(6, 2), "margin": margin[0::2]})
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)
    assert abs(float(reward_model_loss(rewards[0::2, 0], rewards[1::2, 0]).mean()) - float(got)) > 0.1


def test_the_first_step_and_eval_take_each_pairs_margin(margin_pairs, base, tmp_path, capsys):
    """A reward model on data with margins: the val loss before training and the first step's loss (the first 8 train
    pairs, in order) are -log sigmoid(r_w - r_l - m) of each pair scored alone, not the loss without margins; `lmforge
    eval` takes the margins too."""
    trainer = Trainer(reward_config(tmp_path / "run", margin_pairs, base, **{
        "data.sampling": "sequential", "train.max_steps": 1, "train.eval_interval": 0}), progress=False,
        tensorboard=False)
    start = copy.deepcopy(trainer.raw_model)
    val, train = load_examples(margin_pairs, "val"), load_examples(margin_pairs, "train")
    alone = scored_alone(base, val, len(val) // 2, start)
    with_margin = float(reward_model_loss(alone[:, 0], alone[:, 1], 0.0, torch.from_numpy(val.margins[0::2])).mean())
    assert abs(with_margin - float(reward_model_loss(alone[:, 0], alone[:, 1]).mean())) > 0.1
    assert trainer.evaluate() == pytest.approx(with_margin, abs=1e-5)
    trainer.fit()
    first = scored_alone(base, train, 8, start)
    want = float(reward_model_loss(first[:, 0], first[:, 1], 0.0, torch.from_numpy(train.margins[0:16:2])).mean())
    assert trainer.history[0][1] == pytest.approx(want, abs=1e-5)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--split", "val", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(trainer.val_loss, abs=1e-5)


@pytest.mark.parametrize("damage", ["unequal", "nan", "short"])
def test_damaged_margins_are_refused(margin_pairs, tmp_path, damage):
    """A margins tensor whose pair rows differ, holds a NaN or has the wrong length: the file is damaged."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(margin_pairs, data)
    arrays = load_file(data / "train.safetensors")
    margins = arrays["margins"].copy()
    if damage == "unequal":
        margins[1] += 1
    elif damage == "nan":
        margins[0] = margins[1] = np.nan
    else:
        margins = margins[:-2]
    arrays["margins"] = margins
    save_file(arrays, data / "train.safetensors", metadata={"format": FORMAT})
    manifest = json.loads((data / "manifest.json").read_text())
    if "sha256" in manifest["splits"]["train"]:
        manifest["splits"]["train"]["sha256"] = sha256_file(data / "train.safetensors")
        (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="offsets, prompt_lengths, margins\\): the file is damaged"):
        load_examples(data, "train")
    shutil.copy(margin_pairs / "train.safetensors", data / "train.safetensors")  # the intact file loads
    shutil.copy(margin_pairs / "manifest.json", data / "manifest.json")
    assert load_examples(data, "train").margins is not None
