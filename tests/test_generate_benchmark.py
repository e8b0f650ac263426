"""Smoke test of benchmarks/generate_speed.py (tiny settings), so it keeps running as generation changes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generate_speed.py"


@pytest.mark.slow
def test_generate_speed_runs_and_greedy_tokens_agree():
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("bench_generate_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(["--quick", "--configs", "char-small", "--batch-sizes", "1",
                           "--variants", "fp32,int8"])
    result = summary["configs"]["char-small"]
    assert result["greedy_tokens_identical_prefix"] == 100  # --quick: 100 tokens, HF's and ours the same
    assert result["variants"]["fp32"]["greedy_identical_prefix_vs_fp32"] == 100
    for mode in ("batch1-greedy", "batch1-sample"):
        assert result["results"][mode]["hf_tokens_per_s"] > 0
        assert all(result["results"][mode][v]["tokens_per_s"] > 0 for v in ("fp32", "int8"))
