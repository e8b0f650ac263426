"""An importance matrix for GGUF's 2- to 6-bit types, measured by lmforge on calibration text (what llama.cpp's
llama-imatrix measures, then hands to llama-quantize with --imatrix).

Rounding a weight matters in proportion to the activations it multiplies: a matrix W (out, in) turns x into W x,
so an error e in row r, column c moves output r by e * x_c, whose expected square is e^2 * E[x_c^2]. The
importance of column c is therefore the mean of x_c^2 over real text, one number per input column of every
matrix; the quantizers of Q2_K to Q6_K and IQ4 (gguf_kquants.quantize(..., importance)) then weigh each weight's
error by it, as llama.cpp's quantize_row_*_impl do, and spend their few levels where the text needs them.

Measured here by forward pre-hooks on the blocks' matrices while the model reads the calibration text in windows
of its context: q, k and v (and Llama's gate and up) read the same input, so the tensors split from one lmforge
matrix share its importance. Like llama-imatrix's default, the head (output.weight) gets none unless asked for
(llama-imatrix --process-output): it reads the final hidden states. Each matrix's sums are kept as llama-imatrix
keeps them (Activations), so that gguf_imatrix_file can write them in llama.cpp's own imatrix file.
"""

from __future__ import annotations

import re
import sys
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

# GGUF tensor -> the lmforge matrix whose input it reads (blk.N. prefix apart)
SOURCES = {"attn_q": "attn.qkv", "attn_k": "attn.qkv", "attn_v": "attn.qkv", "attn_qkv": "attn.qkv",
           "attn_output": "attn.proj", "ffn_gate": "mlp.fc", "ffn_up": "mlp.fc", "ffn_down": "mlp.proj"}
_GGUF_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
HEAD = "lm_head"  # the module the head's GGUF matrix (output.weight) belongs to


class Activations(NamedTuple):
    """What one matrix's input added up to over the calibration text, as llama-imatrix keeps it."""
    sum2: np.ndarray  # (in,) float64: each input column's sum of squares
    sum: Optional[np.ndarray]  # (in,) float64: each input column's sum (llama.cpp's in_sum; optional in its files)
    count: int  # the vectors read (tokens)

    def importance(self) -> np.ndarray:
        """The column's mean square (in,) float32: what the quantizers weigh each weight's error by."""
        return (self.sum2 / self.count).astype(np.float32)

    def merged(self, other: "Activations") -> "Activations":
        """The two texts' statistics together (llama-imatrix --in-file): sums and counts add."""
        total = None if self.sum is None or other.sum is None else self.sum + other.sum
        return Activations(self.sum2 + other.sum2, total, self.count + other.count)


def source_module(gguf_name: str) -> Optional[str]:
    """The lmforge module whose input a GGUF matrix multiplies ("blk.3.attn_q.weight" -> "blocks.3.attn.qkv",
    "output.weight" -> "lm_head"), or None (embeddings, norms)."""
    if gguf_name == "output.weight":
        return HEAD
    match = _GGUF_NAME.fullmatch(gguf_name)
    if match is None or match[2] not in SOURCES:
        return None
    return f"blocks.{match[1]}.{SOURCES[match[2]]}"


def start_each_window(tokens: torch.Tensor, context: int, start_id: int) -> torch.Tensor:
    """The text's tokens as llama-imatrix reads them: the start token in front, whole windows of `context` tokens
    only (the tail shorter than a window left out), and each window's first token replaced by the start token.
    Windows read in this order measure what llama-imatrix measures, to float rounding."""
    ids = torch.cat([torch.tensor([start_id], dtype=tokens.dtype), tokens])
    ids = ids[: len(ids) // context * context].clone()
    ids[::context] = start_id
    return ids


def measure_importance(model: nn.Module, tokens: torch.Tensor, context: int,
                       batch_size: int = 8) -> dict[str, np.ndarray]:
    """{module name: mean square of its input per column (in,) float32} for every block matrix of `model`, over
    `tokens` (1-D) read in windows of `context` tokens (the last, shorter one too)."""
    return {name: a.importance() for name, a in measure_activations(model, tokens, context, batch_size).items()}


def measure_activations(model: nn.Module, tokens: torch.Tensor, context: int, batch_size: int = 8,
                        head: bool = False, progress: bool = False) -> dict[str, Activations]:
    """{module name: Activations} for every block matrix of `model` (and with `head` the head, "lm_head": the
    final hidden states it reads), over `tokens` (1-D) read in windows of `context` tokens (the last, shorter one
    too). `progress`: a bar over the tokens read, on stderr when it is a terminal."""
    wanted = {f"blocks.{i}.{part}" for i in range(len(model.blocks)) for part in set(SOURCES.values())}
    sums: dict[str, torch.Tensor] = {}
    totals: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.size(-1)).double()
        sums[name] = sums.get(name, 0) + (x * x).sum(0)
        totals[name] = totals.get(name, 0) + x.sum(0)
        counts[name] = counts.get(name, 0) + x.size(0)

    def hook(name: str):
        return lambda _module, inputs: record(name, inputs[0])

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in model.named_modules()
               if name in wanted]
    windows = [tokens[i:i + context] for i in range(0, len(tokens), context)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(tokens), desc="imatrix", unit="tok", unit_scale=True, file=sys.stderr,
                                   leave=False, dynamic_ncols=True, disable=None if progress else True) as bar:
            for i in range(0, len(windows), batch_size):
                group = windows[i:i + batch_size]
                for length in sorted({len(w) for w in group}):  # the last window may be shorter
                    hidden = model.hidden_states(torch.stack([w for w in group if len(w) == length]))
                    if head:  # what the head multiplies (its product itself is not needed)
                        record(HEAD, hidden)
                bar.update(sum(len(w) for w in group))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: Activations(sums[name].numpy(), totals[name].numpy(), counts[name]) for name in sums}
