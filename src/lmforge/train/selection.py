"""Which checkpoint is the best, and when to stop early: one measurement (train.best_metric) followed over evaluations.

val_loss is better lower; the task metrics (classification accuracy and macro-F1, text-to-text BLEU, chrF,
ROUGE, exact match, token F1) are better higher. A measurement counts as an improvement only if it is strictly
better than every earlier one. With train.patience = P > 0, training stops after P measurements in a row without
an improvement. The tracker's state goes into every checkpoint, so a resumed run stops where the uninterrupted
one would, and each checkpoint records its own score, so pruning keeps the best one (checkpoint.py).
"""

from __future__ import annotations

from typing import Any, Optional

LOWER_IS_BETTER = frozenset({"val_loss"})


class BestTracker:
    """The best value of `metric` so far, the step it was measured at, and measurements since then."""

    def __init__(self, metric: str, patience: int = 0) -> None:
        self.metric = metric
        self.patience = patience
        self.higher_is_better = metric not in LOWER_IS_BETTER
        self.value: Optional[float] = None
        self.step: Optional[int] = None
        self.since = 0  # measurements since the best one

    def better(self, value: float) -> bool:
        """Whether `value` beats the best so far."""
        if self.value is None:
            return True
        return value > self.value if self.higher_is_better else value < self.value

    def update(self, step: int, measured: dict[str, float]) -> bool:
        """Take this evaluation's measurements; True if they improved the best. Evaluations that did not measure
        the metric (a task metric computed every few evaluations) change nothing."""
        if self.metric not in measured:
            return False
        value = float(measured[self.metric])
        if self.better(value):
            self.value, self.step, self.since = value, step, 0
            return True
        self.since += 1
        return False

    @property
    def exhausted(self) -> bool:
        """True once `patience` measurements in a row have not improved (never with patience 0)."""
        return self.patience > 0 and self.since >= self.patience

    def score(self, measured: dict[str, float]) -> dict[str, Any]:
        """What a checkpoint records of itself: {'metric', 'value' (None when not measured at its step),
        'higher_is_better'}; see checkpoint.checkpoint_rank."""
        value = measured.get(self.metric)
        return {"metric": self.metric, "value": None if value is None else float(value),
                "higher_is_better": self.higher_is_better}

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "step": self.step, "since": self.since}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run's tracking; a run that tracked another metric (or none: older checkpoints) starts over."""
        if state.get("metric") == self.metric:
            self.value, self.step, self.since = state.get("value"), state.get("step"), int(state.get("since") or 0)
