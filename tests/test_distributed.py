"""DDP: two CPU processes under torchrun train exactly like one process with the same global batch (LoRA too);
a killed or hung process ends the job (no hang), a resumed job continues exactly, and a NaN on one
process stops or skips on every process together.

Run as a script (`torchrun ... tests/test_distributed.py RUN_DIR BATCH ACCUM COMPILE [LORA_BASE [OVERRIDES_JSON]]`),
this file is the worker.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_training import (cli_command, prepared_corpus, process_env, step_losses, tiny_config, tiny_trainer,
                           write_base)

STEPS = {"train.max_steps": 6, "train.eval_interval": 3, "train.save_interval": 3, "model.dropout": 0.0}
LORA = {"lora.r": 4, "lora.targets": "q,k,v,o", "optim.lr": 1e-2}  # no adapter dropout: each process draws its own


def worker(run_dir: Path, batch_size: int, grad_accum: int = 1, compile: bool = False, base: str = "",
           overrides: str = "{}") -> None:
    """Train the tiny model (LoRA adapters on `base`, when given; config `overrides` as JSON); rank 0 writes the
    logged losses, the trainable parameters and the fingerprint of the frozen weights next to the run directory."""
    from torch import nn

    from lmforge.distributed import is_sharded, teardown_distributed, unwrap
    from lmforge.lora import base_fingerprint
    from lmforge.train import muon

    orthogonalised = []  # the matrices this process put through Newton-Schulz, per call
    real = muon.newton_schulz
    muon.newton_schulz = lambda G, *args, **kwargs: orthogonalised.append(G.size(0)) or real(G, *args, **kwargs)

    lora = {"train.init_from": base, **LORA} if base else {}
    trainer = tiny_trainer(tiny_config(run_dir, **{**STEPS, "train.batch_size": batch_size,
                                                   "train.grad_accum": grad_accum, "train.compile": compile, **lora,
                                                   **json.loads(overrides)}))
    dtypes = set()  # of the weight a block's first matrix product is given (FSDP: the gathered one)
    first = next(m for m in unwrap(trainer.raw_model).blocks[0].modules() if isinstance(m, nn.Linear))
    first.register_forward_pre_hook(lambda module, args: dtypes.add(str(module.weight.dtype)))
    summary = trainer.fit()
    local = sum(getattr(p, "to_local", lambda: p)().numel() for p in trainer.raw_model.parameters())
    if trainer.dist.is_main:
        trainable = [name for name, p in trainer.raw_model.named_parameters() if p.requires_grad]
        (run_dir / "history.json").write_text(json.dumps({"history": trainer.history, "val_loss": summary["val_loss"],
                                                          "world_size": trainer.dist.world_size, "trainable": trainable,
                                                          "sharded": is_sharded(trainer.raw_model),
                                                          "held": local / summary["parameters"],
                                                          "weight_dtypes": sorted(dtypes),
                                                          "orthogonalised": sum(orthogonalised),
                                                          "base_fingerprint": base_fingerprint(trainer.raw_model) if base else None}))
    teardown_distributed(synchronize=True)


def _torchrun(run_dir: Path, *args: object) -> None:  # args: BATCH ACCUM COMPILE [LORA_BASE [OVERRIDES_JSON]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, str(run_dir), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[:3000]


@pytest.mark.distributed
def test_two_processes_match_one(tmp_path):
    from safetensors.torch import load_file

    worker(tmp_path / "one", batch_size=8)
    _torchrun(tmp_path / "two", 4, 1, False)
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert two["world_size"] == 2
    assert [s for s, _ in two["history"]] == [s for s, _ in one["history"]] == list(range(1, 7))
    assert [l for _, l in two["history"]] == pytest.approx([l for _, l in one["history"]], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000006" / "model.safetensors"))
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name
    # rank 0 alone wrote: one metrics file whose train records are not duplicated
    records = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 7))
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["ranks"]) == 2


@pytest.mark.distributed
def test_two_lora_processes_match_one_and_train_only_the_adapters(tmp_path):
    """LoRA under DDP: 2 processes x 4 sequences give the losses and adapters of 1 process x 8 (2 micro-batches each);
    only adapters train and are saved, under the plain model's names, and the base weights end as they began."""
    from safetensors.torch import load_file

    base = write_base(tmp_path)
    worker(tmp_path / "one", batch_size=8, grad_accum=2, base=str(base))
    _torchrun(tmp_path / "two", 4, 2, False, base)
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert two["world_size"] == 2 and [s for s, _ in two["history"]] == list(range(1, 7))
    assert [l for _, l in two["history"]] == pytest.approx([l for _, l in one["history"]], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    assert one["trainable"] == two["trainable"] and all(".lora." in name for name in two["trainable"])
    ckpt = tmp_path / "two" / "checkpoints" / "step-00000006"
    state = json.loads((ckpt / "state.json").read_text())
    assert one["base_fingerprint"] == two["base_fingerprint"] == state["base"]["fingerprint"]  # frozen: unchanged
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000006" / "model.safetensors"))
    b = load_file(str(ckpt / "model.safetensors"))
    assert sorted(b) == sorted(a) == sorted(two["trainable"])  # the adapters alone, under the plain model's names
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name
    assert max(b[k].abs().max().item() for k in b if k.endswith(".B")) > 1e-3  # (the adapters did train)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_compiled_processes_with_accumulation_match_one(tmp_path):
    """torch.compile over DDP, and no_sync on all but the last micro-batch: still the 1-process losses."""
    worker(tmp_path / "one", batch_size=8)
    _torchrun(tmp_path / "two", 2, 2, True)
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [l for _, l in two["history"]] == pytest.approx([l for _, l in one["history"]], abs=1e-5)


# ------------------------------------------------------------------------------------ FSDP2
FSDP = {"train.parallel": "fsdp", "train.max_steps": 20, "train.save_interval": 10}


def _two_processes(tmp_path_factory, name: str, overrides: dict) -> Path:
    """The run directory of a job of 2 processes x 2 sequences x 2 micro-batches with `overrides`."""
    run = tmp_path_factory.mktemp(name) / "two"
    _torchrun(run, 2, 2, False, "", json.dumps(overrides))
    return run


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """20 steps of 2 FSDP processes x 2 sequences x 2 micro-batches (global batch 8), checkpoints at 10 and 20."""
    return _two_processes(tmp_path_factory, "fsdp", FSDP)


def _read(run: Path) -> dict:
    return json.loads((run / "history.json").read_text())


@pytest.mark.distributed
def test_fsdp_processes_match_one_and_write_the_same_checkpoint(fsdp_run, tmp_path):
    """Sharded over 2 processes (each holding about half the weights): the losses, val loss and checkpoint files of
    one plain process with the same global batch (4 sequences x 2 micro-batches)."""
    from safetensors import safe_open

    worker(tmp_path / "one", batch_size=4, grad_accum=2, overrides=json.dumps({**FSDP, "train.parallel": "ddp"}))
    one, two = _read(tmp_path / "one"), _read(fsdp_run)
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
    reference = _read(fsdp_run)["history"][10:]
    worker(tmp_path / "one", batch_size=4, grad_accum=2,
           overrides=json.dumps({**FSDP, "train.parallel": "ddp", "train.resume": str(ckpt)}))
    _torchrun(tmp_path / "two", 2, 2, False, "", json.dumps({**FSDP, "train.resume": str(ckpt)}))
    one, two = _read(tmp_path / "one")["history"], _read(tmp_path / "two")["history"]
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(11, 21))
    assert [l for _, l in two] == [l for _, l in reference]  # exact: the same shards, the same reduction order
    assert [l for _, l in one] == pytest.approx([l for _, l in reference], abs=1e-5)


@pytest.mark.distributed
def test_fsdp_with_activation_checkpointing_and_bf16_mixed(fsdp_run, tmp_path):
    """Activation checkpointing under FSDP (blocks re-gathered and recomputed in the backward pass): the same losses;
    bf16-mixed: matrix products on bf16 copies of the gathered weights, losses within bf16 noise of one process."""
    _torchrun(tmp_path / "ac", 2, 2, False, "", json.dumps({**FSDP, "train.activation_checkpointing": True}))
    assert _read(tmp_path / "ac")["history"] == _read(fsdp_run)["history"]
    bf16 = {"train.max_steps": 20, "train.precision": "bf16-mixed"}
    _torchrun(tmp_path / "bf16", 2, 2, False, "", json.dumps({**bf16, "train.parallel": "fsdp",
                                                                  "train.activation_checkpointing": True}))
    worker(tmp_path / "one", batch_size=4, grad_accum=2, overrides=json.dumps(bf16))
    one, two = _read(tmp_path / "one"), _read(tmp_path / "bf16")
    assert two["weight_dtypes"] == ["torch.bfloat16"] and _read(fsdp_run)["weight_dtypes"] == ["torch.float32"]
    assert [l for _, l in two["history"]] == pytest.approx([l for _, l in one["history"]], abs=5e-3)


# Muon under FSDP (fp32 Newton-Schulz: bf16's rounding would turn the reduction order's 1e-7 into 1e-3), with an MLP
# 33 wide: its fc matrix splits unevenly over 2 processes (17 rows and 16); and 3 layers, so each shape's 3 matrices
# split unevenly too (2 orthogonalised by one process, 1 by the other).
MUON = {**FSDP, "optim.name": "muon", "optim.muon_ns_dtype": "fp32", "model.mlp_hidden": 33, "model.n_layer": 3}


@pytest.fixture(scope="module")
def muon_fsdp_run(tmp_path_factory):
    """20 steps of 2 FSDP processes with Muon (as fsdp_run), checkpoints at 10 and 20."""
    return _two_processes(tmp_path_factory, "muon-fsdp", MUON)


@pytest.mark.distributed
def test_muon_under_fsdp_matches_one_process(muon_fsdp_run, tmp_path):
    """The FSDP processes share out the hidden matrices, each orthogonalises its share whole, and each keeps its rows
    of every result: 20 steps have the losses of one process, and each process does only its share of the work."""
    worker(tmp_path / "one", batch_size=4, grad_accum=2, overrides=json.dumps({**MUON, "train.parallel": "ddp"}))
    one, two = _read(tmp_path / "one"), _read(muon_fsdp_run)
    assert two["sharded"] and 0.4 < two["held"] < 0.6
    # per step, 4 shapes (qkv, proj, fc, mlp proj) x 3 layers; the first process takes 2 of each shape's 3
    assert one["orthogonalised"] == 20 * 4 * 3 and two["orthogonalised"] == 20 * 4 * 2
    assert [l for _, l in two["history"]] == pytest.approx([l for _, l in one["history"]], abs=1e-5)
    worker(tmp_path / "adamw", batch_size=4, grad_accum=2,  # Muon really stepped: AdamW alone gives other losses
           overrides=json.dumps({**MUON, "train.parallel": "ddp", "optim.name": "adamw"}))
    adamw = _read(tmp_path / "adamw")
    assert abs(adamw["history"][-1][1] - one["history"][-1][1]) > 1e-3


@pytest.mark.distributed
def test_muon_under_fsdp_resumes_from_full_and_sharded_checkpoints(muon_fsdp_run, tmp_path):
    """The step-10 checkpoint resumes exactly with 2 FSDP processes and within 1e-5 with one; a sharded checkpoint
    (each process's rows of every weight and momentum) resumes exactly."""
    two = _read(muon_fsdp_run)
    ckpt = muon_fsdp_run / "checkpoints" / "step-00000010"
    _torchrun(tmp_path / "resumed", 2, 2, False, "", json.dumps({**MUON, "train.resume": str(ckpt)}))
    worker(tmp_path / "resumed-one", batch_size=4, grad_accum=2,
           overrides=json.dumps({**MUON, "train.parallel": "ddp", "train.resume": str(ckpt)}))
    assert _read(tmp_path / "resumed")["history"] == two["history"][10:]
    assert [l for _, l in _read(tmp_path / "resumed-one")["history"]] == pytest.approx(
        [l for _, l in two["history"][10:]], abs=1e-5)

    sharded = {**MUON, "train.checkpoint_format": "sharded"}
    _torchrun(tmp_path / "sharded", 2, 2, False, "", json.dumps(sharded))
    assert _read(tmp_path / "sharded")["history"] == two["history"]
    ckpt = tmp_path / "sharded" / "checkpoints" / "step-00000010"
    _torchrun(tmp_path / "sharded-resumed", 2, 2, False, "", json.dumps({**sharded, "train.resume": str(ckpt)}))
    assert _read(tmp_path / "sharded-resumed")["history"] == two["history"][10:]


SHARDED = {**FSDP, "train.checkpoint_format": "sharded"}


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """The fsdp_run job, writing each checkpoint as per-rank shards (train.checkpoint_format sharded)."""
    return _two_processes(tmp_path_factory, "sharded", SHARDED)


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

    reference = _read(sharded_run)["history"][10:]
    _torchrun(tmp_path / "two", 2, 2, False, "", json.dumps({**SHARDED, "train.resume": str(ckpt)}))
    worker(tmp_path / "one", batch_size=4, grad_accum=2, overrides=json.dumps({**SHARDED, "train.resume": str(ckpt)}))
    one, two = _read(tmp_path / "one")["history"], _read(tmp_path / "two")["history"]
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


# ------------------------------------------------------------------------------------ faults of a job
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("dist"))


def _torchrun_cli(data: Path, run_dir: Path, *extra: object, fault: str | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m lmforge.cli train ...` (tiny model, gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *cli_command(data, run_dir, *extra)[1:]]
    return subprocess.run(cmd, env=process_env(fault), capture_output=True, text=True, timeout=600)


JOB = ["--train.max_steps", "8", "--train.save_interval", "1", "--train.grad_accum", "2", "--model.dropout", "0.1",
       "--train.dist_timeout", "20", "--on-nonfinite", "skip"]
NAN = "loss@3#1=nan"  # every launch: rank 1's loss at step 3 is NaN, and both processes skip that step


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("parallel, checkpoint_format, kill", [
    ("ddp", "full", "step@5#1=kill"),  # rank 1 SIGKILLed at the start of step 5
    ("fsdp", "full", "step@5#1=kill"),
    # rank 1 SIGKILLed in the save of step 4, its files written, rank 0's not: step 4 never counts, resume from 3
    ("fsdp", "sharded", "save:optim-rank1-of-2.safetensors@4#1=kill"),
])
def test_a_killed_rank_ends_the_job_and_resume_matches_the_uninterrupted_job(data, tmp_path, parallel,
                                                                             checkpoint_format, kill):
    from lmforge.checkpoint import complete_checkpoints, read_weights

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    job = [*JOB, "--train.parallel", parallel, "--train.checkpoint_format", checkpoint_format]
    done = _torchrun_cli(data, reference, *job, fault=NAN)
    assert done.returncode == 0, done.stderr[-3000:]

    crashed = _torchrun_cli(data, killed, *job, fault=f"{NAN},{kill}")
    ended = time.time()
    assert crashed.returncode != 0 and "exitcode  : -9" in crashed.stderr
    last_record = max(json.loads(line)["time"] for line in (killed / "metrics.jsonl").read_text().splitlines())
    assert ended - last_record < 20  # the survivor did not hang: well within train.dist_timeout
    assert max(step_losses(killed)) == 4
    newest = 3 if kill.startswith("save:") else 4
    assert complete_checkpoints(killed)[-1].name == f"step-{newest:08d}"

    resumed = _torchrun_cli(data, killed, *job, "--resume", "auto", fault=NAN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_losses(killed) == step_losses(reference)  # exact: gloo sums two processes in a fixed order
    a = read_weights(reference / "checkpoints" / "step-00000008")
    b = read_weights(killed / "checkpoints" / "step-00000008")
    assert sorted(a) == sorted(b) and all(bool((a[k] == b[k]).all()) for k in a)
    for run in (reference, killed):  # the NaN step was skipped on both processes, and counted once
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["skipped_nonfinite"] for r in records if r["kind"] == "train"][-1] == 1


@pytest.mark.distributed
@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_with_exit_code_3(data, tmp_path):
    run = tmp_path / "run"
    done = _torchrun_cli(data, run, "--train.max_steps", "6", "--train.save_interval", "2", fault="loss@3#1=nan")
    codes = re.findall(r"exitcode  : (-?\d+)", done.stderr)
    # both processes stopped at step 3 with exit code 3 (torchrun may SIGTERM the second while it is exiting)
    assert done.returncode != 0 and "3" in codes and set(codes) <= {"3", "-15"}, done.stderr[-3000:]
    diagnostic = json.loads((run / "nonfinite-step-00000003.json").read_text())
    assert diagnostic["rank"] == 1 and diagnostic["tensor"] == "loss" and diagnostic["step"] == 3
    assert max(step_losses(run)) == 2 and diagnostic["last_checkpoint"].endswith("step-00000002")


@pytest.mark.distributed
@pytest.mark.slow
def test_a_hung_rank_times_out_instead_of_hanging(data, tmp_path):
    """Without torchrun to tear the job down: rank 1 freezes (SIGSTOP) at step 3, rank 0 gives up after
    train.dist_timeout with a one-line error and exit code 4."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**process_env("step@3#1=freeze"), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = cli_command(data, tmp_path / "run", "--train.max_steps", "8", "--train.dist_timeout", "5")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _, err = procs[0].communicate(timeout=120)
        ended = time.time()
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode == 4, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "restart the whole job with --resume auto" in lines[0]
    last_record = max(json.loads(line)["time"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert 5 <= ended - last_record < 30


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    worker(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "True", *sys.argv[5:])
