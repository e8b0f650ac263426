"""Guards for GRPO's objectives, token selection and tempered, entropy-giving head (commit 20aedfb) where
tests/test_grpo_objectives.py leaves a wrong line passing:

- the log's clip shares are TRL's: grpo_clipped's region (clip) and high side (cispo) against TRL's clip_ratio and
  cispo_clip_ratio metrics, with asymmetric epsilons and completions whose advantage is 0 (neither side clips them);
- the fused head's entropies are the whole logits' for any number of counted tokens, so every `rows`-block of
  _entropy_shifted_ (the last, partial one included) is its own rows';
- a head LoRA adapts (GPT.token_loss from whole logits) scores the targets under the tempered distribution too,
  and per_row still sums each row;
- in the trainer: the entropy the log reports is the current step's only (reset each step, not added to by an
  evaluation), CISPO's clipped share counts the high side only, with tokens below 1 - eps_low present, and one
  update per generation logs no clip_fraction;
- the config: SAPO's temperatures belong to GRPO, grpo_epsilon is refused for SAPO, tau_neg 0 is refused and a
  grpo_top_entropy of 0 (the highest token only) is accepted.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.config import LoRAConfig, load_run_config
from lmforge.data.batches import IGNORE_INDEX
from lmforge.errors import ConfigError
from lmforge.head_loss import linear_cross_entropy_tokens
from lmforge.lora import apply_lora
from lmforge.preference_loss import grpo_clipped, grpo_log_ratio
from lmforge.train import Trainer
from test_chunked_loss import model_and_batch
from test_grpo import grpo, trl_grpo_loss
from test_grpo_iterations import old_and_new, steps
from test_online_preference import a_pairs, judge_run, policy  # noqa: F401 (fixtures)
from test_preference import base  # noqa: F401 (fixture)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """-sum p log p of softmax(logits) over the last dimension, from the whole logits."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


# ------------------------------------------------------------------------------------------- the clip shares
def trl_metrics(monkeypatch, *args, **kwargs) -> dict[str, float]:
    """The metrics TRL's GRPOTrainer._compute_loss logs for trl_grpo_loss(*args, **kwargs) (its last value each)."""
    from trl import GRPOTrainer

    seen = {}
    compute = GRPOTrainer._compute_loss

    def keeping(self, *a, **k):
        seen["trainer"] = self
        return compute(self, *a, **k)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", keeping)
    trl_grpo_loss(*args, **kwargs)
    return {name: values[-1] for name, values in seen["trainer"]._metrics["train"].items() if values}


@pytest.mark.parametrize("objective", ["clip", "cispo"])
def test_the_clipped_share_is_trls_with_zero_advantages_and_asymmetric_epsilons(monkeypatch, objective):
    """grpo_clipped's share of the completion tokens equals TRL's clip_ratio/region_mean (clip) or cispo_clip_ratio
    (cispo, TRL's epsilon_high 1 + eps_high): eps_low and eps_high far apart, so each side reads its own; some
    completions have advantage 0, with ratios past both bounds, and neither side counts them."""
    new, old, mask = old_and_new(n=16, spread=0.5)
    torch.manual_seed(5)
    advantages = torch.randn(new.size(0))
    advantages[[0, 5, 9]] = 0.0
    epsilon = (0.1, 0.4)
    ratio = torch.exp(grpo_log_ratio(new, old))
    zero = (advantages == 0)[:, None] & mask
    assert bool((ratio[zero] > 1.4).any()) and bool((ratio[zero] < 0.9).any())
    reference = -torch.rand(new.shape) * 3
    got = (grpo_clipped(ratio, advantages, epsilon, objective).expand_as(mask) & mask).sum() / mask.sum()
    trl_epsilon = epsilon if objective == "clip" else (epsilon[0], 1.0 + epsilon[1])
    metrics = trl_metrics(monkeypatch, new, advantages, mask, reference, 0.0, "dapo" if objective == "clip" else
                          "cispo", new.size(1), old=old, epsilon=trl_epsilon)
    want = metrics["clip_ratio/region_mean" if objective == "clip" else "cispo_clip_ratio"]
    assert float(got) == pytest.approx(want, abs=1e-6)
    assert 0 < want < 1
    if objective == "clip":  # both sides bite, each at its own epsilon
        assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0


# ------------------------------------------------------------------------------------------- the head
@pytest.mark.parametrize("counted", [1, 8, 9, 17, 24])
@pytest.mark.parametrize("chunk", [1024, 9])
def test_the_fused_entropies_are_the_whole_logits_for_any_number_of_tokens(counted, chunk):
    """linear_cross_entropy_tokens' entropies (made `rows` = 8 rows at a time on a CPU) and tempered losses equal
    the whole logits' for counted token numbers around multiples of 8 (a last, partial block), with and without
    gradients, and chunks that split the blocks."""
    torch.manual_seed(counted)
    h, w = torch.randn(2, 13, 16) * 2, torch.randn(41, 16)
    y = torch.randint(0, 41, (2, 13))
    flat = y.view(-1)
    flat[torch.randperm(flat.numel())[counted:]] = IGNORE_INDEX
    z = (h @ w.t()) / 0.7
    counted_at = y != IGNORE_INDEX
    want_entropy = entropy_of(z) * counted_at
    want = torch.nn.functional.cross_entropy(z.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                             reduction="none").view(y.shape)
    with torch.no_grad():
        got, got_entropy = linear_cross_entropy_tokens(h, w, y, 0.0, chunk, 0.7, entropies=True)
    torch.testing.assert_close(got_entropy, want_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad_loss, grad_entropy = linear_cross_entropy_tokens(h.requires_grad_(), w, y, 0.0, chunk, 0.7, entropies=True)
    torch.testing.assert_close(grad_entropy, want_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_loss.detach(), want, rtol=1e-5, atol=1e-5)


def test_a_lora_adapted_head_scores_under_the_temperature_with_entropies(tmp_path):
    """GPT.forward(per_token, temperature, entropies) with a head LoRA adapts (its logits made whole): each target's
    cross-entropy of softmax(logits / temperature) and that distribution's entropy, 0 where not counted; per_row
    each row's untempered sum."""
    model, x, y = model_and_batch(tmp_path, **{"model.tie_embeddings": False})
    apply_lora(model, LoRAConfig(r=2, alpha=4, targets=["q", "head"]))
    assert not isinstance(model.lm_head, torch.nn.Linear)  # GPT.token_loss takes the whole logits' path
    with torch.no_grad():
        losses, entropies = model(x, targets=y, loss_chunk=5, per_token=True, temperature=0.6, entropies=True)
        rows = model(x, targets=y, loss_chunk=5, per_row=True)  # each row's sum, untempered (preference losses')
        z = model(x).float() / 0.6
    counted = y != IGNORE_INDEX
    want = torch.nn.functional.cross_entropy(z.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                             reduction="none").view(y.shape)
    torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropies, entropy_of(z) * counted, rtol=1e-5, atol=1e-5)
    plain = torch.nn.functional.cross_entropy(z.flatten(0, 1) * 0.6, y.flatten(), ignore_index=IGNORE_INDEX,
                                              reduction="none").view(y.shape)
    assert (plain - want).abs().max() > 1e-2  # the temperature matters here
    torch.testing.assert_close(rows, plain.sum(-1), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- the trainer
def sample_entropy(model: torch.nn.Module, batches: list, temperature: float) -> tuple[float, int]:
    """(summed entropy of softmax(logits / temperature) at the batches' completion tokens, their number)."""
    total, count = 0.0, 0
    for x, y, *_ in batches:
        with torch.no_grad():
            entropies = entropy_of(model(x).float() / temperature)
        mask = y != IGNORE_INDEX
        total += float((entropies * mask).sum())
        count += int(mask.sum())
    return total, count


def test_the_logged_entropy_is_the_steps_own(a_pairs, policy, judge_run, tmp_path):
    """After a second step the trainer's entropy (what the log divides) is the second step's samples' alone, under
    the policy that sampled them and the sampling temperature, not the two steps' together; an evaluation adds
    nothing to it."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.online_temperature": 0.8, "train.grad_accum": 2, "train.batch_size": 3, "optim.lr": 2e-2,
        "train.max_steps": 2}), progress=False, tensorboard=False)
    steps(trainer, 1)
    first = list(trainer.entropy)
    before = copy.deepcopy(trainer.raw_model)
    steps(trainer, 1)
    total, count = sample_entropy(before, trainer.rollouts.batches, 0.8)
    assert trainer.entropy[1] == count and trainer.entropy[0] == pytest.approx(total, rel=1e-5)
    assert first[0] > 0 and first[1] > 0  # the first step's, which the second's must not add to
    after = list(trainer.entropy)
    with torch.no_grad():
        trainer.evaluate_grpo()
    assert trainer.entropy == after


def test_cispos_clipped_share_in_the_trainer_is_the_high_side_only(a_pairs, policy, judge_run, tmp_path):
    """grpo_iterations 2, CISPO with eps_high 0.01 and a large learning rate: step 2's clipped share is TRL's
    cispo_clip_ratio, (w > 1 + eps_high) & (A > 0), over the completion tokens, though some tokens of negative
    advantage are below 1 - grpo_epsilon (which PPO's clip would count)."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.grpo_iterations": 2, "train.grpo_objective": "cispo", "train.grpo_epsilon_high": 0.01,
        "train.grad_accum": 2, "train.batch_size": 3, "optim.lr": 3e-1, "train.max_steps": 2}), progress=False,
        tensorboard=False)
    steps(trainer, 1)
    high, low, count = 0, 0, 0
    for x, y, advantages, old in trainer.rollouts.batches:
        with torch.no_grad():
            new = trainer.token_logprobs(trainer.raw_model, (x, y))
        mask = y != IGNORE_INDEX
        ratio = torch.exp(new.float() - old)
        a = advantages[:, None]
        high += int(((ratio > 1.01) & (a > 0) & mask).sum())
        low += int(((ratio < 0.8) & (a < 0) & mask).sum())
        count += int(mask.sum())
    steps(trainer, 1)
    assert low > 0 and high > 0
    assert trainer.clipped == [float(high), float(count)]


def test_one_update_per_generation_logs_the_entropy_and_no_clip_fraction(a_pairs, policy, judge_run, tmp_path):
    """grpo_iterations 1 (the ratio is 1, nothing clips): the log has the entropy and no clip_fraction."""
    from lmforge.train.metrics import read_metrics

    Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{"train.max_steps": 1, "train.log_interval": 1}),
            progress=False, tensorboard=False).fit()
    record = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"][0]
    assert record["entropy"] > 0 and "clip_fraction" not in record


# ------------------------------------------------------------------------------------------- the config
def test_more_objective_settings_are_refused_or_accepted(a_pairs, policy, judge_run, tmp_path):
    """SAPO's temperatures set GRPO (refused with another preference loss, before anything else); SAPO refuses
    grpo_epsilon alone; tau_neg must be above 0; grpo_top_entropy 0 (the highest token only) is a valid rho."""
    for key in ("grpo_sapo_tau_pos", "grpo_sapo_tau_neg"):
        with pytest.raises(ConfigError, match="grpo_sapo_tau_\\* / grpo_top_entropy set GRPO, and train.preference_"):
            load_run_config(None, {"data.path": str(a_pairs), f"train.{key}": "2.0"})
    with pytest.raises(ConfigError, match="set train.grpo_iterations above 1"):
        grpo(tmp_path / "one", a_pairs, policy, judge_run, **{"train.grpo_sapo_tau_neg": 2.0})
    with pytest.raises(ConfigError, match=r"train.grpo_epsilon is not read by train.grpo_objective sapo"):
        grpo(tmp_path / "sapo", a_pairs, policy, judge_run, **{"train.grpo_iterations": 2,
                                                                "train.grpo_objective": "sapo",
                                                                "train.grpo_epsilon": 0.3})
    settings = {"data.path": str(a_pairs), "train.preference_loss": "grpo", "train.online_reward_function": "f.py:f",
                "train.grpo_iterations": "2", "train.grpo_objective": "sapo"}
    with pytest.raises(ConfigError, match="grpo_sapo_tau_neg"):
        load_run_config(None, {**settings, "train.grpo_sapo_tau_neg": "0"})
    assert load_run_config(None, {**settings, "train.grpo_top_entropy": "0"}).train.grpo_top_entropy == 0.0
