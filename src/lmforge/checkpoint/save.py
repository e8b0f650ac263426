"""Writing a whole checkpoint, crash-consistently.

A save is written into a hidden sibling directory (every file fsynced, manifest.json last), which is fsynced and
renamed into place, and the parent directory is fsynced: a crash, a kill or a full disk leaves either the old
state or a complete new checkpoint, and a directory without manifest.json never counts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from lmforge.checkpoint.faults import fault_point
from lmforge.checkpoint.layout import CHECKPOINTS, checkpoint_name, latest_checkpoint
from lmforge.checkpoint.manifest import FORMAT, MANIFEST, _one_line, expected_files
from lmforge.checkpoint.optimizer import optimizer_to_tensors
from lmforge.checkpoint.weights import save_weights
from lmforge.config import RunConfig, to_dict
from lmforge.errors import CheckpointError
from lmforge.files import disk_full, fsync_path, replace_dir, sha256_file

def _write_json(path: Path, obj: Any) -> None:
    """A file of the temporary checkpoint directory (fsynced by the caller; the directory is renamed whole)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    config: RunConfig, train_state: dict, tokenizer_file: Optional[str | Path] = None,
                    whole: Optional[tuple[dict, Optional[dict]]] = None) -> Path:
    """Write RUN_DIR/checkpoints/step-<step>/ atomically and return its path (call on rank 0 only).

    whole: for a sharded model (apply_fsdp), its and its optimizer's state dicts as distributed.full_state gathered
    them to rank 0; the files are then the same as one process writes.
    train_state: JSON-safe dict (step, tokens_seen, rng, data, val_loss, ...) stored in state.json
    together with the resolved config; "ranks" in it exactly when an optimizer is saved (expected_files).
    tokenizer_file: copied in as tokenizer.json when given, its sha256 recorded as state "tokenizer_sha256".
    Every file is fsynced, the manifest is written last, the directory is put in place by
    lmforge.files.replace_dir (a copy of the same step is deleted only after) and its parent fsynced.
    If anything fails (a full disk: ENOSPC) the partial directory is removed, the previous checkpoints
    are untouched, and CheckpointError says what happened.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    resolved = to_dict(config)
    state = {"format": FORMAT, "step": step, **train_state, "config": resolved,
             "tokenizer_sha256": None if tokenizer_file is None else sha256_file(Path(tokenizer_file))}
    writes = {"model.safetensors", "state.json", "config.json",
              *(["optimizer.safetensors"] if optimizer is not None else []),
              *(["tokenizer.json"] if tokenizer_file is not None else [])}
    if writes != set(expected_files(state)):  # a caller's bug: every reader would refuse this checkpoint
        raise ValueError(f"a checkpoint holding {sorted(writes)} needs train_state['ranks'] exactly when it holds an "
                         f"optimizer (see expected_files)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

        def written(name: str) -> None:
            fsync_path(tmp / name)
            fault_point(f"save:{name}", step)

        save_weights(model, tmp / "model.safetensors", whole[0] if whole else None)
        written("model.safetensors")
        if optimizer is not None:
            tensors, metadata = optimizer_to_tensors(optimizer, whole[1] if whole else None)
            save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=metadata)
            written("optimizer.safetensors")
        _complete_save(tmp, final, step, state, tokenizer_file)
    except (OSError, SafetensorError) as e:
        raise _save_failed(run_dir, final, tmp, e) from None
    return final


def _complete_save(tmp: Path, final: Path, step: int, state: dict, tokenizer_file: Optional[str | Path],
                   hashed: Optional[dict[str, dict]] = None) -> None:
    """Write the JSON files of a checkpoint into `tmp` (where its tensors are already), then its manifest (last),
    and rename it to `final`. hashed: {file: manifest entry} of files whose writers hashed them already."""
    def written(name: str) -> None:
        fsync_path(tmp / name)
        fault_point(f"save:{name}", step)

    _write_json(tmp / "state.json", state)
    written("state.json")
    _write_json(tmp / "config.json", state["config"])
    written("config.json")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        written("tokenizer.json")
    hashed = hashed or {}
    files = {f.name: hashed.get(f.name) or {"sha256": sha256_file(f), "bytes": f.stat().st_size}
             for f in sorted(tmp.iterdir())}
    _write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "files": files})  # last: completes the checkpoint
    fault_point("save:manifest", step)
    # Saving the same step again: the old copy moves to .trash-, where clean_interrupted_saves finds it
    # if the process dies before the new one is in place.
    replace_dir(tmp, final, trash=final.parent / f".trash-{final.name}-{os.getpid()}")
    fault_point("save:renamed", step)


def _save_failed(run_dir: str | Path, final: Path, tmp: Optional[Path], e: BaseException) -> CheckpointError:
    """The one-line error of a save that failed with `e`, after removing its temporary directory (if given)."""
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = latest_checkpoint(run_dir)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    if disk_full(e):
        return CheckpointError(f"no space left on the device while writing checkpoint {final}; {kept}; free "
                               f"space (or lower train.keep_last), then continue with --resume auto")
    return CheckpointError(f"cannot write checkpoint {final} ({_one_line(e)}); {kept}; fix the problem, then "
                           f"continue with --resume auto")
