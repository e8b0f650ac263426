"""`lmforge prepare --task unpaired`: records (prompt, completion, label) -> examples marked desirable or not, for KTO.

Unpaired preference data is what thumbs up / thumbs down feedback gives: one completion of a prompt and whether
people liked it, with no second completion to compare it with (TRL's unpaired preference layout: prompt, completion,
label; KTO, Ethayarajh et al. 2024). The same readers, templates and chat prompts as `--task preference`: a prompt is
a string rendered by the template or a list of {"role", "content"} turns; the completion a string or a list of one
assistant turn.

- label    true / false (JSON booleans), 1 / 0, or the strings "true" / "false" / "1" / "0" (any case: CSV cells);
           anything else is a bad record (an error naming FILE:N, or with ``skip_bad`` counted and listed).
- pairs    a record with chosen and rejected fields and no completion field (preference data) becomes two examples,
           the chosen completion desirable and the rejected one not (TRL's unpair_preference_dataset); the two stay
           in one split.
- dedupe   exact duplicates of (prompt text, completion, label) are removed and counted (unless
           ``keep_duplicates``); a prompt and completion labelled both ways is counted as a conflict and kept.
- split    stratified by label (data.tasks.stratified_split, a pair's two examples as one item of their own kind),
           then each split shuffled: val and test get desirable and undesirable examples whenever there are 3 or more
           of each. Leakage as sft's.
- encode   example = [start] + prompt + completion + [end], stored as sft examples (loss mask on the completion,
           truncation as sft's) with ``desirable`` (n,) uint8 beside them (layout in docs/CONTRACTS.md).

Training (train/preference.py) builds, for each batch, the mismatched rows KTO estimates its KL term from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from lmforge.data.preference import completion_field, read_prompted_records, record_preference, record_prompt
from lmforge.data.shards import SPLITS
from lmforge.data.tasks import (MAX_LISTED_BAD, BadRecord, Fields, _leakage, _write_task_dir, encode_split,
                                report_tail_lines, stratified_split)
from lmforge.errors import DataError

LABELS = {"true": 1, "false": 0, "1": 1, "0": 0}


def record_unpaired(record: dict, template: dict, fields: Fields) -> list[tuple[str, str, int, bool]]:
    """The examples of one record, each (prompt text, completion, 1 if desirable else 0, whether the prompt is a
    conversation): one, or two for a preference pair (module docstring); BadRecord says why it cannot be used."""
    if fields.completion not in record and fields.chosen in record and fields.rejected in record:
        prompt, chosen, rejected, chat, _ = record_preference(record, template, fields)  # (a margin: unused)
        return [(prompt, chosen, 1, chat), (prompt, rejected, 0, chat)]
    prompt, chat = record_prompt(record, template, fields)
    completion = completion_field(record, fields.completion, "completion", template, fields)
    label = record.get(fields.label)
    if label is None:
        raise BadRecord(f"no field {fields.label!r} (label: true for a desirable completion, false for not)")
    if isinstance(label, bool) or (isinstance(label, int) and label in (0, 1)):
        return [(prompt, completion, int(label), chat)]
    if isinstance(label, str) and label.strip().lower() in LABELS:
        return [(prompt, completion, LABELS[label.strip().lower()], chat)]
    raise BadRecord(f"field {fields.label!r} (label) is {label!r}: give true or false (or 1 or 0)")


def prepare_unpaired(template: dict, fields: Fields, skip_bad: bool, keep_duplicates: bool,
                     split: tuple[float, float, float], seed: int, max_length: int, drop_long: bool,
                     warnings: list[str], warn: Callable[[str], None], *, header: dict, **common: Any) -> dict:
    """prepare_task for --task unpaired: read, dedupe, split by label, encode, write (module docstring); `warn`
    prints a warning and adds it to `warnings`, the report's (prepare_task's)."""
    groups, bad, records = read_prompted_records(
        common["files"], template, fields, skip_bad, record_unpaired,
        f"{fields.prompt!r}, {fields.completion!r} and {fields.label!r} (or {fields.chosen!r} and {fields.rejected!r})")
    found = [example for group in groups for example in group]
    group_of = [g for g, group in enumerate(groups) for _ in group]
    kept, duplicates = _dedupe(found, keep_duplicates)
    if len(kept) < 3:
        raise DataError(f"only {len(kept)} distinct example(s): give at least 3, one each for train, val and test")
    labels = np.array([found[i][2] for i in kept], dtype=np.int64)
    parts = split_groups(kept, [group_of[i] for i in kept], labels, split, seed)
    for name, idx in parts.items():
        if not len(idx):
            raise DataError(f"the {name} split has no examples ({len(kept)} in all): give more records, or larger "
                            "val/test fractions in --split")
    tok = common["tok"]
    encoded = {}
    for name, idx in parts.items():
        kept_idx = []
        enc = encode_split(tok, [(found[i][0], found[i][1]) for i in idx], max_length, drop_long, kept=kept_idx)
        enc.desirable = [found[int(idx[k])][2] for k in kept_idx]
        if not enc.tokens:
            raise DataError(f"the {name} split has no examples left: all {enc.dropped} were longer than "
                            f"max_length={max_length} and --drop-long dropped them; raise --max-length")
        encoded[name] = enc
    if labels.min() == labels.max():
        warn(f"every example is labelled {'desirable' if labels[0] else 'undesirable'}: KTO learns from both kinds "
             "(its paper also trains on one kind alone, with its weight raised)")
    texts = [(p, c) for p, c, _, _ in found]
    header = {"task": "unpaired", "template": template,
              "fields": {"prompt": fields.prompt, "completion": fields.completion, "label": fields.label},
              "example": "[start] prompt completion [end], with desirable 1 or 0", **header}
    return _write_task_dir(encoded, header, lambda entries: {
        "task": "unpaired", "records": records, "chat_records": sum(group[0][3] for group in groups),
        "pair_records": sum(len(group) == 2 for group in groups), "examples": len(found), "duplicates": duplicates, "conflicts": _conflicts([found[i] for i in kept]),
        "bad_records": len(bad), "bad": bad[:MAX_LISTED_BAD], "leakage": _leakage(texts, parts),
        "splits": {name: {"examples": entries[name]["examples"], "desirable": sum(encoded[name].desirable),
                          "undesirable": entries[name]["examples"] - sum(encoded[name].desirable),
                          "tokens": entries[name]["tokens"], "completion_tokens": encoded[name].completion_tokens,
                          "truncated": encoded[name].truncated, "dropped": encoded[name].dropped}
                   for name in SPLITS},
        "max_length": max_length, "template": template["name"], "warnings": warnings, "seed": seed}, **common)


def split_groups(kept: list[int], groups: list[int], labels: np.ndarray, split: tuple[float, float, float],
                 seed: int) -> dict[str, np.ndarray]:
    """{split: example indices}: the kept examples (their record's group, their label each) split by group,
    stratified by a group's kind (desirable, undesirable, or a pair: 2), then each split shuffled, so that a pair's
    two examples are never in different splits nor, but by chance, next to each other."""
    members: dict[int, list[int]] = {}
    for i, g in zip(kept, groups):
        members.setdefault(g, []).append(i)
    label_of = dict(zip(kept, labels.tolist()))
    order = list(members)
    kinds = np.array([2 if len(members[g]) == 2 else label_of[members[g][0]] for g in order], dtype=np.int64)
    rng = np.random.default_rng([seed % 2**63, 1])
    return {name: rng.permutation(np.array([i for k in idx.tolist() for i in members[order[k]]], dtype=np.int64))
            for name, idx in stratified_split(kinds, split, seed).items()}


def _dedupe(found: list[tuple[str, str, int, bool]], keep_duplicates: bool) -> tuple[list[int], int]:
    """Indices of the first occurrence of each (prompt, completion, label), and the number of duplicates removed."""
    if keep_duplicates:
        return list(range(len(found))), 0
    seen: dict[bytes, int] = {}
    for i, (prompt, completion, label, _) in enumerate(found):
        key = hashlib.blake2b(f"{label}:{len(prompt)}:{prompt}{completion}".encode("utf-8"), digest_size=16).digest()
        seen.setdefault(key, i)
    kept = sorted(seen.values())
    return kept, len(found) - len(kept)


def _conflicts(found: list[tuple[str, str, int, bool]]) -> int:
    """(prompt, completion) texts labelled both desirable and undesirable."""
    labels_of: dict[tuple[str, str], set] = {}
    for prompt, completion, label, _ in found:
        labels_of.setdefault((prompt, completion), set()).add(label)
    return sum(len(labels) > 1 for labels in labels_of.values())


def format_unpaired_report(report: dict) -> str:
    """The report of an unpaired preference dataset as text for the terminal."""
    lines = [f"{'split':<6} {'examples':>9} {'desirable':>10} {'undesirable':>12} {'tokens':>11} {'completion':>11} "
             f"{'truncated':>10} {'dropped':>8}"]
    for name, s in report["splits"].items():
        lines.append(f"{name:<6} {s['examples']:>9,} {s['desirable']:>10,} {s['undesirable']:>12,} {s['tokens']:>11,} "
                     f"{s['completion_tokens']:>11,} {s['truncated']:>10,} {s['dropped']:>8,}")
    lines.append(f"records: {report['records']:,} read ({report['chat_records']:,} conversations, "
                 f"{report['pair_records']:,} preference pairs of 2 examples each), "
                 f"{report['bad_records']:,} bad (skipped), {report['duplicates']:,} duplicate(s) removed, "
                 f"{report['conflicts']:,} labelled both ways; template {report['template']!r}, "
                 f"max_length {report['max_length']}")
    return "\n".join(lines + report_tail_lines(report, "example(s)"))
