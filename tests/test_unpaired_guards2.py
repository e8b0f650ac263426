"""More guards for unpaired preference data (KTO) that tests/test_unpaired.py and test_unpaired_guards.py leave
open: a record with a completion is one example even beside chosen and rejected fields, split_groups stratifies a
pair as a kind of its own and is deterministic from its seed, and the terminal report puts each count in its own
column and place."""

from __future__ import annotations

import json

import numpy as np

from lmforge.data.unpaired import format_unpaired_report, split_groups
from test_tasks import write_jsonl
from test_unpaired import base, prepare_unpaired, texts, unpaired_records  # noqa: F401


def test_a_record_with_a_completion_is_one_example_even_with_chosen_and_rejected(base, tmp_path):
    """Only a record with chosen and rejected and *no* completion is a preference pair: a record that has a
    completion (and a label) is one example of that completion, whatever other fields it carries."""
    records = [{**r, "chosen": r["prompt"] + "!", "rejected": r["prompt"] + "?"} if i % 2 else r
               for i, r in enumerate(unpaired_records(24))]
    assert prepare_unpaired(base, tmp_path / "data", write_jsonl(tmp_path / "u.jsonl", records)) == 0
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert (report["records"], report["pair_records"], report["examples"]) == (24, 0, 24)
    expected = {(r["prompt"] + "\n", r["completion"]): r["label"] for r in records}
    rows = [row for split in ("train", "val", "test") for row in texts(tmp_path / "data", split)]
    assert sorted((p, c) for p, c, _ in rows) == sorted(expected)
    assert all(expected[(p, c)] == d for p, c, d in rows)


def mixed_groups() -> tuple[list[int], list[int], np.ndarray, set[int]]:
    """30 pairs (two examples of one group, desirable then not), 30 desirable and 30 undesirable singles, interleaved:
    (kept example indices, their groups, their labels, the groups that are pairs)."""
    groups, labels = [], []
    for g in range(90):
        kind = g % 3  # 0: a pair, 1: a desirable single, 2: an undesirable single
        for label in ((1, 0) if kind == 0 else (1,) if kind == 1 else (0,)):
            groups.append(g)
            labels.append(label)
    return list(range(len(groups))), groups, np.array(labels, dtype=np.int64), set(range(0, 90, 3))


def test_split_groups_stratifies_pairs_as_a_kind_of_their_own():
    """A pair is a kind of its own beside desirable and undesirable singles: with 30 of each and a 60/20/20 split,
    every split holds 18 / 6 / 6 groups of each kind (so both halves of every pair, and equal numbers of desirable and
    undesirable examples), whatever the seed."""
    kept, groups, labels, pairs = mixed_groups()
    for seed in range(4):
        parts = split_groups(kept, groups, labels, (0.6, 0.2, 0.2), seed)
        assert sorted(np.concatenate(list(parts.values())).tolist()) == kept  # every example once
        for name, n in (("train", 18), ("val", 6), ("test", 6)):
            idx = parts[name].tolist()
            in_split = {groups[i] for i in idx}
            assert len(in_split & pairs) == n, (seed, name)
            assert len([g for g in in_split - pairs if g % 3 == 1]) == n
            assert len([g for g in in_split - pairs if g % 3 == 2]) == n
            assert all(groups.count(g) == [groups[i] for i in idx].count(g) for g in in_split)  # whole pairs
            assert int(labels[idx].sum()) == len(idx) // 2 == 2 * n


def test_split_groups_is_deterministic_from_the_seed():
    """The same seed gives the same splits in the same order (prepare is reproducible); another seed another
    order."""
    kept, groups, labels, _ = mixed_groups()
    one = split_groups(kept, groups, labels, (0.6, 0.2, 0.2), 7)
    two = split_groups(kept, groups, labels, (0.6, 0.2, 0.2), 7)
    other = split_groups(kept, groups, labels, (0.6, 0.2, 0.2), 8)
    assert all(one[name].tolist() == two[name].tolist() for name in one)
    assert any(one[name].tolist() != other[name].tolist() for name in one)


def test_the_terminal_report_puts_each_count_in_its_place():
    """format_unpaired_report: each split's row gives examples, desirable, undesirable, tokens, completion tokens,
    truncated and dropped in that order, and the records line names each count with its own word."""
    splits = {"train": (40, 25, 15, 900, 400, 3, 2), "val": (6, 4, 2, 120, 50, 1, 0),
              "test": (5, 2, 3, 110, 45, 0, 1)}
    keys = ("examples", "desirable", "undesirable", "tokens", "completion_tokens", "truncated", "dropped")
    report = {"splits": {name: dict(zip(keys, values)) for name, values in splits.items()}, "records": 47,
              "chat_records": 5, "pair_records": 4, "bad_records": 2, "duplicates": 7, "conflicts": 3,
              "template": "plain", "max_length": 64, "bad": [{"where": "u.jsonl:9", "reason": "no label"}],
              "leakage": {"rule": "exact", "val": {"leaked": 0, "examples": 6}, "test": {"leaked": 1, "examples": 5}}}
    lines = format_unpaired_report(report).splitlines()
    header = "split examples desirable undesirable tokens completion truncated dropped"
    assert lines[0].split() == header.split()
    for line, (name, values) in zip(lines[1:4], splits.items()):
        assert line.split() == [name, *map(str, values)]
    assert ("records: 47 read (5 conversations, 4 preference pairs of 2 examples each), 2 bad (skipped), "
            "7 duplicate(s) removed, 3 labelled both ways; template 'plain', max_length 64") == lines[4]
    assert "u.jsonl:9: no label" in lines[5] and lines[6].endswith("test 1/5 example(s)")


def test_weights_at_the_exact_ends_of_the_advised_ranges_balance_the_data():
    """KTO's rule is the closed interval [1, 4/3]: a desirable weight of exactly lambda_U n_U / n_D or 4/3 of it (or an
    undesirable weight of exactly lambda_D n_D / n_U or 3/4 of it) is accepted for any counts, though the product
    n_D lambda_D / (lambda_U n_U) may land a rounding error outside the interval (e.g. 7 and 61)."""
    from lmforge.preference_loss import kto_weight_advice

    for nd in range(1, 80):
        for nu in (1, 5, 61, 100, 137):
            for wd in (nu / nd, 4 * nu / nd / 3, 4 * (nu / nd) / 3):
                assert kto_weight_advice(nd, nu, wd, 1.0) is None, (nd, nu, wd)
            for wu in (nd / nu, 3 * (nd / nu) / 4):
                assert kto_weight_advice(nd, nu, 1.0, wu) is None, (nd, nu, wu)
    assert kto_weight_advice(7, 61, 61 / 7 * 0.999, 1.0) is not None  # just outside: still advised
    assert kto_weight_advice(1, 5, 4 * 5 / 3 * 1.001, 1.0) is not None


def test_a_kto_checkpoint_is_not_evaluated_on_pair_data(base, tmp_path, capsys):
    """`lmforge eval` of a checkpoint trained with an unpaired loss (kto) on preference pairs is refused, naming the
    loss and the data (the converse of a pair-loss checkpoint on unpaired data)."""
    from lmforge.cli import main
    from lmforge.train import Trainer
    from test_preference import prepare_pairs, preference_records
    from test_unpaired import kto

    data = tmp_path / "unpaired"
    assert prepare_unpaired(base, data, write_jsonl(tmp_path / "u.jsonl", unpaired_records(40))) == 0
    run = Trainer(kto(tmp_path / "run", data, base, **{"train.max_steps": 1}), progress=False, tensorboard=False)
    run.fit()
    pairs = tmp_path / "pairs"
    assert prepare_pairs(base, pairs, write_jsonl(tmp_path / "p.jsonl", preference_records(30))) == 0
    capsys.readouterr()
    assert main(["eval", str(run.last_checkpoint), "--data", str(pairs), "--split", "val",
                 "--out", str(tmp_path / "eval")]) == 2
    assert "preference_loss kto, a loss of single completions, and this is preference data" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "metrics.json").exists()
    assert main(["eval", str(run.last_checkpoint), "--data", str(data), "--split", "val",
                 "--out", str(tmp_path / "eval")]) == 0  # its own kind of data


def test_a_conversation_pair_counts_as_one_conversation_record(base, tmp_path):
    """report.json's chat_records counts records, not examples: a preference pair with a chat prompt is one
    conversation record though it gives two examples."""
    from test_preference import preference_records

    pairs = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in preference_records(10, seed=3)]
    singles = [r for r in unpaired_records(40) if r["prompt"] not in {p["prompt"][0]["content"] for p in pairs}][:20]
    assert prepare_unpaired(base, tmp_path / "data", write_jsonl(tmp_path / "u.jsonl", pairs + singles)) == 0
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert (report["records"], report["chat_records"], report["pair_records"], report["examples"]) == (30, 10, 10, 40)


def test_the_plan_of_unpaired_data_says_what_its_tokens_are():
    """`lmforge plan --task unpaired` (format_plan): the training tokens line says they are unpaired completions
    with their mismatched rows' forward, and the FLOPs line names the reference's forward; token data says neither."""
    from lmforge.plan import format_plan, plan
    from test_plan import config

    text = format_plan(plan(config(**{"train.preference_loss": "kto"}), device="h100", task="unpaired"))
    line = next(s for s in text.splitlines() if s.startswith("training tokens"))
    assert line.endswith("20 per parameter) (unpaired completions, with their mismatched rows' forward)")
    assert "the reference's forward on every sequence" in text
    tokens = format_plan(plan(config(), device="h100"))
    assert "unpaired completions" not in tokens and "reference's forward" not in tokens
