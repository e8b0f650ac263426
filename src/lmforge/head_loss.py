"""The LM head and its cross-entropy in one pass, a chunk of tokens at a time: the (N, V) logits never exist whole.

A language model's last matrix product turns N hidden states into N x V logits (V: the vocabulary). At GPT-2's
50,257 tokens and 2,048 tokens a step that is 412 MB in fp32, and cross-entropy's log-softmax and the logits'
gradient hold as much again each: often more memory than the whole model. Training needs none of it, only the summed
loss and its gradients with respect to the hidden states h (N, C) and the head's weight W (V, C). For a summed
cross-entropy these are known in closed form as soon as a chunk's logits are:

    z = h W^T, soft-capped to c tanh(z / c) when a cap c is set;  loss = sum_i [logsumexp(z_i) - z_i[y_i]]
    dloss/dz_i = softmax(z_i) - onehot(y_i), times 1 - (z_i / c)^2 under the cap
    dloss/dh = dz W,  dloss/dW = dz^T h

So the forward pass computes all three chunk by chunk (the fused linear cross-entropy of Liger-Kernel, written here
in PyTorch) and keeps dh and dW; the backward pass only scales them by the incoming gradient. Nothing is recomputed,
and at most one chunk's logits exist at a time. Targets equal to -100 (PyTorch's ignore_index, the trainer's
IGNORE_INDEX) count nothing. The matrix products run in the autocast dtype when autocast is on (bf16-mixed), else in
the weight's; softmax and the sums always in fp32, like the unfused loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

IGNORED = -100  # the target of a position that carries no loss (torch.nn.functional.cross_entropy's ignore_index)


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float = 0.0,
                             chunk: int = 1024) -> torch.Tensor:
    """sum over counted targets of cross_entropy(cap(h @ weight^T), targets), without ever holding every logit.

    h: (..., C) hidden states; weight: (V, C), the head's; targets: h's leading shape, long, -100 where nothing is
    counted; cap: the logit soft-cap (0: none); chunk: tokens per matrix product. Returns a 0-dim fp32 tensor whose
    backward gives h and weight their gradients (computed in the forward pass; not differentiable twice).
    """
    h2, flat = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h2, weight, flat, cap, chunk)
    with torch.no_grad():
        return _chunks(h2, weight, flat, cap, chunk, False, False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[:2]  # a frozen head (LoRA elsewhere) needs no dloss/dweight
        loss, ctx.dh, ctx.dw = _chunks(h, weight, targets, cap, chunk, need_h, need_w)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        dh, dw = (None if d is None else d.mul_(grad.to(d.dtype)) for d in (ctx.dh, ctx.dw))  # the loss scale
        ctx.dh = ctx.dw = None
        return dh, dw, None, None, None


def _chunks(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float, chunk: int,
            grad_h: bool, grad_w: bool) -> tuple[torch.Tensor, Any, Any]:
    """(loss sum, dloss/dh if grad_h else None, dloss/dweight if grad_w else None), a chunk of tokens at a time."""
    kind = h.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
    with torch.autocast(kind, enabled=False):
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if grad_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if grad_w else None
        for start in range(0, h.size(0), chunk):
            x, y = h[start:start + chunk].to(dtype), targets[start:start + chunk]
            counted = y != IGNORED
            y = y.clamp(min=0)  # an ignored row reads class 0, then counts nothing
            z = (x @ w.t()).float()
            if cap > 0:
                slope = torch.tanh(z.div_(cap))  # d(c tanh(u / c))/du = 1 - tanh(u / c)^2, kept for the backward
                z = slope * cap
            lse = torch.logsumexp(z, dim=-1)
            loss += ((lse - z.gather(1, y[:, None])[:, 0]) * counted).sum()
            if not (grad_h or grad_w):
                continue
            dz = z.sub_(lse[:, None]).exp_()  # softmax, in z's memory (z is not needed after this)
            dz[torch.arange(len(y), device=dz.device), y] -= 1.0
            dz *= counted[:, None]
            if cap > 0:
                dz *= slope.square_().neg_().add_(1.0)
            dz = dz.to(dtype)
            if dh is not None:
                dh[start:start + chunk] = dz @ w
            if dw is not None and dtype == torch.float32:
                dw.addmm_(dz.t(), x)
            elif dw is not None:
                dw += (dz.t() @ x).float()
        return loss, dh, (None if dw is None else dw.to(weight.dtype))
