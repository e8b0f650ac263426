"""Checkpoints: resume continues bit-identically, incomplete ones are invisible, corrupt ones are refused,
and a directory written by train is enough to load the model for inference."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lmforge.checkpoint import (latest_checkpoint, load_for_inference, prune_checkpoints, resolve_checkpoint,
                                save_checkpoint, verify_checkpoint)
from lmforge.errors import CheckpointError
from tiny_training import tiny_config, tiny_trainer

RESUME = {"train.max_steps": 20, "train.save_interval": 10, "train.keep_last": 5, "train.eval_interval": 10,
          "model.dropout": 0.1}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """20 uninterrupted steps with dropout, saving at steps 10 and 20; a tokenizer file travels along."""
    from lmforge.tokenizer import byte_tokenizer

    root = tmp_path_factory.mktemp("full")
    byte_tokenizer().save(root / "tokenizer.json")
    trainer = tiny_trainer(tiny_config(root / "run", **RESUME), tokenizer_file=root / "tokenizer.json")
    summary = trainer.fit()
    return root / "run", trainer, summary


def test_resume_auto_gives_identical_losses(full_run, tmp_path):
    run, uninterrupted, _ = full_run
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step-00000010", tmp_path / "run" / "checkpoints" / "step-00000010")
    resumed = tiny_trainer(tiny_config(tmp_path / "run", **{**RESUME, "train.resume": "auto"}))
    summary = resumed.fit()
    expected = [loss for step, loss in uninterrupted.history if step > 10]
    assert [step for step, _ in resumed.history] == list(range(11, 21))
    assert [loss for _, loss in resumed.history] == expected  # bit-identical, dropout included
    assert summary["val_loss"] == uninterrupted.val_loss
    for a, b in zip(uninterrupted.raw_model.parameters(), resumed.raw_model.parameters()):
        assert torch.equal(a, b)


def test_a_muon_run_resumes_bit_identically(tmp_path):
    """Muon's momentum and AdamW's moments both travel through optimizer.safetensors (tensors, JSON groups)."""
    muon = {**RESUME, "optim.name": "muon", "optim.muon_lr": 0.05, "optim.muon_weight_decay": 0.1}
    uninterrupted = tiny_trainer(tiny_config(tmp_path / "full", **muon))
    uninterrupted.fit()
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000010"
    with safe_open(str(ckpt / "optimizer.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert {f"state.{i}.momentum_buffer" for i in range(20, 28)} <= names and "state.0.exp_avg" in names

    resumed = tiny_trainer(tiny_config(tmp_path / "resumed", **{**muon, "train.resume": str(ckpt)}))
    resumed.fit()
    assert resumed.history == [(s, loss) for s, loss in uninterrupted.history if s > 10]  # bit-identical
    for a, b in zip(uninterrupted.raw_model.parameters(), resumed.raw_model.parameters()):
        assert torch.equal(a, b)
    saved, again = uninterrupted.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert saved["param_groups"] == again["param_groups"]
    assert all(torch.equal(v, again["state"][i][k]) for i, s in saved["state"].items() for k, v in s.items())


def test_resume_from_path_and_mismatched_model_refused(full_run, tmp_path):
    run, uninterrupted, _ = full_run
    ckpt = run / "checkpoints" / "step-00000010"
    resumed = tiny_trainer(tiny_config(tmp_path / "a", **{**RESUME, "train.resume": str(ckpt), "train.max_steps": 12}))
    resumed.fit()
    assert resumed.history[0] == uninterrupted.history[10]  # step 11
    other = tiny_trainer(tiny_config(tmp_path / "b", **{**RESUME, "train.resume": str(ckpt), "model.n_embd": 64}))
    with pytest.raises(CheckpointError, match="n_embd"):
        other.fit()


def test_checkpoint_layout_and_manifest(full_run):
    run, _, summary = full_run
    ckpt = Path(summary["checkpoint"])
    assert ckpt == run / "checkpoints" / "step-00000020"
    manifest = verify_checkpoint(ckpt)
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "state.json", "config.json",
                                      "tokenizer.json"}
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([*manifest["files"], "manifest.json"])
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 20 and state["tokens_seen"] == 20 * 4 * 16
    assert {"python", "numpy", "torch", "cuda"} <= set(state["ranks"][0]["rng"])
    assert state["ranks"][0]["data"]["position"] == 20 * 4
    assert state["config"]["model"]["dropout"] == 0.1


def test_load_for_inference_from_the_directory_alone(full_run, tmp_path):
    run, trainer, _ = full_run
    moved = tmp_path / "elsewhere"
    shutil.copytree(run / "checkpoints" / "step-00000020", moved)  # nothing else of the run comes along
    model, tokenizer, config = load_for_inference(moved, device="cpu")
    assert not model.training and config.model.dropout == 0.1
    assert tokenizer is not None and tokenizer.kind == "byte"
    idx = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    trainer.raw_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), trainer.raw_model(idx), rtol=0, atol=0)
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-00000020"  # a run dir resolves to its newest


def test_loading_a_model_imports_neither_the_compiler_nor_fsdp(full_run):
    """Every command that reads a checkpoint starts faster for it: building the model on the meta device to check the
    file's shapes, then on the CPU without its random initialisation, imports neither torch._dynamo nor sympy (torch's
    symbolic shapes) and FSDP is not imported to learn that the model is not sharded: nearly two seconds."""
    run, _, _ = full_run
    code = ("import sys; from lmforge.checkpoint import load_for_inference; from lmforge.model import count_parameters;"
            f" m, _, c = load_for_inference({str(run)!r}); count_parameters(c.model);"
            " print(sorted(n for n in ('torch._dynamo', 'sympy', 'torch.distributed.fsdp') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_checkpoint_without_manifest_is_invisible(full_run, tmp_path):
    run, _, _ = full_run
    copy = tmp_path / "run"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    (copy / "checkpoints" / "step-00000020" / "manifest.json").unlink()  # a save that died before finishing
    assert latest_checkpoint(copy) == copy / "checkpoints" / "step-00000010"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(copy / "checkpoints" / "step-00000020")
    (copy / "checkpoints" / "step-00000010" / "manifest.json").unlink()
    assert latest_checkpoint(copy) is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(copy)
    fresh = tiny_trainer(tiny_config(copy, **{**RESUME, "train.resume": "auto", "train.max_steps": 1}))
    fresh.restore()
    assert fresh.step == 0  # resume auto ignores both and starts over


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_corrupt_file_is_detected(full_run, tmp_path, victim):
    run, _, _ = full_run
    ckpt = tmp_path / "step-00000020"
    shutil.copytree(run / "checkpoints" / "step-00000020", ckpt)
    data = bytearray((ckpt / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / victim).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"corrupt: {victim}") as info:
        load_for_inference(ckpt)
    assert "\n" not in str(info.value)
    trainer = tiny_trainer(tiny_config(tmp_path / "r", **{**RESUME, "train.resume": str(ckpt)}))
    with pytest.raises(CheckpointError, match="corrupt"):
        trainer.restore()


def test_missing_path_is_one_clear_line(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_for_inference(tmp_path / "nope")
    assert "\n" not in str(info.value)


def test_keep_last_and_best(tmp_path):
    trainer = tiny_trainer(tiny_config(tmp_path))
    for step, val_loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.4)]:
        save_checkpoint(tmp_path, step, trainer.raw_model, trainer.optimizer, trainer.config,
                        {"val_loss": val_loss, "tokens_seen": 0, "ranks": []})
        (tmp_path / "checkpoints" / ".tmp-step-00000099-12345").mkdir(exist_ok=True)  # a crashed save
        prune_checkpoints(tmp_path, keep_last=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-00000002", "step-00000004", "step-00000005"]  # newest two + best (1.0)


def test_new_run_refuses_a_run_dir_with_checkpoints(full_run, tmp_path):
    from lmforge.errors import ConfigError

    run, _, _ = full_run
    shutil.copytree(run / "checkpoints", tmp_path / "checkpoints")
    trainer = tiny_trainer(tiny_config(tmp_path, **RESUME))  # resume: none
    with pytest.raises(ConfigError, match="--resume auto"):
        trainer.fit()
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing written


def test_val_loss_is_stored_only_where_measured(tmp_path):
    trainer = tiny_trainer(tiny_config(tmp_path, **{"train.max_steps": 4, "train.eval_interval": 3,
                                                   "train.save_interval": 2, "train.keep_last": 5}))
    trainer.fit()
    losses = {p.name: json.loads((p / "state.json").read_text())["val_loss"]
              for p in (tmp_path / "checkpoints").iterdir()}
    assert losses["step-00000002"] is None  # no evaluation at step 2
    assert isinstance(losses["step-00000004"], float)  # the final evaluation


def test_resume_refuses_data_with_another_tokenizer(full_run, tmp_path):
    from lmforge.tokenizer import Tokenizer

    run, _, _ = full_run
    Tokenizer("byte", ("<S>", "<E>", "<P>")).save(tmp_path / "other.json")
    trainer = tiny_trainer(tiny_config(tmp_path / "r", **{**RESUME, "train.resume": str(run)}),
                           tokenizer_file=tmp_path / "other.json")
    with pytest.raises(CheckpointError, match="another tokenizer"):
        trainer.fit()


def test_after_a_resume_metrics_read_as_one_uninterrupted_run(full_run, tmp_path):
    """Records of the steps after the checkpoint (which the resumed run redoes) and a line torn by a kill
    are dropped, so metrics.jsonl has one record per kind and step, with the uninterrupted run's values."""
    from lmforge.train.metrics import read_metrics

    run, _, _ = full_run
    shutil.copytree(run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000020")  # killed after step 20's records, before its save
    with open(tmp_path / "run" / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "step": 21, "lo')  # torn by the kill
    tiny_trainer(tiny_config(tmp_path / "run", **{**RESUME, "train.resume": "auto"})).fit()

    def view(records):
        return [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in records]

    ours, uninterrupted = read_metrics(tmp_path / "run"), read_metrics(run)
    keys = [(r["kind"], r["step"]) for r in ours]
    assert len(keys) == len(set(keys))
    assert view(ours) == view(uninterrupted)


# ------------------------------------------------------------------- readers fall back like --resume auto
@pytest.fixture(scope="module")
def run_on_data(tmp_path_factory):
    """4 steps on a prepared data directory (what eval reads by default), saving at steps 2 and 4."""
    from lmforge.train import Trainer
    from tiny_training import write_prepared_data

    root = tmp_path_factory.mktemp("readers")
    texts = {split: [f"{split} document {i}: the cat sat on the mat." for i in range(n)]
             for split, n in (("train", 40), ("val", 6), ("test", 6))}
    data = write_prepared_data(root / "data", texts)
    config = tiny_config(root / "run", **{"data.path": str(data), "train.max_steps": 4, "train.save_interval": 2,
                                          "train.eval_interval": 2})
    Trainer(config, progress=False, tensorboard=False).fit()
    return root / "run"


def _flip_a_weight_byte(ckpt: Path) -> None:
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))


READERS = {"eval": ["--split", "test"], "generate": ["--prompt", "the", "--max-new-tokens", "8", "--seed", "3",
                                                     "--no-stream"]}


@pytest.mark.parametrize("command", list(READERS))
def test_eval_and_generate_skip_a_corrupt_newest_checkpoint_saying_so(run_on_data, tmp_path, capsys, command):
    from lmforge.cli import main

    run = tmp_path / "run"
    shutil.copytree(run_on_data, run)
    newest, older = run / "checkpoints" / "step-00000004", run / "checkpoints" / "step-00000002"
    _flip_a_weight_byte(newest)
    capsys.readouterr()
    assert main([command, str(run), "--device", "cpu", *READERS[command]]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"warning: checkpoint {newest} is corrupt: model.safetensors "
                                                   f"does not match its sha256"), err
    assert err.rstrip().endswith(f"skipping it, using {older}"), err
    assert main([command, str(older), "--device", "cpu", *READERS[command]]) == 0  # the older one, named
    assert capsys.readouterr() == (out, "")  # the same result, and no warning

    # A checkpoint directory given explicitly is used as it is: corrupt is an error, one line.
    assert main([command, str(newest), "--device", "cpu", *READERS[command]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"checkpoint {newest} is corrupt: model.safetensors" in err, err
    # With every checkpoint corrupt, nothing is left to fall back to.
    _flip_a_weight_byte(older)
    assert main([command, str(run), "--device", "cpu", *READERS[command]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no intact checkpoint in {run}" in err and str(newest) in err, err


def test_every_reader_resolves_through_the_same_fallback(run_on_data, tmp_path, capsys):
    """load_for_inference (generate, serve, export) and resolve_checkpoint (eval, serve) agree with resume auto."""
    run = tmp_path / "run"
    shutil.copytree(run_on_data, run)
    _flip_a_weight_byte(run / "checkpoints" / "step-00000004")
    older = run / "checkpoints" / "step-00000002"
    assert resolve_checkpoint(run) == older and resolve_checkpoint(run / "checkpoints") == older
    model, _, _ = load_for_inference(run)
    expected, _, _ = load_for_inference(older)
    for a, b in zip(model.parameters(), expected.parameters()):
        assert torch.equal(a, b)
    assert capsys.readouterr().err.count("skipping it, using") == 3


def test_eval_and_train_refuse_shards_of_another_tokenizer_with_the_same_vocabulary(run_on_data, tmp_path, capsys):
    """Same vocabulary size, other tokenizer: the ids mean other text, so the loss would be wrong without a word."""
    from lmforge.cli import main
    from lmforge.tokenizer import byte_tokenizer

    data = Path(json.loads((run_on_data / "checkpoints" / "step-00000004" / "config.json").read_text())["data"]["path"])
    other = tmp_path / "other"
    shutil.copytree(data, other)
    sha = byte_tokenizer(("<s>", "</s>", "<pad>")).save(other / "tokenizer.json")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = sha
    (other / "manifest.json").write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for root in (other, run_on_data) for p in sorted(root.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert main(["eval", str(run_on_data), "--data", str(other), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained with another tokenizer than" in err and str(other) in err, err
    # train pairs the same checkpoint with the same data through the same check
    assert main(["train", "--data", str(other), "--train.init_from", str(run_on_data), "--run-dir",
                 str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "was trained with another tokenizer than" in capsys.readouterr().err
    # a resume on that data says how to continue the run as it was trained
    assert main(["train", "--config", str(run_on_data / "config.yaml"), "--data", str(other), "--resume", "auto",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained with another tokenizer than" in err, err
    assert err.endswith(f"; continue it as it was trained with --config {run_on_data / 'config.yaml'} --resume auto\n")
    after = {p: p.read_bytes() for root in (other, run_on_data) for p in sorted(root.rglob("*")) if p.is_file()}
    assert after == before and not (tmp_path / "run").exists()
    assert main(["eval", str(run_on_data), "--data", str(data), "--device", "cpu"]) == 0  # its own data still works
