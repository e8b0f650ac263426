"""The optimizer: AdamW over every weight (optim.name: adamw), or Muon on the blocks' hidden matrices with AdamW
on the rest (optim.name: muon), behind one step API.

AdamW's parameter groups: weight decay shrinks matrices that mix features (Linear weights). It is not applied to
norm gains, biases and embeddings: decaying those pulls them toward zero without regularising anything useful
(the GPT-2/minGPT convention). A parameter shared by two modules (tied embedding and LM head) appears once and
counts as an embedding.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; torch.optim.Muon) replaces each update of a
2-D weight by its momentum orthogonalised with a Newton-Schulz iteration. It is meant for the hidden matrices
only: the blocks' attn.qkv, attn.proj, mlp.fc and mlp.proj. Embeddings (a lookup, not a matrix product), the
LM/classify head, norms and biases stay with AdamW, as in the nanoGPT speedrun. Its step (train/muon.py) batches
the iteration over same-shape matrices, in bf16 only where the device multiplies bf16 matrices in hardware.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.config import OptimConfig
from lmforge.distributed import has_fast_bf16
from lmforge.lora import LoRAEmbedding, added_row_weights, lora_parameters
from lmforge.train.muon import BatchedMuon


def param_groups(model: nn.Module, weight_decay: float, adapter_weight_decay: float = 0.0,
                 muon: bool = False, adapter_lr_ratio: float = 1.0,
                 embedding_lr_scale: float | None = None) -> list[dict]:
    """[{params: decayed, weight_decay}, {params: not decayed, weight_decay: 0}] and, for a model with LoRA
    adapters, {params: adapters, weight_decay: adapter_weight_decay}, and with `muon`, {params: the blocks'
    hidden matrices, muon: True} (taken out of the decayed group), each with names for inspection; frozen
    parameters are left out. Every trainable parameter is in exactly one group.

    Not decayed: parameters of nn.Embedding modules, and every parameter with fewer than 2 dimensions
    (biases, LayerNorm/RMSNorm gains). The adapters (lmforge.lora) have their own decay (lora.weight_decay,
    0 by default): decaying A and B pulls the update B A toward 0, i.e. toward the base, not toward small weights.
    adapter_lr_ratio != 1 (LoRA+, lora.lr_ratio): the adapters' B matrices and DoRA magnitudes (peft's LoRA+ takes
    every 1-D adapter tensor with B) get a group of their own with lr_scale = adapter_lr_ratio; embedding_lr_scale
    (lora.lr_embedding / optim.lr) puts the token embedding's adapter (A and B) in a group with that lr_scale instead
    (peft's LoRA+ "embedding" group). An adapted model's
    weights with rows for added tokens (lora.train_added_rows: an untied lm_head too) are not decayed: decay would
    move the base's rows, which must stay as they are.
    """
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    adapter_ids = {id(p) for p in lora_parameters(model)}
    if adapter_ids:  # weights with added tokens' rows
        embedding_ids |= {id(p) for p in added_row_weights(model).values()}
    table_ids = ({id(p) for m in model.modules() if isinstance(m, LoRAEmbedding) for p in m.lora.parameters()}
                 if embedding_lr_scale is not None else set())
    hidden_ids = {id(m.weight) for m in model.blocks.modules() if isinstance(m, nn.Linear)} if muon else set()
    groups: dict[str, tuple[list, list]] = {"decay": ([], []), "no_decay": ([], []), "adapters": ([], []),
                                            "adapters_b": ([], []), "adapters_emb": ([], []), "muon": ([], [])}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            kind = ("adapters" if id(p) in adapter_ids else "muon" if id(p) in hidden_ids else
                    "no_decay" if id(p) in embedding_ids or p.ndim < 2 else "decay")
            if kind == "adapters" and id(p) in table_ids:
                kind = "adapters_emb"
            elif kind == "adapters" and adapter_lr_ratio != 1.0 and (name == "B" or p.ndim < 2):
                kind = "adapters_b"
            groups[kind][0].append(p)
            groups[kind][1].append(full)
    decays = {"decay": weight_decay, "no_decay": 0.0, "adapters": adapter_weight_decay,
              "adapters_b": adapter_weight_decay, "adapters_emb": adapter_weight_decay}
    scales = {"adapters_b": adapter_lr_ratio, "adapters_emb": embedding_lr_scale}
    return [{"params": params, "names": names, **({"muon": True} if kind == "muon" else {"weight_decay": decays[kind]}),
             **({"lr_scale": scales[kind]} if kind in scales else {})}
            for kind, (params, names) in groups.items() if kind in ("decay", "no_decay") or params]


class MuonWithAdamW:
    """Muon and AdamW stepped as one optimizer: what the trainer, set_lr and checkpoints use of an optimizer.

    param_groups lists AdamW's groups, then Muon's (live: set_lr writes through). state_dict numbers the
    parameters in that order, as one torch optimizer would, so a checkpoint stores it as it stores AdamW's
    (checkpoint.optimizer_to_tensors: tensors in safetensors, groups as JSON) and load_state_dict splits it back.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon) -> None:
        self.optimizers = (adamw, muon)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for opt in self.optimizers:
            sd = opt.state_dict()  # parameters numbered 0.. in group order
            state.update({offset + i: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in opt.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups, offset = list(state_dict["param_groups"]), 0
        for opt in self.optimizers:
            own, groups = groups[:len(opt.param_groups)], groups[len(opt.param_groups):]
            count = sum(len(g["params"]) for g in own)
            opt.load_state_dict({
                "state": {i - offset: s for i, s in state_dict["state"].items() if offset <= i < offset + count},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in own]})
            offset += count


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device, adapter_weight_decay: float = 0.0,
                    adapter_lr_ratio: float = 1.0,
                    embedding_lr: float | None = None) -> torch.optim.AdamW | MuonWithAdamW:
    """AdamW over `model`'s trainable parameters, fused (one kernel for all tensors) on CUDA and the CPU, foreach
    elsewhere; with optim.name muon, Muon (optim.muon_*) on the blocks' hidden matrices and that AdamW on the rest.
    Empty groups are dropped (a full run has two AdamW groups, a LoRA run the adapters and perhaps a classification
    head). A Muon group carries lr_scale = muon_lr / lr, so the one schedule (set_lr) drives both; so does LoRA+'s
    group of B matrices (lr_scale = adapter_lr_ratio, param_groups) and the embedding adapter's at embedding_lr.

    On the CPU, foreach falls back to a loop of per-tensor ops: fused is 7-20x faster there (a third of a
    char-small step; benchmarks/train_throughput.py)."""
    groups = [{k: v for k, v in g.items() if k != "names"}
              for g in param_groups(model, optim.weight_decay, adapter_weight_decay, muon=optim.name == "muon",
                                    adapter_lr_ratio=adapter_lr_ratio,
                                    embedding_lr_scale=None if embedding_lr is None else embedding_lr / optim.lr)]
    groups = [g for g in groups if g["params"]]
    fast = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    adamw = torch.optim.AdamW([g for g in groups if "muon" not in g], lr=optim.lr,
                              betas=(optim.beta1, optim.beta2), eps=optim.eps, **fast)
    hidden = [{"params": g["params"], "lr_scale": optim.muon_lr / optim.lr} for g in groups if "muon" in g]
    if not hidden:
        return adamw
    muon = BatchedMuon(hidden, ns_dtype=muon_ns_dtype(optim.muon_ns_dtype, device), lr=optim.muon_lr,
                       weight_decay=optim.muon_weight_decay, momentum=optim.muon_momentum,
                       adjust_lr_fn=optim.muon_adjust_lr, ns_steps=optim.muon_ns_steps)
    return MuonWithAdamW(adamw, muon)


def muon_ns_dtype(name: str, device: torch.device) -> torch.dtype:
    """optim.muon_ns_dtype as a torch dtype: auto is bf16 where `device` has bf16 matrix hardware, else fp32."""
    if name == "auto":
        name = "bf16" if has_fast_bf16(device) else "fp32"
    return torch.bfloat16 if name == "bf16" else torch.float32


def set_lr(optimizer: torch.optim.Optimizer | MuonWithAdamW, lr: float) -> None:
    """Set the learning rate of every parameter group: lr, times the group's lr_scale where it has one (Muon,
    LoRA+'s B matrices)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
