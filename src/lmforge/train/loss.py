"""Cross-entropy for next-token prediction.

Labels equal to ``IGNORE_INDEX`` (prompt tokens in fine-tuning, padding) add nothing to the loss.
The trainer sums the loss over a whole optimizer step and divides by the number of counted labels
in the global batch, so k micro-batches of B/k give the same gradient as one batch of B even when
the micro-batches hold different numbers of counted labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.data.batches import IGNORE_INDEX  # defined with the batches whose labels carry it


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (nats) over the labels that are not IGNORE_INDEX.

    logits: (B, T, V) any float dtype (computed in fp32); labels: (B, T) long. Returns a 0-dim fp32 tensor.
    """
    B, T, V = logits.shape
    return F.cross_entropy(logits.float().view(B * T, V), labels.reshape(B * T),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per counted label); logits (B, T, V), labels (B, T)."""
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return cross_entropy_sum(logits, labels) / count


def count_labels(labels: torch.Tensor) -> int:
    """Number of labels that count towards the loss."""
    return int((labels != IGNORE_INDEX).sum())
