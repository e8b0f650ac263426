"""GRPO guards from a mutation hunt: what tests/test_grpo.py leaves open.

Each label's log-probability as the trainer computes it (the fused head's per_token path, the whole logits with
train.loss_chunk 0, a LoRA-adapted head's logits) is the model's own at that position; the evaluation's loss is the
formula's on the val groups (its division and its advantages' scaling those of the run); the logged online_reward is
the step's samples' mean reward; the batch line counts G samples of each prompt; each GRPO key set without GRPO,
preference_nll_weight with it, and best_metric val_reward_margin are refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import LoRAConfig, TrainConfig
from lmforge.data.batches import IGNORE_INDEX
from lmforge.errors import ConfigError
from lmforge.lora import apply_lora
from lmforge.preference_loss import group_advantages
from lmforge.train import Trainer
from lmforge.train.metrics import read_metrics
from test_chunked_loss import model_and_batch
from test_grpo import first_step_loss, grpo
from test_online_preference import a_pairs, judge_run, policy  # noqa: F401 (fixtures)
from test_preference import base  # noqa: F401 (fixture)


def label_logprobs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, T) log-probability of each label from the model's whole logits (float64), 0 where there is none."""
    logp = torch.log_softmax(model(x).double(), dim=-1)
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(y != IGNORE_INDEX, picked, torch.zeros_like(picked))


def padded_cat(ys: list[torch.Tensor]) -> torch.Tensor:
    width = max(y.size(1) for y in ys)
    return torch.cat([F.pad(y, (0, width - y.size(1)), value=IGNORE_INDEX) for y in ys])


@pytest.mark.parametrize("head", ["tied", "untied", "lora"])
def test_the_models_per_token_losses_are_its_logits_cross_entropies_position_by_position(tmp_path, head):
    """GPT.forward(per_token=True): each target's own cross-entropy at its own position, 0 where none is counted, with
    the logits' gradients; a LoRA-adapted head (no fused path) from its logits."""
    model, x, y = model_and_batch(tmp_path, **({} if head == "tied" else {"model.tie_embeddings": False}))
    if head == "lora":
        apply_lora(model, LoRAConfig(r=2, alpha=4, targets=["q", "head"]))
    twin = copy.deepcopy(model)
    got = model(x, targets=y, loss_chunk=5, per_token=True)
    want = F.cross_entropy(twin(x).transpose(1, 2), y, reduction="none")
    assert got.shape == y.shape and got[1, :5].abs().max() == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    (got * g).sum().backward()
    (want * g).sum().backward()
    for (name, ours), (_, theirs) in zip(model.named_parameters(), twin.named_parameters()):
        if ours.grad is not None or theirs.grad is not None:
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk", [0, 1024])
def test_the_trainers_token_logprobs_are_the_policys_at_each_sampled_token(a_pairs, policy, judge_run, tmp_path,
                                                                           chunk):
    """Trainer.token_logprobs on a GRPO batch (fused head, and the whole logits with loss_chunk 0): each label's
    log-probability (negative) at its own position, 0 on the prompt and the padding."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{"train.loss_chunk": chunk}),
                      progress=False, tensorboard=False)
    (x, y, _), _ = trainer.online.groups(trainer.raw_model, trainer.train_data.next_batch(), 4, 0, 0)
    with torch.no_grad():
        got = trainer.token_logprobs(trainer.model, (x, y))
        want = label_logprobs(trainer.raw_model, x, y)
    assert got.shape == y.shape and bool((got[y != IGNORE_INDEX] < 0).all())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss_type, scale", [("dapo", "group"), ("dr_grpo", "none")])
def test_the_evaluation_loss_is_the_formulas_on_the_val_groups(a_pairs, policy, judge_run, tmp_path, loss_type,
                                                              scale):
    """evaluate(): the loss of grpo_group_size samples of every val prompt (the evaluation's seed), summed over the
    batches and divided by their completion tokens (dapo) or completions, with the run's advantage scaling; the
    policy sampled them, so the ratio is 1 and the loss is -sum_i A_i w_i / count (grpo's is then -mean(A) = 0)."""
    from lmforge.train.trainer import VAL_SAMPLING_STEP

    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.grpo_group_size": 3, "train.grpo_loss_type": loss_type, "train.grpo_scale_rewards": scale,
        "train.eval_batches": 3}), progress=False, tensorboard=False)
    ys, advantages, other = [], [], []
    for k, batch in enumerate(trainer.val_batches):
        (_, y, _), rewards = trainer.online.groups(trainer.raw_model, batch, 3, VAL_SAMPLING_STEP, k)
        ys.append(y)
        advantages.append(group_advantages(rewards, scale == "group").flatten())
        other.append(group_advantages(rewards, scale != "group").flatten())
    y = padded_cat(ys)
    want = first_step_loss(y, torch.cat(advantages), loss_type, 5)
    assert abs(want - first_step_loss(y, torch.cat(other), loss_type, 5)) > 1e-3  # the scaling shows
    assert len(trainer.val_batches) == 3
    assert trainer.evaluate() == pytest.approx(want, abs=1e-5)


def test_the_logged_online_reward_is_the_mean_reward_of_the_steps_samples(a_pairs, policy, judge_run, tmp_path):
    """Step 1's online_reward in metrics.jsonl: the mean of the reward model's scores of the grpo_group_size (here 3)
    samples of each of the step's prompts, all of them."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.max_steps": 1, "train.grpo_group_size": 3}), progress=False, tensorboard=False)
    state = trainer.train_data.state_dict()
    _, rewards = trainer.online.groups(trainer.raw_model, trainer.train_data.next_batch(), 3, 0, 0)
    trainer.train_data.load_state_dict(state)
    assert rewards.shape == (8, 3) and float(rewards[0].mean()) != pytest.approx(float(rewards.mean()), abs=1e-4)
    trainer.fit()
    logged = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert logged[0]["online_reward"] == pytest.approx(float(rewards.mean()), abs=1e-5)


def test_the_batch_line_counts_g_samples_of_each_prompt(a_pairs, policy, judge_run, tmp_path, capsys):
    """The run's batch line: B prompts x G samples, B G sequences, and the tokens per step of those rows."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.max_steps": 1, "train.batch_size": 3, "train.grpo_group_size": 5}), progress=False, tensorboard=False)
    capsys.readouterr()
    trainer.fit()
    T = trainer.config.model.block_size
    line = f"batch: 3 prompts x 5 samples (15 sequences) x {T} tokens = {15 * T:,} tokens/step"
    assert line in capsys.readouterr().out


@pytest.mark.parametrize("key, value", [("grpo_group_size", 8), ("grpo_beta", 0.04), ("grpo_loss_type", "grpo"),
                                        ("grpo_scale_rewards", "none")])
def test_each_grpo_key_without_grpo_is_refused(key, value):
    """Any one of the grpo_* keys set with another preference loss is a ConfigError naming them."""
    with pytest.raises(ConfigError, match="grpo_group_size / grpo_beta / grpo_loss_type / grpo_scale_rewards"):
        TrainConfig(**{key: value})
    TrainConfig(preference_loss="grpo", online_reward_model="runs/rm", **{key: value})  # with GRPO: accepted


def test_a_pair_losss_nll_weight_with_grpo_is_refused():
    """preference_nll_weight (a next-token term on a pair's chosen completion) has nothing to apply to in GRPO."""
    with pytest.raises(ConfigError, match="preference_nll_weight / kto_\\*_weight belong to the pair"):
        TrainConfig(preference_loss="grpo", online_reward_model="runs/rm", preference_nll_weight=0.5)


@pytest.mark.parametrize("metric", ["val_reward_accuracy", "val_reward_margin"])
def test_a_pair_metric_as_grpos_best_metric_is_refused(a_pairs, policy, judge_run, tmp_path, metric):
    """best_metric val_reward_accuracy or val_reward_margin (a pair's rewards) is refused for GRPO, which has none."""
    with pytest.raises(ConfigError, match="use val_online_reward"):
        Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{"train.best_metric": metric}), progress=False,
                tensorboard=False)


def test_a_group_of_one_sample_is_refused():
    """grpo_group_size 1 has no group to compare a reward with (its standard deviation is not defined): refused."""
    with pytest.raises(ConfigError, match="grpo_group_size"):
        TrainConfig(preference_loss="grpo", online_reward_model="runs/rm", grpo_group_size=1)


def test_sampling_and_evaluating_run_in_eval_mode_and_leave_the_models_mode(a_pairs, policy, judge_run, tmp_path):
    """With LoRA dropout (the one dropout preference training keeps), a policy in train mode samples the groups it
    samples in eval mode, and stays in train mode; evaluate() leaves the trained model in train mode."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "lora.r": 4, "lora.targets": "q,v,mlp", "lora.dropout": 0.5}), progress=False, tensorboard=False)
    model = trainer.raw_model
    with torch.no_grad():  # adapters away from 0, so that their dropout changes the logits
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    batch = trainer.train_data.next_batch()
    model.eval()
    (x, y, _), rewards = trainer.online.groups(model, batch, 3, 0, 0)
    model.train()
    (x2, y2, _), rewards2 = trainer.online.groups(model, batch, 3, 0, 0)
    assert model.training and torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(rewards, rewards2)
    trainer.evaluate()
    assert trainer.model.training and model.training


def test_sampling_builds_no_autograd_graph(a_pairs, policy, judge_run, tmp_path):
    """OnlinePairs.sample runs under no_grad even when called with gradients on: the samples' rows and rewards carry
    no graph (a graph would hold every sampling step's activations)."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run), progress=False, tensorboard=False)
    seen = []
    hook = trainer.raw_model.blocks[0].register_forward_hook(lambda module, args, out: seen.append(
        torch.is_grad_enabled()))
    try:
        with torch.enable_grad():
            trainer.online.sample(trainer.raw_model, trainer.online.prompts(trainer.train_data.next_batch()), 2, 0, 0)
    finally:
        hook.remove()
    assert seen and not any(seen)
