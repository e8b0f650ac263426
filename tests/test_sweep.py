"""lmforge sweep: an Optuna study whose trials are real tiny training runs, in real processes, on a real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from lmforge.cli import main
from lmforge.sweep import create_sweep, load_sweep, run_sweep
from lmforge.sweep.space import apply_values, read_space, sample
from lmforge.sweep.study import STUDY_NAME
from lmforge.config import load_run_config, to_dict
from lmforge.train.metrics import read_metrics
from tiny_training import prepared_corpus, process_env

SPACE = """\
optim.lr: {low: 1.0e-3, high: 3.0e-2, log: true}
optim.warmup_steps: {fraction_of: train.max_steps, low: 0.0, high: 0.3}
model.pos_encoding: {choices: [learned, rope]}
model.rope_theta: {low: 100, high: 10000, log: true, when: {model.pos_encoding: rope}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepared_corpus(tmp_path_factory.mktemp("sweep-data"))


def base_config(root: Path, data: Path, **train: object) -> Path:
    """A tiny run config: 20 steps, an evaluation every 5."""
    settings = {"max_steps": 20, "eval_interval": 5, "eval_batches": 2, "batch_size": 4, "save_interval": 0,
                "log_interval": 5, "device": "cpu", "num_threads": 1, **train}
    config = {"preset": "tiny", "model": {"block_size": 16}, "data": {"path": str(data)}, "train": settings,
              "optim": {"warmup_steps": 2}}
    (root / "base.yaml").write_text(yaml.safe_dump(config))
    return root / "base.yaml"


def space_file(root: Path, text: str = SPACE) -> Path:
    (root / "space.yaml").write_text(text)
    return root / "space.yaml"


def study_of(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{sweep_dir / 'study.db'}")


def eval_values(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if r["kind"] == "eval"}


def test_a_sweep_finishes_its_trials_and_best_yaml_reproduces_the_best_value(tmp_path, data):
    out = tmp_path / "sweep"
    code = main(["sweep", "--config", str(base_config(tmp_path, data)), "--space", str(space_file(tmp_path)),
                 "--out", str(out), "--trials", "4", "--pruner", "none", "--no-progress"])
    assert code == 0
    with sqlite3.connect(out / "study.db") as db:  # the storage itself, read without Optuna
        states = [row[0] for row in db.execute("SELECT state FROM trials")]
    assert states == ["COMPLETE"] * 4
    study = study_of(out)
    best = study.best_trial
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("number,state,value")
    for name in ("history", "importances", "parallel", "curves"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for t in study.trials:  # every trial an ordinary run directory, with the sampled values in its config
        run = Path(t.user_attrs["run_dir"])
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["optim"]["lr"] == t.params["optim.lr"]
        assert config["optim"]["warmup_steps"] == round(20 * t.params["optim.warmup_steps/train.max_steps"])
        assert ("model.rope_theta" in t.params) == (config["model"]["pos_encoding"] == "rope")
        assert json.loads((run / "trial.json").read_text())["state"] == "complete"
    assert main(["train", "--config", str(out / "best.yaml")]) == 0
    again = eval_values(out / "best-run")
    assert again == eval_values(Path(best.user_attrs["run_dir"]))  # every evaluation, bit for bit
    assert min(again.values()) == best.value


def test_the_pruner_stops_a_clearly_bad_trial_before_its_last_step(tmp_path, data):
    space = space_file(tmp_path, "optim.lr: {low: 1.0e-7, high: 3.0e-2, log: true}\n")
    sweep = create_sweep(str(base_config(tmp_path, data)), {"optim.min_lr": "0"}, str(space), tmp_path / "sweep", trials=2,
                         pruner="median", startup_trials=1, prune_after=1)
    study = study_of(sweep.dir)
    study.enqueue_trial({"optim.lr": 2e-2})  # a good trial first, then one that cannot learn in 20 steps
    study.enqueue_trial({"optim.lr": 1e-7})
    assert run_sweep(sweep, progress=False)
    good, bad = study_of(sweep.dir).trials
    assert good.state == TrialState.COMPLETE and bad.state == TrialState.PRUNED
    run = Path(bad.user_attrs["run_dir"])
    record = json.loads((run / "trial.json").read_text())
    assert record["state"] == "pruned" and record["pruned_at_step"] < 20 and record["steps"] == record["pruned_at_step"]
    assert max(eval_values(run)) == record["pruned_at_step"]  # no evaluation after the stop
    assert "pruned by the sweep" in (run / "train.log").read_text()
    assert (run / "checkpoints" / f"step-{record['steps']:08d}").is_dir()  # stopped cleanly, with a checkpoint


def test_kill_9_mid_trial_then_resume_keeps_finished_trials_and_continues_the_interrupted_one(tmp_path, data):
    out = tmp_path / "sweep"
    config = base_config(tmp_path, data, max_steps=300, save_interval=20, eval_interval=100)
    cmd = [sys.executable, "-m", "lmforge.cli", "sweep", "--config", str(config), "--space", str(space_file(tmp_path)),
           "--out", str(out), "--trials", "3", "--pruner", "none", "--no-progress"]
    proc = subprocess.Popen(cmd, env=process_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while True:  # wait for one finished trial and a running one with a checkpoint
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode() if proc.poll() else ""
            trials = study_of(out).trials if (out / "sweep.yaml").exists() else []
            running = [t for t in trials if t.state == TrialState.RUNNING and "run_dir" in t.user_attrs]
            if any(t.state == TrialState.COMPLETE for t in trials) and running \
                    and list((Path(running[0].user_attrs["run_dir"]) / "checkpoints").glob("step-*")):
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {t.number: (t.state, t.value, t.datetime_complete) for t in study_of(out).trials}
    interrupted = [n for n, (state, _, _) in before.items() if state == TrialState.RUNNING]
    assert len(interrupted) == 1

    assert main(["sweep", "--resume", str(out), "--no-progress"]) == 0
    after = study_of(out).trials
    for t in after:  # the trials finished before the kill are untouched
        if t.number in before and before[t.number][0] == TrialState.COMPLETE:
            assert (t.state, t.value, t.datetime_complete) == before[t.number]
    assert after[interrupted[0]].state == TrialState.FAIL
    assert sum(t.state == TrialState.COMPLETE for t in after) == 3  # the target, no trial counted twice
    continuation = [t for t in after if t.user_attrs.get("continues") == interrupted[0]]
    assert len(continuation) == 1 and continuation[0].state == TrialState.COMPLETE
    assert continuation[0].params == after[interrupted[0]].params
    run = Path(continuation[0].user_attrs["run_dir"])
    assert run.name == f"trial-{interrupted[0]:04d}" and "resumed from" in (run / "train.log").read_text()
    runs = sorted(Path(t.user_attrs["run_dir"]).name for t in after if t.state == TrialState.COMPLETE)
    assert sorted(p.name for p in (out / "trials").iterdir()) == runs and len(set(runs)) == 3  # one run per trial


def test_two_workers_run_disjoint_trials_in_parallel(tmp_path, data):
    out = tmp_path / "sweep"
    code = main(["sweep", "--config", str(base_config(tmp_path, data, max_steps=60, num_threads=0)), "--space",
                 str(space_file(tmp_path)), "--out", str(out), "--trials", "4", "--pruner", "none", "--workers", "2",
                 "--no-progress"])
    assert code == 0
    trials = study_of(out).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len({t.user_attrs["run_dir"] for t in trials}) == 4
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes
    spans = [(t.datetime_start, t.datetime_complete, t.user_attrs["pid"]) for t in trials]
    assert any(a[2] != b[2] and a[0] < b[1] and b[0] < a[1] for a in spans for b in spans)  # at the same time
    threads = {yaml.safe_load((Path(t.user_attrs["run_dir"]) / "config.yaml").read_text())["train"]["num_threads"]
               for t in trials}
    assert threads == {max(1, len(os.sched_getaffinity(0)) // 2)}  # the cores split between the workers


@pytest.mark.parametrize("space,message", [
    ("optim.lrr: {low: 1.0e-3, high: 1.0e-2}\n", "unknown config key optim.lrr (did you mean 'lr'?)"),
    ("optim.lr: {low: 1.0e-2, high: 1.0e-3}\n", "optim.lr: the range [0.01, 0.001] is empty"),
    ("optim.weight_decay: {low: 0, high: 0.1, log: true}\n", "a log range must lie above 0"),
    ("model.n_embd: {choices: [32, wide]}\n", "model.n_embd: choice 'wide' is refused"),
    ("model.pos_encoding: {choices: [rope, alibi]}\n", "choose one of learned, sinusoidal, rope"),
    ("model.pos_encoding: {choices: []}\n", "choices must be a non-empty list"),
    ("optim.lr:\n  low: 1.0e-3\n\thigh: 1.0e-2\n", "space.yaml:3:1 has a tab: YAML forbids tabs for indentation"),
    ("optim.lr: {low: 1.0e-3, high: 1.0e-2\n", "space.yaml:2:1 is not valid YAML: expected ',' or '}'"),
])
def test_a_bad_space_is_one_line_exit_2_and_nothing_written(tmp_path, data, capsys, space, message):
    before = set(tmp_path.iterdir())
    code = main(["sweep", "--config", str(base_config(tmp_path, data)), "--space", str(space_file(tmp_path, space)),
                 "--out", str(tmp_path / "sweep")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert set(tmp_path.iterdir()) - before == {tmp_path / "base.yaml", tmp_path / "space.yaml"} - before
    assert not (tmp_path / "sweep").exists()


def test_resuming_a_storage_that_is_not_an_optuna_study_is_refused_untouched(tmp_path, data, capsys):
    sweep = create_sweep(str(base_config(tmp_path, data)), {}, str(space_file(tmp_path)), tmp_path / "sweep", trials=1)
    garbage = b"SQLite format 3\x00 but not really"
    (sweep.dir / "study.db").write_bytes(garbage)
    files = sorted(sweep.dir.rglob("*"))
    assert main(["sweep", "--resume", str(sweep.dir)]) == 2
    err = capsys.readouterr().err
    assert "study.db is not an Optuna study" in err and err.count("\n") == 1
    assert (sweep.dir / "study.db").read_bytes() == garbage and sorted(sweep.dir.rglob("*")) == files
    other = sqlite3.connect(tmp_path / "other.db")  # a real SQLite file of something else: Optuna must not add tables
    other.execute("CREATE TABLE notes (text)")
    other.commit()
    other.close()
    (sweep.dir / "study.db").write_bytes((tmp_path / "other.db").read_bytes())
    assert main(["sweep", "--resume", str(sweep.dir)]) == 2
    assert (sweep.dir / "study.db").read_bytes() == (tmp_path / "other.db").read_bytes()


def test_fractions_and_conditions_follow_the_sampled_values(tmp_path):
    base = to_dict(load_run_config(None, {"preset": "tiny", "train.max_steps": "200"}))
    _, params = read_space(space_file(tmp_path), base)
    learned = sample(optuna.trial.FixedTrial({"optim.lr": 1e-2, "optim.warmup_steps/train.max_steps": 0.123,
                                              "model.pos_encoding": "learned"}), params, base)
    assert learned == {"optim.lr": 1e-2, "optim.warmup_steps": 25, "model.pos_encoding": "learned"}
    rope = sample(optuna.trial.FixedTrial({"optim.lr": 1e-2, "optim.warmup_steps/train.max_steps": 0.0,
                                           "model.pos_encoding": "rope", "model.rope_theta": 500.0}), params, base)
    assert rope["model.rope_theta"] == 500.0 and rope["optim.warmup_steps"] == 0


def test_a_fraction_of_a_searched_key_scales_that_trials_value_not_the_base_one(tmp_path):
    """warmup_steps as a fraction of train.max_steps, itself searched: 0.1 x the trial's 300 steps is 30 (the base
    config's 200 would give 20)."""
    base = to_dict(load_run_config(None, {"preset": "tiny", "train.max_steps": "200"}))
    text = ("train.max_steps: {low: 100, high: 400}\n"
            "optim.warmup_steps: {fraction_of: train.max_steps, low: 0.0, high: 0.3}\n")
    _, params = read_space(space_file(tmp_path, text), base)
    values = sample(optuna.trial.FixedTrial({"train.max_steps": 300, "optim.warmup_steps/train.max_steps": 0.1}),
                    params, base)
    assert values == {"train.max_steps": 300, "optim.warmup_steps": 30}


def test_apply_values_returns_a_new_config_and_leaves_the_base_for_the_next_trial():
    base = to_dict(load_run_config(None, {"preset": "tiny", "train.max_steps": "200"}))
    before = json.loads(json.dumps(base))
    trial = apply_values(base, {"optim.lr": 0.02, "train.max_steps": 50})
    assert trial["optim"]["lr"] == 0.02 and trial["train"]["max_steps"] == 50
    assert {k: v for k, v in trial["optim"].items() if k != "lr"} == {k: v for k, v in before["optim"].items()
                                                                     if k != "lr"}
    assert base == before  # the next trial samples against the unchanged base


def test_a_parameter_with_two_conditions_is_sampled_only_when_both_hold(tmp_path):
    base = to_dict(load_run_config(None, {"preset": "tiny"}))
    text = ("model.pos_encoding: {choices: [learned, rope]}\n"
            "model.mlp: {choices: [gelu, swiglu]}\n"
            "model.rope_theta: {low: 100, high: 10000, log: true,\n"
            "                   when: {model.pos_encoding: rope, model.mlp: swiglu}}\n")
    _, params = read_space(space_file(tmp_path, text), base)
    for pos, mlp in (("rope", "swiglu"), ("rope", "gelu"), ("learned", "swiglu"), ("learned", "gelu")):
        fixed = {"model.pos_encoding": pos, "model.mlp": mlp, "model.rope_theta": 500.0}
        values = sample(optuna.trial.FixedTrial(fixed), params, base)
        assert ("model.rope_theta" in values) == (pos == "rope" and mlp == "swiglu"), (pos, mlp)
