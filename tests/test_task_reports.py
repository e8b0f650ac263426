"""The lines every task report ends with (data.tasks.report_tail_lines, shared by the sft, classify and preference
reports): the first 20 bad records, the count of the rest, the leakage line with its rule and unit."""

from __future__ import annotations

import pytest

from lmforge.data.tasks import report_tail_lines


def tail_report(bad: int) -> dict:
    """A task report with `bad` bad records (each with its place and reason) and a leakage count."""
    return {"bad": [{"where": f"in.jsonl:{i + 2}", "reason": f"reason {i}"} for i in range(bad)], "bad_records": bad,
            "leakage": {"rule": "same prompt text as a train example", "val": {"examples": 30, "leaked": 2},
                        "test": {"examples": 31, "leaked": 0}}}


@pytest.mark.parametrize("bad", [0, 19, 20, 21, 45])
def test_report_tail_lines_shows_the_first_20_bad_records_then_the_count_of_the_rest(bad):
    """Up to 20 bad records by place and reason, '... N more' for the others (none when there are 20 or fewer),
    then the leakage line: the report's rule, val and test leaked/examples, the unit."""
    lines = report_tail_lines(tail_report(bad), "pair(s)")
    expected = [f"  bad in.jsonl:{i + 2}: reason {i}" for i in range(min(bad, 20))]
    expected += [f"  ... {bad - 20} more in report.json"] if bad > 20 else []
    expected += ["leakage (same prompt text as a train example): val 2/30, test 0/31 pair(s)"]
    assert lines == expected


def test_report_tail_lines_takes_the_callers_rule():
    """A caller's rule (classify's: the same text) replaces the report's own in the leakage line."""
    lines = report_tail_lines(tail_report(0), "example(s)", rule="same text as a train example")
    assert lines == ["leakage (same text as a train example): val 2/30, test 0/31 example(s)"]
