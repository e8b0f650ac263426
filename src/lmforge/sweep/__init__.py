"""Hyperparameter search: an Optuna study whose trials are ordinary `lmforge train` runs (`lmforge sweep`).

    space.py   the search space YAML: ranges, choices, fractions of other keys, conditionals; checked up front
    study.py   the sweep directory and its SQLite study; the worker loop, pruning hook, recovery after kill -9
    run.py     N worker processes with their share of the cores, and the progress bar over trials
    report.py  best.yaml, trials.csv, the summary table and the plots
"""

from lmforge.sweep.report import report, summary_table
from lmforge.sweep.run import run_sweep
from lmforge.sweep.study import Sweep, create_sweep, load_sweep

__all__ = ["Sweep", "create_sweep", "load_sweep", "report", "run_sweep", "summary_table"]
