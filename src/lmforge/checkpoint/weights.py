"""A model's weights in a checkpoint: which tensors model.safetensors holds (a tied weight once, a LoRA model's
adapters and heads only), writing them, checking they fit a model from the header alone, reading them whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file, save_model
from torch import nn

from lmforge.checkpoint.manifest import SHARD_INDEX, _one_line, check_safetensors
from lmforge.checkpoint.shard_index import ShardReader, checkpoint_shards, read_shard_index
from lmforge.distributed import unwrap
from lmforge.errors import CheckpointError
from lmforge.lora import is_adapted, trained_state_dict

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
    """Write model.safetensors: every weight (a tied one once), or a LoRA model's adapters and heads (and rows).

    weights: a sharded model's whole state dict (distributed.full_state); a tied weight is stored under the name
    safetensors' save_model keeps (the first in sorted order), so the file is the one a single process writes."""
    adapted = is_adapted(unwrap(model))
    if weights is None and not adapted:
        save_model(unwrap(model), str(path), metadata={"format": "lmforge-model-v1"})
        return
    weights = saved_tensors(model) if weights is None else weights
    groups = tied_names(model)  # a LoRA run's tied embedding and head, when it trains added tokens' rows: once
    tensors = {min(names): weights[min(names)].detach().contiguous() for names in groups}
    tied = {name: min(names) for names in groups for name in names if name != min(names)}
    save_file(tensors, str(path), metadata={**tied, "format": "lmforge-lora-v1" if adapted else "lmforge-model-v1"})


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


def checkpoint_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> int:
    """Estimated bytes of one checkpoint: the weights (a LoRA model's adapters and heads: saved_tensors), plus two
    AdamW moments per weight with an optimizer (an upper bound: Muon keeps one momentum per hidden matrix)."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in saved_tensors(model).values()}.values())
    return weights * (3 if optimizer is not None else 1) + (1 << 20)  # + JSON, tokenizer and headers
