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


def test_the_baseline_read_from_a_junit_file_matches_node_ids_as_pytest_reports_them(tmp_path):
    """make test hands the suite's JUnit XML to the check (--baseline) instead of running the named tests again: a
    parametrized node id is FAILED if any case failed, a test only skipped is SKIPPED, one absent NOT RUN."""
    junit = tmp_path / "junit.xml"
    junit.write_text("""<testsuites><testsuite>
      <testcase classname="tests.test_a" name="test_ok" time="0.1"/>
      <testcase classname="tests.test_a" name="test_p[1]" time="0.1"/>
      <testcase classname="tests.test_a" name="test_p[2]" time="0.1"><failure message="x"/></testcase>
      <testcase classname="tests.test_b.TestK" name="test_m" time="0.1"><skipped message="y"/></testcase>
      <testcase classname="tests.test_b" name="test_e" time="0.1"><error message="z"/></testcase>
    </testsuite></testsuites>""", encoding="utf-8")
    tests = ("tests/test_a.py::test_ok", "tests/test_a.py::test_p", "tests/test_a.py::test_p[1]",
             "tests/test_b.py::TestK::test_m", "tests/test_b.py::test_e", "tests/test_a.py::test_gone")
    assert mutation_check.junit_outcomes(junit, tests) == dict(zip(tests, [
        "PASSED", "FAILED", "PASSED", "SKIPPED", "FAILED", "NOT RUN"]))
