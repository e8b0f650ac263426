"""GRPO (train.preference_loss grpo): online reinforcement learning from a reward model's scores of the policy's own
samples, each trained on its reward against its group's.

The loss is checked against TRL's GRPOTrainer._compute_loss on the same per-token log-probabilities (value and
gradient, each normalisation, with and without the KL term) and the advantages against TRL's formula. In the
trainer: the samples are the policy's own (the same seed) with the reward model's scores; the first step's loss is
the formula's on them (the policy is its reference then, so the KL term is 0); training raises the reward of what
the policy writes (the A setting of tests/test_online_preference.py); a resumed run is bit-identical.
"""

from __future__ import annotations

import types
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.data.batches import IGNORE_INDEX
from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, generate_batch_ids
from lmforge.preference_loss import group_advantages, grpo_sequence_loss, grpo_token_loss
from lmforge.train import Trainer
from lmforge.train.metrics import read_metrics
from test_online_preference import A, a_pairs, fit_and_sample, judge_run, online, policy  # noqa: F401
from test_preference import base, dpo  # noqa: F401 (fixture)


def grpo(run_dir: Path, data: Path, policy: Path, judge: Path, **overrides: object):
    return online(run_dir, data, policy, judge, **{"train.preference_loss": "grpo", "train.dpo_beta": 0.1,
                                                    **overrides})


# ------------------------------------------------------------------------------------------- the loss
def trl_grpo_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
                  beta: float, loss_type: str, max_new_tokens: int, old: torch.Tensor | None = None,
                  epsilon: tuple[float, float] = (0.2, 0.2), delta: float | None = None, level: str = "token",
                  sapo: tuple[float, float] = (1.0, 1.05), entropies: torch.Tensor | None = None,
                  top_entropy_quantile: float = 1.0) -> torch.Tensor:
    """TRL's GRPOTrainer._compute_loss on per-token log-probabilities (the model call replaced by them), one process,
    no accumulation; one update per generation (TRL's defaults), or with `old`, the log-probabilities of the policy
    that sampled (num_iterations > 1), clipped to `epsilon` (epsilon_low, epsilon_high), `delta` and importance
    sampling `level` (token; sequence: GSPO); `sapo` its (temperature_pos, temperature_neg); `entropies` the
    per-token entropies the model call would give, with `top_entropy_quantile`."""
    from trl import GRPOTrainer

    class OneProcess:
        num_processes, sync_gradients = 1, True

        def gather(self, x):
            return x

        gather_for_metrics = gather

        def reduce(self, x, reduction="sum"):
            return x

        def pad_across_processes(self, x, dim=0, pad_index=0):
            return x

    trainer = object.__new__(GRPOTrainer)
    trainer.__dict__.update(
        loss_type=loss_type, beta=beta, epsilon_low=epsilon[0], epsilon_high=epsilon[1],
        top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=None, importance_sampling_level=level, use_vllm=False, aux_loss_enabled=False,
        current_gradient_accumulation_steps=1, max_completion_length=max_new_tokens, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, accelerator=OneProcess(),
        args=types.SimpleNamespace(delta=delta, use_bias_correction_kl=False, steps_per_generation=1,
                                   sapo_temperature_pos=sapo[0], sapo_temperature_neg=sapo[1]),
        model=types.SimpleNamespace(training=True))
    entropies = torch.zeros_like(logps) if entropies is None else entropies
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropies, None)
    n, t = logps.shape
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "num_items_in_batch": mask.sum(), "ref_per_token_logps": reference}
    if old is not None:
        inputs["old_per_token_logps"] = old
    return trainer._compute_loss(None, inputs)


@pytest.mark.parametrize("scale", [True, False])
def test_advantages_are_trls(scale):
    """Each reward minus its group's mean, over the group's Bessel-corrected standard deviation + 1e-4 (TRL's nanstd);
    a group whose samples all score alike gets advantages 0."""
    from trl.trainer.utils import nanstd

    rewards = torch.randn(5, 4) * 3
    rewards[2] = 0.7
    got = group_advantages(rewards, scale)
    want = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        want = want / (nanstd(rewards, dim=1).unsqueeze(1) + 1e-4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got[2].abs().max() == 0 and got.sum(dim=1).abs().max() < 1e-5
    assert not torch.allclose(group_advantages(rewards, True), group_advantages(rewards, False))


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_the_loss_and_its_gradient_are_trls(loss_type, beta):
    """lmforge's per-completion terms summed and divided by the trainer's count (completion tokens for dapo, else
    completions) equal TRL's loss, and so do their gradients with respect to the log-probabilities; the reference
    differs from the policy, so the KL term is not 0."""
    torch.manual_seed(0)
    n, t = 6, 7
    mask = torch.rand(n, t) > 0.3
    mask[3] = False  # a completion with no token
    advantages, reference = torch.randn(n), -torch.rand(n, t) * 3
    ours = (-torch.rand(n, t) * 3).requires_grad_()
    theirs = ours.detach().clone().requires_grad_()
    count = mask.sum() if loss_type == "dapo" else n
    got = grpo_sequence_loss(grpo_token_loss(ours, advantages, reference, beta), mask, loss_type, t).sum() / count
    want = trl_grpo_loss(theirs, advantages, mask, reference, beta, loss_type, t)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)
    assert ours.grad[3].abs().max() == 0 and ours.grad.abs().max() > 0


def test_the_kl_term_is_schulmans_k3_and_only_with_beta():
    logps = torch.tensor([[-1.0, -2.0]])
    reference = torch.tensor([[-1.5, -0.5]])
    d = reference - logps
    got = grpo_token_loss(logps, torch.zeros(1), reference, 0.5)
    torch.testing.assert_close(got, 0.5 * (d.exp() - d - 1))
    assert grpo_token_loss(logps, torch.zeros(1), reference, 0.0).abs().max() == 0
    with pytest.raises(ValueError, match="unknown GRPO"):
        grpo_sequence_loss(got, torch.ones(1, 2, dtype=torch.bool), "mean", 2)


# ---------------------------------------------------------------------------------------- the trainer
def first_step_loss(y: torch.Tensor, advantages: torch.Tensor, loss_type: str, max_new_tokens: int) -> float:
    """GRPO's loss at a step whose policy sampled the batch (the ratio is 1, the KL term 0): -sum_i A_i w_i over
    the count, w_i = |o_i| (dapo), 1 (grpo), |o_i| / max_new_tokens (dr_grpo)."""
    tokens = (y != IGNORE_INDEX).sum(dim=1).double()
    a = advantages.double()
    if loss_type == "dapo":
        return float(-(a * tokens).sum() / tokens.sum())
    if loss_type == "grpo":
        return float(-a.mean())
    return float(-(a * tokens / max_new_tokens).mean())


def test_the_groups_are_the_policys_samples_scored_by_the_reward_model(a_pairs, policy, judge_run, tmp_path):
    """G samples of each prompt, prompt-major, drawn with the step's seed (generate_batch_ids: the same tokens), an
    end token after a sample that ended; the rewards are the reward model's scores of those rows and the advantages
    their group-relative values."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{"train.grpo_group_size": 3}),
                      progress=False, tensorboard=False)
    batch = trainer.train_data.next_batch()
    (x, y, advantages), rewards = trainer.online.groups(trainer.raw_model, batch, 3, 2, 1)
    seed = int(np.random.SeedSequence([trainer.config.train.seed, 2, 1]).generate_state(1, np.uint64)[0] >> 1)
    prompts = trainer.online.prompts(batch)
    drawn = generate_batch_ids(trainer.raw_model, [p.tolist() for p in prompts],
                               GenerateConfig(max_new_tokens=5, num_return_sequences=3, seed=seed), end_id=1)
    assert x.size(0) == 3 * len(prompts) and rewards.shape == (len(prompts), 3)
    for k, prompt in enumerate(prompts):
        rows = []
        for g in range(3):
            r = 3 * k + g
            labelled = (y[r] != IGNORE_INDEX).nonzero().flatten()
            full = torch.cat([x[r, :labelled[-1] + 1], y[r, labelled[-1:]]]).numpy()
            assert full[:len(prompt)].tolist() == prompt.tolist() and int(labelled[0]) == len(prompt) - 1
            ids = drawn[k][g]
            assert full[len(prompt):].tolist() == (ids + [1] if len(ids) < 5 else ids)
            rows.append(full)
        assert trainer.online.judge.score_ids(rows) == pytest.approx(rewards[k].tolist(), abs=1e-5)
    torch.testing.assert_close(advantages, group_advantages(rewards).flatten())


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_the_first_step_trains_on_its_own_samples_with_the_formulas_loss(a_pairs, policy, judge_run, tmp_path,
                                                                        loss_type):
    """Step 1's logged loss is the formula's on the groups the policy samples at step 0 (two micro-batches, so the
    division spans the whole step's completions or tokens); with grpo_beta a frozen reference is kept and, the
    policy being its reference at step 1, adds nothing; dr_grpo runs with unscaled advantages (Dr. GRPO's pair)."""
    scale = loss_type != "dr_grpo"
    settings = {"train.max_steps": 1, "train.grad_accum": 2, "train.batch_size": 3, "train.grpo_loss_type": loss_type,
                "train.grpo_beta": 0.2 if loss_type == "dapo" else 0.0,
                "train.grpo_scale_rewards": "group" if scale else "none"}
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **settings), progress=False,
                      tensorboard=False)
    assert (trainer.reference is not None) == (loss_type == "dapo")
    data_state = trainer.train_data.state_dict()
    groups = [trainer.online.groups(trainer.raw_model, trainer.train_data.next_batch(), 4, 0, i) for i in range(2)]
    trainer.train_data.load_state_dict(data_state)
    y = torch.cat([torch.nn.functional.pad(g[1], (0, 32 - g[1].size(1)), value=IGNORE_INDEX) for g, _ in groups])
    advantages = torch.cat([group_advantages(rewards, scale).flatten() for _, rewards in groups])
    assert advantages.abs().max() > 0.1
    trainer.fit()
    assert trainer.history[0][1] == pytest.approx(first_step_loss(y, advantages, loss_type, 5), abs=1e-5)


def sampled(trainer: Trainer) -> tuple[float, float]:
    """(mean reward, share of A among the completion tokens) of G samples of every val batch's prompts, drawn with the
    seed of the trainer's evaluations."""
    from lmforge.train.trainer import VAL_SAMPLING_STEP

    rewards, shares = [], []
    for k, batch in enumerate(trainer.val_batches):
        (_, y, _), scores = trainer.online.groups(trainer.raw_model, batch, 4, VAL_SAMPLING_STEP, k)
        rewards += scores.flatten().tolist()
        shares.append(float((y[y != IGNORE_INDEX] == A).float().mean()))
    return float(np.mean(rewards)), float(np.mean(shares))


def test_grpo_makes_the_policy_write_what_the_reward_model_prefers(a_pairs, policy, judge_run, tmp_path):
    """20 GRPO steps raise the mean reward of the policy's samples of the val prompts and the share of A's in them;
    the evaluations measure it (val_online_reward: G samples of every val prompt, the same draws as `sampled`), it
    can pick the best checkpoint, and the log carries each step's mean reward."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.max_steps": 20, "train.eval_batches": 4, "train.eval_interval": 10,
        "train.best_metric": "val_online_reward"}), progress=False, tensorboard=False)
    reward_before, reward_after, a_before, a_after = fit_and_sample(trainer, sampled)
    assert reward_after > reward_before + 0.5 and a_after > a_before + 0.2
    logged = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(logged) == 20 and all(isinstance(r["online_reward"], float) for r in logged)
    evals = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20] and evals[-1]["val_online_reward"] == pytest.approx(reward_after)


def test_batch_scaling_divides_by_the_std_of_every_reward_of_the_step(a_pairs, policy, judge_run, tmp_path):
    """grpo_scale_rewards batch (TRL's "batch", PPO-Lite): each advantage is its reward minus its group's mean over the
    Bessel-corrected standard deviation (TRL's nanstd) of all the step's rewards, both micro-batches, + 1e-4; step 1's
    loss is the formula's with those advantages; the evaluation scales by all its val rewards the same way."""
    from trl.trainer.utils import nanstd

    settings = {"train.max_steps": 1, "train.grad_accum": 2, "train.batch_size": 3, "train.grpo_scale_rewards": "batch",
                "train.eval_batches": 2}
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **settings), progress=False,
                      tensorboard=False)
    data_state = trainer.train_data.state_dict()
    groups = [trainer.online.groups(trainer.raw_model, trainer.train_data.next_batch(), 4, 0, i) for i in range(2)]
    trainer.train_data.load_state_dict(data_state)
    rewards = torch.cat([r for _, r in groups])  # (6, 4)
    want = ((rewards - rewards.mean(dim=1, keepdim=True)) / (nanstd(rewards) + 1e-4)).flatten()
    got = torch.cat([batch[2] for batch in trainer.scaled_by_batch(
        [(tuple(batch[:2]) + ((r - r.mean(dim=1, keepdim=True)).flatten(),), r) for batch, r in groups])])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, group_advantages(rewards).flatten(), atol=1e-3)
    y = torch.cat([torch.nn.functional.pad(g[1], (0, 32 - g[1].size(1)), value=IGNORE_INDEX) for g, _ in groups])
    trainer.fit()
    assert trainer.history[0][1] == pytest.approx(first_step_loss(y, want, "dapo", 5), abs=1e-5)
    drawn = [trainer.sample_groups(batch, 2**40, k) for k, batch in enumerate(trainer.val_batches)]
    val_rewards = torch.cat([r.flatten() for _, r in drawn])
    scaled = trainer.scaled_by_batch(drawn)
    for (batch, r), out in zip(drawn, scaled):
        unscaled = (r - r.mean(dim=1, keepdim=True)).flatten()
        torch.testing.assert_close(out[2], unscaled / (nanstd(val_rewards) + 1e-4), rtol=1e-5, atol=1e-6)


def test_the_kl_term_holds_the_policy_from_step_2_on(a_pairs, policy, judge_run, tmp_path):
    """With grpo_beta the first step is the one without it (the policy is its reference: KL 0, and so is its
    gradient), so step 2 samples the same groups; its loss is then higher by beta times a KL divergence > 0."""
    runs = [Trainer(grpo(tmp_path / f"beta{beta}", a_pairs, policy, judge_run, **{
        "train.max_steps": 2, "train.grpo_beta": beta}), progress=False, tensorboard=False) for beta in (0.0, 2.0)]
    for trainer in runs:
        trainer.fit()
    (_, plain1), (_, plain2) = runs[0].history
    (_, held1), (_, held2) = runs[1].history
    assert held1 == pytest.approx(plain1, abs=1e-6) and held2 > plain2 + 1e-4


@pytest.mark.distributed
def test_two_processes_train_grpo_like_one(a_pairs, policy, judge_run, tmp_path):
    """2 processes x 4 prompts sample the groups 1 process x 8 does, and DAPO's division by the global batch's
    completion tokens makes their losses equal; so does batch scaling's standard deviation over both processes."""
    from distributed_jobs import one_and_two

    settings = {"data.path": str(a_pairs), "train.init_from": str(policy), "train.online_reward_model": str(judge_run),
                "train.online_max_new_tokens": 5, "train.preference_loss": "grpo", "train.grpo_beta": 0.1}
    one, two = one_and_two(tmp_path, settings)
    assert [loss for _, loss in two["history"]] == pytest.approx([loss for _, loss in one["history"]], abs=1e-5)
    assert len({round(loss, 4) for _, loss in one["history"]}) > 3
    # batch scaling: the standard deviation of the rewards of both processes (one all-reduce), not of each one's
    one, two = one_and_two(tmp_path / "batch", {**settings, "train.grpo_scale_rewards": "batch"})
    assert [loss for _, loss in two["history"]] == pytest.approx([loss for _, loss in one["history"]], abs=1e-5)


def test_a_resumed_grpo_run_is_bit_identical(a_pairs, policy, judge_run, tmp_path):
    from test_preference import full_and_resumed

    extra = {"train.dpo_beta": 0.1, "train.online_reward_model": str(judge_run), "train.online_max_new_tokens": 5,
             "train.preference_loss": "grpo", "train.grpo_beta": 0.1}
    full, resumed = full_and_resumed(tmp_path, a_pairs, policy, **extra)
    assert [step for step, _ in resumed.history] == [4, 5, 6]
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 3]
    assert resumed.val_loss == full.val_loss and resumed.val_metrics == full.val_metrics
    assert len({loss for _, loss in full.history}) > 3


def test_grpo_settings_that_cannot_work_are_refused(base, a_pairs, policy, judge_run, tmp_path):
    with pytest.raises(ConfigError, match="online_reward_model"):
        dpo(tmp_path / "a", a_pairs, policy, **{"train.preference_loss": "grpo"})
    with pytest.raises(ConfigError, match="grpo_group_size .* set GRPO"):
        dpo(tmp_path / "b", a_pairs, policy, **{"train.grpo_group_size": 8})
    with pytest.raises(ConfigError, match="grpo_beta"):
        grpo(tmp_path / "c", a_pairs, policy, judge_run, **{"train.dpo_beta": 0.2})
    with pytest.raises(ConfigError, match="val_online_reward"):
        Trainer(grpo(tmp_path / "d", a_pairs, policy, judge_run, **{"train.best_metric": "val_reward_accuracy"}),
                progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match="frozen reference"):
        Trainer(grpo(tmp_path / "e", a_pairs, "none", judge_run, **{"train.grpo_beta": 0.1}), progress=False,
                tensorboard=False)
    run = tmp_path / "f"
    Trainer(grpo(run, a_pairs, policy, judge_run, **{"train.max_steps": 1}), progress=False, tensorboard=False).fit()
    assert main(["eval", str(run), "--data", str(a_pairs)]) == 2


def test_the_plan_counts_g_samples_of_each_prompt_and_a_reference_only_with_beta():
    """`lmforge plan`: a GRPO batch of B prompts is B x grpo_group_size sequences (DPO's: 2B), the frozen reference
    and its forward come with grpo_beta > 0 only, and the sampling note names the G completions."""
    from test_plan import config

    from lmforge.plan import format_plan, plan

    settings = {"train.online_reward_model": "runs/rm", "train.preference_loss": "grpo", "train.init_from": "runs/a"}
    dpo_plan = plan(config(**{"train.online_reward_model": "runs/rm", "train.init_from": "runs/a"}), device="h100",
                    task="preference")
    plain = plan(config(**settings, **{"train.grpo_group_size": 6}), device="h100", task="preference")
    held = plan(config(**settings, **{"train.grpo_group_size": 6, "train.grpo_beta": 0.04}), device="h100",
                task="preference")
    assert plain.tokens_per_step == 3 * dpo_plan.tokens_per_step and plain.activations > dpo_plan.activations
    assert dpo_plan.reference > 0 and plain.reference == 0 and not plain.reference_forward
    assert held.reference == dpo_plan.reference and held.reference_forward
    assert any("online sampling counted (every step): 6 samples of each prompt" in n for n in plain.notes)
    assert "(GRPO: 6 samples of each prompt)" in format_plan(plain)
    from lmforge.plan import measure

    with pytest.raises(ConfigError, match="--measure trains on random tokens, which have no prompts to sample"):
        measure(config(**settings), steps=1, task="preference")


def test_grpo_trains_on_the_prompts_of_sft_data(a_pairs, policy, judge_run, tmp_path):
    """sft data (prompt and completion records) serves GRPO its prompts, one per example, its completions unused:
    each group's rows start with an example's prompt, and 20 steps raise the reward as on pair data; the checkpoint
    stays an sft model (its template). Online DPO on sft data is refused: its evaluations score the data's pairs."""
    sft = policy.parent / "data"
    trainer = Trainer(grpo(tmp_path / "run", sft, policy, judge_run, **{
        "train.max_steps": 20, "train.eval_batches": 4, "train.eval_interval": 20}), progress=False, tensorboard=False)
    batch = trainer.val_batches[0]
    x, y = batch[0], batch[1]
    prompts = trainer.online.prompts(batch)
    assert len(prompts) == x.size(0)
    for row, labels, prompt in zip(x, y, prompts):
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        assert prompt.tolist() == row[:first + 1].tolist()
    reward_before, _ = sampled(trainer)
    trainer.fit()
    reward_after, _ = sampled(trainer)
    assert reward_after > reward_before + 0.5
    assert trainer.task["task"] == "sft"
    with pytest.raises(ConfigError, match="train.preference_loss grpo"):
        Trainer(online(tmp_path / "dpo", sft, policy, judge_run), progress=False, tensorboard=False)


def test_lora_grpo_holds_the_adapters_to_the_base_with_the_kl_term(a_pairs, policy, judge_run, tmp_path):
    """LoRA keeps no frozen copy: its reference is the model with its adapters off, so grpo_beta's KL term is 0 at
    step 1 (adapters start at 0) and positive at step 2, as with full fine-tuning."""
    lora = {"lora.r": 4, "lora.targets": "q,v,mlp", "train.max_steps": 2, "optim.lr": 1e-2}
    runs = [Trainer(grpo(tmp_path / f"beta{beta}", a_pairs, policy, judge_run, **{**lora, "train.grpo_beta": beta}),
                    progress=False, tensorboard=False) for beta in (0.0, 2.0)]
    assert all(trainer.reference is None for trainer in runs)
    for trainer in runs:
        trainer.fit()
    (_, plain1), (_, plain2) = runs[0].history
    (_, held1), (_, held2) = runs[1].history
    assert held1 == pytest.approx(plain1, abs=1e-6) and held2 > plain2 + 1e-4


def test_mask_truncated_trains_only_the_samples_that_ended(a_pairs, policy, judge_run, tmp_path):
    """grpo_mask_truncated: a sample that ran out of tokens (no end token) keeps its reward and advantage but no
    label, so step 1's DAPO loss is the formula's over the samples that ended, divided by their tokens alone."""
    settings = {"train.max_steps": 1, "train.grpo_mask_truncated": True}
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **settings), progress=False,
                      tensorboard=False)
    data_state = trainer.train_data.state_dict()
    batch = trainer.train_data.next_batch()
    (x, y, advantages), rewards = trainer.online.groups(trainer.raw_model, batch, 4, 0, 0)
    (_, masked, masked_advantages), _ = trainer.sample_groups(batch, 0, 0)
    trainer.train_data.load_state_dict(data_state)
    ended = torch.tensor([bool((row[row != IGNORE_INDEX] == 1).any()) for row in y])  # an end token among the labels
    assert 0 < int(ended.sum()) < len(ended)
    assert (masked[~ended] == IGNORE_INDEX).all() and torch.equal(masked[ended], y[ended])
    torch.testing.assert_close(masked_advantages, advantages)
    trainer.fit()
    assert trainer.history[0][1] == pytest.approx(first_step_loss(masked, advantages, "dapo", 5), abs=1e-5)
    assert first_step_loss(masked, advantages, "dapo", 5) != pytest.approx(first_step_loss(y, advantages, "dapo", 5))


def test_the_logged_reward_is_the_whole_steps_and_pair_weights_are_refused(a_pairs, policy, judge_run, tmp_path):
    """With two micro-batches the logged online_reward is the mean over both micro-batches' samples (GRPO samples
    them all before the step); KTO's weights, like DPO's beta, are refused with GRPO on any data."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.max_steps": 1, "train.grad_accum": 2, "train.batch_size": 3, "train.log_interval": 1}),
        progress=False, tensorboard=False)
    data_state = trainer.train_data.state_dict()
    rewards = torch.cat([trainer.sample_groups(trainer.train_data.next_batch(), 0, i)[1].flatten() for i in range(2)])
    trainer.train_data.load_state_dict(data_state)
    trainer.fit()
    logged = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert logged[0]["online_reward"] == pytest.approx(float(rewards.mean()), abs=1e-6)
    assert logged[0]["online_reward"] != pytest.approx(float(rewards[12:].mean()), abs=1e-6)
    for key in ("train.kto_desirable_weight", "train.kto_undesirable_weight"):
        for data in (a_pairs, policy.parent / "data"):
            with pytest.raises(ConfigError, match="kto_\\*_weight belong to the pair and unpaired losses"):
                grpo(tmp_path / "x", data, policy, judge_run, **{key: 2.0})
