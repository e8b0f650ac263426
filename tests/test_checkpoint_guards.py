"""Guards of the checkpoint package that the end-to-end tests reach only in part: the safetensors header check
(gaps, trailing bytes), pickles refused whatever their suffix's case, a state.json with an impossible number of
shards, manifests that name files outside the checkpoint, RNG states restored for every generator, the step order
of checkpoints past 8 digits, and the room existing checkpoints make for new ones.
"""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.checkpoint import (capture_rng, check_free_space, check_safetensors, latest_checkpoint,
                                load_body_weights, load_weights, read_task, restore_rng, save_checkpoint,
                                verify_checkpoint)
from lmforge.checkpoint import layout as checkpoint_layout
from lmforge.checkpoint import manifest as checkpoint_manifest
from lmforge.config import ModelConfig, RunConfig
from lmforge.errors import CheckpointError
from lmforge.files import sha256_file
from lmforge.model import GPT


def _safetensors(path: Path, tensors: dict[str, tuple[int, int]], data_bytes: int) -> Path:
    """A safetensors file of F32 vectors {name: (start, stop) byte offsets} over `data_bytes` bytes of data."""
    header = {name: {"dtype": "F32", "shape": [(stop - start) // 4], "data_offsets": [start, stop]}
              for name, (start, stop) in tensors.items()}
    raw = json.dumps(header).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(data_bytes)))
    return path


def test_check_safetensors_refuses_tensors_that_leave_gaps_or_bytes_no_tensor_covers(tmp_path):
    whole = _safetensors(tmp_path / "whole.safetensors", {"a": (0, 8), "b": (8, 12)}, 12)
    assert set(check_safetensors(whole)) == {"a", "b"}
    gap = _safetensors(tmp_path / "gap.safetensors", {"a": (0, 8), "b": (12, 16)}, 16)  # bytes 8..12 belong to none
    with pytest.raises(CheckpointError, match="overlap or leave gaps"):
        check_safetensors(gap)
    overlap = _safetensors(tmp_path / "overlap.safetensors", {"a": (0, 8), "b": (4, 12)}, 12)
    with pytest.raises(CheckpointError, match="overlap or leave gaps"):
        check_safetensors(overlap)
    trailing = _safetensors(tmp_path / "trailing.safetensors", {"a": (0, 8)}, 12)  # 4 bytes after the last tensor
    with pytest.raises(CheckpointError, match="cover 8 of 12 data bytes"):
        check_safetensors(trailing)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=8))
    return save_checkpoint(tmp_path / "run", 1, model, None, RunConfig(model=model.config), {"tokens_seen": 0})


def _reseal(ckpt: Path, files: dict[str, Path]) -> None:
    """List `files` ({name in the manifest: path}) in the manifest with their true sha256 and size."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name, path in files.items():
        manifest["files"][name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["model.pt", "MODEL.PT", "weights.Bin", "ckpt.Pickle"])
def test_a_pickle_planted_in_a_checkpoint_is_refused_whatever_the_case_of_its_suffix(ckpt, name):
    verify_checkpoint(ckpt)
    (ckpt / name).write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1
    with pytest.raises(CheckpointError, match="looks like a pickle file"):
        verify_checkpoint(ckpt)


@pytest.mark.parametrize("shards", [0, -1])
def test_a_state_json_claiming_no_or_negative_shards_is_refused_even_when_its_manifest_agrees(ckpt, shards):
    """A sharded checkpoint of 0 (or -1) ranks would need no weight file at all: the manifest of config, state and
    shards.json alone must not pass as a checkpoint."""
    state = json.loads((ckpt / "state.json").read_text())
    state["shards"] = shards
    (ckpt / "state.json").write_text(json.dumps(state))
    (ckpt / "shards.json").write_text(json.dumps({"format": "lmforge-shards-v1", "world_size": 1, "model": {}}))
    (ckpt / "model.safetensors").unlink()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["model.safetensors"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    _reseal(ckpt, {"state.json": ckpt / "state.json", "shards.json": ckpt / "shards.json"})
    with pytest.raises(CheckpointError, match="malformed 'shards' entry"):
        verify_checkpoint(ckpt)


def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused_without_reading_it(ckpt, monkeypatch):
    outside = ckpt.parent / "outside.safetensors"
    outside.write_bytes(b"secret" * 100)
    _reseal(ckpt, {"../outside.safetensors": outside})
    read = []
    real_sha = checkpoint_manifest.sha256_file
    monkeypatch.setattr(checkpoint_manifest, "sha256_file", lambda path: read.append(Path(path)) or real_sha(path))
    with pytest.raises(CheckpointError, match="not a checkpoint file lmforge writes"):
        verify_checkpoint(ckpt)
    assert all(path.resolve().parent == ckpt.resolve() for path in read), read


def test_restore_rng_puts_back_the_python_numpy_and_torch_generators_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.standard_normal(), torch.rand(3)  # a cached gaussian, generators mid-stream
    saved = json.loads(json.dumps(capture_rng()))  # as state.json stores it

    def draws():
        return (random.random(), random.getrandbits(64), np.random.standard_normal(3).tolist(),
                np.random.randint(0, 1 << 30), torch.rand(4).tolist(), torch.randint(0, 1 << 30, (2,)).tolist())

    first = draws()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert draws() != first
    restore_rng(saved)
    assert draws() == first


def test_the_latest_checkpoint_is_the_highest_step_also_past_eight_digits(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (5, 99_999_999, 100_000_000):
        path = root / checkpoint_layout.checkpoint_name(step)
        path.mkdir(parents=True)
        (path / "manifest.json").write_text("{}")
    assert latest_checkpoint(tmp_path / "run") == root / "step-100000000"
    assert [p.name for p in checkpoint_layout.complete_checkpoints(tmp_path / "run")] == \
        ["step-00000005", "step-99999999", "step-100000000"]


def test_checkpoints_already_in_the_run_count_as_room_for_new_ones(tmp_path, monkeypatch):
    """keep_last=1 needs room for 2 checkpoints (the kept one and the one being written); the space an existing
    checkpoint takes is freed when pruning removes it, so it counts with the free bytes."""
    per_checkpoint = 1000
    monkeypatch.setattr(checkpoint_layout, "free_bytes", lambda path: per_checkpoint)
    with pytest.raises(CheckpointError, match="2 checkpoints"):
        check_free_space(tmp_path / "run", per_checkpoint, keep_last=1, keeps_best=False)
    old = tmp_path / "run" / "checkpoints" / "step-00000001"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(bytes(per_checkpoint))
    (old / "manifest.json").write_text("{}")
    check_free_space(tmp_path / "run", per_checkpoint, keep_last=1, keeps_best=False)  # 1000 free + 1002 held
    with pytest.raises(CheckpointError, match="3 checkpoints"):
        check_free_space(tmp_path / "run", per_checkpoint, keep_last=1, keeps_best=True)


def _measured(run: Path, step: int, state: dict) -> Path:
    path = run / "checkpoints" / checkpoint_layout.checkpoint_name(step)
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps(state))
    (path / "manifest.json").write_text("{}")
    return path


def test_on_a_tie_the_best_checkpoint_is_the_older_one(tmp_path):
    """The trainer counts only a strict improvement as better, so of two equal scores the first stays the best."""
    run = tmp_path / "run"
    first = _measured(run, 2, {"val_loss": 1.5})
    _measured(run, 4, {"val_loss": 1.5})
    _measured(run, 6, {"val_loss": 2.0})
    assert checkpoint_layout.best_checkpoint(run) == first
    score = {"metric": "acc", "value": 0.75, "higher_is_better": True}
    other = tmp_path / "scored"
    first = _measured(other, 1, {"score": score})
    _measured(other, 2, {"score": score})
    assert checkpoint_layout.best_checkpoint(other) == first


@pytest.mark.parametrize("task", ["sft", {"template": {}}, {"task": 3}, ["sft"]])
def test_a_malformed_task_entry_in_state_json_is_refused_in_one_line(ckpt, task):
    assert read_task(ckpt) is None  # a language model trained on text
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "task": {"task": "sft", "template": {}}}))
    assert read_task(ckpt) == {"task": "sft", "template": {}}
    (ckpt / "state.json").write_text(json.dumps({**state, "task": task}))
    with pytest.raises(CheckpointError, match="malformed 'task' entry"):
        read_task(ckpt)


def test_a_body_of_another_vocabulary_is_refused_naming_the_tensor_and_the_classifier_is_untouched(ckpt):
    """ckpt is a language model of vocab 32: a classifier of vocab 40 has every name but tok_emb of another shape."""
    torch.manual_seed(1)
    clf = GPT(ModelConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=8, head="classify",
                          num_labels=2))
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"shapes differ: tok_emb\.weight"):
        load_body_weights(clf, ckpt)
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())
    same = GPT(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=8, head="classify",
                           num_labels=2))
    load_body_weights(same, ckpt)  # the same body loads
    lm = GPT(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=8))
    load_weights(lm, ckpt)
    assert torch.equal(same.tok_emb.weight, lm.tok_emb.weight)


def test_saving_an_optimizer_without_the_ranks_state_is_refused_before_anything_is_written(tmp_path):
    """Every reader would refuse such a checkpoint (expected_files: optimizer state exactly with "ranks"), so the
    save refuses it instead of leaving an unreadable newest checkpoint."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=8))
    optimizer = torch.optim.AdamW(model.parameters())
    config = RunConfig(model=model.config)
    with pytest.raises(ValueError, match="ranks"):
        save_checkpoint(tmp_path / "run", 1, model, optimizer, config, {"tokens_seen": 0})
    with pytest.raises(ValueError, match="ranks"):
        save_checkpoint(tmp_path / "run", 1, model, None, config, {"tokens_seen": 0, "ranks": []})
    assert latest_checkpoint(tmp_path / "run") is None
    saved = save_checkpoint(tmp_path / "run", 1, model, optimizer, config, {"tokens_seen": 0, "ranks": []})
    assert "optimizer.safetensors" in verify_checkpoint(saved)["files"]


def test_a_save_replaces_a_stale_temporary_directory_of_the_same_name(tmp_path):
    """A process killed mid-save leaves .tmp-step-N-PID; a restarted job can get the same PID (PID 1 in a
    container), and its save of the same step must not fail on the leftover."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=8))
    stale = tmp_path / "run" / "checkpoints" / f".tmp-step-00000003-{os.getpid()}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a file")
    saved = save_checkpoint(tmp_path / "run", 3, model, None, RunConfig(model=model.config), {"tokens_seen": 0})
    verify_checkpoint(saved)
    assert not stale.exists() and latest_checkpoint(tmp_path / "run") == saved
