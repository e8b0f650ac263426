"""AdamW with two parameter groups.

Weight decay shrinks matrices that mix features (Linear weights). It is not applied to norm gains,
biases and embeddings: decaying those pulls them toward zero without regularising anything useful
(the GPT-2/minGPT convention). A parameter shared by two modules (tied embedding and LM head) appears
once and counts as an embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{params: decayed, weight_decay}, {params: not decayed, weight_decay: 0}] with names for inspection.

    Not decayed: parameters of nn.Embedding modules, and every parameter with fewer than 2 dimensions
    (biases, LayerNorm/RMSNorm gains).
    """
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            if id(p) in embedding_ids or p.ndim < 2:
                no_decay.append(p)
                no_decay_names.append(full)
            else:
                decay.append(p)
                decay_names.append(full)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters, fused (one kernel for all tensors) on CUDA and the CPU, foreach elsewhere.

    On the CPU, foreach falls back to a loop of per-tensor ops: fused is 7-20x faster there (a third of a
    char-small step; benchmarks/train_throughput.py)."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, optim.weight_decay)]
    groups = [g for g in groups if g["params"]]
    fast = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, **fast)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
