"""Guards for GRPO with several optimizer steps per generation (train.grpo_iterations), each written against a
mutant of the code that tests/test_grpo_iterations.py let pass: the clip region's strict comparisons, the loss's fp32
contract, the config's checks and bounds, the exact JSON round trip of a generation (Rollouts), the clip fraction's
count (completion tokens of this step only, GSPO's per completion), eps_high's default, the mean reward over every
micro-batch, no pi_old with one step per generation, and the checkpoint's "rollouts": only inside a generation,
restored only by the same number of processes.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmforge.config import load_run_config
from lmforge.data.batches import IGNORE_INDEX
from lmforge.errors import ConfigError
from lmforge.files import sha256_file
from lmforge.preference_loss import grpo_clipped, grpo_token_loss
from lmforge.train import Trainer
from lmforge.train.metrics import read_metrics
from lmforge.train.online import Rollouts
from test_grpo import grpo
from test_grpo_iterations import old_and_new, steps
from test_online_preference import a_pairs, judge_run, policy  # noqa: F401 (fixtures)
from test_preference import base  # noqa: F401 (fixture)


# ------------------------------------------------------------------------------------------- the loss
def test_the_clip_region_is_strict_and_needs_a_nonzero_advantage():
    """TRL's clip region: ratio > 1 + eps_high with A > 0, ratio < 1 - eps_low with A < 0, both strict; a ratio on
    the boundary, or any ratio with A == 0 (a group whose samples all score alike), is not clipped."""
    ratio = torch.tensor([[1.25, 1.5, 0.75, 0.5, 3.0, 0.1]])
    eps = (0.25, 0.25)  # 1 +- 0.25 exactly representable: the boundary ratios equal it
    assert grpo_clipped(ratio, torch.tensor([1.0]), eps).tolist() == [[False, True, False, False, True, False]]
    assert grpo_clipped(ratio, torch.tensor([-1.0]), eps).tolist() == [[False, False, False, True, False, True]]
    assert not grpo_clipped(ratio, torch.tensor([0.0]), eps).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_old", [False, True])
def test_the_token_loss_is_fp32_whatever_the_log_probabilities_dtype(dtype, with_old):
    """The (N, T) loss is fp32 (the docstring's contract) for fp64 or bf16 log-probabilities, and equals the loss of
    the same values given as fp32."""
    new, old, mask = old_and_new()
    advantages, reference = torch.randn(new.size(0)), -torch.rand(new.shape) * 3
    logps = new.to(dtype)
    kwargs = dict(old=old if with_old else None, epsilon=(0.2, 0.28), delta=1.5)
    got = grpo_token_loss(logps, advantages, reference, 0.04, **kwargs)
    want = grpo_token_loss(logps.float(), advantages, reference, 0.04, **kwargs)
    assert got.dtype == torch.float32 and got.shape == new.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- the config
def config(**values: str):
    return load_run_config(None, {"train.preference_loss": "grpo", "train.online_reward_function": "f.py:f",
                                  **values})


def test_clip_keys_without_grpo_name_grpo(a_pairs):
    """Each clip key set with another preference loss is refused as a GRPO key (set train.preference_loss grpo),
    not as a missing grpo_iterations."""
    for key, value in (("grpo_epsilon", "0.3"), ("grpo_epsilon_high", "0.28"), ("grpo_delta", "2"),
                       ("grpo_importance_sampling", "sequence")):
        with pytest.raises(ConfigError, match="set train.preference_loss grpo") as e:
            load_run_config(None, {"data.path": str(a_pairs), f"train.{key}": value})
        assert "grpo_iterations above 1" not in str(e.value)


def test_any_epsilon_but_the_default_needs_several_steps_per_generation(a_pairs):
    """grpo_epsilon below the default 0.2 (as above it) with one step per generation is refused; the default
    itself, and a smaller epsilon with grpo_iterations 2, load."""
    data = {"data.path": str(a_pairs)}
    for value in ("0.1", "0.3"):
        with pytest.raises(ConfigError, match="set train.grpo_iterations above 1"):
            config(**data, **{"train.grpo_epsilon": value})
    assert config(**data, **{"train.grpo_epsilon": "0.2"}).train.grpo_iterations == 1
    assert config(**data, **{"train.grpo_epsilon": "0.1", "train.grpo_iterations": "2"}).train.grpo_epsilon == 0.1


def test_the_grpo_iteration_and_clip_ranges_are_bounded(a_pairs):
    """The documented ranges: grpo_iterations 1..64, grpo_epsilon_high (0, 10], grpo_delta (1, 100]: the edges
    are accepted, values past them refused naming the key."""
    data = {"data.path": str(a_pairs)}
    accepted = config(**data, **{"train.grpo_iterations": "64", "train.grpo_epsilon_high": "10",
                                 "train.grpo_delta": "100"}).train
    assert (accepted.grpo_iterations, accepted.grpo_epsilon_high, accepted.grpo_delta) == (64, 10.0, 100.0)
    for key, value in (("grpo_iterations", "65"), ("grpo_epsilon_high", "10.5"), ("grpo_epsilon_high", "0"),
                       ("grpo_delta", "101"), ("grpo_epsilon", "0")):
        with pytest.raises(ConfigError, match=key):
            config(**data, **{"train.grpo_iterations": "2", f"train.{key}": value})


# ------------------------------------------------------------------------------------------- Rollouts
def test_a_generation_round_trips_through_json_exactly():
    """Rollouts.state_dict through JSON (as a checkpoint's state.json keeps it) and from_state give back every
    micro-batch (not only the first), each tensor with its dtype and exact values, the exact mean reward and each
    judge's part."""
    torch.manual_seed(3)
    batches = []
    for _ in range(3):
        y = torch.randint(0, 50, (4, 5))
        y[:, -2:] = IGNORE_INDEX
        batches.append((torch.randint(0, 50, (4, 6)), y, torch.randn(4), -torch.rand(4, 5) * 3))
    rollouts = Rollouts(batches, 0.123456789012345, {"judge": 0.3141592653589793, "length": -1.0 / 3})
    back = Rollouts.from_state(json.loads(json.dumps(rollouts.state_dict())))
    assert len(back.batches) == 3
    for got, want in zip(back.batches, batches, strict=True):
        assert [t.dtype for t in got] == [torch.long, torch.long, torch.float32, torch.float32]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert back.reward == rollouts.reward and back.parts == rollouts.parts


# ------------------------------------------------------------------------------------------- the trainer
def expected_clip(trainer: Trainer, eps: tuple[float, float], sequence: bool) -> tuple[list[float], float]:
    """([clipped completion tokens, completion tokens], dapo loss) of the trainer's kept generation under its policy
    now, by TRL's formulas written out: the ratio per token, or per completion (GSPO: exp of the mean log-ratio)."""
    clipped = total = loss = 0.0
    for x, y, advantages, old in trainer.rollouts.batches:
        mask = y != IGNORE_INDEX
        with torch.no_grad():
            log_ratio = trainer.token_logprobs(trainer.raw_model, (x, y)).float() - old
        if sequence:
            log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        ratio, a = torch.exp(log_ratio), advantages[:, None]
        hit = (((ratio > 1 + eps[1]) & (a > 0)) | ((ratio < 1 - eps[0]) & (a < 0))).expand_as(mask) & mask
        token = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps[0], 1 + eps[1]) * a).expand_as(mask)
        clipped, total, loss = clipped + float(hit.sum()), total + float(mask.sum()), loss + float((token * mask).sum())
    return [clipped, total], loss / total


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_the_clip_fraction_counts_this_steps_clipped_completion_tokens(a_pairs, policy, judge_run, tmp_path, level):
    """Step 2 of a generation (grpo_epsilon alone: eps_high = eps_low): trainer.clipped is [clipped completion
    tokens, completion tokens] of this step only (GSPO: every token of a clipped completion), the log's clip_fraction
    their quotient, and the loss the clipped formula with (eps, eps), not with another eps_high."""
    eps = 0.02
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.grpo_iterations": 2, "train.grpo_epsilon": eps, "train.grpo_importance_sampling": level,
        "train.grad_accum": 2, "train.batch_size": 3, "optim.lr": 2e-2, "train.max_steps": 2,
        "train.log_interval": 1}), progress=False, tensorboard=False)
    trainer.begin()
    try:
        trainer.advance()
        count, loss = expected_clip(trainer, (eps, eps), level == "sequence")
        other_high = expected_clip(trainer, (eps, 0.2), level == "sequence")[1]
        other_level = expected_clip(trainer, (eps, eps), level != "sequence")[0]
        trainer.advance()
    finally:
        trainer.logger.close(False)
    total = sum(float((y != IGNORE_INDEX).sum()) for _, y, *_ in trainer.rollouts.batches)
    assert trainer.clipped == count and count[1] == total and 0 < count[0] < total
    assert other_level[0] != count[0]  # the other level's ratio would count other tokens here
    assert trainer.history[1][1] == pytest.approx(loss, abs=1e-5)
    assert abs(other_high - loss) > 1e-4  # eps_high 0.2 would give another loss here
    logged = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert logged[1]["clip_fraction"] == pytest.approx(count[0] / count[1], abs=1e-12)


def test_the_logged_reward_is_the_mean_over_every_micro_batch(a_pairs, policy, judge_run, tmp_path):
    """With grad_accum 2 the generation's reward (the log's online_reward, kept for every step of the generation)
    is the mean over all samples of both micro-batches, not the last one's."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.grpo_iterations": 2, "train.grad_accum": 2, "train.batch_size": 3, "train.max_steps": 2}),
        progress=False, tensorboard=False)
    rewards, sample = [], trainer.sample_groups

    def spy(*args, **kwargs):
        out = sample(*args, **kwargs)
        rewards.append(out[1])
        return out

    trainer.sample_groups = spy
    steps(trainer, 2)
    assert len(rewards) == 2  # sampled once, at step 1
    want = float(torch.cat([r.flatten() for r in rewards]).mean())
    assert trainer.online_reward == pytest.approx(want, abs=1e-7) and trainer.rollouts.reward == trainer.online_reward
    assert abs(float(rewards[-1].mean()) - want) > 1e-6  # the micro-batches' rewards differ


def test_one_step_per_generation_computes_no_sampling_log_probabilities(a_pairs, policy, judge_run, tmp_path):
    """grpo_iterations 1: the ratio is 1 by construction, so no pi_old is computed (one policy pass per micro-batch,
    batches of (x, y, advantages)) and nothing is counted for a clip fraction."""
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{"train.grad_accum": 2,
                                                                            "train.max_steps": 1}),
                      progress=False, tensorboard=False)
    calls, logprobs = [], trainer.token_logprobs

    def spy(*args, **kwargs):
        calls.append(1)
        return logprobs(*args, **kwargs)

    trainer.token_logprobs = spy
    steps(trainer, 1)
    assert [len(batch) for batch in trainer.rollouts.batches] == [3, 3]
    assert len(calls) == 2 and trainer.clipped == [0.0, 0.0]


def state_of(ckpt) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def test_a_checkpoint_keeps_the_generation_only_inside_it(a_pairs, policy, judge_run, tmp_path):
    """grpo_iterations 2, a checkpoint every step: step 2 ends a generation, so its state holds no "rollouts" and a
    run resumed from it samples anew; step 3's holds the generation of steps 3 and 4 exactly as the trainer has it."""
    settings = {"train.grpo_iterations": 2, "train.grpo_epsilon": 0.05, "train.max_steps": 3, "train.save_interval": 1,
                "train.keep_last": 3}
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **settings), progress=False,
                      tensorboard=False)
    trainer.fit()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert "rollouts" not in state_of(checkpoints / "step-00000002")["ranks"][0]
    saved = Rollouts.from_state(state_of(checkpoints / "step-00000003")["ranks"][0]["rollouts"])
    assert saved.reward == trainer.rollouts.reward and len(saved.batches) == len(trainer.rollouts.batches)
    for got, want in zip(saved.batches, trainer.rollouts.batches, strict=True):
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    resumed = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        **settings, "train.resume": str(checkpoints / "step-00000002")}), progress=False, tensorboard=False)
    resumed.restore()
    assert resumed.step == 2 and resumed.rollouts is None


def test_another_process_count_does_not_restore_a_generation(a_pairs, policy, judge_run, tmp_path):
    """A checkpoint inside a generation written by 2 processes (state with 2 ranks), resumed by 1: each process's
    samples belong to its own prompts, so the generation is not restored (the run samples anew); the same checkpoint
    with 1 rank restores it."""
    settings = {"train.grpo_iterations": 2, "train.grpo_epsilon": 0.05, "train.max_steps": 3, "train.save_interval": 3}
    Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **settings), progress=False, tensorboard=False).fit()
    one = tmp_path / "run" / "checkpoints" / "step-00000003"
    two = tmp_path / "two" / "step-00000003"
    shutil.copytree(one, two)
    state = state_of(two)
    assert state["ranks"][0].get("rollouts") is not None
    state["ranks"] = [state["ranks"][0], json.loads(json.dumps(state["ranks"][0]))]
    (two / "state.json").write_text(json.dumps(state))
    manifest = json.loads((two / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"sha256": sha256_file(two / "state.json"),
                                       "bytes": (two / "state.json").stat().st_size}
    (two / "manifest.json").write_text(json.dumps(manifest))
    for ckpt, kept in ((one, True), (two, False)):
        resumed = Trainer(grpo(tmp_path / f"resumed-{kept}", a_pairs, policy, judge_run, **{
            **settings, "train.resume": str(ckpt)}), progress=False, tensorboard=False)
        resumed.restore()
        assert resumed.step == 3 and (resumed.rollouts is not None) == kept
