"""Sharded checkpoints (train.checkpoint_format sharded) written by one process: the readers outside training
assemble them, a resume continues exactly, and a missing, corrupt or inconsistent shard is refused in one line.
(Two processes writing and resharding: tests/test_fsdp.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from lmforge.checkpoint import load_for_inference, read_shard_index
from lmforge.files import sha256_file
from tiny_training import cli_command, prepared_corpus, process_env, step_losses

JOB = ["--train.max_steps", "6", "--train.save_interval", "3", "--model.dropout", "0.0", "--train.parallel", "fsdp"]


def _lmforge(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *map(str, args)], env=process_env(),
                          capture_output=True, text=True, timeout=300)


def _train(data, run, *extra: object) -> None:
    done = subprocess.run(cli_command(data, run, *JOB, *extra), env=process_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(data, a run checkpointed whole, the same run checkpointed as shards) of one process."""
    root = tmp_path_factory.mktemp("sharded")
    data = prepared_corpus(root)
    _train(data, root / "full")
    _train(data, root / "sharded", "--train.checkpoint_format", "sharded")
    return data, root / "full", root / "sharded"


def test_a_sharded_checkpoint_resumes_exactly_and_reads_like_a_whole_one(runs, tmp_path):
    data, full, sharded = runs
    ckpt = sharded / "checkpoints" / "step-00000003"
    assert {p.name for p in ckpt.iterdir()} >= {"shards.json", "model-rank0-of-1.safetensors",
                                                 "optim-rank0-of-1.safetensors"}
    assert not (ckpt / "model.safetensors").exists()
    _train(data, tmp_path / "resumed", "--train.checkpoint_format", "sharded", "--resume", ckpt)
    assert step_losses(tmp_path / "resumed") == {s: l for s, l in step_losses(sharded).items() if s > 3}
    # eval / generate / serve / export load it through load_for_inference: assembled, the whole run's weights
    a, _, _ = load_for_inference(full)
    b, _, _ = load_for_inference(sharded)
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb) and all(bool((sa[k] == sb[k]).all()) for k in sa)
    outputs = [_lmforge("generate", run, "--prompt", "the", "--max-new-tokens", 12, "--greedy") for run in (full, sharded)]
    assert all(o.returncode == 0 for o in outputs), outputs[1].stderr[-2000:]
    assert outputs[0].stdout == outputs[1].stdout and outputs[0].stdout.strip()


def _rehash(ckpt, name):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": sha256_file(ckpt / name), "bytes": (ckpt / name).stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _missing(ckpt):
    (ckpt / "optim-rank0-of-1.safetensors").unlink()


def _flipped(ckpt):
    path = ckpt / "model-rank0-of-1.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))


def _offset(ckpt):  # a wrong slice offset, the manifest made to agree: the index itself is checked
    index = json.loads((ckpt / "shards.json").read_text())
    index["model"]["blocks.0.attn.qkv.weight"]["rows"] = [[0, 1, index["model"]["blocks.0.attn.qkv.weight"]["shape"][0]]]
    (ckpt / "shards.json").write_text(json.dumps(index))
    _rehash(ckpt, "shards.json")


def _shape(ckpt):  # the index says one shape, the rank's file holds another
    index = json.loads((ckpt / "shards.json").read_text())
    entry = index["model"]["blocks.0.attn.qkv.weight"]
    entry["shape"], entry["rows"] = [entry["shape"][0] * 2, *entry["shape"][1:]], [[0, 0, entry["shape"][0] * 2]]
    (ckpt / "shards.json").write_text(json.dumps(index))
    _rehash(ckpt, "shards.json")


@pytest.mark.parametrize("damage, says", [
    (_missing, "optim-rank0-of-1.safetensors listed in manifest.json is missing"),
    (_flipped, "model-rank0-of-1.safetensors does not match its sha256"),
    (_offset, "shards.json is malformed (the rows of blocks.0.attn.qkv.weight overlap or leave gaps)"),
    (_shape, "shards.json does not fit the model"),
])
def test_a_damaged_shard_is_refused_in_one_line(runs, tmp_path, damage, says):
    """generate (a reader outside training) and a resume refuse a sharded checkpoint with a missing or corrupt shard,
    or an index that does not describe its files, in one line naming the file (exit 2); the checkpoint is left
    as it was."""
    import torch

    from lmforge.checkpoint import load_training_state, read_run_config
    from lmforge.errors import CheckpointError
    from lmforge.model import GPT

    ckpt = tmp_path / "step-00000006"
    shutil.copytree(runs[2] / "checkpoints" / "step-00000006", ckpt)
    damage(ckpt)
    before = {p.name: sha256_file(p) for p in ckpt.iterdir()}
    done = _lmforge("generate", ckpt, "--max-new-tokens", 4)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert says in lines[0] and str(ckpt) in lines[0]
    model = GPT(read_run_config(runs[2] / "checkpoints" / "step-00000006").model)
    with pytest.raises(CheckpointError) as caught:
        load_training_state(ckpt, model, torch.optim.AdamW(model.parameters()))
    assert says in str(caught.value) and "\n" not in str(caught.value)
    assert {p.name: sha256_file(p) for p in ckpt.iterdir()} == before


def test_the_index_names_each_rows_rank_and_shape(runs):
    index = read_shard_index(runs[2] / "checkpoints" / "step-00000006")
    assert index["world_size"] == 1 and index["tied"] == {"tok_emb.weight": "lm_head.weight"}
    entry = index["model"]["blocks.0.attn.qkv.weight"]
    assert entry["dtype"] == "float32" and entry["rows"] == [[0, 0, entry["shape"][0]]]
    assert all(e["shape"] == [] for name, e in index["optim"].items() if name.endswith(".step"))


def test_a_full_disk_in_a_shards_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC while a rank writes its shard: one CheckpointError saying so, the half-written directory removed,
    the previous checkpoint intact and still the newest."""
    from lmforge.checkpoint import complete_checkpoints, verify_checkpoint
    from lmforge.errors import CheckpointError
    from tiny_training import tiny_config, tiny_trainer

    run = tmp_path / "run"
    trainer = tiny_trainer(tiny_config(run, **{"train.parallel": "fsdp", "train.checkpoint_format": "sharded",
                                               "train.max_steps": 4, "train.save_interval": 2}))
    monkeypatch.setenv("LMFORGE_FAULT", "save:model-rank0-of-1.safetensors@4=enospc")
    with pytest.raises(CheckpointError, match="no space left on the device while writing checkpoint .*step-00000004; "
                                              "the previous checkpoint .*step-00000002 is intact"):
        trainer.fit()
    assert [c.name for c in complete_checkpoints(run)] == ["step-00000002"]
    verify_checkpoint(run / "checkpoints" / "step-00000002")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]
