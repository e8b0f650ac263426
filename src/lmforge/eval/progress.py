"""The progress bar of an evaluation: tqdm on stderr, drawn only when asked (the `lmforge eval` command asks) and
only on a terminal, so the JSON on stdout, log files and pipes stay clean, and an evaluation inside training does
not draw over the training bar."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, unit: str, enabled: bool) -> tqdm:
    """A bar over `total` units (tokens, examples), or a silent one that counts nothing when not `enabled` or
    when stderr is not a terminal. Use it as a context manager and call update(n)."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=None if enabled else True)
