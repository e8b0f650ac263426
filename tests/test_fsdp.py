"""FSDP2 (train.parallel fsdp): two CPU processes under torchrun, each holding half of every weight, train like
one process, with Muon too; their checkpoints (whole, or per-rank shards) resume exactly into 2 processes or 1;
unsupported settings are refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distributed_jobs import read_history, torchrun_worker, two_processes, worker
from tiny_training import process_env, tiny_config, tiny_trainer

FSDP = {"train.parallel": "fsdp", "train.max_steps": 20, "train.save_interval": 10}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """20 steps of 2 FSDP processes x 2 sequences x 2 micro-batches (global batch 8), checkpoints at 10 and 20."""
    return two_processes(tmp_path_factory, "fsdp", FSDP)


@pytest.mark.distributed
def test_fsdp_processes_match_one_and_write_the_same_checkpoint(fsdp_run, tmp_path):
    """Sharded over 2 processes (each holding about half the weights): the losses, val loss and checkpoint files of
    one plain process with the same global batch (4 sequences x 2 micro-batches)."""
    from safetensors import safe_open

    worker(tmp_path / "one", batch_size=4, grad_accum=2, overrides=json.dumps({**FSDP, "train.parallel": "ddp"}))
    one, two = read_history(tmp_path / "one"), read_history(fsdp_run)
    assert two["world_size"] == 2 and two["sharded"] and not one["sharded"]
    assert 0.4 < two["held"] < 0.6 and one["held"] == 1.0  # each process holds its half of every weight
    assert [s for s, _ in two["history"]] == [s for s, _ in one["history"]] == list(range(1, 21))
    assert [l for _, l in two["history"]] == pytest.approx([l for _, l in one["history"]], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    for name in ("model.safetensors", "optimizer.safetensors"):  # the format of one process: names, metadata, values
        with safe_open(str(tmp_path / "one" / "checkpoints" / "step-00000020" / name), "pt") as a, \
                safe_open(str(fsdp_run / "checkpoints" / "step-00000020" / name), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys()) and a.metadata() == b.metadata(), name
            for key in a.keys():
                diff = (a.get_tensor(key) - b.get_tensor(key)).abs().max().item()
                # 5e-5, not the losses' 1e-5: Adam divides by sqrt(v), so a near-zero gradient (a bias) amplifies
                # the rounding of a different reduction order (1.1e-5 on an AVX2-only CPU)
                assert diff < 5e-5, (name, key, diff)


@pytest.mark.distributed
def test_an_fsdp_checkpoint_resumes_with_one_plain_process_and_with_two_fsdp_processes(fsdp_run, tmp_path):
    """The step-10 checkpoint of 2 FSDP processes, resumed by 1 process and by 2 FSDP processes: steps 11-20
    have the uninterrupted run's losses (each process takes its shard of the whole saved state)."""
    ckpt = fsdp_run / "checkpoints" / "step-00000010"
    reference = read_history(fsdp_run)["history"][10:]
    worker(tmp_path / "one", batch_size=4, grad_accum=2,
           overrides=json.dumps({**FSDP, "train.parallel": "ddp", "train.resume": str(ckpt)}))
    torchrun_worker(tmp_path / "two", 2, 2, False, "", json.dumps({**FSDP, "train.resume": str(ckpt)}))
    one, two = read_history(tmp_path / "one")["history"], read_history(tmp_path / "two")["history"]
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(11, 21))
    assert [l for _, l in two] == [l for _, l in reference]  # exact: the same shards, the same reduction order
    assert [l for _, l in one] == pytest.approx([l for _, l in reference], abs=1e-5)


@pytest.mark.distributed
def test_fsdp_with_activation_checkpointing_and_bf16_mixed(fsdp_run, tmp_path):
    """Activation checkpointing under FSDP (blocks re-gathered and recomputed in the backward pass): the same losses;
    bf16-mixed: matrix products on bf16 copies of the gathered weights, losses within bf16 noise of one process."""
    torchrun_worker(tmp_path / "ac", 2, 2, False, "", json.dumps({**FSDP, "train.activation_checkpointing": True}))
    assert read_history(tmp_path / "ac")["history"] == read_history(fsdp_run)["history"]
    bf16 = {"train.max_steps": 20, "train.precision": "bf16-mixed"}
    torchrun_worker(tmp_path / "bf16", 2, 2, False, "", json.dumps({**bf16, "train.parallel": "fsdp",
                                                                  "train.activation_checkpointing": True}))
    worker(tmp_path / "one", batch_size=4, grad_accum=2, overrides=json.dumps(bf16))
    one, two = read_history(tmp_path / "one"), read_history(tmp_path / "bf16")
    assert two["weight_dtypes"] == ["torch.bfloat16"] and read_history(fsdp_run)["weight_dtypes"] == ["torch.float32"]
    assert [l for _, l in two["history"]] == pytest.approx([l for _, l in one["history"]], abs=5e-3)


# Muon under FSDP (fp32 Newton-Schulz: bf16's rounding would turn the reduction order's 1e-7 into 1e-3), with an MLP
# 33 wide: its fc matrix splits unevenly over 2 processes (17 rows and 16); and 3 layers, so each shape's 3 matrices
# split unevenly too (2 orthogonalised by one process, 1 by the other).
MUON = {**FSDP, "optim.name": "muon", "optim.muon_ns_dtype": "fp32", "model.mlp_hidden": 33, "model.n_layer": 3}


@pytest.fixture(scope="module")
def muon_fsdp_run(tmp_path_factory):
    """20 steps of 2 FSDP processes with Muon (as fsdp_run), checkpoints at 10 and 20."""
    return two_processes(tmp_path_factory, "muon-fsdp", MUON)


@pytest.mark.distributed
def test_muon_under_fsdp_matches_one_process(muon_fsdp_run, tmp_path):
    """The FSDP processes share out the hidden matrices, each orthogonalises its share whole, and each keeps its rows
    of every result: 20 steps have the losses of one process, and each process does only its share of the work."""
    worker(tmp_path / "one", batch_size=4, grad_accum=2, overrides=json.dumps({**MUON, "train.parallel": "ddp"}))
    one, two = read_history(tmp_path / "one"), read_history(muon_fsdp_run)
    assert two["sharded"] and 0.4 < two["held"] < 0.6
    # Muon stepped: per step, 4 shapes (qkv, proj, fc, mlp proj) x 3 layers went through Newton-Schulz in one
    # process; under FSDP the first process took 2 of each shape's 3
    assert one["orthogonalised"] == 20 * 4 * 3 and two["orthogonalised"] == 20 * 4 * 2
    assert [l for _, l in two["history"]] == pytest.approx([l for _, l in one["history"]], abs=1e-5)


@pytest.mark.distributed
def test_muon_under_fsdp_resumes_from_full_and_sharded_checkpoints(muon_fsdp_run, tmp_path):
    """The step-10 checkpoint resumes exactly with 2 FSDP processes and within 1e-5 with one; a sharded checkpoint
    (each process's rows of every weight and momentum) resumes exactly."""
    two = read_history(muon_fsdp_run)
    ckpt = muon_fsdp_run / "checkpoints" / "step-00000010"
    torchrun_worker(tmp_path / "resumed", 2, 2, False, "", json.dumps({**MUON, "train.resume": str(ckpt)}))
    worker(tmp_path / "resumed-one", batch_size=4, grad_accum=2,
           overrides=json.dumps({**MUON, "train.parallel": "ddp", "train.resume": str(ckpt)}))
    assert read_history(tmp_path / "resumed")["history"] == two["history"][10:]
    assert [l for _, l in read_history(tmp_path / "resumed-one")["history"]] == pytest.approx(
        [l for _, l in two["history"][10:]], abs=1e-5)

    sharded = {**MUON, "train.checkpoint_format": "sharded"}
    torchrun_worker(tmp_path / "sharded", 2, 2, False, "", json.dumps(sharded))
    assert read_history(tmp_path / "sharded")["history"] == two["history"]
    ckpt = tmp_path / "sharded" / "checkpoints" / "step-00000010"
    torchrun_worker(tmp_path / "sharded-resumed", 2, 2, False, "", json.dumps({**sharded, "train.resume": str(ckpt)}))
    assert read_history(tmp_path / "sharded-resumed")["history"] == two["history"][10:]


SHARDED = {**FSDP, "train.checkpoint_format": "sharded"}


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """The fsdp_run job, writing each checkpoint as per-rank shards (train.checkpoint_format sharded)."""
    return two_processes(tmp_path_factory, "sharded", SHARDED)


@pytest.mark.distributed
def test_a_sharded_checkpoint_holds_each_ranks_rows_and_resumes_with_two_and_with_one(sharded_run, tmp_path):
    """Each of 2 FSDP processes writes its own rows (dim 0, in rank order) of every weight and AdamW moment; the
    step-10 checkpoint resumed by 2 FSDP processes gives steps 11-20 of the uninterrupted run bit for bit, and by
    1 process (which assembles the whole tensors) within 1e-6; the two step-20 checkpoints (2 shards and 1)
    assemble to the same weights."""
    from lmforge.checkpoint import read_shard_index, read_weights, verify_checkpoint

    ckpt = sharded_run / "checkpoints" / "step-00000010"
    assert sorted(verify_checkpoint(ckpt)["files"]) == sorted([
        "config.json", "shards.json", "state.json", "model-rank0-of-2.safetensors", "model-rank1-of-2.safetensors",
        "optim-rank0-of-2.safetensors", "optim-rank1-of-2.safetensors"])
    index = read_shard_index(ckpt)
    qkv = index["model"]["blocks.0.attn.qkv.weight"]
    assert qkv["shape"][0] % 2 == 0 and qkv["rows"] == [[0, 0, qkv["shape"][0] // 2], [1, qkv["shape"][0] // 2, qkv["shape"][0]]]
    assert all(len(e["rows"]) == 2 for name, e in index["optim"].items() if name.endswith(".exp_avg"))
    assert all(e["rows"] == [[0, 0, 1]] for name, e in index["optim"].items() if name.endswith(".step"))

    reference = read_history(sharded_run)["history"][10:]
    torchrun_worker(tmp_path / "two", 2, 2, False, "", json.dumps({**SHARDED, "train.resume": str(ckpt)}))
    worker(tmp_path / "one", batch_size=4, grad_accum=2, overrides=json.dumps({**SHARDED, "train.resume": str(ckpt)}))
    one, two = read_history(tmp_path / "one")["history"], read_history(tmp_path / "two")["history"]
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(11, 21))
    assert [l for _, l in two] == [l for _, l in reference]  # exact: each process read back the rows it held
    assert [l for _, l in one] == pytest.approx([l for _, l in reference], abs=1e-6)
    a = read_weights(tmp_path / "two" / "checkpoints" / "step-00000020")
    b = read_weights(tmp_path / "one" / "checkpoints" / "step-00000020")
    assert sorted(a) == sorted(b) and all((a[k] - b[k]).abs().max().item() < 1e-5 for k in a)
    assert read_shard_index(tmp_path / "one" / "checkpoints" / "step-00000020")["world_size"] == 1


@pytest.mark.parametrize("flags, says", [
    (["--train.parallel", "fsdp", "--train.init_from", "{tmp}", "--lora.r", "4"], "train.parallel=fsdp is not supported with lora"),
    (["--train.fsdp_cpu_offload", "true"], "add --train.parallel fsdp"),
    (["--train.checkpoint_format", "sharded"], "train.checkpoint_format=sharded writes each FSDP process's shard"),
])
def test_unsupported_fsdp_settings_are_refused_in_one_line(tmp_path, flags, says):
    """fsdp with LoRA adapters, CPU offload without fsdp: one line saying what to do, exit 2, nothing written."""
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "lmforge.cli", "train", "--preset", "tiny", "--run-dir", str(run),
                           *(f.format(tmp=tmp_path) for f in flags)],
                          env=process_env(), capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert says in lines[0]
    assert not run.exists()


def test_fsdp_cpu_offload_on_the_cpu_is_refused(tmp_path):
    """CPU offload moves shards off the GPUs: on the CPU it is refused before anything is written."""
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="fsdp_cpu_offload .* on device cpu they are there already"):
        tiny_trainer(tiny_config(tmp_path / "run", **{"train.parallel": "fsdp", "train.fsdp_cpu_offload": True}))
    assert not (tmp_path / "run").exists()


@pytest.mark.distributed
def test_the_early_exit_loss_under_fsdp_matches_one_process(tmp_path_factory, tmp_path):
    """train.early_exit_layer with 2 FSDP processes: the early exit's norm and head run inside the sharded root's
    forward, and the losses and val losses (the model's and the early exit's) are those of one process."""
    settings = {**FSDP, "model.n_layer": 3, "train.early_exit_layer": 1, "train.max_steps": 8, "train.save_interval": 8,
                "train.eval_interval": 8}
    two = two_processes(tmp_path_factory, "fsdp-early-exit", settings)
    worker(tmp_path / "one", batch_size=4, grad_accum=2, overrides=json.dumps({**settings, "train.parallel": "ddp"}))
    one, fsdp = read_history(tmp_path / "one"), read_history(two)
    assert [l for _, l in fsdp["history"]] == pytest.approx([l for _, l in one["history"]], abs=1e-5)
    assert fsdp["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    logged = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    early = [r["val_early_exit_loss"] for r in logged if "val_early_exit_loss" in r]
    alone = [r["val_early_exit_loss"] for r in map(json.loads, (tmp_path / "one" / "metrics.jsonl").read_text()
                                                    .splitlines()) if "val_early_exit_loss" in r]
    assert early and early == pytest.approx(alone, abs=1e-5)
