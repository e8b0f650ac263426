"""Direct Preference Optimization's loss (Rafailov et al. 2023), from the log-probabilities of whole completions.

A preference pair is one prompt x with a completion people preferred, y_w (chosen), and one they did not, y_l
(rejected). DPO trains the policy pi against a frozen reference model pi_ref (the model fine-tuning started from)
with no reward model and no sampling:

    r(x, y)  = beta * (log pi(y | x) - log pi_ref(y | x))          the implicit reward of a completion
    loss     = -log sigmoid(r(x, y_w) - r(x, y_l))                  per pair

log pi(y | x) is the sum of the log-probabilities of the completion's tokens (its end token included), the tokens
sft trains on. Label smoothing eps (conservative DPO: a preference label is wrong with probability eps) makes it
-(1 - eps) log sigmoid(m) - eps log sigmoid(-m) for the margin m = r_w - r_l. At the start, policy = reference,
every reward is 0 and every pair's loss is log 2.

Imports only torch: the trainer trains on it and `lmforge eval` measures it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORED = -100  # the label of a position that is not part of the completion (prompt, padding)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) fp32: each row's summed log-probability of its labels that are not -100.

    logits: (B, T, V) any float dtype (log-softmax in fp32); labels: (B, T) long, the next token of each position.
    """
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORED, reduction="none")  # (B, T)
    return -nll.sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward), each (P,) fp32, from the completions' log-probabilities
    (each (P,)) under the policy and the reference: the formulas of the module docstring."""
    chosen = beta * (policy_chosen.float() - reference_chosen.float())
    rejected = beta * (policy_rejected.float() - reference_rejected.float())
    margin = chosen - rejected
    loss = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss, chosen.detach(), rejected.detach()
