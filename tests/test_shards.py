"""Shard writer and validated reader: refuses truncated shards and manifests that do not match."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from lmforge.data.prepare import prepare
from lmforge.data.report import find_leakage, shingle_hashes
from lmforge.data.shards import (ShardFile, ShardWriter, document_bounds, dtype_for_vocab, load_split,
                                  read_manifest)
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    (root / "corpus").mkdir()
    for i in range(10):
        (root / "corpus" / f"{i}.txt").write_text(f"document number {i} " + "lorem ipsum " * (i + 3))
    prepare([str(root / "corpus")], str(root / "data"), tokenizer="char", progress=False)
    return root / "data"


@pytest.fixture
def data(prepared, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    return copy


def edit_manifest(data, **changes):
    path = data / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_dtype_for_vocab():
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32


def test_writer_counts_and_hashes(tmp_path):
    with ShardWriter(tmp_path / "x.bin", np.dtype("uint32")) as w:
        w.write(np.array([0, 70000, 1]), documents=1)
        w.write(np.array([5]))
        entry = w.close()
    raw = (tmp_path / "x.bin").read_bytes()
    assert entry == {"file": "x.bin", "tokens": 4, "documents": 1, "sha256": hashlib.sha256(raw).hexdigest()}
    assert np.frombuffer(raw, "<u4").tolist() == [0, 70000, 1, 5]


def test_load_split_is_a_read_only_memmap_matching_the_manifest(data):
    manifest = read_manifest(data)
    ids = load_split(data, "train", check_ids=True)
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16 and ids.ndim == 1
    assert len(ids) == manifest["splits"]["train"]["tokens"]
    assert len(document_bounds(ids, 1)) == manifest["splits"]["train"]["documents"]
    with pytest.raises(ValueError):
        ids[0] = 5


def test_truncated_shard_is_refused(data):
    raw = (data / "train.bin").read_bytes()
    (data / "train.bin").write_bytes(raw[:-2])
    with pytest.raises(DataError, match=r"train\.bin has \d+ bytes but the manifest says .* truncated"):
        load_split(data, "train")


def test_dtype_that_does_not_match_the_vocabulary_is_refused(data):
    edit_manifest(data, dtype="uint32")
    with pytest.raises(DataError, match=r"dtype 'uint32' does not match vocab_size=\d+ \(needs uint16\)"):
        load_split(data, "val")


def test_vocab_size_that_does_not_match_the_tokenizer_is_refused(data):
    edit_manifest(data, vocab_size=300)
    with pytest.raises(DataError, match=r"vocab_size=300 but the tokenizer file has \d+"):
        load_split(data, "val")


def test_ids_outside_the_vocabulary_are_refused_when_checked(data):
    ids = np.fromfile(data / "test.bin", dtype="<u2")
    ids[3] = 60000
    ids.tofile(data / "test.bin")
    load_split(data, "test")  # sizes still agree
    with pytest.raises(DataError, match=r"token id 60000 >= vocab_size"):
        load_split(data, "test", check_ids=True)


def test_changed_contents_fail_the_sha256_check(data):
    ids = np.fromfile(data / "test.bin", dtype="<u2")
    ids[3] = 5 if ids[3] != 5 else 6  # a valid id, so only the hash can notice
    ids.tofile(data / "test.bin")
    with pytest.raises(DataError, match=r"does not match the sha256"):
        load_split(data, "test", check_ids=True)


def test_missing_or_foreign_manifest(tmp_path, data):
    with pytest.raises(DataError, match=r"manifest\.json does not exist: .* run `lmforge prepare` first"):
        load_split(tmp_path / "nothing", "train")
    edit_manifest(data, format="something-else")
    with pytest.raises(DataError, match=r"not an lmforge manifest"):
        read_manifest(data)


def test_unknown_split(data):
    with pytest.raises(DataError, match=r"no split 'dev': choose one of train, val, test"):
        load_split(data, "dev")


# ---------------------------------------------------------------------------------- leakage directly
def test_shingles_skip_special_tokens_and_match_equal_windows():
    ids = np.array([0, 10, 11, 12, 13, 1, 0, 10, 11, 12, 13, 1])
    starts, hashes = shingle_hashes(ids, 4)
    assert starts.tolist() == [1, 7]
    assert hashes[0] == hashes[1]


def test_find_leakage_on_handmade_shards(tmp_path):
    rng = np.random.default_rng(0)
    tok = Tokenizer("byte")
    docs = [rng.integers(3, 259, 400) for _ in range(20)]
    near_copy = docs[5].copy()
    near_copy[[50, 150, 250]] = 3  # three tokens changed
    fresh = [rng.integers(3, 259, 400) for _ in range(4)]
    splits = {"train": docs, "val": [fresh[0], near_copy, fresh[1]], "test": fresh[2:]}
    tok.save(tmp_path / "tokenizer.json")
    entries = {}
    for name, ds in splits.items():
        with ShardWriter(tmp_path / f"{name}.bin", np.dtype("uint16")) as w:
            for d in ds:
                w.write(np.concatenate(([0], d, [1])), documents=1)
            entries[name] = w.close()
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": "lmforge-shards-v1", "dtype": "uint16", "vocab_size": 259,
        "tokenizer": {"file": "tokenizer.json"}, "splits": entries}))
    result = find_leakage(tmp_path, tok, shingle_tokens=16)
    assert result["val"] == {"documents": 3, "checked": 3, "leaked": 1}
    assert result["test"] == {"documents": 2, "checked": 2, "leaked": 0}
    [example] = result["examples"]
    assert (example["split"], example["document"], example["train_document"]) == ("val", 1, 5)
    assert 0.8 < example["shared"] < 1.0


def test_the_first_id_past_the_vocabulary_is_refused_when_checked(data):
    vocab = read_manifest(data)["vocab_size"]
    ids = np.fromfile(data / "test.bin", dtype="<u2")
    ids[3] = vocab  # ids run 0 .. vocab_size - 1
    ids.tofile(data / "test.bin")
    with pytest.raises(DataError, match=rf"token id {vocab} >= vocab_size {vocab}"):
        load_split(data, "test", check_ids=True)


def test_shard_file_slices_read_the_same_tokens_as_the_memmap(data):
    ids = np.asarray(load_split(data, "train"))
    shard = ShardFile(data, "train")
    assert len(shard) == len(ids) and ids.dtype.itemsize == 2
    for a, b in ((0, 10), (7, 40), (len(ids) - 5, len(ids)), (3, 3), (-20, None)):
        assert np.array_equal(shard[a:b], ids[a:b]), (a, b)


def test_document_bounds_are_the_positions_just_after_each_end_token():
    start, end = 0, 1
    ids = np.array([start, 5, 6, end, start, 7, end, start, end])
    assert document_bounds(ids, end).tolist() == [4, 7, 9]
    docs = np.split(ids, document_bounds(ids, end)[:-1])
    assert [d.tolist() for d in docs] == [[start, 5, 6, end], [start, 7, end], [start, end]]


@pytest.mark.parametrize("name", ["sub/train.bin", "../outside.bin"])
def test_a_split_file_outside_the_dataset_directory_is_refused(data, name):
    """The manifest names files inside the dataset directory only: a path with a folder in it is refused, even
    when a valid shard lies there."""
    target = (data / name).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "train.bin", target)
    manifest = read_manifest(data)
    edit_manifest(data, splits={**manifest["splits"], "train": {**manifest["splits"]["train"], "file": name}})
    with pytest.raises(DataError, match=r"the entry of split 'train' needs a file name"):
        load_split(data, "train")
