"""bf16 asked of a CPU without bf16 matrix instructions: the Trainer, generation and the planner each say so in one
warning line (the results are right, only far slower than fp32), and never where the hardware has them. Likewise
fp16 (generation's --dtype fp16) on a CPU without fp16 matrix instructions.

The hardware checks are lmforge.distributed.has_fast_bf16 and has_fast_half; the tests swap them for a fixed answer
(monkeypatch) so both branches run on any machine, and check the real ones against /proc/cpuinfo's flags.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmforge
import lmforge.distributed
from lmforge.cli import main
from lmforge.distributed import has_fast_bf16, has_fast_half
from lmforge.plan import plan
from tiny_training import tiny_config, tiny_trainer, write_base

SLOW = "on a CPU without bf16 matrix instructions (no AVX512-BF16 or AMX): bf16 matrix products run far slower than fp32"
SLOW_FP16 = ("on a CPU without fp16 matrix instructions (no AVX512-FP16 or AVX-NE-CONVERT): fp16 matrix products run "
             "far slower than fp32")


def bf16_hardware(monkeypatch, fast: bool) -> None:
    """Make lmforge's hardware check answer `fast` for every device."""
    monkeypatch.setattr(lmforge.distributed, "has_fast_bf16", lambda device: fast)


def fp16_hardware(monkeypatch, fast: bool) -> None:
    """Make lmforge's fp16 hardware check answer `fast` for every device (bf16 still asks has_fast_bf16)."""
    real = lmforge.distributed.has_fast_half
    monkeypatch.setattr(lmforge.distributed, "has_fast_half",
                        lambda device, dtype: fast if dtype == torch.float16 else real(device, dtype))


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "matrix instructions (no " in line]


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


def test_has_fast_half_agrees_with_the_cpu_flags(monkeypatch):
    """fp16: torch's oneDNN check wants AVX512-FP16 or AVX-NE-CONVERT; neither (AVX2 only, or AVX-512 without FP16)
    is slow, whatever the bf16 answer. bf16: has_fast_bf16's answer."""
    flags = cpu_flags()
    cpu = torch.device("cpu")
    fast = has_fast_half(cpu, torch.float16)
    if "avx512_fp16" in flags:
        assert fast
    if not {"avx512_fp16", "avx_ne_convert"} & flags:
        assert not fast, sorted(f for f in flags if f.startswith(("avx", "amx")))
    assert has_fast_half(cpu, torch.bfloat16) == has_fast_bf16(cpu)
    for bf16_fast in (True, False):  # the fp16 answer is fp16's own
        bf16_hardware(monkeypatch, bf16_fast)
        assert has_fast_half(cpu, torch.float16) == fast
        assert has_fast_half(cpu, torch.bfloat16) == bf16_fast


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


def test_generate_warns_once_of_fp16_on_a_cpu_without_fp16_instructions(tmp_path, monkeypatch, capsys):
    base = write_base(tmp_path)
    command = ["generate", str(base), "--prompt", "hi", "--max-new-tokens", "4", "--device", "cpu", "--no-stream"]
    fp16_hardware(monkeypatch, fast=False)
    bf16_hardware(monkeypatch, fast=True)
    assert main([*command, "--dtype", "fp16"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("hi")  # a warning, not an error: it decodes
    assert warnings(out.err) == [f"warning: dtype=fp16 {SLOW_FP16} here; use --dtype fp32 (the default)"]
    assert main([*command, "--dtype", "bf16"]) == 0  # bf16 has instructions of its own, here fast ones
    assert warnings(capsys.readouterr().err) == []
    fp16_hardware(monkeypatch, fast=True)
    bf16_hardware(monkeypatch, fast=False)
    generator = lmforge.load(str(base), device="cpu", dtype="fp16")  # fp16 is asked of the fp16 check only
    assert isinstance(generator.generate("hi", max_new_tokens=4, seed=1), str)
    assert warnings(capsys.readouterr().err) == []


def test_plan_notes_bf16_on_a_cpu_without_bf16_instructions(monkeypatch):
    config = tiny_config(Path("unused"), **{"train.precision": "bf16-mixed"})
    bf16_hardware(monkeypatch, fast=False)
    slow = plan(config, device="cpu", peak_tflops=0.001)  # a given peak: nothing is measured in bf16
    assert f"WARNING: train.precision=bf16-mixed {SLOW} here; use --precision fp32" in slow.notes
    bf16_hardware(monkeypatch, fast=True)
    assert warnings("\n".join(plan(config, device="cpu", peak_tflops=0.001).notes)) == []
