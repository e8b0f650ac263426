"""Smoke tests of the benchmark scripts on the CPU (tiny settings), so they keep running as the code changes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_throughput_runs_and_both_models_agree():
    pytest.importorskip("transformers")
    summary = load("train_throughput").main(["--configs", "char-small", "--rounds", "1", "--seconds", "0.1",
                                             "--no-bf16", "--profile-steps", "3"])
    result = summary["configs"]["char-small"]
    assert result["max_logits_diff"] < 1e-4  # same weights through the converter: same logits
    # the Trainer's first step and the HF loop's: the same weights on the same first batch of the shards
    assert result["first_step_loss"]["lmforge"] == pytest.approx(result["first_step_loss"]["hf"], abs=1e-4)
    assert result["fp32"]["lmforge_tokens_per_s"] > 0 and result["fp32"]["hf_tokens_per_s"] > 0
    assert len(result["fp32"]["peak_fp32_gflops_samples"]) == 2 and 0 < result["fp32"]["mfu_lmforge"] < 1.5
    assert sum(result["profile"]["share"].values()) == pytest.approx(1, abs=0.01)
    assert result["profile"]["self_cpu_ms_per_step"]["matmul"] > 0


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu():
    summary = load("gpu_check").main(["--device", "cpu", "--steps", "3", "--compile", "off", "--preset", "char-small"])
    assert summary["timed_steps"] == 2 and summary["tokens_per_s"] > 0
    assert summary["loss_last"] < summary["loss_first"] + 0.5  # it trains, it does not blow up
    assert summary["flash_used"] is False  # no CUDA: no flash kernels
    assert summary["loss_chunk"] == 1024  # the head fused with its loss, as the Trainer trains
    assert summary["compile_mode"] is None  # not compiled
    whole = load("gpu_check").main(["--device", "cpu", "--steps", "3", "--compile", "off", "--preset", "char-small",
                                    "--loss-chunk", "0"])
    assert whole["loss_first"] == pytest.approx(summary["loss_first"], abs=0.01)  # the same step, to bf16 rounding


@pytest.mark.slow
def test_gpu_check_runs_the_same_step_through_fsdp():
    small = ["--device", "cpu", "--steps", "2", "--compile", "off", "--block-size", "16", "--preset", "char-small"]
    plain = load("gpu_check").main(small)
    fsdp = load("gpu_check").main(small + ["--parallel", "fsdp"])
    assert (plain["model_class"], fsdp["model_class"]) == ("GPT", "FSDPGPT")  # really sharded by fully_shard
    assert not torch.distributed.is_initialized()  # its process group torn down
    # the same weights and batch: bf16 weights (FSDP's policy) instead of autocast's casts, nothing else
    assert fsdp["loss_first"] == pytest.approx(plain["loss_first"], abs=0.02)


def test_gpu_check_shards_through_the_training_paths_fsdp(monkeypatch):
    """--parallel fsdp is apply_fsdp's sharding (distributed.shard_model, bf16-mixed), not a copy of it: every block
    and the root sharded, the blocks computing on bf16 weights; apply_fsdp itself leaves one process unwrapped."""
    from torch import nn
    from torch.distributed.fsdp import FSDPModule

    from lmforge.distributed import DistInfo, apply_fsdp, is_sharded
    from lmforge.model import GPT
    from tiny_training import tiny_config

    bench = load("gpu_check")
    asked = []
    real = bench.shard_model
    monkeypatch.setattr(bench, "shard_model", lambda model, precision: asked.append(precision) or real(model, precision))
    config = tiny_config(Path("unused")).model
    try:
        model = bench.wrap(GPT(config), "fsdp", torch.device("cpu"))  # joins a process group of this one process
        assert asked == ["bf16-mixed"]
        sharded = {name for name, module in model.named_modules() if isinstance(module, FSDPModule)}
        assert sharded == {""} | {f"blocks.{i}" for i in range(config.n_layer)}
        dtypes = set()
        first = next(m for m in model.blocks[0].modules() if isinstance(m, nn.Linear))
        first.register_forward_pre_hook(lambda module, args: dtypes.add(module.weight.dtype))
        model(torch.zeros(1, 4, dtype=torch.long))
        assert dtypes == {torch.bfloat16}
        plain = GPT(config)  # the training path, one process, in the same group: as is
        assert apply_fsdp(plain, DistInfo(), torch.device("cpu"), "bf16-mixed") is plain and not is_sharded(plain)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_finetune_tasks_runs_every_variant_against_its_baselines(tmp_path):
    pytest.importorskip("sklearn")
    summary = load("finetune_tasks").main(["--quick", "--work", str(tmp_path / "work")])
    speaker, sentiment = summary["tasks"]["speaker"], summary["tasks"]["sentiment"]
    assert set(speaker["models"]) == set(sentiment["models"]) == {"full", "lora"}
    assert 0 < speaker["baseline_most_frequent"]["exact_match"] < 1 and speaker["test_examples"] > 0
    assert sentiment["baseline_majority"]["accuracy"] == pytest.approx(0.5)  # 100 + 100 sentences, stratified
    assert all(0 <= m["accuracy"] <= 1 for m in sentiment["models"].values()) and summary["machine"]


@pytest.mark.slow
def test_encoder_vs_decoder_trains_both_alike_and_shows_what_each_can_do(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "encoder_vs_decoder.json"
    summary = load("encoder_vs_decoder").main(["--quick", "--work", str(tmp_path / "work"), "--json-out", str(out)])
    work, pretraining = tmp_path / "work", summary["pretraining"]
    seen = {}
    for name in ("decoder", "encoder"):  # the same shards, the same number of tokens read
        train = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        seen[name] = [r["tokens_seen"] for r in train if r["kind"] == "train"][-1]
        assert f"path: {work / 'data'}\n" in (work / name / "config.yaml").read_text()
        tuned = (work / f"sentiment-{name}" / "config.yaml").read_text()  # one task split for both classifiers
        assert f"causal: {str(name == 'decoder').lower()}\n" in tuned and f"path: {work / 'sentiment'}\n" in tuned
    assert seen["decoder"] == seen["encoder"] == pretraining["tokens_each"]
    assert pretraining["decoder"]["perplexity"] > 1 and "perplexity" not in pretraining["encoder"]
    assert 0 <= pretraining["encoder"]["masked_accuracy"] <= 1
    sentiment = summary["sentiment"]
    assert sentiment["baseline_majority"]["accuracy"] == pytest.approx(0.5) and sentiment["test_examples"] > 0
    assert all(0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1 for m in sentiment["models"].values())
    abilities = summary["abilities"]
    assert abilities["decoder_sample"]["continuation"]
    probabilities = [c["probability"] for c in abilities["encoder_fill_mask"]["candidates"][0]]
    assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
    assert set(abilities["refusals"]) == {"decoder_fill_mask", "encoder_generate"}
    assert json.loads(out.read_text()) == summary and summary["machine"]["cpu"]


@pytest.mark.slow
def test_fused_loss_benchmark_trains_the_same_steps_fused_or_not(tmp_path):
    """benchmarks/fused_loss.py: the fused and whole-logits variants are the same training (equal losses), each in
    its own process; HF's GPT-2 of the same shape runs beside them; the ratios are those of the numbers written."""
    pytest.importorskip("transformers")
    out = tmp_path / "fused_loss.json"
    summary = load("fused_loss").main(["--layers", "2", "--width", "64", "--heads", "2", "--vocab", "512",
                                       "--block", "64", "--seq", "32", "--batch", "2", "--chunk", "16", "--steps", "2",
                                       "--rounds", "1", "--json-out", str(out)])
    fused, whole, hf = (summary["variants"][v] for v in ("lmforge-fused", "lmforge-whole-logits", "hf"))
    assert (fused["runs"][0]["loss_chunk"], whole["runs"][0]["loss_chunk"]) == (16, 0)
    assert fused["runs"][0]["losses"] == pytest.approx(whole["runs"][0]["losses"], rel=1e-4)
    assert len(hf["runs"][0]["losses"]) == 3 and all(loss > 0 for loss in hf["runs"][0]["losses"])
    for v in (fused, whole, hf):
        assert v["peak_training_rss_mib"] >= v["rss_after_build_mib"] > 0 and v["step_seconds_median"] > 0
    assert summary["peak_rss_fused_over_hf"] == round(fused["peak_training_rss_mib"] / hf["peak_training_rss_mib"], 3)
    assert summary["fp32_logits_of_one_step_mib"] == round(2 * 32 * 512 * 4 / 2**20, 1)
    assert json.loads(out.read_text()) == summary


def test_lora_memory_measures_both_variants_in_their_own_processes(tmp_path):
    out = tmp_path / "lora_memory.json"
    summary = load("lora_memory").main(["--layers", "2", "--width", "64", "--heads", "2", "--vocab", "512",
                                        "--block", "64", "--seqs", "32", "--steps", "2", "--json-out", str(out)])
    at32 = summary["sequence_tokens"]["32"]
    full, lora = at32["variants"]["full"], at32["variants"]["lora"]
    assert full["trainable_parameters"] == full["parameters"]  # every weight trains
    assert lora["trainable_parameters"] == 2 * 4 * (8 * 64 + 64 * 8)  # layers x (q, k, v, o) x (A + B) at r=8
    for v in (full, lora):  # AdamW keeps two fp32 moments per trained value (and a step count per tensor)
        assert 8 * v["trainable_parameters"] <= v["optimizer_state_bytes"] < 8 * v["trainable_parameters"] + 4096
        assert v["peak_training_rss_mib"] >= v["rss_after_build_mib"] > v["rss_runtime_mib"] > 0
        assert len(v["step_seconds"]) == 3 and v["step_seconds_median"] > 0
    assert at32["peak_training_rss_ratio"] == round(lora["peak_training_rss_mib"] / full["peak_training_rss_mib"], 3)
    for name in ("full", "lora"):  # activation checkpointing trains the same weights to the same loss
        checkpointed = at32["variants"][f"{name}-checkpointed"]
        assert checkpointed["trainable_parameters"] == at32["variants"][name]["trainable_parameters"]
        assert checkpointed["final_loss"] == at32["variants"][name]["final_loss"]
    qlora = at32["variants"]["qlora"]  # the same adapters on the 4-bit blocks: their weights at 0.5625 bytes
    assert qlora["trainable_parameters"] == lora["trainable_parameters"] and lora["quantized_bytes"] == 0
    assert qlora["quantized_weights"] == 2 * (4 * 64 * 64 + 2 * 4 * 64 * 64)  # layers x (qkv, proj; fc, proj)
    assert qlora["quantized_bytes"] == qlora["quantized_weights"] * 0.5625 and "qlora_vs_lora" in at32
    assert summary["machine"]["cpu_flags"].keys() >= {"avx512f", "amx_tile"} and summary["model"]["n_layer"] == 2
    assert summary["loss_chunk"] == 1024  # the Trainer's default: the head fused with its loss
    assert json.loads(out.read_text()) == summary


def test_time_to_quality_screened_watching_pays_for_each_whole_val_evaluation_it_runs():
    first_reached = load("time_to_quality").first_reached
    curve = [{"step": 100, "wall_s": 10.0, "val_loss_estimate": 2.10, "val_loss": 2.12, "whole_val_s": 5.0},
             {"step": 200, "wall_s": 20.0, "val_loss_estimate": 1.85, "val_loss": 1.91, "whole_val_s": 5.0},  # not yet
             {"step": 300, "wall_s": 30.0, "val_loss_estimate": 1.92, "val_loss": 1.89, "whole_val_s": 5.0},  # unseen
             {"step": 400, "wall_s": 40.0, "val_loss_estimate": 1.86, "val_loss": 1.86, "whole_val_s": 5.0}]
    screened = first_reached(curve, 1.9, screened=True, baseline_s=100.0)
    # evaluated at 200 (estimate 1.85, whole-val 1.91: not yet) and 400; 300's crossing is not seen
    assert (screened["step"], screened["whole_val_evaluations"], screened["wall_s"]) == (400, 2, 50.0)
    assert screened["ratio"] == 0.5 and screened["ratio_training_only"] == 0.4
    every = first_reached(curve, 1.9, screened=False, baseline_s=100.0)
    assert (every["step"], every["whole_val_evaluations"], every["wall_s"], every["ratio"]) == (300, 3, 45.0, 0.45)
    assert first_reached(curve, 1.5, screened=True, baseline_s=100.0)["step"] is None


@pytest.mark.slow
def test_time_to_quality_alternates_the_runs_and_charges_the_recipes_evaluations(tmp_path):
    from lmforge.checkpoint import load_for_inference
    from lmforge.data.shards import load_split
    from lmforge.eval.perplexity import evaluate_tokens

    out, runs = tmp_path / "time_to_quality.json", tmp_path / "runs"
    summary = load("time_to_quality").main(["--quick", "--threads", "1", "--data", str(tmp_path / "data"),
                                            "--runs", str(runs), "--set", "optim.name=muon",
                                            "--json-out", str(out)])
    times = sorted((r["time"], name) for name in ("baseline", "recipe")
                   for r in map(json.loads, (runs / name / "metrics.jsonl").read_text().splitlines())
                   if r["kind"] == "train")
    turns = [name for i, (_, name) in enumerate(times) if i == 0 or times[i - 1][1] != name]
    assert turns == ["baseline", "recipe"] * 4  # 40 steps each, turns of 10, one run computing at a time
    curve, recipe = summary["recipe"]["curve"], summary["recipe"]
    assert [p["step"] for p in curve] == [10, 20, 30, 40] and recipe["optim"]["name"] == "muon"
    assert all(a["wall_s"] < b["wall_s"] for a, b in zip(curve, curve[1:])) and curve[-1]["wall_s"] <= recipe["wall_s"]
    model, _, config = load_for_inference(runs / "recipe")  # the last point is the trained recipe's whole-val loss
    val = load_split(tmp_path / "data", "val")[:8192]
    assert recipe["val_loss_whole_split"] == round(evaluate_tokens(model, val, 64, batch_size=64)["loss"], 4)
    assert all(p["val_loss_estimate"] > 0 and p["whole_val_s"] > 0 for p in curve)
    assert recipe["whole_val_s"] == pytest.approx(sum(p["whole_val_s"] for p in curve), abs=0.05)
    target, baseline_s = summary["baseline"]["val_loss_whole_split"], summary["baseline"]["wall_s"]
    # the two ways of watching, recomputed from the curve: whole-val at every turn, or only where the estimate says so
    for key, watched in (("recipe_reaches_baseline_whole_val_every_turn", curve),
                         ("recipe_reaches_baseline", [p for p in curve if p["val_loss_estimate"] <= target])):
        first = next((i for i, p in enumerate(watched) if p["val_loss"] <= target), None)
        reached = summary[key]
        if first is None:
            assert reached["step"] is None and reached["ratio"] is None
            continue
        charged = sum(p["whole_val_s"] for p in watched[:first + 1])  # every whole-val evaluation run until then
        assert reached["step"] == watched[first]["step"] and reached["whole_val_evaluations"] == first + 1
        assert reached["wall_s"] == pytest.approx(watched[first]["wall_s"] + charged, abs=0.05)
        # wall times are stored to 0.01 s and the ratio from the unrounded ones: allow that rounding
        assert reached["ratio"] == pytest.approx(reached["wall_s"] / baseline_s, abs=1e-2)
    assert summary["baseline"]["model"]["bias"] is False and summary["baseline"]["optim"]["lr"] == 1e-3
    assert json.loads(out.read_text()) == summary and summary["machine"]["cpu"] and summary["val_tokens"] == 8192


@pytest.mark.distributed
def test_muon_fsdp_step_times_both_ways_and_both_leave_the_same_weights(tmp_path):
    out = tmp_path / "muon_fsdp_step.json"
    # one layer: each shape's only matrix goes to one process, and the other has none to orthogonalise
    summary = load("muon_fsdp_step").main(["--quick", "--set", "model.n_layer=1", "--json-out", str(out)])
    assert summary["processes"] == 2 and summary["matrices"] == 4  # qkv, proj, fc, mlp proj
    assert all(n == 1 for n in summary["shapes"].values()) and len(summary["shapes"]) == 4
    # the same step computed two ways: sharing the matrices out changes who computes, not what
    assert summary["max_abs_weight_diff_after_one_step"] < 1e-6
    ms = summary["ms_per_step"]
    assert ms.keys() == {"shared", "every-process"} and min(ms.values()) > 0
    assert summary["speedup_shared"] == pytest.approx(ms["every-process"] / ms["shared"], rel=0.02)
    assert json.loads(out.read_text()) == summary and summary["machine"]["cpu"]


@pytest.mark.slow
def test_fused_ops_match_the_models_ops_and_time_the_trainer_step_with_each(tmp_path):
    import lmforge.model
    from torch import nn

    eager = lmforge.model.MLP.forward, nn.RMSNorm.forward
    bench = load("fused_ops")
    out = tmp_path / "fused_ops.json"
    summary = bench.main(["--quick", "--data", str(tmp_path / "data"), "--json-out", str(out)])
    assert all(d < 1e-12 for d in summary["max_abs_diff_float64"].values())  # outputs and gradients, float64
    assert summary["ms_per_step"].keys() == {"eager", "relu2", "rmsnorm", "both"}
    assert all(len(t) == 2 and min(t) > 0 for t in summary["per_round_ms"].values())
    assert (lmforge.model.MLP.forward, nn.RMSNorm.forward) == eager  # the model's own ops are back
    assert json.loads(out.read_text()) == summary and summary["machine"]["cpu"]


def test_fused_ops_differ_from_a_wrong_backward():
    """The float64 check catches a fused op whose backward is wrong (here: 2 g, the factor relu(h) forgotten)."""
    bench = load("fused_ops")
    right = bench.FusedReLU2.backward
    try:
        bench.FusedReLU2.backward = staticmethod(lambda ctx, g: 2 * g)
        assert bench.check_against_autograd()["relu2"] > 0.1
    finally:
        bench.FusedReLU2.backward = right
    assert bench.check_against_autograd()["relu2"] == 0.0


def test_bf16_speed_matmul_times_both_dtypes_and_speed_refuses_a_cpu_without_bf16(tmp_path, monkeypatch):
    from lmforge.distributed import has_fast_bf16

    bench = load("bf16_speed")
    monkeypatch.setattr(bench, "MATMUL_SHAPES", ((16, 8, 4),))
    monkeypatch.setattr(bench, "LINEAR_SHAPES", ((32, 64),))
    out = tmp_path / "matmul.json"
    summary = bench.main(["matmul", "--seconds", "0.001", "--json-out", str(out)])
    part = summary["matmul"]
    [row] = part["matmul"]
    assert row["shape"] == "16x8x4" and row["fp32_repeats"] >= 2 and row["bf16_repeats"] >= 2
    # (a 16x8x4 product's GFLOP/s and ratio are rounded: under load either can round to 0; its times are not)
    assert row["fp32_ms"] > 0 and row["bf16_ms"] > 0 and row["fp32_gflops"] >= 0 and row["bf16_slower_x"] >= 0
    assert [(r["in"], r["out"], r["batch"]) for r in part["decode_linear"]] == [(32, 64, 1), (32, 64, 8)]
    assert all(r["int8_us"] > 0 and r["int8_slower_x"] > 0 for r in part["decode_linear"])
    assert part["has_fast_bf16"] == has_fast_bf16(torch.device("cpu"))
    assert json.loads(out.read_text()) == summary and summary["machine"]["cpu_flags"]
    monkeypatch.setattr(bench, "has_fast_bf16", lambda device: False)
    with pytest.raises(SystemExit) as stopped:  # a bf16 Trainer step would take minutes: points to matmul instead
        bench.main(["speed", "--data", str(tmp_path / "none")])
    assert stopped.value.code == 2 and not (tmp_path / "none").exists()


def test_muon_step_times_torch_and_both_batched_precisions_on_the_models_matrices(tmp_path):
    from lmforge.distributed import has_fast_bf16

    out = tmp_path / "muon.json"
    summary = load("muon_step").main(["--quick", "--set", "model.n_layer=2", "--set", "model.n_embd=32",
                                      "--json-out", str(out)])
    assert summary["matrices"] == 8  # qkv, proj, fc, mlp.proj of each of 2 blocks
    assert summary["shapes"] == [[32, 32], [32, 128], [96, 32], [128, 32]]  # (as JSON lists)
    assert set(summary["ms_per_step"]) == {"torch", "batched-bf16", "batched-fp32", "single-fp32"}
    assert all(ms > 0 for ms in summary["ms_per_step"].values())
    assert summary["auto_ns_dtype_here"] == ("bf16" if has_fast_bf16(torch.device("cpu")) else "fp32")
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))


@pytest.mark.slow
def test_early_exit_trains_both_models_and_self_speculation_keeps_each_models_greedy_tokens(tmp_path):
    out = tmp_path / "early_exit.json"
    summary = load("early_exit").main(["--quick", "--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"),
                                       "--json-out", str(out)])
    assert json.loads(out.read_text()) == summary and summary["machine"]["cpu"]
    assert set(summary["tokens_per_s"]) == {"plain", "plain-early-exit", "trained", "trained-early-exit"}
    assert all(v > 0 for v in summary["tokens_per_s"].values())
    for name in ("plain", "trained"):
        assert summary["greedy_vs_plain_decoding"][f"{name}-early-exit"]["identical"] == summary["prompts"]
        assert 0 <= summary["acceptance"][f"{name}-early-exit"] <= 1
        assert set(summary["val_loss"][name]) == {"model", "early_exit"}
    logged = {name: (tmp_path / "runs" / name / "metrics.jsonl").read_text() for name in ("plain", "trained")}
    assert "val_early_exit_loss" in logged["trained"] and "val_early_exit_loss" not in logged["plain"]


@pytest.mark.slow
def test_speculative_decoding_times_every_way_and_greedy_ways_agree_with_plain_greedy(tmp_path):
    out = tmp_path / "speculative.json"
    summary = load("speculative_decoding").main(["--quick", "--data", str(tmp_path / "data"),
                                                 "--runs", str(tmp_path / "runs"), "--json-out", str(out)])
    assert json.loads(out.read_text()) == summary and summary["machine"]["cpu"]
    assert set(summary["tokens_per_s"]) == {"lmforge", "lmforge-lookup", "lmforge-draft", "lmforge-draft-confident",
                                            "lmforge-draft-compiled", "lmforge-early-exit", "hf", "hf-lookup",
                                            "hf-draft", "hf-draft-confident", "hf-draft-default", "lmforge-sample",
                                            "lmforge-draft-sample", "lmforge-early-exit-sample", "hf-sample",
                                            "hf-draft-sample"}
    assert all(v > 0 for v in summary["tokens_per_s"].values())
    for name in ("lmforge-lookup", "lmforge-draft", "lmforge-draft-confident", "lmforge-draft-compiled",
                 "lmforge-early-exit"):  # speculation:
        # plain greedy's tokens
        assert summary["greedy_vs_lmforge_plain"][name]["identical"] == summary["prompts"]
    for name, share in summary["acceptance"].items():
        drafted = summary["guesses_per_call"][name]["drafted"]
        assert drafted > 0 and 0 <= share <= 1, name
    assert summary["speedup_vs_plain"]["lmforge-draft"] == pytest.approx(
        summary["tokens_per_s"]["lmforge-draft"] / summary["tokens_per_s"]["lmforge"], abs=2e-3)
    # the same models behind `lmforge serve`, plain, with prompt lookup and with the draft (serve_speculative.py)
    served = load("serve_speculative").main(["--quick", "--data", str(tmp_path / "data"), "--runs",
                                              str(tmp_path / "runs"), "--json-out", str(tmp_path / "served.json")])
    assert json.loads((tmp_path / "served.json").read_text()) == served
    ways = ("plain", "lookup", "draft", "draft-when-quiet")
    assert served["greedy_texts_equal_plain"] == dict.fromkeys(ways, True)
    assert served["server_exit_codes"] == dict.fromkeys(ways, 0)
    assert all(v > 0 for v in served["stream_tokens_per_s"].values()) and served["throughput_vs_plain"]["plain"] == 1
    assert set(served["acceptance"]) == set(ways[1:]) and all(0 <= a <= 1 for a in served["acceptance"].values())
    assert served["stream_speedup_vs_plain"]["draft"] == pytest.approx(
        served["stream_tokens_per_s"]["draft"] / served["stream_tokens_per_s"]["plain"], abs=2e-3)


@pytest.mark.slow
def test_choices_speed_runs_and_lmforge_scores_what_the_harness_scores():
    pytest.importorskip("lm_eval")
    summary = load("choices_speed").main(["--quick"])
    assert summary["max_loglikelihood_diff"] < 1e-4 and summary["max_loglikelihood_diff_scoring"] < 1e-4
    assert summary["same_acc"] and summary["choices"] == 4 * summary["questions"] == 96
    assert all(v > 0 for v in summary["questions_per_s"].values())


@pytest.mark.slow
def test_choices_shakespeare_runs_and_logs_the_questions_at_each_evaluation():
    summary = load("choices_shakespeare").main(["--quick"])
    assert [point["step"] for point in summary["curve"]] == [10, 20] and summary["questions"] == 24
    assert all(0 <= point["acc"] <= 1 and 0 <= point["acc_norm"] <= 1 for point in summary["curve"])
    question = summary["example_question"]
    assert len(question["choices"]) == 4 and len(set(question["choices"])) == 4 and question["context"]


@pytest.mark.slow
def test_watermark_shakespeare_scores_marked_and_unmarked_samples(tmp_path):
    out = tmp_path / "watermark.json"
    summary = load("watermark_shakespeare").main(["--quick", "--json-out", str(out)])
    assert json.loads(out.read_text()) == summary and summary["samples_per_setting"] == 4
    results = summary["results"]
    assert set(results) == {"none", "bias 2"} and results["none"]["nll_cost"] == 0
    assert results["bias 2"]["over_threshold"]["60"] == 1.0 and results["none"]["over_threshold"]["60"] == 0.0
    assert results["bias 2"]["median_z"]["60"] > results["none"]["median_z"]["60"]
    assert all(r["nll_per_token"] > 0 for r in results.values())
    assert set(results["none"]["over_threshold_unique"]) == {"30", "60"}  # each repeated pair once, too


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "simpo", "dpo-precomputed", "kto"])
def test_dpo_step_trains_lmforge_and_trl_alike(tmp_path, loss):
    """benchmarks/dpo_step.py on a tiny model: DPO's first step is log 2 for every variant (policy = reference);
    SimPO's three variants (fused head, whole logits, TRL's CPOTrainer), DPO's with the reference's values
    precomputed, and KTO's (TRL's KTOTrainer, the same mismatched rows) take the same data in order and give the same
    loss at every step, updates included; KTO's first step is 1/2."""
    out = tmp_path / f"{loss}.json"
    precompute = loss == "dpo-precomputed"
    loss = loss.removesuffix("-precomputed")
    summary = load("dpo_step").main(["--layers", "2", "--width", "64", "--heads", "2", "--vocab", "512", "--prompt",
                                     "16", "--completion", "8", "--rounds", "1", "--loss", loss, "--json-out",
                                     str(out), *(["--precompute"] if precompute else [])])
    assert summary["loss"] == loss and json.loads(out.read_text()) == summary
    assert summary["reference_precomputed"] == precompute
    variants = summary["variants"]
    if precompute:
        ours, theirs = (variants[v]["runs"][0]["losses"] for v in ("lmforge", "trl"))
        assert summary["losses_within_1e-4_at_every_step"] and ours == pytest.approx(theirs, abs=1e-5)
        assert ours[1] != pytest.approx(ours[2])
        live = variants["lmforge-live-reference"]["runs"][0]["losses"]
        assert live == pytest.approx(ours, abs=1e-5)  # the live frozen copy: the same values, so the same steps
        assert summary["step_time_precomputed_over_live"] > 0 and summary["peak_rss_precomputed_over_live"] > 0
    assert set(variants) == {"lmforge", "lmforge-whole-logits", "trl", *(["lmforge-live-reference"] if precompute
                                                                         else [])}
    if loss == "dpo":
        assert summary["first_step_losses_within_1e-4_of_log_2"]
    elif loss == "kto":
        assert summary["first_step_losses_within_1e-4_of_one_half"] and summary["losses_within_1e-4_at_every_step"]
        assert summary["completions_per_step"] == 8
        ours, theirs = (variants[v]["runs"][0]["losses"] for v in ("lmforge", "trl"))
        assert len(ours) == 3 and ours == pytest.approx(theirs, abs=1e-5) and ours[0] != pytest.approx(ours[2])
    else:
        assert summary["first_step_losses_within_1e-4"] and summary["simpo_gamma"] == 0.5
        ours, theirs = (variants[v]["runs"][0]["losses"] for v in ("lmforge", "trl"))
        assert len(ours) == 3 and ours == pytest.approx(theirs, abs=1e-5) and ours[0] != pytest.approx(ours[1])
    assert all(v["peak_training_rss_mib"] > 0 and v["step_seconds_median"] > 0 for v in variants.values())


@pytest.mark.slow
def test_grpo_step_samples_the_same_work_in_lmforge_and_trl(tmp_path):
    """benchmarks/grpo_step.py on a tiny model: lmforge and TRL's GRPOTrainer each sample exactly --completion tokens
    of every prompt's --group samples from prompts of the same length, train on them (DAPO with equal lengths: the
    group-relative advantages sum to 0, so both first losses are 0), and the plan's prediction is recorded;
    --plan-only recomputes it and keeps the measurements."""
    out = tmp_path / "grpo.json"
    bench = load("grpo_step")
    summary = bench.main(["--layers", "2", "--width", "64", "--heads", "2", "--vocab", "512", "--prompt", "16",
                          "--completion", "8", "--rounds", "1", "--json-out", str(out)])
    assert json.loads(out.read_text()) == summary
    for name in ("lmforge", "trl"):
        run = summary["variants"][name]["runs"][0]
        assert run["completion_tokens_mean"] == [8.0] * 3 and run["prompt_tokens_mean"] == [16.0] * 3
        assert abs(run["losses"][0]) < 1e-5 and len(run["step_seconds"]) == 3
    assert summary["variants"]["lmforge"]["runs"][0]["sampling_seconds"][0] > 0
    assert summary["plan"]["step_seconds"] > 0 and summary["plan"]["sampling_seconds"] > 0
    again = bench.main(["--plan-only", "--json-out", str(out), "--layers", "2", "--width", "64", "--heads", "2",
                        "--vocab", "512", "--prompt", "16", "--completion", "8"])
    assert again["variants"] == summary["variants"] and again["plan"]["step_seconds"] > 0


@pytest.mark.slow
def test_distill_step_samples_the_same_work_in_lmforge_and_trl(tmp_path):
    """benchmarks/distill_step.py on tiny models: lmforge and TRL's DistillationTrainer each sample exactly
    --completion tokens of every prompt with the student and train it on the teacher's reverse KL there: both first
    losses are positive and near each other (the same divergence of the same models, on their own draws); the plan's
    prediction is recorded."""
    out = tmp_path / "distill.json"
    summary = load("distill_step").main([
        "--layers", "2", "--width", "64", "--heads", "2", "--teacher-layers", "2", "--teacher-width", "96",
        "--teacher-heads", "2", "--vocab", "512", "--prompt", "16", "--completion", "8", "--rounds", "1",
        "--json-out", str(out)])
    assert json.loads(out.read_text()) == summary
    first = {}
    for name in ("lmforge", "trl"):
        run = summary["variants"][name]["runs"][0]
        assert run["completion_tokens_mean"] == [8.0] * 3 and len(run["step_seconds"]) == 3
        first[name] = run["losses"][0]
    assert 0 < first["lmforge"] and 0 < first["trl"] and abs(first["lmforge"] / first["trl"] - 1) < 0.25
    assert summary["variants"]["lmforge"]["runs"][0]["sampling_seconds"][0] > 0
    assert summary["plan"]["step_seconds"] > 0 and summary["plan"]["sampling_seconds"] > 0


@pytest.mark.slow
def test_distill_quality_trains_a_teacher_and_three_students(tmp_path):
    """benchmarks/distill_quality.py on a small corpus: the teacher, then the student from the data alone, distilled
    and mixed, each evaluated over the whole val split; the gains are the data-only loss minus each one's."""
    from tiny_training import prepared_corpus

    data = prepared_corpus(tmp_path)
    out = tmp_path / "quality.json"
    summary = load("distill_quality").main([
        "--data", str(data), "--runs", str(tmp_path / "runs"), "--teacher-steps", "3", "--student-steps", "3",
        "--teacher-width", "32", "--teacher-heads", "2", "--block", "32", "--batch", "4", "--json-out", str(out)])
    assert json.loads(out.read_text()) == summary
    students = summary["students"]
    assert set(students) == {"data", "distill", "mixed"} and summary["teacher"]["steps"] == 3
    for name in ("distill", "mixed"):
        assert summary["gain_over_data_only"][name] == pytest.approx(
            students["data"]["val_loss_whole_split"] - students[name]["val_loss_whole_split"], abs=2e-4)
        assert students[name]["val_distill_divergence_fixed_batches"] > 0


def test_gpu_check_sorts_a_steps_kernels_by_kind():
    bench = load("gpu_check")
    kernels = [("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", 6.0), ("sm90_xmma_gemm_bf16bf16_bf16f32", 2.0),
               ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 1.5),
               ("triton_per_fused_add_native_layer_norm_0", 0.4), ("void at::native::vectorized_elementwise", 0.1)]
    table = bench.kernel_table(kernels, top=2)
    assert table["ms_by_kind"] == {"attention": 1.5, "fused": 0.4, "matmul": 8.0, "other": 0.1}
    assert table["device_ms"] == 10.0 and sum(table["share_by_kind"].values()) == pytest.approx(1)
    assert [k["ms"] for k in table["top"]] == [6.0, 2.0]


def test_gguf_imatrix_scores_kl_from_f32_perplexity_and_top1():
    """The benchmark's quality(): the mean KL(p_f32 || p_quantized) over positions, the perplexity of the targets
    and the share of positions whose top token is the f32 model's, against torch's own functions."""
    bench = load("gguf_imatrix")
    g = torch.Generator().manual_seed(4)
    reference = torch.randn(40, 9, generator=g, dtype=torch.float64)
    quantized = reference + 0.3 * torch.randn(40, 9, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 9, (40,), generator=g)
    same = bench.quality(reference.numpy(), reference.numpy(), targets.numpy())
    assert same["mean_kl_from_f32"] == 0 and same["top1_same_as_f32"] == 1.0
    result = bench.quality(quantized.numpy(), reference.numpy(), targets.numpy())
    kl = torch.nn.functional.kl_div(quantized.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean()
    assert result["mean_kl_from_f32"] == pytest.approx(float(kl), abs=1e-6) and result["mean_kl_from_f32"] > 0
    ppl = torch.exp(torch.nn.functional.cross_entropy(quantized, targets))
    assert result["perplexity"] == pytest.approx(float(ppl), abs=1e-4)
    agree = (quantized.argmax(-1) == reference.argmax(-1)).double().mean()
    assert result["top1_same_as_f32"] == pytest.approx(float(agree), abs=1e-4) and result["top1_same_as_f32"] < 1


def test_lora_decode_times_every_variant_and_all_give_the_same_tokens(tmp_path):
    out = tmp_path / "lora_decode.json"
    summary = load("lora_decode").main(["--layers", "2", "--width", "64", "--heads", "4", "--kv-heads", "2", "--vocab",
                                        "512", "--new-tokens", "12", "--batch-sizes", "1,3", "--rounds", "1",
                                        "--json-out", str(out)])
    for result in summary["results"]:
        assert set(result["tokens_per_s"]) == {"lmforge-adapter", "lmforge-merged", "peft-adapter", "peft-merged"}
        assert all(n == 12 for n in result["same_tokens_as_lmforge_merged"].values())  # one model four ways
        assert result["time_vs_lmforge_adapter"]["lmforge-adapter"] == 1.0
    assert [r["batch"] for r in summary["results"]] == [1, 3] and json.loads(out.read_text()) == summary


def test_alternating_medians_reverses_the_order_every_other_round_and_takes_each_runs_median():
    machine = load("machine")
    calls = []
    medians = machine.alternating_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"] and set(medians) == {"a", "b"}
    assert all(0 <= seconds < 1 for seconds in medians.values())
    line = machine.libraries({"cpu": "X", "torch": "2", "torch_threads": 1, "load_average_at_start": 0.5}, peft="1")
    assert line == "X; torch 2, peft 1, threads 1, load average 0.5"


def test_pissa_init_times_both_starts_of_both_libraries_and_the_fast_one_is_near_the_best(tmp_path):
    out = tmp_path / "pissa_init.json"
    summary = load("pissa_init").main(["--layers", "1", "--width", "128", "--rank", "4", "--rounds", "1",
                                       "--json-out", str(out)])
    gaps = summary["excess_over_best_residual"]
    assert set(gaps) == {"lmforge-exact", "lmforge-niter-4", "peft-exact", "peft-niter-4"}
    assert abs(gaps["lmforge-exact"]) < 1e-4 and abs(gaps["peft-exact"]) < 1e-4  # Eckart-Young: the best
    assert 0 < gaps["lmforge-niter-4"] < 0.2 and 0 < gaps["peft-niter-4"] < 0.2
    assert summary["time_vs_lmforge_exact"]["lmforge-exact"] == 1.0 and json.loads(out.read_text()) == summary


def test_lora_mixed_times_every_variant_and_each_row_decodes_with_its_own_set(tmp_path):
    out = tmp_path / "lora_mixed.json"
    summary = load("lora_mixed").main(["--layers", "2", "--width", "64", "--heads", "4", "--kv-heads", "2", "--vocab",
                                       "512", "--new-tokens", "12", "--sets", "3", "--batch", "5", "--rounds", "1",
                                       "--json-out", str(out)])
    result = summary["results"][0]
    assert set(result["tokens_per_s"]) == {"lmforge-mixed", "lmforge-per-set", "peft-mixed", "peft-per-set",
                                           "lmforge-mixed-int8"}
    same = result["same_tokens_as_lmforge_per_set"]
    assert all(same[v] == 12 for v in same if v != "lmforge-mixed-int8")  # each row's set, four ways
    assert (result["batch"], result["sets"]) == (5, 3) and json.loads(out.read_text()) == summary


def test_qlora_times_both_libraries_4_bit_and_in_full_on_the_same_quantized_bytes(tmp_path):
    out = tmp_path / "qlora.json"
    summary = load("qlora").main(["--layers", "1", "--width", "128", "--vocab", "256", "--seq", "32", "--rounds", "1",
                                  "--json-out", str(out)])
    stored, first = summary["block_matrix_bytes"], summary["first_loss"]
    assert set(summary["step_seconds"]) == {"lmforge-qlora", "peft-qlora", "lmforge-lora", "peft-lora"}
    assert stored["lmforge-qlora"] == stored["peft-qlora"] == stored["lmforge-lora"] * 0.5625 / 4
    assert summary["first_loss_gap_qlora"] < 1e-4 < summary["first_loss_gap_4bit_vs_full"]
    assert first["lmforge-lora"] == pytest.approx(first["peft-lora"], abs=1e-4)
    assert summary["step_vs_lmforge_qlora"]["lmforge-qlora"] == 1.0 and json.loads(out.read_text()) == summary


def test_loftq_start_scores_each_start_against_the_base_in_full(tmp_path):
    from test_tasks import make_base

    base = make_base(tmp_path, **{"model.n_embd": 64, "model.n_head": 2})
    out = tmp_path / "loftq.json"
    summary = load("loftq_start").main(["--base", str(base), "--data", str(tmp_path / "pre"), "--tokens", "64",
                                        "--ranks", "4", "--iters", "1,3", "--threads", "1", "--json-out", str(out)])
    kl, error = summary["kl_from_full"], summary["weight_error"]
    assert set(kl) == set(error) == {"qlora", "loftq-r4-iter1", "loftq-r4-iter3"} and set(summary["loss"]) > set(kl)
    assert error["loftq-r4-iter3"] < error["loftq-r4-iter1"] < error["qlora"]  # the adapters take back some of it
    assert all(value > 0 for value in kl.values()) and json.loads(out.read_text()) == summary
