"""QLoRA's 4-bit frozen weights (Dettmers et al. 2023): NormalFloat4 (NF4), blockwise, as bitsandbytes stores them.

A weight is cut, flattened row by row, into blocks of 64 values; each block keeps its absolute maximum (fp32) and
each value becomes the index of the nearest of 16 levels, the quantiles of a normal distribution scaled to [-1, 1]
(NF4: information-theoretically right for normally distributed weights, exact 0 and +-1 included):

    q = argmin_j |w / absmax - NF4[j]|,        w ~ NF4[q] * absmax

two indices to a byte (the first in the high nibble): 0.5 bytes per weight plus 4 bytes per 64 for the maxima,
0.5625 in all (fp32: 4). QLoRA's double quantization stores the maxima in 8 bits too: their mean subtracted, blocks
of 256 scaled by their own fp32 maximum, each the nearest of the 256 values of bitsandbytes' dynamic map (signed
fractions at seven decades: fine near 0, coarse near 1); 0.5159 bytes a weight in all. The bytes, maxima and
dequantized values are bitsandbytes' quantize_4bit(w, blocksize=64, quant_type="nf4") ones (tests/test_qlora.py), so
a model quantized here computes what transformers loads with BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4"); with double quantization (compress_statistics, bnb_4bit_use_double_quant) each maximum's
code is the nearest one, where bitsandbytes' CPU kernel reads it from a table of 65536 points and so may take the
other neighbour for a value within 1/65535 of the midpoint between two codes.

NF4Linear is a frozen nn.Linear stored so; its product dequantizes the weight as it runs, forward and backward
(the dense weight is never kept for backward), so a QLoRA run (lora.quantize nf4) holds its base in about a seventh
of fp32's bytes while its adapters train in full precision.
"""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.allocator import release_freed_memory

BLOCK = 64  # values per absmax: bitsandbytes' default blocksize for 4-bit weights, QLoRA's
BYTES_PER_WEIGHT = 0.5 + 4 / BLOCK  # two to a byte, and a fp32 maximum per block
MAXIMA_BLOCK = 256  # double quantization: maxima per fp32 maximum of theirs
DOUBLE_BYTES_PER_WEIGHT = 0.5 + (1 + 4 / MAXIMA_BLOCK) / BLOCK  # the maxima in 8 bits, 4 bytes per 256 of them
# The 16 NF4 levels (QLoRA, appendix E): N(0, 1)'s quantiles at 8 evenly spaced probabilities from 0.9677 down to 0.5
# (positive side) and 7 (negative side), plus 0, each side divided by its largest: as fp32, bitsandbytes' table.
LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)
MIDPOINTS = (LEVELS[:-1] + LEVELS[1:]) / 2  # a value on a midpoint takes the lower level (torch.bucketize)
PAIRS = torch.stack(torch.meshgrid(LEVELS, LEVELS, indexing="ij"), dim=-1).reshape(256, 2)  # byte -> its two levels
PAIRS64 = PAIRS.view(torch.int64).view(-1)  # the same, each pair as one 8-byte item (one gather a byte)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed (ceil(n / 2),) uint8, absmax (ceil(n / 64),) fp32) of `weight`'s n values, flattened."""
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    padded = F.pad(flat, (0, -n % BLOCK)).view(-1, BLOCK)  # zeros change no block's maximum
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n + n % 2]  # pairs
    index = torch.bucketize(scaled, MIDPOINTS.to(flat.device)).to(torch.uint8)
    return (index[0::2] << 4) | index[1::2], absmax


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2016, "8-bit approximations for parallelism"), sorted: for
    each decade e = 0..6, 2^e fractions (the midpoints of 2^e + 1 points evenly spaced from 0.1 to 1) times
    10^(e - 6), with both signs; then 0 and 1. 256 values, dense near 0."""
    values = [torch.zeros(1), torch.ones(1)]
    for e in range(7):
        points = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        middles = (points[:-1] + points[1:]) / 2.0
        values += [10 ** (e - 6) * middles, -(10 ** (e - 6)) * middles]
    return torch.cat(values).sort().values


DYNAMIC = _dynamic_map()


def compress_maxima(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA's double quantization of a weight's block maxima: (codes (m,) uint8, the fp32 maximum of each 256 of
    them after the mean is subtracted (ceil(m / 256),), that mean (0-d fp32))."""
    offset = absmax.mean()
    centred = absmax - offset
    m = centred.numel()
    padded = F.pad(centred, (0, -m % MAXIMA_BLOCK)).view(-1, MAXIMA_BLOCK)
    scale = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / scale.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:m]
    bounds = (DYNAMIC[:-1] + DYNAMIC[1:]) / 2
    return torch.bucketize(scaled, bounds.to(absmax.device)).to(torch.uint8), scale, offset


def expand_maxima(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The block maxima compress_maxima stored: DYNAMIC[code] * their block's maximum + the mean, fp32."""
    m = codes.numel()
    values = DYNAMIC.to(codes.device)[codes.long()]
    values = F.pad(values, (0, -m % MAXIMA_BLOCK)).view(-1, MAXIMA_BLOCK) * scale[:, None]
    return values.reshape(-1)[:m] + offset


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of `shape` that quantize packed: NF4[q] * absmax in fp32, then cast to `dtype`. Each byte's two
    levels are one 8-byte entry of a 256-entry table, gathered at once (a third of the time of two lookups of
    nibbles; under torch.compile the whole of it fuses into the step's kernels)."""
    n = shape.numel()
    values = torch.index_select(PAIRS64.to(packed.device), 0, packed.int()).view(torch.float32)  # (2 * bytes,)
    if values.numel() != absmax.numel() * BLOCK:  # a last block cut short
        values = F.pad(values, (0, absmax.numel() * BLOCK - values.numel()))
    values = values.view(-1, BLOCK).mul_(absmax[:, None])
    return values.reshape(-1)[:n].view(shape).to(dtype)


def round_trip(weight: torch.Tensor, double: bool = False) -> torch.Tensor:
    """The values an NF4Linear of `weight` computes with (fp32): quantized and dequantized again, its maxima through
    8 bits too with `double`. What QLoRA's base loses of a weight is weight - round_trip(weight)."""
    packed, absmax = quantize(weight)
    if double:
        absmax = expand_maxima(*compress_maxima(absmax))
    return dequantize(packed, absmax, weight.shape)


class _FrozenProduct(torch.autograd.Function):
    """x W^T for an NF4Linear's frozen W: the weight dequantized in the forward and again in the backward, which
    gives x its gradient (W none), so no dense copy is kept between them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "NF4Linear") -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, x.dtype
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return F.linear(x.to(dtype), layer.dense(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (grad @ ctx.layer.dense(grad.dtype)).to(ctx.dtype), None


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight is stored in NF4 (see the module docstring), its block maxima in fp32
    (`absmax`) or, with `double` (QLoRA's double quantization), in 8 bits (`absmax_codes`, `absmax_scale`,
    `absmax_offset`: compress_maxima); its bias stays as it was. forward(x (..., in)) -> (..., out), in x's dtype
    (autocast's under autocast)."""

    def __init__(self, linear: nn.Linear, double: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed, absmax = quantize(linear.weight)
        self.register_buffer("packed", packed)
        self.double = double
        if double:
            for name, tensor in zip(("codes", "scale", "offset"), compress_maxima(absmax)):
                self.register_buffer(f"absmax_{name}", tensor)
        else:
            self.register_buffer("absmax", absmax)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def maxima(self) -> torch.Tensor:
        """The weight's block maxima (fp32), as stored or expanded from 8 bits."""
        return expand_maxima(self.absmax_codes, self.absmax_scale, self.absmax_offset) if self.double else self.absmax

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer computes with, (out, in), dequantized."""
        return dequantize(self.packed, self.maxima(), torch.Size((self.out_features, self.in_features)), dtype)

    dense_weight = dense  # (the name generate.quantize.Int8Linear gives it: lora.AdapterSwitch reads either)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenProduct.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocks of {BLOCK}"
                + (", maxima in 8 bits" if self.double else ""))


def quantize_blocks(model: nn.Module, double: bool = False) -> int:
    """Replace every nn.Linear in model.blocks by an NF4Linear (QLoRA quantizes the transformer's layers; the
    embedding, the lm_head and a task head stay as they are, as bitsandbytes leaves a model's output layer);
    `double`: their maxima in 8 bits too. The dense weights, freed, go back to the OS (which the trainer's malloc
    settings would otherwise keep). In place; returns how many were replaced."""
    count = 0
    for name, module in list(model.blocks.named_modules()):
        if isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.blocks.get_submodule(parent_name), child, NF4Linear(module, double))
            count += 1
    del module
    gc.collect()
    release_freed_memory()
    return count


def dequantize_blocks(model: nn.Module) -> nn.Module:
    """Put a plain, frozen nn.Linear holding the dequantized weight in place of every NF4Linear (what the layers
    computed with): the model is an ordinary one again. In place; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(module.dense(), requires_grad=False)
            linear.bias = module.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, linear)
    return model
