"""Smoke tests of the benchmark scripts on the CPU (tiny settings), so they keep running as the code changes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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
                                             "--no-bf16"])
    result = summary["configs"]["char-small"]
    assert result["max_logits_diff"] < 1e-4  # same weights through the converter: same logits
    assert result["first_step_loss"]["lmforge"] == pytest.approx(result["first_step_loss"]["hf"], abs=1e-4)
    assert result["fp32"]["lmforge_tokens_per_s"] > 0 and result["fp32"]["hf_tokens_per_s"] > 0
    assert summary["peak_fp32_gflops"] > 0


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu():
    summary = load("gpu_check").main(["--device", "cpu", "--steps", "3", "--compile", "off"])
    assert summary["timed_steps"] == 2 and summary["tokens_per_s"] > 0
    assert summary["loss_last"] < summary["loss_first"] + 0.5  # it trains, it does not blow up
    assert summary["flash_used"] is False  # no CUDA: no flash kernels


@pytest.mark.slow
def test_finetune_tasks_runs_every_variant_against_its_baselines(tmp_path):
    pytest.importorskip("sklearn")
    summary = load("finetune_tasks").main(["--quick", "--work", str(tmp_path / "work")])
    speaker, sentiment = summary["tasks"]["speaker"], summary["tasks"]["sentiment"]
    assert set(speaker["models"]) == set(sentiment["models"]) == {"full", "lora"}
    assert 0 < speaker["baseline_most_frequent"]["exact_match"] < 1 and speaker["test_examples"] > 0
    assert sentiment["baseline_majority"]["accuracy"] == pytest.approx(0.5)  # 100 + 100 sentences, stratified
    assert all(0 <= m["accuracy"] <= 1 for m in sentiment["models"].values()) and summary["machine"]
