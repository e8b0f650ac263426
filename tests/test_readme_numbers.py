"""Every benchmark figure README.md quotes comes from a file in benchmarks/results/, and every such file records
the machine it ran on.

README.md marks each passage of measured figures with the results files behind it:

    <!-- results: generate_speed-cpu.json -->
    ... a table or a paragraph of figures ...
    <!-- /results -->

Inside a passage, a figure is a number with a decimal point ("1.704", "-0.71": a minus sign after a space is its
sign), a thousands separator ("13,568"), or a unit ("2.6x", "20%", "70 s", "18 MB", "10.2 MB/s", "437 TFLOP/s").
Bare integers ("2000 steps", "B=32", "r=8") are settings, not measurements, and are not checked. A figure is backed when some number in the named files (a value,
or one in a key such as "step_to_1.89") rounds to it at the figure's precision (for "20%" the number times 100, for
"1.54 M" the number over a million).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from machine import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

PASSAGE = re.compile(r"<!-- results: (?P<files>[^>]+?) -->(?P<text>.*?)<!-- /results -->", re.S)
FIGURE = re.compile(r"(?<![\w.,=])(?P<number>-?(?:\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?))"
                    r"(?P<unit>x|%| M\b)?(?=(?P<spaced_unit> (?:s|ms|MB|MB/s|GFLOP/s|TFLOP/s|tokens/s)\b))?(?![\w.])")
SCALE = {"%": 100.0, " M": 1e-6}

# What machine() records; a results file written before it has each key, null where its run did not record it,
# and says in "recorded_from" which of its fields the known ones were copied from.
MACHINE_KEYS = {"cpu", "cpu_flags", "physical_cores", "logical_cpus", "torch_threads", "torch", "torch_build",
                "torch_cpu_capability", "gpu", "python", "load_average_at_start", "load_average_at_end", "date"}


def figures(text: str) -> list[tuple[str, float, int, float]]:
    """The measured figures in `text`: (as written, value, decimals, scale to apply to a results number)."""
    found = []
    for m in FIGURE.finditer(text):
        number, unit = m["number"].replace(",", ""), m["unit"] or m["spaced_unit"] or ""
        if "." not in number and "," not in m["number"] and not unit:
            continue  # a bare integer: a setting
        decimals = len(number.partition(".")[2])
        found.append((m[0], float(number), decimals, SCALE.get(unit, 1.0)))
    return found


def numbers(value) -> list[float]:
    """Every number in a parsed JSON document, and those in its keys ("step_to_1.89"); booleans are not numbers."""
    if isinstance(value, dict):
        in_keys = [float(n) for key in value for n in re.findall(r"\d+(?:\.\d+)?", key)]
        return in_keys + [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def passages(readme: str) -> list[tuple[list[str], str]]:
    return [(m["files"].split(), m["text"]) for m in PASSAGE.finditer(readme)]


def unbacked(readme: str) -> list[str]:
    """The figures of `readme`'s results passages that no number in their files rounds to."""
    missing = []
    for names, text in passages(readme):
        values = [n for name in names for n in numbers(json.loads((RESULTS / name).read_text(encoding="utf-8")))]
        for written, value, decimals, scale in figures(text):
            if not any(round(v * scale, decimals) == value for v in values):
                missing.append(f"{written!r} (from {', '.join(names)})")
    return missing


def test_every_readme_figure_is_in_its_results_file():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = passages(readme)
    assert len(found) >= 5 and sum(len(figures(text)) for _, text in found) >= 50  # the markers are in place
    for names, _ in found:
        assert all((RESULTS / name).is_file() for name in names), names
    assert unbacked(readme) == []


@pytest.mark.parametrize("written, changed, source", [
    ("| 2.15x / 19% |", "| 2.15x / 23% |", "'23%' (from generate_speed-cpu.json)"),
    ("| **1.6817** (1.89", "| **1.6818** (1.89", "'1.6818' (from quality_shakespeare-cpu.json)"),
    ("**511,023 tokens/s**", "**511,024 tokens/s**", "'511,024' (from gpu_check-h200.json)"),
    ("Peak RSS **684 MB**", "Peak RSS **683 MB**", "'683' (from prepare_throughput-1gb-cpu.json)"),
    ("; -0.71 with", "; 0.71 with", "'0.71' (from watermark_shakespeare-cpu-amd-avx2.json)"),  # the sign counts
])
def test_a_changed_figure_is_reported(written, changed, source):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count(written) == 1
    assert unbacked(readme.replace(written, changed)) == [source]


def unmarked(readme: str) -> list[str]:
    """Figures of the "Results and benchmarks" section outside any results passage (they would go unchecked)."""
    section = readme.split("## Results and benchmarks", 1)[1].split("\n## ", 1)[0]
    return [written for written, *_ in figures(PASSAGE.sub("", section))]


def test_the_results_section_quotes_figures_only_inside_marked_passages():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert unmarked(readme) == []
    added = "A new 3.5x speedup.\n\n<!-- results: prepare_throughput"
    assert unmarked(readme.replace("<!-- results: prepare_throughput", added)) == ["3.5x"]


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_results_file_records_its_machine(path):
    record = json.loads(path.read_text(encoding="utf-8")).get("machine")
    assert isinstance(record, dict), f"{path.name}: no machine record (benchmarks/machine.py)"
    assert MACHINE_KEYS <= set(record), f"{path.name}: machine lacks {sorted(MACHINE_KEYS - set(record))}"
    unknown = sorted(k for k in MACHINE_KEYS if record[k] is None and k != "gpu")
    if unknown:  # written before machine(): says where what it knows came from
        assert record.get("recorded_from"), f"{path.name}: {unknown} unknown and no recorded_from"


def test_machine_reads_this_machine():
    record = machine()
    assert MACHINE_KEYS - {"load_average_at_end"} <= set(record)
    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split(":", 1)[1].split())
    assert record["cpu_flags"] == {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")}
    assert 1 <= record["physical_cores"] <= record["logical_cpus"]
    assert record["torch_threads"] >= 1 and record["cpu"] != "unknown CPU"
