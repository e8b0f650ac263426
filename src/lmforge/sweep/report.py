"""What a sweep leaves for its reader: best.yaml, trials.csv, a summary table and PNG plots.

    best.yaml      the best trial's resolved run config: `lmforge train --config SWEEP/best.yaml` trains it again
                   (same seed, data, threads) and measures the same value, bit for bit
    trials.csv     one row per trial: number, state, value, steps run, max_steps, seconds, run directory, parameters
    history.png, importances.png, parallel.png     Optuna's optimisation history, parameter importances (fANOVA)
                   and parallel coordinates
    curves.png     every trial's val curve of the objective on one chart: completed solid, pruned dashed and
                   ending in a cross, the best thick
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml

from lmforge.files import atomic_path, atomic_write_text
from lmforge.sweep.study import Sweep, finished, run_number, trial_dir


def report(sweep: Sweep, plots: bool = True) -> dict[str, Any]:
    """Write best.yaml, trials.csv (and the plots); return the summary: counts, best trial, steps saved."""
    from optuna.trial import TrialState

    study = sweep.load_study()
    trials = study.get_trials(deepcopy=False)
    done = finished(study)
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    best = (min if sweep.direction == "minimize" else max)(complete, key=lambda t: t.value) if complete else None
    full = sum(int(t.user_attrs.get("max_steps", 0)) for t in done if "steps" in t.user_attrs)
    run = sum(int(t.user_attrs.get("steps", 0)) for t in done)
    summary = {"trials": len(done), "target": sweep.trials, "complete": len(complete),
               "pruned": sum(t.state == TrialState.PRUNED for t in done),
               "failed": sum(t.state == TrialState.FAIL for t in done), "steps_run": run, "steps_full": full,
               "steps_saved": full - run, "metric": sweep.metric, "direction": sweep.direction,
               "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params,
                                                  "run_dir": best.user_attrs.get("run_dir")}}
    atomic_write_text(sweep.dir / "trials.csv", trials_csv(trials))
    if best is not None:
        write_best(sweep, best)
    if plots:
        summary["plots"] = write_plots(sweep, study, best)
    return summary


def trials_csv(trials: list[Any]) -> str:
    names = sorted({name for t in trials for name in t.params})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["number", "state", "value", "steps", "max_steps", "seconds", "run_dir", *names])
    for t in trials:
        a = t.user_attrs
        writer.writerow([t.number, t.state.name.lower(), "" if t.value is None else repr(t.value), a.get("steps", ""),
                         a.get("max_steps", ""), a.get("seconds", ""), a.get("run_dir", ""),
                         *(t.params.get(n, "") for n in names)])
    return out.getvalue()


def write_best(sweep: Sweep, best: Any) -> Path:
    """SWEEP/best.yaml: the best trial's config as it trained (its run directory's config.yaml), training afresh
    into SWEEP/best-run."""
    config = yaml.safe_load((trial_dir(sweep, run_number(best)) / "config.yaml").read_text(encoding="utf-8"))
    config["train"].update(run_dir=str(sweep.dir / "best-run"), resume="none")
    head = (f"# The best trial of {sweep.dir} (trial {best.number}, {sweep.metric} {best.value!r}).\n"
            f"# lmforge train --config {sweep.dir / 'best.yaml'}   trains it again and measures the same value.\n")
    path = sweep.dir / "best.yaml"
    atomic_write_text(path, head + yaml.safe_dump(config, sort_keys=False))
    return path


def summary_table(summary: dict[str, Any], trials: list[Any], top: int = 10) -> str:
    """The lines printed at the end of a sweep: the best `top` trials, the counts and what pruning saved."""
    from optuna.trial import TrialState

    reverse = summary["direction"] == "maximize"
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value, reverse=reverse)
    names = sorted({n for t in complete[:top] for n in t.params})
    lines = [f"{'trial':>5}  {summary['metric']:>10}  {'steps':>6}  " + "  ".join(names)]
    for t in complete[:top]:
        params = "  ".join(f"{_short(t.params.get(n, '-')):>{len(n)}}" for n in names)
        lines.append(f"{t.number:>5}  {t.value:>10.4f}  {t.user_attrs.get('steps', ''):>6}  {params}")
    full = summary["steps_full"]
    saved = f" ({summary['steps_saved'] / full:.0%})" if full else ""
    lines.append(f"{summary['trials']} of {summary['target']} trials finished: {summary['complete']} complete, "
                 f"{summary['pruned']} pruned, {summary['failed']} failed; pruning saved {summary['steps_saved']:,} "
                 f"of {full:,} steps{saved}")
    if summary["best"] is not None:
        lines.append(f"best: trial {summary['best']['number']}, {summary['metric']} {summary['best']['value']:.4f}, "
                     f"run {summary['best']['run_dir']}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------------- plots
def write_plots(sweep: Sweep, study: Any, best: Optional[Any]) -> list[str]:
    """The PNGs of the sweep; a plot Optuna cannot draw yet (too few complete trials) is left out, with a line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ov

    written = []
    with matplotlib.rc_context():  # Optuna's plots switch the global style: keep it to them
        written += _optuna_plots(sweep, study, plt, ov)
    written.append(str(plot_curves(sweep, study, best)))
    return written


def _optuna_plots(sweep: Sweep, study: Any, plt: Any, ov: Any) -> list[str]:
    written = []
    for name, draw in (("history", ov.plot_optimization_history), ("importances", ov.plot_param_importances),
                       ("parallel", ov.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
                warnings.simplefilter("ignore")
                ax = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            print(f"{name}.png left out: {e}")
            continue
        fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
        written.append(str(_save(fig, sweep.dir / f"{name}.png")))
        plt.close(fig)
    return written


def plot_curves(sweep: Sweep, study: Any, best: Optional[Any]) -> Path:
    """curves.png: each finished trial's measurements of the objective over steps, from its metrics.jsonl."""
    from matplotlib.figure import Figure
    from optuna.trial import TrialState

    from lmforge.train.metrics import read_metrics

    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    for t in finished(study):
        points = {r["step"]: r[sweep.metric] for r in read_metrics(trial_dir(sweep, run_number(t)))
                  if r.get("kind") == "eval" and isinstance(r.get(sweep.metric), (int, float))}
        if not points:
            continue
        steps = sorted(points)
        values = [points[s] for s in steps]
        if t.state == TrialState.PRUNED:
            ax.plot(steps, values, "--", color="tab:red", alpha=0.5, linewidth=1)
            ax.plot(steps[-1:], values[-1:], "x", color="tab:red", alpha=0.8)
        elif best is not None and t.number == best.number:
            ax.plot(steps, values, "-", color="tab:green", linewidth=2.5, label=f"best: trial {t.number}", zorder=3)
        else:
            ax.plot(steps, values, "-", color="tab:blue", alpha=0.6, linewidth=1)
    ax.plot([], [], "-", color="tab:blue", label="complete")
    ax.plot([], [], "--x", color="tab:red", label="pruned")
    ax.set_xlabel("step")
    ax.set_ylabel(sweep.metric)
    ax.set_title(f"{sweep.dir.name}: {sweep.metric} of every trial")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, sweep.dir / "curves.png")


def _save(fig: Any, out: Path) -> Path:
    with atomic_path(out) as tmp:  # the temporary name has no .png: say the format
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return out
