"""GRPO's other objectives and token selection: CISPO and SAPO in PPO's clip's place (train.grpo_objective), training
only the high-entropy tokens (train.grpo_top_entropy, "Beyond the 80/20 rule"), the log's entropy, and the
log-probabilities of the distribution the samples were drawn from (the logits divided by train.online_temperature).

The losses and their gradients are checked against TRL's GRPOTrainer._compute_loss (loss types cispo and sapo,
top_entropy_quantile) on ratios far enough from 1 that the caps bite; the fused head's entropies and tempered
log-probabilities against the whole logits; in the trainer: a later step of a generation trains the chosen objective,
the first step of a run trains only the kept tokens, the log's entropy is the samples', and 2 processes choose the
tokens as 1 does.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import load_run_config
from lmforge.data.batches import IGNORE_INDEX
from lmforge.errors import ConfigError
from lmforge.head_loss import linear_cross_entropy_tokens, logits_cross_entropy_tokens
from lmforge.preference_loss import (grpo_clipped, grpo_log_ratio, grpo_sequence_loss, grpo_token_loss,
                                     high_entropy_mask)
from lmforge.train import Trainer
from lmforge.train.metrics import read_metrics
from test_grpo import grpo, trl_grpo_loss
from test_grpo_iterations import old_and_new, steps
from test_online_preference import a_pairs, judge_run, policy  # noqa: F401 (fixtures)
from test_preference import base  # noqa: F401 (fixture)


# ------------------------------------------------------------------------------------------- the losses
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cispo_and_its_gradient_are_trls(level):
    """CISPO: the ratio capped at 1 + eps_high (TRL's epsilon_high) and held constant weighs A log pi; loss and
    gradient equal TRL's loss_type cispo (its count: the batch's completion tokens, lmforge's dapo), with the KL term.
    The cap bites on some tokens, and a capped token still has a gradient (PPO's clip would drop it)."""
    new, old, mask = old_and_new(n=16, spread=0.6 if level == "sequence" else 0.4)
    advantages, reference = torch.randn(new.size(0)), -torch.rand(new.shape) * 3
    ours, theirs = new.clone().requires_grad_(), new.clone().requires_grad_()
    sequence = mask if level == "sequence" else None
    got = grpo_sequence_loss(grpo_token_loss(ours, advantages, reference, 0.04, old, (0.2, 0.25), None, sequence,
                                             "cispo"), mask, "dapo", new.size(1)).sum() / mask.sum()
    want = trl_grpo_loss(theirs, advantages, mask, reference, 0.04, "cispo", new.size(1), old=old,
                         epsilon=(0.2, 1.25), level=level)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)
    capped = grpo_clipped(torch.exp(grpo_log_ratio(new, old, sequence)), advantages, (0.2, 0.25), "cispo")
    capped = capped.expand_as(mask) & mask
    assert 0 < int(capped.sum()) < int(mask.sum())
    assert ours.grad[capped].abs().min() > 0  # still learning, at the capped rate
    ratio = torch.exp(grpo_log_ratio(new, old, sequence)).expand_as(new)
    a = advantages[:, None].expand_as(new)
    assert torch.equal(capped, (ratio > 1.25) & (a > 0) & mask)  # TRL's cispo_clip_ratio: the high side only


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sapo_and_its_gradient_are_trls(level):
    """SAPO: the soft gate (4 / tau) sigmoid(tau (w - 1)) with tau_pos for positive advantages and tau_neg for the
    others; loss and gradient equal TRL's loss_type sapo (its count: each completion's length, then the completions:
    lmforge's grpo), with temperatures far enough apart that swapping them changes the loss."""
    new, old, mask = old_and_new(n=16, spread=0.6 if level == "sequence" else 0.4)
    advantages, reference = torch.randn(new.size(0)), -torch.rand(new.shape) * 3
    ours, theirs = new.clone().requires_grad_(), new.clone().requires_grad_()
    sequence = mask if level == "sequence" else None

    def loss(logps: torch.Tensor, taus: tuple[float, float]) -> torch.Tensor:
        token = grpo_token_loss(logps, advantages, reference, 0.04, old, sequence_mask=sequence, objective="sapo",
                                sapo_temperatures=taus)
        return grpo_sequence_loss(token, mask, "grpo", new.size(1)).sum() / new.size(0)

    got = loss(ours, (0.5, 3.0))
    want = trl_grpo_loss(theirs, advantages, mask, reference, 0.04, "sapo", new.size(1), old=old, level=level,
                         sapo=(0.5, 3.0))
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)
    assert abs(float(loss(new, (3.0, 0.5))) - float(got.detach())) > 1e-3


@pytest.mark.parametrize("objective", ["clip", "cispo", "sapo"])
def test_with_one_update_per_generation_every_objective_is_the_policy_gradient(objective):
    """Without old log-probabilities (w = 1) each objective's gradient is -A times that of log pi."""
    new, _, _ = old_and_new()
    advantages = torch.randn(new.size(0))
    logps = new.clone().requires_grad_()
    grpo_token_loss(logps, advantages, epsilon=(0.01, 0.01), objective=objective,
                    sapo_temperatures=(0.3, 4.0)).sum().backward()
    torch.testing.assert_close(logps.grad, -advantages[:, None].expand_as(new))


def test_an_unknown_objective_is_refused():
    new, old, _ = old_and_new()
    with pytest.raises(ValueError, match="unknown GRPO objective 'ppo'"):
        grpo_token_loss(new, torch.randn(new.size(0)), old=old, objective="ppo")


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.5, 1.0])
def test_the_high_entropy_mask_is_trls(rho):
    """high_entropy_mask keeps the completion tokens at or above the (1 - rho) quantile of the completion tokens'
    entropies (TRL's get_high_entropy_mask on one process); rho 0 keeps the highest only, 1 keeps them all; with the
    other processes' tokens given, their quantile decides."""
    from test_grpo import trl_grpo_loss  # noqa: F401 (TRL's trainer class is imported there)
    from trl import GRPOTrainer

    torch.manual_seed(3)
    _, _, mask = old_and_new()
    entropies = torch.rand(mask.shape) * 4
    trainer = object.__new__(GRPOTrainer)
    trainer.__dict__["accelerator"] = type("One", (), {"pad_across_processes": lambda self, x, **k: x,
                                                       "gather": lambda self, x: x})()
    want = trainer.get_high_entropy_mask(entropies, mask.long(), 1 - rho)
    got = high_entropy_mask(entropies, mask, rho)
    assert torch.equal(got, want)
    kept = int(got.sum())
    assert kept == {0.0: 1, 1.0: int(mask.sum())}.get(rho, kept) and (kept < int(mask.sum())) == (rho < 1)
    others = torch.full((50,), 10.0)  # other processes' tokens, all above this one's: the quantile rises past ours
    assert int(high_entropy_mask(entropies, mask, 0.5, torch.cat([entropies[mask], others])).sum()) == 0
    assert int(high_entropy_mask(entropies, torch.zeros_like(mask), 0.5).sum()) == 0  # no completion token


def test_the_loss_with_top_entropy_tokens_is_trls():
    """The policy terms of the low-entropy tokens are dropped, not their KL terms nor their place in the count:
    loss and gradient equal TRL's with top_entropy_quantile 0.3 (dapo, with old log-probabilities and the KL)."""
    new, old, mask = old_and_new(n=16)
    advantages, reference = torch.randn(new.size(0)), -torch.rand(new.shape) * 3
    entropies = torch.rand(new.shape) * 5
    ours, theirs = new.clone().requires_grad_(), new.clone().requires_grad_()
    keep = high_entropy_mask(entropies, mask, 0.3)
    got = grpo_sequence_loss(grpo_token_loss(ours, advantages, reference, 0.04, old, (0.2, 0.28), keep=keep), mask,
                             "dapo", new.size(1)).sum() / mask.sum()
    want = trl_grpo_loss(theirs, advantages, mask, reference, 0.04, "dapo", new.size(1), old=old,
                         epsilon=(0.2, 0.28), entropies=entropies, top_entropy_quantile=0.3)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)
    dropped = mask & ~keep
    assert int(dropped.sum()) > 0 and ours.grad[dropped].abs().min() > 0  # their KL terms still pull


# ------------------------------------------------------------------------------------------- the head
@pytest.mark.parametrize("cap", [0.0, 2.5])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_the_fused_head_gives_tempered_losses_and_entropies_of_the_whole_logits(cap, temperature):
    """linear_cross_entropy_tokens with a temperature and entropies equals the whole logits' cross-entropy of
    softmax(cap(z) / temperature) and its entropy -sum p log p (0 where not counted), with the same gradients; so
    does logits_cross_entropy_tokens; the entropies carry no gradient."""
    torch.manual_seed(0)
    h, w = torch.randn(3, 6, 16, requires_grad=True), torch.randn(37, 16, requires_grad=True)
    y = torch.randint(0, 37, (3, 6))
    y[0, :3] = IGNORE_INDEX
    z = h @ w.t()
    z = (cap * torch.tanh(z / cap) if cap else z) / temperature
    want = F.cross_entropy(z.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none").view(3, 6)
    logp = z.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1) * (y != IGNORE_INDEX)
    g = torch.randn(3, 6)
    want_grads = torch.autograd.grad((want * g).sum(), (h, w))
    for fused in (True, False):
        if fused:
            got, got_entropy = linear_cross_entropy_tokens(h, w, y, cap, 5, temperature, entropies=True)
        else:
            logits = h @ w.t()
            got, got_entropy = logits_cross_entropy_tokens(cap * torch.tanh(logits / cap) if cap else logits, y,
                                                           temperature, entropies=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_entropy, entropy.detach(), rtol=1e-5, atol=1e-5)
        assert not got_entropy.requires_grad
        for mine, theirs in zip(torch.autograd.grad((got * g).sum(), (h, w)), want_grads):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    if temperature != 1.0:  # the temperature changes the losses
        plain = linear_cross_entropy_tokens(h, w, y, cap, 5)
        assert (plain - want).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------- the trainer
def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).float()


@pytest.mark.parametrize("loss_chunk", [0, 64])
def test_grpo_scores_the_samples_under_the_tempered_distribution(a_pairs, policy, judge_run, tmp_path, loss_chunk):
    """With online_temperature 0.5 the trainer's log-probabilities and entropies of the samples are those of
    softmax(logits / 0.5), what the samples were drawn from (TRL's), fused or from the whole logits."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.online_temperature": 0.5, "train.loss_chunk": loss_chunk, "train.max_steps": 1}), progress=False,
        tensorboard=False)
    (x, y, _), _ = trainer.sample_groups(trainer.train_data.next_batch(), 0, 0)
    with torch.no_grad():
        logps, entropies = trainer.token_logprobs(trainer.raw_model, (x, y), entropies=True)
    logp = (logits_of(trainer.raw_model, x) / 0.5).log_softmax(-1)
    counted = y != IGNORE_INDEX
    want = logp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * counted
    torch.testing.assert_close(logps, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropies, -(logp.exp() * logp).sum(-1) * counted, rtol=1e-5, atol=1e-5)
    untempered = logits_of(trainer.raw_model, x).log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    assert ((untempered * counted) - want).abs().max() > 1e-2


@pytest.mark.parametrize("objective", ["cispo", "sapo"])
def test_a_later_step_of_a_generation_trains_the_chosen_objective(a_pairs, policy, judge_run, tmp_path, objective):
    """grpo_iterations 2: step 2's loss is the chosen objective's formula on the kept samples and pi_old (and not
    PPO's clip's); the log (of steps 3 and 4, a second generation) carries CISPO's capped share as clip_fraction,
    and no clip_fraction for SAPO."""
    extra = ({"train.grpo_epsilon_high": 0.01} if objective == "cispo"
             else {"train.grpo_sapo_tau_pos": 0.5, "train.grpo_sapo_tau_neg": 4.0})
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.grpo_iterations": 2, "train.grpo_objective": objective, "train.grad_accum": 2, "train.batch_size": 3,
        "optim.lr": 2e-2, "train.max_steps": 4, "train.log_interval": 1, **extra}), progress=False, tensorboard=False)
    steps(trainer, 1)
    rollouts = trainer.rollouts
    with torch.no_grad():
        logps = [trainer.token_logprobs(trainer.raw_model, b[:2]) for b in rollouts.batches]

    def formula(chosen: str) -> float:
        total, count = 0.0, 0
        for (x, y, advantages, old), new in zip(rollouts.batches, logps):
            mask = y != IGNORE_INDEX
            token = grpo_token_loss(new, advantages, old=old, epsilon=(0.2, 0.01), objective=chosen,
                                    sapo_temperatures=(0.5, 4.0))
            total += float(grpo_sequence_loss(token, mask, "dapo", 5).sum())
            count += int(mask.sum())
        return total / count

    second = steps(trainer, 1)[0]
    assert second == pytest.approx(formula(objective), abs=1e-5)
    assert abs(formula("clip") - formula(objective)) > 1e-4
    trainer.fit()
    logged = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in logged] == [3, 4]
    if objective == "cispo":
        assert logged[0]["clip_fraction"] == 0 and 0 < logged[1]["clip_fraction"] < 1
    else:
        assert all("clip_fraction" not in r for r in logged)


def test_top_entropy_trains_only_the_high_entropy_tokens_and_the_log_has_the_entropy(a_pairs, policy, judge_run,
                                                                                      tmp_path):
    """grpo_top_entropy 0.3: the first step's loss is -A summed over the kept tokens (their entropy, under the
    policy that sampled, in the micro-batch's top 0.3) over all completion tokens, not over the kept ones and not
    every token's; the log's entropy is the mean entropy at the step's completion tokens."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.grpo_top_entropy": 0.3, "train.online_temperature": 0.8, "train.grad_accum": 2, "train.batch_size": 3,
        "train.max_steps": 1, "train.log_interval": 1}), progress=False, tensorboard=False)
    before = copy.deepcopy(trainer.raw_model)
    trainer.fit()
    loss = trainer.history[0][1]
    total, everything, count, entropy_sum = 0.0, 0.0, 0, 0.0
    for x, y, advantages in trainer.rollouts.batches:
        mask = y != IGNORE_INDEX
        logp = (logits_of(before, x) / 0.8).log_softmax(-1)
        entropies = -(logp.exp() * logp).sum(-1)
        keep = high_entropy_mask(entropies, mask, 0.3)
        assert 0 < int(keep.sum()) < int(mask.sum())
        a = advantages[:, None].expand_as(mask)
        total += float(-(a * keep).sum())
        everything += float(-(a * mask).sum())
        count += int(mask.sum())
        entropy_sum += float((entropies * mask).sum())
    assert loss == pytest.approx(total / count, abs=1e-5)
    assert abs(everything / count - total / count) > 1e-3
    record = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"][0]
    assert record["entropy"] == pytest.approx(entropy_sum / count, rel=1e-4)


@pytest.mark.distributed
def test_two_processes_choose_the_high_entropy_tokens_like_one(a_pairs, policy, judge_run, tmp_path):
    """2 processes x 4 prompts choose the tokens to train by the quantile of both processes' tokens, as 1 process x
    8 does: the same losses (each process's own quantile would differ)."""
    from distributed_jobs import one_and_two

    settings = {"data.path": str(a_pairs), "train.init_from": str(policy), "train.online_reward_model": str(judge_run),
                "train.online_max_new_tokens": 5, "train.preference_loss": "grpo", "train.grpo_top_entropy": 0.3}
    one, two = one_and_two(tmp_path, settings)
    assert [loss for _, loss in two["history"]] == pytest.approx([loss for _, loss in one["history"]], abs=1e-5)
    assert len({round(loss, 4) for _, loss in one["history"]}) > 3


def test_objective_settings_are_refused_where_nothing_reads_them(base, a_pairs, policy, judge_run, tmp_path):
    """grpo_objective and the SAPO temperatures shape the ratio (1 with one step per generation); each objective
    refuses the keys it does not read, naming them; grpo_top_entropy belongs to GRPO; values out of range are
    refused."""
    with pytest.raises(ConfigError, match="set train.grpo_iterations above 1"):
        grpo(tmp_path / "a", a_pairs, policy, judge_run, **{"train.grpo_objective": "cispo"})
    refused = (({"train.grpo_objective": "cispo", "train.grpo_epsilon": 0.3}, r"train.grpo_epsilon is not read"),
               ({"train.grpo_objective": "cispo", "train.grpo_delta": 2.0}, r"train.grpo_delta is not read"),
               ({"train.grpo_objective": "sapo", "train.grpo_epsilon_high": 0.3, "train.grpo_delta": 2.0},
                r"train.grpo_epsilon_high / grpo_delta are not read by train.grpo_objective sapo"),
               ({"train.grpo_sapo_tau_neg": 2.0}, r"train.grpo_sapo_tau_\* is not read by train.grpo_objective clip"),
               ({"train.grpo_objective": "cispo", "train.grpo_sapo_tau_pos": 2.0}, r"grpo_sapo_tau_\* is not read"))
    for k, (settings, message) in enumerate(refused):
        with pytest.raises(ConfigError, match=message):
            grpo(tmp_path / str(k), a_pairs, policy, judge_run, **{"train.grpo_iterations": 2, **settings})
    ok = grpo(tmp_path / "ok", a_pairs, policy, judge_run, **{"train.grpo_iterations": 2,
                                                              "train.grpo_objective": "cispo",
                                                              "train.grpo_epsilon_high": 4.0})
    assert ok.train.grpo_objective == "cispo"
    with pytest.raises(ConfigError, match="grpo_top_entropy set GRPO"):
        load_run_config(None, {"data.path": str(a_pairs), "train.grpo_top_entropy": "0.2"})
    for key, value in (("grpo_top_entropy", "1.5"), ("grpo_top_entropy", "-0.1"), ("grpo_sapo_tau_pos", "0"),
                       ("grpo_objective", "ppo")):
        with pytest.raises(ConfigError, match=key):
            load_run_config(None, {"data.path": str(a_pairs), "train.preference_loss": "grpo",
                                   "train.online_reward_function": "f.py:f", "train.grpo_iterations": "2",
                                   "train.grpo_objective": "sapo", f"train.{key}": value})
