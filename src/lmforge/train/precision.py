"""Numeric precision of the forward (and so the backward) pass.

fp32: everything in float32.

bf16-mixed: torch.autocast (CPU and CUDA): matrix products and attention run in bfloat16, the other ops where
their inputs are (norms on the float32 residual stream, its adds), with casts between them on every step.

bf16-compute: the whole pass runs on a bfloat16 copy of the weights and float buffers (RoPE tables), made once
per forward: the residual stream, norms, activations and attention are bfloat16 (the CPU and CUDA kernels
accumulate their sums in float32), with no casts around each op. The cast is differentiable, so each gradient
arrives in float32 on the float32 weight: the weights, gradients, clipping, optimizer state and checkpoints are
the same as in fp32 (mixed precision with fp32 master weights, Micikevicius et al. 2018, sec. 3.1).

In every mode the loss is computed in float32 (train/loss.py). bfloat16 keeps float32's exponent range, so no
loss scaling is needed (unlike fp16).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch
from torch import nn

from lmforge.train.amx_linear import SLICE_TOKENS, amx_linear


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The autocast context for `precision` ('fp32' | 'bf16-mixed' | 'bf16-compute') on `device`: none for fp32,
    bfloat16 autocast otherwise (for bf16-compute it serves passes that use the float32 weights directly, such as
    generating samples for task metrics)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision in ("bf16-mixed", "bf16-compute"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}")  # config validation makes this unreachable


def bf16_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: bfloat16 copy} of every floating-point parameter and buffer of `model` (others as they are). A tied
    weight appears once, under its first name, so its copy stays tied (functional_call ties it again)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in tensors.items()}


def run_forward(model: nn.Module, precision: str, device: torch.device, *args: Any, amx: bool = False,
                **kwargs: Any) -> Any:
    """model(*args, **kwargs) in `precision`: bf16-compute calls it on bf16_copy(model) (torch.func.functional_call:
    the module's own tensors are put back afterwards), the others under `autocast`. amx: in bf16 on a CPU with AMX,
    the Linear layers that train their weights run as amx_linear's (an eager pass only; args[0] the token ids, more
    than amx_linear slices at once, else nothing would change)."""
    tokens = args[0].numel() if args and isinstance(args[0], torch.Tensor) else 0
    with amx_linear(amx and precision != "fp32" and device.type == "cpu" and tokens > SLICE_TOKENS):
        if precision == "bf16-compute":
            return torch.func.functional_call(model, bf16_copy(model), args, kwargs)
        with autocast(precision, device):
            return model(*args, **kwargs)
