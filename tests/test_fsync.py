"""Durability as lmforge.files claims it: each written file is fsynced before it is renamed onto its name,
and its parent directory is fsynced after the rename (else a power cut can lose the rename or the data).

os.fsync is wrapped to record what each call flushed (the inode, and the path from /proc/self/fd), and
os.replace / os.rename to record when a name appeared; the writes themselves are real.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmforge.files import atomic_dir, atomic_file, atomic_path, atomic_write_bytes, atomic_write_text
from tiny_training import tiny_config, tiny_trainer


@pytest.fixture
def events(monkeypatch):
    """The ordered list of ("fsync", inode, path) and ("rename", destination inode, destination) calls."""
    seen: list[tuple[str, int, str]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        seen.append(("fsync", os.fstat(fd).st_ino, os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def moved(real):
        def move(src, dst, *args, **kwargs):
            real(src, dst, *args, **kwargs)
            seen.append(("rename", os.lstat(dst).st_ino, os.fspath(dst)))
        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", moved(real_replace))
    monkeypatch.setattr(os, "rename", moved(real_rename))
    return seen


def durable(events: list, final: Path) -> None:
    """`final` (a file, or a directory with everything under it) was fsynced before the rename that made it
    `final`, and its parent directory after that rename."""
    final = Path(final)
    renames = [i for i, (kind, _, path) in enumerate(events) if kind == "rename" and Path(path) == final]
    assert renames, f"{final} never got its name by a rename"
    rename = renames[-1]
    before = {ino for kind, ino, _ in events[:rename] if kind == "fsync"}
    written = [final, *final.rglob("*")] if final.is_dir() else [final]
    for path in written:
        assert path.stat().st_ino in before, f"{path} was not fsynced before its rename"
    parent = final.parent.stat().st_ino
    assert any(kind == "fsync" and ino == parent for kind, ino, _ in events[rename + 1:]), \
        f"the parent {final.parent} was not fsynced after the rename"


@pytest.mark.parametrize("writer", ["text", "bytes", "file", "path"])
def test_an_atomic_write_fsyncs_the_file_then_its_parent_after_the_rename(tmp_path, events, writer):
    final = tmp_path / "out" / "x.json"
    final.parent.mkdir()
    final.write_text("old")  # replacing an existing file: the rename must be made durable too
    if writer == "text":
        atomic_write_text(final, "new")
    elif writer == "bytes":
        atomic_write_bytes(final, b"new")
    elif writer == "file":
        with atomic_file(final, "w") as f:
            f.write("new")
    else:
        with atomic_path(final) as tmp:
            tmp.write_text("new")
    assert final.read_text() == "new"
    durable(events, final)
    assert any(kind == "fsync" and ".x.json.tmp-" in path for kind, _, path in events)  # flushed under its temp name


def test_an_atomic_directory_fsyncs_every_file_and_folder_then_its_parent(tmp_path, events):
    final = tmp_path / "dataset"
    for content in ("old", "new"):
        with atomic_dir(final) as tmp:
            (tmp / "a.bin").write_bytes(content.encode())
            (tmp / "sub").mkdir()
            (tmp / "sub" / "b.json").write_text(content)
    assert (final / "sub" / "b.json").read_text() == "new"
    durable(events, final)


def test_a_checkpoint_save_fsyncs_every_file_the_directory_and_the_checkpoints_folder(tmp_path, events):
    tiny_trainer(tiny_config(tmp_path / "run", **{"train.max_steps": 2, "train.save_interval": 1})).fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "optimizer.safetensors", "state.json",
                                                 "manifest.json"}
    durable(events, ckpt)
