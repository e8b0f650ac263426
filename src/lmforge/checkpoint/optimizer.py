"""Optimizer state as named tensors: optimizer.safetensors holds AdamW moments (Muon's momentum) as
"state.<param index>.<key>", with param groups and non-tensor state as JSON in the file's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lmforge.checkpoint.manifest import _one_line, check_safetensors
from lmforge.distributed import is_sharded, load_full_state
from lmforge.errors import CheckpointError

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
