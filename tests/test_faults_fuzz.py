"""Hostile files fail closed: the shard reader, the checkpoint loader and the tokenizer loader, fed random
and mutated bytes (and mutated JSON values), raise only lmforge's own errors, quickly, without
allocating what a file merely claims to hold.

Each reader gets two kinds of input from hypothesis: byte-level mutations of a valid file (flips, cuts,
insertions, random bytes) and structure-aware ones (a value somewhere in the file's JSON replaced by
another JSON value: huge or negative numbers, wrong types, nesting). For checkpoints the manifest is
rewritten to match the mutated file, as a deliberate tamperer would, so the parsers behind the hash
check get fuzzed too. Examples are derandomized (the same in every CI run); set LMFORGE_FUZZ_EXAMPLES
to run more, and LMFORGE_FUZZ_RANDOM=1 to draw new ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.errors import LmforgeError

EXAMPLES = int(os.environ.get("LMFORGE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, derandomize=not os.environ.get("LMFORGE_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, -1, 1, 2**31, 2**63, 10**12])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
    | st.sampled_from(["", "../../../etc/passwd", "/etc/passwd", "uint64", "float32", "model.safetensors", "F32"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


@st.composite
def byte_mutation(draw, original: bytes) -> bytes:
    """`original` with a few random edits: bit flips, overwrites, cuts, insertions; or random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=2048))
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from([0, 0xFF, ord("9"), ord('"'), ord("{"), ord("-")]))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def json_mutation(draw, obj):
    """A deep copy of `obj` with one to three values (at random paths) replaced by random JSON values."""
    obj = json.loads(json.dumps(obj))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            return draw(JSON_VALUES)
        path = draw(st.sampled_from(paths))
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return obj


def _dump(obj) -> bytes:
    try:
        return json.dumps(obj).encode()
    except ValueError:  # NaN in a place json refuses: write it the way Python's json writes NaN
        return json.dumps(obj, allow_nan=True).encode()


def _fails_closed(load, *args) -> None:
    """`load(*args)` either works or raises an LmforgeError whose message is one line."""
    try:
        load(*args)
    except LmforgeError as e:
        assert "\n" not in str(e), str(e)


# -------------------------------------------------------------------------------------------- shards
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tiny_training import write_prepared_data

    return write_prepared_data(tmp_path_factory.mktemp("fuzzdata") / "data",
                               {"train": ["hello world " * 20, "more words here"], "val": ["a b c " * 10]})


def _load_both(data_dir: Path) -> None:
    from lmforge.data.shards import load_split, read_manifest

    _fails_closed(read_manifest, data_dir)
    for split in ("train", "val"):
        _fails_closed(load_split, data_dir, split)
        _fails_closed(lambda d, s: load_split(d, s, check_ids=True), data_dir, split)


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


@FUZZ
@given(st.data())
def test_fuzz_shard_manifest_bytes(dataset, tmp_path, data):
    work = _copy(dataset, tmp_path / "d")
    original = (dataset / "manifest.json").read_bytes()
    (work / "manifest.json").write_bytes(data.draw(byte_mutation(original)))
    _load_both(work)


@FUZZ
@given(st.data())
def test_fuzz_shard_manifest_values(dataset, tmp_path, data):
    work = _copy(dataset, tmp_path / "d")
    manifest = json.loads((dataset / "manifest.json").read_text())
    (work / "manifest.json").write_bytes(_dump(data.draw(json_mutation(manifest))))
    _load_both(work)


@FUZZ
@given(st.data())
def test_fuzz_shard_files(dataset, tmp_path, data):
    work = _copy(dataset, tmp_path / "d")
    victim = data.draw(st.sampled_from(["train.bin", "val.bin", "tokenizer.json"]))
    (work / victim).write_bytes(data.draw(byte_mutation((dataset / victim).read_bytes())))
    _load_both(work)


# --------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from lmforge.tokenizer import byte_tokenizer
    from tiny_training import tiny_config, tiny_trainer

    root = tmp_path_factory.mktemp("fuzzckpt")
    byte_tokenizer().save(root / "tokenizer.json")
    summary = tiny_trainer(tiny_config(root / "run", **{"train.max_steps": 2}), tokenizer_file=root / "tokenizer.json").fit()
    return Path(summary["checkpoint"])


def _reseal(ckpt_dir: Path) -> None:
    """Rewrite manifest.json to match the files as they are now (what a deliberate tamperer does)."""
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    for name in manifest["files"]:
        f = ckpt_dir / name
        if f.is_file():
            manifest["files"][name] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "bytes": f.stat().st_size}
    (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))


def _load_checkpoint(ckpt_dir: Path) -> None:
    from lmforge.checkpoint import load_for_inference, load_training_state
    from lmforge.config import OptimConfig, preset
    from lmforge.model import GPT
    from lmforge.train.optim import build_optimizer

    _fails_closed(load_for_inference, ckpt_dir)
    model = GPT(preset("tiny", vocab_size=32, block_size=16))
    optimizer = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    _fails_closed(load_training_state, ckpt_dir, model, optimizer)


@FUZZ
@given(st.data())
def test_fuzz_checkpoint_bytes(ckpt, tmp_path, data):
    work = _copy(ckpt, tmp_path / "c")
    victim = data.draw(st.sampled_from(["model.safetensors", "optimizer.safetensors", "state.json", "config.json",
                                        "tokenizer.json", "manifest.json"]))
    (work / victim).write_bytes(data.draw(byte_mutation((ckpt / victim).read_bytes())))
    if victim != "manifest.json" and data.draw(st.booleans()):
        _reseal(work)
    _load_checkpoint(work)


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@FUZZ
@given(st.data())
def test_fuzz_checkpoint_values(ckpt, tmp_path, data):
    """Resealed checkpoints whose JSON (state, config, manifest, safetensors headers) holds hostile values."""
    work = _copy(ckpt, tmp_path / "c")
    victim = data.draw(st.sampled_from(["model.safetensors", "optimizer.safetensors", "state.json", "config.json",
                                        "tokenizer.json"]))
    if victim.endswith(".safetensors"):
        header, body = _safetensors_parts(ckpt / victim)
        text = _dump(data.draw(json_mutation(header)))
        (work / victim).write_bytes(struct.pack("<Q", len(text)) + text + body)
    else:
        (work / victim).write_bytes(_dump(data.draw(json_mutation(json.loads((ckpt / victim).read_text())))))
    _reseal(work)
    _load_checkpoint(work)


def test_a_header_claiming_a_huge_size_is_refused_before_allocating(ckpt, tmp_path):
    from lmforge.checkpoint import check_safetensors, load_for_inference
    from lmforge.errors import CheckpointError

    work = _copy(ckpt, tmp_path / "c")
    header, body = _safetensors_parts(ckpt / "model.safetensors")
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2**20, 2**20]  # 4 TiB of float32
    header[name]["data_offsets"] = [0, 4 * 2**40]
    text = json.dumps(header).encode()
    (work / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + body)
    with pytest.raises(CheckpointError, match="outside the file"):
        check_safetensors(work / "model.safetensors")
    (work / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CheckpointError, match="header claims"):
        check_safetensors(work / "model.safetensors")
    _reseal(work)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_for_inference(work)


# ----------------------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    from lmforge.tokenizer import byte_tokenizer, train_bpe, train_char

    root = tmp_path_factory.mktemp("fuzztok")
    texts = ["hello world, hello tokenizer " * 5, "the quick brown fox jumps over the lazy dog " * 5]
    files = {"byte": root / "byte.json", "char": root / "char.json", "bpe": root / "bpe.json"}
    byte_tokenizer().save(files["byte"])
    train_char(texts).save(files["char"])
    train_bpe(texts, vocab_size=300).save(files["bpe"])
    return files


@FUZZ
@given(st.data())
def test_fuzz_tokenizer_bytes(tokenizer_files, tmp_path, data):
    from lmforge.tokenizer import Tokenizer

    kind = data.draw(st.sampled_from(sorted(tokenizer_files)))
    path = tmp_path / "tokenizer.json"
    path.write_bytes(data.draw(byte_mutation(tokenizer_files[kind].read_bytes())))
    _fails_closed(Tokenizer.load, path)


@FUZZ
@given(st.data())
def test_fuzz_tokenizer_values(tokenizer_files, tmp_path, data):
    from lmforge.tokenizer import Tokenizer

    kind = data.draw(st.sampled_from(sorted(tokenizer_files)))
    path = tmp_path / "tokenizer.json"
    obj = json.loads(tokenizer_files[kind].read_text())
    if kind == "bpe" and data.draw(st.booleans()):  # keep the big HF part mostly intact, hit the lmforge fields
        hf = obj.pop("hf_tokenizer")
        obj = data.draw(json_mutation(obj))
        if isinstance(obj, dict):
            obj["hf_tokenizer"] = hf
    else:
        obj = data.draw(json_mutation(obj))
    path.write_bytes(_dump(obj))
    _fails_closed(Tokenizer.load, path)


def test_deeply_nested_json_is_refused_cleanly(tmp_path, dataset):
    from lmforge.data.shards import read_manifest
    from lmforge.tokenizer import Tokenizer

    deep = b"[" * 200_000 + b"]" * 200_000
    (tmp_path / "tokenizer.json").write_bytes(deep)
    _fails_closed(Tokenizer.load, tmp_path / "tokenizer.json")
    work = _copy(dataset, tmp_path / "d")
    (work / "manifest.json").write_bytes(deep)
    _fails_closed(read_manifest, work)
