"""The sweep directory, its Optuna study, and the workers that run its trials.

    SWEEP/sweep.yaml            what the sweep is: the resolved base config, the space, trials, pruner, seed, metric
    SWEEP/study.db              the Optuna study (SQLite): parameters, reported evaluations, state and value of each
                                trial; `optuna-dashboard sqlite:///SWEEP/study.db` shows it live
    SWEEP/trials/trial-NNNN/    each trial an ordinary run directory (config.yaml, metrics.jsonl, checkpoints), plus
                                train.log (what the trainer printed) and trial.json (what the sweep made of it)

A worker loops: under a file lock (so that N workers start exactly the trials still missing), fail the trials of
dead workers of this machine and queue their continuation, count, ask Optuna for a trial; then train it with a
hook that reports each evaluation to the trial and stops it (StopTraining) when the pruner says so; tell Optuna
the result. Everything lives in the storage, so `--resume` after kill -9 only needs the directory: a trial that
was running is marked failed and continued from its checkpoint in its own run directory (same parameters), and
completed trials are never redone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from lmforge.config import load_run_config, run_config_from_dict, to_dict
from lmforge.errors import ConfigError, LmforgeError
from lmforge.files import atomic_write_text
from lmforge.sweep.space import Param, apply_values, parse_space, read_space, sample

SETTINGS, STUDY, TRIALS, LOCK = "sweep.yaml", "study.db", "trials", ".lock"
STUDY_NAME = "lmforge-sweep"
PRUNERS = ("median", "hyperband", "none")
SIGNALS = ("SIGINT", "SIGTERM", "a signal to another process")  # Trainer's stopped_by when a signal stopped it


@dataclasses.dataclass
class Sweep:
    """A sweep directory's settings (SWEEP/sweep.yaml) and its parsed space."""

    dir: Path
    base: dict[str, Any]  # the resolved run config, nested dicts
    space: dict[str, Any]  # the space file's mapping
    params: list[Param]
    trials: int  # finished trials to reach (complete, pruned, or failed by their own config)
    pruner: str
    startup_trials: int  # trials finished before the pruner prunes anything
    prune_after: int  # steps before which no trial is pruned (Hyperband: its smallest budget)
    seed: int

    @property
    def metric(self) -> str:
        return self.base["train"]["best_metric"]

    @property
    def direction(self) -> str:
        from lmforge.train.selection import LOWER_IS_BETTER

        return "minimize" if self.metric in LOWER_IS_BETTER else "maximize"

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{(self.dir / STUDY).resolve()}"

    def settings(self) -> dict[str, Any]:
        return {"trials": self.trials, "pruner": self.pruner, "startup_trials": self.startup_trials,
                "prune_after": self.prune_after, "seed": self.seed, "metric": self.metric,
                "direction": self.direction, "space": self.space, "config": self.base}

    def storage(self) -> Any:
        import optuna

        # a generous SQLite busy timeout: several workers write to one file
        return optuna.storages.RDBStorage(self.storage_url, engine_kwargs={"connect_args": {"timeout": 120}})

    def load_study(self, seed: Optional[int] = None) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)  # liar: parallel workers spread out
        return optuna.load_study(study_name=STUDY_NAME, storage=self.storage(), sampler=sampler,
                                 pruner=self.build_pruner())

    def build_pruner(self) -> Any:
        import optuna

        max_steps = int(self.base["train"]["max_steps"])
        if self.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials, n_warmup_steps=self.prune_after)
        if self.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=self.prune_after, max_resource=max_steps)
        return optuna.pruners.NopPruner()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive among the processes of this machine: counting and asking for a trial happen under it."""
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


# ------------------------------------------------------------------------------------------- creating, loading
def create_sweep(config: Optional[str], overrides: dict[str, str], space: str, out: str | Path, *, trials: int,
                 pruner: str = "median", startup_trials: int = 5, prune_after: Optional[int] = None,
                 seed: Optional[int] = None) -> Sweep:
    """Check everything (config, data, space, options), then write OUT/sweep.yaml and create the study in
    OUT/study.db. Nothing is written when a check fails."""
    base_config = load_run_config(config, overrides)
    check_data(base_config)
    base = to_dict(base_config)
    raw, params = read_space(space, base)
    if trials < 1:
        raise ConfigError(f"--trials {trials}: give a positive number of trials")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner {pruner}: choose one of {', '.join(PRUNERS)}")
    if startup_trials < 0:
        raise ConfigError(f"--startup-trials {startup_trials}: give 0 or a positive number")
    max_steps = base_config.train.max_steps
    prune_after = max(1, max_steps // 10) if prune_after is None else prune_after
    if not 1 <= prune_after <= max_steps:
        raise ConfigError(f"--prune-after {prune_after}: give a step from 1 to train.max_steps={max_steps}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists{' and holds a sweep' if (out / SETTINGS).exists() else ''}: "
                          f"continue a sweep with `lmforge sweep --resume {out}`, or choose another --out")
    sweep = Sweep(out, base, raw, params, trials, pruner, startup_trials, prune_after,
                  base_config.train.seed if seed is None else seed)
    out.mkdir(parents=True, exist_ok=True)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name=STUDY_NAME, storage=sweep.storage(), direction=sweep.direction)
    atomic_write_text(out / SETTINGS, yaml.safe_dump(sweep.settings(), sort_keys=False))
    return sweep


def load_sweep(path: str | Path, trials: Optional[int] = None) -> Sweep:
    """The sweep in directory `path` (to resume it); `trials` raises or lowers its target."""
    path = Path(path)
    if not (path / SETTINGS).is_file():
        raise ConfigError(f"{path} is not a sweep directory (no {SETTINGS}); start one with "
                          f"`lmforge sweep --config FILE --space SPACE --out {path}`")
    check_storage(path / STUDY)
    try:
        s = yaml.safe_load((path / SETTINGS).read_text(encoding="utf-8"))
        base = to_dict(run_config_from_dict(s["config"]))
        sweep = Sweep(path, base, s["space"], parse_space(s["space"], base, str(path / SETTINGS)), int(s["trials"]),
                      s["pruner"], int(s["startup_trials"]), int(s["prune_after"]), int(s["seed"]))
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise ConfigError(f"{path / SETTINGS} is damaged; start a new sweep with another --out") from None
    if trials is not None:
        if trials < 1:
            raise ConfigError(f"--trials {trials}: give a positive number of trials")
        sweep.trials = trials
        atomic_write_text(path / SETTINGS, yaml.safe_dump(sweep.settings(), sort_keys=False))
    return sweep


def check_data(config: Any) -> None:
    """Refuse, before the sweep starts, data every trial would fail on: not prepared, or unable to measure the
    objective (train.best_metric)."""
    from lmforge.data.shards import read_manifest
    from lmforge.data.tasks import is_task_data, read_task_manifest
    from lmforge.train.trainer import check_selection

    data = Path(config.data.path)
    task = {"task": read_task_manifest(data)["task"]} if is_task_data(data) else read_manifest(data) and None
    check_selection(config.train, task)


def check_storage(path: Path) -> None:
    """Refuse a study file that is not an Optuna study, reading it only (Optuna would add its tables to any
    SQLite file, and fail on other files)."""
    tables: set[str] = set()
    if path.is_file():
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError:
            pass
    if not {"studies", "trials", "version_info"} <= tables:
        raise ConfigError(f"{path} is not an Optuna study (written by `lmforge sweep`); resume the directory of a "
                          f"sweep, or start a new one with another --out")


# ------------------------------------------------------------------------------------------------- the workers
def finished(study: Any) -> list[Any]:
    """Trials that count towards the target: complete, pruned, or failed on their own config (not interrupted)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and "error" in t.user_attrs)]


def work(sweep: Sweep, threads: int, *, worker: int = 0, deadline: Optional[float] = None,
         on_trial: Optional[Callable[[Any], None]] = None) -> bool:
    """Run trials until the sweep has its trials (or `deadline`, a time.time(), passes); `threads` torch threads
    per trial. on_trial(study) after each. Returns False when a signal stopped a trial (Ctrl-C, SIGTERM)."""
    import numpy as np
    from optuna.trial import TrialState

    # a new seed per worker and per start: a resumed sweep must not draw its first trials' parameters again
    started = len(sweep.load_study().trials)
    study = sweep.load_study(seed=int(np.random.SeedSequence([sweep.seed, worker, started]).generate_state(1)[0]))
    while True:
        with sweep.lock():
            recover_dead_trials(study)
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if len(finished(study)) + len(running) >= sweep.trials or (deadline and time.time() >= deadline):
                return True
            trial = study.ask()
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
        completed = run_trial(sweep, study, trial, threads)
        if on_trial is not None:
            on_trial(study)
        if not completed:
            return False


def recover_dead_trials(study: Any) -> list[int]:
    """Fail the running trials whose worker on this machine has died (kill -9, a crash, a power cut) and queue
    each one's continuation: the same parameters, trained on from its run directory's newest checkpoint."""
    from optuna.trial import TrialState

    host, dead = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and not _alive(int(t.user_attrs.get("pid", -1))):
            study.tell(t.number, state=TrialState.FAIL)
            queue_continuation(study, t)
            dead.append(t.number)
    return dead


def queue_continuation(study: Any, trial: Any) -> None:
    study.enqueue_trial(trial.params, user_attrs={"continues": run_number(trial)})


def run_number(trial: Any) -> int:
    """The number of the trial whose run directory `trial` trains in (a continuation uses its original's)."""
    return int(trial.user_attrs.get("continues", trial.number))


def trial_dir(sweep: Sweep, number: int) -> Path:
    return sweep.dir / TRIALS / f"trial-{number:04d}"


class ReportEvaluations:
    """The Trainer's on_eval hook for one trial: report the objective's measurement, stop the run when pruned."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.pruned_at: Optional[int] = None

    def __call__(self, step: int, measured: dict[str, float]) -> None:
        from lmforge.train.trainer import StopTraining

        if self.metric not in measured:  # a task metric measured every few evaluations only
            return
        self.trial.report(float(measured[self.metric]), step)
        if self.trial.should_prune():
            self.pruned_at = step
            raise StopTraining(f"pruned by the sweep (trial {self.trial.number}, {self.metric} "
                               f"{measured[self.metric]:.4f} at step {step})")


def run_trial(sweep: Sweep, study: Any, trial: Any, threads: int) -> bool:
    """Train one trial in its run directory and tell Optuna how it ended; False if a signal stopped it."""
    from optuna.trial import TrialState

    from lmforge.train.trainer import Trainer

    values = sample(trial, sweep.params, sweep.base)
    run_dir = trial_dir(sweep, run_number(trial))
    trial.set_user_attr("run_dir", str(run_dir))
    own = int(sweep.base["train"]["num_threads"])
    settings = {**values, "train.run_dir": str(run_dir), "train.resume": "auto",
                "train.num_threads": min(own, threads) if own else threads}
    hook, log, started = ReportEvaluations(trial, sweep.metric), io.StringIO(), time.time()
    record: dict[str, Any] = {"number": trial.number, "run_number": run_number(trial), "params": values,
                              "metric": sweep.metric}
    try:
        config = run_config_from_dict(apply_values(sweep.base, settings))
        with contextlib.redirect_stdout(log):  # the trainer's lines go to RUN_DIR/train.log, not over the bar
            summary = Trainer(config, progress=False, tensorboard=False, on_eval=hook).fit()
    except LmforgeError as e:  # a refused combination (n_embd not a multiple of n_head), a non-finite loss
        trial.set_user_attr("error", str(e))
        study.tell(trial, state=TrialState.FAIL)
        _write_record(run_dir, log, {**record, "state": "failed", "error": str(e)})
        return True
    steps, max_steps = summary["steps"], config.train.max_steps
    trial.set_user_attr("steps", steps)
    trial.set_user_attr("max_steps", max_steps)
    trial.set_user_attr("seconds", round(time.time() - started, 1))
    record.update(steps=steps, max_steps=max_steps, stopped_by=summary["stopped_by"])
    if summary["stopped_by"] in SIGNALS:  # Ctrl-C / SIGTERM: checkpointed; the continuation trains on from it
        study.tell(trial, state=TrialState.FAIL)
        queue_continuation(study, trial)
        _write_record(run_dir, log, {**record, "state": "interrupted"})
        return False
    if hook.pruned_at is not None:
        study.tell(trial, state=TrialState.PRUNED)
        _write_record(run_dir, log, {**record, "state": "pruned", "pruned_at_step": hook.pruned_at})
        return True
    value = summary["best"]["value"]  # train.best_metric's best measurement: the best checkpoint holds it
    if value is None:
        trial.set_user_attr("error", f"no {sweep.metric} was measured")
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, float(value))
    _write_record(run_dir, log, {**record, "state": "complete" if value is not None else "failed", "value": value})
    return True


def _write_record(run_dir: Path, log: io.StringIO, record: dict[str, Any]) -> None:
    """RUN_DIR/trial.json (the sweep's verdict on this run) and RUN_DIR/train.log (appended over continuations)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    old = (run_dir / "train.log").read_text(encoding="utf-8") if (run_dir / "train.log").is_file() else ""
    atomic_write_text(run_dir / "train.log", old + log.getvalue())
    atomic_write_text(run_dir / "trial.json", json.dumps(record, indent=1))


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (a zombie counts as alive until its parent reaps it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
