"""Checkpoint directories: the one place that writes and reads them (train writes; generate and eval read).

    RUN_DIR/checkpoints/step-00000100/
        model.safetensors      weights (a tied embedding/LM head is stored once)
        optimizer.safetensors  AdamW moments as named tensors "state.<param index>.<key>"; param groups
                               and non-tensor state as JSON in the file's metadata
        state.json             step, tokens seen, RNG states (python/numpy/torch/cuda, one entry per rank),
                               data stream position, val loss, resolved config, tokenizer sha256
        config.json            the resolved RunConfig (what load_for_inference builds the model from)
        tokenizer.json         copied from the prepared data, so the directory alone can generate
        manifest.json          sha256 and size of every file above, written LAST

A save is written into a hidden sibling directory and renamed into place, so a crash leaves either the
old state or a complete new checkpoint; a directory without manifest.json never counts. Nothing is
pickled: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from lmforge.config import RunConfig, run_config_from_dict, to_dict
from lmforge.distributed import resolve_device, unwrap
from lmforge.errors import CheckpointError, ConfigError

FORMAT = "lmforge-checkpoint-v1"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"


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


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (its newest complete checkpoint) or a checkpoint directory.

    Raises CheckpointError if the path does not exist, holds no complete checkpoint, or is a checkpoint
    directory whose save did not finish (no manifest.json).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist; pass a run directory or RUN_DIR/checkpoints/step-N")
    if (p / MANIFEST).is_file():
        return p
    if _step_of(p) is not None or (p / "model.safetensors").exists():
        raise CheckpointError(f"checkpoint {p} is incomplete (no {MANIFEST}: the save was interrupted); "
                              f"pass the run directory to use its newest complete checkpoint")
    run_dir = p.parent if p.name == CHECKPOINTS else p
    newest = latest_checkpoint(run_dir)
    if newest is None:
        raise CheckpointError(f"no complete checkpoint in {p} (looked for {CHECKPOINTS}/step-*/{MANIFEST}); "
                              f"train first or pass a checkpoint directory")
    return newest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete, use another one") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{what} {path} is not valid JSON; the checkpoint is corrupt, use another one") from None


def verify_checkpoint(ckpt: str | Path) -> dict:
    """Check every file against manifest.json (size and sha256); return the manifest or raise CheckpointError."""
    ckpt = Path(ckpt)
    manifest = _read_json(ckpt / MANIFEST, "checkpoint manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{ckpt / MANIFEST} is not an {FORMAT} manifest; pass a checkpoint written by lmforge train")
    for name, entry in manifest["files"].items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} listed in {MANIFEST} is missing; use another checkpoint")
        if f.stat().st_size != entry.get("bytes") or _sha256(f) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} does not match its sha256 in {MANIFEST}; "
                                  f"delete it and use an earlier checkpoint")
    return manifest


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
def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimizer's state dict: tensors named "state.<index>.<key>", the rest as JSON metadata."""
    sd = optimizer.state_dict()
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


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Restore `optimizer` from a file written from optimizer_to_tensors (param groups must match in shape)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("format") != "lmforge-optimizer-v1":
        raise CheckpointError(f"{path} is not an lmforge optimizer file; the checkpoint is corrupt")
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in json.loads(metadata["scalars"]).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    saved_groups = json.loads(metadata["param_groups"])
    current = optimizer.param_groups
    if len(saved_groups) != len(current) or any(len(s["params"]) != len(c["params"]) for s, c in zip(saved_groups, current)):
        raise CheckpointError(f"{path} holds optimizer state for a different model (parameter groups differ); "
                              f"resume with the config the checkpoint was trained with")
    for saved, now in zip(saved_groups, current):
        if "betas" in saved:
            saved["betas"] = tuple(saved["betas"])
        for key in ("fused", "foreach", "capturable"):  # how to compute, not what: follow this machine
            if key in now:
                saved[key] = now[key]
    optimizer.load_state_dict({"state": state, "param_groups": saved_groups})


# -------------------------------------------------------------------------------------------- save
def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    config: RunConfig, train_state: dict, tokenizer_file: Optional[str | Path] = None) -> Path:
    """Write RUN_DIR/checkpoints/step-<step>/ atomically and return its path (call on rank 0 only).

    train_state: JSON-safe dict (step, tokens_seen, rng, data, val_loss, ...) stored in state.json
    together with the resolved config. tokenizer_file: copied in as tokenizer.json when given.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model = unwrap(model)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "lmforge-model-v1"})
    if optimizer is not None:
        tensors, metadata = optimizer_to_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=metadata)
    resolved = to_dict(config)
    _write_json(tmp / "state.json", {"format": FORMAT, "step": step, **train_state, "config": resolved})
    _write_json(tmp / "config.json", resolved)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
    files = {f.name: {"sha256": _sha256(f), "bytes": f.stat().st_size} for f in sorted(tmp.iterdir())}
    _write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "files": files})  # last: completes the checkpoint
    if final.exists():  # saving the same step again (a resumed run that stopped on a save step)
        trash = root / f".trash-{final.name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, final)
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints other than the newest `keep_last` and the best by val loss, and leftovers of
    interrupted saves; return the deleted paths."""
    found = complete_checkpoints(run_dir)
    keep = set(found[-keep_last:])
    best, best_loss = None, float("inf")
    for ckpt in found:
        try:
            loss = json.loads((ckpt / "state.json").read_text(encoding="utf-8")).get("val_loss")
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(loss, (int, float)) and loss < best_loss:
            best, best_loss = ckpt, loss
    if best is not None:
        keep.add(best)
    deleted = [c for c in found if c not in keep]
    root = Path(run_dir) / CHECKPOINTS
    # half-written saves of a process that crashed (this process's own are renamed before it prunes)
    deleted += [p for p in root.iterdir() if p.is_dir() and p.name.startswith((".tmp-", ".trash-"))]
    for path in deleted:
        shutil.rmtree(path)
    return deleted


# -------------------------------------------------------------------------------------------- load
def read_run_config(ckpt: str | Path) -> RunConfig:
    """The resolved RunConfig stored in a checkpoint directory's config.json."""
    ckpt = Path(ckpt)
    raw = _read_json(ckpt / "config.json", "checkpoint config")
    try:
        return run_config_from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt / 'config.json'} does not hold a valid config: {e}") from None


def load_weights(model: nn.Module, ckpt: str | Path, device: torch.device | str = "cpu") -> None:
    """Load model.safetensors of `ckpt` into `model` (names and shapes must match exactly)."""
    path = Path(ckpt) / "model.safetensors"
    try:
        load_model(unwrap(model), str(path), strict=True, device=str(device))
    except (RuntimeError, OSError) as e:  # safetensors reports mismatches as RuntimeError
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        raise CheckpointError(f"{path} does not fit the model: {detail[:400]}") from None


def load_training_state(ckpt: str | Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                        device: torch.device | str = "cpu", manifest: Optional[dict] = None) -> dict:
    """Load weights and optimizer state of `ckpt` in place and return its state.json (for resume).

    Verifies every file against the manifest first, unless the caller passes the manifest that
    verify_checkpoint already returned.
    """
    ckpt = Path(ckpt)
    manifest = manifest if manifest is not None else verify_checkpoint(ckpt)
    load_weights(model, ckpt, device)
    if optimizer is not None and "optimizer.safetensors" in manifest["files"]:
        load_optimizer_tensors(optimizer, ckpt / "optimizer.safetensors")
    return _read_json(ckpt / "state.json", "checkpoint state")


def load_for_inference(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, RunConfig]:
    """(model in eval mode on `device`, Tokenizer or None, RunConfig) from a run or checkpoint directory.

    Resolves a run directory to its newest complete checkpoint and verifies every file's sha256 first.
    The tokenizer is None only for checkpoints trained without prepared data (tests).
    """
    from lmforge.model import GPT

    ckpt = resolve_checkpoint(path)
    manifest = verify_checkpoint(ckpt)
    config = read_run_config(ckpt)
    device = resolve_device(device) if isinstance(device, str) else device
    model = GPT(config.model)
    load_weights(model, ckpt, "cpu")
    model.to(device)
    model.eval()
    tokenizer = None
    if "tokenizer.json" in manifest["files"]:
        from lmforge.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
    return model, tokenizer, config
