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
    limits = result["weight_read_limit_tokens_per_s"]
    assert limits["fp32"] > 0 and limits["int8"] > 0 and summary["machine"]
    for mode in ("batch1-greedy", "batch1-sample"):
        assert result["results"][mode]["hf_tokens_per_s"] > 0
        for v in ("fp32", "int8"):
            got = result["results"][mode][v]
            assert got["tokens_per_s"] > 0
            assert got["fraction_of_weight_read_limit"] == pytest.approx(got["tokens_per_s"] / limits[v], abs=1e-3)


def test_generate_constraints_compares_every_setting_and_greedy_tokens_agree_with_hf(tmp_path):
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("bench_generate_constraints", SCRIPT.with_name(
        "generate_constraints.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "constraints.json"
    summary = module.main(["--quick", "--json-out", str(out)])
    import json

    assert json.loads(out.read_text()) == summary and summary["machine"]["cpu"]
    assert set(summary["results"]) == {f"batch{b}-{s}" for b in (1, 2) for s in ("plain", "penalties", "bans",
                                                                                 "filters", "guidance")}
    for key, row in summary["results"].items():
        assert row["lmforge_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0 and row["lengths"] == [40], key
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        assert row["lmforge_cost_vs_plain"] == pytest.approx(summary["results"][key.split("-")[0] + "-plain"][
            "lmforge_tokens_per_s"] / row["lmforge_tokens_per_s"], abs=2e-3)
        if not key.endswith("filters"):  # greedy: every row gives Hugging Face's tokens, constraints included
            assert row["greedy_identical_prefix"] == [40] * int(key[5]), key
