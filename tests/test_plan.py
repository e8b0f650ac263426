"""`lmforge plan`: the numbers of a known config equal a hand calculation; bad input is one line, exit 2.

How close the predictions come to real runs (peak RSS within 20%, step time within 30%) is measured by
benchmarks/plan_accuracy.py on real configs; here the arithmetic is checked, term by term.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import load_run_config
from lmforge.plan import GPUS, MFU, plan

V, T, L, C, B = 100, 32, 3, 48, 5  # vocab, context, layers, width, batch


def config(**overrides):
    values = {"model.vocab_size": V, "model.block_size": T, "model.n_layer": L, "model.n_head": 4, "model.n_embd": C,
              "train.batch_size": B, "train.max_steps": 7, **overrides}
    return load_run_config(None, {k: str(v) for k, v in values.items()})


def hand_parameters() -> tuple[int, int]:
    """GPT-2 layout, biases, learned positions, tied head: (total, non-embedding)."""
    block = (2 * C) + (C * 3 * C + 3 * C) + (C * C + C) + (2 * C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    non_embedding = L * block + 2 * C  # + the final LayerNorm
    return non_embedding + V * C + T * C, non_embedding


def test_parameters_flops_and_tokens_equal_the_hand_calculation():
    p = plan(config(), device="h100")
    total, non_embedding = hand_parameters()
    assert (p.parameters, p.non_embedding_parameters) == (total, non_embedding)
    fpt = 6 * (non_embedding + V * C) + 12 * L * C * T  # 6N (the tied head's matrix counts) + attention
    assert p.flops_per_token == fpt
    assert p.tokens_per_step == B * T and p.steps == 7 and p.tokens == 7 * B * T
    assert p.total_flops == fpt * 7 * B * T
    assert p.compute_optimal_tokens == 20 * total
    by_tokens = plan(config(), tokens=10_000, device="h100")
    assert by_tokens.tokens == 10_000 and by_tokens.steps == -(-10_000 // (B * T))


def test_memory_equals_the_hand_calculation():
    P = hand_parameters()[0]
    p = plan(config(), device="h100")
    assert (p.weights, p.gradients, p.optimizer) == (4 * P, 4 * P, 8 * P)  # fp32 weights, grads, AdamW's 2 moments
    per_token_block = 4 * C + 3 * C + 2 * C + 2 * 4 * C  # inputs, norms, qkv, attention out x2, fc and gelu outputs
    # the head fused with its loss (train.loss_chunk): norm_f's input and output and the hidden states' gradient per
    # token, and one chunk's logits (1024 tokens at most, here the whole micro-batch of B x T)
    head = B * T * 4 * 3 * C + min(1024, B * T) * V * 4
    assert p.activations == B * T * 4 * (L + 1) * per_token_block + head
    assert p.activations_checkpointed == B * T * 4 * (L * C + 2 * per_token_block) + head
    assert p.total_memory == 16 * P + p.activations
    chunked = plan(config(**{"train.loss_chunk": 16}), device="h100")
    assert chunked.activations == p.activations - (B * T - 16) * V * 4  # a smaller chunk: fewer logits at once
    whole = plan(config(**{"train.loss_chunk": 0}), device="h100")  # the logits, their log-softmax, both gradients
    per_token_head = 2 * C + 4 * V
    assert whole.activations == B * T * 4 * ((L + 1) * per_token_block + per_token_head)
    assert whole.activations_checkpointed == B * T * 4 * (L * C + 2 * per_token_block + per_token_head)
    bf16 = plan(config(**{"train.precision": "bf16-mixed"}), device="h100")
    assert bf16.weights == 6 * P and bf16.gradients == 4 * P and bf16.optimizer == 8 * P
    ddp = plan(config(), device="h100", gpus=4)
    assert ddp.gradients == 8 * P and ddp.weights == 4 * P and ddp.tokens_per_step == 4 * B * T
    fsdp = plan(config(), device="h100", gpus=4, parallel="fsdp")
    block = (hand_parameters()[1] - 2 * C) // L  # FSDP gathers a whole block, and prefetches the next
    assert fsdp.optimizer == 2 * P and fsdp.weights == P + 2 * 4 * block and fsdp.gradients == P + 2 * 4 * block


def test_speedrun_options_change_the_counts_where_they_add_tensors():
    base = plan(config(), device="h100")
    qk = plan(config(**{"model.qk_norm": True}), device="h100")
    assert qk.parameters - base.parameters == L * 2 * (C // 4)  # a gain per head dimension for q and for k
    assert qk.activations - base.activations == B * T * 4 * (L + 1) * 2 * C  # normalised q and k, each C wide
    capped = plan(config(**{"model.logit_softcap": 30.0}), device="h100")
    assert capped.activations - base.activations == B * T * 4 * V  # one chunk's tanh (the chunk: all B x T tokens)
    unfused = {"train.loss_chunk": 0}
    capped_whole = plan(config(**{"model.logit_softcap": 30.0, **unfused}), device="h100")
    assert capped_whole.activations - plan(config(**unfused), device="h100").activations == B * T * 4 * V
    relu2 = plan(config(**{"model.mlp": "relu2"}), device="h100")
    assert (relu2.parameters, relu2.flops_per_token, relu2.activations) == (
        base.parameters, base.flops_per_token, base.activations)  # relu and its square replace fc out and gelu


def test_time_is_flops_over_the_stated_peak_and_mfu_plus_memory_traffic():
    p = plan(config(), device="h100")
    h100 = GPUS["h100"]
    compute = p.flops_per_token * B * T / (h100.peak_fp32 * MFU["gpu"])
    memory = (32 * p.parameters + 4 * p.activations) / h100.bandwidth
    assert p.mfu == 0.4 and p.peak_flops == h100.peak_fp32
    assert p.step_time == pytest.approx(compute + memory, rel=1e-12)
    assert p.total_time == pytest.approx(7 * p.step_time, rel=1e-12)
    faster = plan(config(**{"train.precision": "bf16-mixed"}), device="h100", peak_tflops=2 * 989.4, mfu=0.5)
    assert faster.peak_flops == 2 * 989.4e12 and faster.mfu == 0.5


def test_cpu_plan_measures_this_machine(capsys):
    assert main(["plan", "--preset", "tiny", "--model.vocab_size", "64", "--measure", "--measure-steps", "2",
                 "--train.num_threads", "1"]) == 0
    out = capsys.readouterr().out
    peak = float(re.search(r"peak +([\d.]+) TFLOP/s, MFU assumed 85%", out)[1])
    assert 1e-4 < peak < 100  # a measured matrix product, in TFLOP/s
    # MiB or GiB: in a test process that imported much else, the resident size may pass 1 GiB
    measured = re.search(r"peak memory +([\d.,]+) (MiB|GiB) resident, predicted ([\d.,]+) (MiB|GiB)", out)
    assert measured, out

    def mib(number: str, unit: str) -> float:
        return float(number.replace(",", "")) * (1024 if unit == "GiB" else 1)

    assert 0.5 < mib(measured[1], measured[2]) / mib(measured[3], measured[4]) < 2
    assert float(re.search(r"step time +([\d.]+) s, predicted", out)[1]) > 0
    assert re.search(r"note: peak measured here: a 2048\^3 fp32 matrix product, [\d.]+ GFLOP/s with 1 torch thread; "
                     r"memory bandwidth measured here \(a copy\) [\d.]+ GB/s", out), out


def test_a_cpu_plan_measures_with_the_runs_threads_and_puts_them_back():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one = plan(config(**{"train.num_threads": 1}), device="cpu")
        assert one.device_name == "this CPU (1 torch thread)" and torch.get_num_threads() == 2
        assert plan(config(), device="cpu").device_name == "this CPU (2 torch threads)"  # 0: torch's own
    finally:
        torch.set_num_threads(before)


def test_a_cpu_bf16_plan_times_element_wise_passes_at_fp32s_bytes():
    """bf16's element-wise kernels on a CPU go at fp32's pace per element: their passes count 4 bytes an element
    (the activations, 3 on average); on a GPU they count the bytes they move."""
    for device, factor in (("cpu", 4 / 3), ("h100", 1.0)):
        p = plan(config(**{"train.precision": "bf16-mixed"}), device=device, peak_tflops=100.0)
        compute = p.step_flops_per_token * p.tokens_per_step / (p.peak_flops * p.mfu)
        memory = (32 * p.trained_parameters + 4 * p.activations * factor) / p.bandwidth
        assert p.step_time == pytest.approx(compute + memory, rel=1e-9)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_a_cpu_plan_with_a_given_peak_says_it_was_given_not_measured(precision):
    p = plan(config(**{"train.precision": precision}), device="cpu", peak_tflops=0.25)
    assert p.peak_flops == 0.25e12
    source = [n for n in p.notes if "peak" in n]
    assert len(source) == 1 and "measured here: a 2048^3" not in source[0]
    assert re.fullmatch(r"peak given: 0\.25 TFLOP/s \(--peak-tflops\); memory bandwidth measured here \(a copy\) "
                        r"[\d.]+ GB/s", source[0]), source[0]


def test_a_model_too_large_for_the_device_is_warned_about(capsys):
    assert main(["plan", "--preset", "llama-small", "--model.n_layer", "32", "--model.n_embd", "4096",
                 "--model.n_head", "32", "--model.vocab_size", "32000", "--device", "h100"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: does not fit: " in out and "of the NVIDIA H100 SXM 80GB's memory" in out
    assert main(["plan", "--preset", "char-small", "--device", "h100"]) == 0
    assert "WARNING" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--device", "tpu"], "--device 'tpu' is unknown: choose one of cpu, h100, h200, a100"),
    (["--preset", "tiny", "--model.n_embd", "30", "--model.n_head", "4"], "model.n_embd=30 is invalid"),
    (["--preset", "tiny", "--tokens", "0"], "--tokens 0 is invalid"),
    (["--preset", "tiny", "--device", "h100", "--gpus", "0"], "--gpus 0 is invalid"),
    (["--preset", "tiny", "--device", "h100", "--measure"], "--measure runs steps on this machine's CPU"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "tiny", "--task", "pairs"], "--task 'pairs' is unknown"),
    (["--preset", "tiny", "--device", "h100", "--gpus", "2", "--parallel", "fsdp", "--lora.r", "4",
      "--train.init_from", "base"], "plan it with --parallel ddp"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err


def test_the_readmes_ddp_fsdp_table_is_the_plan_of_today_and_equals_a_hand_count():
    """benchmarks/plan_accuracy.py's per-GPU table (README, "Why training takes so much compute"): its stored
    numbers are what lmforge.plan computes now (rerun `--parallel-only` after changing the formulas), and the 1B
    model's parameters and per-GPU state equal a count by hand from its shape."""
    import json
    from pathlib import Path

    import plan_accuracy  # benchmarks/plan_accuracy.py

    stored = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" /
                         "plan_accuracy-cpu.json").read_text(encoding="utf-8"))["parallel"]
    assert stored == plan_accuracy.parallel_table(), "rerun benchmarks/plan_accuracy.py --parallel-only --json-out ..."
    C, L, V, H, kv = 2048, 16, 128256, 8192, 8 * 64  # Llama 3.2 1B: 8 key/value heads of 64
    block = C * C + 2 * C * kv + C * C + 3 * C * H + 2 * C  # q, k and v, o, SwiGLU's three matrices, two RMSNorms
    P = V * C + L * block + C  # tied embedding, the blocks, the final norm
    llama = stored["models"]["llama-1b"]
    assert llama["parameters"] == P == 1_235_814_400  # Meta's published count
    gib = lambda n: round(n / 2 ** 30, 2)  # noqa: E731
    bf16 = llama["bf16-mixed"]  # fp32 weights + a bf16 copy (6 B), fp32 gradients (4 B), AdamW's moments (8 B)
    assert bf16["1"]["state"] == gib(18 * P)
    assert bf16["ddp-8"]["state"] == gib(22 * P)  # + DDP's fp32 gradient buckets
    gathered = 2 * block * 6  # FSDP: the block being computed and the prefetched next one, whole, in weights and grads
    assert bf16["fsdp-8"]["state"] == gib(18 * P / 8 + 2 * gathered)
    assert bf16["fsdp-2"]["state"] == gib(18 * P / 2 + 2 * gathered)
    assert llama["fp32"]["fsdp-8"]["state"] == gib(16 * P / 8 + 2 * 2 * block * 4)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_time_on_several_gpus_splits_the_tokens_and_fsdp_splits_the_optimizer_pass(parallel):
    """K GPUs: each computes 1/K of a step's tokens; AdamW's pass over its state (16 B read + 16 B written per
    parameter) is the whole model on each DDP replica but 1/K of it on each FSDP shard."""
    K = 8
    p = plan(config(), device="h100", gpus=K, parallel=parallel)
    h100 = GPUS["h100"]
    assert p.tokens_per_step == B * T * K
    compute = p.flops_per_token * B * T * K / K / (h100.peak_fp32 * MFU["gpu"])
    optimizer_pass = 32 * p.parameters / (K if parallel == "fsdp" else 1)
    memory = (optimizer_pass + 4 * p.activations) / h100.bandwidth
    assert p.step_time == pytest.approx(compute + memory, rel=1e-12)


# ------------------------------------------------------------------------------------------ fine-tuning
R = 4


def test_lora_trains_and_stores_only_the_adapters_and_skips_the_frozen_weight_gradients():
    """LoRA r=4 on q and v (the default targets): A (r x C) and B (C x r) per slice, two slices a layer. The frozen
    base's weights stay; gradients and AdamW state are the adapters'; each adapter keeps its r-wide A output per
    token; a step computes the forward (2N) and the input gradients (2N) of the frozen matrices, not their weight
    gradients, plus the adapters' 6 FLOPs per parameter."""
    P, _ = hand_parameters()
    full = plan(config(), device="h100")
    p = plan(config(**{"lora.r": R, "train.init_from": "base"}), device="h100")
    adapters = L * 2 * (R * C + C * R)
    assert p.parameters == P and p.trained_parameters == adapters
    assert (p.weights, p.gradients, p.optimizer) == (4 * P + 4 * adapters, 4 * adapters, 8 * adapters)
    assert p.activations == full.activations + B * T * 4 * (L + 1) * (2 * R)  # two adapters' outputs a layer
    attention = 12 * L * C * T
    N = (full.flops_per_token - attention) // 6
    assert p.flops_per_token == full.flops_per_token
    assert p.step_flops_per_token == 4 * N + 6 * adapters + attention
    assert p.total_flops == p.step_flops_per_token * p.tokens and p.reference == 0 and not p.reference_forward
    ddp = plan(config(**{"lora.r": R, "train.init_from": "base"}), device="h100", gpus=4)
    assert ddp.gradients == 8 * adapters  # DDP's buckets hold the adapters' gradients only


def test_an_embedding_adapter_counts_its_table_sized_A_and_its_output():
    """lora.targets emb: A (r x V) and B (C x r) trained; its r-wide lookup kept per token like a Linear adapter's."""
    settings = {"lora.r": R, "train.init_from": "base"}
    linear = plan(config(**settings), device="h100")
    with_table = plan(config(**settings, **{"lora.targets": "q,v,emb"}), device="h100")
    V = config().model.vocab_size
    assert with_table.trained_parameters - linear.trained_parameters == R * V + C * R
    assert with_table.optimizer - linear.optimizer == 8 * (R * V + C * R)
    per_adapter = (linear.activations - plan(config(), device="h100").activations) / (2 * L)  # q and v per layer
    assert with_table.activations - linear.activations == pytest.approx(per_adapter)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "orpo"])
def test_preference_pairs_double_the_sequences_and_dpo_keeps_and_runs_a_reference(loss):
    """A batch of B pairs is 2B sequences: the activations of a 2B batch, twice the tokens a step. DPO-style losses
    keep a frozen fp32 copy of the model (4 B a parameter; split over FSDP's processes) and run its forward on every
    sequence (2N + a third of the attention FLOPs); ORPO keeps and runs nothing more."""
    P, _ = hand_parameters()
    settings = {"train.preference_loss": loss}
    p = plan(config(**settings), device="h100", task="preference")
    doubled = plan(config(**{"train.batch_size": 2 * B}), device="h100")
    assert p.tokens_per_step == 2 * B * T and p.activations == doubled.activations
    attention = 12 * L * C * T
    N = (p.flops_per_token - attention) // 6
    if loss == "orpo":
        assert p.reference == 0 and p.step_flops_per_token == p.flops_per_token and not p.reference_forward
    else:
        assert p.reference == 4 * P and p.reference_forward
        assert p.step_flops_per_token == p.flops_per_token + 2 * N + attention // 3
        assert p.total_memory == 16 * P + 4 * P + p.activations
        fsdp = plan(config(**settings), device="h100", gpus=4, parallel="fsdp", task="preference")
        assert fsdp.reference == 4 * P / 4
        lora = plan(config(**settings, **{"lora.r": R, "train.init_from": "base"}), device="h100", task="preference")
        assert lora.reference == 0 and lora.reference_forward  # the adapters turn off: no copy, but its forward
        assert lora.step_flops_per_token == 4 * N + 6 * lora.trained_parameters + attention + 2 * N + attention // 3


def test_plan_reads_the_task_from_the_datas_manifest_and_says_what_it_counted(tmp_path, capsys):
    import json

    (tmp_path / "manifest.json").write_text(json.dumps({"task": "preference"}))
    assert main(["plan", "--preset", "tiny", "--model.vocab_size", "64", "--device", "h100", "--data.path",
                 str(tmp_path), "--json"]) == 0
    from_manifest = json.loads(capsys.readouterr().out)
    assert from_manifest["task"] == "preference" and from_manifest["reference"] > 0
    assert main(["plan", "--preset", "tiny", "--model.vocab_size", "64", "--device", "h100", "--task", "preference",
                 "--lora.r", "4", "--train.init_from", "base"]) == 0
    out = capsys.readouterr().out
    assert "trained (LoRA)" in out and "the reference's forward on every sequence" in out
    assert "preference pairs: 2 sequences each" in out and "frozen reference" not in out
    (tmp_path / "manifest.json").write_text("{not json")
    assert main(["plan", "--preset", "tiny", "--data.path", str(tmp_path)]) == 2
    assert "is not a readable manifest" in capsys.readouterr().err


@pytest.fixture
def built(monkeypatch) -> list:
    """Every Trainer built while the test runs, in order (measure() builds its own and keeps none)."""
    import lmforge.train.trainer as trainer_module

    trainers = []
    real = trainer_module.Trainer.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        trainers.append(self)

    monkeypatch.setattr(trainer_module.Trainer, "__init__", spy)
    return trainers


@pytest.mark.parametrize("settings", [{"train.preference_loss": "dpo"}, {"lora.r": 4, "train.init_from": "base"}])
def test_measure_trains_random_preference_pairs_and_lora_from_a_random_base(settings, built):
    """--measure of preference data and of LoRA: real Trainer steps on random pairs (2 sequences each, the frozen
    reference built and run) and on adapters over a random base saved for the purpose, in a temporary directory."""
    from lmforge.plan import measure

    task = "preference" if "train.preference_loss" in settings else "tokens"
    cfg = config(**{"train.num_threads": 1, **settings})
    measured = measure(cfg, steps=1, task=task)
    assert measured["peak_rss"] > measured["runtime_rss"] > 0 and measured["step_time"] > 0
    trainer = built[-1]
    assert trainer.step == 2 and trainer.tokens_seen == 2 * B * T * (2 if task == "preference" else 1)
    if task == "preference":
        assert trainer.preference and trainer.reference is not None
    else:
        assert trainer.base is not None and sum(p.requires_grad for p in trainer.raw_model.parameters()) > 0
    assert not Path(trainer.run_dir).exists()  # the temporary directory is gone
