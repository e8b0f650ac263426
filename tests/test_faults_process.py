"""Faults that only a real process shows: kill -9 at random steps and inside a save, SIGTERM, Ctrl-C.

Each test runs `python -m lmforge.cli train` in a subprocess on data prepared by lmforge, kills or
signals it, restarts it with --resume auto, and compares with an uninterrupted run bit for bit.
The kill points inside a save come from the test-only hook LMFORGE_FAULT (lmforge.checkpoint.fault_point);
the other kills and signals come from outside, at a random moment.

The kill points (steps, the point inside a save, the moment of an outside kill) are drawn from a new seed on
every run, printed with the test's output: LMFORGE_FAULT_SEED=<seed> replays one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lmforge.checkpoint import complete_checkpoints, latest_checkpoint, verify_checkpoint
from tiny_training import cli_command, prepared_corpus, process_env, step_losses

SEED = int(os.environ.get("LMFORGE_FAULT_SEED") or random.SystemRandom().randrange(1 << 32))  # any seed must pass
SAVE_POINTS = ["save:model.safetensors", "save:optimizer.safetensors", "save:state.json", "save:config.json",
               "save:tokenizer.json", "save:manifest", "save:renamed"]  # lmforge.checkpoint.fault_point, in order
RESUMABLE = ["--train.max_steps", "16", "--train.save_interval", "1", "--train.keep_last", "2",
             "--train.eval_interval", "4", "--train.grad_accum", "2", "--model.dropout", "0.1"]


@pytest.fixture
def rng() -> random.Random:
    """The random kill points of one test, from SEED, printed so that a failure can be replayed."""
    print(f"kill points drawn from LMFORGE_FAULT_SEED={SEED} (set it to replay this run)")
    return random.Random(SEED)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("faults"))


def _run(cmd: list[str], fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=process_env(fault), capture_output=True, text=True, timeout=timeout)


def _metric_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _kill_after_new_steps(cmd: list[str], run_dir: Path, steps: int, rng: random.Random) -> int:
    """Start `cmd`, SIGKILL it at a random moment after it logged `steps` new steps; return its exit code."""
    before = _metric_lines(run_dir)
    proc = subprocess.Popen(cmd, env=process_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _metric_lines(run_dir) < before + steps and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)  # the test polls; the product never sleeps
    time.sleep(rng.uniform(0.0, 0.03))  # anywhere in a step or a save
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return proc.returncode


def _no_partial_saves_visible(run_dir: Path) -> None:
    assert all((c / "manifest.json").is_file() for c in complete_checkpoints(run_dir))
    verify_checkpoint(latest_checkpoint(run_dir))


@pytest.mark.slow
def test_kill_9_at_random_steps_resumes_bit_identically(data, tmp_path, rng):
    """Killed 4 times (at a random step's start, at two random points inside the saves of random steps, and
    from outside at a random moment), resumed with --resume auto each time: per-step losses, final weights,
    optimizer state and data/RNG state equal an uninterrupted run's."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = _run(cli_command(data, reference, *RESUMABLE))
    assert done.returncode == 0, done.stderr[-2000:]

    first = rng.randint(2, 5)
    second = rng.randint(first, first + 3)
    third = rng.randint(second + 1, second + 3)
    faults = [("step", first), (rng.choice(SAVE_POINTS), second), (rng.choice(SAVE_POINTS), third)]
    resume = ["--resume", "auto"]
    for i, (point, step) in enumerate(faults):
        crashed = _run(cli_command(data, killed, *RESUMABLE, *(resume if i else [])), f"{point}@{step}=kill")
        assert crashed.returncode == -signal.SIGKILL, (point, step, crashed.stderr[-2000:])
        _no_partial_saves_visible(killed)
        visible = point == "save:renamed"  # the rename is what makes a save count; a kill before it leaves a .tmp-
        assert latest_checkpoint(killed).name == f"step-{step if visible else step - 1:08d}", (point, step)
        half_saved = any(p.name.startswith(".tmp-") for p in (killed / "checkpoints").iterdir())
        assert half_saved == (point.startswith("save:") and not visible), (point, step)

    code = _kill_after_new_steps(cli_command(data, killed, *RESUMABLE, *resume), killed, 2, rng)
    assert code == -signal.SIGKILL
    _no_partial_saves_visible(killed)
    last = _run(cli_command(data, killed, *RESUMABLE, *resume))
    assert last.returncode == 0, last.stderr[-2000:]
    assert not any(p.name.startswith((".tmp-", ".trash-")) for p in (killed / "checkpoints").iterdir())

    expected, got = step_losses(reference), step_losses(killed)
    assert sorted(got) == sorted(expected) == list(range(1, 17))
    assert got == expected  # exact floats: dropout masks, data order and accumulation all restored
    a, b = reference / "checkpoints" / "step-00000016", killed / "checkpoints" / "step-00000016"
    for name in ("model.safetensors", "optimizer.safetensors"):  # the header's key order may differ, nothing else
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
        with safe_open(str(a / name), "pt") as fa, safe_open(str(b / name), "pt") as fb:
            assert fa.metadata() == fb.metadata(), name  # optimizer step counts, param groups
    sa, sb = json.loads((a / "state.json").read_text()), json.loads((b / "state.json").read_text())
    assert sa["ranks"] == sb["ranks"] and sa["tokens_seen"] == sb["tokens_seen"]  # data position and RNG states
    assert sa["best_val_loss"] == sb["best_val_loss"]


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A tiny model that `lmforge train` wrote on `data` (so its tokenizer is the data's): the base LoRA adapts."""
    run = tmp_path_factory.mktemp("base") / "run"
    done = _run(cli_command(data, run, "--train.max_steps", "2"))
    assert done.returncode == 0, done.stderr[-2000:]
    return run


@pytest.mark.slow
def test_a_lora_run_killed_9_resumes_bit_identically(data, base, tmp_path, rng):
    """A LoRA run (adapter dropout, 2 micro-batches) SIGKILLed at a step start and from outside at a random moment,
    resumed with --resume auto each time: its losses and its adapters and their AdamW state equal an uninterrupted
    run's, bit for bit, and its checkpoints hold the adapters only."""
    lora = [arg for arg in RESUMABLE if arg not in ("--model.dropout", "0.1")]  # the model section is the base's
    lora += ["--train.init_from", base, "--lora.r", "4", "--lora.targets", "q,v,o", "--lora.dropout", "0.1"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = _run(cli_command(data, reference, *lora))
    assert done.returncode == 0, done.stderr[-2000:]

    crashed = _run(cli_command(data, killed, *lora), f"step@{rng.randint(3, 6)}=kill")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    resume = cli_command(data, killed, *lora, "--resume", "auto")
    assert _kill_after_new_steps(resume, killed, rng.randint(2, 4), rng) == -signal.SIGKILL
    _no_partial_saves_visible(killed)
    last = _run(resume)
    assert last.returncode == 0, last.stderr[-2000:]

    expected, got = step_losses(reference), step_losses(killed)
    assert sorted(got) == list(range(1, 17)) and got == expected  # exact floats: adapter dropout masks included
    a, b = reference / "checkpoints" / "step-00000016", killed / "checkpoints" / "step-00000016"
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    adapters = load_file(str(b / "model.safetensors"))
    assert adapters and all(".lora." in k for k in adapters)  # the frozen base is never saved again
    assert adapters["blocks.0.attn.qkv.lora.q.B"].abs().max() > 0  # B starts at 0: the adapters did train


def _start_until(cmd: list[str], run_dir: Path, steps: int) -> subprocess.Popen:
    env = {**process_env(), "PYTHONFAULTHANDLER": "1"}  # SIGABRT prints every thread's stack (see _exit_or_stacks)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _metric_lines(run_dir) < steps and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    return proc


def _exit_or_stacks(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """The (stdout, stderr) of `proc` once it exits; if it does not within `timeout`, fail with the stacks it
    hung in."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler (PYTHONFAULTHANDLER) writes every thread's stack
        stacks = proc.communicate(timeout=60)[1][-6000:]
        pytest.fail(f"still running {timeout} s after the signal; its stacks:\n{stacks}")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_save_at_the_step_boundary_exit_0_and_resume_exactly(data, tmp_path, rng, signum):
    """The signal, after a random number of steps, saves the step that was running and exits 0; the run resumed
    from there equals an uninterrupted one bit for bit (a constant LR after warm-up, so max_steps may differ)."""
    run = tmp_path / "run"
    flags = ["--train.save_interval", "0", "--optim.schedule", "constant", "--model.dropout", "0.1"]
    cmd = cli_command(data, run, "--train.max_steps", "100000", *flags)
    proc = _start_until(cmd, run, rng.randint(2, 6))
    proc.send_signal(signum)
    out, err = _exit_or_stacks(proc)
    assert proc.returncode == 0, err[-2000:]
    ckpt = latest_checkpoint(run)
    state = json.loads((ckpt / "state.json").read_text())
    verify_checkpoint(ckpt)
    assert state["step"] == max(step_losses(run))  # the step that was running when the signal came, completed
    assert f"stopped at step {state['step']} by {signal.Signals(signum).name}" in out
    assert "--resume auto" in out and "Traceback" not in err
    total = str(state["step"] + 3)
    again = _run(cli_command(data, run, "--train.max_steps", total, "--resume", "auto", *flags))
    assert again.returncode == 0, again.stderr[-2000:]
    reference = tmp_path / "reference"
    done = _run(cli_command(data, reference, "--train.max_steps", total, *flags))
    assert done.returncode == 0, done.stderr[-2000:]
    assert step_losses(run) == step_losses(reference) and sorted(step_losses(run)) == list(range(1, int(total) + 1))
    a, b = (load_file(str(latest_checkpoint(r) / "model.safetensors")) for r in (reference, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once_and_keeps_the_last_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    # a model large enough that one step takes well over the time to notice the first Ctrl-C
    slow = ["--model.n_embd", "192", "--model.n_layer", "4", "--model.n_head", "4", "--model.block_size", "128",
            "--train.batch_size", "12"]
    cmd = cli_command(data, run, *slow, "--train.max_steps", "100000", "--train.save_interval", "1",
                      "--train.keep_last", "1")
    proc = _start_until(cmd, run, 2)
    proc.send_signal(signal.SIGINT)
    for _ in range(100):  # wait until the first Ctrl-C was noticed (the line it prints), then press again
        if "saving a checkpoint at the end of this step" in proc.stderr.readline():
            break
    else:
        pytest.fail("the first Ctrl-C was not acknowledged")
    proc.send_signal(signal.SIGINT)
    _, err = _exit_or_stacks(proc)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    ckpt = latest_checkpoint(run)
    verify_checkpoint(ckpt)  # the last checkpoint is whole, and the newest visible one
    assert int(ckpt.name[5:]) >= max(step_losses(run)) - 1
