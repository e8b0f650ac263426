"""Running a sweep: N worker processes on this machine sharing the study, a progress bar over trials.

Each worker trains with cores / N torch threads (train.num_threads, or fewer if the config asks for fewer), so
the workers do not fight over the cores. One worker runs in this process; more run as child processes that die
with it (a kill -9 of the sweep leaves no orphan training on), while this process shows the progress bar.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from typing import Any, Optional

from tqdm.auto import tqdm

from lmforge.errors import ConfigError, LmforgeError
from lmforge.sweep.study import Sweep, finished, load_sweep, work

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_sweep(sweep: Sweep, *, workers: int = 1, timeout: Optional[float] = None, progress: bool = True) -> bool:
    """Run the sweep's missing trials with `workers` processes, for at most `timeout` seconds of new trials
    (a running trial finishes). Returns False when Ctrl-C or SIGTERM stopped it (resume with --resume)."""
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give a positive number of worker processes")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"--timeout {timeout}: give a positive number of seconds")
    threads = max(1, cores() // workers)
    deadline = time.time() + timeout if timeout else None
    bar = TrialBar(sweep, enabled=progress)
    bar.update(sweep.load_study())  # a resumed sweep starts where it was
    try:
        if workers == 1:
            return work(sweep, threads, deadline=deadline, on_trial=bar.update)
        return _run_processes(sweep, workers, threads, deadline, bar)
    finally:
        bar.close()


def _run_processes(sweep: Sweep, workers: int, threads: int, deadline: Optional[float], bar: "TrialBar") -> bool:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited torch threads or locks
    procs = [context.Process(target=worker_main, args=(str(sweep.dir), threads, i, deadline), daemon=False)
             for i in range(workers)]
    for p in procs:
        p.start()
    study = sweep.load_study()
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=2.0 / workers)  # waits on the children, then refreshes the bar
            bar.update(study)
    except KeyboardInterrupt:  # the children got the same SIGINT: each checkpoints its trial and stops
        for p in procs:
            p.join()
        return False
    bar.update(study)
    codes = [p.exitcode for p in procs]
    if any(code == 2 for code in codes):
        raise ConfigError(f"a sweep worker stopped on an error (exit codes {codes}); see the line it printed above")
    return all(code == 0 for code in codes)


def worker_main(sweep_dir: str, threads: int, worker: int, deadline: Optional[float]) -> None:
    """A worker process: dies with its parent, runs trials, exits 0 (done), 130 (stopped by a signal) or 2."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        done = work(load_sweep(sweep_dir), threads, worker=worker, deadline=deadline)
    except LmforgeError as e:
        print(f"lmforge sweep: worker {worker}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0 if done else 130)


class TrialBar:
    """tqdm over finished trials: best value so far, pruned and failed counts; tqdm gives the ETA."""

    def __init__(self, sweep: Sweep, enabled: bool = True) -> None:
        self.sweep = sweep
        self.bar = tqdm(total=sweep.trials, unit="trial", dynamic_ncols=True, disable=not enabled)

    def update(self, study: Any) -> None:
        from optuna.trial import TrialState

        done = finished(study)
        values = [t.value for t in done if t.state == TrialState.COMPLETE]
        best = (min if self.sweep.direction == "minimize" else max)(values) if values else None
        self.bar.update(min(len(done), self.bar.total) - self.bar.n)
        self.bar.set_postfix(best=f"{best:.4f}" if best is not None else "-",
                             pruned=sum(t.state == TrialState.PRUNED for t in done),
                             failed=sum(t.state == TrialState.FAIL for t in done))

    def close(self) -> None:
        self.bar.close()
