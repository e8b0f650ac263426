"""Sharded checkpoints (train.checkpoint_format sharded, under fsdp): each process writes its own rows of the
weights and optimizer state to model-rank{r}-of-{N}.safetensors and optim-rank{r}-of-{N}.safetensors, rank 0
writes shards.json (save_sharded_checkpoint); load_sharded reads back only the rows each process now holds,
whatever the number of processes. Readers outside training assemble one on one host (weights.read_weights).
"""

from __future__ import annotations

import errno
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
from lmforge.checkpoint.layout import CHECKPOINTS, checkpoint_name
from lmforge.checkpoint.manifest import FORMAT, SHARD_INDEX, _one_line, expected_files, shard_file
from lmforge.checkpoint.optimizer import _optimizer_state, _unfit_optimizer, optimizer_to_tensors
from lmforge.checkpoint.save import _complete_save, _save_failed, _write_json
from lmforge.checkpoint.shard_index import ShardReader, read_shard_index
from lmforge.checkpoint.weights import check_weights_fit, tied_names
from lmforge.config import RunConfig, to_dict
from lmforge.distributed import (DistInfo, gather_objects, held_rows, is_sharded, load_local_state, local_state,
                                 optimizer_param_names, unwrap)
from lmforge.errors import CheckpointError
from lmforge.files import disk_full, fsync_path, sha256_file

def save_sharded_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                            config: RunConfig, train_state: dict, tokenizer_file: Optional[str | Path] = None,
                            info: DistInfo = DistInfo()) -> Path:
    """Write RUN_DIR/checkpoints/step-<step>/ with each process's own rows of the state; a collective: every process
    calls it (train_state, the tokenizer and the config matter on rank 0 only). Returns the checkpoint's path.

    Rank r of N writes what it holds (distributed.local_state: its rows along dim 0 of every sharded weight and
    AdamW moment) to model-rank{r}-of-{N}.safetensors and optim-rank{r}-of-{N}.safetensors; rank 0 also writes the
    tensors no process shards (AdamW's step counts). No process gathers anything but names and row counts. When
    every process has written and hashed its files, rank 0 writes shards.json:

        {"format": "lmforge-shards-v1", "world_size": N, "tied": {name: stored name},
         "model": {name: {"shape": [...], "dtype": "float32", "rows": [[rank, start, stop], ...]}},
         "optim": {"state.<index>.<key>": {...the same...}}, "param_groups": [...], "scalars": {...}}

    (rank r's file holds rows start:stop of the tensor's dim 0 under the tensor's name; a 0-d tensor is one
    entry [[rank, 0, 1]]), then state.json ("shards": N), config.json, tokenizer.json and the manifest of every
    file's sha256, last, and renames the directory into place as save_checkpoint does: a checkpoint exists only
    once every process's files are complete. A failure on any process (a full disk) is raised on every process
    as one CheckpointError and leaves the previous checkpoints as they were.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    n, rank = info.world_size, info.rank
    failure: Optional[BaseException] = None
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if info.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            failure = e
    made = gather_objects((str(tmp), _failure(failure)), info)[0]  # rank 0's directory, made before anyone writes
    tmp = Path(made[0])
    _raise_failed([made[1]], run_dir, final, tmp, info)

    weights, optim = local_state(model, optimizer)
    groups = tied_names(model)
    tensors = {"model": {min(names): weights[min(names)] for names in groups}}
    metadata: dict[str, str] = {}
    if optimizer is not None:
        tensors["optim"], metadata = optimizer_to_tensors(optimizer, optim)
    rows = held_rows({f"{kind}/{name}": t for kind, ts in tensors.items() for name, t in ts.items()})
    piece: dict[str, Any] = {"files": {}, "rows": {}}
    try:
        for kind, ts in tensors.items():
            mine = {}
            for name, t in ts.items():
                span = rows[f"{kind}/{name}"]
                if span is None and rank == 0:  # not sharded: rank 0 writes it whole
                    mine[name], span = t.detach().contiguous(), (0, t.shape[0] if t.ndim else 1)
                elif span is not None and span[0] < span[1]:
                    mine[name] = t.to_local().detach().contiguous()
                else:
                    continue
                piece["rows"][f"{kind}/{name}"] = list(span)
            file = shard_file(kind, rank, n)
            save_file(mine, str(tmp / file), metadata={"format": f"lmforge-{kind}-shard-v1"})
            fsync_path(tmp / file)
            piece["files"][file] = {"sha256": sha256_file(tmp / file), "bytes": (tmp / file).stat().st_size}
            fault_point(f"save:{file}", step, rank)
    except (OSError, SafetensorError) as e:
        failure = e
    pieces = gather_objects({**piece, "failure": _failure(failure)}, info)  # every process's files are complete
    _raise_failed([p["failure"] for p in pieces], run_dir, final, tmp, info)
    if info.is_main:
        try:
            index: dict[str, Any] = {"format": "lmforge-shards-v1", "world_size": n,
                                     "tied": {name: min(names) for names in groups for name in names if name != min(names)}}
            for kind, ts in tensors.items():
                index[kind] = {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                      "rows": [[r, *p["rows"][f"{kind}/{name}"]] for r, p in enumerate(pieces)
                                               if f"{kind}/{name}" in p["rows"]]} for name, t in ts.items()}
            if optimizer is not None:
                index["param_groups"] = json.loads(metadata["param_groups"])
                index["scalars"] = json.loads(metadata["scalars"])
            _write_json(tmp / SHARD_INDEX, index)
            fsync_path(tmp / SHARD_INDEX)
            state = {"format": FORMAT, "step": step, **train_state, "shards": n, "config": to_dict(config),
                     "tokenizer_sha256": None if tokenizer_file is None else sha256_file(Path(tokenizer_file))}
            writes = {f.name for f in tmp.iterdir()} | {"state.json", "config.json"} \
                | ({"tokenizer.json"} if tokenizer_file is not None else set())
            if writes != set(expected_files(state)):  # a caller's bug: every reader would refuse this checkpoint
                raise ValueError(f"a sharded checkpoint holding {sorted(writes)} needs train_state['ranks'] exactly "
                                 f"when it holds an optimizer (see expected_files)")
            _complete_save(tmp, final, step, state, tokenizer_file,
                           hashed={name: entry for p in pieces for name, entry in p["files"].items()})
        except (OSError, SafetensorError) as e:
            failure = e
    _raise_failed([gather_objects(_failure(failure), info)[0]], run_dir, final, tmp, info)
    return final


def _failure(e: Optional[BaseException]) -> Optional[tuple[str, bool]]:
    """What one process tells the others of its failed part of a save: (one line, whether the disk is full)."""
    return None if e is None else (_one_line(e), disk_full(e))


def _raise_failed(failures: list[Optional[tuple[str, bool]]], run_dir: str | Path, final: Path, tmp: Path,
                  info: DistInfo) -> None:
    """Raise on every process the first failure any process reported (rank 0 removes the temporary directory)."""
    failed = next((f for f in failures if f is not None), None)
    if failed is not None:
        text, full = failed
        error = OSError(errno.ENOSPC, text) if full else OSError(text)
        raise _save_failed(run_dir, final, tmp if info.is_main else None, error)


def load_sharded(ckpt: str | Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Load a sharded checkpoint's weights (and optimizer state) into `model` (and `optimizer`), whatever the number
    of processes now: a sharded model's process reads only the rows it holds (distributed.held_rows, a collective)
    from the files of the ranks that wrote them; an unsharded model is assembled whole. CheckpointError naming the
    file when something does not fit."""
    ckpt = Path(ckpt)
    check_weights_fit(model, ckpt)
    index = read_shard_index(ckpt)
    targets = unwrap(model).state_dict(keep_vars=True)
    rows = held_rows(targets)
    tied = index.get("tied", {})
    with ShardReader(ckpt, index, "model") as f:
        weights = {name: f.rows(name if name in index["model"] else tied[name], rows[name]) for name in targets}
    state: Optional[dict] = None
    if optimizer is not None and index.get("optim"):
        metadata = {"format": "lmforge-optimizer-v1", "param_groups": json.dumps(index.get("param_groups")),
                    "scalars": json.dumps(index.get("scalars", {}))}
        stand_ins = {name: torch.empty(entry["shape"], device="meta") for name, entry in index["optim"].items()}
        moments, groups = _optimizer_state(optimizer, ckpt / SHARD_INDEX, stand_ins, metadata)
        names = optimizer_param_names(model, optimizer)
        with ShardReader(ckpt, index, "optim") as f:
            for i, entry in moments.items():
                for key, value in entry.items():
                    if torch.is_tensor(value):  # a moment has its parameter's rows; a step count is whole
                        entry[key] = f.rows(f"state.{i}.{key}", rows[names[i]] if value.ndim else None)
        state = {"state": moments, "param_groups": groups}
    try:
        if is_sharded(model):
            load_local_state(model, weights, optimizer, state)
            return
        unwrap(model).load_state_dict(weights, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt} does not fit the model: {_one_line(e)}") from None
    if optimizer is not None and state is not None:
        try:
            optimizer.load_state_dict(state)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise _unfit_optimizer(ckpt / SHARD_INDEX, e) from None
