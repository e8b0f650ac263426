"""Checkpoint directories: the one place that writes and reads them (train writes; generate and eval read).

    RUN_DIR/checkpoints/step-00000100/
        model.safetensors      weights (a tied embedding/LM head is stored once)
        optimizer.safetensors  AdamW moments (Muon's momentum) as named tensors "state.<param index>.<key>";
                               param groups and non-tensor state as JSON in the file's metadata
        state.json             step, tokens seen, RNG states (python/numpy/torch/cuda, one entry per rank),
                               data stream position, val loss, resolved config, tokenizer sha256
        config.json            the resolved RunConfig (what load_for_inference builds the model from)
        tokenizer.json         copied from the prepared data, so the directory alone can generate
        manifest.json          sha256 and size of every file above, written LAST

A sharded checkpoint (train.checkpoint_format sharded, under fsdp) holds model-rank{r}-of-{N}.safetensors and
optim-rank{r}-of-{N}.safetensors, each process's own rows, and shards.json in place of the two whole files
(save_sharded_checkpoint, load_sharded); readers outside training assemble it on one host.

A save is written into a hidden sibling directory (every file fsynced, manifest.json last), which is
fsynced and renamed into place, and the parent directory is fsynced: a crash, a kill or a full disk leaves
either the old state or a complete new checkpoint, and a directory without manifest.json never counts.
Leftovers of interrupted saves are removed by `clean_interrupted_saves`. Nothing is pickled: tensors go
through safetensors (each file's header is checked against its size before anything is allocated),
everything else through JSON; a pickle file planted under a checkpoint name is refused, never opened.

Every reader (train --resume, eval, generate, serve, export) resolves a run directory the same way, through
`verified_checkpoint`: its newest checkpoint that passes verification, a corrupt newer one skipped with one line
on stderr saying which and why. A checkpoint directory given explicitly that fails verification is an error.

Fault injection for tests (inert unless the environment variable LMFORGE_FAULT is set): see `fault_point`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from lmforge.config import RunConfig, run_config_from_dict, to_dict
from lmforge.distributed import (DistInfo, gather_objects, held_rows, is_sharded, load_full_state, load_local_state,
                                 local_state, optimizer_param_names, resolve_device, unwrap)
from lmforge.errors import CheckpointError, ConfigError
from lmforge.files import disk_full, fsync_path, replace_dir, sha256_file
from lmforge.lora import apply_lora, base_fingerprint, is_adapted, merge_lora, trained_state_dict

FORMAT = "lmforge-checkpoint-v1"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
# What a checkpoint may hold: tensors as safetensors, everything else as JSON. Nothing else is ever read.
SAFETENSORS_FILES = ("model.safetensors", "optimizer.safetensors")
JSON_FILES = ("state.json", "config.json", "tokenizer.json")
# A sharded checkpoint (train.checkpoint_format: sharded) holds, instead of the two safetensors files above, one
# model and one optimizer file per rank of the job that wrote it, and shards.json: which rows of which tensor each
# file holds (see save_sharded_checkpoint).
SHARD_INDEX = "shards.json"
SHARD_FILE = re.compile(r"(model|optim)-rank(\d+)-of-(\d+)\.safetensors")
MAX_SHARDS = 1 << 16
# Files that are (or usually are) Python pickles: loading one can run any code, so they are refused.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
MAX_JSON_BYTES = 256 << 20  # a state.json or tokenizer.json larger than this is not one lmforge wrote
MAX_HEADER_BYTES = 16 << 20  # safetensors headers of lmforge checkpoints are a few KB
FAULT_ENV = "LMFORGE_FAULT"


# ------------------------------------------------------------------------------------ fault injection
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


# --------------------------------------------------------------------------------------------- layout
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


def refuse_pickles(directory: Path) -> None:
    """Raise CheckpointError if `directory` holds a file named like a pickle (ckpt.pt, model.bin, ...).

    Such a file is never opened: unpickling runs whatever code the file names.
    """
    try:
        planted = sorted(f.name for f in directory.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    except OSError:
        return
    if planted:
        raise CheckpointError(f"{directory / planted[0]} looks like a pickle file, which lmforge never loads (unpickling "
                              f"can run any code); use a checkpoint written by lmforge train (safetensors + JSON)")


def _read_json(path: Path, what: str) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{what} {path} is larger than {MAX_JSON_BYTES >> 20} MiB; the checkpoint is corrupt, "
                                  f"use another one")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete, use another one") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError):
        raise CheckpointError(f"{what} {path} is not valid JSON; the checkpoint is corrupt, use another one") from None
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be read ({e.strerror or e}); use another checkpoint") from None


def verify_checkpoint(ckpt: str | Path) -> dict:
    """Check every file against manifest.json (size and sha256); return the manifest or raise CheckpointError.

    The error names the file: missing, truncated, corrupt, or a planted pickle.
    """
    ckpt = Path(ckpt)
    manifest = _read_json(ckpt / MANIFEST, "checkpoint manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{ckpt / MANIFEST} is not an {FORMAT} manifest; pass a checkpoint written by lmforge train")
    refuse_pickles(ckpt)
    if "state.json" not in manifest["files"]:  # it says which other files belong: see expected_files
        raise _unlisted(ckpt, "state.json", "every checkpoint's step and kind")
    for name, entry in manifest["files"].items():
        known = name in SAFETENSORS_FILES + JSON_FILES + (SHARD_INDEX,) or SHARD_FILE.fullmatch(name)
        if not known or not isinstance(entry, dict):
            raise CheckpointError(f"{ckpt / MANIFEST} lists {name!r}, which is not a checkpoint file lmforge writes; "
                                  f"the checkpoint is corrupt or tampered with, use another one")
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} listed in {MANIFEST} is missing; use another checkpoint")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} has {size} bytes, {MANIFEST} says "
                                  f"{entry.get('bytes')} (truncated?); delete it and use an earlier checkpoint")
        if sha256_file(f) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} does not match its sha256 in {MANIFEST}; "
                                  f"delete it and use an earlier checkpoint")
    state = _read_json(ckpt / "state.json", "checkpoint state")  # verified just above
    if not isinstance(state, dict):
        raise CheckpointError(f"{ckpt / 'state.json'} is not a JSON object; the checkpoint is corrupt, use another one")
    shards = state.get("shards")
    if shards is not None and not (type(shards) is int and 1 <= shards <= MAX_SHARDS):
        raise CheckpointError(f"{ckpt / 'state.json'} has a malformed 'shards' entry ({shards!r}); the checkpoint is "
                              f"corrupt, use another one")
    expected = expected_files(state)
    for name, why in expected.items():
        if name not in manifest["files"]:
            raise _unlisted(ckpt, name, why)
    for name in manifest["files"]:
        if name not in expected:
            raise CheckpointError(f"{ckpt / MANIFEST} lists {name}, which this kind of checkpoint does not hold "
                                  f"(see its state.json); the checkpoint is corrupt or tampered with, use another one")
    return manifest


def expected_files(state: dict) -> dict[str, str]:
    """{file: why it belongs} for a checkpoint whose state.json holds `state`: the one rule of which files a
    checkpoint of each kind holds, that save_checkpoint writes by and verify_checkpoint requires.

    Every kind (a full model, a LoRA run's adapters and heads, a classifier, a merged or an imported model) holds
    model.safetensors, config.json and state.json. A checkpoint train can resume (state "ranks": each process's
    RNG and data position) also holds optimizer.safetensors; one with a tokenizer (state "tokenizer_sha256")
    holds tokenizer.json. A sharded checkpoint (state "shards": N, the processes that wrote it) holds
    model-rank{r}-of-{N}.safetensors (and optim-rank{r}-of-{N}.safetensors) for every rank r, and shards.json,
    instead of the two whole files. A manifest without one of these would let that file load unverified.
    """
    files = {"config.json": "every checkpoint's model config", "state.json": "every checkpoint's step and kind"}
    shards = state.get("shards")
    if shards is None:
        files["model.safetensors"] = "every checkpoint's weights"
        if "ranks" in state:
            files["optimizer.safetensors"] = "a training checkpoint's optimizer state"
    else:
        files[SHARD_INDEX] = "a sharded checkpoint's index of rows"
        for rank in range(int(shards)):
            files[shard_file("model", rank, int(shards))] = f"rank {rank}'s rows of the weights"
            if "ranks" in state:
                files[shard_file("optim", rank, int(shards))] = f"rank {rank}'s rows of the optimizer state"
    if state.get("tokenizer_sha256"):
        files["tokenizer.json"] = "the tokenizer its state.json names"
    return files


def shard_file(kind: str, rank: int, world_size: int) -> str:
    """The file of a sharded checkpoint that holds rank `rank`'s rows: kind "model" (weights) or "optim"."""
    return f"{kind}-rank{rank}-of-{world_size}.safetensors"


def has_optimizer_state(manifest: dict) -> bool:
    """Whether a verified checkpoint's manifest lists optimizer state (whole or sharded): what train can resume."""
    return any(name == "optimizer.safetensors" or name.startswith("optim-rank") for name in manifest["files"])


def _unlisted(ckpt: Path, name: str, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {ckpt} is incomplete: {MANIFEST} does not list {name} ({why}), so it "
                           f"cannot be verified; use another checkpoint (a run directory falls back to its newest "
                           f"intact one)")


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors file's header against the file's size before anything is allocated.

    Returns the header (tensor name -> {dtype, shape, data_offsets}, plus "__metadata__"). Raises
    CheckpointError naming the file when the header is malformed, claims more bytes than the file has,
    or lets tensors overlap or leave gaps.
    """
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file ({why}); the checkpoint is corrupt, use another one")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise bad(f"header claims {n} bytes, the file has {size}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e}); use another checkpoint") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError):
        raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_bytes, spans = size - 8 - n, []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise bad("metadata is not a mapping of strings")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in _DTYPE_BYTES:
            raise bad(f"tensor {name!r} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < 2**40 for d in shape):
            raise bad(f"tensor {name!r} has an invalid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise bad(f"tensor {name!r} lies outside the file's {data_bytes} data bytes")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[entry["dtype"]]:
            raise bad(f"tensor {name!r} of shape {shape} does not fill its {offsets[1] - offsets[0]} bytes")
        spans.append(offsets)
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise bad("tensors overlap or leave gaps")
        end = stop
    if end != data_bytes:
        raise bad(f"tensors cover {end} of {data_bytes} data bytes")
    return header


# ------------------------------------------------------------------------------------ RNG as JSON
def capture_rng() -> dict:
    """This process's RNG states (python, numpy global, torch CPU, every CUDA device) as JSON-safe lists."""
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    """Put back what capture_rng returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])


# ----------------------------------------------------------------------------- optimizer as tensors
def optimizer_to_tensors(optimizer: torch.optim.Optimizer, sd: Optional[dict] = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimizer's state dict (`sd`, as distributed.full_state gathers it for a sharded model, else
    optimizer.state_dict()): tensors named "state.<index>.<key>", the rest as JSON metadata."""
    sd = optimizer.state_dict() if sd is None else sd
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    metadata = {"format": "lmforge-optimizer-v1", "param_groups": json.dumps(sd["param_groups"]),
                "scalars": json.dumps(scalars)}
    return tensors, metadata


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, path: Path, model: Optional[nn.Module] = None) -> None:
    """Restore `optimizer` from a file written from optimizer_to_tensors (param groups must match in shape).

    Every tensor is checked against the parameter it belongs to; raises CheckpointError naming the file.
    `model`: the model a sharded optimizer steps (apply_fsdp): each process then keeps its shard of the state.
    """
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({_one_line(e)}); the checkpoint is corrupt, use another one") from None
    state, saved_groups = _optimizer_state(optimizer, path, tensors, metadata)
    try:
        if model is not None and is_sharded(model):
            load_full_state(model, None, optimizer, {"state": state, "param_groups": saved_groups})
        else:
            optimizer.load_state_dict({"state": state, "param_groups": saved_groups})
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise _unfit_optimizer(path, e) from None


def _unfit_optimizer(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} does not fit the optimizer ({_one_line(e)}); resume with the config the "
                           f"checkpoint was trained with")


def _optimizer_state(optimizer: torch.optim.Optimizer, path: Path, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str]) -> tuple[dict[int, dict[str, Any]], list[dict]]:
    """(state by parameter index, param groups) from an optimizer file's tensors ("state.<index>.<key>": tensors of
    the parameters' shapes, or meta-device stand-ins of them) and metadata, checked against `optimizer`; raises
    CheckpointError naming `path` when they are malformed or belong to another model."""
    if metadata.get("format") != "lmforge-optimizer-v1":
        raise CheckpointError(f"{path} is not an lmforge optimizer file; the checkpoint is corrupt")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        state: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
        for name, value in json.loads(metadata["scalars"]).items():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = value
        saved_groups = json.loads(metadata["param_groups"])
        shapes_fit = all(0 <= i < len(params) and all(
            not torch.is_tensor(v) or v.ndim == 0 or v.shape == params[i].shape for v in entry.values())
            for i, entry in state.items())
        groups_fit = isinstance(saved_groups, list) and len(saved_groups) == len(optimizer.param_groups) and all(
            isinstance(s, dict) and isinstance(s.get("params"), list) and len(s["params"]) == len(c["params"])
            for s, c in zip(saved_groups, optimizer.param_groups))
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError):
        raise CheckpointError(f"{path} has malformed optimizer metadata; the checkpoint is corrupt, use another one") from None
    if not (groups_fit and shapes_fit):
        raise CheckpointError(f"{path} holds optimizer state for a different model (parameter groups differ); "
                              f"resume with the config the checkpoint was trained with")
    for saved, now in zip(saved_groups, optimizer.param_groups):
        for key, value in now.items():  # JSON keeps tuples (AdamW's betas, Muon's ns_coefficients) as lists
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])
        for key in ("fused", "foreach", "capturable"):  # how to compute, not what: follow this machine
            if key in now:
                saved[key] = now[key]
    return state, saved_groups


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text[:400]


# -------------------------------------------------------------------------------------------- save
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


def checkpoint_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> int:
    """Estimated bytes of one checkpoint: the weights (a LoRA model's adapters and heads: saved_tensors), plus two
    AdamW moments per weight with an optimizer (an upper bound: Muon keeps one momentum per hidden matrix)."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in saved_tensors(model).values()}.values())
    return weights * (3 if optimizer is not None else 1) + (1 << 20)  # + JSON, tokenizer and headers


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


# ---------------------------------------------------------------------------- sharded checkpoints: read
# dtype name in shards.json -> (torch dtype, its safetensors code)
_SHARD_DTYPES = {"float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16"),
                 "float64": (torch.float64, "F64"), "int64": (torch.int64, "I64"), "int32": (torch.int32, "I32"),
                 "uint8": (torch.uint8, "U8"), "bool": (torch.bool, "BOOL")}


def checkpoint_shards(ckpt: str | Path) -> Optional[int]:
    """The number of processes that wrote a sharded checkpoint (its state.json "shards"), or None for a whole one."""
    shards = _read_json(Path(ckpt) / "state.json", "checkpoint state").get("shards")
    return shards if type(shards) is int else None


def read_shard_index(ckpt: str | Path) -> dict:
    """A sharded checkpoint's shards.json (see save_sharded_checkpoint), checked: every entry has a known dtype, a
    shape, and rows of ranks that exist which cover its dim 0 exactly once, in order. CheckpointError otherwise."""
    path = Path(ckpt) / SHARD_INDEX
    index = _read_json(path, "shard index")

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is malformed ({why}); the checkpoint is corrupt, use another one")

    if not isinstance(index, dict) or index.get("format") != "lmforge-shards-v1":
        raise bad("not an lmforge-shards-v1 index")
    n = index.get("world_size")
    if type(n) is not int or not 1 <= n <= MAX_SHARDS:
        raise bad(f"world_size {n!r}")
    for kind in ("model", "optim"):
        entries = index.get(kind, {})
        if not isinstance(entries, dict):
            raise bad(f"its {kind!r} entry is not a table")
        for name, entry in entries.items():
            shape, rows = (entry.get("shape"), entry.get("rows")) if isinstance(entry, dict) else (None, None)
            if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
                raise bad(f"{name} has no valid shape")
            if entry.get("dtype") not in _SHARD_DTYPES:
                raise bad(f"{name} has no known dtype")
            if not (isinstance(rows, list) and rows and all(isinstance(r, list) and len(r) == 3 and
                                                            all(type(x) is int for x in r) and 0 <= r[0] < n for r in rows)):
                raise bad(f"{name} has no valid rows")
            end = 0
            for _, start, stop in sorted(rows, key=lambda r: r[1]):
                if start != end or stop <= start:
                    raise bad(f"the rows of {name} overlap or leave gaps")
                end = stop
            if end != (shape[0] if shape else 1):
                raise bad(f"the rows of {name} cover {end} of its {shape[0] if shape else 1}")
    tied = index.get("tied", {})
    if not (isinstance(tied, dict) and all(isinstance(v, str) and v in index.get("model", {}) for v in tied.values())):
        raise bad("its 'tied' entry names weights it does not hold")
    return index


class ShardReader:
    """Rows of the tensors of one kind ("model" or "optim") of a sharded checkpoint. A rank's file is opened on first
    use (its header checked first) with safetensors' safe_open, which maps it: only the rows asked for are read."""

    def __init__(self, ckpt: str | Path, index: dict, kind: str):
        self.ckpt, self.kind, self.entries, self.world_size = Path(ckpt), kind, index.get(kind, {}), index["world_size"]
        self._files: dict[int, tuple[Any, dict]] = {}
        self._stack = ExitStack()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _file(self, rank: int) -> tuple[Any, dict]:
        if rank not in self._files:
            path = self.ckpt / shard_file(self.kind, rank, self.world_size)
            header = check_safetensors(path)
            try:
                self._files[rank] = (self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu")),
                                     header)
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"{path} cannot be read ({_one_line(e)}); the checkpoint is corrupt, use "
                                      f"another one") from None
        return self._files[rank]

    def rows(self, name: str, span: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Rows span = (start, stop) of tensor `name` along dim 0 (None: the whole tensor), read from the files of
        the ranks that hold them. Shape (stop - start, *shape[1:])."""
        entry = self.entries[name]
        shape, (dtype, code) = entry["shape"], _SHARD_DTYPES[entry["dtype"]]
        start, stop = span if span is not None else (0, shape[0] if shape else 1)
        parts = []
        for rank, first, last in sorted(entry["rows"], key=lambda r: r[1]):
            lo, hi = max(start, first), min(stop, last)
            if lo >= hi:
                continue
            f, header = self._file(rank)
            held = header.get(name)
            want = [last - first, *shape[1:]] if shape else []
            if not isinstance(held, dict) or held.get("shape") != want or held.get("dtype") != code:
                raise CheckpointError(f"{self.ckpt / shard_file(self.kind, rank, self.world_size)} does not hold {name} "
                                      f"as {SHARD_INDEX} says ({code} {want}); the checkpoint is corrupt, use another one")
            parts.append(f.get_tensor(name) if not shape else f.get_slice(name)[lo - first: hi - first])
        if not shape:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty((0, *shape[1:]), dtype=dtype)


def read_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """{name: whole tensor} of a checkpoint's weights as stored (a tied weight under one of its names), from
    model.safetensors or assembled on this host from a sharded checkpoint's rows."""
    ckpt = Path(ckpt)
    if checkpoint_shards(ckpt) is not None:
        index = read_shard_index(ckpt)
        with ShardReader(ckpt, index, "model") as f:
            return {name: f.rows(name) for name in index["model"]}
    path = ckpt / "model.safetensors"
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({_one_line(e)}); the checkpoint is corrupt, use another one") from None


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


# -------------------------------------------------------------------------------------------- load
def read_run_config(ckpt: str | Path) -> RunConfig:
    """The resolved RunConfig stored in a checkpoint directory's config.json."""
    ckpt = Path(ckpt)
    raw = _read_json(ckpt / "config.json", "checkpoint config")
    try:
        return run_config_from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt / 'config.json'} does not hold a valid config: {e}") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as e:  # values of a type no config has
        raise CheckpointError(f"{ckpt / 'config.json'} does not hold a valid config ({type(e).__name__}); the "
                              f"checkpoint is corrupt, use another one") from None


def read_task(ckpt: str | Path) -> Optional[dict]:
    """The task a checkpoint was fine-tuned for, from its state.json: {"task": "sft", "template": {...}} (as
    data.tasks writes them), or None for a language model trained on text."""
    task = _read_json(Path(ckpt) / "state.json", "checkpoint state").get("task")
    if task is not None and not (isinstance(task, dict) and isinstance(task.get("task"), str)):
        raise CheckpointError(f"{Path(ckpt) / 'state.json'} holds a malformed 'task' entry; the checkpoint is "
                              "corrupt, use another one")
    return task


def saved_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of what model.safetensors holds for `model`: its state_dict, or for a model with LoRA
    adapters only what a LoRA run trains (lora.trained_state_dict: adapters and task heads; the frozen base is
    named by state.json's "base" instead)."""
    model = unwrap(model)
    return trained_state_dict(model) if is_adapted(model) else model.state_dict(keep_vars=True)


def tied_names(model: nn.Module) -> list[list[str]]:
    """The names of each tensor model.safetensors holds for `model`, grouped: a tied weight has several."""
    groups: dict[int, list[str]] = {}
    for name, tensor in saved_tensors(model).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def save_weights(model: nn.Module, path: Path, weights: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write model.safetensors: every weight (a tied one once), or a LoRA model's adapters and heads.

    weights: a sharded model's whole state dict (distributed.full_state); a tied weight is stored under the name
    safetensors' save_model keeps (the first in sorted order), so the file is the one a single process writes."""
    if weights is not None:
        groups = tied_names(model)
        tensors = {min(names): weights[min(names)].contiguous() for names in groups}
        tied = {name: min(names) for names in groups for name in names if name != min(names)}
        save_file(tensors, str(path), metadata={**tied, "format": "lmforge-model-v1"})
        return
    if not is_adapted(unwrap(model)):
        save_model(unwrap(model), str(path), metadata={"format": "lmforge-model-v1"})
        return
    tensors = {k: v.detach().contiguous() for k, v in saved_tensors(model).items()}
    save_file(tensors, str(path), metadata={"format": "lmforge-lora-v1"})


def load_weights(model: nn.Module, ckpt: str | Path, device: torch.device | str = "cpu") -> None:
    """Load model.safetensors of `ckpt` into `model` (names and shapes must match exactly; a model with LoRA
    adapters loads only its adapters and heads, the base weights it holds stay)."""
    if checkpoint_shards(ckpt) is not None:
        load_sharded(ckpt, model)
        return
    path = Path(ckpt) / "model.safetensors"
    check_weights_fit(model, Path(ckpt))
    if is_adapted(unwrap(model)):
        with torch.no_grad(), safe_open(str(path), framework="pt", device="cpu") as f:
            for name, tensor in saved_tensors(model).items():
                tensor.copy_(f.get_tensor(name))
        return
    try:
        if is_sharded(model):  # every process reads the whole file and keeps its shard
            with safe_open(str(path), framework="pt", device="cpu") as f:
                stored = {name: f.get_tensor(name) for name in f.keys()}
            load_full_state(model, {name: stored[next(n for n in names if n in stored)]
                                    for names in tied_names(model) for name in names})
            return
        load_model(unwrap(model), str(path), strict=True, device=str(device))
    except (RuntimeError, OSError, SafetensorError, ValueError) as e:  # safetensors reports mismatches as RuntimeError
        raise CheckpointError(f"{path} does not fit the model: {_one_line(e)}") from None


def check_weights_fit(model: nn.Module, ckpt: Path) -> None:
    """Raise CheckpointError naming the differing tensors unless checkpoint `ckpt` holds exactly `model`'s weights.

    Reads only the safetensors header (validated against the file size), or a sharded checkpoint's shards.json;
    a tied weight may be stored under either of its names.
    """
    if checkpoint_shards(ckpt) is not None:
        path = ckpt / SHARD_INDEX
        stored = {k: tuple(v["shape"]) for k, v in read_shard_index(ckpt)["model"].items()}
    else:
        path = ckpt / "model.safetensors"
        stored = {k: tuple(v["shape"]) for k, v in check_safetensors(path).items() if k != "__metadata__"}
    if not is_adapted(unwrap(model)) and any(".lora." in k for k in stored):
        raise CheckpointError(f"{path} holds LoRA adapters, not a whole model: `lmforge merge` its run into a full "
                              f"checkpoint first, and use that")
    shapes = {name: tuple(tensor.shape) for name, tensor in saved_tensors(model).items()}
    missing = [names[0] for names in tied_names(model) if not any(n in stored for n in names)]
    unexpected = sorted(k for k in stored if k not in shapes)
    differ = sorted(k for k in stored if k in shapes and stored[k] != shapes[k])
    if missing or unexpected or differ:
        parts = [f"missing {', '.join(missing[:4])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:4])}" if unexpected else "",
                 "shapes differ (checkpoint vs model): " + ", ".join(f"{k} {stored[k]} vs {shapes[k]}" for k in differ[:4])
                 if differ else ""]
        raise CheckpointError(f"{path} does not fit the model: {'; '.join(p for p in parts if p)}; use the config the "
                              f"checkpoint was trained with")


def load_training_state(ckpt: str | Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                        device: torch.device | str = "cpu", manifest: Optional[dict] = None) -> dict:
    """Load weights and optimizer state of `ckpt` in place and return its state.json (for resume).

    Verifies every file against the manifest first, unless the caller passes the manifest that
    verify_checkpoint already returned.
    """
    ckpt = Path(ckpt)
    manifest = manifest if manifest is not None else verify_checkpoint(ckpt)
    if checkpoint_shards(ckpt) is not None:
        load_sharded(ckpt, model, optimizer)
        return _read_json(ckpt / "state.json", "checkpoint state")
    load_weights(model, ckpt, device)
    if optimizer is not None and "optimizer.safetensors" in manifest["files"]:
        load_optimizer_tensors(optimizer, ckpt / "optimizer.safetensors", model)
    return _read_json(ckpt / "state.json", "checkpoint state")


def load_body_weights(model: nn.Module, ckpt: str | Path, device: torch.device | str = "cpu") -> None:
    """Start a classifier (model.head: classify) from a language model checkpoint of the same body.

    Every stored tensor loads except the LM head: lm_head.weight is dropped (when tied to the embedding it is
    stored once, under that name, and then becomes tok_emb.weight); classifier.weight keeps its fresh
    initialisation. Verifies the checkpoint first; any other missing, extra or differently shaped tensor is a
    CheckpointError naming it.
    """
    ckpt = Path(ckpt)
    verify_checkpoint(ckpt)
    path = ckpt / "model.safetensors"
    tensors = read_weights(ckpt)
    if "tok_emb.weight" not in tensors and "lm_head.weight" in tensors:  # tied: stored under the head's name
        tensors["tok_emb.weight"] = tensors["lm_head.weight"]
    tensors.pop("lm_head.weight", None)
    own = unwrap(model).state_dict()
    missing = sorted(set(own) - set(tensors) - {"classifier.weight"})
    unexpected = sorted(set(tensors) - set(own))
    differ = sorted(k for k in tensors if k in own and tuple(tensors[k].shape) != tuple(own[k].shape))
    if missing or unexpected or differ:
        parts = [f"missing {', '.join(missing[:4])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:4])}" if unexpected else "",
                 f"shapes differ: {', '.join(differ[:4])}" if differ else ""]
        raise CheckpointError(f"{path} does not fit the classifier's body: {'; '.join(p for p in parts if p)}; start "
                              "from a language model with the same architecture")
    unwrap(model).load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False)


def check_data_tokenizer(ckpt: str | Path, data_tokenizer: Optional[str | Path]) -> None:
    """Refuse data (token shards or task examples) tokenized by another tokenizer than the checkpoint's: the same
    ids would stand for other text, and with an equal vocabulary size nothing else notices (a wrong loss, wrong
    bits per byte). The one check of every reader that pairs a checkpoint with data: train (init_from, resume)
    and eval. Compares the sha256 of the checkpoint's tokenizer.json with the data's tokenizer file; nothing to
    compare when either has none."""
    ckpt, theirs = Path(ckpt), Path(ckpt) / "tokenizer.json"
    if data_tokenizer is None or not Path(data_tokenizer).is_file() or not theirs.is_file():
        return
    if sha256_file(theirs) != sha256_file(Path(data_tokenizer)):
        raise CheckpointError(f"{ckpt} was trained with another tokenizer than {data_tokenizer}: the same ids mean "
                              f"other text; use data prepared with `lmforge prepare --tokenizer {theirs}` (or the "
                              f"data the model was trained on)")


def lora_base(ckpt: str | Path) -> dict:
    """The base a LoRA checkpoint was trained on, from its state.json: {"path": its checkpoint directory,
    "fingerprint": lora.base_fingerprint of its weights}."""
    base = _read_json(Path(ckpt) / "state.json", "checkpoint state").get("base")
    if not (isinstance(base, dict) and isinstance(base.get("path"), str) and isinstance(base.get("fingerprint"), str)):
        raise CheckpointError(f"{Path(ckpt) / 'state.json'} has no valid 'base' entry (path and fingerprint of the "
                              f"model the LoRA adapters were trained on); the checkpoint is corrupt, use another one")
    return base


def check_base(ckpt: str | Path, saved: dict, fingerprint: str, loaded_from: str | Path) -> None:
    """Refuse adapters of `ckpt` on a base other than the one they were trained on: CheckpointError naming both
    fingerprints unless `fingerprint` (of the base loaded from `loaded_from`) equals saved["fingerprint"]."""
    if fingerprint != saved["fingerprint"]:
        raise CheckpointError(f"{ckpt} holds LoRA adapters trained on the base {saved['path']} with fingerprint "
                              f"{saved['fingerprint'][:16]}, but the base loaded from {loaded_from} has fingerprint "
                              f"{fingerprint[:16]} (its weights changed); restore the original base at "
                              f"{saved['path']} (and train.init_from), or start a new run from this base")


def load_merged_lora(ckpt: str | Path, config: RunConfig) -> nn.Module:
    """The plain GPT a LoRA checkpoint stands for, on the CPU: its base (lora_base, refused if its fingerprint
    changed) with the checkpoint's adapters merged in and its heads loaded (lora.merge_lora)."""
    return merge_lora(load_adapted_lora(ckpt, config))


def load_adapted_lora(ckpt: str | Path, config: RunConfig) -> nn.Module:
    """A LoRA checkpoint's base (checked as load_merged_lora does) with its adapters applied, not merged, and
    its heads loaded, on the CPU: what the run trained, e.g. to export the adapters on their own."""
    from lmforge.model import GPT

    saved = lora_base(ckpt)
    if not Path(saved["path"]).exists():
        raise CheckpointError(f"{ckpt} holds LoRA adapters of the base {saved['path']}, which no longer exists; "
                              f"restore that base checkpoint to use them")
    base_ckpt = resolve_checkpoint(saved["path"])
    model = GPT(config.model)
    if config.model.head == "classify" and read_run_config(base_ckpt).model.head == "lm":  # as the trainer loaded it
        load_body_weights(model, base_ckpt)
    else:
        load_weights(model, base_ckpt, "cpu")
    check_base(ckpt, saved, base_fingerprint(model), base_ckpt)
    apply_lora(model, config.lora)
    load_weights(model, ckpt, "cpu")
    return model.eval()


def load_for_inference(path: str | Path, device: str | torch.device = "cpu",
                       manifest: Optional[dict] = None) -> tuple[nn.Module, Any, RunConfig]:
    """(model in eval mode on `device`, Tokenizer or None, RunConfig) from a run or checkpoint directory.

    Verifies every file's sha256 first; a run directory gives its newest intact checkpoint (verified_checkpoint).
    A caller that already verified the checkpoint directory `path` passes the manifest verification returned.
    The tokenizer is None only for checkpoints trained without prepared data (tests). A LoRA checkpoint gives
    its base with the adapters merged in (load_merged_lora): an ordinary GPT.
    """
    from lmforge.model import GPT

    ckpt, manifest = (Path(path), manifest) if manifest is not None else verified_checkpoint(path)
    config = read_run_config(ckpt)
    with torch.device("meta"):  # the shapes config.json describes, checked against the file before allocating
        shape = GPT(config.model)
        check_weights_fit(shape if config.lora is None else apply_lora(shape, config.lora), ckpt)
    device = resolve_device(device) if isinstance(device, str) else device
    if config.lora is None:
        model = GPT(config.model)
        load_weights(model, ckpt, "cpu")
    else:
        model = load_merged_lora(ckpt, config)
    model.to(device)
    model.eval()
    tokenizer = None
    if "tokenizer.json" in manifest["files"]:
        from lmforge.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
    return model, tokenizer, config
