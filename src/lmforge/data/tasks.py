"""`lmforge prepare --task sft`: records (prompt -> completion) -> template -> examples with a loss mask.

The pipeline (records are held in memory: fine-tuning sets are small next to pretraining corpora):

1. read     .jsonl (one JSON object per line), .csv / .tsv (a header line, then one record per row) and
            .parquet (one record per row) files, and folders of them (recursive). A record has a prompt and a
            completion field (names settable), or a messages field: a list of {"role", "content"} turns whose
            last one is the assistant's reply. Every record is named ``FILE:N``: the line of a .jsonl file, the
            first line of a .csv/.tsv row, the row (from 1) of a .parquet file.
2. render   the template turns a record into prompt text; the completion is the record's completion (or the
            last assistant turn). A bad record (broken line, missing field, wrong type, empty completion) is
            an error naming FILE:N, or with ``skip_bad`` is counted and listed in the report.
3. dedupe   exact duplicates of (prompt text, completion) are removed and counted (unless ``keep_duplicates``).
4. split    shuffled with ``seed`` and cut by the split fractions, as pretraining data is.
5. encode   with the base model's tokenizer: example = [start] + prompt ids + completion ids + [end] (no start
            token when the tokenizer has none, as GPT-2's); the first ``prompt_length`` tokens (start and prompt)
            carry no loss. An example longer than ``max_length`` tokens loses prompt tokens from the left (after
            the start token) until it fits; when even the completion and its end token do not fit, the
            completion is cut from the right (its end token then goes, so the model never learns to stop at a
            cut). With ``drop_long`` such examples are dropped instead. Both are counted per split.
6. write    DIR/{train,val,test}.safetensors (``tokens`` int32, ``offsets`` int64 (n+1), ``prompt_lengths`` int32
            (n)), DIR/tokenizer.json (the base's file, byte for byte), DIR/manifest.json (format
            ``lmforge-task-v1``, with the template) and DIR/report.json; layout in docs/CONTRACTS.md.

Leakage: a val or test example whose prompt text is also the prompt of a train example is counted as leaked
(exact match: for text-to-text data the same question with another answer is still the same question).
"""

from __future__ import annotations

import csv
import hashlib
import json
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

import lmforge
from lmforge.data.batches import Examples
from lmforge.data.corpus import decode_clean, find_files
from lmforge.data.prepare import split_counts
from lmforge.data.shards import MANIFEST, SPLITS
from lmforge.errors import DataError
from lmforge.files import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text, check_output, sha256_file
from lmforge.tokenizer import Tokenizer

FORMAT = "lmforge-task-v1"
TASKS = ("sft",)
RECORD_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")
REPORT = "report.json"
# Named prompt templates: fields in braces are record fields; {prompt} is the prompt field, whatever its name.
TEMPLATES = {
    "plain": "{prompt}\n",
    "instruct": "### Instruction:\n{prompt}\n\n### Response:\n",
}
DEFAULT_TEMPLATE = "plain"
# Records with a messages field: every turn before the reply, then the reply's header; the reply is the completion.
CHAT_TEMPLATE = {"turn": "<|{role}|>\n{content}\n", "reply": "<|assistant|>\n"}
MAX_LISTED_BAD = 1000  # bad records listed by name in the report (all are counted)


# ------------------------------------------------------------------------------------------ templates
def resolve_template(spec: str) -> dict:
    """The template a ``--template`` value names: a built-in name, or a string with {field}s.

    Returns ``{"name", "prompt", "fields", "chat"}`` as stored in the manifest and in checkpoints.
    Raises DataError for an unknown name or a malformed template string.
    """
    if spec in TEMPLATES:
        name, text = spec, TEMPLATES[spec]
    elif "{" in spec:
        name, text = "custom", spec
    else:
        raise DataError(f"unknown template {spec!r}: choose {', '.join(TEMPLATES)}, or give a template string with "
                        "{prompt}-style fields, e.g. 'Q: {prompt}\\nA: '")
    return {"name": name, "prompt": text, "fields": template_fields(text), "chat": dict(CHAT_TEMPLATE)}


def template_fields(text: str) -> list[str]:
    """The record fields a template string uses, in order of first use; DataError if it is malformed."""
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise DataError(f"template {text!r} is malformed ({e}): write a literal brace as {{{{ or }}}}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise DataError(f"template {text!r} has the field {{{name}{'!' + conversion if conversion else ''}"
                            f"{':' + spec if spec else ''}}}: use plain record field names such as {{prompt}}")
        if name not in fields:
            fields.append(name)
    return fields


def render_prompt(template: dict, values: dict[str, str]) -> str:
    """The template's prompt text for one record (``values`` holds every field the template uses)."""
    return template["prompt"].format_map(values)


def render_chat(template: dict, turns: list[dict]) -> str:
    """The prompt text of a conversation: every turn before the reply, then the reply's header."""
    chat = template["chat"]
    return "".join(chat["turn"].format(role=t["role"], content=t["content"]) for t in turns) + chat["reply"]


# -------------------------------------------------------------------------------------------- records
@dataclass
class Fields:
    """Which record fields hold the prompt, the completion and a conversation."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


class BadRecord(Exception):
    """A record that cannot become an example: the reason, in words."""


def read_records(path: Path) -> Iterator[tuple[str, Optional[dict], Optional[str]]]:
    """(where "FILE:N", record or None, problem or None) for every record of one file, in order."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_records(path)
    elif suffix in (".csv", ".tsv"):
        yield from _csv_records(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        yield from _parquet_records(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r} for task records; use "
                        f"{', '.join(RECORD_SUFFIXES)}")


def _open_binary(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e}): check its permissions") from None


def _jsonl_records(path: Path):
    with _open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            line, _ = decode_clean(raw)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{number}", None, f"not valid JSON ({e.msg})"
                continue
            if isinstance(record, dict):
                yield f"{path}:{number}", record, None
            else:
                yield f"{path}:{number}", None, f"a JSON {type(record).__name__}, not an object"


def _csv_records(path: Path, delimiter: str):
    with _open_binary(path) as f:
        text, _ = decode_clean(f.read())
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    first_line = 2  # the header is line 1
    try:
        for row in reader:
            where = f"{path}:{first_line}"
            first_line = reader.line_num + 1
            header = len(reader.fieldnames or ())
            if None in row:
                yield where, None, f"{header + len(row[None])} fields, the header has {header}"
            elif any(v is None for v in row.values()):
                yield where, None, f"{sum(v is not None for v in row.values())} fields, the header has {header}"
            else:
                yield where, row, None
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: cannot be read as {'TSV' if delimiter == chr(9) else 'CSV'} "
                        f"({e}): fix the file") from None


def _parquet_records(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path} cannot be read as parquet ({e}): check the file") from None
    number = 0
    for batch in pf.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            number += 1
            yield f"{path}:{number}", record, None


def _text(record: dict, name: str, role: str) -> str:
    """The string field ``name`` of a record (BadRecord if it is missing or not a string)."""
    if record.get(name) is None:
        raise BadRecord(f"no field {name!r} ({role})")
    value = record[name]
    if not isinstance(value, str):
        raise BadRecord(f"field {name!r} ({role}) is a {type(value).__name__}, not a string")
    return value.replace("\r\n", "\n")


def record_texts(record: dict, template: dict, fields: Fields) -> tuple[str, str]:
    """(prompt text, completion text) of one record; BadRecord says why it cannot be used."""
    if fields.prompt not in record and fields.messages in record:
        return _chat_texts(record, template, fields)
    if fields.prompt not in record:
        raise BadRecord(f"no field {fields.prompt!r} (prompt) or {fields.messages!r} (messages)")
    completion = _text(record, fields.completion, "completion")
    if not completion.strip():
        raise BadRecord(f"empty completion (field {fields.completion!r})")
    values = {name: _text(record, fields.prompt if name == "prompt" else name, "used by the template")
              for name in template["fields"]}
    return render_prompt(template, values), completion


def _chat_texts(record: dict, template: dict, fields: Fields) -> tuple[str, str]:
    turns = record[fields.messages]
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"field {fields.messages!r} must be a non-empty list of {{\"role\", \"content\"}} turns")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise BadRecord(f"{fields.messages}[{i}] is not a {{\"role\": string, \"content\": string}} turn")
    if turns[-1]["role"] != "assistant":
        raise BadRecord(f"the last turn of {fields.messages!r} is {turns[-1]['role']!r}, not the assistant's reply")
    if not turns[-1]["content"].strip():
        raise BadRecord(f"empty completion (the last assistant turn of {fields.messages!r})")
    return render_chat(template, turns[:-1]), turns[-1]["content"]


def check_template_fields(template: dict, record: dict, fields: Fields, where: str) -> None:
    """A template field that the first prompt/completion record lacks is a template error, not a bad record."""
    missing = [n for n in template["fields"] if (fields.prompt if n == "prompt" else n) not in record]
    if missing:
        raise DataError(f"the template {template['prompt']!r} uses {{{missing[0]}}}, but the record at {where} has no "
                        f"field {(fields.prompt if missing[0] == 'prompt' else missing[0])!r} (fields: "
                        f"{', '.join(map(str, record))}): fix --template or choose the field with --prompt-field")


# ------------------------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """One split's examples while they are built."""

    tokens: list[np.ndarray] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    completion_tokens: int = 0


def encode_example(tok: Tokenizer, prompt: np.ndarray, completion: np.ndarray, max_length: int,
                   drop_long: bool) -> tuple[Optional[np.ndarray], int, str]:
    """(ids, prompt_length, "ok" | "truncated" | "dropped") of one example; ids is None when dropped.

    ids = [start] + prompt + completion + [end]; prompt_length = tokens before the completion. The truncation
    policy is the module docstring's (step 5).
    """
    start = np.array([] if tok.start_id is None else [tok.start_id], dtype=np.int64)
    end = np.array([tok.end_id], dtype=np.int64)
    status = "ok"
    if len(start) + len(prompt) + len(completion) + 1 > max_length:
        if drop_long:
            return None, 0, "dropped"
        status = "truncated"
        room = max(max_length - len(start) - len(completion) - 1, 0)
        prompt = prompt[len(prompt) - room:] if room else prompt[:0]
        if len(start) + len(completion) + 1 > max_length:
            completion, end = completion[:max_length - len(start)], end[:0]
    ids = np.concatenate([start, prompt, completion, end])
    return ids, len(start) + len(prompt), status


def encode_split(tok: Tokenizer, pairs: list[tuple[str, str]], max_length: int, drop_long: bool) -> Encoded:
    """Encode (prompt text, completion text) pairs into examples (see encode_example)."""
    out = Encoded()
    prompts = tok.encode_batch_arrays([p for p, _ in pairs])
    completions = tok.encode_batch_arrays([c for _, c in pairs])
    for prompt, completion in zip(prompts, completions):
        ids, prompt_length, status = encode_example(tok, prompt, completion, max_length, drop_long)
        out.truncated += status == "truncated"
        out.dropped += status == "dropped"
        if ids is not None:
            out.tokens.append(ids)
            out.prompt_lengths.append(prompt_length)
            out.completion_tokens += len(ids) - prompt_length
    return out


def write_examples(path: Path, encoded: Encoded) -> dict:
    """Write one split's safetensors file; returns its manifest entry."""
    from safetensors.numpy import save_file

    lengths = np.array([len(t) for t in encoded.tokens], dtype=np.int64)
    tensors = {"tokens": np.concatenate(encoded.tokens).astype(np.int32),
               "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
               "prompt_lengths": np.array(encoded.prompt_lengths, dtype=np.int32)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT})
    return {"file": path.name, "examples": len(lengths), "tokens": int(lengths.sum()),
            "truncated": encoded.truncated, "dropped": encoded.dropped, "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------------------- the pipeline
def prepare_task(inputs: list[str], out: str, *, tokenizer_file: str | Path, base: str, max_length: int,
                 task: str = "sft", template: str = DEFAULT_TEMPLATE, fields: Optional[Fields] = None,
                 drop_long: bool = False, skip_bad: bool = False, keep_duplicates: bool = False,
                 split: tuple[float, float, float] = (0.9, 0.05, 0.05), seed: int = 1337, force: bool = False,
                 warn=None) -> dict:
    """Prepare the task dataset ``out`` from record files ``inputs``, encoded with the base model's tokenizer.

    tokenizer_file: the base checkpoint's tokenizer.json (copied unchanged); base: the path the user gave
    (recorded); max_length: most tokens per example (an example of L tokens trains on L-1 positions, so the
    base's block_size + 1 fills its context). Returns the report (also DIR/report.json). Raises DataError with
    one line; on error nothing is written and an existing ``out`` is untouched (replaced only with ``force``).
    """
    if task not in TASKS:
        raise DataError(f"task {task!r} is not supported: choose {', '.join(TASKS)}")
    if not inputs:
        raise DataError("no inputs: give .jsonl, .csv, .tsv or .parquet files or folders of them")
    if not (isinstance(max_length, int) and max_length >= 2):
        raise DataError(f"max_length={max_length!r} is invalid: an example needs at least 2 tokens")
    if len(split) != 3 or any(f <= 0 for f in split) or abs(sum(split) - 1.0) > 1e-6:
        raise DataError(f"split={tuple(split)} is invalid: give three positive fractions (train, val, test) summing to 1")
    fields = fields or Fields()
    tmpl = resolve_template(template)
    out_dir = Path(out)
    check_output(out_dir, force=force, ours=lambda p: (p / MANIFEST).is_file(), what="a prepared dataset",
                 error=DataError)
    tok = Tokenizer.load(tokenizer_file)
    warnings: list[str] = []

    def warn_line(message: str) -> None:
        warnings.append(message)
        (warn or (lambda m: print(f"warning: {m}", file=sys.stderr)))(message)

    files = find_files(inputs, warn=warn_line, suffixes=RECORD_SUFFIXES)
    pairs, bad, records, chat = _read(files, tmpl, fields, skip_bad)
    if not pairs:
        raise DataError(f"no usable records in {len(files)} file(s) ({records} read, {len(bad)} bad): give records with "
                        f"the fields {fields.prompt!r} and {fields.completion!r} (or {fields.messages!r})")
    kept, duplicates = _dedupe(pairs, keep_duplicates)
    if len(kept) < 3:
        raise DataError(f"only {len(kept)} distinct example(s): give at least 3, one each for train, val and test")
    order = np.random.default_rng(seed).permutation(np.array(kept, dtype=np.int64))
    n_train, n_val, _ = split_counts(len(order), split)
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}

    encoded = {name: encode_split(tok, [pairs[i] for i in idx], max_length, drop_long) for name, idx in parts.items()}
    for name, enc in encoded.items():
        if not enc.tokens:
            raise DataError(f"the {name} split has no examples left: all {enc.dropped} were longer than "
                            f"max_length={max_length} and --drop-long dropped them; raise --max-length")
    with atomic_dir(out_dir) as tmp:
        atomic_write_bytes(tmp / "tokenizer.json", Path(tokenizer_file).read_bytes())  # the base's, byte for byte
        entries = {name: write_examples(tmp / f"{name}.safetensors", enc) for name, enc in encoded.items()}
        manifest = {"format": FORMAT, "lmforge_version": lmforge.__version__, "task": task, "template": tmpl,
                    "fields": {"prompt": fields.prompt, "completion": fields.completion, "messages": fields.messages},
                    "vocab_size": tok.vocab_size,
                    "tokenizer": {"file": "tokenizer.json", "sha256": sha256_file(tmp / "tokenizer.json"),
                                  "kind": tok.kind},
                    "special_tokens": {"start": tok.start_id, "end": tok.end_id, "pad": tok.pad_id},
                    "base": str(base), "max_length": max_length, "long_examples": "drop" if drop_long else "truncate",
                    "seed": seed, "split": list(split), "splits": entries,
                    "sources": [{"path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files]}
        report = {"task": task, "records": records, "chat_records": chat, "examples": len(pairs),
                  "duplicates": duplicates, "bad_records": len(bad), "bad": bad[:MAX_LISTED_BAD],
                  "leakage": _leakage(pairs, parts),
                  "splits": {name: {"examples": entries[name]["examples"], "tokens": entries[name]["tokens"],
                                    "completion_tokens": encoded[name].completion_tokens,
                                    "truncated": encoded[name].truncated, "dropped": encoded[name].dropped}
                             for name in SPLITS},
                  "max_length": max_length, "template": tmpl["name"], "warnings": warnings, "seed": seed}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        atomic_write_text(tmp / REPORT, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report


def _read(files: list[Path], template: dict, fields: Fields, skip_bad: bool):
    """(pairs, bad records [{"where", "reason"}], records read, chat records) of every file."""
    pairs: list[tuple[str, str]] = []
    bad: list[dict] = []
    records = chat = 0
    checked = False
    for path in files:
        for where, record, problem in read_records(path):
            records += 1
            try:
                if problem is not None:
                    raise BadRecord(problem)
                if not checked and fields.prompt in record:
                    check_template_fields(template, record, fields, where)
                    checked = True
                pairs.append(record_texts(record, template, fields))
                chat += fields.prompt not in record
            except BadRecord as e:
                if not skip_bad:
                    raise DataError(f"{where}: {e}: fix or remove the record, or pass --skip-bad to skip such records "
                                    "(they are counted and listed in the report)") from None
                bad.append({"where": where, "reason": str(e)})
    return pairs, bad, records, chat


def _dedupe(pairs: list[tuple[str, str]], keep_duplicates: bool) -> tuple[list[int], int]:
    """Indices of the first occurrence of each (prompt, completion), and the number of duplicates removed."""
    if keep_duplicates:
        return list(range(len(pairs))), 0
    seen: dict[bytes, int] = {}
    for i, (prompt, completion) in enumerate(pairs):
        key = hashlib.blake2b(f"{len(prompt)}:{prompt}{completion}".encode("utf-8"), digest_size=16).digest()
        seen.setdefault(key, i)
    kept = sorted(seen.values())
    return kept, len(pairs) - len(kept)


def _leakage(pairs: list[tuple[str, str]], parts: dict[str, np.ndarray], max_examples: int = 5) -> dict:
    """Val/test examples whose prompt is also a train example's prompt (exact), counted and a few shown."""
    train_prompts = {pairs[i][0] for i in parts["train"].tolist()}
    result: dict[str, Any] = {"rule": "same prompt text as a train example", "examples": []}
    for split in ("val", "test"):
        leaked = [i for i in parts[split].tolist() if pairs[i][0] in train_prompts]
        result[split] = {"examples": len(parts[split]), "leaked": len(leaked)}
        result["examples"] += [{"split": split, "prompt": pairs[i][0][:80]} for i in leaked[:max_examples]]
    result["examples"] = result["examples"][:max_examples]
    return result


def format_task_report(report: dict) -> str:
    """The report of a task dataset as text for the terminal."""
    lines = [f"{'split':<6} {'examples':>9} {'tokens':>11} {'completion':>11} {'truncated':>10} {'dropped':>8}"]
    for name, s in report["splits"].items():
        lines.append(f"{name:<6} {s['examples']:>9,} {s['tokens']:>11,} {s['completion_tokens']:>11,} "
                     f"{s['truncated']:>10,} {s['dropped']:>8,}")
    lines.append(f"records: {report['records']:,} read ({report['chat_records']:,} conversations), "
                 f"{report['bad_records']:,} bad (skipped), {report['duplicates']:,} duplicate(s) removed; "
                 f"template {report['template']!r}, max_length {report['max_length']}")
    for b in report["bad"][:20]:
        lines.append(f"  bad {b['where']}: {b['reason']}")
    if report["bad_records"] > 20:
        lines.append(f"  ... {report['bad_records'] - 20} more in report.json")
    lk = report["leakage"]
    lines.append(f"leakage ({lk['rule']}): val {lk['val']['leaked']}/{lk['val']['examples']}, "
                 f"test {lk['test']['leaked']}/{lk['test']['examples']} example(s)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- reading
def is_task_data(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds task data (manifest format lmforge-task-v1); False for anything else."""
    try:
        return json.loads(Path(data_dir, MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError):
        return False


def read_task_manifest(data_dir: str | Path) -> dict:
    """Read and check DIR/manifest.json of task data; DataError naming the file and the fix."""
    path = Path(data_dir, MANIFEST)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{path} cannot be read as JSON ({type(e).__name__}): re-run `lmforge prepare --task ... "
                        "--force`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a task dataset manifest (format {FORMAT!r} expected): prepare it with "
                        "`lmforge prepare --task sft`")
    missing = [k for k in ("task", "template", "vocab_size", "tokenizer", "splits", "special_tokens") if k not in manifest]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: the manifest is corrupt, re-run `lmforge prepare --force`")
    tok = Path(data_dir, "tokenizer.json")
    if not tok.is_file() or sha256_file(tok) != manifest["tokenizer"].get("sha256"):
        raise DataError(f"{tok} is missing or differs from the sha256 in {path}: re-run `lmforge prepare --force`")
    return manifest


def load_examples(data_dir: str | Path, split: str) -> Examples:
    """The examples of one split of task data, checked against the manifest (counts, offsets, ids < vocab)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    manifest = read_task_manifest(data_dir)
    entry = manifest["splits"].get(split)
    path = Path(data_dir, f"{split}.safetensors")
    if not isinstance(entry, dict) or not path.is_file():
        raise DataError(f"{path} does not exist or is not in the manifest: the dataset is incomplete, re-run "
                        "`lmforge prepare --force`")
    try:
        arrays = load_file(path)
    except (OSError, SafetensorError) as e:
        raise DataError(f"{path} cannot be read ({e}): re-run `lmforge prepare --force`") from None
    tokens, offsets, prompt_lengths = (arrays.get(k) for k in ("tokens", "offsets", "prompt_lengths"))
    n = entry.get("examples")
    ok = (tokens is not None and offsets is not None and prompt_lengths is not None and isinstance(n, int)
          and tokens.ndim == offsets.ndim == prompt_lengths.ndim == 1 and len(offsets) == n + 1
          and len(prompt_lengths) == n and n > 0 and offsets[0] == 0 and offsets[-1] == len(tokens)
          and bool(np.all(np.diff(offsets) >= 2)) and bool(np.all(prompt_lengths >= 0))
          and bool(np.all(prompt_lengths < np.diff(offsets))) and len(tokens) and int(tokens.min()) >= 0
          and int(tokens.max()) < manifest["vocab_size"])
    if not ok:
        raise DataError(f"{path} does not hold the {n} examples its manifest describes (tokens, offsets, "
                        "prompt_lengths): the file is damaged, re-run `lmforge prepare --force`")
    return Examples(tokens, offsets, prompt_lengths)
