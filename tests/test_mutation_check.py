"""scripts/mutation_check.py stays runnable: every mutant's target text is in the code exactly once and every test
it names exists (the mutants themselves run with `make mutation`, also at the end of `make test`)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
mutation_check = sys.modules["mutation_check"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(mutation_check)


@pytest.mark.parametrize("mutant", mutation_check.MUTANTS, ids=lambda m: m.name)
def test_each_mutant_finds_its_target_and_its_tests(mutant):
    mutation_check.target(mutation_check.PACKAGE, mutant)  # raises SystemExit unless the text occurs exactly once
    assert mutant.new != mutant.old
    for test in mutant.tests:
        file, _, name = test.partition("::")
        function = re.sub(r"\[.*\]$", "", name)
        assert re.search(rf"^def {re.escape(function)}\(", (ROOT / file).read_text(encoding="utf-8"), re.M), test


def test_a_mutant_whose_target_is_gone_fails_loudly():
    gone = mutation_check.Mutant("gone", "model.py", "text that is not in the model", "x", ("tests/test_model.py",))
    with pytest.raises(SystemExit, match="gone: its target text occurs 0 times in src/lmforge/model.py"):
        mutation_check.target(mutation_check.PACKAGE, gone)
