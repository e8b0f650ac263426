"""Guards on online training's sampling, as the plan counts it and as the trainer and the decoder do it: the bytes of
bf16-compute's weights and cache, the dtype of the CPU's timed products, the memory warning with the KV cache,
the ids a padded vocabulary suppresses, the reward functions' names and the reward weights' checks."""

from __future__ import annotations

import math

import pytest
import torch

import lmforge.plan as plan_module
from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig
from lmforge.generate.processors import id_tensor
from lmforge.generate.rows import within_tokenizer
from lmforge.plan import matmul_flops, plan
from lmforge.tokenizer import byte_tokenizer
from lmforge.train.online import RewardFunction
from test_plan import config
from test_plan_online import GRPO, sampling_formula


# ------------------------------------------------------------------------------------------------- the plan
@pytest.mark.parametrize("precision, nbytes", [("bf16-compute", 2), ("bf16-mixed", 4), ("fp32", 4)])
def test_bf16_compute_samples_with_two_byte_weights_and_cache(precision, nbytes):
    """bf16-compute keeps the weights and the KV cache in bf16: each new token reads 2 bytes per parameter and per
    cached element; bf16-mixed's and fp32's are 4."""
    p = plan(config(**GRPO, **{"train.precision": precision}), device="h100", task="preference")
    seconds, kv = sampling_formula(p, 5, 12, 3, kv_bytes=nbytes)
    assert p.sampling_time == pytest.approx(seconds, rel=1e-9)
    assert p.sampling_memory == kv


@pytest.mark.parametrize("precision, dtype", [("bf16-compute", torch.bfloat16), ("fp32", torch.float32)])
def test_on_a_cpu_the_new_tokens_products_are_timed_in_the_compute_dtype(monkeypatch, precision, dtype):
    """The small products a new token runs are timed in the dtype the sampling computes in: bf16 with
    bf16-compute, fp32 otherwise."""
    linear_dtypes = []

    def rate(m=2048, k=2048, n=2048, dtype=torch.float32, seconds=0.3, linear=False):
        if linear:
            linear_dtypes.append(dtype)
        return 1e10

    monkeypatch.setattr(plan_module, "matmul_flops", rate)
    monkeypatch.setattr(plan_module, "copy_bandwidth", lambda: 1e10)
    plan(config(**GRPO, **{"train.precision": precision}), device="cpu", task="preference")
    assert linear_dtypes and set(linear_dtypes) == {dtype}


def test_matmul_flops_times_a_linear_layers_shapes():
    """linear=True runs F.linear of an (m, k) input and an (n, k) weight (the model's layout): with k != n it runs
    and gives a positive rate, for the (m, k) @ (k, n) product as well."""
    assert 0 < matmul_flops(3, 8, 32, seconds=0.01, linear=True) < math.inf
    assert 0 < matmul_flops(3, 8, 32, seconds=0.01) < math.inf


def test_the_memory_warning_counts_the_sampling_kv_cache(monkeypatch):
    """A deep model's sampling KV cache is larger than its checkpointed activations: a machine with room for the
    state and those activations but not the cache is told it does not fit even with checkpointing."""
    monkeypatch.setattr(plan_module, "matmul_flops", lambda *a, **k: 1e10)
    monkeypatch.setattr(plan_module, "copy_bandwidth", lambda: 1e10)
    settings = {**GRPO, "model.n_layer": 96, "train.loss_chunk": 8}
    roomy = plan(config(**settings), device="cpu", task="preference")
    assert roomy.sampling_memory > roomy.activations_checkpointed
    between = roomy.state + (roomy.activations_checkpointed + roomy.sampling_memory) / 2
    monkeypatch.setattr(plan_module, "machine_memory", lambda: between)
    tight = plan(config(**settings), device="cpu", task="preference")
    assert tight.total_memory_checkpointed > between
    assert any(n.startswith("WARNING: does not fit: ") for n in tight.notes)



def test_two_steps_per_generation_count_pi_olds_pass_and_halve_the_sampling():
    """grpo_iterations 2: pi_old's forward over the rows is counted (as soon as mu > 1) and the whole divided by 2."""
    p = plan(config(**GRPO, **{"train.grpo_iterations": 2}), device="h100", task="preference")
    assert p.sampling_time == pytest.approx(sampling_formula(p, 5, 12, 3, mu=2)[0], rel=1e-9)
    assert p.sampled_tokens_per_step == 3 * 5 * 12 // 2


def test_the_printed_plan_shows_the_sampling_figures_it_counted():
    """format_plan prints the sampling KV cache's own size and the sampling's share of the step; an offline plan prints
    neither."""
    from lmforge.plan import duration, format_plan, gib

    online = plan(config(**GRPO, **{"model.n_layer": 12}), device="h100", task="preference")
    assert gib(online.sampling_memory) != gib(online.activations)
    text = format_plan(online)
    assert f"  sampling KV cache {gib(online.sampling_memory)} (while sampling" in text
    assert f"  per step          {duration(online.step_time)} (sampling {duration(online.sampling_time)} of it)" in text
    offline = format_plan(plan(config(), device="h100", task="preference"))
    assert "(sampling" not in offline and "sampling KV cache" not in offline

# ------------------------------------------------------------------------------------------- the decoder
def test_within_tokenizer_adds_the_padded_ids_to_the_callers_suppressed_ones():
    """A padded vocabulary's extra ids join the ids the caller suppresses (all kept, sorted); a vocabulary no larger
    than the tokenizer's, or no tokenizer, leaves the config as it is."""
    tok = byte_tokenizer()
    v = tok.vocab_size
    padded = within_tokenizer(GenerateConfig(suppress_tokens=[40, 7]), v + 3, tok)
    assert list(padded.suppress_tokens) == [7, 40, v, v + 1, v + 2]
    assert list(within_tokenizer(GenerateConfig(), v + 1, tok).suppress_tokens) == [v]
    same = GenerateConfig(suppress_tokens=[7])
    assert within_tokenizer(same, v, tok) is same and within_tokenizer(same, v + 3, None) is same


def test_the_suppressed_ids_tensor_is_made_once_per_list():
    """id_tensor (the suppressed ids as a tensor, read at every step) is cached: the same list gives the same tensor
    object, holding exactly those ids."""
    cpu = torch.device("cpu")
    ids = tuple(range(259, 400))
    first = id_tensor(ids, cpu)
    assert id_tensor(ids, cpu) is first and first.tolist() == list(ids) and first.dtype == torch.long


# ------------------------------------------------------------------------------------------- the judges
def test_reward_functions_sharing_a_name_are_named_by_their_whole_spec(tmp_path):
    """Two files' functions of one NAME are both called and kept apart (named by their whole spec); distinct NAMEs
    are named alone."""
    (tmp_path / "one.py").write_text("def f(p, c, r):\n    return [1.0] * len(c)\n")
    (tmp_path / "two.py").write_text("def f(p, c, r):\n    return [2.0] * len(c)\n\n\ndef Grade(p, c, r):\n"
                                     "    return [3.0] * len(c)\n")
    one, two = f"{tmp_path}/one.py:f", f"{tmp_path}/two.py:f"
    both = RewardFunction(f"{one}, {two}")
    assert both.names == [one, two]
    rewards = both(["p", "q"], ["a", "b"], ["", ""])
    assert list(rewards) == [one, two]
    assert rewards[one].tolist() == [1.0, 1.0] and rewards[two].tolist() == [2.0, 2.0]
    assert RewardFunction(f"{one},{tmp_path}/two.py:Grade").names == ["f", "Grade"]


@pytest.mark.parametrize("weights", ["1,inf", "-inf,1", "1,1e999"])
def test_infinite_reward_weights_are_refused(weights):
    """A weight must be a finite number: inf (or an overflow to it) is refused like nan."""
    with pytest.raises(ConfigError, match="online_reward_weights .* must be comma-separated finite numbers"):
        config(**{"train.online_reward_function": "a.py:f,b.py:g", "train.online_reward_weights": weights})


@pytest.mark.parametrize("functions, model, fits", [("a.py:f", None, "2"), ("a.py:f,b.py:g", None, "1,0.5"),
                                                    ("a.py:f", "runs/rm", "1,2"), (None, "runs/rm", "0.5")])
def test_one_reward_weight_per_judge(functions, model, fits):
    """One weight per reward function, then one for the reward model: that many are taken, one more or one fewer is
    refused."""
    settings = {"train.online_reward_function": functions, "train.online_reward_model": model}
    settings = {k: v for k, v in settings.items() if v is not None}
    assert config(**settings, **{"train.online_reward_weights": fits}).train.reward_weights == \
        [float(w) for w in fits.split(",")]
    for wrong in (fits + ",1", ",".join(fits.split(",")[1:])):
        if wrong:
            with pytest.raises(ConfigError, match="online_reward_weights has .* weight"):
                config(**settings, **{"train.online_reward_weights": wrong})


def test_a_reward_model_with_a_longer_context_reads_only_the_policys_rows(tmp_path):
    """The reward model reads each sampled row (the policy's block_size tokens at most), at its own FLOPs per token
    (its attention term at its own block_size), not its whole longer context."""
    import dataclasses

    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import RunConfig
    from lmforge.model import GPT, flops_per_token
    from test_plan import T

    judge = dataclasses.replace(config().model, head="classify", num_labels=1, n_layer=2, block_size=4 * T)
    byte_tokenizer().save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "rm", 1, GPT(judge), None, RunConfig(model=judge), {"tokens_seen": 0},
                    tmp_path / "tokenizer.json")
    settings = {**GRPO, "train.online_reward_function": None, "train.online_reward_model": str(tmp_path / "rm")}
    p = plan(config(**settings), device="h100", task="preference")
    want = sampling_formula(p, 5, 12, 3, judge_fpt=flops_per_token(judge, 4 * T))[0]
    assert p.sampling_time == pytest.approx(want, rel=1e-9)
