"""Token shards on disk: the writer, the validated reader and the manifest.

A prepared dataset directory holds ``train.bin``, ``val.bin``, ``test.bin`` (each a flat little-endian
array of token ids, uint16 when the vocabulary fits in 65536 ids, else uint32; documents stored as
``<START> tokens <END>`` one after another), ``tokenizer.json``, ``manifest.json`` and ``report.json``.
The manifest layout is in docs/CONTRACTS.md (``format: lmforge-shards-v1``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from lmforge.errors import DataError
from lmforge.files import atomic_write_text, check_output

FORMAT = "lmforge-shards-v1"
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below ``vocab_size``: uint16 or uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Appends token arrays to one ``.bin`` file, counting tokens and hashing the bytes as they go."""

    def __init__(self, path: str | Path, dtype: np.dtype) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.tokens = 0
        self.documents = 0
        self._sha = hashlib.sha256()
        self._file = open(self.path, "wb")

    def write(self, ids: np.ndarray, documents: int = 0) -> None:
        """Append ``ids`` (any integer array whose values fit the dtype); ``documents`` it completes."""
        data = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._sha.update(data)
        self.tokens += len(ids)
        self.documents += documents

    def close(self) -> dict:
        """Close the file; returns its manifest entry ``{"file", "tokens", "documents", "sha256"}``."""
        self._file.close()
        return {"file": self.path.name, "tokens": self.tokens, "documents": self.documents,
                "sha256": self._sha.hexdigest()}

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._file.closed:
            self._file.close()


def check_dataset_output(out_dir: Path, *, force: bool, inputs: list) -> None:
    """The --force rule for a prepared dataset (lmforge.files.check_output): replace only a folder whose
    manifest.json says prepare wrote it and that holds nothing but what its manifest names."""
    def members(path: Path) -> set[str]:
        names = {MANIFEST, "report.json", "tokenizer.json"}
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            names.update(entry["file"] for entry in manifest["splits"].values())
        except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
            pass  # an unreadable manifest names nothing more: every other file counts as the user's
        return names

    check_output(out_dir, force=force, ours=lambda p: (p / MANIFEST).is_file(), what="a prepared dataset",
                 error=DataError, members=members, inputs=inputs)


def write_manifest(data_dir: str | Path, manifest: dict) -> None:
    """Write ``manifest.json`` into ``data_dir`` (atomically)."""
    atomic_write_text(Path(data_dir, MANIFEST), json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def read_manifest(data_dir: str | Path) -> dict:
    """Read and check ``DIR/manifest.json``; raises DataError naming the file and the fix."""
    path = Path(data_dir, MANIFEST)
    if not path.is_file():
        raise DataError(f"{path} does not exist: {data_dir} is not a prepared dataset, run `lmforge prepare` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{path} cannot be read as JSON ({type(e).__name__}): re-run `lmforge prepare --force`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not an lmforge manifest (format {FORMAT!r} expected): re-run `lmforge prepare`")
    missing = [k for k in ("dtype", "vocab_size", "tokenizer", "splits") if k not in manifest]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: the manifest is corrupt, re-run `lmforge prepare --force`")
    vocab = manifest["vocab_size"]
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not 0 < vocab <= 1 << 32:
        raise DataError(f"{path}: vocab_size={vocab!r} is not a positive integer: re-run `lmforge prepare --force`")
    tokenizer, splits = manifest["tokenizer"], manifest["splits"]
    if not isinstance(tokenizer, dict) or not _plain_name(tokenizer.get("file", "tokenizer.json")):
        raise DataError(f"{path}: 'tokenizer' must name a file in {data_dir}: the manifest is corrupt, "
                        "re-run `lmforge prepare --force`")
    if not isinstance(splits, dict) or not all(isinstance(v, dict) for v in splits.values()):
        raise DataError(f"{path}: 'splits' must map split names to entries: the manifest is corrupt, "
                        "re-run `lmforge prepare --force`")
    expected = dtype_for_vocab(vocab)
    if manifest["dtype"] != expected.name:
        raise DataError(f"{path}: dtype {manifest['dtype']!r} does not match vocab_size={vocab} "
                        f"(needs {expected.name}): re-run `lmforge prepare --force`")
    return manifest


def _plain_name(name: object) -> bool:
    """A file name inside the dataset directory: no directories, no '..', nothing absolute."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name


def _tokenizer_vocab_size(data_dir: Path, manifest: dict) -> int:
    """The vocab_size recorded in the dataset's tokenizer file."""
    path = data_dir / manifest["tokenizer"].get("file", "tokenizer.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))["vocab_size"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
        raise DataError(f"{path} cannot be read ({type(e).__name__}): re-run `lmforge prepare --force`") from None


def load_split(data_dir: str | Path, split: str, *, check_ids: bool = False) -> np.memmap:
    """A read-only 1-D memmap of one split's token ids, validated against the manifest.

    Checks: the manifest (format, dtype matching vocab_size), the tokenizer file's vocab_size, and the
    shard's byte length (tokens * itemsize). ``check_ids=True`` also scans the ids (< vocab_size) and the
    sha256 (reads the whole file). Raises DataError naming the file and the fix.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{data_dir}/{MANIFEST} has no split {split!r}: choose one of {', '.join(manifest['splits'])}")
    entry = manifest["splits"][split]
    tokens = entry.get("tokens")
    if not _plain_name(entry.get("file")) or not isinstance(tokens, int) or isinstance(tokens, bool) \
            or not 0 <= tokens < 1 << 48:
        raise DataError(f"{data_dir}/{MANIFEST}: the entry of split {split!r} needs a file name and a token count: "
                        "the manifest is corrupt, re-run `lmforge prepare --force`")
    vocab = manifest["vocab_size"]
    tok_vocab = _tokenizer_vocab_size(data_dir, manifest)
    if tok_vocab != vocab:
        raise DataError(f"{data_dir}/{MANIFEST}: vocab_size={vocab} but the tokenizer file has {tok_vocab}: "
                        "the dataset is inconsistent, re-run `lmforge prepare --force`")
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    path = data_dir / entry["file"]
    if not path.is_file():
        raise DataError(f"{path} does not exist: the dataset is incomplete, re-run `lmforge prepare --force`")
    size, expected = path.stat().st_size, entry["tokens"] * dtype.itemsize
    if size != expected:
        raise DataError(f"{path} has {size} bytes but the manifest says {entry['tokens']} {dtype.name} tokens "
                        f"({expected} bytes): the file is truncated or replaced, re-run `lmforge prepare --force`")
    if entry["tokens"] == 0:
        raise DataError(f"{path} holds no tokens: prepare a larger corpus or change --split")
    ids = np.memmap(path, dtype=dtype, mode="r")
    if check_ids:
        _check_contents(ids, path, vocab, entry.get("sha256"))
    return ids


class ShardFile:
    """A validated split read by ranges with plain file reads: ``shard[a:b]`` -> np.ndarray.

    For streaming over a whole shard: unlike pages of a memmap, data read this way does not stay in
    the process's resident memory.
    """

    def __init__(self, data_dir: str | Path, split: str) -> None:
        ids = load_split(data_dir, split)  # validates; creating the memmap reads nothing
        self.path, self.dtype, self._len = Path(ids.filename), ids.dtype, len(ids)
        del ids

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(self._len)
        if step != 1:
            raise ValueError("ShardFile supports contiguous slices only")
        count = max(stop - start, 0)
        return np.fromfile(self.path, dtype=self.dtype, count=count, offset=start * self.dtype.itemsize)


def _check_contents(ids: np.memmap, path: Path, vocab: int, sha256: str | None, chunk: int = 1 << 24) -> None:
    digest = hashlib.sha256()
    for start in range(0, len(ids), chunk):
        block = np.asarray(ids[start:start + chunk])
        if block.size and int(block.max()) >= vocab:
            raise DataError(f"{path} holds token id {int(block.max())} >= vocab_size {vocab}: "
                            "the shard does not belong to this tokenizer, re-run `lmforge prepare --force`")
        digest.update(block.tobytes())
    if sha256 is not None and digest.hexdigest() != sha256:
        raise DataError(f"{path} does not match the sha256 in the manifest: the file changed, re-run `lmforge prepare --force`")


def document_bounds(ids: np.ndarray, end_id: int) -> np.ndarray:
    """Exclusive end offsets of the documents in a shard (positions just after each <END>)."""
    return np.flatnonzero(np.asarray(ids) == end_id) + 1
