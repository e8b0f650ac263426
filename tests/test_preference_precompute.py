"""train.precompute_reference: the frozen reference scores every train and val completion once, before the first
step; training and evaluation then read those values and keep no frozen copy (full fine-tuning) and run no reference
forward pass. It must train exactly as the live reference does, resume exactly, and split the scoring across
processes without changing a value."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_for_inference
from lmforge.data.batches import pad_examples
from lmforge.data.tasks import load_examples
from lmforge.errors import ConfigError
from lmforge.preference_loss import sequence_logprobs
import lmforge.train.trainer as trainer_module
from lmforge.train import Trainer
from test_plan import built  # noqa: F401  (a fixture: the Trainers built)
from test_preference import LOG2, base, dpo, full_and_resumed, pairs  # noqa: F401  (base, pairs: fixtures)

LORA = {"lora.r": 4, "lora.targets": "q,v,mlp"}


def by_hand(base, data, split: str) -> np.ndarray:
    """Each example's completion log-probability under the base, one example at a time from the whole logits."""
    model, _, _ = load_for_inference(base)
    examples = load_examples(data, split)
    out = []
    with torch.no_grad():
        for e in range(len(examples)):
            x, y = pad_examples(examples, np.array([e]))
            out.append(float(sequence_logprobs(model(x), y)[0]))
    return np.array(out)


@pytest.mark.parametrize("lora", [False, True])
def test_precomputed_reference_trains_and_evaluates_as_the_live_one(base, pairs, tmp_path, lora):
    """The same 8 steps (losses within 1e-5 of the live reference's, the first log 2), the same val loss and
    rewards; no frozen copy is kept; the stored values are the base's log-probabilities of each example."""
    extra = {"train.max_steps": 8, "train.eval_interval": 4, **(LORA if lora else {})}
    live = Trainer(dpo(tmp_path / "live", pairs, base, **extra), progress=False, tensorboard=False)
    live.fit()
    pre = Trainer(dpo(tmp_path / "pre", pairs, base, **extra, **{"train.precompute_reference": True}),
                  progress=False, tensorboard=False)
    assert pre.reference is None and (lora or live.reference is not None)
    assert all(len(batch) == 3 for batch in pre.val_batches)
    pre.fit()
    assert pre.history[0][1] == pytest.approx(LOG2, abs=1e-6)
    assert [loss for _, loss in pre.history] == pytest.approx([loss for _, loss in live.history], abs=1e-5)
    assert live.history[-1][1] < LOG2 - 0.05  # it learned: a wrong reference would show
    assert pre.val_loss == pytest.approx(live.val_loss, abs=1e-5) and pre.val_loss != pytest.approx(LOG2, abs=1e-3)
    for key, value in live.val_metrics.items():
        assert pre.val_metrics[key] == pytest.approx(value, abs=1e-4), key
    stored = pre.train_data.examples.reference_logps
    assert stored.dtype == np.float32 and stored.shape == (len(pre.train_data.examples),)
    np.testing.assert_allclose(stored, by_hand(base, pairs, "train"), atol=2e-5)


def test_a_resumed_run_scores_with_the_base_not_the_checkpoint(base, pairs, tmp_path):
    """A resume scores again with train.init_from's model (the policy at step 3 would give other values): the
    resumed steps and val measurements equal the uninterrupted run's bit for bit."""
    full, resumed = full_and_resumed(tmp_path, pairs, base, **{"train.precompute_reference": True})
    assert [step for step, _ in resumed.history] == [4, 5, 6]
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 3]
    assert resumed.val_loss == full.val_loss and resumed.val_metrics == full.val_metrics


def test_precompute_reference_is_refused_where_there_is_no_reference(base, pairs, tmp_path):
    from test_tasks import reverse_records, write_jsonl
    from lmforge.cli import main

    for loss in ("simpo", "orpo"):
        with pytest.raises(ConfigError, match=f"train.preference_loss {loss} has none: drop it"):
            Trainer(dpo(tmp_path / loss, pairs, base, **{"train.preference_loss": loss,
                                                          "train.precompute_reference": True}),
                    progress=False, tensorboard=False)
    sft = tmp_path / "sft"
    assert main(["prepare", str(write_jsonl(tmp_path / "r.jsonl", reverse_records(30))), "--task", "sft",
                 "--tokenizer", str(base), "--out", str(sft)]) == 0
    with pytest.raises(ConfigError, match="precompute_reference set a preference loss.*is not preference data"):
        Trainer(dpo(tmp_path / "s", sft, base, **{"train.precompute_reference": True}), progress=False,
                tensorboard=False)
    assert not any((tmp_path / name).exists() for name in ("simpo", "orpo", "s"))


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_score_their_shares_and_train_like_one(base, pairs, tmp_path, parallel):
    """DDP or FSDP with precomputed reference values: each of 2 processes scores every other batch of pairs and the
    sums are shared, so 2 x 4 pairs train and evaluate as 1 x 8 pairs with the live reference, and no process
    holds any of a frozen copy."""
    from distributed_jobs import torchrun_worker, worker

    settings = {"data.path": str(pairs), "train.init_from": str(base), "train.dpo_beta": 1.0}
    worker(tmp_path / "one", 8, 1, False, "", json.dumps(settings))
    torchrun_worker(tmp_path / "two", 4, 1, False, "", json.dumps({**settings, "train.precompute_reference": True,
                                                                  "train.parallel": parallel}))
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert two["world_size"] == 2 and [s for s, _ in two["history"]] == list(range(1, 7))
    assert two["reference_held"] is None and one["reference_held"] == 1.0
    assert [loss for _, loss in two["history"]] == pytest.approx([loss for _, loss in one["history"]], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5) and one["val_loss"] != pytest.approx(LOG2)


def test_plan_counts_no_reference_copy_nor_forward_when_precomputed(built):
    """`lmforge plan` of DPO with precomputed reference values: the memory and step FLOPs of a reference-free
    loss, and a note that says the scoring pass is not counted; --measure's Trainer keeps no frozen copy."""
    from lmforge.plan import format_plan, measure, plan
    from test_plan import config

    settings = {"train.precompute_reference": True}
    pre = plan(config(**settings), device="h100", task="preference")
    live = plan(config(), device="h100", task="preference")
    orpo = plan(config(**{"train.preference_loss": "orpo"}), device="h100", task="preference")
    assert live.reference > 0 and live.reference_forward
    assert pre.reference == 0 and not pre.reference_forward
    assert pre.step_flops_per_token == orpo.step_flops_per_token < live.step_flops_per_token
    assert pre.total_memory == live.total_memory - live.reference
    assert "scores the data once before the first step" in format_plan(pre)
    assert "precompute_reference" not in format_plan(live)
    measured = measure(config(**settings, **{"train.num_threads": 1}), steps=1, task="preference")
    assert measured["step_time"] > 0 and built[-1].reference is None
    assert built[-1].train_data.examples.reference_logps is not None


def test_a_resume_reads_the_saved_scores_and_a_stale_or_broken_file_is_scored_again(base, pairs, tmp_path,
                                                                                     monkeypatch):
    """RUN_DIR/reference_logps.safetensors holds the scores a run made; a resume with the same base, data and
    settings reads them instead of scoring (scoring is made to fail here, and the resumed steps still equal the
    whole run's), while a file made under another key, or one that is not safetensors, is scored again."""
    from lmforge.train.preference import SCORES_FILE, read_scores, write_scores

    full, _ = full_and_resumed(tmp_path, pairs, base, **{"train.precompute_reference": True})
    saved = tmp_path / "full" / SCORES_FILE
    assert saved.is_file()
    cached = json.loads(__import__("safetensors").safe_open(str(saved), "np").metadata()["key"])
    scores = read_scores(saved, cached)
    np.testing.assert_array_equal(scores["train"], full.train_data.examples.reference_logps)
    assert set(scores) == {"train", "val"} and cached["sizes"]["train"] == len(full.train_data.examples)

    def refuse(*args, **kwargs):
        raise AssertionError("scored again although the saved scores fit")

    resumed_dir = tmp_path / "again"
    shutil.copytree(tmp_path / "full", resumed_dir)
    monkeypatch.setattr(trainer_module, "score_completions", refuse)
    extra = {"train.max_steps": 6, "train.save_interval": 3, "train.eval_interval": 3,
             "train.precompute_reference": True, "train.resume": str(resumed_dir / "checkpoints" / "step-00000003")}
    resumed = Trainer(dpo(resumed_dir, pairs, base, **extra), progress=False, tensorboard=False)
    resumed.fit()
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 3]
    monkeypatch.undo()

    for name, damage in (("stale", lambda p: write_scores(p, {**cached, "base": "another"}, {
            k: np.zeros_like(v) for k, v in scores.items()})), ("broken", lambda p: p.write_bytes(b"not a file"))):
        run = tmp_path / name
        run.mkdir()
        damage(run / SCORES_FILE)
        trainer = Trainer(dpo(run, pairs, base, **{"train.precompute_reference": True}), progress=False,
                          tensorboard=False)
        np.testing.assert_array_equal(trainer.train_data.examples.reference_logps, scores["train"])
        assert read_scores(run / SCORES_FILE, cached) is not None  # rewritten under the right key


@pytest.mark.parametrize("change", [{"train.loss_chunk": 0}, {"train.batch_size": 5}, {"train.precision": "bf16-mixed"},
                                    {}])
def test_saved_scores_are_reused_only_under_the_same_arithmetic(base, pairs, tmp_path, monkeypatch, change):
    """Another loss_chunk (whole logits), batch size (other padding) or precision scores again; the same settings
    read the saved scores."""
    first = Trainer(dpo(tmp_path / "run", pairs, base, **{"train.precompute_reference": True}), progress=False,
                    tensorboard=False)
    assert first.train_data.examples.reference_logps is not None
    calls = []
    real = trainer_module.score_completions

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "score_completions", counted)
    Trainer(dpo(tmp_path / "run", pairs, base, **{"train.precompute_reference": True, **change}), progress=False,
            tensorboard=False)
    assert len(calls) == (2 if change else 0)  # train and val scored again, or neither
