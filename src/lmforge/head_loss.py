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

Each row's own sum (linear_cross_entropy_rows: minus a completion's log-probability, what DPO compares) has a
gradient that differs from row to row, known only in the backward pass, so dW cannot be summed ahead: that one
keeps each counted token's logsumexp and recomputes its chunk's logits in the backward pass (one more head matrix
product), and scores only the counted positions (a prompt's tokens cost nothing), as TRL's fused LM head does.
Each token's own (linear_cross_entropy_tokens, GRPO's) can also be of the logits divided by a sampling temperature
(the distribution the tokens were drawn from) and come with each position's entropy, -sum_v p_v log p_v of that
distribution (no gradient), from the same chunks.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

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
        # the sums grow out of place (loss = loss + ..., not +=): torch 2.11's torch.compile took a Function's output
        # that was a new tensor added to in place for one needing no gradient, and every gradient came out 0
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
            picked = z.gather(1, y[:, None])[:, 0]
            lse, sums = _exp_shifted_(z)  # z now holds exp(z - max)
            loss = loss + ((lse - picked) * counted).sum()
            if not (grad_h or grad_w):
                continue
            dz = z.div_(sums[:, None])  # softmax, in z's memory
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


def linear_cross_entropy_rows(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float = 0.0,
                              chunk: int = 1024) -> torch.Tensor:
    """(B,) fp32: each row's summed cross-entropy of cap(h @ weight^T) against its counted targets (minus its
    log-probability), without ever holding every logit.

    h: (B, T, C); weight: (V, C); targets: (B, T) long, -100 where nothing is counted (a row of none sums to 0).
    Only the counted positions reach the head; differentiable once in h and weight (the logits of a chunk are
    recomputed in the backward pass).
    """
    losses, where, _ = _counted_losses(h, weight, targets, cap, chunk)
    B, T = targets.shape
    return torch.zeros(B, dtype=torch.float32, device=h.device).index_add_(0, where // T, losses)


def linear_cross_entropy_tokens(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float = 0.0,
                                chunk: int = 1024, temperature: float = 1.0, entropies: bool = False) -> Any:
    """(B, T) fp32: each counted target's cross-entropy (minus its log-probability) under cap(h @ weight^T) /
    temperature, 0 where nothing is counted; arguments and gradients as linear_cross_entropy_rows (GRPO weighs each
    token of a sample on its own). entropies: the pair (that, each counted position's entropy (B, T), 0 elsewhere,
    without gradient)."""
    losses, where, entropy = _counted_losses(h, weight, targets, cap, chunk, temperature, entropies)
    by_position = [torch.zeros(targets.numel(), dtype=torch.float32, device=h.device).index_add(0, where, t).view(
        targets.shape) for t in ((losses, entropy) if entropies else (losses,))]
    return tuple(by_position) if entropies else by_position[0]


def logits_cross_entropy_tokens(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                                entropies: bool = False) -> Any:
    """linear_cross_entropy_tokens of logits (B, T, V) that exist whole (a head LoRA adapts; train.loss_chunk 0):
    (B, T) fp32 cross-entropy of softmax(logits / temperature) at each target, 0 where it is -100; entropies: the
    pair (that, each counted position's entropy, without gradient)."""
    z = logits.float() / temperature
    losses = torch.nn.functional.cross_entropy(z.flatten(0, -2), targets.flatten(), ignore_index=IGNORED,
                                               reduction="none").view(targets.shape)
    if not entropies:
        return losses
    with torch.no_grad():
        logp = torch.log_softmax(z, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1) * (targets != IGNORED)
    return losses, entropy


def _counted_losses(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float, chunk: int,
                    temperature: float = 1.0, entropies: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(cross-entropy of each counted position (M,), those positions' flat indices into targets (M,), their
    entropies (M,) when asked for, else None)."""
    flat = targets.reshape(-1)
    where = torch.nonzero(flat != IGNORED).squeeze(1)  # (M,) the counted positions
    x, y = h.reshape(-1, h.size(-1)).index_select(0, where), flat.index_select(0, where)  # (M, C), (M,)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        losses, entropy = _TokenCrossEntropy.apply(x, weight, y, cap, chunk, temperature, entropies)
        return losses, where, entropy
    with torch.no_grad():
        losses, _, entropy = _token_losses(x, weight, y, cap, chunk, _compute_dtype(x, weight), temperature,
                                           entropies)
        return losses, where, entropy


def _exp_shifted_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp of each row of z (M,), each row's sum of exp(z - its max) (M,)) of fp32 logits z (M, V), leaving
    exp(z - max) in z's memory: torch.logsumexp(z) would hold another (M, V) temporary, as large as the chunk."""
    top = z.amax(dim=-1, keepdim=True)
    sums = z.sub_(top).exp_().sum(dim=-1)
    return sums.log() + top[:, 0], sums


def _entropy_shifted_(z: torch.Tensor, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp of each row of z (M,), the entropy of softmax(z) (M,)) of fp32 logits z (M, V), leaving z minus
    its rows' max in z's memory: H = log S - sum_v e_v z_v / S, e = exp(z - max), S = sum_v e_v. On a CPU e is made
    `rows` rows at a time in one small buffer that stays in cache (a whole (M, V) e costs three times the time)."""
    top = z.amax(dim=-1, keepdim=True)
    z.sub_(top)
    rows = rows if z.device.type == "cpu" else z.size(0)
    sums, dots = torch.empty(2, z.size(0), dtype=z.dtype, device=z.device)
    scratch = torch.empty(min(rows, z.size(0)), z.size(1), dtype=z.dtype, device=z.device)
    for start in range(0, z.size(0), rows):
        block = z[start:start + rows]
        e = torch.exp(block, out=scratch[:block.size(0)])
        sums[start:start + rows] = e.sum(dim=-1)
        dots[start:start + rows] = e.mul_(block).sum(dim=-1)
    return sums.log() + top[:, 0], sums.log() - dots / sums


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matrix products' dtype: autocast's when it is on (bf16-mixed), else the weight's."""
    kind = h.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype


def _chunk_logits(x: torch.Tensor, w: torch.Tensor, cap: float, temperature: float = 1.0
                  ) -> tuple[torch.Tensor, Any]:
    """(fp32 logits of one chunk, soft-capped, then divided by temperature; tanh(z / cap) under the cap, else
    None)."""
    z = (x @ w.t()).float()
    slope = None
    if cap > 0:
        slope = torch.tanh(z.div_(cap))
        z = slope * cap
    return (z.div_(temperature) if temperature != 1.0 else z), slope


def _token_losses(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float, chunk: int,
                  dtype: torch.dtype, temperature: float = 1.0, entropies: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(cross-entropy of every token (M,), its logsumexp (M,), its entropy (M,) or None when not asked for), all
    fp32, a chunk at a time, of the logits divided by temperature; no target is -100."""
    with torch.autocast(h.device.type, enabled=False):
        w = weight.to(dtype)
        losses = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
        lse = torch.empty_like(losses)
        entropy = torch.empty_like(losses) if entropies else None
        for start in range(0, h.size(0), chunk):
            rows = slice(start, start + chunk)
            z, _ = _chunk_logits(h[rows].to(dtype), w, cap, temperature)
            picked = z.gather(1, targets[rows, None])[:, 0]
            if entropy is None:
                lse[rows] = _exp_shifted_(z)[0]
            else:
                lse[rows], entropy[rows] = _entropy_shifted_(z)
            losses[rows] = lse[rows] - picked
        return losses, lse, entropy


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                chunk: int, temperature: float, entropies: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        ctx.dtype, ctx.cap, ctx.chunk, ctx.temperature = _compute_dtype(h, weight), cap, chunk, temperature
        losses, lse, entropy = _token_losses(h, weight, targets, cap, chunk, ctx.dtype, temperature, entropies)
        ctx.save_for_backward(h, weight, targets, lse)
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return losses, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, _: Any = None) -> tuple[Any, ...]:
        """dloss_i/dz_i = grad_i (softmax(z_i) - onehot(y_i)) / temperature, recomputed a chunk at a time from the
        saved lse (of the logits divided by temperature)."""
        h, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        dtype, cap = ctx.dtype, ctx.cap
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
            for start in range(0, h.size(0), ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                x, y, g = h[rows].to(dtype), targets[rows], grad[rows].float()
                z, slope = _chunk_logits(x, w, cap, ctx.temperature)
                dz = z.sub_(lse[rows, None]).exp_()  # softmax
                dz[torch.arange(len(y), device=dz.device), y] -= 1.0
                dz *= g[:, None] / ctx.temperature
                _through_head(dz, slope, x, w, rows, dh, dw)
        return dh, (None if dw is None else dw.to(weight.dtype)), None, None, None, None, None


def _through_head(dz: torch.Tensor, slope: Any, x: torch.Tensor, w: torch.Tensor, rows: slice, dh: Any,
                  dw: Any) -> None:
    """One chunk's gradient: dz (fp32, with respect to its capped logits) through the soft-cap (slope: its tanh, or
    None) and the head w, into dh[rows] (the chunk's hidden states x) and added to dw; in w's dtype."""
    if slope is not None:
        dz *= slope.square_().neg_().add_(1.0)
    dz = dz.to(w.dtype)
    if dh is not None:
        dh[rows] = dz @ w
    if dw is not None:
        dw += (dz.t() @ x).float()


# ------------------------------------------------------------------------------------------ distillation
class Teacher(NamedTuple):
    """What knowledge distillation reads of a frozen teacher at the student's positions (linear_distillation):
    its last hidden states (B, T, C_t) after its final norm, its head's weight (V, C_t), its logit soft-cap (0: none),
    and the settings: alpha (the divergence's weight; 1 - alpha goes to the data's cross-entropy), beta (0: forward
    KL(p_t || p_s), 1: reverse KL(p_s || p_t), between: the generalized JSD), temperature (both distributions')."""
    hidden: torch.Tensor
    weight: torch.Tensor
    cap: float = 0.0
    alpha: float = 1.0
    beta: float = 0.0
    temperature: float = 1.0


def linear_distillation(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, teacher: Teacher,
                        cap: float = 0.0, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha D + (1 - alpha) CE, CE, D): sums over the counted targets (not -100) of the student's cross-entropy
    against them, CE (softmax of cap(h @ weight^T)), and of the divergence D of its distribution from the teacher's,
    both at teacher.temperature (divergence_of), without ever holding every logit of either model. Only the first is
    differentiable, in h and weight (computed in the forward pass, as linear_cross_entropy_sum's); the teacher gets
    no gradient."""
    flat = targets.reshape(-1)
    where = torch.nonzero(flat != IGNORED).squeeze(1)
    x, y = h.reshape(-1, h.size(-1)).index_select(0, where), flat.index_select(0, where)
    x_t = teacher.hidden.reshape(-1, teacher.hidden.size(-1)).index_select(0, where)
    chunk = chunk if chunk > 0 else max(1, x.size(0))
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _Distillation.apply(x, weight, y, x_t, teacher, cap, chunk)
    with torch.no_grad():
        return _distill_chunks(x, weight, y, x_t, teacher, cap, chunk, False, False)[:3]


def divergence_of(log_ps: torch.Tensor, log_pt: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(D (M,), dD/dz_s (M, V)) of the student's and the teacher's log-probabilities (M, V), z_s the student's logits
    (divided by the temperature): beta 0 KL(p_t || p_s), gradient p_s - p_t; beta 1 KL(p_s || p_t), gradient
    p_s (log p_s - log p_t - D); else beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s,
    gradient (1 - beta) p_s (log p_s - log m - KL(p_s || m)) (GKD's generalized JSD; TRL's)."""
    ps, pt = log_ps.exp(), log_pt.exp()
    if beta == 0.0:
        return (pt * (log_pt - log_ps)).sum(-1), ps.sub_(pt)
    if beta == 1.0:
        gap = log_ps - log_pt
        d = (ps * gap).sum(-1)
        return d, gap.sub_(d[:, None]).mul_(ps)
    log_m = torch.logaddexp(log_ps + math.log(1.0 - beta), log_pt + math.log(beta))
    gap = log_ps - log_m
    kl_s = (ps * gap).sum(-1)
    d = beta * (pt * (log_pt - log_m)).sum(-1) + (1.0 - beta) * kl_s
    return d, gap.sub_(kl_s[:, None]).mul_(ps).mul_(1.0 - beta)


class _Distillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, x_t: torch.Tensor,
                teacher: Teacher, cap: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need_h, need_w = ctx.needs_input_grad[:2]
        loss, ce, d, ctx.dh, ctx.dw = _distill_chunks(h, weight, targets, x_t, teacher, cap, chunk, need_h, need_w)
        ctx.mark_non_differentiable(ce, d)
        return loss, ce, d

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        dh, dw = (None if d is None else d.mul_(grad.to(d.dtype)) for d in (ctx.dh, ctx.dw))
        ctx.dh = ctx.dw = None
        return dh, dw, None, None, None, None, None


def _distill_chunks(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, x_t: torch.Tensor,
                    teacher: Teacher, cap: float, chunk: int, grad_h: bool, grad_w: bool) -> tuple[Any, ...]:
    """(loss, CE, D, dloss/dh or None, dloss/dweight or None) of linear_distillation, a chunk of tokens at a time;
    no target is -100."""
    dtype, t = _compute_dtype(h, weight), teacher.temperature
    with torch.autocast(h.device.type, enabled=False):
        w, w_t = weight.to(dtype), teacher.weight
        ce, d = (torch.zeros((), dtype=torch.float32, device=h.device) for _ in range(2))
        dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if grad_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if grad_w else None
        for start in range(0, h.size(0), chunk):
            rows = slice(start, start + chunk)
            x, y = h[rows].to(dtype), targets[rows]
            z, slope = _chunk_logits(x, w, cap)
            with torch.no_grad():
                z_t, _ = _chunk_logits(x_t[rows].to(w_t.dtype), w_t, teacher.cap, t)
            log_ps = torch.log_softmax(z / t, dim=-1)
            divergence, dz = divergence_of(log_ps, torch.log_softmax(z_t, dim=-1), teacher.beta)
            d = d + divergence.sum()  # out of place: see _chunks
            log_p = log_ps if t == 1.0 else torch.log_softmax(z, dim=-1)
            ce = ce - log_p.gather(1, y[:, None]).sum()
            if not (grad_h or grad_w):
                continue
            dz.mul_(teacher.alpha / t)  # the divergence's part, through z / t
            if teacher.alpha < 1.0:  # the cross-entropy's: softmax(z) - onehot(y)
                d_ce = log_p.exp()
                d_ce[torch.arange(len(y), device=z.device), y] -= 1.0
                dz.add_(d_ce, alpha=1.0 - teacher.alpha)
            _through_head(dz, slope, x, w, rows, dh, dw)
        loss = teacher.alpha * d + (1.0 - teacher.alpha) * ce
        return loss, ce, d, dh, (None if dw is None else dw.to(weight.dtype))
