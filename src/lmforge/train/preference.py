"""Preference fine-tuning (DPO, KTO) in the one training loop: the reference model, and the loss of a batch.

Preference data (`lmforge prepare --task preference`) comes in batches of 2P rows: rows 2k and 2k + 1 are pair k's
chosen and rejected example, each [start] prompt completion [end] with labels only on the completion, as sft's.
The loss is lmforge.preference_loss's: the policy's and the reference's log-probabilities of each completion give
the two implicit rewards, and -log sigmoid of their difference (beta, label smoothing from train.dpo_*), or another
preference loss (train.preference_loss: robust, hinge, ipo, or simpo and orpo, which need no reference). The
trainer sums it over pairs and divides by the pairs of the global batch, as it divides a token loss by its labels.

Unpaired preference data (`lmforge prepare --task unpaired`) comes in batches of B completions, each labelled
desirable or not, with B mismatched rows beside them (data.batches.unpaired_batch: each prompt followed by another
example's completion). KTO's loss compares each completion's log-ratio to the policy with a reference point z, an
estimate of the KL divergence of the policy from the reference: the mean log-ratio of the mismatched rows of the
global micro-batch (kl_reference_point; computed without gradients, as TRL's KTOTrainer does).

A completion's log-probability comes from the LM head fused with its loss, row by row (GPT.forward's per_row,
lmforge.head_loss: only the completion's positions reach the head, no (2P, T, V) logits), or with
train.loss_chunk 0 from the whole logits (preference_loss.sequence_logprobs).

The reference is the model the run starts from (train.init_from), frozen (none for simpo and orpo): a copy of it
for full fine-tuning (and for LoRA adapters that start from a LoRA run's: merged into the copy), and for new LoRA
adapters the trained model itself with its adapters off (lmforge.lora.adapters_off),
which costs no memory. A resumed run rebuilds it from train.init_from, so it never drifts. With
train.precompute_reference it scores every completion once instead, and RUN_DIR/reference_logps.safetensors keeps
the scores (read_scores / write_scores): a resumed run reads them back when they were made by the same weights on
the same data with the same arithmetic settings, else it scores again. Dropout is off in
preference training (the trainer sets model.dropout 0, as TRL does): otherwise the policy's log-probabilities would
be noisy against the reference's and the first step's loss would not be log 2.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from lmforge.data.batches import Examples, pad_examples, pair_rows, unpaired_batch
from lmforge.distributed import DistInfo, all_reduce_sum
from lmforge.lora import adapters_off, is_adapted, merge_lora
from lmforge.preference_loss import PreferenceLoss, reference_point


def frozen_reference(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` (eval mode, no gradients): the reference of full-model preference training, and of
    a LoRA run whose adapters start from another LoRA run's (folded into the copy's weights: a plain GPT)."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return merge_lora(reference) if is_adapted(reference) else reference


@contextlib.contextmanager
def reference_model(reference: Optional[nn.Module], policy: nn.Module) -> Iterator[nn.Module]:
    """The module that computes the reference's logits: `reference`, or (LoRA) the policy with its adapters off.
    A reference sharded with FSDP2 (train.parallel fsdp) is resharded after its use: FSDP keeps the root's gathered
    weights (embeddings, head) after a forward for the backward that follows, and the reference has none."""
    if reference is not None:
        try:
            yield reference
        finally:
            if hasattr(reference, "reshard"):  # an FSDPModule
                reference.reshard()
        return
    if not is_adapted(policy):
        raise ValueError("preference training needs a frozen reference model, or a LoRA-adapted policy")
    with adapters_off(policy):
        yield policy


def pair_terms(loss: PreferenceLoss, policy: torch.Tensor, reference: Optional[torch.Tensor], tokens: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward), each (P,), of a batch of P pairs from each row's completion
    log-probability (2P,) under the policy and the reference (None for a reference-free loss) and its completion
    tokens (2P,); rows 2k / 2k + 1 are pair k's chosen / rejected."""
    chosen, rejected = slice(0, None, 2), slice(1, None, 2)  # rows 2k, 2k + 1
    ref = (None, None) if reference is None else (reference.detach()[chosen], reference.detach()[rejected])
    return loss(policy[chosen], policy[rejected], tokens[chosen], tokens[rejected], *ref)


def kl_reference_point(log_ratios: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """KTO's reference point z: the mean of the mismatched rows' log-ratios log pi(y' | x) - log pi_ref(y' | x) over
    every process's rows (the global micro-batch), clamped at 0 (a KL divergence is never negative), detached."""
    totals = torch.stack([log_ratios.detach().double().sum(),
                          torch.tensor(float(len(log_ratios)), dtype=torch.float64, device=log_ratios.device)])
    totals = all_reduce_sum(totals, dist)
    return reference_point(totals[0], totals[1])


SCORES_FILE = "reference_logps.safetensors"  # in the run directory: train.precompute_reference's scores
SCORES_FORMAT = "lmforge-reference-logps-v1"


def read_scores(path: Path, key: dict[str, Any]) -> Optional[dict[str, np.ndarray]]:
    """The scores {split: (n,) float32} saved at `path` under exactly `key` (format, the base's fingerprint, the
    data's manifest, the settings that change the arithmetic, each split's size), or None: no file, another key, or
    a file that cannot be read (it is a cache: scoring again is always right)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            saved = json.loads((f.metadata() or {}).get("key", "null"))
            scores = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError, ValueError, RecursionError):
        return None
    if saved != key or set(scores) != {k for k in key["sizes"]}:
        return None
    if any(scores[k].dtype != np.float32 or scores[k].shape != (n,) for k, n in key["sizes"].items()):
        return None
    return scores


def write_scores(path: Path, key: dict[str, Any], scores: dict[str, np.ndarray]) -> None:
    """Save `scores` with `key` (read_scores), atomically: a half-written file is never found."""
    from safetensors.numpy import save

    from lmforge.files import atomic_write_bytes

    atomic_write_bytes(path, save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in scores.items()},
                                  metadata={"format": SCORES_FORMAT, "key": json.dumps(key, sort_keys=True)}))


def score_completions(logprobs: Callable[[tuple[torch.Tensor, torch.Tensor]], torch.Tensor], examples: Examples,
                      batch_size: int, pad_id: int, dist: DistInfo, device: torch.device, progress: bool,
                      partners: Optional[np.ndarray] = None, max_length: int = 0) -> np.ndarray:
    """The reference's scores of preference data, `logprobs` of each batch (x, y) without gradients: (1, n) float32,
    each example's summed completion log-probability, in batches of `batch_size` pairs in stored order; unpaired data
    (`partners`: each example's mismatched partner) (2, n): each example's and its mismatched row's
    (unpaired_batch, cut to `max_length` tokens), batch_size examples a batch. Process r scores batches r, r + W, ...
    and the sums are shared, so every process returns every score."""
    from tqdm.auto import tqdm

    unpaired = partners is not None
    units = len(examples) if unpaired else len(examples) // 2
    scores = torch.zeros(2 if unpaired else 1, len(examples), dtype=torch.float64, device=device)
    starts = range(dist.rank * batch_size, units, batch_size * dist.world_size)
    with torch.no_grad():
        for first in tqdm(starts, desc="scoring completions with the reference", unit="batch", leave=False,
                          dynamic_ncols=True, disable=not (progress and dist.is_main)):
            index = np.arange(first, min(first + batch_size, units))
            if unpaired:
                x, y, kl_x, kl_y, _ = unpaired_batch(examples, index, partners[index], pad_id, max_length)[:5]
                rows = torch.from_numpy(index).to(device)
                scores[0, rows] = logprobs((x, y)).double()
                scores[1, rows] = logprobs((kl_x, kl_y)).double()
            else:
                rows = pair_rows(index)
                scores[0, torch.from_numpy(rows).to(device)] = logprobs(pad_examples(examples, rows, pad_id)).double()
    return all_reduce_sum(scores, dist).float().cpu().numpy()
