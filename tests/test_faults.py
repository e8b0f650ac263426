"""Faults inside one process: a crash at every point of a save, a full disk, corrupt and planted files,
non-finite and spiking steps, and resuming on other data. (Real kills and signals: test_faults_process.py;
fuzzing: test_faults_fuzz.py; several processes: test_distributed_faults.py.)"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge.checkpoint as checkpoint
import lmforge.checkpoint.layout as checkpoint_layout
import lmforge.checkpoint.save as checkpoint_save
import lmforge.train.trainer as trainer_module
from lmforge.checkpoint import (clean_interrupted_saves, latest_checkpoint, load_for_inference, prune_checkpoints,
                                save_checkpoint, verify_checkpoint)
from lmforge.errors import CheckpointError
from lmforge.files import sha256_file
from lmforge.train.guard import NonFiniteStop, StepGuard
from lmforge.train.trainer import Trainer
from tiny_training import VOCAB, tiny_config, tiny_trainer, write_prepared_data

SAVES = {"train.max_steps": 3, "train.save_interval": 1, "train.keep_last": 3}


class SimulatedCrash(BaseException):
    """Stands for a kill at a fault point: nothing after it runs, no cleanup (not an Exception)."""


def _tokenizer(root: Path) -> Path:
    from lmforge.tokenizer import byte_tokenizer

    byte_tokenizer().save(root / "tokenizer.json")
    return root / "tokenizer.json"


def _crash_at(monkeypatch, point: str, step: int) -> None:
    def fault(name, at_step=None, rank=0):
        if name == point and at_step == step:
            raise SimulatedCrash(point)

    monkeypatch.setattr(checkpoint_save, "fault_point", fault)  # where the save looks it up


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- crash-consistent saves
POINTS = ["save:model.safetensors", "save:optimizer.safetensors", "save:state.json", "save:config.json",
          "save:tokenizer.json", "save:manifest", "save:renamed"]


@pytest.mark.parametrize("point", POINTS)
def test_a_crash_anywhere_in_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, point):
    run = tmp_path / "run"
    tok = _tokenizer(tmp_path)
    _crash_at(monkeypatch, point, 3)
    with pytest.raises(SimulatedCrash):
        tiny_trainer(tiny_config(run, **SAVES), tokenizer_file=tok).fit()
    visible = point == "save:renamed"  # the rename is the one step that makes a checkpoint count
    assert latest_checkpoint(run).name == ("step-00000003" if visible else "step-00000002")
    verify_checkpoint(latest_checkpoint(run))
    load_for_inference(run)
    assert (run / "checkpoints" / "step-00000002" / "manifest.json").is_file()
    assert bool(_leftovers(run)) != visible  # a hidden half-written directory, unless the save got through

    monkeypatch.undo()
    resumed = tiny_trainer(tiny_config(run, **{**SAVES, "train.max_steps": 4, "train.resume": "auto"}), tokenizer_file=tok)
    resumed.restore()
    assert resumed.step == (3 if visible else 2) and _leftovers(run) == []  # leftovers cleaned up
    resumed.fit()
    assert latest_checkpoint(run).name == "step-00000004"


def test_a_replaced_checkpoint_survives_a_crash_between_the_two_renames(tmp_path):
    trainer = tiny_trainer(tiny_config(tmp_path))
    ckpt = save_checkpoint(tmp_path, 5, trainer.raw_model, trainer.optimizer, trainer.config, {"ranks": []})
    trash = ckpt.parent / ".trash-step-00000005-4242"
    ckpt.rename(trash)  # the old copy moved aside, the new one not yet in place: then the process died
    assert latest_checkpoint(tmp_path) is None
    assert clean_interrupted_saves(tmp_path) == []
    assert latest_checkpoint(tmp_path) == ckpt and not trash.exists()  # moved back, not deleted
    shutil.copytree(ckpt, trash)  # the new copy got in place: the old one is garbage
    assert clean_interrupted_saves(tmp_path) == [trash] and latest_checkpoint(tmp_path) == ckpt


def test_a_save_of_the_same_step_killed_between_its_renames_keeps_the_old_copy(tmp_path, monkeypatch):
    trainer = tiny_trainer(tiny_config(tmp_path))
    ckpt = save_checkpoint(tmp_path, 5, trainer.raw_model, trainer.optimizer, trainer.config, {"ranks": []})
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    real, calls = os.rename, []

    def rename(src, dst):  # dies just after moving the old copy aside: no rename after that one works
        calls.append(dst)
        if len(calls) > 1:
            raise OSError(5, "injected")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CheckpointError, match="injected"):
        save_checkpoint(tmp_path, 5, trainer.raw_model, trainer.optimizer, trainer.config, {"ranks": [], "again": 1})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) is None and _leftovers(tmp_path) == [f".trash-step-00000005-{os.getpid()}"]
    clean_interrupted_saves(tmp_path)  # what the next start does: the old copy is moved back, whole
    assert latest_checkpoint(tmp_path) == ckpt and _leftovers(tmp_path) == []
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_retention_never_deletes_the_newest_complete_checkpoint(tmp_path):
    trainer = tiny_trainer(tiny_config(tmp_path))
    for step, val_loss in [(1, 1.0), (2, None), (3, 2.0), (4, None)]:
        save_checkpoint(tmp_path, step, trainer.raw_model, trainer.optimizer, trainer.config,
                        {"val_loss": val_loss, "ranks": []})
    (tmp_path / "checkpoints" / ".tmp-step-00000009-77").mkdir()  # a newer save that never finished
    (tmp_path / "checkpoints" / "step-00000008").mkdir()  # no manifest: does not count
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["step-00000001", "step-00000004", "step-00000008"]  # best (1.0) + newest complete
    assert latest_checkpoint(tmp_path).name == "step-00000004"


# ----------------------------------------------------------------------------------------- disk full
def test_enospc_during_a_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("LMFORGE_FAULT", "save:optimizer.safetensors@2=enospc")
    trainer = tiny_trainer(tiny_config(run, **SAVES))
    with pytest.raises(CheckpointError, match="no space left") as info:
        trainer.fit()
    message = str(info.value)
    assert "\n" not in message and "step-00000001 is intact" in message and "--resume auto" in message
    assert latest_checkpoint(run).name == "step-00000001" and _leftovers(run) == []
    verify_checkpoint(latest_checkpoint(run))


def test_enospc_through_the_cli_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from lmforge.cli import main

    data = write_prepared_data(tmp_path / "data", {"train": ["some text to learn " * 40], "val": ["more text " * 10]})
    monkeypatch.setenv("LMFORGE_FAULT", "save:state.json@2=enospc")
    code = main(["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(tmp_path / "run"), "--device", "cpu",
                 "--max-steps", "3", "--train.save_interval", "1", "--train.batch_size", "2", "--train.num_threads", "1",
                 "--train.eval_batches", "1"])
    err = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n")]  # progress bars redraw with \r
    err = [line for line in err if line.strip() and "step/s" not in line]
    assert code == 2 and len(err) == 1 and "no space left" in err[0], err
    assert latest_checkpoint(tmp_path / "run").name == "step-00000001"


def test_too_little_room_for_the_checkpoints_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_layout, "free_bytes", lambda path: 1 << 20)
    trainer = tiny_trainer(tiny_config(tmp_path / "run", **{"train.keep_last": 2}))
    per_checkpoint = checkpoint.checkpoint_bytes(trainer.raw_model, trainer.optimizer)
    assert per_checkpoint > 3 * 4 * sum(p.numel() for p in trainer.raw_model.parameters())  # weights + 2 moments
    with pytest.raises(CheckpointError, match=r"4 checkpoints \(keep_last=2, the one being written and the best") \
            as info:  # it evaluates every 5 steps: the best is kept beside the newest two
        trainer.fit()
    assert "\n" not in str(info.value) and not (tmp_path / "run" / "metrics.jsonl").exists()
    monkeypatch.setattr(checkpoint_layout, "free_bytes", lambda path: 4 * per_checkpoint)
    tiny_trainer(tiny_config(tmp_path / "ok", **{"train.keep_last": 2, "train.max_steps": 1})).fit()


# --------------------------------------------------------------------------------- corrupt checkpoints
@pytest.fixture(scope="module")
def three_saves(tmp_path_factory):
    run = tmp_path_factory.mktemp("three") / "run"
    tiny_trainer(tiny_config(run, **SAVES)).fit()
    return run


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


DAMAGE = {"flipped-weights": ("model.safetensors", _flip, "sha256"),
          "truncated-optimizer": ("optimizer.safetensors", _truncate, "truncated"),
          "missing-state": ("state.json", Path.unlink, "missing"),
          "flipped-manifest": ("manifest.json", _flip, "manifest")}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_corruption_is_named_and_resume_auto_falls_back_saying_so(three_saves, tmp_path, capsys, damage):
    name, hurt, word = DAMAGE[damage]
    run = tmp_path / "run"
    shutil.copytree(three_saves, run)
    newest = run / "checkpoints" / "step-00000003"
    hurt(newest / name)
    if name != "manifest.json":
        with pytest.raises(CheckpointError, match=word) as info:
            verify_checkpoint(newest)
        assert name in str(info.value) and "\n" not in str(info.value)
    capsys.readouterr()
    trainer = tiny_trainer(tiny_config(run, **{**SAVES, "train.resume": "auto", "train.max_steps": 4}))
    trainer.restore()
    assert trainer.step == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "step-00000003" in err[0] \
        and "skipping it, using" in err[0] and "step-00000002" in err[0], err


def test_resume_auto_with_every_checkpoint_corrupt_is_an_error(three_saves, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(three_saves, run)
    for ckpt in (run / "checkpoints").iterdir():
        _flip(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        tiny_trainer(tiny_config(run, **{**SAVES, "train.resume": "auto"})).restore()


# ------------------------------------------------------------------------------------- planted pickles
def _payload(marker: Path) -> bytes:
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."  # pickle protocol 0: os.system(...)


@pytest.mark.parametrize("planted", ["ckpt.pt", "optimizer.pt", "model.bin"])
def test_a_planted_pickle_is_refused_and_never_runs(three_saves, tmp_path, planted):
    marker = tmp_path / "payload-ran"
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / planted).write_bytes(_payload(marker))
    with pytest.raises(CheckpointError, match=planted.replace(".", r"\.")) as info:
        load_for_inference(alone)
    assert "pickle" in str(info.value)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(three_saves / "checkpoints" / "step-00000003", ckpt)
    (ckpt / planted).write_bytes(_payload(marker))
    with pytest.raises(CheckpointError, match="pickle"):
        load_for_inference(ckpt)
    assert not marker.exists()


def test_a_pickle_under_the_weights_name_with_a_matching_manifest_is_refused(three_saves, tmp_path):
    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(three_saves / "checkpoints" / "step-00000003", ckpt)
    (ckpt / "model.safetensors").write_bytes(_payload(marker))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"sha256": sha256_file(ckpt / "model.safetensors"),
                                              "bytes": (ckpt / "model.safetensors").stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_for_inference(ckpt)
    assert not marker.exists()


# ---------------------------------------------------------------------------------- architecture mismatch
def test_another_architecture_lists_every_differing_key(three_saves, tmp_path):
    other = tiny_trainer(tiny_config(tmp_path, **{"train.resume": str(three_saves), "model.n_embd": 64,
                                                  "model.n_layer": 3}))
    with pytest.raises(CheckpointError, match=r"model\.n_layer=2 \(config: 3\), model\.n_embd=32 \(config: 64\)"):
        other.restore()
    from lmforge.checkpoint import load_weights
    from lmforge.model import GPT
    from lmforge.config import preset

    with pytest.raises(CheckpointError, match=r"shapes differ \(checkpoint vs model\): blocks\.0\.attn\.proj\.bias \(32,\) vs \(64,\)"):
        load_weights(GPT(preset("tiny", vocab_size=VOCAB, block_size=16, n_embd=64)),
                     three_saves / "checkpoints" / "step-00000003")


# ------------------------------------------------------------------------------------- non-finite steps
def _params(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.raw_model.parameters()]


@pytest.mark.parametrize("where,tensor", [("loss", "loss"), ("grad", "tok_emb.weight.grad")])
def test_nonfinite_stop_keeps_the_weights_writes_a_diagnostic_and_exits_3(tmp_path, monkeypatch, where, tensor):
    run = tmp_path / "run"
    monkeypatch.setenv("LMFORGE_FAULT", f"{where}@3=nan")
    trainer = tiny_trainer(tiny_config(run, **{"train.max_steps": 5, "train.save_interval": 2}))
    with pytest.raises(NonFiniteStop) as info:
        trainer.fit()
    assert info.value.exit_code == 3 and "\n" not in str(info.value) and "step-00000002" in str(info.value)
    diagnostic = json.loads((run / "nonfinite-step-00000003.json").read_text())
    assert diagnostic["step"] == 3 and diagnostic["rank"] == 0 and diagnostic["tensor"] == tensor
    saved = load_file(str(run / "checkpoints" / "step-00000002" / "model.safetensors"))
    for name, value in trainer.raw_model.state_dict().items():
        if name in saved:
            assert torch.equal(value, saved[name]), name  # step 3 never touched the weights
    assert latest_checkpoint(run).name == "step-00000002"


def test_nonfinite_skip_skips_the_step_counts_it_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_FAULT", "loss@3=nan")
    config = {"train.max_steps": 6, "train.save_interval": 3, "train.nonfinite": "skip", "train.keep_last": 5}
    trainer = tiny_trainer(tiny_config(tmp_path / "a", **config))
    for _ in range(2):
        trainer.train_step()
        trainer.step += 1
    before = _params(trainer)
    trainer.train_step()
    trainer.step += 1
    assert all(torch.equal(a, b) for a, b in zip(before, _params(trainer)))
    assert trainer.guard.skipped_nonfinite == 1
    trainer.train_step()
    assert not all(torch.equal(a, b) for a, b in zip(before, _params(trainer)))

    full = tiny_trainer(tiny_config(tmp_path / "b", **config))
    summary = full.fit()
    assert summary["skipped_nonfinite"] == 1
    records = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite"] for r in records if r["kind"] == "train"] == [0, 0, 1, 1, 1, 1]

    # The same run killed at the start of step 5 (after the step-3 save), then resumed: the skip counter
    # comes back from the checkpoint, and the rest of the run equals the uninterrupted one.
    real_fault = trainer_module.fault_point

    def crash_at_step_5(point, step=None, rank=0):
        if point == "step" and step == 5:
            raise SimulatedCrash("step 5")
        return real_fault(point, step, rank)

    monkeypatch.setattr(trainer_module, "fault_point", crash_at_step_5)
    run = tmp_path / "c"
    with pytest.raises(SimulatedCrash):
        tiny_trainer(tiny_config(run, **config)).fit()
    monkeypatch.setattr(trainer_module, "fault_point", real_fault)
    resumed = tiny_trainer(tiny_config(run, **{**config, "train.resume": "auto"}))
    resumed_summary = resumed.fit()
    assert resumed.history == full.history[3:] and resumed_summary["skipped_nonfinite"] == 1
    assert resumed.guard.state_dict() == full.guard.state_dict()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite"] for r in records if r["kind"] == "train" and r["step"] > 4] == [1, 1]
    assert all(torch.equal(a, b) for a, b in zip(_params(full), _params(resumed)))


class SpikyBatches:
    """One batch over and over (quickly learned), but at position `spike` the same inputs with random labels."""

    def __init__(self, spike: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, VOCAB, (4, 16), generator=g)
        self.y = torch.randint(0, VOCAB, (4, 16), generator=g)
        self.bad = torch.randint(0, VOCAB, (4, 16), generator=g)
        self.spike, self.position = spike, 0

    def next_batch(self):
        self.position += 1
        return self.x, (self.bad if self.position == self.spike else self.y)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_a_loss_spike_is_skipped_and_the_guard_state_resumes_exactly(tmp_path):
    config = {"train.max_steps": 14, "train.save_interval": 6, "train.keep_last": 5, "train.nonfinite": "skip",
              "train.spike_zscore": 4.0, "train.spike_window": 5, "optim.lr": 1e-2, "optim.warmup_steps": 0}
    full = Trainer(tiny_config(tmp_path / "a", **config), train_data=SpikyBatches(spike=11), progress=False,
                   tensorboard=False)
    summary = full.fit()
    assert summary["skipped_spike"] == 1 and summary["skipped_nonfinite"] == 0
    resumed = Trainer(tiny_config(tmp_path / "a", **{**config, "train.resume": str(tmp_path / "a" / "checkpoints" /
                                                                                      "step-00000006")}),
                      train_data=SpikyBatches(spike=11), progress=False, tensorboard=False)
    resumed.run_dir = tmp_path / "b"
    resumed.fit()
    assert resumed.history == full.history[6:] and resumed.guard.state_dict() == full.guard.state_dict()


def test_step_guard_judges_spikes_against_a_window():
    guard = StepGuard("skip", spike_zscore=3.0, spike_window=4)
    assert [guard.judge(x, True) for x in (2.0, 1.9, 2.1, 2.0)] == ["ok"] * 4
    assert guard.judge(9.0, True) == "spike" and guard.judge(2.05, True) == "ok"
    assert guard.judge(float("nan"), False) == "nonfinite"
    assert guard.state_dict() == {"recent": [1.9, 2.1, 2.0, 2.05], "skipped_nonfinite": 1, "skipped_spike": 1}
    off = StepGuard("stop")
    assert all(off.judge(x, True) == "ok" for x in (1.0, 1.0, 1.0, 50.0))


def test_step_guard_z_score_uses_the_window_population_standard_deviation():
    """The z-score is (loss - mean) / std over the window, std the population one (divided by n): a loss just
    above mean + z * pstdev is a spike, one just below is not."""
    window = [1.0, 2.0, 3.0, 4.0]
    threshold = statistics.fmean(window) + 2.0 * statistics.pstdev(window)  # 2.5 + 2 * 1.118 = 4.736
    for loss, verdict in ((threshold + 0.02, "spike"), (threshold - 0.02, "ok")):
        guard = StepGuard("skip", spike_zscore=2.0, spike_window=4)
        assert [guard.judge(x, True) for x in window] == ["ok"] * 4
        assert guard.judge(loss, True) == verdict


def test_step_guard_resumed_with_a_smaller_window_judges_by_the_newest_losses_only():
    """A checkpoint written with spike_window 5, resumed with 3: only the 3 newest losses form the window."""
    guard = StepGuard("skip", spike_zscore=3.0, spike_window=3)
    guard.load_state_dict({"recent": [100.0, 100.0, 1.0, 2.0, 3.0], "skipped_nonfinite": 0, "skipped_spike": 0})
    assert guard.state_dict()["recent"] == [1.0, 2.0, 3.0]
    assert 5.0 > 2.0 + 3.0 * statistics.pstdev([1.0, 2.0, 3.0])  # mean 2, pstdev 0.816: 5 is a spike
    assert guard.judge(5.0, True) == "spike" and guard.skipped_spike == 1


def test_step_guard_never_calls_a_spike_over_a_window_of_equal_losses():
    """A window of equal losses (ln V of an untrained model, say) has no spread to measure a z-score against:
    the next loss is accepted, whatever it is."""
    guard = StepGuard("skip", spike_zscore=3.0, spike_window=3)
    assert [guard.judge(x, True) for x in (2.0, 2.0, 2.0)] == ["ok"] * 3
    assert guard.judge(2.5, True) == "ok" and guard.skipped_spike == 0


# ------------------------------------------------------------------------------------ data change on resume
def test_resume_on_changed_data_is_refused_unless_allowed(tmp_path):
    texts = {"train": ["the quick brown fox " * 30], "val": ["jumps over the lazy dog " * 5]}
    a = write_prepared_data(tmp_path / "a", texts)
    b = write_prepared_data(tmp_path / "b", {**texts, "train": ["another text entirely " * 30]})
    run = tmp_path / "run"
    common = {"train.batch_size": 2, "train.max_steps": 3}
    Trainer(tiny_config(run, **{**common, "data.path": a, "train.max_steps": 2}), progress=False, tensorboard=False).fit()
    changed = Trainer(tiny_config(run, **{**common, "data.path": b, "train.resume": "auto"}),
                      progress=False, tensorboard=False)
    with pytest.raises(CheckpointError, match="trained on other data") as info:
        changed.fit()
    assert "--allow-data-change" in str(info.value) and "\n" not in str(info.value)
    assert f"continue it as it was trained with --config {run / 'config.yaml'} --resume auto" in str(info.value)
    allowed = Trainer(tiny_config(run, **{**common, "data.path": b, "train.resume": "auto",
                                          "train.allow_data_change": True}), progress=False, tensorboard=False)
    assert allowed.fit()["steps"] == 3


def test_a_ctrl_c_landing_inside_the_tensorboard_writer_still_aborts_at_once(tmp_path, monkeypatch):
    """The second Ctrl-C raises KeyboardInterrupt wherever it lands. Landing inside the TensorBoard writer just after
    its queue's lock was taken (in Condition.__enter__, before the with-block that would release it), it leaves that
    lock held for good; closing the writer then (flush, stop) would wait for it forever. The abort must still end:
    the KeyboardInterrupt leaves fit() and metrics.jsonl holds whole records of the steps taken."""
    from tensorboard.summary.writer import event_file_writer

    from lmforge.train.metrics import read_metrics

    write, writers = event_file_writer._AsyncWriter.write, []

    def interrupted_write(self, data: bytes) -> None:
        writers.append(self)
        if len(writers) == 20:
            self._byte_queue.mutex.acquire()  # what the interrupt leaves behind: the queue's lock, never released
            raise KeyboardInterrupt
        write(self, data)

    monkeypatch.setattr(event_file_writer._AsyncWriter, "write", interrupted_write)
    trainer = tiny_trainer(tiny_config(tmp_path / "run", **{"train.max_steps": 50}), tensorboard=True)
    outcome: list[str] = []

    def fit() -> None:  # on a thread, so that a hang fails the test instead of stalling the suite
        try:
            trainer.fit()
            outcome.append("finished")
        except KeyboardInterrupt:
            outcome.append("interrupted")

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    thread.join(60)
    hung = thread.is_alive()
    writers[-1]._byte_queue.mutex.release()  # let the writer's thread go (and a hung fit end) before asserting
    assert not hung, "closing the metrics after the interrupt waited for the TensorBoard writer's lock"
    assert outcome == ["interrupted"]
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert 1 <= len(steps) < 50 and steps == list(range(1, len(steps) + 1))
    writers[-1].close()
