"""train.preference_nll_weight: alpha times each pair's chosen completion's mean negative log-probability per token,
added to any preference loss but orpo's (RPO; DPO + NLL): by hand, against TRL's DPOTrainer with the "sft" loss type
beside "sigmoid", in the trainer, and refused where it cannot apply."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.checkpoint import load_for_inference
from lmforge.cli import main
from lmforge.config import TrainConfig
from lmforge.errors import ConfigError
from lmforge.eval.preference import evaluate_preference
from lmforge.preference_loss import LOSSES, PreferenceLoss
from lmforge.train import Trainer
from test_preference import LOG2, base, dpo, pairs  # noqa: F401  (base, pairs: fixtures)
from test_preference_losses import orpo_run, trl_on_exports  # noqa: F401  (orpo_run: a fixture, a trained policy)


@pytest.mark.parametrize("kind", [k for k in LOSSES if k != "orpo"])
def test_the_nll_term_is_alpha_times_the_chosen_mean_negative_logprob(kind):
    """Each loss with weight alpha = the same loss without it + alpha (-log pi(y_w) / |y_w|), pair by pair, and the
    rewards do not change; its gradient reaches the chosen completion's log-probability as -alpha / |y_w|."""
    g = torch.Generator().manual_seed(5)
    n = 6
    pc, pr = (-torch.rand(n, generator=g, dtype=torch.float64) * 20 - 0.5 for _ in range(2))
    rc, rr = (x + torch.randn(n, generator=g, dtype=torch.float64) for x in (pc, pr))
    nc, nr = torch.randint(1, 9, (n,), generator=g), torch.randint(1, 9, (n,), generator=g)
    eps = 0.2 if kind == "exo" else 0.0
    plain = PreferenceLoss(kind, 0.4, eps)
    alpha = 0.7
    with_nll = PreferenceLoss(kind, 0.4, eps, nll_weight=alpha)
    ref = (rc, rr) if plain.needs_reference else ()
    base_loss, chosen, rejected = plain(pc, pr, nc, nr, *ref)
    pc_grad = pc.clone().requires_grad_(True)
    loss, chosen2, rejected2 = with_nll(pc_grad, pr, nc, nr, *ref)
    for i in range(n):
        assert float(loss[i]) == pytest.approx(float(base_loss[i]) - alpha * float(pc[i]) / int(nc[i]), rel=1e-6)
    assert torch.equal(chosen, chosen2) and torch.equal(rejected, rejected2)
    (loss - plain(pc_grad, pr, nc, nr, *ref)[0]).sum().backward()
    assert pc_grad.grad.tolist() == pytest.approx((-alpha / nc.double()).tolist(), rel=1e-6)


def test_dpo_with_nll_equals_trls_sigmoid_plus_sft(orpo_run, base, pairs, tmp_path):
    """TRL's DPOTrainer with loss_type ["sigmoid", "sft"] and loss_weights [1, alpha] on the HF exports, one pair a
    batch (its sft term averages the batch's chosen tokens, lmforge each pair's: the same for one pair): the mean of
    TRL's losses over the val pairs equals lmforge's evaluation with train.preference_nll_weight alpha."""
    beta, alpha = 0.5, 0.8
    trl, rows, collate, examples = trl_on_exports(orpo_run, base, pairs, tmp_path, beta=beta,
                                                  loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha])
    with torch.no_grad():
        expected = [float(trl._compute_loss(trl.model, collate([row]), False)) for row in rows]
    model, tokenizer, _ = load_for_inference(orpo_run.last_checkpoint)
    reference, _, _ = load_for_inference(base)
    metrics, _ = evaluate_preference(model, reference, tokenizer, examples, PreferenceLoss("dpo", beta,
                                                                                           nll_weight=alpha),
                                     batch_size=7)
    plain, _ = evaluate_preference(model, reference, tokenizer, examples, PreferenceLoss("dpo", beta), batch_size=7)
    assert metrics["loss"] == pytest.approx(sum(expected) / len(expected), abs=2e-5)
    assert metrics["loss"] > plain["loss"] + 0.1 and metrics["chosen_reward"] == plain["chosen_reward"]


def test_a_dpo_run_with_nll_starts_at_log_2_plus_the_chosen_nll(base, pairs, tmp_path):
    """At step 1 (policy = reference) the DPO term is log 2, so the logged loss is log 2 plus alpha times the mean
    over the batch's pairs of their chosen completions' per-token NLL under the base, which the fixed val loss
    shows too: val loss with alpha - val loss without = alpha x that mean over the val pairs."""
    alpha = 0.5
    settings = {"train.max_steps": 1, "train.eval_interval": 1}
    with_nll = Trainer(dpo(tmp_path / "a", pairs, base, **{**settings, "train.preference_nll_weight": alpha}),
                       progress=False, tensorboard=False)
    plain = Trainer(dpo(tmp_path / "b", pairs, base, **settings), progress=False, tensorboard=False)
    batch = with_nll.val_batches[0]
    policy = with_nll.completion_logprobs(with_nll.raw_model, batch[:2]).double()
    tokens = (batch[1] != -100).sum(dim=1).double()
    nll = float((-policy[0::2] / tokens[0::2]).mean())
    assert nll > 0.5
    with torch.no_grad():
        loss, _, _ = with_nll.preference_terms(with_nll.raw_model, batch)
    assert float(loss.mean()) == pytest.approx(LOG2 + alpha * nll, abs=1e-5)
    with_nll.fit()
    plain.fit()
    assert with_nll.history[0][1] > plain.history[0][1] + 0.2 and plain.history[0][1] == pytest.approx(LOG2, abs=1e-6)
    assert math.isfinite(with_nll.val_loss)


def test_the_nll_weight_is_refused_with_orpo_and_on_data_that_is_not_preference_data(base, tmp_path):
    from test_tasks import reverse_records, write_jsonl

    with pytest.raises(ConfigError, match="orpo has its own: drop it"):
        TrainConfig(preference_loss="orpo", preference_nll_weight=0.5)
    with pytest.raises(ValueError, match="orpo has its own next-token term"):
        PreferenceLoss("orpo", 0.1, nll_weight=0.5)
    assert TrainConfig(preference_loss="simpo", preference_nll_weight=0.5).preference_nll_weight == 0.5
    sft = tmp_path / "sft"
    assert main(["prepare", str(write_jsonl(tmp_path / "r.jsonl", reverse_records(30))), "--task", "sft",
                 "--tokenizer", str(base), "--out", str(sft)]) == 0
    config = dpo(tmp_path / "run", sft, base, **{"train.dpo_beta": 0.1, "train.preference_nll_weight": 0.5})
    with pytest.raises(ConfigError, match="preference_nll_weight / precompute_reference set a preference loss"):
        Trainer(config, progress=False, tensorboard=False)
    assert not (tmp_path / "run").exists()
