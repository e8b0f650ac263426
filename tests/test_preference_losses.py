"""The preference losses beyond DPO (train.preference_loss: robust, hinge, ipo, simpo, orpo): each one's formula by
hand, each one against TRL's own code on a trained model's log-probabilities, each one training in the one loop, and
the reference-free ones (simpo, orpo) keeping and running no reference at all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_for_inference
from lmforge.cli import main
from lmforge.data.batches import pad_examples, pair_rows
from lmforge.data.tasks import load_examples
from lmforge.errors import ConfigError
from lmforge.eval.preference import evaluate_preference
from lmforge.preference_loss import LOSSES, PreferenceLoss
from lmforge.train import Trainer
from test_preference import LOG2, base, dpo, pairs, trl_rows  # noqa: F401  (base, pairs: the module's fixtures too)
from test_tasks import reverse_records, write_jsonl


@pytest.fixture(scope="module")
def orpo_run(base, pairs, tmp_path_factory) -> Trainer:
    """20 steps of ORPO on the capitals pairs: a trained policy whose log-probabilities differ from its base's."""
    trainer = Trainer(dpo(tmp_path_factory.mktemp("orpo") / "run", pairs, base,
                          **{"train.preference_loss": "orpo", "train.max_steps": 20, "optim.warmup_steps": 5}),
                      progress=False, tensorboard=False)
    trainer.fit()
    return trainer


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def by_hand(kind: str, pc: float, pr: float, rc: float, rr: float, nc: int, nr: int, beta: float, eps: float,
            gamma: float) -> tuple[float, float, float]:
    """(loss, chosen reward, rejected reward) of one pair: each paper's formula in plain float arithmetic."""
    if kind in ("simpo", "orpo"):
        aw, al = pc / nc, pr / nr
        if kind == "simpo":
            m = beta * (aw - al) - gamma
            loss = -(1 - eps) * math.log(sigmoid(m)) - eps * math.log(sigmoid(-m))
        else:
            odds_w, odds_l = math.exp(aw) / (1 - math.exp(aw)), math.exp(al) / (1 - math.exp(al))
            loss = -aw - beta * math.log(sigmoid(math.log(odds_w / odds_l)))
        return loss, beta * aw, beta * al
    m = beta * ((pc - rc) - (pr - rr))
    r_w, r_l = beta * (pc - rc), beta * (pr - rr)  # each completion's implicit reward
    if kind == "dpo":
        loss = -(1 - eps) * math.log(sigmoid(m)) - eps * math.log(sigmoid(-m))
    elif kind == "robust":
        loss = (-(1 - eps) * math.log(sigmoid(m)) + eps * math.log(sigmoid(-m))) / (1 - 2 * eps)
    elif kind == "hinge":
        loss = max(0.0, 1.0 - m)
    elif kind == "ipo":
        loss = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    elif kind == "dpo_norm":
        loss = -math.log(sigmoid(beta * ((pc - rc) / nc - (pr - rr) / nr)))
    elif kind == "exo":  # KL(q || (1 - eps, eps)) over {chosen wins, rejected wins}, q = (sigmoid(m), sigmoid(-m))
        q = sigmoid(m)
        loss = q * math.log(q / (1 - eps)) + (1 - q) * math.log((1 - q) / eps)
    elif kind == "nca":
        loss = -math.log(sigmoid(r_w)) - 0.5 * math.log(sigmoid(-r_w)) - 0.5 * math.log(sigmoid(-r_l))
    elif kind == "bco":
        loss = -math.log(sigmoid(r_w)) - math.log(sigmoid(-r_l))
    elif kind == "sppo_hard":  # the chosen log-ratio pulled to +1/(2 beta), the rejected to -1/(2 beta)
        loss = ((pc - rc) - 1 / (2 * beta)) ** 2 + ((pr - rr) + 1 / (2 * beta)) ** 2
    elif kind == "apo_zero":
        loss = (1 - sigmoid(r_w)) + sigmoid(r_l)
    else:  # apo_down
        loss = sigmoid(r_w) + (1 - sigmoid(m))
    return loss, r_w, r_l


# ---------------------------------------------------------------------------------------------- the formulas
@pytest.mark.parametrize("kind", LOSSES)
def test_each_loss_is_its_papers_formula_by_hand(kind):
    g = torch.Generator().manual_seed(3)
    n = 9
    pc, pr = (-torch.rand(n, generator=g, dtype=torch.float64) * 30 - 0.5 for _ in range(2))  # summed logps < 0
    rc, rr = (x + torch.randn(n, generator=g, dtype=torch.float64) for x in (pc, pr))
    nc, nr = torch.randint(1, 12, (n,), generator=g), torch.randint(1, 12, (n,), generator=g)
    beta, gamma = 0.7, 0.4
    eps = 0.2 if kind in ("dpo", "robust", "exo", "simpo") else 0.0
    loss = PreferenceLoss(kind, beta, eps, gamma)
    ref = (rc, rr) if loss.needs_reference else ()
    got, chosen, rejected = loss(pc, pr, nc, nr, *ref)
    for i in range(n):
        expected = by_hand(kind, float(pc[i]), float(pr[i]), float(rc[i]), float(rr[i]), int(nc[i]), int(nr[i]),
                           beta, eps, gamma)
        assert (float(got[i]), float(chosen[i]), float(rejected[i])) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert loss.needs_reference == (kind not in ("simpo", "orpo"))


def test_an_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown preference loss 'ppo'"):
        PreferenceLoss("ppo")


def test_orpo_stays_finite_for_a_completion_of_probability_near_1():
    """log(1 - p) of a chosen completion the model is sure of: finite, no 0 * inf."""
    sure, unsure = torch.tensor([-1e-7, -1e-3]), torch.tensor([-50.0, -60.0])
    loss, _, _ = PreferenceLoss("orpo", 0.1)(sure, unsure, torch.tensor([4, 4]), torch.tensor([4, 4]))
    assert torch.isfinite(loss).all()


# ---------------------------------------------------------------------------------------------- against TRL
def trl_logps(model, examples, n: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) per-token mean log-probabilities of the first n pairs by TRL's own get_batch_logps on an
    lmforge model's logits (TRL shifts labels by one: a dummy first label and a dummy last position undo it)."""
    from trl.experimental.cpo import CPOTrainer

    x, y = pad_examples(examples, pair_rows(np.arange(n)), pad)  # y: the next tokens, -100 on prompt and padding
    with torch.no_grad():
        logits = model(x)
    logits = torch.cat([logits, torch.zeros_like(logits[:, :1])], dim=1)
    labels = torch.cat([torch.full_like(y[:, :1], -100), y], dim=1)
    logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    return logps[0::2], logps[1::2]


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_the_reference_free_losses_equal_trls_cpo_and_orpo_code(orpo_run, pairs, kind):
    """SimPO through TRL's CPOTrainer.cpo_loss, ORPO's odds-ratio term through ORPOTrainer.odds_ratio_loss, on the
    trained model's per-token mean log-probabilities from TRL's get_batch_logps: lmforge's evaluation gives the
    same mean loss and rewards. (TRL's ORPO adds the prompt's tokens to its next-token term; the paper and lmforge
    train on the completion's, as sft does, so that term is the chosen completion's mean negative log-probability.)"""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    model, tokenizer, _ = load_for_inference(orpo_run.last_checkpoint)
    examples = load_examples(pairs, "val")
    n = len(examples) // 2
    beta = 2.0 if kind == "simpo" else 0.3
    loss = PreferenceLoss(kind, beta, 0.1 if kind == "simpo" else 0.0, 0.7)
    metrics, rows = evaluate_preference(model, None, tokenizer, examples, loss, batch_size=7)
    chosen, rejected = trl_logps(model, examples, n, tokenizer.pad_id)
    device = SimpleNamespace(device=torch.device("cpu"))
    if kind == "simpo":
        trainer = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=0.7, label_smoothing=0.1, loss_type="simpo",
                                  accelerator=device)
        losses, rc, rr = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    else:
        trainer = SimpleNamespace(beta=beta, accelerator=device)
        ratio_terms, rc, rr, _, _ = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
        losses = -chosen - ratio_terms
    assert metrics["loss"] == pytest.approx(float(losses.mean()), abs=1e-5)
    assert [r["chosen_reward"] for r in rows] == pytest.approx(rc.tolist(), abs=1e-5)
    assert [r["rejected_reward"] for r in rows] == pytest.approx(rr.tolist(), abs=1e-5)
    assert metrics["reward_accuracy"] == pytest.approx(float((rc > rr).float().mean()))
    assert "reference_logp_accuracy" not in metrics and metrics["preference_loss"] == kind


def hf_exports(policy_run: Trainer, base: Path, tmp_path: Path) -> tuple:
    """(policy, reference, tokenizer) in transformers: `lmforge export --format hf` of the run and of its base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["export", str(policy_run.run_dir), "--format", "hf", "--out", str(tmp_path / "policy")]) == 0
    assert main(["export", str(base), "--format", "hf", "--out", str(tmp_path / "reference")]) == 0
    return (AutoModelForCausalLM.from_pretrained(tmp_path / "policy"),
            AutoModelForCausalLM.from_pretrained(tmp_path / "reference"),
            AutoTokenizer.from_pretrained(tmp_path / "policy"))


def trl_on_exports(policy_run: Trainer, base: Path, pairs: Path, tmp_path: Path, **settings: object):
    """TRL's DPOTrainer (DPOConfig `settings`: beta, loss_type, ...) on the Hugging Face exports of `policy_run` and
    of `base`, its reference, in eval mode; and the val pairs as TRL's token-id rows with its collator. The rows
    carry the reference's log-probabilities from transformers' own forward, which TRL takes as precomputed ones:
    TRL's fused LM head on its ref_model was measured 2e-3 nats per completion away from that forward on the same
    weights (on the policy it agrees to 1e-6). Returns (trainer, rows, collate, lmforge's val Examples)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    policy, hf_reference, hf_tokenizer = hf_exports(policy_run, base, tmp_path)
    examples = load_examples(pairs, "val")
    rows = trl_rows(examples, hf_reference)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=None, **settings)
    trl = DPOTrainer(model=policy, ref_model=hf_reference, args=args, processing_class=hf_tokenizer,
                     train_dataset=Dataset.from_list([{"prompt": "ab\n", "chosen": "AB", "rejected": "ab"}]))
    trl.model.eval()
    trl.precompute_ref_logps = True  # take the rows' ref_chosen_logps / ref_rejected_logps
    return trl, rows, DataCollatorForPreference(pad_token_id=hf_tokenizer.pad_token_id), examples


TRL_NAMES = {"robust": "robust", "hinge": "hinge", "ipo": "ipo", "dpo_norm": "sigmoid_norm", "exo": "exo_pair",
             "nca": "nca_pair", "bco": "bco_pair", "sppo_hard": "sppo_hard", "apo_zero": "apo_zero",
             "apo_down": "apo_down"}


@pytest.mark.parametrize("kind", list(TRL_NAMES))
def test_the_reference_losses_equal_trls_dpo_trainer(orpo_run, base, pairs, tmp_path, kind):
    """TRL's DPOTrainer with the loss_type of each reference loss (TRL_NAMES) on the Hugging Face export of the
    trained model, every val pair fed as token ids through TRL's collator: lmforge's evaluation gives the same loss
    and rewards (IPO's per-token normalisation counts the same completion tokens)."""
    beta, eps = 0.5, (0.2 if kind in ("robust", "exo") else 0.0)
    trl, rows, collate, examples = trl_on_exports(orpo_run, base, pairs, tmp_path, beta=beta,
                                                  loss_type=[TRL_NAMES[kind]], label_smoothing=eps)
    with torch.no_grad():
        expected = trl._compute_loss(trl.model, collate(rows), False)
    trl_metrics = {k: v[-1] for k, v in trl._metrics["eval"].items()}
    model, tokenizer, _ = load_for_inference(orpo_run.last_checkpoint)
    reference, _, _ = load_for_inference(base)
    metrics, _ = evaluate_preference(model, reference, tokenizer, examples, PreferenceLoss(kind, beta, eps),
                                     batch_size=7)
    assert metrics["loss"] == pytest.approx(float(expected), abs=2e-5)
    assert metrics["chosen_reward"] == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-4)
    assert metrics["rejected_reward"] == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-4)
    assert metrics["reward_accuracy"] == trl_metrics["rewards/accuracies"]


# ---------------------------------------------------------------------------------------------- in the trainer
EXO_FIRST = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)  # KL((1/2, 1/2) || (0.8, 0.2))


@pytest.mark.parametrize("kind, first", [("robust", LOG2), ("hinge", 1.0), ("ipo", 0.25), ("dpo_norm", LOG2),
                                         ("exo", EXO_FIRST), ("nca", 2 * LOG2), ("bco", 2 * LOG2),
                                         ("sppo_hard", 0.5), ("apo_zero", 1.0), ("apo_down", 1.0)])
def test_a_reference_loss_starts_where_policy_equals_reference_and_learns(base, pairs, tmp_path, kind, first):
    """At step 1 the policy is its reference: every log-ratio is 0, so robust's loss is log 2 at any label
    smoothing, hinge's 1, IPO's (1 / (2 beta))^2 = 0.25 at beta 1, EXO's KL of (1/2, 1/2) from (1 - eps, eps),
    SPPO's 2 (1 / (2 beta))^2, ...; after 20 steps the chosen completion wins every pair."""
    extra = {"train.dpo_label_smoothing": 0.2} if kind in ("robust", "exo") else {}
    trainer = Trainer(dpo(tmp_path / "run", pairs, base, **{"train.preference_loss": kind, "train.max_steps": 20,
                                                            "optim.warmup_steps": 5, **extra}),
                      progress=False, tensorboard=False)
    trainer.fit()
    assert trainer.history[0][1] == pytest.approx(first, abs=1e-6)
    assert trainer.val_metrics["val_reward_accuracy"] >= 0.9 and trainer.val_loss < first - 0.1
    assert trainer.reference is not None


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
@pytest.mark.parametrize("lora", [False, True])
def test_a_reference_free_loss_keeps_and_runs_no_reference(base, pairs, tmp_path, monkeypatch, kind, lora):
    """simpo and orpo: no frozen copy is made, the model runs once per batch (no reference forward, no adapters
    turned off), and the chosen completion wins every val pair after 20 steps."""
    import lmforge.train.trainer as trainer_module

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free loss ran a reference")

    monkeypatch.setattr(trainer_module, "reference_model", no_reference)
    monkeypatch.setattr(trainer_module, "frozen_reference", no_reference)
    extra = {"lora.r": 4, "lora.targets": "q,v,mlp", "optim.lr": 1e-2} if lora else {}
    trainer = Trainer(dpo(tmp_path / "run", pairs, base, **{"train.preference_loss": kind, "train.max_steps": 20,
                                                            "optim.warmup_steps": 5, "train.dpo_beta": 2.0, **extra}),
                      progress=False, tensorboard=False)
    before = trainer.evaluate()
    trainer.fit()
    assert trainer.reference is None
    assert trainer.val_metrics["val_reward_accuracy"] >= 0.9 and trainer.val_loss < before - 0.1


def test_a_reference_free_loss_trains_from_scratch(pairs, tmp_path):
    """With no reference to start from, train.init_from none is allowed (and the model learns the preference)."""
    config = dpo(tmp_path / "run", pairs, Path("unused"), **{"train.init_from": "none",
                                                             "train.preference_loss": "simpo",
                                                             "train.dpo_beta": 2.0, "train.max_steps": 30,
                                                             "optim.warmup_steps": 5, "model.block_size": 64,
                                                             "model.vocab_size": 259})
    trainer = Trainer(config, progress=False, tensorboard=False)
    before = trainer.evaluate()
    trainer.fit()
    assert trainer.val_loss < before


def test_lmforge_eval_of_an_orpo_run_is_the_trainers_val_loss_without_a_reference(orpo_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(orpo_run.run_dir), "--split", "val", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(orpo_run.val_loss, abs=1e-5)
    assert result["reward_accuracy"] == pytest.approx(orpo_run.val_metrics["val_reward_accuracy"])
    assert result["preference_loss"] == "orpo" and "reference_logp_accuracy" not in result


def test_preference_loss_settings_that_cannot_work_are_refused(base, pairs, tmp_path):
    cases = [({"train.preference_loss": "ipo", "train.init_from": "none"}, "or use train.preference_loss simpo"),
             ({"train.preference_loss": "hinge", "train.dpo_label_smoothing": 0.1}, "not by hinge: drop it"),
             ({"train.preference_loss": "orpo", "train.dpo_label_smoothing": 0.1}, "not by orpo: drop it"),
             ({"train.simpo_gamma": 1.0}, "and train.preference_loss is dpo"),
             ({"train.preference_loss": "ppo"}, "ppo"),
             ({"train.preference_loss": "kto"}, "this is pair data")]
    for i, (overrides, message) in enumerate(cases):
        with pytest.raises(ConfigError, match=message):
            Trainer(dpo(tmp_path / f"run{i}", pairs, base, **overrides), progress=False, tensorboard=False)
    sft = tmp_path / "sft"
    assert main(["prepare", str(write_jsonl(tmp_path / "r.jsonl", reverse_records(30))), "--task", "sft",
                 "--tokenizer", str(base), "--out", str(sft)]) == 0
    with pytest.raises(ConfigError, match="is not preference data"):
        Trainer(dpo(tmp_path / "sftrun", sft, base, **{"train.dpo_beta": 0.1, "train.preference_loss": "simpo"}),
                progress=False, tensorboard=False)
    assert not any(p.name.startswith("run") or p.name == "sftrun" for p in tmp_path.iterdir())
