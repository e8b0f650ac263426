"""train.precompute_reference on unpaired data (KTO): the reference scores every completion and the mismatched row of
each example once, before the first step, with each example's mismatched partner fixed as a sequential stream's
batches pair them (data.batches.kl_partners; TRL's KTOTrainer fixes its rows' partners the same way). On a
sequential stream that is exactly what the live reference sees: the same losses, KL estimates, val loss and rewards,
with no frozen copy kept; the stored values are the reference's own log-probabilities, and a resume reads them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_for_inference
from lmforge.data.batches import kl_partners, unpaired_batch
from lmforge.data.tasks import load_examples
from lmforge.preference_loss import sequence_logprobs
import lmforge.train.trainer as trainer_module
from lmforge.train import Trainer
from test_preference import base  # noqa: F401,F811  (a fixture)
from test_unpaired import kto, unpaired  # noqa: F401  (unpaired: a fixture)

STREAM = {"data.sampling": "sequential", "train.max_steps": 6, "train.eval_interval": 3}


def test_partners_rotate_each_group_by_one_and_a_lone_last_example_takes_the_one_before():
    assert kl_partners(7, 3).tolist() == [2, 0, 1, 5, 3, 4, 5]
    assert kl_partners(6, 3).tolist() == [2, 0, 1, 5, 3, 4]
    assert kl_partners(4, 1).tolist() == [3, 0, 1, 2]


@pytest.mark.parametrize("loss", ["kto", "apo_zero_unpaired"])
def test_a_precomputed_kto_run_trains_and_evaluates_as_the_live_one(base, unpaired, tmp_path, loss):  # noqa: F811
    live = Trainer(kto(tmp_path / "live", unpaired, base, **STREAM, **{"train.preference_loss": loss}),
                   progress=False, tensorboard=False)
    live.fit()
    pre = Trainer(kto(tmp_path / "pre", unpaired, base, **STREAM, **{"train.preference_loss": loss,
                                                                      "train.precompute_reference": True}),
                  progress=False, tensorboard=False)
    assert pre.reference is None and live.reference is not None
    assert all(len(batch) == 7 for batch in pre.val_batches)
    pre.fit()
    assert [loss for _, loss in pre.history] == pytest.approx([loss for _, loss in live.history], abs=1e-5)
    assert live.history[-1][1] != pytest.approx(live.history[0][1], abs=1e-3)  # it learned: a wrong reference shows
    assert pre.val_loss == pytest.approx(live.val_loss, abs=1e-5)
    for key, value in live.val_metrics.items():
        assert pre.val_metrics[key] == pytest.approx(value, abs=1e-4), key


def test_the_stored_values_are_the_references_own_and_a_resume_reads_them(base, unpaired, tmp_path,  # noqa: F811
                                                                         monkeypatch):
    settings = {**STREAM, "train.precompute_reference": True, "train.save_interval": 3}
    full = Trainer(kto(tmp_path / "full", unpaired, base, **settings), progress=False, tensorboard=False)
    examples = full.train_data.examples
    model, _, _ = load_for_inference(base)
    with torch.no_grad():  # a few examples one at a time, whole logits: their row and their mismatched row
        for e in (0, 1, 8, 9, 50):
            x, y, kl_x, kl_y, *_ = unpaired_batch(load_examples(unpaired, "train"), np.array([e]),
                                                  examples.kl_partners[[e]], 0, full.config.model.block_size + 1)
            assert float(sequence_logprobs(model(x), y)[0]) == pytest.approx(float(examples.reference_logps[e]),
                                                                             abs=2e-5)
            assert float(sequence_logprobs(model(kl_x), kl_y)[0]) == pytest.approx(
                float(examples.reference_kl_logps[e]), abs=2e-5)
    assert examples.kl_partners[0] == full.config.train.batch_size - 1 and examples.kl_partners[1] == 0
    full.fit()

    def refuse(*args, **kwargs):
        raise AssertionError("scored again although the saved scores fit")

    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    shutil.copy(tmp_path / "full" / "reference_logps.safetensors", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000006")
    monkeypatch.setattr(trainer_module, "score_completions", refuse)
    resumed = Trainer(kto(tmp_path / "resumed", unpaired, base, **settings, **{"train.resume": "auto"}),
                      progress=False, tensorboard=False)
    resumed.fit()
    assert resumed.history == [entry for entry in full.history if entry[0] > 3]


@pytest.mark.distributed
def test_two_processes_score_their_shares_and_train_like_one_with_the_live_reference(base, unpaired,  # noqa: F811
                                                                                      tmp_path):
    """2 processes x 4 completions with precomputed values (each scores every other batch; the partners fixed by the
    global micro-batch of 8) train and evaluate as 1 process x 8 with the live reference, on a sequential stream."""
    import json

    from distributed_jobs import torchrun_worker, worker

    settings = {"data.path": str(unpaired), "train.init_from": str(base), "train.preference_loss": "kto",
                "data.sampling": "sequential"}
    worker(tmp_path / "one", 8, 1, False, "", json.dumps(settings))
    torchrun_worker(tmp_path / "two", 4, 1, False, "", json.dumps({**settings, "train.precompute_reference": True}))
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert two["world_size"] == 2 and two["reference_held"] is None and one["reference_held"] == 1.0
    assert [loss for _, loss in two["history"]] == pytest.approx([loss for _, loss in one["history"]], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
