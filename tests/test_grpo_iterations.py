"""GRPO with several optimizer steps per generation of samples (train.grpo_iterations: DeepSeekMath's mu, TRL's
num_iterations): PPO's clipped ratio pi / pi_old, clip-higher (grpo_epsilon_high), two-sided clipping (grpo_delta)
and GSPO's sequence-level ratio (grpo_importance_sampling sequence).

The loss and its gradient are checked against TRL's GRPOTrainer._compute_loss with old log-probabilities given, on
ratios far enough from 1 that the clip bites; in the trainer: a generation is sampled once and trains grpo_iterations
steps (the data is read only when it is sampled), pi_old is the policy's log-probabilities at sampling time, a later
step's loss is the clipped formula on the kept samples, a checkpoint inside a generation resumes bit-identically, and
2 processes train like 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import load_run_config
from lmforge.data.batches import IGNORE_INDEX
from lmforge.errors import ConfigError
from lmforge.preference_loss import grpo_clipped, grpo_log_ratio, grpo_sequence_loss, grpo_token_loss
from lmforge.train import Trainer
from lmforge.train.metrics import read_metrics
from lmforge.train.online import Rollouts
from test_grpo import grpo, trl_grpo_loss
from test_online_preference import a_pairs, judge_run, policy  # noqa: F401 (fixtures)
from test_preference import base  # noqa: F401 (fixture)


# ------------------------------------------------------------------------------------------- the loss
def old_and_new(n: int = 8, t: int = 9, spread: float = 0.4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy log-probabilities, sampling policy's, completion mask): ratios spread around 1 by about `spread`."""
    torch.manual_seed(1)
    old = -torch.rand(n, t) * 3
    new = old + torch.randn(n, t) * spread
    mask = torch.rand(n, t) > 0.25
    mask[2] = False  # a completion with no token
    return new, old, mask


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("delta", [None, 1.3])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_the_clipped_loss_and_its_gradient_are_trls(loss_type, delta, level):
    """With old log-probabilities (the samples of an earlier step), an asymmetric clip range (0.2, 0.28), delta or
    not, token or sequence ratios and the KL term, lmforge's loss and its gradient equal TRL's; the ratios spread
    enough that the clip bites on some tokens and not on others."""
    new, old, mask = old_and_new(n=16, spread=0.6 if level == "sequence" else 0.4)
    advantages, reference = torch.randn(new.size(0)), -torch.rand(new.shape) * 3
    ours, theirs = new.clone().requires_grad_(), new.clone().requires_grad_()
    epsilon = (0.2, 0.28)
    sequence = mask if level == "sequence" else None
    count = mask.sum() if loss_type == "dapo" else new.size(0)
    got = grpo_sequence_loss(grpo_token_loss(ours, advantages, reference, 0.04, old, epsilon, delta, sequence), mask,
                             loss_type, new.size(1)).sum() / count
    want = trl_grpo_loss(theirs, advantages, mask, reference, 0.04, loss_type, new.size(1), old=old, epsilon=epsilon,
                         delta=delta, level=level)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)
    ratio = torch.exp(grpo_log_ratio(new, old, sequence))
    clipped = grpo_clipped(ratio, advantages, epsilon).expand_as(mask) & mask
    assert 0 < int(clipped.sum()) < int(mask.sum())
    unclipped = grpo_sequence_loss(grpo_token_loss(new, advantages, reference, 0.04, old, (10.0, 10.0), None,
                                                   sequence), mask, loss_type, new.size(1)).sum() / count
    assert abs(float(unclipped) - float(want.detach())) > 1e-3  # the clip (and delta) change the loss here


def test_clipped_tokens_are_trls_clip_region():
    """grpo_clipped marks what TRL's clip_ratio/region_mean counts: ratios past 1 + eps_high with A > 0, below
    1 - eps_low with A < 0; their tokens get no gradient from the policy term."""
    new, old, mask = old_and_new()
    advantages = torch.randn(new.size(0))
    ratio = torch.exp(new - old)
    a = advantages[:, None]
    want = ((ratio < 0.8) & (a < 0)) | ((ratio > 1.28) & (a > 0))
    got = grpo_clipped(ratio, advantages, (0.2, 0.28))
    assert torch.equal(got, want) and 0 < int(got.sum()) < got.numel()
    logps = new.clone().requires_grad_()
    grpo_token_loss(logps, advantages, old=old, epsilon=(0.2, 0.28)).sum().backward()
    assert logps.grad[got].abs().max() == 0 and logps.grad[~got].abs().min() > 0


def test_one_update_per_generation_is_grpos_ratio_of_one():
    """Without old log-probabilities the ratio is exactly 1 whatever epsilon: the loss is -A per token, and its
    gradient -A times that of log pi."""
    new, _, _ = old_and_new()
    advantages = torch.randn(new.size(0))
    logps = new.clone().requires_grad_()
    loss = grpo_token_loss(logps, advantages, epsilon=(0.01, 0.01))
    loss.sum().backward()
    torch.testing.assert_close(loss, -advantages[:, None].expand_as(new))
    torch.testing.assert_close(logps.grad, -advantages[:, None].expand_as(new))


# ---------------------------------------------------------------------------------------- the trainer
def steps(trainer: Trainer, n: int) -> list[float]:
    """Run n Trainer steps as fit does (train_step, then the step count); each step's mean loss."""
    losses = []
    for _ in range(n):
        trainer.train_step()
        trainer.step += 1
        losses.append(trainer.step_loss)
    return losses


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_a_generation_trains_grpo_iterations_steps_with_the_clipped_ratio(a_pairs, policy, judge_run, tmp_path,
                                                                        level):
    """grpo_iterations 2: step 1 samples (reading the data) and keeps the samples with the policy's log-probabilities
    of them then; step 2 reads no data and trains on the same samples, its loss the clipped formula with the policy
    after step 1 against those; step 3 samples anew. A tight clip range and delta bite: step 2's loss is neither the
    unclipped one nor the one without delta."""
    epsilon = (0.02, 0.03)
    settings = {"train.grpo_iterations": 2, "train.grpo_epsilon": epsilon[0], "train.grpo_epsilon_high": epsilon[1],
                "train.grpo_importance_sampling": level, "train.grpo_delta": 1.01, "train.grad_accum": 2,
                "train.batch_size": 3,
                "optim.lr": 2e-2, "train.max_steps": 3, "train.log_interval": 1}
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **settings), progress=False,
                      tensorboard=False)
    start = trainer.train_data.state_dict()
    first = steps(trainer, 1)[0]
    rollouts, after_one = trainer.rollouts, trainer.train_data.state_dict()
    assert after_one != start and len(rollouts.batches) == 2
    for x, y, _, old in rollouts.batches:  # pi_old: the sampling policy's log-probabilities, on the completion only
        assert old.shape == y.shape and old[y == IGNORE_INDEX].abs().max() == 0 and old.max() <= 0
    with torch.no_grad():
        logps = [trainer.token_logprobs(trainer.raw_model, b[:2]) for b in rollouts.batches]
    sequence = level == "sequence"

    def formula(eps: tuple[float, float], delta: float | None = 1.01) -> float:
        total, count = 0.0, 0
        for (x, y, advantages, old), new in zip(rollouts.batches, logps):
            mask = y != IGNORE_INDEX
            token = grpo_token_loss(new, advantages, old=old, epsilon=eps, delta=delta,
                                    sequence_mask=mask if sequence else None)
            total += float(grpo_sequence_loss(token, mask, "dapo", 5).sum())
            count += int(mask.sum())
        return total / count

    second = steps(trainer, 1)[0]
    assert trainer.rollouts is rollouts and trainer.train_data.state_dict() == after_one
    assert second == pytest.approx(formula(epsilon), abs=1e-5)
    assert abs(formula((10.0, 10.0)) - formula(epsilon)) > 1e-3  # the clip changes step 2's loss
    assert abs(formula(epsilon, None) - formula(epsilon)) > 1e-4  # and so does delta
    assert second != pytest.approx(first, abs=1e-4)
    steps(trainer, 1)
    assert trainer.rollouts is not rollouts and trainer.train_data.state_dict() != after_one


def test_the_first_step_of_a_generation_is_one_update_grpos(a_pairs, policy, judge_run, tmp_path):
    """At the first step of a generation the policy is the one that sampled: the ratio is 1, and the step equals a
    run with one update per generation (same loss, same weights after it); the log's clip fraction is 0 there and
    above 0 at step 2, where a tight clip bites."""
    runs = {}
    for mu in (1, 2):
        extra = {"train.grpo_iterations": 2, "train.grpo_epsilon": 0.01} if mu == 2 else {}
        trainer = Trainer(grpo(tmp_path / f"mu{mu}", a_pairs, policy, judge_run, **{
            "train.max_steps": 2, "train.log_interval": 1, "optim.lr": 2e-2, **extra}), progress=False,
            tensorboard=False)
        trainer.fit()
        runs[mu] = trainer
    assert runs[2].history[0][1] == pytest.approx(runs[1].history[0][1], abs=1e-6)
    assert runs[2].history[1][1] != pytest.approx(runs[1].history[1][1], abs=1e-4)  # mu 1 sampled anew
    logged = [r for r in read_metrics(tmp_path / "mu2") if r["kind"] == "train"]
    assert logged[0]["clip_fraction"] == 0 and 0 < logged[1]["clip_fraction"] < 1
    assert logged[0]["online_reward"] == logged[1]["online_reward"]  # the same samples
    assert all("clip_fraction" not in r for r in read_metrics(tmp_path / "mu1") if r["kind"] == "train")


def test_a_checkpoint_inside_a_generation_resumes_bit_identically(a_pairs, policy, judge_run, tmp_path):
    """grpo_iterations 2, a checkpoint at step 3 (the generation of steps 3 and 4 half trained): the resumed run
    trains step 4 on the kept samples and pi_old, and every loss and evaluation equals the uninterrupted run's."""
    from test_preference import full_and_resumed

    extra = {"train.dpo_beta": 0.1, "train.online_reward_model": str(judge_run), "train.online_max_new_tokens": 5,
             "train.preference_loss": "grpo", "train.grpo_iterations": 2, "train.grpo_epsilon": 0.05}
    full, resumed = full_and_resumed(tmp_path, a_pairs, policy, **extra)
    assert [step for step, _ in resumed.history] == [4, 5, 6]
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 3]
    assert resumed.val_loss == full.val_loss and resumed.val_metrics == full.val_metrics
    assert len({loss for _, loss in full.history}) > 3


@pytest.mark.distributed
def test_two_processes_train_grpo_iterations_like_one(a_pairs, policy, judge_run, tmp_path):
    """2 processes x 4 prompts, each keeping its own samples and pi_old, train as 1 process x 8 (dapo's global token
    count), with clip-higher and two-sided clipping."""
    from distributed_jobs import one_and_two

    settings = {"data.path": str(a_pairs), "train.init_from": str(policy), "train.online_reward_model": str(judge_run),
                "train.online_max_new_tokens": 5, "train.preference_loss": "grpo", "train.grpo_iterations": 3,
                "train.grpo_epsilon": 0.05, "train.grpo_epsilon_high": 0.08, "train.grpo_delta": 1.5}
    one, two = one_and_two(tmp_path, settings)
    assert [loss for _, loss in two["history"]] == pytest.approx([loss for _, loss in one["history"]], abs=1e-5)
    assert len({round(loss, 4) for _, loss in one["history"]}) > 3


def test_clip_settings_need_several_steps_per_generation(base, a_pairs, policy, judge_run, tmp_path):
    """The clip keys shape a ratio that is 1 with one step per generation: refused then, with the key to set; the
    grpo_iterations key itself belongs to GRPO; each value outside its range is refused."""
    for key, value in (("grpo_epsilon", 0.3), ("grpo_epsilon_high", 0.28), ("grpo_delta", 2.0),
                       ("grpo_importance_sampling", "sequence")):
        with pytest.raises(ConfigError, match="set train.grpo_iterations above 1"):
            grpo(tmp_path / key, a_pairs, policy, judge_run, **{f"train.{key}": value})
    with pytest.raises(ConfigError, match="grpo_iterations .* set GRPO"):
        load_run_config(None, {"data.path": str(a_pairs), "train.grpo_iterations": "2"})
    for key, value in (("grpo_iterations", "0"), ("grpo_epsilon", "1"), ("grpo_delta", "1"),
                       ("grpo_importance_sampling", "seq")):
        with pytest.raises(ConfigError, match=key):
            load_run_config(None, {"data.path": str(a_pairs), "train.preference_loss": "grpo",
                                   "train.online_reward_function": "f.py:f", "train.grpo_iterations": "2",
                                   f"train.{key}": value})


def test_the_log_carries_the_samples_length_and_the_share_that_ran_out_of_tokens(a_pairs, policy, judge_run,
                                                                                  tmp_path):
    """Each GRPO train record has completion_length, the mean new tokens of the step's samples (their end token
    aside; TRL's completions/mean_length), and truncated_fraction, the share of samples that ran out of tokens
    (TRL's completions/clipped_ratio), read here off the samples each step trained on; a generation kept in a
    checkpoint keeps them."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.max_steps": 3, "train.log_interval": 1, "train.grad_accum": 2, "train.batch_size": 3,
        "train.online_max_new_tokens": 3}), progress=False, tensorboard=False)
    end, generations, batches = trainer.online.end_id, [], trainer.grpo_batches

    def kept():
        out = batches()
        generations.append(trainer.rollouts)
        return out
    trainer.grpo_batches = kept
    trainer.fit()
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    shares = []
    assert len(records) == 3, (len(records), len(generations))
    for record, rollouts in zip(records, generations, strict=True):
        lengths, ended = [], []
        for _, y, *_ in rollouts.batches:
            for labels in y:
                labels = labels[labels != IGNORE_INDEX]
                ended.append(bool(labels[-1] == end))
                lengths.append(len(labels) - ended[-1])
        assert record["completion_length"] == pytest.approx(np.mean(lengths))
        assert record["truncated_fraction"] == pytest.approx(1 - np.mean(ended))
        shares.append(1 - np.mean(ended))
    assert any(0 < share < 1 for share in shares)
    back = Rollouts.from_state(json.loads(json.dumps(generations[-1].state_dict())))
    assert back.lengths == generations[-1].lengths and set(back.lengths) == {"completion_length", "truncated_fraction"}
