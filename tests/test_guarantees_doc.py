"""docs/GUARANTEES.md names, for each guarantee, the tests that prove it: every name must be a test that exists, so
that a renamed or deleted test cannot leave a guarantee proved by nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def named_tests(text: str) -> list[tuple[str, str]]:
    """(test file, test name) for each `tests/FILE.py::name` in `text`, and each `::name` after it (same file)."""
    found, current = [], None
    for m in re.finditer(r"`(tests/[\w/]+\.py)?::(\w+)`|`(tests/[\w/]+\.py)`", text):
        if m[3]:
            current = m[3]
            continue
        current = m[1] or current
        assert current is not None, f"::{m[2]} names no file"
        found.append((current, m[2]))
    return found


def test_every_test_the_guarantees_name_exists():
    text = (ROOT / "docs" / "GUARANTEES.md").read_text(encoding="utf-8")
    named = named_tests(text)
    assert len(named) >= 30  # the table is read, not skipped
    missing = []
    for path, name in named:
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        if name not in functions:
            missing.append(f"{path}::{name}")
    assert not missing, f"GUARANTEES.md names tests that do not exist: {missing}"


def test_the_reader_sees_a_missing_test():
    assert named_tests("`tests/test_faults.py::a`, `::b` and `tests/test_cli.py` `::c`") == [
        ("tests/test_faults.py", "a"), ("tests/test_faults.py", "b"), ("tests/test_cli.py", "c")]
