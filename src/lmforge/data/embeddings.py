"""Token-embedding initialisation from word vectors (``data.embedding_init``).

Two sources, chosen by a spec string:

* ``word2vec``: a gensim Word2Vec (skip-gram, negative sampling) trained on the train split, where each
  document's token ids (between <START> and <END>) form one "sentence" of string tokens. Training uses
  one worker thread and the run's seed, so the vectors are the same on every run. They are cached beside
  the shards as ``DATA_DIR/word2vec-<dim>-<key>.npy`` (float32, loaded with ``allow_pickle=False``) and
  ``DATA_DIR/word2vec-<dim>-<key>.json`` (which rows were trained, the settings and the .npy's sha256;
  written last, so a cache without it does not count). ``key`` hashes the train split, the tokenizer,
  the dimension, the seed and the settings.
* ``glove:PATH``: a GloVe text file (one ``word f1 ... fd`` per line; a word2vec-style ``count dim``
  header line is accepted). A vocabulary token takes the vector of the word equal to its text, else to
  its text stripped of surrounding spaces (BPE tokens such as " the"), else to that lower-cased. Every
  line's field count is checked; the numbers are parsed only for the words the vocabulary needs.

Either way the vectors are centred and scaled so that their standard deviation equals that of the
weight they replace (the model's own init), then copied into the rows they cover; the other rows keep
their random init. The trainer calls :func:`init_embeddings` once, after building the model and before
the optimizer sees the weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import DataError
from lmforge.files import atomic_file, atomic_write_text, sha256_file

WORD2VEC_SETTINGS = dict(sg=1, window=5, negative=5, epochs=5, min_count=1, sample=1e-3)
WORD2VEC_MAX_TOKENS = 20_000_000  # train-split prefix used for word2vec; enough for a few hundred MB of text
_GENSIM_MAX_SENTENCE = 10_000  # gensim silently truncates longer sentences, so documents are cut to this


def init_embeddings(model_tok_emb_weight: torch.Tensor, spec: str, data_dir: str | Path, tokenizer: Any,
                    seed: int) -> dict[str, Any]:
    """Copy word vectors into the token-embedding weight in place.

    Args:
        model_tok_emb_weight: the (vocab_size, n_embd) weight of ``model.tok_emb`` (tied or not), already
            initialised; rows the vectors do not cover keep their values.
        spec: ``none`` | ``word2vec`` | ``glove:PATH`` (``DataConfig.embedding_init``).
        data_dir: the prepared data directory (train split for word2vec; the word2vec cache is written here).
        tokenizer: the data's ``lmforge.tokenizer.Tokenizer`` (vocab_size, start_id, end_id, pad_id, decode).
        seed: the run's seed (word2vec's initialisation and sampling).

    Returns:
        ``{"source": spec, "coverage": rows initialised / vocab_size, "rows_initialised": int,
        "vocab_size": int, "dim": int, "cache": path of the word2vec vectors or None, "cached": bool}``.

    Raises:
        DataError: a missing or malformed GloVe file, a dimension that is not n_embd, no token covered.
    """
    weight = model_tok_emb_weight
    vocab_size, dim = int(tokenizer.vocab_size), int(weight.shape[1])
    report: dict[str, Any] = {"source": spec, "coverage": 0.0, "rows_initialised": 0, "vocab_size": vocab_size,
                              "dim": dim, "cache": None, "cached": False}
    if spec == "none":
        return report
    if weight.ndim != 2 or weight.shape[0] < vocab_size:
        raise DataError(f"the token embedding has shape {tuple(weight.shape)}, too small for the tokenizer's "
                        f"vocab_size={vocab_size}; set model.vocab_size to the prepared data's vocab_size")
    if spec == "word2vec":
        vectors, rows, cache, cached = _word2vec_vectors(Path(data_dir), tokenizer, dim, seed)
        report.update(cache=str(cache) if cache else None, cached=cached)
    elif spec.startswith("glove:") and len(spec) > len("glove:"):
        vectors, rows = _glove_vectors(Path(spec[len("glove:"):]), tokenizer, dim)
    else:
        raise DataError(f"data.embedding_init={spec!r} is invalid: choose none, word2vec or glove:PATH")

    _copy_scaled(weight, vectors, rows)
    report.update(rows_initialised=len(rows), coverage=len(rows) / vocab_size)
    return report


def _copy_scaled(weight: torch.Tensor, vectors: np.ndarray, rows: np.ndarray) -> None:
    """weight[rows] = vectors, centred and scaled to the std of the existing weight."""
    target_std = float(weight.detach().float().std())
    v = vectors.astype(np.float64)
    v -= v.mean(axis=0, keepdims=True)
    std = float(v.std())
    if std > 0:
        v *= target_std / std
    with torch.no_grad():
        index = torch.as_tensor(rows, dtype=torch.long, device=weight.device)
        weight.index_copy_(0, index, torch.as_tensor(v, dtype=weight.dtype, device=weight.device))


# ----------------------------------------------------------------------------------------------- GloVe
def _token_texts(tokenizer: Any) -> dict[int, str]:
    """The text of each non-special token id (what decode gives for that one id)."""
    special = {tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id}
    texts = {}
    for i in range(int(tokenizer.vocab_size)):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if text and "\ufffd" not in text:  # a lone byte of a multi-byte character has no word to match
            texts[i] = text
    return texts


def _glove_vectors(path: Path, tokenizer: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, dim) float32, rows (n,) int64) for the vocabulary tokens found in a GloVe file."""
    fix = f"pass data.embedding_init=glove:PATH with a GloVe text file of {dim}-dimensional vectors"
    if not path.is_file():
        raise DataError(f"GloVe file {path} does not exist; {fix}")
    # Which words we need: each candidate form of each token, most specific first.
    texts = _token_texts(tokenizer)
    wanted = {form for text in texts.values() for form in (text, text.strip(), text.strip().lower()) if form}
    found: dict[str, np.ndarray] = {}
    file_dim = None
    try:
        with path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                fields = line.rstrip("\n\r").split(" ")
                if fields and fields[-1] == "":
                    fields.pop()  # a trailing space, as some GloVe exports write
                if not fields or fields == [""]:
                    continue
                if file_dim is None:
                    if lineno == 1 and len(fields) == 2 and all(x.isdigit() for x in fields):
                        file_dim = int(fields[1])  # word2vec text header "count dim"
                        _check_dim(path, file_dim, dim)
                        continue
                    file_dim = len(fields) - 1
                    if file_dim < 1:
                        raise DataError(f"GloVe file {path} line {lineno} holds a word and no numbers; "
                                        f"each line must be 'word f1 ... fd'")
                    _check_dim(path, file_dim, dim)
                if len(fields) - 1 != file_dim:
                    # More fields than file_dim + 1 is a word with spaces (a few GloVe files have them),
                    # unless the extra fields are numbers too.
                    if len(fields) - 1 < file_dim or _is_float(fields[-file_dim - 1]):
                        raise DataError(f"GloVe file {path} line {lineno} has {len(fields) - 1} numbers but the "
                                        f"first vector has {file_dim}; every line must have the same dimension")
                    word = " ".join(fields[:-file_dim])
                    numbers = fields[-file_dim:]
                else:
                    word, numbers = fields[0], fields[1:]
                if word in wanted and word not in found:
                    try:
                        found[word] = np.array([float(x) for x in numbers], dtype=np.float32)
                    except ValueError:
                        bad = next(x for x in numbers if not _is_float(x))
                        raise DataError(f"GloVe file {path} line {lineno} has {bad[:20]!r} where a number "
                                        f"belongs; each line must be 'word f1 ... fd'") from None
    except UnicodeDecodeError:
        raise DataError(f"GloVe file {path} is not UTF-8 text; {fix}") from None
    if file_dim is None:
        raise DataError(f"GloVe file {path} is empty; {fix}")

    rows, vectors = [], []
    for i, text in texts.items():
        for form in (text, text.strip(), text.strip().lower()):
            if form in found:
                rows.append(i)
                vectors.append(found[form])
                break
    if not rows:
        raise DataError(f"none of the {len(texts)} tokens of the {getattr(tokenizer, 'kind', '')} tokenizer "
                        f"matches a word in GloVe file {path}; use word vectors over the same kind of tokens, "
                        f"or data.embedding_init=word2vec")
    for i, v in zip(rows, vectors):
        if not np.all(np.isfinite(v)):
            raise DataError(f"GloVe file {path} has a non-finite number in the vector of {texts[i]!r}")
    return np.stack(vectors), np.array(rows, dtype=np.int64)


def _check_dim(path: Path, file_dim: int, dim: int) -> None:
    if file_dim != dim:
        raise DataError(f"GloVe file {path} has {file_dim}-dimensional vectors but model.n_embd={dim}; "
                        f"set model.n_embd={file_dim} (a multiple of model.n_head) or use a {dim}-dimensional file")


def _is_float(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


# -------------------------------------------------------------------------------------------- word2vec
def _word2vec_vectors(data_dir: Path, tokenizer: Any, dim: int,
                      seed: int) -> tuple[np.ndarray, np.ndarray, Path | None, bool]:
    """(vectors, rows, cache path or None, whether it came from the cache) for word2vec on the train split."""
    from lmforge.data.shards import load_split, read_manifest

    manifest = read_manifest(data_dir)
    tokens = load_split(data_dir, "train")
    vocab_size = int(tokenizer.vocab_size)
    settings = dict(WORD2VEC_SETTINGS, vector_size=dim, seed=int(seed), max_tokens=WORD2VEC_MAX_TOKENS)
    identity = {
        "train_sha256": manifest.get("splits", {}).get("train", {}).get("sha256"),
        "train_tokens": int(len(tokens)),
        "tokenizer_sha256": manifest.get("tokenizer", {}).get("sha256"),
        "vocab_size": vocab_size,
        "settings": settings,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    npy_path = data_dir / f"word2vec-{dim}-{key}.npy"
    meta_path = data_dir / f"word2vec-{dim}-{key}.json"

    cached = _read_cache(npy_path, meta_path, vocab_size, dim)
    if cached is not None:
        return cached[0], cached[1], npy_path, True

    table, rows = _train_word2vec(tokens, tokenizer, settings)
    try:
        _write_cache(npy_path, meta_path, table, rows, identity)
    except OSError:
        return table[rows], rows, None, False  # a read-only data directory: train again next time
    return table[rows], rows, npy_path, False


def _documents(tokens: np.ndarray, tokenizer: Any, max_tokens: int) -> list[list[str]]:
    """Each document's token ids as strings, special tokens dropped, cut into gensim-sized pieces."""
    words = [str(i) for i in range(int(tokenizer.vocab_size))]  # shared string objects keep memory low
    head = np.asarray(tokens[:max_tokens])
    special = np.array([tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id])
    is_special = np.isin(head, special)
    starts = np.flatnonzero(head == tokenizer.start_id)
    bounds = np.concatenate([[0], starts, [len(head)]])
    sentences = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        doc = head[a:b][~is_special[a:b]]
        for c in range(0, len(doc), _GENSIM_MAX_SENTENCE):
            piece = doc[c:c + _GENSIM_MAX_SENTENCE]
            if len(piece):
                sentences.append([words[t] for t in piece.tolist()])
    return sentences


def _train_word2vec(tokens: np.ndarray, tokenizer: Any, settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(table (vocab_size, dim) float32 with zeros for unseen tokens, rows (n,) int64 of the seen ones)."""
    try:
        from gensim.models import Word2Vec
    except ImportError:
        raise DataError("data.embedding_init=word2vec needs gensim; pip install 'gensim>=4.3'") from None
    sentences = _documents(tokens, tokenizer, settings["max_tokens"])
    if not sentences:
        raise DataError("the train split holds no tokens to train word2vec on; prepare a larger corpus")
    # workers=1: gensim's threads interleave updates nondeterministically; one thread makes the seed decide.
    model = Word2Vec(sentences=sentences, vector_size=settings["vector_size"], window=settings["window"],
                     min_count=settings["min_count"], sg=settings["sg"], negative=settings["negative"],
                     epochs=settings["epochs"], sample=settings["sample"], seed=settings["seed"], workers=1)
    table = np.zeros((int(tokenizer.vocab_size), settings["vector_size"]), dtype=np.float32)
    rows = np.array(sorted(int(w) for w in model.wv.key_to_index), dtype=np.int64)
    for r in rows:
        table[r] = model.wv[str(r)]
    return table, rows


def _write_cache(npy_path: Path, meta_path: Path, table: np.ndarray, rows: np.ndarray,
                 identity: dict[str, Any]) -> None:
    """Write the .npy, then the JSON that vouches for it, each atomically."""
    with atomic_file(npy_path, "wb") as f:
        np.save(f, table, allow_pickle=False)
    meta = {"format": "lmforge-word2vec-v1", **identity, "rows": rows.tolist(), "npy_sha256": sha256_file(npy_path)}
    atomic_write_text(meta_path, json.dumps(meta))


def _read_cache(npy_path: Path, meta_path: Path, vocab_size: int,
                dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(vectors, rows) from a complete, intact cache; None when absent or damaged (then it is rebuilt)."""
    if not (npy_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if sha256_file(npy_path) != meta.get("npy_sha256"):
            return None
        table = np.load(npy_path, allow_pickle=False)
        rows = np.array(meta["rows"], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = (table.dtype == np.float32 and table.shape == (vocab_size, dim) and rows.ndim == 1 and len(rows) > 0
          and rows.min() >= 0 and rows.max() < vocab_size and bool(np.isfinite(table).all()))
    return (table[rows], rows) if ok else None


__all__ = ["init_embeddings", "WORD2VEC_SETTINGS", "WORD2VEC_MAX_TOKENS"]
