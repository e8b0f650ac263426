"""Learning-rate schedules: a pure function of the step, so a resumed run needs no scheduler state.

- cosine:   linear warm-up from 0 to lr, then half a cosine from lr down to min_lr at max_steps
            (Loshchilov & Hutter, SGDR, 2017; the nanoGPT/GPT-3 recipe).
- wsd:      warm-up, stable at lr, then a linear decay to min_lr over the last decay_fraction of the steps
            (Hu et al., MiniCPM, 2024: "warmup-stable-decay").
- constant: warm-up, then lr.
"""

from __future__ import annotations

import math
from typing import Callable

from lmforge.config import OptimConfig


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: (step + 1) / warmup_steps for the first warmup_steps steps (0-based), else 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based) of a run of `max_steps` steps."""
    lr, min_lr, warmup = optim.lr, optim.min_lr, optim.warmup_steps
    if step < warmup:
        return lr * warmup_factor(step, warmup)
    if optim.schedule == "constant":
        return lr
    if optim.schedule == "cosine":
        span = max(1, max_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    if optim.schedule == "wsd":
        decay_steps = int(round(optim.decay_fraction * max_steps))
        decay_start = max(warmup, max_steps - decay_steps)
        if step < decay_start or decay_steps == 0:
            return lr
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return lr + progress * (min_lr - lr)
    raise ValueError(f"unknown schedule {optim.schedule!r}")  # config validation makes this unreachable


def build_schedule(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """step -> learning rate, for the schedule named in the config."""
    return lambda step: lr_at(step, optim, max_steps)
