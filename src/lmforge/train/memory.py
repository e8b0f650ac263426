"""Memory a training run needs, estimated from its config before anything is allocated.

A setting the checker allows (train.batch_size 65536, model.n_embd 1000000) can still need more memory than
the machine has; torch then fails deep inside an allocation, or the machine swaps for hours. The estimate
is a floor, not a forecast: fp32 weights, gradients and AdamW's two moments (16 bytes per parameter), and
per token of a micro-batch the activations a backward pass must keep (about 10 C floats per layer, plus the
logits and their gradient, 2 V floats). A run over the floor cannot fit; one under it may still not.
"""

from __future__ import annotations

import os

from lmforge.config import ModelConfig, RunConfig
from lmforge.errors import ConfigError

GB = 1e9


def parameter_count(m: ModelConfig) -> int:
    """Parameters of the model `m` describes: embeddings, blocks (attention with its key/value heads, MLP), head."""
    C, V, head_dim = m.n_embd, m.vocab_size, m.head_dim
    attention = C * C * 2 + 2 * C * m.n_kv_head * head_dim  # q and output projections, k and v
    mlp = (3 if m.mlp == "swiglu" else 2) * C * m.hidden_dim
    embeddings = V * C * (1 if m.tie_embeddings else 2) + (m.block_size * C if m.pos_encoding == "learned" else 0)
    return embeddings + m.n_layer * (attention + mlp)


def estimated_bytes(config: RunConfig) -> int:
    """The floor of memory one process needs to train `config` (see the module docstring)."""
    m = config.model
    tokens = config.train.batch_size * m.block_size
    activations = 4 * tokens * (10 * m.n_layer * m.n_embd + 2 * m.vocab_size)
    return 16 * parameter_count(m) + activations


def available_bytes(device: str) -> int:
    """Memory of `device`: a CUDA device's total, else the machine's physical memory."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(config: RunConfig, device: str) -> None:
    """ConfigError naming both numbers when the estimate alone exceeds what `device` has."""
    need, have = estimated_bytes(config), available_bytes(device)
    if need > have:
        m = config.model
        raise ConfigError(f"this run needs at least {need / GB:,.0f} GB of memory ({parameter_count(m):,} parameters, "
                          f"batches of {config.train.batch_size} x {m.block_size} tokens) and {device} has "
                          f"{have / GB:,.0f} GB: lower train.batch_size (raise train.grad_accum instead), "
                          "model.block_size or the model's size")
