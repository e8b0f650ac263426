"""`lmforge prepare --task sft` record rules the other tests leave open (data/tasks.py): duplicates are exact
(prompt, completion) pairs, not texts that join the same; a conversation must end with the assistant's reply; a
classify label is read stripped and is a string or an integer, not a boolean; texts with more than one label
are counted as conflicts; a record's Windows line ends become newlines."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from lmforge.data.tasks import read_task_manifest
from test_tasks import decoded, make_base, prepare, reverse_records, write_jsonl


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"))


def test_pairs_whose_texts_join_the_same_are_not_duplicates(base, tmp_path):
    # the template writes "a" as "a\n" and "a\nb" as "a\nb\n": both pairs read "a\nb\nc" once joined
    split = [{"prompt": "a", "completion": "b\nc"}, {"prompt": "a\nb", "completion": "c"},
             {"prompt": "ab", "completion": "c"}, {"prompt": "a", "completion": "bc"}]
    records = reverse_records(20) + split + [split[0]]  # one real duplicate
    distinct = {(r["prompt"], r["completion"]) for r in records}
    assert prepare(base, tmp_path / "out", write_jsonl(tmp_path / "r.jsonl", records)) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["duplicates"] == len(records) - len(distinct) == 1
    kept = {(p[:-1], c) for rows in decoded(tmp_path / "out").values() for p, c, _ in rows}  # prompt + "\n"
    assert {(r["prompt"], r["completion"]) for r in split} <= kept


@pytest.mark.parametrize("skip", [False, True])
def test_a_conversation_that_does_not_end_with_the_assistant_is_a_bad_record(base, tmp_path, capsys, skip):
    good = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("one", "two", "three", "four", "five", "six", "seven", "eight")]
    bad = {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "and then?"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", good[:3] + [bad] + good[3:])
    code = prepare(base, tmp_path / "out", path, extra=("--skip-bad",) if skip else ())
    if not skip:
        assert code == 2
        err = capsys.readouterr().err
        assert "chat.jsonl:4" in err and "not the assistant's reply" in err
        return
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["bad_records"] == 1 and "not the assistant's reply" in report["bad"][0]["reason"]
    assert sum(len(rows) for rows in decoded(tmp_path / "out").values()) == len(good)


def test_classify_labels_are_read_stripped_and_a_boolean_label_is_a_bad_record(base, tmp_path):
    records = [{"text": f"text {i}", "label": [" pos", "pos ", "neg", " neg "][i % 4]} for i in range(16)]
    records.insert(5, {"text": "a flag", "label": True})
    records += [{"text": "text 2", "label": "pos"}, {"text": "text 3", "label": "pos"}]  # 2 texts, 2 labels each
    path = write_jsonl(tmp_path / "c.jsonl", records)
    assert main(["prepare", str(path), "--task", "classify", "--tokenizer", str(base), "--out", str(tmp_path / "out"),
                 "--skip-bad"]) == 0
    manifest = read_task_manifest(tmp_path / "out")
    assert manifest["labels"] == ["neg", "pos"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["bad_records"] == 1 and "c.jsonl:6" in report["bad"][0]["where"]
    assert "is a bool" in report["bad"][0]["reason"] and report["conflicts"] == 2


def test_windows_line_ends_in_a_record_are_read_as_newlines(base, tmp_path):
    records = reverse_records(12) + [{"prompt": "x\r\ny", "completion": "one\r\ntwo"}]
    assert prepare(base, tmp_path / "out", write_jsonl(tmp_path / "r.jsonl", records)) == 0
    kept = [(p, c) for rows in decoded(tmp_path / "out").values() for p, c, _ in rows]
    assert ("x\ny\n", "one\ntwo") in kept and not any("\r" in p + c for p, c in kept)
