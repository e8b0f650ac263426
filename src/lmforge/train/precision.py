"""Numeric precision of the forward pass.

fp32: everything in float32. bf16-mixed: weights, gradients and optimizer state stay float32; matrix
products run in bfloat16 under torch.autocast (CPU and CUDA), the loss is computed in float32.
bfloat16 keeps float32's exponent range, so no loss scaling is needed (unlike fp16).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The context to run forward passes in for `precision` ('fp32' | 'bf16-mixed') on `device`."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}")  # config validation makes this unreachable
