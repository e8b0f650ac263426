"""The data report of `lmforge prepare`: statistics per split, cleaning counts and a leakage check.

Leakage: a validation or test document "leaks" when most of its text also appears in the training
split (a near-copy: the same play in two editions, a quoted passage, a document with a few words
changed). Each document is cut into shingles of ``k`` consecutive token ids, each shingle hashed to
64 bits; a fixed hash-defined sample of them (all of them for small splits, about ``max_sampled`` in
total for large ones) is kept for val and test in a sorted array, and the training shard is streamed
through in chunks, marking which sampled shingles it contains. A document is counted as leaked when
at least ``threshold`` of its sampled shingles occur in train. Memory is bounded by the sample size
and the chunk size, not by the corpus.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.data.shards import ShardFile, read_manifest
from lmforge.files import atomic_write_text
from lmforge.tokenizer import N_SPECIAL, Tokenizer

REPORT = "report.json"
HASH_BASE = np.uint64(0x100000001B3)  # FNV-64 prime, as the polynomial base of the rolling hash
HASH_BASE_INVERSE = np.uint64(pow(int(HASH_BASE), -1, 1 << 64))
MIN_SHINGLES = 3  # documents with fewer sampled shingles are too short to judge
CHUNK = 1 << 20  # tokens per streamed chunk (about 50 MB of temporaries)


# ------------------------------------------------------------------------------------------ shingles
def _mix(h: np.ndarray) -> np.ndarray:
    """Finaliser of splitmix64 (Steele et al. 2014): spreads the polynomial hash over all 64 bits."""
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def shingle_hashes(ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the windows of ``k`` consecutive ids that contain no special token.

    Returns ``(starts, hashes)``: window start positions in ``ids`` and their uint64 hashes. The
    polynomial hash sum_j ids[p+j] * B^j (mod 2^64) of every window comes from one prefix sum:
    (S[p+k] - S[p]) * B^-p, with S[i] = sum_{j<i} ids[j] * B^j; B is odd, so B^-1 exists mod 2^64.
    """
    n = len(ids) - k + 1
    if n <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    ids = np.asarray(ids)
    powers = _powers(HASH_BASE, len(ids))  # B^0, B^1, ...
    inverse_powers = _powers(HASH_BASE_INVERSE, n)
    prefix = np.zeros(len(ids) + 1, dtype=np.uint64)
    np.cumsum(ids.astype(np.uint64) * powers, out=prefix[1:])
    h = (prefix[k:] - prefix[:n]) * inverse_powers
    special = np.concatenate(([0], np.cumsum(ids < N_SPECIAL)))
    ok = special[k:] == special[:n]
    return np.flatnonzero(ok), _mix(h[ok])


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) mod 2^64."""
    out = np.ones(n, dtype=np.uint64)
    np.cumprod(np.full(n - 1, base, dtype=np.uint64), out=out[1:])
    return out


def _sampled_windows(ids: np.ndarray, k: int, modulus: int):
    """Chunk by chunk over a shard (a ShardFile or an array): ``(starts, hashes)`` of the sampled shingles."""
    step = CHUNK
    for lo in range(0, max(len(ids) - k + 1, 0), step):
        chunk = np.asarray(ids[lo:lo + step + k - 1])
        starts, hashes = shingle_hashes(chunk, k)
        keep = hashes % np.uint64(modulus) == 0
        yield starts[keep] + lo, hashes[keep]


def default_shingle_tokens(kind: str) -> int:
    """Shingle length in tokens, about five words of English: 8 BPE tokens, 32 chars or bytes."""
    return 8 if kind == "bpe" else 32


# ------------------------------------------------------------------------------------------- leakage
def find_leakage(data_dir: str | Path, tok: Tokenizer, *, shingle_tokens: int | None = None,
                 threshold: float = 0.5, max_sampled: int = 1_000_000, max_examples: int = 3,
                 progress: bool = False) -> dict:
    """How many val/test documents share at least ``threshold`` of their shingles with train.

    Returns ``{"shingle_tokens", "sample_rate", "threshold", "val": {"documents", "checked", "leaked"},
    "test": {...}, "examples": [{"split", "document", "shared", "text", "train_document", "train_text"}]}``;
    document numbers count from 0 in shard order. "checked" excludes documents too short to judge.
    """
    k = shingle_tokens or default_shingle_tokens(tok.kind)
    manifest = read_manifest(data_dir)
    eval_tokens = sum(manifest["splits"][s]["tokens"] for s in ("val", "test"))
    modulus = max(1, math.ceil(eval_tokens / max_sampled))

    # Sampled shingles of every val/test document.
    per_split = {}
    for split in ("val", "test"):
        ids = ShardFile(data_dir, split)
        ends = _end_positions(ids, tok.end_id)
        starts, hashes = [], []
        for s, h in _sampled_windows(ids, k, modulus):
            starts.append(s)
            hashes.append(h)
        starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        per_split[split] = (ids, ends, np.searchsorted(ends, starts, side="right"), hashes)
    table = np.unique(np.concatenate([v[3] for v in per_split.values()]))
    first_train_pos = np.full(len(table), -1, dtype=np.int64)

    # Stream train, remembering where each sampled val/test shingle first occurs.
    train = ShardFile(data_dir, "train")
    with tqdm(total=len(train), desc="leakage check", unit="tok", unit_scale=True, file=sys.stderr,
              disable=not progress, leave=not sys.stderr.isatty()) as bar:  # as prepare's bars: see _Log.bar
        for starts, hashes in _sampled_windows(train, k, modulus):
            if len(table):
                idx = np.minimum(np.searchsorted(table, hashes), len(table) - 1)
                hit = table[idx] == hashes
                where, pos = idx[hit], starts[hit]
                new = first_train_pos[where] < 0
                first_train_pos[where[new]] = pos[new]
            bar.update(min(CHUNK, len(train) - bar.n))

    result = {"shingle_tokens": k, "sample_rate": 1 / modulus, "threshold": threshold}
    candidates, train_pos_of = [], {}
    for split, (ids, ends, doc_of, hashes) in per_split.items():
        n_docs = len(ends)
        train_pos = first_train_pos[np.searchsorted(table, hashes)] if len(table) else np.zeros(0, np.int64)
        sampled = np.bincount(doc_of, minlength=n_docs)
        shared = np.bincount(doc_of[train_pos >= 0], minlength=n_docs)
        judged = sampled >= MIN_SHINGLES
        fraction = np.where(judged, shared / np.maximum(sampled, 1), 0.0)
        leaked = np.flatnonzero(judged & (fraction >= threshold))
        result[split] = {"documents": int(n_docs), "checked": int(judged.sum()), "leaked": int(len(leaked))}
        candidates += [(-float(fraction[d]), split, int(d)) for d in leaked]
        train_pos_of[split] = (ids, ends, doc_of, train_pos)
    result["examples"] = [_example(tok, train, *c, *train_pos_of[c[1]]) for c in sorted(candidates)[:max_examples]]
    return result


def _end_positions(ids: ShardFile, end_id: int) -> np.ndarray:
    """Exclusive end offsets of the documents of a shard, read chunk by chunk."""
    ends = [np.flatnonzero(ids[lo:lo + CHUNK] == end_id) + lo + 1 for lo in range(0, len(ids), CHUNK)]
    return np.concatenate(ends) if ends else np.zeros(0, np.int64)


def _example(tok: Tokenizer, train: ShardFile, neg_fraction: float, split: str, doc: int,
             ids: ShardFile, ends: np.ndarray, doc_of: np.ndarray, train_pos: np.ndarray) -> dict:
    """One leaked document and the train document where its first shared shingle occurs."""
    begin = 0 if doc == 0 else int(ends[doc - 1])
    first_shared = int(train_pos[(doc_of == doc) & (train_pos >= 0)][0])
    train_doc, train_begin = _train_document_at(train, first_shared, tok.end_id)
    return {"split": split, "document": doc, "shared": round(-neg_fraction, 3),
            "text": _snippet(tok, ids[begin:begin + 64]),
            "train_document": train_doc, "train_text": _snippet(tok, train[train_begin:train_begin + 64])}


def _train_document_at(train: np.ndarray, pos: int, end_id: int) -> tuple[int, int]:
    """(document number, start offset) of the train document containing token ``pos``."""
    n_before = 0
    for lo in range(0, pos, CHUNK):
        n_before += int(np.count_nonzero(np.asarray(train[lo:min(lo + CHUNK, pos)]) == end_id))
    lo = max(0, pos - CHUNK)
    ends = np.flatnonzero(np.asarray(train[lo:pos]) == end_id)
    return n_before, (lo + int(ends[-1]) + 1) if len(ends) else lo


def _snippet(tok: Tokenizer, ids: np.ndarray, width: int = 60) -> str:
    text = " ".join(tok.decode(np.asarray(ids).tolist()).split())
    return text[:width] + ("..." if len(text) > width else "")


# -------------------------------------------------------------------------------------------- report
def build_report(manifest: dict, entries: dict, tok: Tokenizer, token_counts: np.ndarray, stats, duplicates: int,
                 leakage: dict, warnings: list[str], timings: dict) -> dict:
    """The report dict written to report.json (see ``format_report`` for its reading)."""
    splits = {}
    for name, e in entries.items():
        content_tokens = e["tokens"] - 2 * e["documents"]  # without <START> and <END>
        splits[name] = {"documents": e["documents"], "characters": e["characters"], "tokens": e["tokens"],
                        "chars_per_token": round(e["characters"] / max(content_tokens, 1), 3)}
    top = np.argsort(-token_counts, kind="stable")[:20]
    return {
        "splits": splits,
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size,
                      "most_frequent": [{"id": int(i), "token": tok.token_text(int(i)), "count": int(token_counts[i])}
                                        for i in top if token_counts[i] > 0]},
        "cleaning": {"files": len(stats.sources), "input_bytes": sum(s["bytes"] for s in stats.sources),
                     "replaced_sequences": sum(stats.replaced.values()), "replaced_by_file": stats.replaced,
                     "skipped_files": stats.skipped_files, "empty_documents": stats.empty_documents,
                     "duplicate_documents": duplicates},
        "leakage": leakage,
        "warnings": warnings,
        "seed": manifest["seed"],
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def write_report(data_dir: str | Path, report: dict) -> None:
    """Write ``report.json`` beside the shards (atomically)."""
    atomic_write_text(Path(data_dir, REPORT), json.dumps(report, indent=1, ensure_ascii=False) + "\n")


def format_report(report: dict) -> str:
    """The report as text for the terminal."""
    lines = [f"{'split':<6} {'documents':>10} {'characters':>14} {'tokens':>13} {'chars/token':>11}"]
    for name, s in report["splits"].items():
        lines.append(f"{name:<6} {s['documents']:>10,} {s['characters']:>14,} {s['tokens']:>13,} {s['chars_per_token']:>11.2f}")
    t = report["tokenizer"]
    top = ", ".join(f"{e['token']!r}" for e in t["most_frequent"][:10])
    lines.append(f"tokenizer: {t['kind']}, vocabulary {t['vocab_size']:,}; most frequent: {top}")
    c = report["cleaning"]
    lines.append(f"cleaning: {c['files']} file(s), {c['input_bytes']:,} bytes; {c['replaced_sequences']} invalid UTF-8 "
                 f"sequence(s) replaced; {len(c['skipped_files'])} file(s) skipped; {c['empty_documents']} empty and "
                 f"{c['duplicate_documents']} duplicate document(s) removed")
    for s in c["skipped_files"]:
        lines.append(f"  skipped {s['path']}: {s['reason']}")
    lk = report["leakage"]
    lines.append(f"leakage ({lk['shingle_tokens']}-token shingles, share >= {lk['threshold']:.0%} with train): "
                 f"val {lk['val']['leaked']}/{lk['val']['checked']}, test {lk['test']['leaked']}/{lk['test']['checked']} "
                 "document(s)")
    for e in lk["examples"]:
        lines.append(f"  {e['split']} #{e['document']} ({e['shared']:.0%} shared) {e['text']!r}")
        lines.append(f"    ~ train #{e['train_document']} {e['train_text']!r}")
    return "\n".join(lines)
