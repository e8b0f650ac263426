"""Evaluation of a model trained on preference data (DPO and the other preference losses) on a split of its pairs.

For every pair (examples 2i chosen, 2i + 1 rejected: lmforge.data.preference) the log-probability of each
completion under the model and under its reference (the train.init_from model the run started from) gives DPO's
implicit rewards r = beta * (log pi - log pi_ref) and loss, or the run's other preference loss and its rewards
(lmforge.preference_loss; simpo and orpo need no reference, and none is loaded). Metrics over the split:

    loss                 the run's mean preference loss (the training objective, with its settings)
    reward_accuracy      the fraction of pairs whose chosen completion gets the higher reward
    reward_margin        the mean of r(chosen) - r(rejected); chosen_reward, rejected_reward their means
    logp_accuracy        the fraction of pairs whose chosen completion is the more probable under the model
    reference_logp_accuracy   the same under the reference: what training changed (reference losses only)

OUT/predictions.jsonl holds one row per pair: prompt, chosen, rejected, both rewards and log-probabilities, and
whether the chosen one won.

Unpaired preference data (`lmforge prepare --task unpaired`, trained with kto or apo_zero_unpaired) is measured by
``evaluate_unpaired``: the loss over the split (KTO's reference point z estimated once from every evaluated
example's mismatched row: its prompt with the previous example's completion, as the trainer's validation does), z
itself (kl), the mean reward of the desirable and of the undesirable completions and their difference
(reward_margin); one row per completion (prompt, completion, desirable, reward, log-probability).

A reward model (train.objective reward) is measured by ``evaluate_reward_model``: its Bradley-Terry loss (with the
run's reward_center_coefficient), reward_accuracy, reward_margin, chosen_reward, rejected_reward over the pairs, each
example read whole as training read it (data.batches.reward_pair_batch); one row per pair (prompt, chosen,
rejected, both rewards, whether the chosen one won).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from lmforge.data.batches import Examples, pad_examples, pair_rows, reward_pair_batch, unpaired_batch
from lmforge.errors import CheckpointError
from lmforge.eval.progress import progress_bar
from lmforge.preference_loss import IGNORED, PreferenceLoss, reference_point, reward_model_loss


def load_reference(config: Any, ckpt: Path, device: torch.device) -> nn.Module:
    """The reference of a preference-trained checkpoint: its run's train.init_from model, loaded for inference."""
    from lmforge.checkpoint import load_for_inference

    init_from = config.train.init_from
    try:
        reference, _, _ = load_for_inference(init_from, device=device)
    except CheckpointError as e:
        raise CheckpointError(f"the reference model of {ckpt} (its train.init_from {init_from}) cannot be loaded: "
                              f"{e}") from None
    return reference


@torch.no_grad()
def pair_logprobs(model: nn.Module, examples: Examples, pairs: np.ndarray, pad_id: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """((P, 2) fp32 log-probabilities, (P, 2) token counts) of the chosen and the rejected completion of `pairs`
    under `model`."""
    x, y = pad_examples(examples, pair_rows(pairs), pad_id)
    return row_logprobs(model, x, y, device).view(-1, 2), (y != IGNORED).sum(dim=1).view(-1, 2)


def evaluate_preference(model: nn.Module, reference: Optional[nn.Module], tokenizer: Any, examples: Examples,
                        loss: PreferenceLoss, batch_size: int = 16, device: torch.device | str = "cpu",
                        progress: bool = False, max_pairs: Optional[int] = None
                        ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, one row per pair) of `model` against `reference` (None for a reference-free loss) on preference
    examples (module docstring)."""
    device = torch.device(device)
    n = len(examples) // 2 if max_pairs is None else min(len(examples) // 2, max_pairs)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.end_id  # as training padded
    policy, ref, tokens = [], [], []
    with progress_bar(n, "preference pairs", "pair", progress) as bar:
        for start in range(0, n, batch_size):
            pairs = np.arange(start, min(start + batch_size, n))
            logps, counts = pair_logprobs(model, examples, pairs, pad, device)
            policy.append(logps)
            tokens.append(counts)
            if reference is not None:
                ref.append(pair_logprobs(reference, examples, pairs, pad, device)[0])
            bar.update(len(pairs))
    policy_t, tokens_t = torch.cat(policy), torch.cat(tokens)  # (n, 2)
    ref_t = torch.cat(ref) if reference is not None else None
    losses, chosen, rejected = loss(policy_t[:, 0], policy_t[:, 1], tokens_t[:, 0], tokens_t[:, 1],
                                    *((ref_t[:, 0], ref_t[:, 1]) if ref_t is not None else ()))
    metrics = {"pairs": n, "loss": float(losses.mean()), **reward_metrics(chosen, rejected),
               "logp_accuracy": float((policy_t[:, 0] > policy_t[:, 1]).float().mean()),
               **({"reference_logp_accuracy": float((ref_t[:, 0] > ref_t[:, 1]).float().mean())}
                  if ref_t is not None else {}),
               "preference_loss": loss.kind, "beta": loss.beta}
    return metrics, pair_rows_out(tokenizer, examples, chosen, rejected, chosen_logp=policy_t[:, 0],
                                  rejected_logp=policy_t[:, 1])


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """reward_accuracy (the share of pairs whose chosen completion gets the higher reward; a tie is no win),
    reward_margin and the mean rewards of the pairs' chosen and rejected completions (each (n,))."""
    return {"reward_accuracy": float((chosen > rejected).float().mean()),
            "reward_margin": float((chosen - rejected).mean()), "chosen_reward": float(chosen.mean()),
            "rejected_reward": float(rejected.mean())}


def pair_rows_out(tokenizer: Any, examples: Examples, chosen: torch.Tensor, rejected: torch.Tensor,
                  **columns: torch.Tensor) -> list[dict[str, Any]]:
    """One predictions.jsonl row per evaluated pair: its texts, both rewards, `columns` (name -> (n,) values), and
    whether the chosen completion won."""
    rows = []
    for i in range(len(chosen)):
        prompt, chosen_text = _texts(tokenizer, examples, 2 * i)
        _, rejected_text = _texts(tokenizer, examples, 2 * i + 1)
        rows.append({"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text,
                     "chosen_reward": float(chosen[i]), "rejected_reward": float(rejected[i]),
                     **{name: float(values[i]) for name, values in columns.items()},
                     "correct": bool(chosen[i] > rejected[i])})
    return rows


@torch.no_grad()
def evaluate_reward_model(model: nn.Module, tokenizer: Any, examples: Examples, center: float = 0.0,
                          batch_size: int = 16, device: torch.device | str = "cpu", progress: bool = False,
                          max_pairs: Optional[int] = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, one row per pair) of a reward model on preference examples (module docstring); center: the run's
    train.reward_center_coefficient, part of the loss it trained on."""
    device = torch.device(device)
    n = len(examples) // 2 if max_pairs is None else min(len(examples) // 2, max_pairs)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.end_id  # as training padded
    keep, block = int(tokenizer.start_id is not None), model.config.block_size
    rewards = []
    with progress_bar(n, "preference pairs", "pair", progress) as bar:
        for start in range(0, n, batch_size):
            pairs = np.arange(start, min(start + batch_size, n))
            x, mask, *_ = reward_pair_batch(examples, pairs, pad, block, keep)
            rewards.append(model(x.to(device), attention_mask=mask.to(device))[:, 0].float().view(-1, 2).cpu())
            bar.update(len(pairs))
    both = torch.cat(rewards) if rewards else torch.zeros(0, 2)  # (n, 2): chosen, rejected
    chosen, rejected = both[:, 0], both[:, 1]
    margin = None if examples.margins is None else torch.from_numpy(examples.margins[0:2 * n:2].astype(np.float32))
    metrics = {"pairs": n, "loss": float(reward_model_loss(chosen, rejected, center, margin).mean()),
               **reward_metrics(chosen, rejected), "objective": "reward", "center": center}
    return metrics, pair_rows_out(tokenizer, examples, chosen, rejected)


@torch.no_grad()
def row_logprobs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(rows,) fp32 on the CPU: each row's summed log-probability of its labels under `model`."""
    return (-model(x.to(device), targets=y.to(device), per_row=True)).cpu()  # the head fused with the loss, per row


def evaluate_unpaired(model: nn.Module, reference: nn.Module, tokenizer: Any, examples: Examples,
                      loss: PreferenceLoss, max_length: int, batch_size: int = 16, device: torch.device | str = "cpu",
                      progress: bool = False, max_examples: Optional[int] = None
                      ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, one row per completion) of `model` against `reference` on unpaired preference examples (module
    docstring); max_length: the longest row the model takes (its block_size + 1), mismatched rows are cut to it."""
    device = torch.device(device)
    n = len(examples) if max_examples is None else min(len(examples), max_examples)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.end_id  # as training padded
    policy, ref, mismatched, desirable = [], [], [], []
    with progress_bar(n, "unpaired completions", "completion", progress) as bar:
        for start in range(0, n, batch_size):
            index = np.arange(start, min(start + batch_size, n))
            x, y, kl_x, kl_y, labels = unpaired_batch(examples, index, (index - 1) % n, pad, max_length)
            policy.append(row_logprobs(model, x, y, device))
            ref.append(row_logprobs(reference, x, y, device))
            if loss.needs_kl:
                mismatched.append(row_logprobs(model, kl_x, kl_y, device) - row_logprobs(reference, kl_x, kl_y, device))
            desirable.append(labels)
            bar.update(len(index))
    policy_t, ref_t, desirable_t = torch.cat(policy), torch.cat(ref), torch.cat(desirable)
    z = None
    if loss.needs_kl:
        log_ratios = torch.cat(mismatched)
        z = reference_point(log_ratios.double().sum(), torch.tensor(float(len(log_ratios))))
    delta = None
    if loss.needs_delta:  # BCO: the mean reward of the evaluated completions (the trainer's evaluation takes it too)
        delta = (loss.beta * (policy_t.double() - ref_t.double())).mean().float() if n else torch.tensor(0.0)
    losses, rewards = loss.unpaired_loss(policy_t, ref_t, desirable_t, z, delta)
    good = rewards[desirable_t].mean() if desirable_t.any() else torch.tensor(0.0)
    bad = rewards[~desirable_t].mean() if not desirable_t.all() else torch.tensor(0.0)
    metrics = {"examples": n, "desirable": int(desirable_t.sum()), "undesirable": int((~desirable_t).sum()),
               "loss": float(losses.mean()), **({"kl": float(z)} if z is not None else {}),
               **({"delta": float(delta)} if delta is not None else {}),
               "reward_margin": float(good - bad), "desirable_reward": float(good), "undesirable_reward": float(bad),
               "preference_loss": loss.kind, "beta": loss.beta}
    rows = []
    for i in range(n):
        prompt, completion = _texts(tokenizer, examples, i)
        rows.append({"prompt": prompt, "completion": completion, "desirable": bool(desirable_t[i]),
                     "reward": float(rewards[i]), "logp": float(policy_t[i])})
    return metrics, rows


def _texts(tokenizer: Any, examples: Examples, e: int) -> tuple[str, str]:
    """(prompt text, completion text) of example e, special tokens dropped."""
    prompt, completion = examples.prompt_and_completion(e)
    return tokenizer.decode(prompt), tokenizer.decode(completion)
