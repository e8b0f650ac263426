"""The Linear layers of a bf16 training step on a CPU with AMX (Intel's matrix unit), in oneDNN's fast shapes.

A Linear layer's weight gradient is g^T x over the step's B*T tokens: a product whose inner dimension is the token
count. oneDNN's AMX kernels run such a product far below their rate once that dimension passes 1024: on an Intel
Xeon with AMX (1 thread, a 384-wide model's layers, 2048 tokens; timed by hand) 5.3-6.1 ms against 1.7 ms for the
forward product of the same size. Summed over slices of at most 1024 tokens (torch.addmm_, each slice added to the
sum in oneDNN's float32 accumulator) the same gradient takes 2.6-4.0 ms; it is rounded to bfloat16 once per slice
instead of once in all (a relative error of ~4e-3 of its largest entry instead of ~2e-3, both within bfloat16's own
step).
The forward adds the bias inside the product (oneDNN's linear, torch.ops.mkldnn._linear_pointwise) rather than
copying it into the output first, as addmm does. Values of the forward are unchanged (bit for bit).
Only with one torch thread: with two, oneDNN shares such a product's inner dimension between the threads itself (the
2048-token product above 1.7 ms, as fast as its slices) and the sliced step was no faster (0.986x, timed by hand).
Only for weights of MIN_WEIGHT entries or more: slicing a narrow layer's gradient costs more than it saves (128 x 512
and smaller: 0.79x-0.98x; 384 x 384: 1.0x-1.21x; 384 x 1152 and larger: 1.06x-1.38x over 1536 to 8192 tokens).

`amx_linear()` routes, while it is active, every torch.nn.functional.linear call that trains a wide enough weight on
such a CPU in bf16 through this product; the Trainer activates it around an eager bf16 forward of more than
SLICE_TOKENS tokens (`precision.run_forward`; not under torch.compile, activation checkpointing or FSDP, whose own
graphs and recomputation expect torch's ops, nor for a model with no trained Linear that wide).
"""

from __future__ import annotations

import contextlib
import functools
from typing import ContextManager, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Tokens per slice of a weight gradient's product: oneDNN's AMX kernels keep their rate up to this inner dimension.
SLICE_TOKENS = 1024
# The smallest weight (out x in entries) whose gradient is sliced: a 384-wide model's smallest layer.
MIN_WEIGHT = 384 * 384


@functools.lru_cache(maxsize=1)
def has_amx() -> bool:
    """Whether this CPU has AMX's bf16 matrix instructions (Linux: /proc/cpuinfo's amx_bf16 flag)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def _product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x W^T + b with the bias added in the product's output stage where oneDNN can: a contiguous x (the same values
    as F.linear's; for a strided x F.linear itself rounds otherwise), on a torch build with oneDNN's linear."""
    if bias is not None and x.is_contiguous() and _has_onednn_linear():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


@functools.lru_cache(maxsize=1)
def _has_onednn_linear() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class _SlicedLinear(torch.autograd.Function):
    """F.linear in bfloat16 whose weight gradient sums products over slices of SLICE_TOKENS tokens."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        bf16 = torch.bfloat16  # bf16-mixed hands float32 tensors here (autocast would cast them the same way)
        x, weight = x.to(bf16), weight.to(bf16)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, None if bias is None else bias.to(bf16))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.to(torch.bfloat16).reshape(-1, grad.size(-1))  # (N, out)
        x2 = x.reshape(-1, x.size(-1))  # (N, in)
        grad_x = (g @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = g[:SLICE_TOKENS].t() @ x2[:SLICE_TOKENS]  # (out, in)
            for start in range(SLICE_TOKENS, g.size(0), SLICE_TOKENS):
                grad_w.addmm_(g[start:start + SLICE_TOKENS].t(), x2[start:start + SLICE_TOKENS])
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b  # the engine casts each to its input's dtype (float32 under bf16-mixed)


class _AmxLinear(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled():
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (weight.requires_grad and weight.numel() >= MIN_WEIGHT and x.device.type == "cpu"
                    and x.numel() > SLICE_TOKENS * x.size(-1)):
                return _SlicedLinear.apply(x, weight, bias)
        return func(*args, **kwargs)


def amx_linear(enabled: bool = True) -> ContextManager:
    """While active: F.linear calls that train a weight of MIN_WEIGHT entries or more, on more than SLICE_TOKENS
    tokens, run as _SlicedLinear; only on a CPU with AMX (has_amx), with one torch thread and when `enabled`, else
    nothing changes."""
    return _AmxLinear() if enabled and has_amx() and torch.get_num_threads() == 1 else contextlib.nullcontext()
