"""Fault injection for tests (inert unless the environment variable LMFORGE_FAULT is set): see `fault_point`."""

from __future__ import annotations

import errno
import os
import signal
from typing import Optional

FAULT_ENV = "LMFORGE_FAULT"


def fault_point(point: str, step: Optional[int] = None, rank: int = 0) -> Optional[str]:
    """Test-only fault injection at a named point of a save or a training step; inert by default.

    LMFORGE_FAULT holds comma-separated rules ``POINT[@STEP][#RANK]=ACTION``; a rule matches when POINT
    equals `point` and its STEP / RANK (if given) equal `step` / `rank`. Actions:
      kill    SIGKILL this process right here (what a crash, an OOM kill or kill -9 does)
      freeze  SIGSTOP this process: it hangs with its connections open (a stuck peer)
      enospc  raise OSError(ENOSPC), as a full disk would
      nan     returned to the caller, which poisons the value it computes (points "loss" and "grad")
    Points: "save:<file>" after each file of a save is written, "save:manifest" after the manifest
    (before the rename that makes the checkpoint visible), "save:renamed" just after that rename,
    "step" at the start of a training step (STEP = the step being taken), "loss" in a step's forward,
    "grad" after its backward. Example: LMFORGE_FAULT="save:optimizer.safetensors@5=kill,loss@9#1=nan".
    Returns the matching action (None when nothing matches: always, unless LMFORGE_FAULT is set).
    """
    rules = os.environ.get(FAULT_ENV)
    if not rules:
        return None
    for rule in rules.split(","):
        target, _, action = rule.strip().partition("=")
        target, _, want_rank = target.partition("#")
        name, _, want_step = target.partition("@")
        if name != point or (want_step and (step is None or int(want_step) != step)) \
                or (want_rank and int(want_rank) != rank):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "freeze":  # alive but unresponsive, as a hung peer is (SIGCONT or SIGKILL ends it)
            os.kill(os.getpid(), signal.SIGSTOP)
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected by {FAULT_ENV} at {point})")
        return action
    return None
