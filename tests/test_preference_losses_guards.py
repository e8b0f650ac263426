"""Guards for the preference-loss code that the training-level tests cannot see.

The tiny capitals pairs of test_preference give the chosen and the rejected completion the same number of tokens,
every reward ties at step 0 only, and no test runs FSDP on one process. So, each checked against a hand computation:
  - log1mexp is accurate in float32 over its whole range (ORPO's log odds of a completion the model is sure of);
  - pair_terms gives each completion its own token count (IPO, SimPO and ORPO normalise by it);
  - a completion with no tokens gives a finite loss;
  - reference_model reshards an FSDP reference after use, even when the forward fails, and refuses a policy that
    has neither a reference nor adapters;
  - evaluate_preference's metrics and rows on pairs of different lengths with an exact tie, against by-hand sums;
  - the fused head's logsumexp (_exp_shifted_) stays finite and exact for very large logits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.batches import Examples
from lmforge.eval.preference import evaluate_preference
from lmforge.head_loss import linear_cross_entropy_rows, linear_cross_entropy_sum
from lmforge.preference_loss import PreferenceLoss, log1mexp
from lmforge.train.preference import pair_terms, reference_model
from test_preference_losses import by_hand


# ---------------------------------------------------------------------------------------------- log1mexp
@pytest.mark.parametrize("x", [-1e-7, -1e-5, -1e-3, -0.1, -0.69, -0.7, -1.0, -5.0, -20.0, -60.0])
def test_log1mexp_is_accurate_in_float32_near_0_and_far_from_it(x):
    """log(1 - exp(x)) to float32's relative precision: near 0 (expm1) and for large |x| (log1p), where a plain
    float32 log(1 - exp(x)) loses every digit."""
    x32 = torch.tensor([x], dtype=torch.float32)
    v = float(x32[0])
    exact = math.log1p(-math.exp(v)) if v < -1 else math.log(-math.expm1(v))  # float64, either accurate there
    assert float(log1mexp(x32)[0]) == pytest.approx(exact, rel=1e-5, abs=0.0)


def test_orpo_of_two_near_certain_completions_is_its_formula_by_hand():
    """Both completions nearly certain (mean log-probabilities of -1e-6 and -3e-6): ORPO's log odds ratio is about
    log 3, made of log(1 - p) terms that only an accurate log1mexp gets right in float32."""
    pc, pr = torch.tensor([-4e-6, -2e-5]), torch.tensor([-1.2e-5, -6e-5])
    nc, nr = torch.tensor([4, 10]), torch.tensor([4, 20])
    beta = 0.5
    loss, chosen, rejected = PreferenceLoss("orpo", beta)(pc, pr, nc, nr)
    for i in range(2):
        expected = by_hand("orpo", float(pc[i]), float(pr[i]), 0.0, 0.0, int(nc[i]), int(nr[i]), beta, 0.0, 0.0)
        assert (float(loss[i]), float(chosen[i]), float(rejected[i])) == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------------------------- pair_terms
@pytest.mark.parametrize("kind", ["ipo", "simpo", "orpo", "dpo"])
def test_pair_terms_gives_each_completion_its_own_token_count(kind):
    """Rows 2k / 2k + 1 are pair k's chosen / rejected: each completion's log-probabilities and token count go
    together (chosen and rejected of different lengths), as the paper's formula by hand says."""
    g = torch.Generator().manual_seed(5)
    P = 6
    policy = -torch.rand(2 * P, generator=g) * 20 - 0.5
    reference = policy + torch.randn(2 * P, generator=g)
    tokens = torch.tensor([3, 11, 9, 2, 1, 7, 12, 4, 5, 6, 8, 1])
    beta, eps, gamma = 0.6, (0.1 if kind in ("simpo", "dpo") else 0.0), 0.3
    loss = PreferenceLoss(kind, beta, eps, gamma)
    got = pair_terms(loss, policy, reference if loss.needs_reference else None, tokens)
    for k in range(P):
        c, r = 2 * k, 2 * k + 1
        expected = by_hand(kind, float(policy[c]), float(policy[r]), float(reference[c]), float(reference[r]),
                           int(tokens[c]), int(tokens[r]), beta, eps, gamma)
        assert tuple(float(t[k]) for t in got) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", ["ipo", "simpo"])
def test_a_completion_of_no_tokens_gives_a_finite_loss(kind):
    """A per-token mean over no tokens is taken over one: finite, never a division by zero. (Not ORPO: a completion
    of no tokens has probability 1, and log(1 - 1) is -inf by definition.)"""
    pc, pr = torch.tensor([0.0, -2.0]), torch.tensor([-3.0, 0.0])
    nc, nr = torch.tensor([0, 4]), torch.tensor([3, 0])
    loss = PreferenceLoss(kind, 0.5)
    ref = (torch.tensor([-1.0, -2.5]), torch.tensor([-2.0, -1.0])) if loss.needs_reference else ()
    got = loss(pc, pr, nc, nr, *ref)
    assert all(torch.isfinite(t).all() for t in got)


# ---------------------------------------------------------------------------------------------- reference_model
class Sharded(nn.Linear):
    """A stand-in for an FSDP2-sharded reference: counts its reshard() calls."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.reshards = 0

    def reshard(self) -> None:
        self.reshards += 1


def test_an_fsdp_reference_is_resharded_after_each_use_even_when_its_forward_fails():
    reference, policy = Sharded(), nn.Linear(2, 2)
    with reference_model(reference, policy) as model:
        assert model is reference and reference.reshards == 0  # gathered weights stay while it is in use
    assert reference.reshards == 1
    with pytest.raises(RuntimeError, match="forward failed"):
        with reference_model(reference, policy):
            raise RuntimeError("forward failed")
    assert reference.reshards == 2
    plain = nn.Linear(2, 2)  # not sharded: used as it is
    with reference_model(plain, policy) as model:
        assert model is plain


def test_no_reference_and_no_adapters_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a frozen reference model, or a LoRA-adapted policy"):
        with reference_model(None, nn.Linear(2, 2)):
            pass


# ---------------------------------------------------------------------------------------------- evaluation
class TableModel:
    """A model whose log-probability of a row is minus the sum of COST[target] over the row's counted targets."""

    def __init__(self, cost: list[float]) -> None:
        self.cost = torch.tensor(cost, dtype=torch.float32)

    def __call__(self, x: torch.Tensor, targets: torch.Tensor, per_row: bool) -> torch.Tensor:
        assert per_row and x.shape == targets.shape
        counted = targets != -100
        return (self.cost[targets.clamp(min=0)] * counted).sum(dim=1)


class Tok:
    pad_id, end_id = 0, 1

    @staticmethod
    def decode(ids: list[int]) -> str:
        return " ".join(map(str, ids))


# (prompt, chosen completion, rejected completion): ids 2.. are words, 1 the end token; completions of different
# lengths, and pair 2 a tie (the same completion twice)
PAIRS = [([2, 3], [4, 5, 1], [6, 1]), ([2, 7, 8], [9, 1], [4, 4, 4, 5, 1]), ([3], [5, 6, 1], [5, 6, 1]),
         ([2, 2, 2], [7, 1], [8, 9, 6, 1]), ([9, 8], [6, 6, 1], [4, 1])]
POLICY = [0.0, 0.3, 0.2, 0.9, 0.4, 1.1, 0.7, 0.25, 1.6, 0.35]
REFERENCE = [0.0, 0.5, 0.6, 0.2, 1.0, 0.3, 0.8, 0.9, 0.1, 0.45]


def pair_examples() -> Examples:
    seqs, prompts = [], []
    for prompt, chosen, rejected in PAIRS:
        for completion in (chosen, rejected):
            seqs.append(prompt + completion)
            prompts.append(len(prompt))
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    return Examples(np.concatenate(seqs).astype(np.uint32), offsets, np.array(prompts, dtype=np.int64))


@pytest.mark.parametrize("max_pairs, batch_size", [(None, 2), (3, 2), (4, 16)])
def test_evaluate_preference_metrics_and_rows_are_sums_by_hand(max_pairs, batch_size):
    """IPO (normalised by each completion's token count, its end token included) on pairs of different lengths: the
    loss, rewards, accuracies (a tie wins nothing) and rows equal sums over each completion's tokens by hand."""
    beta = 0.5
    loss = PreferenceLoss("ipo", beta)
    metrics, rows = evaluate_preference(TableModel(POLICY), TableModel(REFERENCE), Tok(), pair_examples(), loss,
                                        batch_size=batch_size, max_pairs=max_pairs)
    used = PAIRS[:max_pairs] if max_pairs else PAIRS
    n = len(used)

    def logp(cost: list[float], completion: list[int]) -> float:
        return -sum(cost[t] for t in completion)

    hand = []
    for prompt, chosen, rejected in used:
        pc, pr, rc, rr = (logp(cost, comp) for cost in (POLICY, REFERENCE) for comp in (chosen, rejected))
        hand.append((pc, pr, rc, rr, by_hand("ipo", pc, pr, rc, rr, len(chosen), len(rejected), beta, 0.0, 0.0)))
    assert metrics["pairs"] == n and len(rows) == n
    assert metrics["loss"] == pytest.approx(sum(h[4][0] for h in hand) / n, rel=1e-5)
    assert metrics["reward_accuracy"] == pytest.approx(sum(h[4][1] > h[4][2] + 1e-6 for h in hand) / n)
    assert metrics["reward_margin"] == pytest.approx(sum(h[4][1] - h[4][2] for h in hand) / n, abs=1e-6)
    assert metrics["chosen_reward"] == pytest.approx(sum(h[4][1] for h in hand) / n, abs=1e-6)
    assert metrics["rejected_reward"] == pytest.approx(sum(h[4][2] for h in hand) / n, abs=1e-6)
    assert metrics["logp_accuracy"] == pytest.approx(sum(h[0] > h[1] + 1e-6 for h in hand) / n)
    assert metrics["reference_logp_accuracy"] == pytest.approx(sum(h[2] > h[3] + 1e-6 for h in hand) / n)
    assert metrics["preference_loss"] == "ipo" and metrics["beta"] == beta
    for row, (prompt, chosen, rejected), h in zip(rows, used, hand):
        assert (row["prompt"], row["chosen"], row["rejected"]) == tuple(map(Tok.decode, (prompt, chosen, rejected)))
        assert (row["chosen_logp"], row["rejected_logp"]) == pytest.approx((h[0], h[1]), abs=1e-6)
        assert (row["chosen_reward"], row["rejected_reward"]) == pytest.approx((h[4][1], h[4][2]), abs=1e-6)
        assert row["correct"] == (h[4][1] > h[4][2] + 1e-6)
    if max_pairs is None or max_pairs > 2:  # the tie (pair 2): the same completion wins nothing
        assert rows[2]["chosen_logp"] == rows[2]["rejected_logp"] and not rows[2]["correct"]


# ---------------------------------------------------------------------------------------------- the fused head
def test_the_fused_heads_loss_stays_exact_for_very_large_logits():
    """Logits of several hundred (an untrained head, a large learning rate): the shifted logsumexp never overflows,
    and the summed and the per-row losses equal float64 cross-entropy."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 8, generator=g) * 30
    weight = torch.randn(11, 8, generator=g) * 30  # logits of about +-800
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[0, :2] = -100
    logits = (h.double() @ weight.double().t())
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")  # (2, 5), float64
    assert float(logits.abs().max()) > 200
    rows = linear_cross_entropy_rows(h, weight, targets, chunk=3)
    assert torch.isfinite(rows).all()
    assert rows.double().tolist() == pytest.approx(ce.sum(dim=1).tolist(), rel=1e-4)
    total = linear_cross_entropy_sum(h, weight, targets, chunk=3)
    assert float(total) == pytest.approx(float(ce.sum()), rel=1e-4)
