"""Weights under which a parity test can fail: sharp attention, and its measure.

With the std 0.02 init, Q K^T is near zero and every query attends almost uniformly: a wrong attention scale
(1.05x) then changes the logits by less than 1e-5 and a parity test passes anyway. Scaling the query and key
projections makes each query pick a few keys, so the softmax temperature, the positions (RoPE base) and
everything after attention show in the logits. Likewise the MLP's input weights are scaled so that its
pre-activations reach the range (|h| ~ 1-3) where GELU and its tanh approximation differ.
"""

from __future__ import annotations

import torch

SHARPNESS = 32.0  # factor on the query and key weights (and biases)
MLP_GAIN = 10.0  # factor on the MLP's input weights
MAX_ENTROPY = 0.5  # the mean attention entropy over log(keys seen) the parity tests accept; 1.0 is uniform


@torch.no_grad()
def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Scale the query and key rows of every lmforge qkv projection by SHARPNESS and the MLP's input weights
    by MLP_GAIN; returns `model`."""
    for block in model.blocks:
        attn = block.attn
        qk = (attn.n_head + attn.n_kv_head) * attn.head_dim  # q then k rows of the fused (q, k, v) Linear
        attn.qkv.weight[:qk].mul_(SHARPNESS)
        if attn.qkv.bias is not None:
            attn.qkv.bias[:qk].mul_(SHARPNESS)
        block.mlp.fc.weight.mul_(MLP_GAIN)
    return model


@torch.no_grad()
def sharpen_hf_gpt2(model: torch.nn.Module) -> torch.nn.Module:
    """The same for a transformers GPT-2 (its c_attn is a Conv1D: (C, 3C), q and k in the first 2C columns)."""
    for block in model.transformer.h:
        C = block.attn.c_attn.weight.size(0)
        block.attn.c_attn.weight[:, :2 * C].mul_(SHARPNESS)
        block.attn.c_attn.bias[:2 * C].mul_(SHARPNESS)
        block.mlp.c_fc.weight.mul_(MLP_GAIN)
    return model


@torch.no_grad()
def attention_entropy(hf_model: torch.nn.Module, idx: torch.Tensor, first_row: int = 8) -> float:
    """Mean entropy of the attention rows of a transformers model on idx (B, T), each over log(keys it sees),
    for queries that see at least `first_row` keys: 1.0 when uniform, 0.0 when each query picks one key."""
    hf_model.set_attn_implementation("eager")  # the attention-weights path of transformers
    entropies = []
    for weights in hf_model(idx, output_attentions=True).attentions:  # per layer (B, nh, T, T)
        T = weights.size(-1)
        h = -(weights * weights.clamp_min(1e-30).log()).sum(-1)  # (B, nh, T)
        seen = torch.arange(1, T + 1, dtype=h.dtype)  # query t sees t + 1 keys
        entropies.append((h[..., first_row - 1:] / seen[first_row - 1:].log()).flatten())
    return torch.cat(entropies).mean().item()

