"""The Transformer decoder: token ids (B, T) in, next-token logits (B, T, vocab) out; with model.causal false,
the same blocks without the causal mask are a BERT-style encoder (logits for every position given the whole text).

Read top to bottom: positional encodings, attention (the formula, then the fused kernel that must
equal it), the MLP, a pre-norm Block, the GPT that stacks them, the KV cache used for generation,
and the parameter/FLOP counts. Shapes use one vocabulary: B batch, T time (query positions),
S key positions (T plus the cached past), C = n_embd, nh = n_head, nkv = n_kv_head, hd = head_dim,
H = MLP hidden width, V = vocab_size.

The model computes logits and nothing else: loss, optimizer groups, MFU and file I/O live elsewhere.
Derived buffers (sinusoid and RoPE tables) are non-persistent, so state_dict names are exactly the
parameters: tok_emb, pos_emb (learned positions only), blocks.N.{norm_1, attn.qkv, attn.q_norm and attn.k_norm
(qk_norm only), attn.proj, norm_2, mlp.fc, mlp.proj}, norm_f, lm_head (the same tensor as tok_emb.weight when tied).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from lmforge.config import ModelConfig
from lmforge.head_loss import (Teacher, linear_cross_entropy_rows, linear_cross_entropy_sum,
                               linear_cross_entropy_tokens, linear_distillation, logits_cross_entropy_tokens)


# ------------------------------------------------------------------------------ positional encodings
def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """(length, dim) table of Vaswani et al. 2017, sec. 3.5:
    PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(p / 10000^(2i/dim))."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (ceil(dim/2),)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, ceil(dim/2))
    table = torch.zeros(length, dim)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles[:, : dim // 2].cos()
    return table


def llama3_frequencies(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_context: int) -> torch.Tensor:
    """Llama 3.1's RoPE scaling of the frequencies: a wavelength 2 pi / f longer than original_context /
    low_freq_factor is divided by `factor`, one shorter than original_context / high_freq_factor is kept, and in
    between f is interpolated: (1 - s) f / factor + s f, s = (original_context / wavelength - low) / (high - low)."""
    wavelength = 2 * math.pi / inv_freq
    s = ((original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)
    return (1 - s) * inv_freq / factor + s * inv_freq


def rope_tables(length: int, head_dim: int, theta: float,
                scaling: Optional[tuple[float, float, float, int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (length, hd), for rotary embeddings (Su et al. 2021, RoFormer eq. 34).

    Dimension i is paired with i + hd/2 (the GPT-NeoX / Llama layout: RoFormer's rotation with the
    head dimensions permuted), rotated by angle p * theta^(-2i/hd); both halves share a frequency. `scaling`:
    llama3_frequencies' (factor, low_freq_factor, high_freq_factor, original_context).
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, *scaling)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (length, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+hd/2}) of x by its angle: x (B, T, n, hd) with cos, sin (T, 1, hd), or (B, T, 1,
    hd) for a position per row (any layout whose cos and sin broadcast over x)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, n, T, hd/2) each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or an identity when p is 0 (a cheaper call on every decoding step)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


# ---------------------------------------------------------------------------------------- attention
def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool, True where query t (the last T of S positions) may attend to key s, i.e. s <= t."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def padded_mask(attention_mask: torch.Tensor, T: int, causal: bool = True) -> torch.Tensor:
    """(B, 1, T, S) bool mask for a padded or packed batch: the causal mask (a decoder), and a query sees only
    keys of its own sequence, never a pad.

    attention_mask (B, S) is 0/False at pads and, at real tokens, True/1 (one sequence per row) or the id 1, 2,
    3, ... of the sequence a token belongs to (several examples packed into one row); the queries are the last T
    of the S positions. A pad query attends like an unpadded one (all earlier keys): its output is never used,
    and a query with no key at all would make softmax produce NaN, which would leak through 0 * NaN.
    """
    ids = attention_mask.long()  # (B, S)
    S = ids.size(1)
    query = ids[:, -T:, None]  # (B, T, 1)
    keys_seen = ((ids[:, None, :] == query) & (query > 0)) | (query == 0)  # (B, T, S)
    if causal:
        keys_seen = keys_seen & causal_mask(T, S, ids.device)
    return keys_seen.unsqueeze(1)  # (B, 1, T, S)


def sequence_positions(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) position of each of the last T tokens within its own sequence (see padded_mask): the
    number of earlier real tokens with the same id; pads get 0 (their outputs are never used)."""
    ids = attention_mask.long()  # (B, S)
    S = ids.size(1)
    same = (ids[:, -T:, None] == ids[:, None, :]) & causal_mask(T, S, ids.device)  # (B, T, S)
    return torch.where(ids[:, -T:] > 0, same.sum(-1) - 1, 0)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                        mask: Optional[torch.Tensor] = None, causal: bool = True) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k) + causal mask) V, written out. q (B, nh, T, hd); k, v (B, nkv, S, hd);
    mask (B, 1, T, S) bool replaces the causal mask (padded batches: see padded_mask); an encoder (causal
    False) without one lets every query see every key."""
    T, S, d_k = q.size(-2), k.size(-2), q.size(-1)
    if k.size(1) != q.size(1):  # grouped-query: each key/value head serves nh/nkv consecutive query heads
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # (B, nh, S, hd)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)  # (B, nh, S, hd)
    allowed = mask if mask is not None else causal_mask(T, S, q.device) if causal else None
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (B, nh, T, S)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    weights = torch.softmax(scores, dim=-1)  # (B, nh, T, S)
    return F.dropout(weights, dropout_p) @ v  # (B, nh, T, hd)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     mask: Optional[torch.Tensor] = None, causal: bool = True) -> torch.Tensor:
    """reference_attention in fewer passes over the (B, nh, T, S) scores: one batched product (baddbmm) scales
    Q K^T by 1/sqrt(d_k) and adds the mask as 0 / -inf; at p = 0 no dropout and a backward of its own
    (_AttentionProducts). Shapes as reference_attention."""
    B, nh, T, d_k = q.shape
    S = k.size(-2)
    if k.size(1) != nh:  # grouped-query: each key/value head serves nh/nkv consecutive query heads
        k = k.repeat_interleave(nh // k.size(1), dim=1)  # (B, nh, S, hd)
        v = v.repeat_interleave(nh // v.size(1), dim=1)  # (B, nh, S, hd)
    allowed = mask if mask is not None else causal_mask(T, S, q.device) if causal else None
    if allowed is None:  # an encoder: nothing to add (beta 0 ignores the bias)
        bias, beta = q.new_zeros(()), 0.0
    else:  # 0 where a query may see a key, -inf where not: (T, S), or (B, 1, T, S) -> (B * nh, T, S)
        bias, beta = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, -math.inf), 1.0
        bias = bias.expand(B, nh, T, S).flatten(0, 1) if bias.dim() == 4 else bias
    qf, kf, vf = q.reshape(B * nh, T, d_k), k.reshape(B * nh, S, d_k), v.reshape(B * nh, S, v.size(-1))
    if dropout_p == 0:
        return _AttentionProducts.apply(qf, kf, vf, bias, beta, 1.0 / math.sqrt(d_k)).view(B, nh, T, -1)
    scores = torch.baddbmm(bias, qf, kf.transpose(1, 2), beta=beta, alpha=1.0 / math.sqrt(d_k))  # (B * nh, T, S)
    weights = F.dropout(torch.softmax(scores, dim=-1), dropout_p)
    return torch.bmm(weights, vf).view(B, nh, T, -1)  # (B, nh, T, hd)


class _AttentionProducts(torch.autograd.Function):
    """Y = softmax(alpha Q K^T + beta M) V over (B * nh) heads, and its gradients from the same batched products,
    written out: dP = dY V^T, dV = P^T dY, dS = P * (dP - rowsum(dP * P)) (softmax's backward), dQ = alpha dS K,
    dK = alpha dS^T Q. Autograd's own graph of these ops takes more passes on the CPU: copies of P and K^T for
    transposed products, and alpha applied to dQ and dK separately (6L/384/T256/B8 in bf16 on an Intel Xeon with
    AMX, one thread: the Trainer step ~3% faster, timed by hand in alternating rounds)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, beta: float,
                alpha: float) -> torch.Tensor:
        weights = torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), beta=beta, alpha=alpha), dim=-1)
        ctx.save_for_backward(q, k, v, weights)
        ctx.alpha = alpha
        return torch.bmm(weights, v)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        q, k, v, weights = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_v = torch.bmm(weights.transpose(1, 2), grad_y)
        grad_s = torch._softmax_backward_data(torch.bmm(grad_y, v.transpose(1, 2)), weights, -1, weights.dtype)
        grad_q = torch.baddbmm(q, grad_s, k, beta=0.0, alpha=ctx.alpha)  # (q only gives the output's shape)
        grad_k = torch.baddbmm(k, grad_s.transpose(1, 2), q, beta=0.0, alpha=ctx.alpha)
        return grad_q, grad_k, grad_v, None, None, None


# Up to this many (query, key) pairs, matmul_attention's (B, nh, T, S) bf16 scores are cheap to keep for the backward.
CPU_BF16_FORMULA_MAX = 1024 * 1024


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    mask: Optional[torch.Tensor] = None, causal: bool = True) -> torch.Tensor:
    """The same function as reference_attention through F.scaled_dot_product_attention (which shares
    the key/value heads among query heads itself, without copies); on the CPU in bfloat16 with gradients, through
    matmul_attention, whose backward (bf16 batched matmuls) is 2-3x faster there than the fused kernel's."""
    T, S, gqa = q.size(-2), k.size(-2), k.size(1) != q.size(1)
    training = torch.is_grad_enabled() and q.requires_grad
    if training and q.device.type == "cpu" and q.dtype == torch.bfloat16 and T * S <= CPU_BF16_FORMULA_MAX:
        return matmul_attention(q, k, v, dropout_p, mask, causal)
    if mask is not None:  # a padded batch
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    if not causal:  # an encoder: every query sees every key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
    if T == S:  # no cached past: the plain causal triangle
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    if T == 1:  # one new token sees every cached key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
    mask = causal_mask(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with grouped-query heads (Ainslie et al. 2023: nkv key/value heads, each
    shared by nh/nkv query heads). Q, K and V come from one fused Linear; W^O is `proj`. With qk_norm, each
    head's q and k are RMS-normalised (q_norm, k_norm: a gain per head dimension) before RoPE (Dehghani et al.
    2023), so q.k stays bounded by the gains however large the weights grow."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim,
                             bias=config.bias or config.qkv_bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_drop = dropout(config.dropout)
        self.attend = reference_attention if config.attention == "reference" else fused_attention
        self.causal = config.causal
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                cache: Optional[KVCache] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, C = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split((nh * hd, nkv * hd, nkv * hd), dim=-1)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)  # heads split off
        if self.qk_norm:  # q / rms(q) * g_q and k / rms(k) * g_k over hd
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # (before the heads move forward: each head's rows stay contiguous, so it is cheaper)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd), (B, nkv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd): the past and these T positions
        y = self.attend(q, k, v, self.dropout if self.training else 0.0, mask, self.causal)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)  # heads concatenated: (B, T, nh*hd)
        return self.resid_drop(self.proj(y))  # (B, T, C)


# ---------------------------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """proj(gelu(fc(x))), proj(relu(fc(x))^2) (ReLU^2: So et al. 2021, Primer), or SwiGLU:
    proj(silu(x W_gate) * (x W_up)) (Shazeer 2020), gate and up fused in fc."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        H = config.hidden_dim
        self.kind = config.mlp  # gelu | relu2 | swiglu
        self.fc = nn.Linear(config.n_embd, 2 * H if self.kind == "swiglu" else H, bias=config.bias)
        self.proj = nn.Linear(H, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.drop = dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, H), or (B, T, 2H) for SwiGLU
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)  # (B, T, H) each
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.drop(self.proj(h))  # (B, T, C)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":  # x / rms(x) * g  (Zhang & Sennrich 2019)
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    """Pre-norm Transformer block: attention then MLP, each added to the residual stream."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                cache: Optional[KVCache] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), rope, cache, mask)
        x = x + self.mlp(self.norm_2(x))
        return x


# ---------------------------------------------------------------------------------------------- GPT
class GPT(nn.Module):
    """Decoder-only Transformer: forward(idx (B, T) long) -> logits (B, T, V), or (B, num_labels) for a classifier."""

    added_rows_from: Optional[int] = None  # resize_vocabulary: rows from here on are added tokens' (a LoRA run trains
    # them: lora.train_added_rows)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_encoding == "learned":
            self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        # Activation checkpointing (set by the trainer: train.activation_checkpointing): in training, keep only
        # each block's input and recompute its inside during the backward pass; the same numbers, less memory.
        self.checkpoint_blocks = False
        self.norm_f = make_norm(config)
        if config.head == "classify":  # class scores from the last real token (as GPT2ForSequenceClassification)
            self.classifier = nn.Linear(config.n_embd, config.num_labels, bias=False)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            if config.tie_embeddings:  # one (V, C) matrix embeds tokens and scores them (Press & Wolf 2017)
                self.lm_head.weight = self.tok_emb.weight
        self.reset_buffers()
        self.reset_parameters()

    @classmethod
    def shapes(cls, config: ModelConfig) -> "GPT":
        """A model of `config` on the meta device: its parameters' shapes, no memory, no random initialisation
        (on meta it fills nothing, and torch's meta normal_ first imports torch._dynamo: a second of start-up)."""
        with torch.device("meta"), _SkipInit():
            return cls(config)

    @classmethod
    def empty(cls, config: ModelConfig) -> "GPT":
        """A model of `config` on the CPU whose weights are left uninitialised (torch.empty's memory), to be loaded (a
        checkpoint, an imported model): it skips the random initialisation that loading would overwrite (about a
        second and a half for gpt2-124m); its tables are computed and its tied weights tied as GPT(config)'s."""
        with torch.device("cpu"), _SkipInit():
            return cls(config)

    @torch.no_grad()
    def resize_vocabulary(self, vocab_size: int) -> None:
        """Give the embedding (and an untied lm_head) vocab_size rows, as transformers' resize_token_embeddings: past
        the existing V, rows for tokens added to the tokenizer (Tokenizer.with_added_tokens), each starting at the
        mean of the existing rows (without transformers' tiny random spread), so a new token's logit starts as an
        average one's, and added_rows_from = V; fewer rows keep the first vocab_size (to load a checkpoint of that
        vocabulary into). No kept row changes; config.vocab_size becomes vocab_size."""
        old = self.tok_emb.weight
        V = old.shape[0]

        def resized(weight: torch.Tensor) -> nn.Parameter:  # (V, C) -> (vocab_size, C)
            mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, C)
            rows = torch.cat([weight, mean.expand(vocab_size - V, -1)]) if vocab_size > V else weight[:vocab_size]
            return nn.Parameter(rows.clone(), requires_grad=weight.requires_grad)

        tied = hasattr(self, "lm_head") and self.lm_head.weight is old
        self.tok_emb.weight = resized(old)
        self.tok_emb.num_embeddings = vocab_size
        if hasattr(self, "lm_head"):
            self.lm_head.weight = self.tok_emb.weight if tied else resized(self.lm_head.weight)
            self.lm_head.out_features = vocab_size
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)
        self.added_rows_from = V if vocab_size > V else None

    def reset_buffers(self) -> None:
        """(Re)compute the derived, non-persistent tables, e.g. after `to_empty()` from the meta device."""
        c, device = self.config, self.tok_emb.weight.device
        with torch.device(device):
            if c.pos_encoding == "sinusoidal":
                self.register_buffer("pos_table", sinusoidal_table(c.block_size, c.n_embd), persistent=False)
            if c.pos_encoding == "rope":
                scaling = (c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_context)
                cos, sin = rope_tables(c.block_size, c.head_dim, c.rope_theta,
                                       scaling if c.rope_scaling == "llama3" else None)
                self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hd)
                self.register_buffer("rope_sin", sin, persistent=False)  # (block_size, hd)

    def reset_parameters(self) -> None:
        """GPT-2 init: weights ~ N(0, init_std), biases 0, norms 1; the projections that write into the
        residual stream scaled by 1/sqrt(2 * n_layer), one per residual add (Radford et al. 2019, sec. 2.3),
        or zero with zero_init_proj (each block then starts as the identity: the nanoGPT speedrun)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                if self.config.zero_init_proj:
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def forward(self, idx: torch.Tensor, cache: Optional[KVCache] = None,
                attention_mask: Optional[torch.Tensor] = None, exit_layer: Optional[int] = None,
                targets: Optional[torch.Tensor] = None, loss_chunk: int = 1024, per_row: bool = False,
                per_token: bool = False, temperature: float = 1.0, entropies: bool = False,
                teacher: Optional[Teacher] = None) -> Any:
        """Logits (B, T, V) for token ids idx (B, T); with head: classify, class logits (B, num_labels) from
        each row's last real token (its last True in attention_mask; the last column without one); either soft-
        capped to (-logit_softcap, logit_softcap) when it is set. With a
        cache, idx continues the cached sequence: its positions start at cache.pos, its keys/values are
        appended and cache.pos advances by T.

        attention_mask (B, S), S = cache.pos + T (or T without a cache), marks real tokens True/1 and
        padding False/0 (left padding; a classifier's batch may be right-padded too): a row's positions then
        count only its real tokens, and no real query attends to a pad, so each row computes what it would
        alone (for batches of prompts of different lengths). Packed training rows number their examples
        1, 2, 3, ... instead of True: each example then attends only to itself and its positions start at 0.
        With a static cache (one new token per row, T = 1), S is the cache's length and attention_mask
        marks the columns written so far, this one included, pads excluded.

        exit_layer=N (training with an early-exit loss, LayerSkip): (logits, early logits), the second what the final
        norm and the head read from the N-th block's output: the draft of self-speculative decoding.

        targets (B, T) (training an LM head): instead of the logits, their summed cross-entropy against targets
        (-100: not counted), the head and the loss fused loss_chunk tokens at a time (token_loss), so the (B, T, V)
        logits never exist whole; with exit_layer, the pair (loss, early exit's loss). per_row: each row's sum (B,)
        instead (minus each row's log-probability of its targets: preference training's); per_token: each
        target's own (B, T), 0 where not counted (GRPO's), of the logits divided by temperature (the distribution
        the targets were sampled from), with entropies the pair (that, each counted position's entropy (B, T));
        teacher (knowledge distillation): the triple (alpha D + (1 - alpha) CE, CE, D) of head_loss.linear_distillation
        against the teacher's hidden states at the same positions.
        """
        if targets is not None:
            if teacher is not None:
                return linear_distillation(self.hidden_states(idx, cache, attention_mask), self.lm_head.weight,
                                           targets, teacher, self.config.logit_softcap, loss_chunk)
            if exit_layer is None:
                return self.token_loss(self.hidden_states(idx, cache, attention_mask), targets, loss_chunk, per_row,
                                       per_token, temperature, entropies)
            x, early = self.hidden_states(idx, cache, attention_mask, exit_layer)
            return self.token_loss(x, targets, loss_chunk), self.token_loss(early, targets, loss_chunk)
        if exit_layer is not None:
            x, early = self.hidden_states(idx, cache, attention_mask, exit_layer)
            return self.token_logits(x), self.token_logits(early)
        x = self.hidden_states(idx, cache, attention_mask)  # (B, T, C)
        if self.config.head == "classify":
            B, T = idx.shape
            return self.capped(self.classifier(x[torch.arange(B, device=x.device),
                                                 self.summary_position(attention_mask, B, T)]))
        return self.token_logits(x)  # (B, T, V)

    def last_logits(self, idx: torch.Tensor, cache: Optional[KVCache] = None,
                    attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, V) at the last position of idx only (arguments as forward's): what decoding samples from. A
        prompt's pass then runs the head on one position per row, not on every prompt position."""
        return self.token_logits(self.hidden_states(idx, cache, attention_mask)[:, -1])

    def token_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., V) of hidden states x (..., C): the LM head, soft-capped. Scoring that needs
        only some positions (eval.choices) applies it to those alone."""
        return self.capped(self.lm_head(x))

    def token_loss(self, x: torch.Tensor, targets: torch.Tensor, chunk: int, per_row: bool = False,
                   per_token: bool = False, temperature: float = 1.0, entropies: bool = False) -> Any:
        """Summed cross-entropy of token_logits(x) (B, T, V) against targets (B, T) (-100: not counted), 0-dim fp32
        (per_row: (B,), each row's; per_token: (B, T), each target's, 0 where not counted, of the logits divided by
        temperature, with entropies the pair (that, each counted position's entropy)): the plain head fused with
        the loss, chunk tokens at a time (head_loss); a head LoRA adapts makes its logits whole first."""
        head = self.lm_head
        if isinstance(head, nn.Linear) and head.bias is None:
            if per_token:
                return linear_cross_entropy_tokens(x, head.weight, targets, self.config.logit_softcap, chunk,
                                                   temperature, entropies)
            fused = linear_cross_entropy_rows if per_row else linear_cross_entropy_sum
            return fused(x, head.weight, targets, self.config.logit_softcap, chunk)
        logits = self.token_logits(x).float()
        if per_token:
            return logits_cross_entropy_tokens(logits, targets, temperature, entropies)
        losses = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none")
        return losses.view(targets.shape).sum(-1) if per_row else losses.sum()

    def capped(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits  # soft cap (Gemma 2): |logits| < cap

    def hidden_states(self, idx: torch.Tensor, cache: Optional[KVCache] = None,
                      attention_mask: Optional[torch.Tensor] = None, exit_layer: Optional[int] = None) -> Any:
        """(B, T, C): the last block's output after the final norm, what the head reads (and what embeddings
        pool: generate.embed); arguments as forward's. With exit_layer=N, a pair: that and the N-th block's output
        after the same norm."""
        B, T = idx.shape
        if cache is not None and not self.config.causal:
            raise ValueError("an encoder (model.causal: false) reads the whole text at once: it has no KV cache and "
                             "does not generate")
        start = cache.pos if cache is not None else 0
        mask = None
        if cache is not None and cache.static:  # one new token per row, over fixed shapes (see KVCache)
            positions = attention_mask.long().sum(-1, keepdim=True) - 1  # (B, 1): real tokens before this one
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S): the keys written so far, pads excluded
        elif start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        elif attention_mask is None:
            positions = slice(start, start + T)  # the same T positions for every row
        else:
            positions = sequence_positions(attention_mask, T)  # (B, T): earlier tokens of the same sequence
            mask = padded_mask(attention_mask, T, self.config.causal)  # (B, 1, T, S)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.config.pos_encoding == "learned":
            x = x + self.pos_emb.weight[positions]  # (T, C) broadcast over B, or (B, T, C)
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.pos_table[positions]
        rope = None
        if self.config.pos_encoding == "rope":  # (T, 1, hd), or (B, T, 1, hd): broadcast over the heads
            rope = self.rope_cos[positions].unsqueeze(-2), self.rope_sin[positions].unsqueeze(-2)
        x = self.drop(x)
        early = None
        for layer, block in enumerate(self.blocks):
            if self.checkpoint_blocks and torch.is_grad_enabled() and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, None, mask, use_reentrant=False)
            else:
                x = block(x, rope, cache, mask)
            if layer + 1 == exit_layer:
                early = self.norm_f(x)
        if cache is not None:
            cache.pos += T
        return self.norm_f(x) if exit_layer is None else (self.norm_f(x), early)

    def summary_position(self, attention_mask: Optional[torch.Tensor], B: int, T: int) -> torch.Tensor:
        """(B,) the position whose hidden state a classify head reads: a decoder's last real token (the only one
        that has seen the whole text), an encoder's first (its start token, as BERT's [CLS])."""
        if attention_mask is None:
            return torch.full((B,), T - 1 if self.config.causal else 0, device=self.tok_emb.weight.device)
        real = (attention_mask.long() > 0).long()  # (B, T)
        if self.config.causal:
            return (real * torch.arange(T, device=real.device)).argmax(-1)  # the last real column
        return real.argmax(-1)  # the first real column


# ------------------------------------------------------------------------------------------ KV cache
class KVCache:
    """Keys and values of the positions seen so far, for decoding one token at a time.

    Pre-allocated once, (B, nkv, max_len, hd) per layer for keys and for values, and filled in place:
    a decoding step writes one slice instead of concatenating tensors. `pos` counts the positions filled.

    A static view (KVCache.static_view) of the same buffers keeps their shapes fixed, so a decoding step over
    it compiles once for every length (lmforge.generate.compiled): `pos` is then a (1,) tensor, each step
    writes one column at pos and attends over the first `length` columns (a size the compiler keeps
    symbolic), the attention mask marking those written, pads excluded.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: Optional[int] = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, config.n_kv_head, max_len or config.block_size, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos: int | torch.Tensor = 0
        self.static = False

    @classmethod
    def for_model(cls, model: GPT, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        """A cache of max_len columns (block_size when None) in the model's device and dtype."""
        weight = model.tok_emb.weight
        return cls(model.config, batch_size, max_len, device=weight.device, dtype=weight.dtype)

    @classmethod
    def static_view(cls, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], pos: torch.Tensor,
                    length: int) -> KVCache:
        """A static cache over the buffers k, v (one (B, nkv, max_len, hd) per layer), writing at column pos (1,)
        and attending over its first `length` columns."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.pos, cache.static, cache.length = list(k), list(v), pos, True, length
        return cache

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) at positions pos..pos+T-1 of `layer`; return all (B, nkv, pos+T, hd)
        (a static view: T = 1, and the first `length` columns, (B, nkv, length, hd))."""
        if self.static:
            self.k[layer].index_copy_(2, self.pos, k)
            self.v[layer].index_copy_(2, self.pos, v)
            return self.k[layer].narrow(2, 0, self.length), self.v[layer].narrow(2, 0, self.length)
        T = k.size(2)
        self.k[layer].narrow(2, self.pos, T).copy_(k)
        self.v[layer].narrow(2, self.pos, T).copy_(v)
        return self.k[layer].narrow(2, 0, self.pos + T), self.v[layer].narrow(2, 0, self.pos + T)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows `index` (B,) of every layer, in that order (beam search: each beam's parent)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]

    def reset(self) -> None:
        self.pos = 0


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Inside it, torch.nn.init's in-place fills (normal_, uniform_, zeros_, kaiming_uniform_, ...) return their
    tensor untouched: for modules built on the meta device, where there is nothing to fill, or whose every weight
    is loaded next (GPT.shapes, GPT.empty). Other torch functions run as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------ parameters and FLOPs
class ParameterCount(NamedTuple):
    total: int  # every distinct parameter (a tied embedding counted once)
    non_embedding: int  # total minus the token and learned position embeddings (Kaplan et al. 2020)


def count_parameters(config: ModelConfig) -> ParameterCount:
    """Parameter counts of GPT(config), found by building it on the meta device (no memory used)."""
    model = GPT.shapes(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.tok_emb.weight.numel()
    if config.pos_encoding == "learned":
        embedding += model.pos_emb.weight.numel()
    return ParameterCount(total, total - embedding)


def flops_per_token(config: ModelConfig, seq_len: Optional[int] = None) -> int:
    """Training FLOPs (forward + backward) per token: 6N + 12 * n_layer * n_head * head_dim * T.

    PaLM (Chowdhery et al. 2022), appendix B; Chinchilla (Hoffmann et al. 2022), appendix F counts the
    same terms. N counts the weights used in matrix products: the non-embedding parameters plus the
    LM head (V * C, also when it is tied to the embedding; a classifier has none). The attention term is QK^T and AV over
    T = seq_len (default block_size) keys, without discounting the causal half (as PaLM).
    """
    T = seq_len or config.block_size
    tied_head = config.tie_embeddings and config.head == "lm"  # a head that is the embedding: not in non_embedding
    N = count_parameters(config).non_embedding + (config.vocab_size * config.n_embd if tied_head else 0)
    return 6 * N + 12 * config.n_layer * config.n_head * config.head_dim * T
