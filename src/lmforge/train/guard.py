"""Steps that must not touch the weights: a non-finite loss or gradient, and (opt-in) loss spikes.

The trainer computes each step's global loss and asks `StepGuard.judge` before the optimizer runs:

    ok         the optimizer steps
    nonfinite  NaN/Inf in the loss or a gradient: policy "stop" ends the run (NonFiniteStop, exit code 3,
               diagnostic JSON in the run directory); policy "skip" drops the step's gradients
    spike      the loss lies more than spike_zscore standard deviations above the mean of the last
               spike_window accepted losses: the step's gradients are dropped

The guard's state (the loss window and the skip counters) goes into every checkpoint, so a resumed run
judges exactly as an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Any

from lmforge.errors import LmforgeError


class NonFiniteStop(LmforgeError):
    """Training stopped on a NaN/Inf loss or gradient (train.nonfinite = stop). Exit code 3."""

    exit_code = 3


class StepGuard:
    """Judges each step from its global loss; policy: stop | skip; spike_zscore 0 turns spike skipping off."""

    def __init__(self, policy: str = "stop", spike_zscore: float = 0.0, spike_window: int = 100) -> None:
        self.policy = policy
        self.spike_zscore = spike_zscore
        self.spike_window = spike_window
        self.recent: list[float] = []  # losses of the last accepted steps, oldest first
        self.skipped_nonfinite = 0
        self.skipped_spike = 0

    def judge(self, loss: float, finite: bool) -> str:
        """'ok', 'nonfinite' or 'spike' for a step whose global loss is `loss` (finite: loss and gradients)."""
        if not finite:
            if self.policy == "skip":
                self.skipped_nonfinite += 1
            return "nonfinite"
        if self.spike_zscore > 0 and len(self.recent) >= self.spike_window:
            mean = math.fsum(self.recent) / len(self.recent)
            std = math.sqrt(math.fsum((x - mean) ** 2 for x in self.recent) / len(self.recent))
            if std > 0 and (loss - mean) / std > self.spike_zscore:
                self.skipped_spike += 1
                return "spike"
        self.recent.append(loss)
        del self.recent[:-self.spike_window]
        return "ok"

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe (floats survive JSON exactly)."""
        return {"recent": list(self.recent), "skipped_nonfinite": self.skipped_nonfinite,
                "skipped_spike": self.skipped_spike}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = [float(x) for x in state.get("recent", [])][-self.spike_window:]
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        self.skipped_spike = int(state.get("skipped_spike", 0))
