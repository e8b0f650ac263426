"""Faults of a distributed job: a killed or hung process ends the job (no hang), a resumed job continues exactly,
and a NaN on one process stops or skips on every process together."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_training import cli_command, prepared_corpus, process_env, step_losses


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


@pytest.fixture(scope="module")
def references(data, tmp_path_factory):
    """The uninterrupted job, run once per parallel mode (the checkpoint format changes the files, not the steps)."""
    made = {}

    def reference(parallel: str) -> Path:
        if parallel not in made:
            made[parallel] = tmp_path_factory.mktemp(f"reference-{parallel}")
            done = _torchrun_cli(data, made[parallel], *JOB, "--train.parallel", parallel, fault=NAN)
            assert done.returncode == 0, done.stderr[-3000:]
        return made[parallel]
    return reference


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("parallel, checkpoint_format, kill", [
    ("ddp", "full", "step@5#1=kill"),  # rank 1 SIGKILLed at the start of step 5
    ("fsdp", "full", "step@5#1=kill"),
    # rank 1 SIGKILLed in the save of step 4, its files written, rank 0's not: step 4 never counts, resume from 3
    ("fsdp", "sharded", "save:optim-rank1-of-2.safetensors@4#1=kill"),
])
def test_a_killed_rank_ends_the_job_and_resume_matches_the_uninterrupted_job(data, references, tmp_path, parallel,
                                                                             checkpoint_format, kill):
    from lmforge.checkpoint import complete_checkpoints, read_weights

    reference, killed = references(parallel), tmp_path / "killed"
    job = [*JOB, "--train.parallel", parallel, "--train.checkpoint_format", checkpoint_format]
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
