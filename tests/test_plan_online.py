"""`lmforge plan` of online training (online DPO, GRPO): the sampling and scoring counted in the step time and the
KV cache in the memory, by the formula the plan's docstring gives, written out here; GRPO on sft data counts its G
rows. How close the estimate comes to a real GRPO step: benchmarks/grpo_step.py (its "plan" key)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import RunConfig
from lmforge.model import GPT, flops_per_token
from lmforge.plan import format_plan, plan
from lmforge.tokenizer import byte_tokenizer
from test_plan import C, L, T, config

ONLINE = {"train.online_reward_function": "rewards.py:f", "train.online_max_new_tokens": 12, "train.batch_size": 3}
GRPO = {**ONLINE, "train.preference_loss": "grpo", "train.grpo_group_size": 5}


def sampling_formula(p, n: int, new: int, batch: int, accum: int = 1, mu: int = 1, judge_fpt: float = 0.0,
                     kv_bytes: int = 4) -> tuple[float, float]:
    """(seconds per step, KV cache bytes) of sampling n completions of `batch` prompts, `new` tokens each, on the
    plan's device: forward FLOPs over the rows (twice with pi_old), a judge's, at peak x MFU; each new token reads the
    weights and the cache so far at the bandwidth; divided by mu."""
    rows, kv_per_token = batch * n, 2 * L * 4 * (C // 4) * kv_bytes
    flop = rows * T * (p.flops_per_token / 3 * (2 if mu > 1 else 1) + judge_fpt / 3)
    reads = new * p.parameters * kv_bytes + rows * kv_per_token * new * (T - new + new / 2)
    return accum * (flop / (p.peak_flops * p.mfu) + reads / p.bandwidth) / mu, rows * T * kv_per_token


@pytest.mark.parametrize("loss, n", [("dpo", 2), ("grpo", 5)])
def test_the_sampling_is_counted_in_the_step(loss, n):
    """Online DPO samples 2 completions of each prompt, GRPO G: the plan's sampling time is the formula's, it is part
    of the step time (the step without it is the offline step's), and the KV cache is the rows' full context."""
    settings = GRPO if loss == "grpo" else ONLINE
    online = plan(config(**settings, **{"train.grad_accum": 2, "train.init_from": "runs/a"}), device="h100",
                  task="preference")
    seconds, kv = sampling_formula(online, n, 12, 3, accum=2)
    assert online.sampling_time == pytest.approx(seconds, rel=1e-9) and online.sampling_time > 0
    assert online.sampling_memory == kv and online.sampled_tokens_per_step == 2 * 3 * n * 12
    offline = plan(config(**{k: v for k, v in ONLINE.items() if "online" not in k},  # DPO on the data's pairs
                          **{"train.grad_accum": 2, "train.init_from": "runs/a"}), device="h100", task="preference")
    assert offline.sampling_time == 0 and offline.sampling_memory == 0
    if loss == "dpo":  # the same training work: only the sampling differs
        assert online.step_time == pytest.approx(offline.step_time + seconds, rel=1e-9)
    text = format_plan(online)
    assert f"(sampling {text.split('(sampling ')[1].split(' of it)')[0]} of it)" in text
    assert "sampling KV cache" in text and "sampling KV cache" not in format_plan(offline)
    assert any("reward function's own time is not counted" in note for note in online.notes)


def test_several_steps_per_generation_divide_the_sampling():
    """grpo_iterations mu: one generation (and pi_old's pass over its rows) serves mu steps."""
    one = plan(config(**GRPO), device="h100", task="preference")
    four = plan(config(**GRPO, **{"train.grpo_iterations": 4}), device="h100", task="preference")
    assert four.sampling_time == pytest.approx(sampling_formula(four, 5, 12, 3, mu=4)[0], rel=1e-9)
    assert four.sampling_time < one.sampling_time / 2 and four.sampled_tokens_per_step == 3 * 5 * 12 // 4
    assert any("counted (every 4 steps)" in note for note in four.notes)


def test_a_reward_models_forward_is_counted_when_its_run_can_be_read(tmp_path):
    """A reward model's run: its forward over the rows (its own FLOPs per token) is added; a path that is not a run
    yet plans anyway, saying its forward is not counted."""
    judge = dataclasses.replace(config().model, head="classify", num_labels=1, n_layer=2)
    byte_tokenizer().save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "rm", 1, GPT(judge), None, RunConfig(model=judge), {"tokens_seen": 0},
                    tmp_path / "tokenizer.json")
    settings = {**GRPO, "train.online_reward_function": None}
    scored = plan(config(**settings, **{"train.online_reward_model": str(tmp_path / "rm")}), device="h100",
                  task="preference")
    want = sampling_formula(scored, 5, 12, 3, judge_fpt=flops_per_token(judge, judge.block_size))[0]
    assert scored.sampling_time == pytest.approx(want, rel=1e-9)
    assert any("the reward model's forward counted" in note for note in scored.notes)
    unread = plan(config(**settings, **{"train.online_reward_model": str(tmp_path / "none")}), device="h100",
                  task="preference")
    assert unread.sampling_time == pytest.approx(sampling_formula(unread, 5, 12, 3)[0], rel=1e-9)
    assert any("could not be read: its forward is not counted" in note for note in unread.notes)


def test_the_kv_cache_and_the_activations_are_not_counted_together():
    """The peak holds the state and the larger of the activations and the sampling KV cache: with activation
    checkpointing (one tensor per layer kept) a deep model's cache (two per layer) is the larger."""
    small = plan(config(**GRPO), device="h100", task="preference")
    assert small.total_memory == pytest.approx(small.state + small.activations)
    wide = plan(config(**{**GRPO, "model.n_layer": 96, "train.loss_chunk": 8}), device="h100", task="preference")
    assert wide.sampling_memory > wide.activations_checkpointed
    assert wide.total_memory_checkpointed == pytest.approx(wide.state + wide.sampling_memory)


def test_grpo_on_sft_data_counts_its_group():
    """GRPO trains on sft data's prompts too: a batch of B prompts is B x G rows there as well, sampled."""
    sft = plan(config(**GRPO), device="h100", task="sft")
    pairs = plan(config(**GRPO), device="h100", task="preference")
    assert sft.tokens_per_step == pairs.tokens_per_step == 3 * 5 * T and sft.group_size == 5
    assert sft.sampling_time == pytest.approx(pairs.sampling_time) and sft.sampling_time > 0


def test_on_a_cpu_the_new_tokens_run_at_the_measured_small_batch_rates(monkeypatch):
    """On a CPU a new token's products have a few rows (far below the peak): the plan times F.linear of rows x n_embd
    by 4 n_embd (the blocks) and by the vocabulary (the head) here and charges each new token's FLOPs at those rates;
    the prompts' pass runs at the peak x MFU. Rates fixed here to check the formula."""
    import lmforge.plan as plan_module

    calls = []

    def rate(m=2048, k=2048, n=2048, dtype=torch.float32, seconds=0.3, linear=False):
        calls.append((m, k, n, linear))
        return {4 * C: 2e9, 100: 5e8}.get(n, 4e10) if linear else 4e10

    monkeypatch.setattr(plan_module, "matmul_flops", rate)
    monkeypatch.setattr(plan_module, "copy_bandwidth", lambda: 1e10)
    p = plan(config(**GRPO), device="cpu", task="preference")
    rows, new, forward, head = 15, 12, p.flops_per_token / 3, 2 * 100 * C
    kv_per_token = 2 * L * C * 4
    want = (rows * (T - new) * forward / (4e10 * p.mfu) + rows * new * ((forward - head) / 2e9 + head / 5e8)
            + rows * kv_per_token * new * (T - new + new / 2) / 1e10)
    assert p.sampling_time == pytest.approx(want, rel=1e-9)
    assert (rows, C, 4 * C, True) in calls and (rows, C, 100, True) in calls


def test_the_plan_of_a_run_from_a_checkpoint_is_the_checkpoints_model(tmp_path):
    """train.init_from: `lmforge train` trains the checkpoint's model, so the plan counts it (its parameters, its
    context), not the config's model section; a checkpoint that cannot be read yet plans the config's model, saying
    so."""
    small = dataclasses.replace(config().model, n_layer=1, n_embd=16, n_head=2, n_kv_head=2, block_size=16)
    byte_tokenizer().save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "sft", 1, GPT(small), None, RunConfig(model=small), {"tokens_seen": 0},
                    tmp_path / "tokenizer.json")
    from lmforge.model import count_parameters

    planned = plan(config(**GRPO, **{"train.init_from": str(tmp_path / "sft")}), device="h100", task="preference")
    assert planned.parameters == count_parameters(small).total != plan(config(**GRPO), device="h100").parameters
    assert planned.tokens_per_step == 3 * 5 * 16 and any("the model of train.init_from" in n for n in planned.notes)
    unread = plan(config(**GRPO, **{"train.init_from": str(tmp_path / "none")}), device="h100", task="preference")
    assert unread.parameters == plan(config(**GRPO), device="h100", task="preference").parameters
    assert any("could not be read: planned with the config's model section" in n for n in unread.notes)
