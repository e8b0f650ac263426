"""Every place lmforge opens a user's safetensors file refuses a hostile header before allocating for it.

A safetensors file starts with 8 bytes giving its JSON header's length; a reader that trusts them allocates
whatever they say. These tests write a header length of 2**60 (and a truncated file) into the files each real
reader opens (a checkpoint's weights with its manifest resealed, as a deliberate tamperer would; a Hugging Face
model given to `lmforge import`; a task dataset's examples) and run the command: exit code 2, one line on stderr,
and the Python heap's peak (tracemalloc) stays small. Prepared token shards are raw .bin files, not safetensors.
"""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import complete_checkpoints, save_checkpoint
from lmforge.cli import main
from lmforge.config import RunConfig, preset
from lmforge.files import sha256_file
from lmforge.model import GPT
from lmforge.tokenizer import byte_tokenizer

HUGE = 2**60
PEAK_LIMIT = 32 << 20  # bytes of Python heap a refusal may take; the model files here are ~100 KB


def huge_header(path: Path) -> None:
    """Overwrite the 8-byte header length with HUGE, keeping the rest of the file."""
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", HUGE) + data[8:])


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def reseal(ckpt: Path, name: str) -> None:
    """Record `name`'s new sha256 and size in the manifest, so that verification passes and the loader is reached."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": sha256_file(ckpt / name), "bytes": (ckpt / name).stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def refused(argv: list[str], capsys) -> str:
    """Run the CLI; assert exit code 2, one line on stderr and a small Python heap peak; return that line."""
    capsys.readouterr()
    tracemalloc.start()
    try:
        code = main(argv)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, (code, err)
    assert peak < PEAK_LIMIT, f"{peak:,} bytes allocated to refuse {argv}"
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    tok = byte_tokenizer()
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=16))
    save_checkpoint(root / "run", 0, model, None, RunConfig(model=model.config), {"tokens_seen": 0},
                    root / "tokenizer.json")
    from test_checkpoint_files import write_hf_gpt2

    write_hf_gpt2(root / "hf")
    records = [{"prompt": w, "completion": w[::-1]} for w in ("abc", "bcd", "cde", "def", "efa", "fab") * 8]
    (root / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert main(["prepare", str(root / "r.jsonl"), "--task", "sft", "--tokenizer", str(root / "run"), "--out",
                 str(root / "task"), "--no-progress"]) == 0
    return {"run": root / "run", "hf": root / "hf", "task": root / "task"}


DAMAGE = {"huge-header": huge_header, "truncated": truncated}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_checkpoint_weights(files, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(files["run"], run)
    (ckpt,) = complete_checkpoints(run)
    DAMAGE[damage](ckpt / "model.safetensors")
    reseal(ckpt, "model.safetensors")
    err = refused(["generate", str(ckpt), "--prompt", "a", "--max-new-tokens", "2", "--no-stream", "--device", "cpu"],
                  capsys)
    assert f"{ckpt / 'model.safetensors'} is not a valid safetensors file" in err, err


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_hf_import(files, tmp_path, capsys, damage):
    hf = tmp_path / "hf"
    shutil.copytree(files["hf"], hf)
    DAMAGE[damage](hf / "model.safetensors")
    err = refused(["import", str(hf), "--out", str(tmp_path / "out")], capsys)
    assert f"{hf / 'model.safetensors'} cannot be read as safetensors" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_task_examples(files, tmp_path, capsys, damage):
    task = tmp_path / "task"
    shutil.copytree(files["task"], task)
    for split in task.glob("*.safetensors"):
        DAMAGE[damage](split)
    err = refused(["eval", str(files["run"]), "--data", str(task), "--max-examples", "1", "--device", "cpu"], capsys)
    assert ".safetensors cannot be read" in err and str(task) in err, err
