"""A really full disk: a size-limited tmpfs, filled by the test so that a write() fails in the middle of a file.

For a checkpoint save (train), prepare's shards and an HF export: the command fails with one line and a
non-zero exit, the previous output is byte-identical and still reads, and nothing partial (no temporary file
or directory) stays. Needs root to mount; skipped with the reason otherwise. (test_faults.py injects ENOSPC at
the points between the files of a save.)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import lmforge.checkpoint as checkpoint
import lmforge.checkpoint.save as checkpoint_save
from lmforge.checkpoint import latest_checkpoint, load_for_inference, verify_checkpoint
from lmforge.errors import CheckpointError
from lmforge.cli import main
from tiny_training import prepared_corpus, tiny_config, tiny_trainer, write_prepared_data

PAGE = 4096


@pytest.fixture
def disk(tmp_path):
    """An empty 64 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def free(mount: Path) -> int:
    st = os.statvfs(mount)
    return st.f_bavail * st.f_frsize


def fill(mount: Path, leave: int) -> None:
    """Another writer takes the room: a filler file leaves `leave` bytes (rounded to pages) free on `mount`."""
    with open(mount / "filler", "ab") as f:
        f.write(b"\0" * (free(mount) - leave // PAGE * PAGE))
    assert abs(free(mount) - leave) <= PAGE, (free(mount), leave)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones included) by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> list[str]:
    err = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n")]  # progress bars redraw with \r
    return [line for line in err if line.strip() and "step/s" not in line and not line.startswith("warning:")]


def test_a_full_disk_in_the_middle_of_a_checkpoint_keeps_the_previous_one(tmp_path, disk, monkeypatch, capsys):
    data = write_prepared_data(tmp_path / "data", {"train": ["some text to learn " * 40], "val": ["more text " * 10]})
    run = disk / "run"
    real_fault, before = checkpoint_save.fault_point, {}

    def fill_during_save_3(point, step=None, rank=0):  # the weights of step 3 are written: now the disk fills
        if point == "save:model.safetensors" and step == 3:
            previous = run / "checkpoints" / "step-00000002"
            before.update(tree(previous))
            fill(disk, leave=(previous / "optimizer.safetensors").stat().st_size // 2)
        return real_fault(point, step, rank)

    monkeypatch.setattr(checkpoint_save, "fault_point", fill_during_save_3)
    train = ["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(run), "--device", "cpu",
                 "--max-steps", "4", "--train.save_interval", "1", "--train.keep_last", "3", "--train.batch_size", "2",
                 "--train.num_threads", "1", "--train.eval_interval", "0"]
    monkeypatch.setenv("TQDM_DISABLE", "1")
    code = main(train)
    err = one_error_line(capsys)
    assert before, "the disk was never filled"
    assert code == 2 and len(err) == 1 and "no space left" in err[0] and "step-00000002 is intact" in err[0], err
    assert latest_checkpoint(run).name == "step-00000002"
    assert tree(run / "checkpoints" / "step-00000002") == before
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []  # no half save
    verify_checkpoint(run / "checkpoints" / "step-00000002")
    load_for_inference(run)
    monkeypatch.setattr(checkpoint_save, "fault_point", real_fault)
    (disk / "filler").unlink()  # room again: the run continues from the intact checkpoint
    assert main([*train, "--resume", "auto"]) == 0 and latest_checkpoint(run).name == "step-00000004"


def test_a_full_disk_in_the_middle_of_a_shard_keeps_the_previous_dataset(tmp_path, disk, capsys):
    corpus = prepared_corpus(tmp_path, documents=60).parent / "corpus"
    out = disk / "data"
    args = ["prepare", str(corpus), "--out", str(out), "--tokenizer", "char", "--split", "0.8,0.1,0.1", "--no-progress"]
    assert main(args) == 0
    before = tree(out)
    spool = sum(p.stat().st_size for p in corpus.iterdir())  # prepare first spools the cleaned text (at most this)
    capsys.readouterr()
    fill(disk, leave=spool + (out / "train.bin").stat().st_size // 2)
    code = main([*args, "--force"])
    err = one_error_line(capsys)
    assert code == 2 and len(err) == 1 and "no space left" in err[0] and str(out) in err[0], err
    assert tree(out) == before and sorted(p.name for p in disk.iterdir()) == ["data", "filler"]
    from lmforge.data.shards import load_split

    assert len(load_split(out, "train", check_ids=True)) > 0


def test_a_full_disk_in_the_middle_of_an_hf_export_keeps_the_previous_export(tmp_path, disk, capsys):
    run = tmp_path / "run"
    tiny_trainer(tiny_config(run, **{"train.max_steps": 1})).fit()
    out = disk / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    before = tree(out)
    capsys.readouterr()
    fill(disk, leave=(out / "model.safetensors").stat().st_size // 2)
    code = main(["export", str(run), "--format", "hf", "--out", str(out), "--force"])
    err = one_error_line(capsys)
    assert code == 2 and len(err) == 1 and "no space left" in err[0] and str(out) in err[0], err
    assert tree(out) == before and sorted(p.name for p in disk.iterdir()) == ["filler", "hf"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.n_embd == 32


def test_the_room_check_counts_the_best_checkpoint_that_pruning_keeps(tmp_path, disk):
    """Pruning keeps the newest keep_last and the best: with the one being written, keep_last + 2 can exist at
    once when the run evaluates before its end. Room for keep_last + 1 is refused up front; without evaluations
    before the end the same room is enough, and the run really fits in it."""
    run = disk / "run"
    settings = {"train.keep_last": 2, "train.save_interval": 1, "train.max_steps": 6, "train.eval_interval": 2}
    trainer = tiny_trainer(tiny_config(run, **settings))
    per_checkpoint = checkpoint.checkpoint_bytes(trainer.raw_model, trainer.optimizer)
    fill(disk, leave=int(3.5 * per_checkpoint))  # keep_last + 1 fit, keep_last + 2 do not
    with pytest.raises(CheckpointError, match=r"4 checkpoints \(keep_last=2, the one being written and the best "
                                              r"\(train.best_metric\)\)") as info:
        trainer.fit()
    assert "\n" not in str(info.value) and not (run / "metrics.jsonl").exists()
    tiny_trainer(tiny_config(run, **{**settings, "train.eval_interval": 0})).fit()  # only the last step is measured
    assert [c.name for c in checkpoint.complete_checkpoints(run)] == ["step-00000005", "step-00000006"]
