"""bf16 asked of a CPU without bf16 matrix instructions: the Trainer, generation and the planner each say so in one
warning line (the results are right, only far slower than fp32), and never where the hardware has them.

The hardware check is lmforge.distributed.has_fast_bf16; the tests swap it for a fixed answer (monkeypatch) so both
branches run on any machine, and check the real one against /proc/cpuinfo's flags.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmforge
import lmforge.distributed
from lmforge.cli import main
from lmforge.distributed import has_fast_bf16
from lmforge.plan import plan
from tiny_training import tiny_config, tiny_trainer, write_base

SLOW = "on a CPU without bf16 matrix instructions (no AVX512-BF16 or AMX): bf16 matrix products run far slower than fp32"


def bf16_hardware(monkeypatch, fast: bool) -> None:
    """Make lmforge's hardware check answer `fast` for every device."""
    monkeypatch.setattr(lmforge.distributed, "has_fast_bf16", lambda device: fast)


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "without bf16 matrix instructions" in line]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    if not lines:
        pytest.skip("/proc/cpuinfo lists no x86 flags here")
    return set(lines[0].partition(":")[2].split())


def test_has_fast_bf16_agrees_with_the_cpu_flags():
    """True with AVX512-BF16 or AMX; False on a CPU with neither AVX-512 nor AVX-NE-CONVERT (AVX2 only). In between
    (AVX-512 without bf16 instructions) torch's oneDNN check says True: it emulates bf16 with AVX-512."""
    flags = cpu_flags()
    oneDNN_bf16 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
    fast = has_fast_bf16(torch.device("cpu"))
    assert fast == oneDNN_bf16, sorted(f for f in flags if f.startswith(("avx", "amx")))
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert fast
    if not any(f.startswith(("avx512", "amx", "avx_ne")) for f in flags):
        assert not fast


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-compute"])
def test_the_trainer_warns_once_of_bf16_on_a_cpu_without_bf16_instructions(tmp_path, monkeypatch, capsys, precision):
    bf16_hardware(monkeypatch, fast=False)
    summary = tiny_trainer(tiny_config(tmp_path, **{"train.precision": precision, "train.max_steps": 3})).fit()
    assert summary["steps"] == 3  # a warning, not an error: the run trains
    assert warnings(capsys.readouterr().err) == [
        f"warning: train.precision={precision} {SLOW} here; use --train.precision fp32"]


@pytest.mark.parametrize("precision, fast", [("bf16-mixed", True), ("fp32", False)])
def test_the_trainer_is_quiet_with_bf16_hardware_or_fp32(tmp_path, monkeypatch, capsys, precision, fast):
    bf16_hardware(monkeypatch, fast)
    assert tiny_trainer(tiny_config(tmp_path, **{"train.precision": precision, "train.max_steps": 3})).fit()["steps"] == 3
    assert warnings(capsys.readouterr().err) == []


def test_generate_warns_once_of_bf16_on_a_cpu_without_bf16_instructions(tmp_path, monkeypatch, capsys):
    base = write_base(tmp_path)
    command = ["generate", str(base), "--prompt", "hi", "--max-new-tokens", "4", "--device", "cpu", "--no-stream"]
    bf16_hardware(monkeypatch, fast=False)
    assert main([*command, "--dtype", "bf16"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("hi")
    assert warnings(out.err) == [f"warning: dtype=bf16 {SLOW} here; use --dtype fp32 (the default)"]
    assert main(command) == 0  # fp32: nothing to say
    assert warnings(capsys.readouterr().err) == []
    bf16_hardware(monkeypatch, fast=True)
    generator = lmforge.load(str(base), device="cpu", dtype="bf16")
    assert isinstance(generator.generate("hi", max_new_tokens=4, seed=1), str)
    assert warnings(capsys.readouterr().err) == []


def test_plan_notes_bf16_on_a_cpu_without_bf16_instructions(monkeypatch):
    config = tiny_config(Path("unused"), **{"train.precision": "bf16-mixed"})
    bf16_hardware(monkeypatch, fast=False)
    slow = plan(config, device="cpu", peak_tflops=0.001)  # a given peak: nothing is measured in bf16
    assert f"WARNING: train.precision=bf16-mixed {SLOW} here; use --precision fp32" in slow.notes
    bf16_hardware(monkeypatch, fast=True)
    assert warnings("\n".join(plan(config, device="cpu", peak_tflops=0.001).notes)) == []
