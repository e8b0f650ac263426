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

`lmforge prepare --task classify` (sentiment, intent, topic): the same readers, report and manifest format.

- record   a text field and a label field (names settable). A label is a non-empty string or an integer (its
           decimal text); anything else, an empty text, or a missing field is a bad record (error naming FILE:N,
           or counted and listed with ``skip_bad``). Exact duplicates of (text, label) are removed; texts that
           carry more than one label are counted as conflicts (and kept).
- labels   the sorted label names; a label's id is its index. A label needs at least 2 examples (one to train
           on, one to evaluate): a label seen once is most often a typo and is an error naming it and its record
           (with ``skip_bad`` the record is listed as bad). So no val/test label is ever unknown to train.
- split    stratified: each label's examples are shuffled with ``seed`` and cut by the split fractions
           (``split_counts``: val and test get at least one of every label with 3 or more examples; a label of
           2 gives one to train and one to val), then each split is shuffled. Counts per label per split are in
           the manifest and the report.
- encode   example = [start] + text ids + [end] (no start token when the tokenizer has none): the end token,
           the same for every example, is the last real token whose hidden state the classifier reads, after
           the whole text. Longer than ``max_length`` (default: the base's block_size): the text loses tokens
           from the right (its beginning is kept, the end token stays), counted as truncated; with
           ``drop_long`` dropped instead (an error if that leaves a val/test label without train examples).
- write    DIR/{train,val,test}.safetensors (``tokens`` int32, ``offsets`` int64 (n+1), ``labels`` int64 (n)).

`lmforge prepare --task preference` (pairs of completions for DPO): lmforge.data.preference, on these readers;
`--task unpaired` (single completions marked desirable or not, for KTO): lmforge.data.unpaired.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import string
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np

import lmforge
from lmforge.data.batches import Examples
from lmforge.data.conversation import calls_as_text, chat_tools, chat_turns, tools_turn, writes_calls
from lmforge.data.corpus import JSON_ERRORS, decode_clean, find_files, json_problem
from lmforge.data.prepare import split_counts
from lmforge.data.shards import MANIFEST, SPLITS, check_dataset_output
from lmforge.errors import ConfigError, DataError
from lmforge.files import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text, check_apart, sha256_file
from lmforge.tokenizer import HF_KIND, Tokenizer

FORMAT = "lmforge-task-v1"
TASKS = ("sft", "classify", "preference", "unpaired")
RECORD_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")
REPORT = "report.json"
# Named prompt templates: fields in braces are record fields; {prompt} is the prompt field, whatever its name.
TEMPLATES = {
    "plain": "{prompt}\n",
    "instruct": "### Instruction:\n{prompt}\n\n### Response:\n",
}
DEFAULT_TEMPLATE = "plain"
TEXT_TASKS = ("sft", "preference", "unpaired")  # tasks whose examples are prompt + completion, with a template
# Records with a messages field: every turn before the reply, then the reply's header; the reply is the completion.
CHAT_TEMPLATE = {"turn": "<|{role}|>\n{content}\n", "reply": "<|assistant|>\n"}
CHAT_MARKERS = tuple(f"<|{role}|>" for role in ("system", "user", "assistant", "tool", "tools"))  # its turns' heads
REPLY_PROBE = "lmforgeprobereply"  # a plain word no template changes: where a reply's text ends in a template
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


def own_chat(tok: Tokenizer) -> Optional[dict]:
    """The "chat" entry of a template for a tokenizer with its model's own Jinja chat template (an imported instruct
    model's: data.chat_template), with the special tokens it may write; None without one."""
    if getattr(tok, "chat_template", None) is None:
        return None
    names = tok.special_tokens
    return {"jinja": tok.chat_template, "bos_token": names[0] if tok.start_id is not None else None,
            "eos_token": names[1] if tok.end_id is not None else None,
            # an imported tokenizer reads a bos written in the text as the start token, and cuts what follows as
            # text after a special token (as apply_chat_template does); lmforge's own kinds would spell it out
            "keep_bos": tok.kind == HF_KIND}


def render_chat(template: dict, turns: list[dict], tools: Any = None, variables: Optional[dict] = None) -> str:
    """The prompt text of a conversation: every turn before the reply, then the reply's header. A model's own Jinja
    template keeps the start token it writes where the tokenizer reads it in text (kind hf: the text is then what
    apply_chat_template gives, and prompt_ids adds no second); for lmforge's own kinds it is left out (the encoding
    puts the start token first itself). Turns may call tools and tools may be given (data.conversation: a template
    that writes calls gets them as transformers gives them; lmforge's own format lists the tools in a first turn).
    `variables`: other values a model's own template reads (chat_template.render). ConfigError, in one line, for a
    malformed conversation or one the template refuses."""
    turns, tools = chat_turns(turns), chat_tools(tools)
    chat = template["chat"]
    if "jinja" in chat:
        text = _render_jinja(chat, turns, tools, add_generation_prompt=True, variables=variables)
        bos = chat["bos_token"]
        return text[len(bos):] if bos and text.startswith(bos) and not chat.get("keep_bos") else text
    listed = tools and chat.get("tools_turn", True)  # False: a model never fine-tuned on conversations
    turns = ([tools_turn(tools)] if listed else []) + [calls_as_text(t) for t in turns]
    return "".join(chat["turn"].format(role=t["role"], content=t["content"]) for t in turns) + chat["reply"]


def _render_jinja(chat: dict, turns: list[dict], tools: Optional[list[dict]], add_generation_prompt: bool,
                  variables: Optional[dict] = None) -> str:
    from lmforge.data import chat_template

    source = chat["jinja"]
    if not writes_calls(source):  # a template that knows no calls reads them as the turn's text
        turns = [calls_as_text(t) for t in turns]
    return chat_template.render(source, turns, add_generation_prompt=add_generation_prompt, tools=tools,
                                bos_token=chat["bos_token"], eos_token=chat["eos_token"], variables=variables)


def reply_text(template: dict, turns: list[dict], tools: Any = None) -> str:
    """The completion a conversation ending in the assistant's turn teaches: the turn's text; for a turn that calls
    tools, the calls as the template writes them after the reply's header (a model's own Jinja template: the whole
    conversation less render_chat's prompt and the turn's end, which the end token stands for; other templates: one
    JSON object per call, as render_chat writes past turns). ConfigError, in one line, when the template's text
    for the turn does not follow its prompt."""
    turns, tools = chat_turns(turns), chat_tools(tools)
    last, chat = turns[-1], template["chat"]
    if not last.get("tool_calls"):
        return last["content"]
    if "jinja" not in chat or not writes_calls(chat["jinja"]):
        return calls_as_text(last)["content"]
    prompt = _render_jinja(chat, turns[:-1], tools, add_generation_prompt=True)
    whole = _render_jinja(chat, turns, tools, add_generation_prompt=False)
    probe = _render_jinja(chat, turns[:-1] + [{"role": "assistant", "content": REPLY_PROBE}], tools, False)
    end = probe[probe.rindex(REPLY_PROBE) + len(REPLY_PROBE):] if REPLY_PROBE in probe else ""
    if not whole.startswith(prompt) or not whole.endswith(end) or len(whole) - len(end) <= len(prompt):
        raise ConfigError("the model's chat template does not write this turn's tool calls after the reply's header "
                          "it writes for the prompt, so they cannot be learned as a completion")
    return whole[len(prompt):len(whole) - len(end)]


class CallFormat(NamedTuple):
    """How an assistant turn's tool calls are written: lead + call (+ mid + call ...) + tail, each call the JSON
    text json.dumps writes for {name_key: <the tool's name>, args_key: <its arguments>} (and, with id_key, id_key:
    <the call's id> after them: Mistral's, an id of 9 letters and digits)."""

    lead: str = ""
    mid: Optional[str] = "\n"  # None: one call per turn
    tail: str = ""
    name_key: str = "name"
    args_key: str = "arguments"
    id_key: Optional[str] = None


CALL_LINES = CallFormat()  # lmforge's: one call per line (data.conversation.calls_as_text)
_PROBE_CALLS = [{"id": f"lmfprobe{i}", "type": "function",  # (ids of 9 letters and digits, as Mistral's templates ask)
                 "function": {"name": f"lmforgeprobetool{i}", "arguments": {"lmforgeprobearg": i}}} for i in range(2)]
_PROBE_TOOLS = [{"type": "function", "function": {"name": c["function"]["name"], "parameters": {
    "type": "object", "properties": {"lmforgeprobearg": {"type": "integer"}}}}} for c in _PROBE_CALLS]


def call_format(template: dict) -> CallFormat:
    """The form the template writes a reply's tool calls in, found by rendering probe calls (reply_text): a model's
    own Jinja template that writes calls as JSON objects with the name first, wrapped or not (Qwen2.5's and
    Hermes' <tool_call>{"name": ..., "arguments": ...}</tool_call> per call, Llama 3.1's bare {"name": ...,
    "parameters": ...}, one list [{...}, {...}] for all of them, Mistral's [TOOL_CALLS] [{"name": ..., "arguments":
    ..., "id": ...}]); CALL_LINES for lmforge's own format, for a template that writes no calls and for one whose
    calls are written otherwise."""
    chat = template["chat"]
    if "jinja" not in chat or not writes_calls(chat["jinja"]):
        return CALL_LINES
    asked = [{"role": "user", "content": REPLY_PROBE}]

    def written(n: int) -> Optional[str]:
        try:
            return reply_text(template, asked + [{"role": "assistant", "content": None,
                                                  "tool_calls": _PROBE_CALLS[:n]}], _PROBE_TOOLS)
        except ConfigError:  # the template refuses such a turn (e.g. more than one call)
            return None

    one, two = written(1), written(2)
    if one is None:
        return CALL_LINES
    name, args = (_PROBE_CALLS[0]["function"][k] for k in ("name", "arguments"))
    for start in (i for i, c in enumerate(one) if c == "{"):
        try:
            obj, end = json.JSONDecoder().raw_decode(one, start)
        except ValueError:
            continue
        keys = list(obj) if isinstance(obj, dict) else []
        if len(keys) in (2, 3) and obj[keys[0]] == name and obj[keys[1]] == args and (
                len(keys) == 2 or obj[keys[2]] == _PROBE_CALLS[0]["id"]) and one[start:end] == json.dumps(obj):
            break
    else:
        return CALL_LINES
    lead, tail, mid = one[:start], one[end:], None
    id_key = keys[2] if len(keys) == 3 else None

    def call_text(i: int) -> str:
        call = {keys[0]: _PROBE_CALLS[i]["function"]["name"], keys[1]: _PROBE_CALLS[i]["function"]["arguments"]}
        return json.dumps({**call, id_key: _PROBE_CALLS[i]["id"]} if id_key else call)

    first, second = lead + call_text(0), call_text(1) + tail
    if two is not None and two.startswith(first) and two.endswith(second) and len(two) > len(first) + len(second):
        mid = two[len(first):len(two) - len(second)]
    return CallFormat(lead, mid, tail, keys[0], keys[1], id_key)


def chat_stop(template: dict) -> str:
    """The text that opens a user turn: a model that goes on past its reply would write it next."""
    chat = template["chat"]
    if "jinja" in chat:
        from lmforge.data import chat_template

        return chat_template.user_header(chat["jinja"], chat["bos_token"], chat["eos_token"])
    return chat["turn"][:chat["turn"].index("{content}")].format(role="user")


# -------------------------------------------------------------------------------------------- records
@dataclass
class Fields:
    """Which record fields hold the prompt, the completion and a conversation (sft), the text and the label
    (classify), the preferred and the other completion (preference)."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    text: str = "text"
    label: str = "label"
    chosen: str = "chosen"
    rejected: str = "rejected"
    tools: str = "tools"  # with messages: the function tools the conversation may call (data.conversation)


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
            except JSON_ERRORS as e:
                yield f"{path}:{number}", None, f"not valid JSON ({json_problem(e)})"
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


def record_text_label(record: dict, fields: Fields) -> tuple[str, str]:
    """(text, label name) of one classify record; BadRecord says why it cannot be used."""
    text = _text(record, fields.text, "text")
    if not text.strip():
        raise BadRecord(f"empty text (field {fields.text!r})")
    label = record.get(fields.label)
    if label is None:
        raise BadRecord(f"no field {fields.label!r} (label)")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise BadRecord(f"field {fields.label!r} (label) is a {type(label).__name__}, not a string or an integer")
    label = str(label).strip()
    if not label:
        raise BadRecord(f"empty label (field {fields.label!r})")
    return text, label


def _chat_texts(record: dict, template: dict, fields: Fields) -> tuple[str, str]:
    turns = record[fields.messages]
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"field {fields.messages!r} must be a non-empty list of {{\"role\", \"content\"}} turns")
    try:
        turns, tools = chat_turns(turns, fields.messages), chat_tools(record.get(fields.tools), fields.tools)
        if turns[-1]["role"] != "assistant":
            raise BadRecord(f"the last turn of {fields.messages!r} is {turns[-1]['role']!r}, not the assistant's "
                            "reply")
        completion = reply_text(template, turns, tools)
        if not completion.strip():
            raise BadRecord(f"empty completion (the last assistant turn of {fields.messages!r})")
        return render_chat(template, turns[:-1], tools), completion
    except ConfigError as e:  # a malformed conversation, or one the model's own chat template refuses
        raise BadRecord(str(e)) from None


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
    labels: Optional[list[int]] = None  # classify: the class id of each example
    desirable: Optional[list[int]] = None  # unpaired preference data: 1 for a desirable completion, 0 for not
    margins: Optional[list[float]] = None  # preference data with margins: each example's pair's margin
    truncated: int = 0
    dropped: int = 0
    completion_tokens: int = 0


def encode_example(tok: Tokenizer, prompt: np.ndarray, completion: np.ndarray, max_length: int,
                   drop_long: bool) -> tuple[Optional[np.ndarray], int, str]:
    """(ids, prompt_length, "ok" | "truncated" | "dropped") of one example; ids is None when dropped.

    ids = [start] + prompt + completion + [end] (no second start when the prompt writes it: a model's own chat
    template with its bos); prompt_length = tokens before the completion. The truncation policy is the module
    docstring's (step 5).
    """
    if tok.start_id is not None and len(prompt) > 0 and prompt[0] == tok.start_id:  # a chat template's own bos
        prompt = prompt[1:]  # stands first as the start token (kept when the prompt is cut from the left)
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


def encode_split(tok: Tokenizer, pairs: list[tuple[str, str]], max_length: int, drop_long: bool,
                 kept: Optional[list[int]] = None) -> Encoded:
    """Encode (prompt text, completion text) pairs into examples (see encode_example); `kept`, if given, receives
    the index of each pair that became an example (not dropped)."""
    out = Encoded()
    prompts = tok.encode_batch_arrays([p for p, _ in pairs])
    completions = tok.encode_continuations([c for _, c in pairs])  # cut as inside prompt + completion
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids, prompt_length, status = encode_example(tok, prompt, completion, max_length, drop_long)
        out.truncated += status == "truncated"
        out.dropped += status == "dropped"
        if ids is not None:
            if kept is not None:
                kept.append(i)
            out.tokens.append(ids)
            out.prompt_lengths.append(prompt_length)
            out.completion_tokens += len(ids) - prompt_length
    return out


def encode_text_example(tok: Tokenizer, text: np.ndarray, max_length: int,
                        drop_long: bool = False) -> tuple[Optional[np.ndarray], str]:
    """(ids, "ok" | "truncated" | "dropped") of one classify example; ids is None when dropped.

    ids = [start] + text + [end]; too long: the text is cut from the right, start and end stay (module docstring).
    Training data and `lmforge classify` encode texts with this one function.
    """
    start = [] if tok.start_id is None else [tok.start_id]
    room = max_length - len(start) - 1
    status = "ok"
    if len(text) > room:
        if drop_long:
            return None, "dropped"
        text, status = text[:max(room, 0)], "truncated"
    return np.concatenate([np.array(start, dtype=np.int64), np.asarray(text, dtype=np.int64),
                           np.array([tok.end_id], dtype=np.int64)]), status


def encode_classify_split(tok: Tokenizer, texts: list[str], labels: list[int], max_length: int,
                          drop_long: bool) -> Encoded:
    """Encode texts with their label ids into classify examples (see encode_text_example)."""
    out = Encoded(labels=[])
    for ids, label in zip(tok.encode_batch_arrays(texts), labels):
        ids, status = encode_text_example(tok, ids, max_length, drop_long)
        out.truncated += status == "truncated"
        out.dropped += status == "dropped"
        if ids is not None:
            out.tokens.append(ids)
            out.labels.append(label)
    return out


def stratified_split(labels: np.ndarray, split: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """{split: indices into ``labels``}: each label's indices shuffled and cut by split_counts (a label of 2:
    one train, one val; every label needs 2 or more), then each split shuffled. Deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_train, n_val, _ = split_counts(len(members), split) if len(members) >= 3 else (1, len(members) - 1, 0)
        for name, piece in zip(SPLITS, np.split(members, [n_train, n_train + n_val])):
            parts[name].append(piece)
    return {name: rng.permutation(np.concatenate(pieces)) for name, pieces in parts.items()}


def write_examples(path: Path, encoded: Encoded) -> dict:
    """Write one split's safetensors file; returns its manifest entry."""
    from safetensors.numpy import save_file

    lengths = np.array([len(t) for t in encoded.tokens], dtype=np.int64)
    tensors = {"tokens": np.concatenate(encoded.tokens).astype(np.int32),
               "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
    if encoded.labels is None:
        tensors["prompt_lengths"] = np.array(encoded.prompt_lengths, dtype=np.int32)
    else:
        tensors["labels"] = np.array(encoded.labels, dtype=np.int64)
    if encoded.desirable is not None:
        tensors["desirable"] = np.array(encoded.desirable, dtype=np.uint8)
    if encoded.margins is not None:
        tensors["margins"] = np.array(encoded.margins, dtype=np.float32)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT})
    return {"file": path.name, "examples": len(lengths), "tokens": int(lengths.sum()),
            "truncated": encoded.truncated, "dropped": encoded.dropped, "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------------------- the pipeline
def prepare_task(inputs: list[str], out: str, *, tokenizer_file: str | Path, base: str, max_length: int,
                 task: str = "sft", template: str = DEFAULT_TEMPLATE, fields: Optional[Fields] = None,
                 drop_long: bool = False, skip_bad: bool = False, keep_duplicates: bool = False,
                 split: tuple[float, float, float] = (0.9, 0.05, 0.05), seed: int = 1337, force: bool = False,
                 warn=None, add_tokens: Sequence[str] = ()) -> dict:
    """Prepare the task dataset ``out`` from record files ``inputs``, encoded with the base model's tokenizer.

    tokenizer_file: the base checkpoint's tokenizer.json (copied unchanged, or with add_tokens added: chat markers the
    model learns, its embedding grown by `lmforge train`); base: the path the user gave
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
    tmpl = resolve_template(template) if task in TEXT_TASKS else None
    out_dir = Path(out)
    check_dataset_output(out_dir, force=force, inputs=[i for i in inputs if not glob.has_magic(i)])
    tok = Tokenizer.load(tokenizer_file)
    if add_tokens:
        tok = tok.with_added_tokens(add_tokens)
    if tmpl is not None and own_chat(tok) is not None:  # conversations in the base model's own chat format
        tmpl["chat"] = own_chat(tok)
    warnings: list[str] = []

    def warn_line(message: str) -> None:
        warnings.append(message)
        (warn or (lambda m: print(f"warning: {m}", file=sys.stderr)))(message)

    files = find_files(inputs, warn=warn_line, suffixes=RECORD_SUFFIXES)
    check_apart(out_dir, files, DataError)  # a glob's matches too
    common = {"tok": tok, "tokenizer_file": tokenizer_file, "files": files, "out_dir": out_dir,
              "header": {"base": str(base), "max_length": max_length, "long_examples": "drop" if drop_long else
                         "truncate", "seed": seed, "split": list(split)}}
    if task == "classify":
        return _prepare_classify(fields, skip_bad, keep_duplicates, split, seed, max_length, drop_long, warnings,
                                 **common)
    if task == "preference":
        from lmforge.data.preference import prepare_preference  # it builds on this module's readers and writers

        return prepare_preference(tmpl, fields, skip_bad, keep_duplicates, split, seed, max_length, drop_long,
                                  warnings, **common)
    if task == "unpaired":
        from lmforge.data.unpaired import prepare_unpaired

        return prepare_unpaired(tmpl, fields, skip_bad, keep_duplicates, split, seed, max_length, drop_long,
                                warnings, warn_line, **common)
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
    header = {"task": task, "template": tmpl,
              "fields": {"prompt": fields.prompt, "completion": fields.completion, "messages": fields.messages,
                         "tools": fields.tools},
              **common.pop("header")}
    return _write_task_dir(encoded, header, lambda entries: {
        "task": task, "records": records, "chat_records": chat, "examples": len(pairs),
        "duplicates": duplicates, "bad_records": len(bad), "bad": bad[:MAX_LISTED_BAD],
        "leakage": _leakage(pairs, parts),
        "splits": {name: {"examples": entries[name]["examples"], "tokens": entries[name]["tokens"],
                          "completion_tokens": encoded[name].completion_tokens,
                          "truncated": encoded[name].truncated, "dropped": encoded[name].dropped}
                   for name in SPLITS},
        "max_length": max_length, "template": tmpl["name"], "warnings": warnings, "seed": seed}, **common)


def _write_task_dir(encoded: dict[str, Encoded], header: dict, report_of, *, tok: Tokenizer,
                    tokenizer_file: str | Path, files: list[Path], out_dir: Path) -> dict:
    """Write the dataset directory atomically: the base's tokenizer.json (`tok`, when tokens were added), every
    split, manifest.json (``header`` plus what every task shares) and report.json (``report_of(manifest splits)``);
    returns the report."""
    with atomic_dir(out_dir) as tmp:
        if tok.sha256 is not None:  # read from tokenizer_file as it is (with_added_tokens makes one with no sha256)
            atomic_write_bytes(tmp / "tokenizer.json", Path(tokenizer_file).read_bytes())  # the base's, byte for byte
        else:  # the base's with tokens added
            tok.save(tmp / "tokenizer.json")
        entries = {name: write_examples(tmp / f"{name}.safetensors", enc) for name, enc in encoded.items()}
        manifest = {"format": FORMAT, "lmforge_version": lmforge.__version__, **header,
                    "vocab_size": tok.vocab_size,
                    "tokenizer": {"file": "tokenizer.json", "sha256": sha256_file(tmp / "tokenizer.json"),
                                  "kind": tok.kind},
                    "special_tokens": {"start": tok.start_id, "end": tok.end_id, "pad": tok.pad_id},
                    "splits": entries,
                    "sources": [{"path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files]}
        report = report_of(entries)
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        atomic_write_text(tmp / REPORT, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report


def _prepare_classify(fields: Fields, skip_bad: bool, keep_duplicates: bool, split: tuple[float, float, float],
                      seed: int, max_length: int, drop_long: bool, warnings: list[str], *, header: dict,
                      **common: Any) -> dict:
    """prepare_task for --task classify (module docstring): read, check labels, stratified split, encode, write."""
    found: list[tuple[str, str]] = []  # (text, label)
    where: list[str] = []
    bad, records = _read_records(common["files"], lambda record, _: record_text_label(record, fields), skip_bad,
                                 found, where)
    if not found:
        raise DataError(f"no usable records in {len(common['files'])} file(s) ({records} read, {len(bad)} bad): give "
                        f"records with the fields {fields.text!r} and {fields.label!r}")
    kept, duplicates = _dedupe(found, keep_duplicates)
    counts: dict[str, int] = {}
    for i in kept:
        counts[found[i][1]] = counts.get(found[i][1], 0) + 1
    for i in [i for i in kept if counts[found[i][1]] == 1]:  # a label seen once: most often a typo
        reason = (f"label {found[i][1]!r} has only this 1 example; every label needs at least 2 (one to train on, one "
                  f"to evaluate)")
        if not skip_bad:
            raise DataError(f"{where[i]}: {reason}: fix the label, add examples, or pass --skip-bad to skip such "
                            "records (they are counted and listed in the report)")
        bad.append({"where": where[i], "reason": reason})
    kept = [i for i in kept if counts[found[i][1]] > 1]
    names = sorted({found[i][1] for i in kept})
    if len(names) < 2:
        raise DataError(f"the records hold {len(names)} label(s) with 2 or more examples ({', '.join(names) or 'none'}):"
                        f" a classifier needs at least 2 labels; check --label-field {fields.label!r}")
    ids = {name: k for k, name in enumerate(names)}
    label_of = np.array([ids[found[i][1]] for i in kept], dtype=np.int64)
    parts = {name: np.array(kept, dtype=np.int64)[idx] for name, idx in stratified_split(label_of, split, seed).items()}
    tok = common["tok"]
    encoded = {name: encode_classify_split(tok, [found[i][0] for i in idx], [ids[found[i][1]] for i in idx],
                                           max_length, drop_long) for name, idx in parts.items()}
    per_split = {name: np.bincount(np.array(enc.labels, dtype=np.int64), minlength=len(names)).tolist()
                 for name, enc in encoded.items()}
    for name in ("val", "test"):
        orphans = [names[k] for k in range(len(names)) if per_split[name][k] and not per_split["train"][k]]
        if orphans:
            raise DataError(f"label {orphans[0]!r} has {name} examples but none left in train: --drop-long dropped them "
                            f"all; raise --max-length")
    for name, enc in encoded.items():
        if not enc.tokens:
            raise DataError(f"the {name} split has no examples (every label has {min(counts[n] for n in names)}+ "
                            f"records, {len(kept)} in all): give more records, or larger val/test fractions in --split")
    conflicts = _conflicts([found[i] for i in kept])
    header = {"task": "classify", "labels": names,
              "label_counts": {name: dict(zip(names, per_split[name])) for name in SPLITS},
              "fields": {"text": fields.text, "label": fields.label},
              "example": "[start] text [end], the text cut from the right when too long", **header}
    return _write_task_dir(encoded, header, lambda entries: {
        "task": "classify", "records": records, "examples": len(found), "duplicates": duplicates,
        "conflicts": conflicts, "bad_records": len(bad), "bad": bad[:MAX_LISTED_BAD], "labels": names,
        "leakage": _leakage(found, parts),
        "splits": {name: {"examples": entries[name]["examples"], "tokens": entries[name]["tokens"],
                          "truncated": encoded[name].truncated, "dropped": encoded[name].dropped,
                          "labels": dict(zip(names, per_split[name]))} for name in SPLITS},
        "max_length": max_length, "warnings": warnings, "seed": seed}, **common)


def _conflicts(items: list[tuple[str, str]]) -> int:
    """Texts that appear with more than one label."""
    labels_of: dict[str, set] = {}
    for text, label in items:
        labels_of.setdefault(text, set()).add(label)
    return sum(len(labels) > 1 for labels in labels_of.values())


def _read_records(files: list[Path], parse, skip_bad: bool, items: list, where: list) -> tuple[list[dict], int]:
    """Append ``parse(record, "FILE:N")`` of every usable record to ``items`` (its FILE:N to ``where``); returns (bad records
    [{"where", "reason"}], records read). A BadRecord is an error naming FILE:N unless ``skip_bad``."""
    bad: list[dict] = []
    records = 0
    for path in files:
        for name, record, problem in read_records(path):
            records += 1
            try:
                if problem is not None:
                    raise BadRecord(problem)
                items.append(parse(record, name))
                where.append(name)
            except BadRecord as e:
                if not skip_bad:
                    raise DataError(f"{name}: {e}: fix or remove the record, or pass --skip-bad to skip such records "
                                    "(they are counted and listed in the report)") from None
                bad.append({"where": name, "reason": str(e)})
    return bad, records


def _read(files: list[Path], template: dict, fields: Fields, skip_bad: bool):
    """(pairs, bad records [{"where", "reason"}], records read, chat records) of every file."""
    checked = False

    def parse(record: dict, where: str) -> tuple[str, str]:
        nonlocal checked
        if not checked and fields.prompt in record:
            check_template_fields(template, record, fields, where)
            checked = True
        return record_texts(record, template, fields)

    chat_flags: list[bool] = []
    bad, records = _read_records(files, lambda record, where: (parse(record, where), fields.prompt not in record),
                                 skip_bad, chat_flags, [])
    pairs = [pair for pair, _ in chat_flags]
    return pairs, bad, records, sum(chat for _, chat in chat_flags)


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
    if report["task"] == "classify":
        return _format_classify_report(report)
    if report["task"] == "preference":
        from lmforge.data.preference import format_preference_report

        return format_preference_report(report)
    if report["task"] == "unpaired":
        from lmforge.data.unpaired import format_unpaired_report

        return format_unpaired_report(report)
    lines = [f"{'split':<6} {'examples':>9} {'tokens':>11} {'completion':>11} {'truncated':>10} {'dropped':>8}"]
    for name, s in report["splits"].items():
        lines.append(f"{name:<6} {s['examples']:>9,} {s['tokens']:>11,} {s['completion_tokens']:>11,} "
                     f"{s['truncated']:>10,} {s['dropped']:>8,}")
    lines.append(f"records: {report['records']:,} read ({report['chat_records']:,} conversations), "
                 f"{report['bad_records']:,} bad (skipped), {report['duplicates']:,} duplicate(s) removed; "
                 f"template {report['template']!r}, max_length {report['max_length']}")
    return "\n".join(lines + report_tail_lines(report, "example(s)"))


def _format_classify_report(report: dict) -> str:
    names = report["labels"]
    lines = [f"{'split':<6} {'examples':>9} {'tokens':>11} {'truncated':>10} {'dropped':>8}  " + " ".join(names)]
    for name, s in report["splits"].items():
        lines.append(f"{name:<6} {s['examples']:>9,} {s['tokens']:>11,} {s['truncated']:>10,} {s['dropped']:>8,}  "
                     + " ".join(f"{s['labels'][n]:>{len(n)}}" for n in names))
    lines.append(f"records: {report['records']:,} read, {report['bad_records']:,} bad (skipped), "
                 f"{report['duplicates']:,} duplicate(s) removed, {report['conflicts']:,} text(s) with more than one "
                 f"label; {len(names)} labels, max_length {report['max_length']}")
    return "\n".join(lines + report_tail_lines(report, "example(s)", rule="same text as a train example"))


def report_tail_lines(report: dict, unit: str, rule: str | None = None) -> list[str]:
    """The lines every task report ends with: the first bad records by place and reason, then the leakage count."""
    shown = 20
    lines = [f"  bad {b['where']}: {b['reason']}" for b in report["bad"][:shown]]
    if report["bad_records"] > shown:
        lines.append(f"  ... {report['bad_records'] - shown} more in report.json")
    lk = report["leakage"]
    lines.append(f"leakage ({rule or lk['rule']}): val {lk['val']['leaked']}/{lk['val']['examples']}, "
                 f"test {lk['test']['leaked']}/{lk['test']['examples']} {unit}")
    return lines


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
    needed = ("task", "labels" if manifest.get("task") == "classify" else "template", "vocab_size", "tokenizer",
              "splits", "special_tokens")
    missing = [k for k in needed if k not in manifest]
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
    classify = manifest["task"] == "classify"
    per_example = "labels" if classify else "prompt_lengths"
    tokens, offsets, values = (arrays.get(k) for k in ("tokens", "offsets", per_example))
    n = entry.get("examples")
    ok = (tokens is not None and offsets is not None and values is not None and isinstance(n, int)
          and tokens.ndim == offsets.ndim == values.ndim == 1 and len(offsets) == n + 1
          and len(values) == n and n > 0 and (manifest["task"] != "preference" or n % 2 == 0)
          and offsets[0] == 0 and offsets[-1] == len(tokens)
          and bool(np.all(np.diff(offsets) >= (1 if classify else 2))) and bool(np.all(values >= 0))
          and bool(np.all(values < (len(manifest["labels"]) if classify else np.diff(offsets))))
          and len(tokens) and int(tokens.min()) >= 0 and int(tokens.max()) < manifest["vocab_size"])
    desirable = arrays.get("desirable") if manifest["task"] == "unpaired" else None
    if manifest["task"] == "unpaired":
        per_example += ", desirable"
        ok = ok and desirable is not None and desirable.shape == (n,) and bool(np.all(desirable <= 1))
    margins = arrays.get("margins") if manifest["task"] == "preference" else None
    if margins is not None:  # one per example, finite, the same on both examples of a pair
        per_example += ", margins"
        ok = ok and margins.shape == (n,) and bool(np.all(np.isfinite(margins))) and \
            bool(np.all(margins[0::2] == margins[1::2]))
    if not ok:
        raise DataError(f"{path} does not hold the {n} examples its manifest describes (tokens, offsets, "
                        f"{per_example}): the file is damaged, re-run `lmforge prepare --force`")
    if classify:
        return Examples(tokens, offsets, None, values)
    return Examples(tokens, offsets, values, desirable=None if desirable is None else desirable.astype(bool),
                    margins=margins)
