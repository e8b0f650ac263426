"""Checkpoints inside a run directory: names, listing, which one a reader uses, cleaning up, pruning, free space.

    RUN_DIR/checkpoints/step-00000100/     checkpoint_name(100); complete once it holds manifest.json

Every reader (train --resume, eval, generate, serve, export) resolves a run directory the same way, through
`verified_checkpoint`: its newest checkpoint that passes verification, a corrupt newer one skipped with one line
on stderr saying which and why. A checkpoint directory given explicitly that fails verification is an error.
Leftovers of interrupted saves (hidden .tmp- and .trash- directories) are removed by `clean_interrupted_saves`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from lmforge.checkpoint.manifest import MANIFEST, SHARD_INDEX, refuse_pickles, verify_checkpoint
from lmforge.errors import CheckpointError
from lmforge.files import fsync_path

CHECKPOINTS = "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(path: Path) -> Optional[int]:
    if not path.name.startswith("step-"):
        return None
    try:
        return int(path.name[len("step-"):])
    except ValueError:
        return None


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run that have a manifest, oldest first (by step)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if p.is_dir() and (s := _step_of(p)) is not None
             and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None (what `resume: auto` continues from)."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def newest_intact_checkpoint(run_dir: str | Path, warn: bool = True) -> tuple[Optional[Path], Optional[dict]]:
    """(the newest complete checkpoint of a run that passes verify_checkpoint, its manifest), or (None, None) when
    the run has no complete checkpoint.

    The one fallback rule of every reader (train --resume auto, eval, generate, serve, export): a newer checkpoint
    that fails verification (corrupt, truncated, missing file) is skipped with one line on stderr naming it and
    why (`warn=False` keeps quiet, e.g. on all but one process of a distributed run). CheckpointError when every
    complete checkpoint fails.
    """
    failures: list[CheckpointError] = []
    for ckpt in reversed(complete_checkpoints(run_dir)):
        try:
            manifest = verify_checkpoint(ckpt)
        except CheckpointError as e:
            failures.append(e)
            continue
        for e in failures if warn else []:
            print(f"warning: {e}; skipping it, using {ckpt}", file=sys.stderr, flush=True)
        return ckpt, manifest
    if failures:
        raise CheckpointError(f"no intact checkpoint in {run_dir}: all {len(failures)} fail verification, the newest "
                              f"because {failures[0]}")
    return None, None


def verified_checkpoint(path: str | Path, warn: bool = True) -> tuple[Path, dict]:
    """(checkpoint directory, its manifest) for a run directory, its checkpoints/ folder or a checkpoint directory.

    A run directory gives its newest intact checkpoint (newest_intact_checkpoint: a corrupt newer one is skipped
    with one line on stderr); a checkpoint directory gives itself, and an error if it fails verification.
    Raises CheckpointError if the path does not exist, holds no complete checkpoint, holds a pickle file
    instead of one, or is a checkpoint directory whose save did not finish (no manifest.json).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist; pass a run directory or RUN_DIR/checkpoints/step-N")
    if (p / MANIFEST).is_file():
        return p, verify_checkpoint(p)
    refuse_pickles(p)
    if _step_of(p) is not None or (p / "model.safetensors").exists() or (p / SHARD_INDEX).exists():
        raise CheckpointError(f"checkpoint {p} is incomplete (no {MANIFEST}: the save was interrupted); "
                              f"pass the run directory to use its newest complete checkpoint")
    ckpt, manifest = newest_intact_checkpoint(p.parent if p.name == CHECKPOINTS else p, warn=warn)
    if ckpt is None or manifest is None:
        raise CheckpointError(f"no complete checkpoint in {p} (looked for {CHECKPOINTS}/step-*/{MANIFEST}); "
                              f"train first or pass a checkpoint directory")
    return ckpt, manifest


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory a reader uses for `path`, verified: see verified_checkpoint."""
    return verified_checkpoint(path)[0]


def clean_interrupted_saves(run_dir: str | Path) -> list[Path]:
    """Remove what interrupted saves left in RUN_DIR/checkpoints; return the removed paths (call on rank 0).

    A half-written ".tmp-*" directory is deleted. A ".trash-step-N-*" directory is the previous copy of a
    checkpoint being replaced: if the save died before its replacement was renamed into place, it is the
    newest complete copy of step N and is moved back; otherwise it is deleted.
    """
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        if not path.is_dir() or not path.name.startswith((".tmp-", ".trash-")):
            continue
        if path.name.startswith(".trash-"):
            name = path.name[len(".trash-"):].rsplit("-", 1)[0]
            if (path / MANIFEST).is_file() and not (root / name).exists():
                os.rename(path, root / name)
                fsync_path(root)
                continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(run_dir: str | Path, bytes_per_checkpoint: int, keep_last: int, keeps_best: bool) -> None:
    """Raise CheckpointError unless RUN_DIR's filesystem has room for every checkpoint that can exist at once:
    the newest keep_last, the one being written before pruning, and (when `keeps_best`: the run evaluates
    before its last step) the best by train.best_metric, which pruning keeps however old it is.

    Checkpoints already in the run count as room: pruning frees them as new ones arrive.
    """
    count = keep_last + 1 + keeps_best
    need = count * bytes_per_checkpoint
    existing = sum(f.stat().st_size for c in complete_checkpoints(run_dir) for f in c.iterdir() if f.is_file())
    free = free_bytes(Path(run_dir) / CHECKPOINTS)
    if free + existing < need:
        which = f"keep_last={keep_last}, the one being written" + (" and the best (train.best_metric)" if keeps_best
                                                                     else "")
        raise CheckpointError(f"{run_dir} has {_size(free)} free, but {count} checkpoints ({which}) of "
                              f"~{_size(bytes_per_checkpoint)} need {_size(need)}; free space, lower "
                              f"train.keep_last or choose another --run-dir")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def checkpoint_rank(state: dict[str, Any]) -> Optional[float]:
    """How good a checkpoint is, lower is better: its train.best_metric measured at its step (state.json 'score',
    written by the trainer; negated when higher is better), or its val loss (older checkpoints); None if unmeasured."""
    score = state.get("score")
    if isinstance(score, dict):
        value = score.get("value")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        return -float(value) if score.get("higher_is_better") else float(value)
    loss = state.get("val_loss")
    return float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None


def best_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The complete checkpoint of RUN_DIR with the best score (see checkpoint_rank; the older one on a tie, as the
    trainer counts only a strict improvement), or None if none was measured."""
    best, best_rank = None, math.inf
    for ckpt in complete_checkpoints(run_dir):
        try:
            rank = checkpoint_rank(json.loads((ckpt / "state.json").read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if rank is not None and rank < best_rank:
            best, best_rank = ckpt, rank
    return best


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints other than the newest `keep_last` and the best one (best_checkpoint), and
    leftovers of interrupted saves; return the deleted paths."""
    found = complete_checkpoints(run_dir)
    keep = set(found[-keep_last:])
    best = best_checkpoint(run_dir)
    if best is not None:
        keep.add(best)
    deleted = [c for c in found if c not in keep]  # never the newest: keep_last >= 1
    for path in deleted:
        shutil.rmtree(path)
    # half-written saves of a process that crashed (this process's own are renamed before it prunes)
    return deleted + clean_interrupted_saves(run_dir)
