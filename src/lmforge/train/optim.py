"""AdamW with two parameter groups (three with LoRA adapters).

Weight decay shrinks matrices that mix features (Linear weights). It is not applied to norm gains,
biases and embeddings: decaying those pulls them toward zero without regularising anything useful
(the GPT-2/minGPT convention). A parameter shared by two modules (tied embedding and LM head) appears
once and counts as an embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import OptimConfig
from lmforge.lora import lora_parameters


def param_groups(model: nn.Module, weight_decay: float, adapter_weight_decay: float = 0.0) -> list[dict]:
    """[{params: decayed, weight_decay}, {params: not decayed, weight_decay: 0}] and, for a model with LoRA
    adapters, {params: adapters, weight_decay: adapter_weight_decay}, with names for inspection; frozen
    parameters are left out.

    Not decayed: parameters of nn.Embedding modules, and every parameter with fewer than 2 dimensions
    (biases, LayerNorm/RMSNorm gains). The adapters (lmforge.lora) have their own decay (lora.weight_decay,
    0 by default): decaying A and B pulls the update B A toward 0, i.e. toward the base, not toward small weights.
    """
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    adapter_ids = {id(p) for p in lora_parameters(model)}
    groups: dict[str, tuple[list, list]] = {"decay": ([], []), "no_decay": ([], []), "adapters": ([], [])}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            kind = ("adapters" if id(p) in adapter_ids else
                    "no_decay" if id(p) in embedding_ids or p.ndim < 2 else "decay")
            groups[kind][0].append(p)
            groups[kind][1].append(full)
    decays = {"decay": weight_decay, "no_decay": 0.0, "adapters": adapter_weight_decay}
    return [{"params": params, "weight_decay": decays[kind], "names": names}
            for kind, (params, names) in groups.items() if kind != "adapters" or params]


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device,
                    adapter_weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters, fused (one kernel for all tensors) on CUDA and the CPU, foreach elsewhere.
    Empty groups are dropped (a full run has two, a LoRA run the adapters and perhaps a classification head).

    On the CPU, foreach falls back to a loop of per-tensor ops: fused is 7-20x faster there (a third of a
    char-small step; benchmarks/train_throughput.py)."""
    groups = [{k: v for k, v in g.items() if k != "names"}
              for g in param_groups(model, optim.weight_decay, adapter_weight_decay)]
    groups = [g for g in groups if g["params"]]
    fast = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, **fast)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
