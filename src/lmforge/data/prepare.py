"""`lmforge prepare`: raw text -> cleaned documents -> tokenizer -> shuffled train/val/test shards.

The pipeline, each step streaming so that memory stays flat as the corpus grows:

1. read   every input file, clean its documents (see ``corpus``) and append them to a spool file in
          the output's temporary directory, keeping per document only its offset, length, character
          count and a 128-bit hash (about 40 bytes each).
2. dedupe exact duplicates by hash (the first occurrence is kept), unless ``keep_duplicates``.
3. split  shuffle the document indices with ``seed`` and cut them by the split fractions; every split
          gets at least one document. With fewer than 3 documents the longest one is cut into
          consecutive pieces (at line breaks where possible) in proportion to the fractions, one per
          split, and any other document goes to train.
4. tokenizer  trained on the train split only (char vocabulary or byte-level BPE), or loaded from an
          lmforge tokenizer.json; byte needs no training.
5. encode each split in shuffled order, in batches encoded by ``workers`` threads (BPE batches are
          encoded in parallel by the Rust library), and append ``<START> ids <END>`` to the split's shard.
6. write  manifest.json and report.json (statistics and the leakage check of ``report``).

Everything is written into a temporary directory next to ``out`` and put in place at the end by
``lmforge.files.atomic_dir``, so an error or a kill leaves no partial output behind, and an existing dataset
(replaced only with ``force``) is deleted only once the new one is complete.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import time
from array import array
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

import lmforge
from lmforge.data import report as data_report
from lmforge.data.corpus import CorpusReader, CorpusStats, find_files, shakespeare_files
from lmforge.data.report import format_report
from lmforge.data.shards import FORMAT, ShardWriter, check_dataset_output, dtype_for_vocab, write_manifest
from lmforge.errors import DataError
from lmforge.files import atomic_dir, check_apart
from lmforge.tokenizer import KINDS, N_SPECIAL, Tokenizer, byte_tokenizer, check_special_tokens, train_bpe, train_char

# Text per encoding batch. Big enough for the Rust encoder to spread over the cores, small enough that
# the batches in flight (HF Encodings hold ~100 bytes per token while alive) stay well under 100 MB.
BATCH_BYTES = 1 << 20
BATCH_DOCS = 1024
MIN_VOCAB = N_SPECIAL + 256


def prepare(inputs: list[str], out: str, *, dataset: str | None = None, tokenizer: str = "char",
            vocab_size: int = 8192, split: tuple[float, float, float] = (0.9, 0.05, 0.05), seed: int = 1337,
            doc_split: str = "file", jsonl_field: str = "text", parquet_column: str = "text",
            keep_duplicates: bool = False, force: bool = False,
            special_tokens: tuple[str, str, str] = ("<START>", "<END>", "<PAD>"), workers: int = 2,
            progress: bool = True, mask_token: str | None = None, add_tokens: Sequence[str] = ()) -> dict:
    """Prepare a dataset directory ``out`` from ``inputs`` (files, folders, globs) or ``dataset="shakespeare"``.

    ``tokenizer`` is char | byte | bpe or the path of an lmforge tokenizer.json (its own special
    tokens are then used); ``mask_token`` adds a mask token at the last id (masked-language-model training);
    ``add_tokens`` adds text tokens at the next ids (Tokenizer.with_added_tokens: chat markers).
    Returns the report (also written to ``out/report.json``). Raises DataError
    or TokenizerError with a one-line message; on error nothing is written and an existing ``out``
    is left untouched. An existing dataset is replaced only with ``force=True``.
    """
    _check_arguments(inputs, dataset, tokenizer, vocab_size, split, special_tokens, workers, seed)
    out_dir = Path(out)
    check_dataset_output(out_dir, force=force, inputs=[i for i in inputs if not glob.has_magic(i)])
    given = None if tokenizer in KINDS else Tokenizer.load(tokenizer)  # fail before reading the corpus
    if given is not None and mask_token is not None:
        given = given.with_mask_token(mask_token)
    if given is not None and add_tokens:
        given = given.with_added_tokens(add_tokens)
    log = _Log(progress)
    stats = CorpusStats()
    if dataset is not None:
        files = shakespeare_files()
    else:
        files = find_files(inputs, warn=log.warn, stats=stats)
        check_apart(out_dir, files, DataError)  # a glob's matches too
    with atomic_dir(out_dir) as tmp:
        report = _Pipeline(tmp, log, stats, workers=workers, progress=progress).run(
            files, tokenizer=given or tokenizer, vocab_size=vocab_size, split=split, seed=seed, doc_split=doc_split,
            jsonl_field=jsonl_field, parquet_column=parquet_column, keep_duplicates=keep_duplicates,
            special_tokens=special_tokens, mask_token=mask_token, add_tokens=() if given else add_tokens)
    return report


# ---------------------------------------------------------------------------------------- arguments
def _check_arguments(inputs, dataset, tokenizer, vocab_size, split, special_tokens, workers, seed) -> None:
    if dataset is not None and dataset != "shakespeare":
        raise DataError(f"unknown dataset {dataset!r}: the built-in dataset is 'shakespeare'; or give input files")
    if dataset is None and not inputs:
        raise DataError("no inputs: give files, folders or glob patterns, or --dataset shakespeare")
    if dataset is not None and inputs:
        raise DataError("give either input files or --dataset, not both")
    if tokenizer not in KINDS and not Path(tokenizer).is_file():
        raise DataError(f"tokenizer={tokenizer!r} is neither char, byte, bpe nor an existing tokenizer.json file")
    if tokenizer in ("char", "bpe") and not (isinstance(vocab_size, int) and vocab_size > MIN_VOCAB):
        raise DataError(f"vocab_size={vocab_size} is too small for a {tokenizer} tokenizer: use more than {MIN_VOCAB} "
                        "(3 special tokens + 256 bytes)")
    check_special_tokens(special_tokens)
    if (len(split) != 3 or any(not isinstance(f, (int, float)) or f <= 0 for f in split)
            or abs(sum(split) - 1.0) > 1e-6):
        raise DataError(f"split={tuple(split)} is invalid: give three positive fractions (train, val, test) summing to 1")
    if workers < 1:
        raise DataError(f"workers={workers} is invalid: use 1 or more")
    if not (isinstance(seed, int) and 0 <= seed < 2**32):  # numpy's generators take no other seed
        raise DataError(f"seed={seed!r} is invalid: an integer from 0 to {2**32 - 1}")


class _Log:
    """Warnings to stderr (kept for the report) and tqdm progress bars, both silent-able."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        tqdm.write(f"warning: {message}", file=sys.stderr)

    def bar(self, desc: str, total: int | None, unit: str = "B") -> tqdm:
        """A progress bar on stderr. On a terminal a closed bar is erased; elsewhere (a log, a pipe, CI) its last
        state stays as a line of its own, so what follows (a warning, an error) starts a line instead of
        following the bar's carriage return."""
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                    disable=not self.progress, leave=not sys.stderr.isatty(), dynamic_ncols=True)


# ----------------------------------------------------------------------------------------- the spool
class _Spool:
    """Cleaned documents appended to one file; per document its offset, byte length, chars and hash.

    Documents are read back with ``os.pread`` rather than a memory map: mapped pages would count in
    the process's resident memory and make it grow with the corpus.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")
        self._size = 0
        self.offsets, self.lengths, self.chars = array("q"), array("q"), array("q")
        self.digests = bytearray()
        self._fd: int | None = None

    def append(self, text: str) -> None:
        data = text.encode("utf-8")
        self._file.write(data)
        self.offsets.append(self._size)
        self.lengths.append(len(data))
        self.chars.append(len(text))
        self.digests += hashlib.blake2b(data, digest_size=16).digest()
        self._size += len(data)

    def __len__(self) -> int:
        return len(self.offsets)

    def finish_writing(self) -> None:
        self._file.close()
        self._fd = os.open(self.path, os.O_RDONLY)

    def reopen_for_append(self) -> None:
        self.close()
        self._file = open(self.path, "ab")

    def text(self, i: int) -> str:
        """Document ``i``; safe to call from several threads (pread keeps no file position)."""
        return os.pread(self._fd, self.lengths[i], self.offsets[i]).decode("utf-8")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._file.closed:
            self._file.close()


def first_occurrences(digests: bytes) -> np.ndarray:
    """Indices of the first document of each distinct 128-bit digest, in original order."""
    d = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
    order = np.lexsort((np.arange(len(d)), d[:, 1], d[:, 0]))  # by digest, then index
    s = d[order]
    is_first = np.ones(len(d), dtype=bool)
    is_first[1:] = np.any(s[1:] != s[:-1], axis=1)
    return np.sort(order[is_first])


def split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Documents per split for ``n >= 3`` documents: val and test get at least one each, train the rest."""
    n_val = max(1, round(n * fractions[1]))
    n_test = max(1, round(n * fractions[2]))
    while n - n_val - n_test < 1:  # tiny corpora: give train one back from the larger of val/test
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def cut_points(text: str, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """Two cut positions dividing ``text`` into three non-empty pieces in proportion to ``fractions``,
    moved back to just after a line break when one lies inside the piece."""
    n = len(text)
    cuts, low = [], 1
    for target in (round(n * fractions[0]), round(n * (fractions[0] + fractions[1]))):
        cut = min(max(target, low), n - (2 - len(cuts)))
        newline = text.rfind("\n", low, cut)
        if newline >= low:
            cut = newline + 1
        cuts.append(cut)
        low = cut + 1
    return cuts[0], cuts[1]


# -------------------------------------------------------------------------------------- the pipeline
class _Pipeline:
    def __init__(self, tmp: Path, log: _Log, stats: CorpusStats, *, workers: int, progress: bool) -> None:
        self.tmp = tmp
        self.log = log
        self.stats = stats
        self.workers = workers
        self.progress = progress
        self.timings: dict[str, float] = {}

    def run(self, files: list[Path], *, tokenizer: str | Tokenizer, vocab_size: int, split, seed: int, doc_split: str,
            jsonl_field: str, parquet_column: str, keep_duplicates: bool, special_tokens,
            mask_token: str | None = None, add_tokens: Sequence[str] = ()) -> dict:
        spool = _Spool(self.tmp / "documents.spool")
        try:
            t0 = time.perf_counter()
            self._read(spool, files, doc_split, jsonl_field, parquet_column)
            kept, duplicates = self._dedupe(spool, keep_duplicates)
            splits = self._split(spool, kept, split, seed)
            self.timings["read"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            tok = self._tokenizer(spool, splits["train"], tokenizer, vocab_size, special_tokens)
            if mask_token is not None:
                tok = tok.with_mask_token(mask_token)
            if add_tokens:
                tok = tok.with_added_tokens(add_tokens)
            tok_sha = tok.save(self.tmp / "tokenizer.json")
            self.timings["tokenizer"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            dtype = dtype_for_vocab(tok.vocab_size)
            entries, token_counts = {}, np.zeros(tok.vocab_size, dtype=np.int64)
            for name, docs in splits.items():
                entries[name] = self._encode_split(spool, docs, tok, dtype, name,
                                                   token_counts if name == "train" else None)
                entries[name]["characters"] = int(sum(spool.chars[i] for i in docs))
                entries[name]["bytes"] = int(sum(spool.lengths[i] for i in docs))  # UTF-8, for bits per byte
            self.timings["encode"] = time.perf_counter() - t0
            encoded_bytes = sum(spool.lengths[i] for docs in splits.values() for i in docs)
        finally:
            spool.close()
            spool.path.unlink(missing_ok=True)

        manifest = {
            "format": FORMAT,
            "lmforge_version": lmforge.__version__,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "tokenizer": {"file": "tokenizer.json", "sha256": tok_sha, "kind": tok.kind},
            "special_tokens": tok.to_dict()["special_tokens"],
            "seed": seed,
            "split": list(split),
            "sources": self.stats.sources,
            "splits": {name: {k: e[k] for k in ("file", "tokens", "documents", "characters", "bytes", "sha256")} for name, e in entries.items()},
        }
        write_manifest(self.tmp, manifest)
        t0 = time.perf_counter()
        leakage = data_report.find_leakage(self.tmp, tok, progress=self.progress)
        self.timings["leakage"] = time.perf_counter() - t0
        report = data_report.build_report(manifest, entries, tok, token_counts, self.stats, duplicates,
                                          leakage, self.log.warnings, self.timings)
        report["encoded_bytes"] = encoded_bytes  # text bytes the encode step turned into tokens
        data_report.write_report(self.tmp, report)
        return report

    # -- step 1: read + clean into the spool
    def _read(self, spool: _Spool, files: list[Path], doc_split, jsonl_field, parquet_column) -> None:
        reader = CorpusReader(doc_split=doc_split, jsonl_field=jsonl_field, parquet_column=parquet_column,
                              warn=self.log.warn, stats=self.stats)
        total = sum(f.stat().st_size for f in files)
        with self.log.bar("reading", total) as bar:
            for doc in reader.documents(files, on_file_done=lambda p: bar.update(p.stat().st_size)):
                spool.append(doc)
        spool.finish_writing()
        if len(spool) == 0:
            what = f"{len(files)} file(s)" if files else "the inputs (no .txt, .jsonl or .parquet files found)"
            raise DataError(f"no documents in {what}: {self.stats.empty_documents} empty document(s), "
                            f"{len(self.stats.skipped_files)} skipped file(s); give a corpus with text")

    # -- step 2: exact duplicates
    def _dedupe(self, spool: _Spool, keep_duplicates: bool) -> tuple[np.ndarray, int]:
        if keep_duplicates:
            return np.arange(len(spool)), 0
        kept = first_occurrences(bytes(spool.digests))
        return kept, len(spool) - len(kept)

    # -- step 3: shuffle and split
    def _split(self, spool: _Spool, kept: np.ndarray, fractions, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        order = rng.permutation(kept)
        if len(order) >= 3:
            n_train, n_val, _ = split_counts(len(order), fractions)
            return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
        # Fewer than 3 documents: cut the longest into train/val/test pieces (see the module docstring).
        longest = max(order, key=lambda i: spool.chars[i])
        text = spool.text(longest)
        if len(text) < 3:
            raise DataError(f"the corpus is too small to split: its longest document has {len(text)} character(s); "
                            "give at least 3 documents or more text")
        a, b = cut_points(text, fractions)
        first_piece = len(spool)
        spool.reopen_for_append()
        for piece in (text[:a], text[a:b], text[b:]):
            spool.append(piece)
        spool.finish_writing()
        self.log.warn(f"only {len(order)} document(s): the longest was cut into train/val/test pieces at "
                      f"characters {a} and {b}")
        others = [i for i in order if i != longest]
        return {"train": np.array([*others, first_piece], dtype=np.int64),
                "val": np.array([first_piece + 1]), "test": np.array([first_piece + 2])}

    # -- step 4: tokenizer
    def _tokenizer(self, spool: _Spool, train_docs: np.ndarray, kind: str | Tokenizer, vocab_size: int,
                   special_tokens) -> Tokenizer:
        if isinstance(kind, Tokenizer):
            return kind
        if kind == "byte":
            return byte_tokenizer(tuple(special_tokens))
        in_file_order = np.sort(train_docs)  # sequential reads; counts do not depend on order
        total = int(sum(spool.lengths[i] for i in in_file_order))
        # Our own bar over the text fed to the trainer: the library's bar writes to stdout.
        with self.log.bar(f"training {kind} tokenizer", total) as bar:
            def texts():
                for i in in_file_order:
                    bar.update(spool.lengths[i])
                    yield spool.text(i)
            if kind == "char":
                return train_char(texts(), vocab_size, tuple(special_tokens))
            return train_bpe(texts(), vocab_size, tuple(special_tokens), length=len(in_file_order))

    # -- step 5: encode + write
    def _encode_split(self, spool: _Spool, docs: np.ndarray, tok: Tokenizer, dtype: np.dtype, name: str,
                      token_counts: np.ndarray | None) -> dict:
        batches = _batches(spool, docs)
        total = int(sum(spool.lengths[i] for i in docs))
        start = np.array([] if tok.start_id is None else [tok.start_id], dtype=np.int64)  # GPT-2's has none
        end = np.array([tok.end_id], dtype=np.int64)

        def encode(batch: list[int]) -> tuple[np.ndarray, int, int]:
            texts = [spool.text(i) for i in batch]
            pieces = []
            for ids in tok.encode_batch_arrays(texts):
                pieces += (start, ids, end)
            return np.concatenate(pieces), len(batch), sum(spool.lengths[i] for i in batch)

        with ShardWriter(self.tmp / f"{name}.bin", dtype) as writer, self.log.bar(f"encoding {name}", total) as bar:
            for ids, n_docs, n_bytes in _ordered_map(encode, batches, self.workers):
                writer.write(ids, documents=n_docs)
                if token_counts is not None:
                    token_counts += np.bincount(ids, minlength=tok.vocab_size)
                bar.update(n_bytes)
            return writer.close()


def _batches(spool: _Spool, docs: np.ndarray):
    """Consecutive groups of document indices holding about BATCH_BYTES of text."""
    batch, size = [], 0
    for i in docs.tolist():
        batch.append(i)
        size += spool.lengths[i]
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _ordered_map(fn, items, workers: int):
    """``map(fn, items)`` on ``workers`` threads, in order, with at most workers+1 results in flight."""
    if workers == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


__all__ = ["prepare", "format_report"]
