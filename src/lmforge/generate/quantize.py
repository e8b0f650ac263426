"""Fewer bytes read per decoded token: lower-precision weights, or int8 weight-only Linear layers."""

from __future__ import annotations

import sys
import typing
from typing import Optional

import torch

from lmforge.distributed import slow_half_warning
from lmforge.errors import ConfigError
from lmforge.generate.config import Dtype, Quantize
from lmforge.model import GPT
from lmforge.nf4 import quantize_blocks

DTYPES: dict[str, torch.dtype] = dict(zip(typing.get_args(Dtype), (torch.float32, torch.bfloat16, torch.float16)))


class Int8Linear(torch.nn.Module):
    """nn.Linear with int8 weights, one scale per output channel (weight-only quantization, as torchao's
    int8 weight-only; symmetric: w ~= scale * q, q in [-127, 127]). Decoding one token reads every weight
    once, so a quarter of fp32's bytes is most of the speed; the product runs on bf16 activations
    (PyTorch's _weight_int8pack_mm kernel) and returns fp32. On an AVX2-only CPU that kernel is still 1.1-1.5x
    slower than an fp32 nn.Linear at batch 1-8, width 384 (benchmarks/results/bf16_speed-cpu-amd-avx2.json)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("qweight", (w / scale[:, None]).round().to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dense_weight(self) -> torch.Tensor:
        """The weight this layer computes with, scale * q, in fp32 (out, in)."""
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.qweight, self.scale)
        y = y.float().view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def apply_inference_dtype(model: GPT, dtype: str = "fp32", quantize: Optional[str] = None) -> GPT:
    """The model for decoding with fewer bytes read per token: `dtype` fp32 (exact, default) | bf16 | fp16
    casts every weight; `quantize="int8"` replaces every nn.Linear by an Int8Linear (CPU, fp32 model;
    the token embedding stays fp32); `quantize="nf4"` stores the blocks' Linear layers as QLoRA does (nf4.NF4Linear,
    bitsandbytes' 4-bit bytes; the embedding and head as they are): about a seventh of fp32's memory for them, each
    product dequantizing its weight, so slower to decode than fp32, but the very base QLoRA runs of this model
    trained on (serve's lora_modules takes them over it). Modifies and returns `model`. bf16 or fp16 on a CPU without
    matrix instructions for it prints one warning line on stderr (distributed.slow_half_warning): it decodes, far
    slower than fp32."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is invalid: choose one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in typing.get_args(Quantize):
        raise ConfigError(f"quantize={quantize!r} is invalid: null or one of {', '.join(typing.get_args(Quantize))}")
    device = model.tok_emb.weight.device
    slow = dtype != "fp32" and slow_half_warning(device, f"dtype={dtype}", "--dtype fp32 (the default)", DTYPES[dtype])
    if slow:
        print(f"warning: {slow}", file=sys.stderr, flush=True)
    model = model.to(DTYPES[dtype])
    if quantize == "int8":
        if device.type != "cpu" or dtype != "fp32":
            raise ConfigError("quantize='int8' runs on the CPU with dtype fp32; use --device cpu, or bf16 instead")
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(module, name, Int8Linear(child))
    if quantize == "nf4":
        quantize_blocks(model)
    return model
