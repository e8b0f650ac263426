"""Cross-entropy for next-token prediction and for classification.

Labels equal to ``IGNORE_INDEX`` (prompt tokens in fine-tuning, padding) add nothing to the loss.
The trainer sums the loss over a whole optimizer step and divides by the number of counted labels
in the global batch, so k micro-batches of B/k give the same gradient as one batch of B even when
the micro-batches hold different numbers of counted labels. A classifier's labels are one per example
(logits (B, K), labels (B,)): the same sum, divided by the number of examples.

Class weights (train.class_weights: balanced) multiply each example's loss by its gold class's weight,
w_k = n / (K * n_k) over the train split's n examples, n_k of class k (scikit-learn's "balanced"), and the
sum is still divided by the number of examples: loss = (1/N) sum_i w[y_i] * -log p(y_i | x_i). On the train
distribution the weights average 1, so the loss keeps the scale of the unweighted one.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from lmforge.data.batches import IGNORE_INDEX  # defined with the batches whose labels carry it


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                      weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Summed cross-entropy (nats) over the labels that are not IGNORE_INDEX, each times weight[label] if given.

    logits: (B, T, V) or (B, K) for a classifier, any float dtype (computed in fp32); labels: (B, T) or (B,)
    long; weight: (V,) or (K,) fp32, or None. Returns a 0-dim fp32 tensor.
    """
    V = logits.size(-1)
    return F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), weight=weight,
                           ignore_index=IGNORE_INDEX, reduction="sum")


def balanced_class_weights(counts: Sequence[int]) -> torch.Tensor:
    """(K,) fp32 weights w_k = n / (K * n_k) from the train split's examples per class (n_k >= 1)."""
    counts_t = torch.tensor([float(c) for c in counts])
    return counts_t.sum() / (len(counts) * counts_t.clamp(min=1.0))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per counted label); logits (B, T, V), labels (B, T)."""
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return cross_entropy_sum(logits, labels) / count


def count_labels(labels: torch.Tensor) -> int:
    """Number of labels that count towards the loss."""
    return int((labels != IGNORE_INDEX).sum())
