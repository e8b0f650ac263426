"""Where training numbers go: RUN_DIR/metrics.jsonl, TensorBoard events in RUN_DIR/tb, and progress: a tqdm
bar on a terminal, plain lines elsewhere (a log file, a pipe, CI), where a bar's redraws would pile up.

One JSON object per line, ``{"kind": "train" | "eval", "step": int, ...numbers}``, so a run can be
plotted or compared with nothing but ``json``. Only the process that writes (rank 0) opens anything;
the others get a logger whose methods do nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from tqdm.auto import tqdm

from lmforge.files import atomic_write_text


def keep_records_up_to(path: Path, step: int) -> None:
    """Drop the records of `path` after `step`, and any line torn by a kill, atomically.

    A resumed run continues from the checkpoint at `step` and redoes the steps after it: without their old
    records, metrics.jsonl reads as if the run had never stopped (one record per kind and step).
    """
    kept, dropped = [], False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped = dropped or bool(line.strip())
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped = True
            continue
        kept.append(line)
    if not dropped:
        return
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class MetricsLogger:
    """JSONL + TensorBoard + progress for one run.

    run_dir: the run directory; enabled: False on every rank but 0; total_steps: length of the progress
    bar; start_step: where a resumed run starts; tensorboard / progress: switch those sinks off (tests,
    `--no-progress`). Progress is a bar when stderr is a terminal; otherwise one plain line per `progress`
    call (`step 100/2000 loss 1.2340 tok/s 12,345 eta 0:01:05`) and one per evaluation, on stdout.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, total_steps: int = 0, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        self._bar: Optional[tqdm] = None
        self._lines = False  # plain progress lines instead of a bar
        self._total, self._start_step, self._t0 = total_steps, start_step, time.perf_counter()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            keep_records_up_to(path, start_step)
        self._jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        if progress and sys.stderr.isatty():
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        else:
            self._lines = progress

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        """Append one record of `kind` ('train' | 'eval') at `step` to every sink."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _json_number(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        if (self._bar is not None or self._lines) and kind == "eval":
            self.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Move the bar to `step` and show the latest loss and throughput (tqdm shows the ETA), or print them
        as one line with the ETA when there is no terminal."""
        if self._lines:
            done, left = step - self._start_step, self._total - step
            eta = round((time.perf_counter() - self._t0) / done * left) if done > 0 else 0
            print(f"step {step}/{self._total} loss {loss:.4f} tok/s {tokens_per_s:,.0f} "
                  f"eta {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}", flush=True)
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def info(self, line: str) -> None:
        """Print one line without breaking the progress bar (rank 0 only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self, aborted: bool = False) -> None:
        """Flush and close every sink. aborted: a KeyboardInterrupt (a second Ctrl-C) may have landed inside the
        TensorBoard writer while it held its queue's lock; closing it would then wait for that lock forever, so
        its writer thread (a daemon) is left to end with the process and only the JSONL file is closed."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None and not aborted:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._bar = self._tb = self._jsonl = None


def _json_number(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings rather than produce an unreadable file."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of RUN_DIR/metrics.jsonl, in order (a torn last line from a crash is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class Throughput:
    """Training tokens per second between two log points, leaving out the time spent evaluating and saving.

    Device work is asynchronous: `rate` must be called after something that waits for the device (reading
    the loss does), and `paused` waits for the device before it starts, so pending training work is
    counted as training.
    """

    def __init__(self, tokens_seen: int, device: torch.device) -> None:
        self.device = device
        self._start, self._tokens, self._paused = time.perf_counter(), tokens_seen, 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0

    def rate(self, tokens_seen: int) -> float:
        """Tokens per second since the last call (or construction); starts the next interval."""
        now = time.perf_counter()
        rate = (tokens_seen - self._tokens) / max(now - self._start - self._paused, 1e-9)
        self._start, self._tokens, self._paused = now, tokens_seen, 0.0
        return rate
