"""Guards for the seven preference losses added beside DPO (dpo_norm, exo, nca, bco, sppo_hard, apo_zero, apo_down)
that test_preference_losses' formulas by hand cannot see: its rewards are small, it checks values, not gradients,
and it builds every loss through a valid config.

  - each loss stays exact in float32 for rewards of hundreds of nats (log-sigmoids, never log(sigmoid)), against a
    float64 computation written with stable log-sigmoids;
  - each loss's gradient with respect to the policy's log-probabilities is its formula's derivative by hand (a
    misplaced detach changes no value but stops the training signal);
  - exo refuses a label smoothing outside (0, 0.5), in PreferenceLoss and in TrainConfig, naming the setting.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import TrainConfig
from lmforge.errors import ConfigError
from lmforge.preference_loss import PreferenceLoss

NEW = ("dpo_norm", "exo", "nca", "bco", "sppo_hard", "apo_zero", "apo_down")


def logsig(x: float) -> float:
    """log sigmoid(x) in float64, exact for any |x|."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(logsig(x))


def stable(kind: str, pc: float, pr: float, rc: float, rr: float, nc: int, nr: int, beta: float, eps: float) -> float:
    """One pair's loss (the module docstring's formula) in float64 with stable log-sigmoids."""
    r_w, r_l = beta * (pc - rc), beta * (pr - rr)
    m = r_w - r_l
    if kind == "dpo_norm":
        return -logsig(beta * ((pc - rc) / nc - (pr - rr) / nr))
    if kind == "exo":  # KL((q, 1 - q) || (1 - eps, eps)), q = sigmoid(m); a term of weight 0 is 0
        q, p = sig(m), sig(-m)
        return q * (logsig(m) - math.log1p(-eps)) + p * (logsig(-m) - math.log(eps))
    if kind == "nca":
        return -logsig(r_w) - 0.5 * logsig(-r_w) - 0.5 * logsig(-r_l)
    if kind == "bco":
        return -logsig(r_w) - logsig(-r_l)
    if kind == "sppo_hard":
        return (r_w / beta - 0.5 / beta) ** 2 + (r_l / beta + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return 1 - sig(r_w) + sig(r_l)
    assert kind == "apo_down"
    return sig(r_w) + 1 - sig(m)


@pytest.mark.parametrize("kind", NEW)
def test_each_new_loss_is_exact_in_float32_for_rewards_of_hundreds_of_nats(kind):
    """Rewards and margins of +-150 to +-400 (beta 1, long completions): sigmoid underflows to 0 in float32 there,
    so log(sigmoid(x)) would be -inf and 0 * log(0) NaN; the loss equals the float64 formula."""
    beta, eps = 1.0, (0.01 if kind == "exo" else 0.0)
    # (policy chosen, policy rejected, reference chosen, reference rejected) of 6 pairs
    rows = [(-50.0, -600.0, -400.0, -300.0), (-500.0, -20.0, -300.0, -220.0), (-10.0, -500.0, -210.0, -100.0),
            (-400.0, -30.0, -200.0, -240.0), (-300.0, -300.0, -100.0, -500.0), (-20.0, -20.0, -220.0, -220.0)]
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float32) for col in zip(*rows))
    nc, nr = torch.tensor([40, 1, 7, 250, 100, 30]), torch.tensor([350, 2, 260, 16, 120, 30])
    loss, chosen, rejected = PreferenceLoss(kind, beta, eps)(pc, pr, nc, nr, rc, rr)
    assert torch.isfinite(loss).all()
    for i in range(len(rows)):
        expected = stable(kind, *rows[i], int(nc[i]), int(nr[i]), beta, eps)
        assert float(loss[i]) == pytest.approx(expected, rel=1e-5, abs=1e-5), i
        assert float(chosen[i]) == beta * (rows[i][0] - rows[i][2])
        assert float(rejected[i]) == beta * (rows[i][1] - rows[i][3])


def derivatives(kind: str, pc: float, pr: float, rc: float, rr: float, nc: int, nr: int, beta: float, eps: float
                ) -> tuple[float, float]:
    """(d loss / d policy chosen, d loss / d policy rejected) of one pair, each formula differentiated by hand."""
    r_w, r_l = beta * (pc - rc), beta * (pr - rr)
    m = r_w - r_l
    if kind == "dpo_norm":
        g = -beta * sig(-beta * ((pc - rc) / nc - (pr - rr) / nr))  # d/dd of -log sigmoid(beta d)
        return g / nc, -g / nr
    if kind == "exo":  # dq/dm = q (1 - q), dKL/dq = log(q / (1 - q)) + log(eps / (1 - eps)) = m + log(eps / (1 - eps))
        g = beta * sig(m) * sig(-m) * (m + math.log(eps / (1 - eps)))
        return g, -g
    if kind == "nca":
        return beta * (-sig(-r_w) + 0.5 * sig(r_w)), beta * 0.5 * sig(r_l)
    if kind == "bco":
        return -beta * sig(-r_w), beta * sig(r_l)
    if kind == "sppo_hard":
        return 2 * (pc - rc - 0.5 / beta), 2 * (pr - rr + 0.5 / beta)
    if kind == "apo_zero":
        return -beta * sig(r_w) * sig(-r_w), beta * sig(r_l) * sig(-r_l)
    assert kind == "apo_down"
    dm = beta * sig(m) * sig(-m)
    return beta * sig(r_w) * sig(-r_w) - dm, dm


@pytest.mark.parametrize("kind", NEW)
def test_each_new_loss_gradient_is_its_formulas_derivative(kind):
    """The gradient that trains the policy: d loss / d log pi(y_w) and d log pi(y_l) of 7 random pairs equal the
    derivatives by hand (so no term the policy should learn from is detached, and none is counted twice)."""
    g = torch.Generator().manual_seed(11)
    n = 7
    pc, pr = (-torch.rand(n, generator=g) * 30 - 0.5 for _ in range(2))
    rc, rr = (x + 2 * torch.randn(n, generator=g) for x in (pc, pr))
    nc, nr = torch.randint(1, 12, (n,), generator=g), torch.randint(1, 12, (n,), generator=g)
    beta, eps = 0.6, (0.1 if kind == "exo" else 0.0)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, _, _ = PreferenceLoss(kind, beta, eps)(pc, pr, nc, nr, rc, rr)
    loss.sum().backward()
    values = [t.detach().tolist() for t in (pc, pr, rc, rr, nc, nr)]
    for i in range(n):
        expected = derivatives(kind, *(v[i] for v in values), beta, eps)
        assert (float(pc.grad[i]), float(pr.grad[i])) == pytest.approx(expected, rel=1e-4, abs=1e-6), i


@pytest.mark.parametrize("eps", [0.0, -0.1, 0.5, 0.7])
def test_exo_refuses_a_label_smoothing_outside_0_to_half(eps):
    """EXO is a KL divergence from the smoothed label (1 - eps, eps): eps 0 makes it infinite, eps 0.5 a label that
    prefers nothing, past 0.5 the opposite preference; PreferenceLoss says which range it needs."""
    with pytest.raises(ValueError, match=r"exo .* label smoothing in \(0, 0\.5\)"):
        PreferenceLoss("exo", 0.1, eps)


@pytest.mark.parametrize("eps", [1e-3, 0.25, 0.49])
def test_exo_takes_a_label_smoothing_inside_0_to_half(eps):
    """Inside (0, 0.5) exo is built, and at policy = reference its loss is KL((1/2, 1/2) || (1 - eps, eps))."""
    zeros, tokens = torch.zeros(2), torch.ones(2, dtype=torch.long)
    loss, _, _ = PreferenceLoss("exo", 0.1, eps)(zeros, zeros, tokens, tokens, zeros, zeros)
    expected = 0.5 * math.log(0.5 / (1 - eps)) + 0.5 * math.log(0.5 / eps)
    assert loss.tolist() == pytest.approx([expected, expected], rel=1e-5, abs=1e-7)  # float32


def test_train_config_refuses_exo_without_label_smoothing_and_takes_it_with():
    """TrainConfig: exo with dpo_label_smoothing 0 (its default) is refused, naming the setting to change; with the
    paper's 1e-3 it is taken; another loss with 0 is taken."""
    with pytest.raises(ConfigError, match=r"exo .*set train\.dpo_label_smoothing above 0"):
        TrainConfig(preference_loss="exo")
    assert TrainConfig(preference_loss="exo", dpo_label_smoothing=1e-3).dpo_label_smoothing == 1e-3
    assert TrainConfig(preference_loss="nca").dpo_label_smoothing == 0.0
