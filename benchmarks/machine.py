"""The machine a benchmark ran on, as one JSON-ready record that every results file carries.

A tokens/s figure means little without its machine: sessions land on different CPUs (an AMD EPYC Zen 4 one day,
an Intel Xeon with AMX the next), a shared machine's load slows everything, and torch's kernels depend on its
build and on the CPU features it finds (AVX-512, bf16 dot products, AMX tiles). Usage in a benchmark script
(python puts the script's folder, benchmarks/, on sys.path):

    from machine import load_average, machine
    summary = {"benchmark": "x", "machine": machine(), ...}    # after torch.set_num_threads
    ...
    return report(summary, args.json_out)    # the load average at the end, the summary printed and written
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

# The CPU features that change what torch's kernels can do: 256- and 512-bit vectors, bf16 dot products, AMX tiles.
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU ([] where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines()))
            for block in text.strip().split("\n\n")]


def load_average() -> float:
    """The 1-minute load average: other processes' work on a shared machine slows every measurement alike."""
    return round(os.getloadavg()[0], 2)


def machine() -> dict:
    """CPU model and flags, cores, torch threads, version and build, GPU, python, load average now, date (UTC).

    Call it after torch.set_num_threads, so that `torch_threads` is the number the measurement used.
    """
    import torch

    cpus = cpuinfo()
    first = cpus[0] if cpus else {}
    flags = set(first.get("flags", "").split())
    cores = {(c.get("physical id"), c.get("core id")) for c in cpus if "core id" in c}
    return {
        "cpu": first.get("model name") or platform.processor() or "unknown CPU",
        "cpu_flags": {flag: flag in flags for flag in FLAGS},
        "physical_cores": len(cores) or None,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_build": f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only",
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector ISA its kernels dispatch to
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_average_at_start": load_average(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def alternating_medians(runs: "dict[str, Callable[[], object]]", rounds: int) -> dict[str, float]:
    """Median seconds of each of `runs` over `rounds` rounds, in their order and reversed every other round (so no
    variant always runs first, or always after the same one)."""
    import statistics
    import time

    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in seconds.items()}


def libraries(here: dict, **versions: str) -> str:
    """The line a benchmark prints first: the machine (machine()), torch, the other libraries' versions, threads and
    the load average."""
    others = "".join(f", {name} {version}" for name, version in versions.items())
    return (f"{here['cpu']}; torch {here['torch']}{others}, threads {here['torch_threads']}, load average "
            f"{here['load_average_at_start']}")


def report(summary: dict, json_out: "str | Path | None", *, indent: int = 1, ascii_only: bool = True) -> dict:
    """Finish a benchmark: the load average at the end into summary["machine"], the JSON summary on stdout and,
    with json_out, into that file (written whole or not at all). Returns the summary."""
    from lmforge.files import atomic_write_text

    summary["machine"]["load_average_at_end"] = load_average()
    text = json.dumps(summary, indent=indent, ensure_ascii=ascii_only)
    print(text)
    if json_out:
        atomic_write_text(json_out, text + "\n")
    return summary


if __name__ == "__main__":
    print(json.dumps(machine(), indent=2))
