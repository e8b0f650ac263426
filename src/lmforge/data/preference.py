"""`lmforge prepare --task preference`: records (prompt, chosen, rejected) -> pairs of examples for DPO.

A record holds a prompt and two completions of it: the one people preferred (chosen) and the other (rejected), the
layout of TRL's preference datasets (Anthropic HH, UltraFeedback binarized). The same readers as sft (.jsonl, .csv,
.tsv, .parquet, folders) and the same template: a string prompt is rendered by the template; a prompt that is a list
of {"role", "content"} turns (a conversation so far) by the chat template, ending with the reply's header. chosen
and rejected are strings, or lists holding one assistant turn (TRL's conversational form).

- bad      a missing or empty field, a wrong type, or chosen equal to rejected (nothing to prefer): an error naming
           FILE:N, or with ``skip_bad`` counted and listed in the report.
- margin   an optional number per record ("margin", TRL's RewardTrainer column): how much more the chosen completion
           is preferred (e.g. from ratings), which a reward model's loss then asks its rewards to differ by; a
           dataset with margins stores one for every pair (0 for a record without one), a margin that is not a finite
           number is a bad record. Other losses ignore it.
- dedupe   exact duplicates of (prompt text, chosen, rejected) are removed and counted (unless ``keep_duplicates``).
- split    pairs shuffled with ``seed`` and cut by the split fractions; leakage as sft's (a val/test pair whose
           prompt text is a train pair's).
- encode   pair i is example 2i = [start] + prompt + chosen + [end] and example 2i + 1 = [start] + prompt + rejected
           + [end], stored as sft examples (``tokens``, ``offsets``, ``prompt_lengths``; layout in docs/CONTRACTS.md),
           so that each completion carries the loss mask sft's does. Both keep the same prompt tokens: a pair longer
           than ``max_length`` loses prompt tokens from the left until the longer completion fits, then a completion
           still too long is cut from the right (its end token goes), as sft's; with ``drop_long`` the pair is dropped.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lmforge.data.conversation import chat_turns
from lmforge.data.prepare import split_counts
from lmforge.data.shards import SPLITS
from lmforge.data.tasks import (MAX_LISTED_BAD, BadRecord, Encoded, Fields, _leakage, _read_records, _text,
                                _write_task_dir, check_template_fields, encode_example, render_chat, render_prompt,
                                reply_text, report_tail_lines)
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import Tokenizer

MARGIN = "margin"  # the record field of a pair's margin (TRL's RewardTrainer column)


def record_preference(record: dict, template: dict, fields: Fields) -> tuple[str, str, str, bool, Optional[float]]:
    """(prompt text, chosen, rejected, whether the prompt is a conversation, margin or None) of one record;
    BadRecord says why not."""
    prompt, chat = record_prompt(record, template, fields)
    chosen, rejected = (completion_field(record, name, role, template, fields)
                        for name, role in ((fields.chosen, "chosen"), (fields.rejected, "rejected")))
    if chosen == rejected:
        raise BadRecord(f"{fields.chosen!r} and {fields.rejected!r} are the same text: a pair needs two different "
                        "completions to prefer one")
    margin = record.get(MARGIN)
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        raise BadRecord(f"field {MARGIN!r} is {margin!r}: give a finite number (how much more the chosen completion "
                        "is preferred), or leave it out")
    return prompt, chosen, rejected, chat, None if margin is None else float(margin)


def record_prompt(record: dict, template: dict, fields: Fields) -> tuple[str, bool]:
    """(prompt text, whether it is a conversation) of a preference record: a string prompt rendered by the template,
    or a list of {"role", "content"} turns (tool calls and results too, with the record's tools: data.conversation)
    by the chat template, ending with the reply's header."""
    if record.get(fields.prompt) is None:
        raise BadRecord(f"no field {fields.prompt!r} (prompt)")
    turns = record[fields.prompt]
    chat = isinstance(turns, list)
    if chat:
        try:
            prompt = render_chat(template, _turns(turns, fields.prompt), record.get(fields.tools))
        except ConfigError as e:  # a malformed conversation, or one the model's own chat template refuses
            raise BadRecord(str(e)) from None
    else:
        values = {name: _text(record, fields.prompt if name == "prompt" else name, "used by the template")
                  for name in template["fields"]}
        prompt = render_prompt(template, values)
    return prompt, chat


def _turns(turns: list, where: str) -> list[dict]:
    """A conversation's turns (data.conversation.chat_turns), their text with Windows line ends made plain."""
    if not turns:
        raise BadRecord(f"field {where!r} is a list but not of {{\"role\": string, \"content\": string}} turns")
    return [{**t, "content": t["content"].replace("\r\n", "\n")} if t["content"] else t
            for t in chat_turns(turns, where)]


def completion_field(record: dict, name: str, role: str, template: dict, fields: Fields) -> str:
    """A completion field: a string, or a list of one assistant turn (its text; for a turn that calls tools, the
    calls as the template writes them after the record's prompt turns: data.tasks.reply_text)."""
    value = record.get(name)
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise BadRecord(f"field {name!r} ({role}) is a list but not one {{\"role\": \"assistant\", \"content\": "
                            "string}} turn")
        try:
            turn = chat_turns(value, name)
            prompt = record.get(fields.prompt) if turn[0].get("tool_calls") else None
            value = reply_text(template, (_turns(prompt, fields.prompt) if isinstance(prompt, list) else []) + turn,
                               record.get(fields.tools))
        except ConfigError as e:
            raise BadRecord(str(e)) from None
        value = value.replace("\r\n", "\n")
    else:
        value = _text(record, name, role)
    if not value.strip():
        raise BadRecord(f"empty {role} completion (field {name!r})")
    return value


def read_prompted_records(files: list[Path], template: dict, fields: Fields, skip_bad: bool,
                          parse: Callable[[dict, dict, Fields], tuple], field_names: str
                          ) -> tuple[list, list[dict], int]:
    """(``parse(record, template, fields)`` of every usable record, the bad records, the records read) of preference
    or unpaired records; the first record whose prompt is a string is checked against the template's fields.
    DataError when no record is usable, naming the fields (``field_names``) a record needs."""
    found: list = []
    checked = False

    def parse_checked(record: dict, where: str) -> tuple:
        nonlocal checked
        if not checked and isinstance(record.get(fields.prompt), str):
            check_template_fields(template, record, fields, where)
            checked = True
        return parse(record, template, fields)

    bad, records = _read_records(files, parse_checked, skip_bad, found, [])
    if not found:
        raise DataError(f"no usable records in {len(files)} file(s) ({records} read, {len(bad)} bad): give records "
                        f"with the fields {field_names}")
    return found, bad, records


def encode_pairs(tok: Tokenizer, pairs: list[tuple[str, str, str]], max_length: int, drop_long: bool,
                 margins: Optional[list[float]] = None) -> Encoded:
    """Encode (prompt, chosen, rejected) texts as examples 2i, 2i + 1 (module docstring); counts are per pair;
    margins: each pair's, kept on both its examples (None: the dataset has none)."""
    out = Encoded(margins=None if margins is None else [])
    start = 0 if tok.start_id is None else 1
    prompts = tok.encode_batch_arrays([p for p, _, _ in pairs])
    chosen = tok.encode_continuations([c for _, c, _ in pairs])  # cut as inside prompt + completion
    rejected = tok.encode_continuations([r for _, _, r in pairs])
    for k, (prompt, c, r) in enumerate(zip(prompts, chosen, rejected)):
        longest = max(len(c), len(r))
        cut = start + len(prompt) + longest + 1 > max_length
        if cut and drop_long:
            out.dropped += 1
            continue
        if cut:  # the same prompt tokens for both: shortened for the longer completion
            room = max(max_length - start - longest - 1, 0)
            prompt = prompt[len(prompt) - room:] if room else prompt[:0]
        encoded = [encode_example(tok, prompt, completion, max_length, False) for completion in (c, r)]
        if out.margins is not None:
            out.margins += [margins[k]] * 2
        out.truncated += cut
        for ids, prompt_length, _ in encoded:
            out.tokens.append(ids)
            out.prompt_lengths.append(prompt_length)
            out.completion_tokens += len(ids) - prompt_length
    return out


def prepare_preference(template: dict, fields: Fields, skip_bad: bool, keep_duplicates: bool,
                       split: tuple[float, float, float], seed: int, max_length: int, drop_long: bool,
                       warnings: list[str], *, header: dict, **common: Any) -> dict:
    """prepare_task for --task preference: read, dedupe, split, encode pairs, write (module docstring)."""
    found, bad, records = read_prompted_records(common["files"], template, fields, skip_bad, record_preference,
                                                f"{fields.prompt!r}, {fields.chosen!r} and {fields.rejected!r}")
    triples = [(p, c, r) for p, c, r, _, _ in found]
    has_margins = any(m is not None for *_, m in found)
    margins = [0.0 if m is None else m for *_, m in found]
    kept, duplicates = _dedupe_triples(triples, keep_duplicates)
    if len(kept) < 3:
        raise DataError(f"only {len(kept)} distinct pair(s): give at least 3, one each for train, val and test")
    order = np.random.default_rng(seed).permutation(np.array(kept, dtype=np.int64))
    n_train, n_val, _ = split_counts(len(order), split)
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    encoded = {name: encode_pairs(common["tok"], [triples[i] for i in idx], max_length, drop_long,
                                  [margins[i] for i in idx] if has_margins else None)
               for name, idx in parts.items()}
    for name, enc in encoded.items():
        if not enc.tokens:
            raise DataError(f"the {name} split has no pairs left: all {enc.dropped} were longer than "
                            f"max_length={max_length} and --drop-long dropped them; raise --max-length")
    header = {"task": "preference", "template": template,
              "fields": {"prompt": fields.prompt, "chosen": fields.chosen, "rejected": fields.rejected},
              "example": "pair i: examples 2i ([start] prompt chosen [end]) and 2i+1 ([start] prompt rejected [end])",
              **header}
    return _write_task_dir(encoded, header, lambda entries: {
        "task": "preference", "records": records, "chat_records": sum(chat for *_, chat, _ in found),
        "pairs_with_margin": sum(m is not None for *_, m in found),
        "pairs": len(found), "duplicates": duplicates, "bad_records": len(bad), "bad": bad[:MAX_LISTED_BAD],
        "leakage": _leakage([(p, c) for p, c, _ in triples], parts),
        "splits": {name: {"pairs": entries[name]["examples"] // 2, "tokens": entries[name]["tokens"],
                          "completion_tokens": encoded[name].completion_tokens,
                          "truncated": encoded[name].truncated, "dropped": encoded[name].dropped}
                   for name in SPLITS},
        "max_length": max_length, "template": template["name"], "warnings": warnings, "seed": seed}, **common)


def _dedupe_triples(triples: list[tuple[str, str, str]], keep_duplicates: bool) -> tuple[list[int], int]:
    """Indices of the first occurrence of each (prompt, chosen, rejected), and the number of duplicates removed."""
    if keep_duplicates:
        return list(range(len(triples))), 0
    seen: dict[bytes, int] = {}
    for i, (prompt, chosen, rejected) in enumerate(triples):
        key = hashlib.blake2b(f"{len(prompt)}:{len(chosen)}:{prompt}{chosen}{rejected}".encode("utf-8"),
                              digest_size=16).digest()
        seen.setdefault(key, i)
    kept = sorted(seen.values())
    return kept, len(triples) - len(kept)


def format_preference_report(report: dict) -> str:
    """The report of a preference dataset as text for the terminal."""
    lines = [f"{'split':<6} {'pairs':>9} {'tokens':>11} {'completion':>11} {'truncated':>10} {'dropped':>8}"]
    for name, s in report["splits"].items():
        lines.append(f"{name:<6} {s['pairs']:>9,} {s['tokens']:>11,} {s['completion_tokens']:>11,} "
                     f"{s['truncated']:>10,} {s['dropped']:>8,}")
    lines.append(f"records: {report['records']:,} read ({report['chat_records']:,} conversations), "
                 f"{report['bad_records']:,} bad (skipped), {report['duplicates']:,} duplicate(s) removed; "
                 f"template {report['template']!r}, max_length {report['max_length']}")
    if report.get("pairs_with_margin"):  # reward models' margins (0 for the pairs without one)
        lines.append(f"margins: {report['pairs_with_margin']:,} of {report['pairs']:,} pairs (0 for the others)")
    return "\n".join(lines + report_tail_lines(report, "pair(s)"))
