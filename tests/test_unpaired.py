"""Unpaired preference data and KTO: `lmforge prepare --task unpaired`, batches with KTO's mismatched rows, the
kto and apo_zero_unpaired losses by hand and against TRL's KTOTrainer on the same weights, the loss in the one
training loop (full and LoRA, DDP, resume) and `lmforge eval` on unpaired completions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_for_inference
from lmforge.cli import main
from lmforge.data.batches import ExampleBatches, fixed_example_batches, unpaired_batch
from lmforge.data.tasks import load_examples, read_task_manifest
from lmforge.errors import ConfigError, DataError
from lmforge.eval.preference import evaluate_unpaired
from lmforge.preference_loss import PreferenceLoss, RunningMean, reference_point
from lmforge.tokenizer import Tokenizer
from lmforge.train import Trainer
from test_preference import base, dpo, prepare_pairs, prepared, preference_records  # noqa: F401  (base: fixture)
from test_tasks import reverse_records, write_csv, write_jsonl
from tiny_training import step_losses


def unpaired_records(n: int, seed: int = 0) -> list[dict]:
    """n distinct words: the even ones with their capitals (desirable), the odd ones with a copy (undesirable)."""
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"], "label": i % 2 == 0}
            for i, r in enumerate(preference_records(n, seed))]


def prepare_unpaired(base: Path, out: Path, *inputs: Path, extra: tuple = ()) -> int:
    return prepare_pairs(base, out, *inputs, extra=extra, task="unpaired")


@pytest.fixture(scope="module")
def unpaired(base, tmp_path_factory) -> Path:
    """Unpaired data of 300 records (150 desirable capitals, 150 undesirable copies), 80/10/10."""
    return prepared(base, tmp_path_factory, "unpaired", unpaired_records(300))


def kto(run_dir: Path, data: Path, base: Path, **overrides: object):
    """test_preference.dpo's run with train.preference_loss kto (unless overridden)."""
    return dpo(run_dir, data, base, **{"train.preference_loss": "kto", **overrides})


@pytest.fixture(scope="module")
def kto_run(base, unpaired, tmp_path_factory) -> Trainer:
    """KTO for 30 steps, evaluated at the end."""
    trainer = Trainer(kto(tmp_path_factory.mktemp("kto") / "run", unpaired, base, **{"train.max_steps": 30}),
                      progress=False, tensorboard=False)
    trainer.fit()
    return trainer


def texts(data: Path, split: str) -> list[tuple[str, str, bool]]:
    """(prompt, completion, desirable) of every example of a split, decoded."""
    ex, tok = load_examples(data, split), Tokenizer.load(data / "tokenizer.json")
    return [(tok.decode(p), tok.decode(c), bool(ex.desirable[e]))
            for e, (p, c) in enumerate(ex.prompt_and_completion(e) for e in range(len(ex)))]


# ------------------------------------------------------------------------------------------------ prepare
def test_prepare_keeps_each_completion_with_its_label_split_by_label(unpaired):
    records = {(r["prompt"] + "\n", r["completion"]): r["label"] for r in unpaired_records(300)}
    seen = []
    for split, size in (("train", 240), ("val", 30), ("test", 30)):
        rows = texts(unpaired, split)
        assert len(rows) == size
        assert all(records[(prompt, completion)] == desirable for prompt, completion, desirable in rows)
        assert sum(d for *_, d in rows) == size // 2  # stratified: half of each split desirable
        seen += [(p, c) for p, c, _ in rows]
    assert sorted(seen) == sorted(records)  # every record once
    manifest = read_task_manifest(unpaired)
    assert manifest["task"] == "unpaired" and manifest["fields"]["label"] == "label"
    report = json.loads((unpaired / "report.json").read_text())
    assert report["splits"]["val"] == {**report["splits"]["val"], "examples": 30, "desirable": 15, "undesirable": 15}


def test_labels_in_every_form_and_chat_records_are_read(base, tmp_path):
    words = [r["prompt"] for r in preference_records(12)]
    forms = [True, False, 1, 0, "true", "FALSE", " 1 ", "0"]
    records = [{"prompt": w, "completion": w.upper(), "label": forms[i % len(forms)]} for i, w in enumerate(words[:8])]
    records += [{"prompt": [{"role": "user", "content": w}], "completion": [{"role": "assistant", "content": w[::-1]}],
                 "label": i % 2 == 0} for i, w in enumerate(words[8:])]
    assert prepare_unpaired(base, tmp_path / "data", write_jsonl(tmp_path / "u.jsonl", records),
                            extra=("--split", "0.5,0.25,0.25")) == 0
    expected = {w.upper(): f in (True, 1, "true", " 1 ") for w, f in zip(words, forms)}
    expected.update({w[::-1]: i % 2 == 0 for i, w in enumerate(words[8:])})
    rows = [row for split in ("train", "val", "test") for row in texts(tmp_path / "data", split)]
    assert {completion: desirable for _, completion, desirable in rows} == expected
    chat = [prompt for prompt, completion, _ in rows if completion in {w[::-1] for w in words[8:]}]
    assert len(chat) == 4 and all(p.endswith("sistant|>\n") for p in chat)  # the chat template (cut on the left)
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert report["chat_records"] == 4
    csv_dir = tmp_path / "csv"  # CSV cells are strings
    assert prepare_unpaired(base, csv_dir, write_csv(tmp_path / "u.csv", [{**r, "label": str(r["label"]).lower()}
                                                                         for r in unpaired_records(20)])) == 0
    assert sum(d for split in ("train", "val", "test") for *_, d in texts(csv_dir, split)) == 10


def test_preference_pairs_become_two_examples_kept_in_one_split(base, tmp_path):
    """A record with chosen and rejected and no completion (preference data, as TRL's unpair_preference_dataset
    takes it) gives a desirable and an undesirable example of its prompt, both in one split (no prompt leaks from
    train into val or test through its other half), beside ordinary unpaired records."""
    pairs = preference_records(60, seed=3)
    singles = [r for r in unpaired_records(40) if r["prompt"] not in {p["prompt"] for p in pairs}][:20]
    path = write_jsonl(tmp_path / "mixed.jsonl", pairs[:30] + singles)
    assert prepare_unpaired(base, tmp_path / "data", path, extra=("--split", "0.6,0.2,0.2")) == 0
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert (report["records"], report["pair_records"], report["examples"]) == (50, 30, 80)
    assert report["leakage"]["val"]["leaked"] == report["leakage"]["test"]["leaked"] == 0
    where: dict[str, set] = {}
    for split in ("train", "val", "test"):
        rows = texts(tmp_path / "data", split)
        assert 0 < sum(d for *_, d in rows) < len(rows)  # both kinds in every split
        for prompt, completion, desirable in rows:
            where.setdefault(prompt, set()).add(split)
            pair = next((p for p in pairs[:30] if p["prompt"] + "\n" == prompt), None)
            if pair is not None:
                assert completion == (pair["chosen"] if desirable else pair["rejected"])
    assert all(len(splits) == 1 for splits in where.values()) and len(where) == 50
    train = [prompt for prompt, _, _ in texts(tmp_path / "data", "train")]  # shuffled: a pair's halves seldom meet,
    adjacent = sum(a == b for a, b in zip(train, train[1:]))  # so a mismatched row rarely shares its prompt
    assert adjacent <= sum(p["prompt"] + "\n" in train for p in pairs[:30]) // 3
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "y"}] + singles)
    assert prepare_unpaired(base, tmp_path / "bad", same) == 2


def test_bad_labels_duplicates_and_conflicts(base, tmp_path, capsys):
    good = unpaired_records(20)
    bad = [{"prompt": "x", "completion": "y", "label": "maybe"}, {"prompt": "x", "completion": "y"},
           {"prompt": "x", "completion": "y", "label": 2}, {"prompt": "x", "completion": "", "label": True}]
    path = write_jsonl(tmp_path / "u.jsonl", good + bad)
    assert prepare_unpaired(base, tmp_path / "a", path) == 2
    assert f"{path}:21: field 'label' (label) is 'maybe': give true or false" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    twice = good + [good[0], {**good[1], "label": not good[1]["label"]}]
    assert prepare_unpaired(base, tmp_path / "b", write_jsonl(tmp_path / "d.jsonl", twice + bad),
                            extra=("--skip-bad",)) == 0
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert (report["bad_records"], report["duplicates"], report["conflicts"]) == (4, 1, 1)
    assert sum(s["examples"] for s in report["splits"].values()) == 21
    assert "labelled both ways" in capsys.readouterr().out


def test_one_kind_only_warns(base, tmp_path, capsys):
    records = [{**r, "label": True} for r in unpaired_records(20)]
    assert prepare_unpaired(base, tmp_path / "data", write_jsonl(tmp_path / "u.jsonl", records)) == 0
    assert "every example is labelled desirable" in capsys.readouterr().err
    assert json.loads((tmp_path / "data" / "report.json").read_text())["warnings"]


# ------------------------------------------------------------------------------------------------ batches
def test_a_mismatched_row_is_a_prompt_with_the_previous_draws_completion(unpaired):
    ex = load_examples(unpaired, "train")
    index, partners = np.array([5, 9, 2]), np.array([2, 5, 9])
    x, y, kl_x, kl_y, desirable = unpaired_batch(ex, index, partners, 0, 17)
    assert desirable.tolist() == ex.desirable[index].tolist()
    for r, (e, f) in enumerate(zip(index, partners)):
        prompt, _ = ex.prompt_and_completion(e)
        _, completion = ex.prompt_and_completion(f)
        ids = prompt + completion
        assert kl_x[r, :len(ids) - 1].tolist() == ids[:-1]
        labels = kl_y[r][kl_y[r] != -100].tolist()
        assert labels == completion  # the loss counts the other example's completion, its end token included
    stream = ExampleBatches(ex, 16, 4, seed=3, unpaired=True)
    for _ in range(3):
        order = stream.example_index(stream.position, 4)
        x, y, kl_x, kl_y, _ = stream.next_batch()
        assert [ex.prompt_and_completion(int(e))[1] for e in np.roll(order, 1)] == \
            [kl_y[r][kl_y[r] != -100].tolist() for r in range(4)]


def test_two_processes_build_the_rows_one_process_builds(unpaired):
    ex = load_examples(unpaired, "train")

    def rows(batch):
        x, y, kl_x, kl_y, desirable = batch
        return [(x[r][y[r] != -100].tolist(), kl_x[r].tolist(), kl_y[r][kl_y[r] != -100].tolist(), bool(desirable[r]))
                for r in range(len(x))]

    one = ExampleBatches(ex, 16, 4, seed=1, unpaired=True)
    two = [ExampleBatches(ex, 16, 2, seed=1, unpaired=True, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole, halves = rows(one.next_batch()), [rows(s.next_batch()) for s in two]
        strip = [(a, c, d) for a, _, c, d in whole]
        assert strip == [(a, c, d) for half in halves for a, _, c, d in half]
    val = [rows(b) for b in fixed_example_batches(ex, 16, 4, 2, unpaired=True)]
    assert [c for batch in val for _, _, c, _ in batch] == \
        [ex.prompt_and_completion(e)[1] for e in [7] + list(range(7))]  # 8 evaluated: the first takes the last's


# ------------------------------------------------------------------------------------------------- the loss
def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("kind", ["kto", "apo_zero_unpaired"])
def test_the_unpaired_losses_are_the_papers_formulas_by_hand(kind):
    g = torch.Generator().manual_seed(0)
    policy, ref = (torch.randn(9, generator=g, dtype=torch.float64) * 4 for _ in range(2))
    desirable = torch.tensor([True, False, True, True, False, False, True, False, True])
    beta, wd, wu, z = 0.3, 1.5, 0.7, 0.8
    loss_fn = PreferenceLoss(kind, beta, desirable_weight=wd, undesirable_weight=wu)
    loss, reward = loss_fn.unpaired_loss(policy, ref, desirable, torch.tensor(z))
    for i in range(9):
        r = float(policy[i]) - float(ref[i])
        if kind == "kto":
            expected = wd * (1 - sigmoid(beta * (r - z))) if desirable[i] else wu * (1 - sigmoid(beta * (z - r)))
        else:
            expected = wd * (1 - sigmoid(beta * r)) if desirable[i] else wu * sigmoid(beta * r)
        assert float(loss[i]) == pytest.approx(expected, rel=1e-6)
        assert float(reward[i]) == pytest.approx(beta * r, rel=1e-6)
    p = policy.clone().requires_grad_(True)
    z_in = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    loss_fn.unpaired_loss(p, ref, desirable, z_in)[0].sum().backward()
    assert z_in.grad is None  # the reference point is never differentiated
    for i in range(9):  # d/dr of w (1 - sigmoid(beta (r - z))) = -w beta s (1 - s), of w (1 - sigmoid(beta (z - r)))
        s = sigmoid(beta * ((float(policy[i]) - float(ref[i])) - (z if kind == "kto" else 0.0)))
        w = wd if desirable[i] else wu
        assert float(p.grad[i]) == pytest.approx((-1 if desirable[i] else 1) * w * beta * s * (1 - s), rel=1e-5)


def test_bco_is_a_logistic_classifier_of_the_reward_around_delta_by_hand():
    """BCO (Jung et al. 2024): -w_D log sigmoid(beta r - delta) for a desirable completion, -w_U log sigmoid(delta -
    beta r) for an undesirable one; the gradient of each, and none for delta."""
    g = torch.Generator().manual_seed(0)
    policy, ref = (torch.randn(9, generator=g, dtype=torch.float64) * 4 for _ in range(2))
    desirable = torch.tensor([True, False, True, True, False, False, True, False, True])
    beta, wd, wu, delta = 0.3, 1.5, 0.7, 0.4
    loss_fn = PreferenceLoss("bco_unpaired", beta, desirable_weight=wd, undesirable_weight=wu)
    assert loss_fn.needs_delta and not loss_fn.needs_kl and loss_fn.unpaired
    p = policy.clone().requires_grad_(True)
    d = torch.tensor(delta, dtype=torch.float64, requires_grad=True)
    loss, reward = loss_fn.unpaired_loss(p, ref, desirable, delta=d)
    loss.sum().backward()
    assert d.grad is None  # delta is never differentiated
    for i in range(9):
        m = beta * (float(policy[i]) - float(ref[i])) - delta
        w = wd if desirable[i] else wu
        expected = -w * math.log(sigmoid(m)) if desirable[i] else -w * math.log(sigmoid(-m))
        assert float(loss[i]) == pytest.approx(expected, rel=1e-5)
        assert float(reward[i]) == pytest.approx(beta * (float(policy[i]) - float(ref[i])), rel=1e-6)
        slope = -w * beta * (1 - sigmoid(m)) if desirable[i] else w * beta * sigmoid(m)
        assert float(p.grad[i]) == pytest.approx(slope, rel=1e-4)


def test_the_running_mean_is_the_mean_of_every_reward_seen_and_takes_the_first_batch_whole():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=g, dtype=torch.float64) + 3 for n in (5, 1, 12, 7)]
    running = RunningMean()
    assert running.update(float(batches[0].sum()), 5) == pytest.approx(float(batches[0].mean()), rel=1e-12)
    for batch in batches[1:]:
        running.update(float(batch.sum()), batch.numel())
    assert running.mean == pytest.approx(float(torch.cat(batches).mean()), rel=1e-12)
    again = RunningMean()
    again.load_state_dict(running.state_dict())
    assert again.update(2.0, 1) == running.update(2.0, 1)
    assert RunningMean().update(0.0, 0) == 0.0  # a process with no rows adds nothing


def test_a_bco_run_learns_logs_delta_evaluates_as_lmforge_eval_and_resumes_exactly(base, unpaired, tmp_path):
    from test_preference import full_and_resumed

    full, resumed = full_and_resumed(tmp_path, unpaired, base, **{"train.preference_loss": "bco_unpaired"})
    assert full.bco is not None and [step for step, _ in resumed.history] == [4, 5, 6]
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 3]
    assert resumed.bco.state_dict() == full.bco.state_dict() and resumed.val_metrics == full.val_metrics
    assert full.history[0][1] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: every margin 0
    assert full.val_metrics["val_reward_margin"] > 0.1 and full.val_loss < math.log(2)
    logged = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    deltas = [row["delta"] for row in logged if row.get("kind") == "train"]
    assert len(deltas) == 6 and deltas[0] == 0.0 and len(set(deltas)) == 6  # the running mean moves
    batch, seen = full.val_batches[0], RunningMean(**full.bco.state_dict())  # a step's micro-batch: its rewards
    with torch.no_grad():  # join the running mean first, and its loss is taken around the new mean
        loss, _ = full.unpaired_terms(full.model, batch)
        policy, ref, _ = full.unpaired_logprobs(full.model, batch)
    delta = seen.update(float(full.preference_loss.beta * (policy - ref).double().sum()), policy.numel())
    assert full.bco.mean == pytest.approx(delta, rel=1e-12) and delta != 0.0
    expected, _ = full.preference_loss.unpaired_loss(policy, ref, batch[4], delta=torch.tensor(delta))
    assert torch.allclose(loss, expected, atol=1e-6)
    out = tmp_path / "eval"
    assert main(["eval", str(full.last_checkpoint), "--data", str(unpaired), "--split", "val", "--out", str(out),
                 "--batch-size", "5"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["loss"] == pytest.approx(full.val_loss, abs=1e-6)
    assert result["delta"] == pytest.approx(full.val_metrics["val_delta"], abs=1e-6)
    assert result["preference_loss"] == "bco_unpaired"


def test_kto_weight_advice_is_the_papers_balance_rule():
    """KTO's eq. 8: lambda_D n_D / (lambda_U n_U) in [1, 4/3]; outside it the advice names a range of each weight,
    and a weight at either end of its range (or inside) balances the data."""
    from lmforge.preference_loss import kto_weight_advice

    assert kto_weight_advice(100, 100, 1.0, 1.0) is None and kto_weight_advice(120, 100, 1.0, 1.0) is None
    assert kto_weight_advice(0, 100, 1.0, 1.0) is None  # one kind only: nothing to balance
    advice = kto_weight_advice(30, 100, 1.0, 1.0)
    assert "= 0.3, outside" in advice and "kto_desirable_weight in [3.34, 4.44]" in advice  # printed inside
    assert "kto_undesirable_weight in [0.225, 0.3]" in advice
    for wd in (100 / 30, 4 / 3 * 100 / 30, 4.0):
        assert kto_weight_advice(30, 100, wd, 1.0) is None
    for wu in (0.225, 0.3, 0.25):
        assert kto_weight_advice(30, 100, 1.0, wu) is None
    assert kto_weight_advice(30, 100, 4.5, 1.0) is not None and kto_weight_advice(100, 100, 1.4, 1.0) is not None


def test_the_printed_ends_of_the_advised_ranges_keep_the_rule():
    """Each end of an advised range is printed rounded inward (3 significant digits), so that a user who sets the
    printed value gets no second warning, for any counts."""
    import re

    from lmforge.preference_loss import kto_weight_advice

    for nd, nu in [(30, 100), (7, 61), (1, 3), (100, 37), (3, 1000), (999, 7)]:
        advice = kto_weight_advice(nd, nu, 1.0, 1.0)
        (d_low, d_high), (u_low, u_high) = (map(float, pair) for pair in
                                            re.findall(r"weight in \[([0-9.e+-]+), ([0-9.e+-]+)\]", advice))
        assert d_low < d_high and u_low < u_high
        for wd in (d_low, d_high):
            assert kto_weight_advice(nd, nu, wd, 1.0) is None, (nd, nu, wd)
        for wu in (u_low, u_high):
            assert kto_weight_advice(nd, nu, 1.0, wu) is None, (nd, nu, wu)


def test_a_run_on_unbalanced_data_warns_and_goes_on(base, tmp_path, capsys):
    records = [{**r, "label": i % 4 == 0} for i, r in enumerate(unpaired_records(80))]  # 1 desirable in 4
    assert prepare_unpaired(base, tmp_path / "data", write_jsonl(tmp_path / "u.jsonl", records)) == 0
    capsys.readouterr()
    Trainer(kto(tmp_path / "run", tmp_path / "data", base, **{"train.max_steps": 1}), progress=False,
            tensorboard=False).fit()
    err = capsys.readouterr().err
    assert "warning: 18 desirable and 54 undesirable train completions" in err and "kto_desirable_weight in [3" in err
    Trainer(kto(tmp_path / "run2", tmp_path / "data", base, **{"train.max_steps": 1,
                                                               "train.kto_desirable_weight": 3.5}),
            progress=False, tensorboard=False).fit()
    assert "lambda_D n_D" not in capsys.readouterr().err
    Trainer(kto(tmp_path / "run3", tmp_path / "data", base, **{"train.max_steps": 1,
                                                               "train.preference_loss": "apo_zero_unpaired"}),
            progress=False, tensorboard=False)  # its weights multiply the two kinds' losses too (TRL warns alike)
    assert "warning: 18 desirable and 54 undesirable" in capsys.readouterr().err


def test_the_reference_point_is_the_mean_log_ratio_clamped_at_zero():
    assert float(reference_point(torch.tensor(6.0), torch.tensor(4.0))) == 1.5
    assert float(reference_point(torch.tensor(-6.0), torch.tensor(4.0))) == 0.0
    assert float(reference_point(torch.tensor(0.0), torch.tensor(0.0))) == 0.0


def test_losses_of_pairs_and_of_single_completions_do_not_mix():
    with pytest.raises(ValueError, match="loss of single completions"):
        PreferenceLoss("kto")(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2), torch.zeros(2),
                              torch.zeros(2))
    with pytest.raises(ValueError, match="a loss of pairs"):
        PreferenceLoss("dpo").unpaired_loss(torch.zeros(2), torch.zeros(2), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="trains on single completions"):
        PreferenceLoss("kto", nll_weight=0.5)


# --------------------------------------------------------------------------------------------------- TRL
@pytest.mark.parametrize("kind", ["kto", "apo_zero_unpaired"])
def test_kto_equals_trls_kto_trainer(kto_run, base, unpaired, tmp_path, kind):
    """TRL's KTOTrainer (_compute_loss, loss_type kto and apo_zero_unpaired, with weights) on the Hugging Face
    exports of the trained model and of its base, the val completions as its token-id rows with each one's
    mismatched completion the previous one's (KL_completion_ids rotated by one, as TRL builds them): lmforge's
    evaluation gives the same loss, KL reference point and rewards. The reference's log-probabilities are TRL's
    precomputed ones, from transformers' own forward (see test_preference_losses.trl_on_exports)."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from test_preference import hf_completion_logp
    from test_preference_losses import hf_exports

    policy, hf_reference, hf_tokenizer = hf_exports(kto_run, base, tmp_path)
    examples = load_examples(unpaired, "val")
    n = len(examples)

    def ref_logp(prompt: list[int], completion: list[int]) -> float:
        return hf_completion_logp(hf_reference, prompt, completion)

    parts = [examples.prompt_and_completion(e) for e in range(n)]
    rows = [{"prompt_ids": p, "completion_ids": c, "KL_completion_ids": parts[e - 1][1],
             "label": bool(examples.desirable[e]), "ref_logps": ref_logp(p, c),
             "ref_KL_logps": ref_logp(p, parts[e - 1][1])}
            for e, (p, c) in enumerate(parts)]
    beta, wd, wu = 0.7, 1.3, 0.8
    args = KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=None, beta=beta,
                     loss_type=kind, desirable_weight=wd, undesirable_weight=wu)
    trl = KTOTrainer(model=policy, ref_model=hf_reference, args=args, processing_class=hf_tokenizer,
                     train_dataset=Dataset.from_list([{"prompt": "ab\n", "completion": "AB", "label": True}]))
    trl.model.eval()
    trl.precompute_ref_logps = True  # take the rows' ref_logps / ref_KL_logps
    with torch.no_grad():
        expected = trl._compute_loss(trl.model, DataCollatorForUnpairedPreference(hf_tokenizer.pad_token_id)(rows),
                                     False)
    trl_metrics = {k: v[-1] for k, v in trl._metrics["eval"].items()}
    model, tokenizer, _ = load_for_inference(kto_run.last_checkpoint)
    reference, _, _ = load_for_inference(base)
    metrics, _ = evaluate_unpaired(model, reference, tokenizer, examples,
                                   PreferenceLoss(kind, beta, desirable_weight=wd, undesirable_weight=wu), 17,
                                   batch_size=7)
    assert metrics["loss"] == pytest.approx(float(expected), abs=2e-5)
    assert metrics["desirable_reward"] == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-4)
    assert metrics["undesirable_reward"] == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-4)
    if kind == "kto":
        assert metrics["kl"] == pytest.approx(trl_metrics["kl"], abs=1e-4) and metrics["kl"] > 0.1
    else:
        assert "kl" not in metrics


# ------------------------------------------------------------------------------------------- in the trainer
@pytest.mark.parametrize("lora", [False, True])
def test_kto_starts_at_half_the_weights_and_learns_the_preference(base, unpaired, tmp_path, lora):
    """Step 1: the policy is its reference, every log-ratio and the reference point are 0, so each completion's loss
    is its weight x (1 - sigmoid(0)) = weight / 2; the run then rewards the desirable completions and not the
    others, on val completions it never trained on."""
    settings = {"lora.r": 4, "lora.targets": "q,v,mlp", "optim.lr": 1e-2} if lora else {}
    config = kto(tmp_path / "run", unpaired, base, **{"train.max_steps": 25, "train.kto_desirable_weight": 2.0,
                                                      **settings})
    trainer = Trainer(config, progress=False, tensorboard=False)
    first = trainer.train_data.example_index(0, 8)
    desirable = trainer.train_data.examples.desirable[first]
    trainer.fit()
    assert trainer.history[0][1] == pytest.approx((2.0 * desirable.sum() + (~desirable).sum()) / 2 / 8, abs=1e-6)
    assert trainer.val_metrics["val_desirable_reward"] > 0.5 > -0.5 > trainer.val_metrics["val_undesirable_reward"]
    assert trainer.val_metrics["val_reward_margin"] == pytest.approx(
        trainer.val_metrics["val_desirable_reward"] - trainer.val_metrics["val_undesirable_reward"])
    assert trainer.val_loss < trainer.history[0][1] * (0.8 if lora else 0.3)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kl = [row["kl"] for row in logged if row.get("kind") == "train"]
    assert len(kl) == 25 and kl[0] == 0.0 and max(kl) > 0.05  # z: 0 at the start, then the policy moves away


def test_the_trainers_val_loss_is_lmforge_evals(kto_run, unpaired, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", str(kto_run.last_checkpoint), "--data", str(unpaired), "--split", "val", "--out",
                 str(out), "--batch-size", "5"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["loss"] == pytest.approx(kto_run.val_loss, abs=1e-6)
    assert result["kl"] == pytest.approx(kto_run.val_metrics["val_kl"], abs=1e-5) and result["kl"] > 0.1
    assert result["reward_margin"] == pytest.approx(kto_run.val_metrics["val_reward_margin"], abs=1e-5)
    assert (result["examples"], result["desirable"], result["undesirable"]) == (30, 15, 15)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["completion"], r["desirable"]) for r in rows] == texts(unpaired, "val")
    assert all((r["reward"] > 0) == r["desirable"] for r in rows)  # what it learned, one completion at a time


def test_a_kto_model_generates_and_serves_with_the_template_it_learned(kto_run):
    """state.json's task is {"task": "unpaired", "template"}: generation (and so `lmforge serve`) wraps a prompt in
    the template the model was fine-tuned with, as for sft and DPO."""
    from lmforge.generate import load

    state = json.loads((Path(kto_run.last_checkpoint) / "state.json").read_text())
    assert state["task"]["task"] == "unpaired"
    generator = load(str(kto_run.run_dir))
    assert generator.template is not None and generator.template["prompt"] == "{prompt}\n"


def test_the_reference_point_moves_the_loss(kto_run):
    """z > 0 after training (the val split's): KTO's loss of a desirable completion is above apo_zero_unpaired's (the
    same weights and rewards, without the reference point) and an undesirable one's below."""
    batch = kto_run.val_batches[0]
    with torch.no_grad():
        policy, ref, _ = kto_run.unpaired_logprobs(kto_run.model, batch)
    z = kto_run.val_metrics["val_kl"]
    assert z > 0.1
    with_z, _ = kto_run.preference_loss.unpaired_loss(policy, ref, batch[4], torch.tensor(z))
    without, _ = PreferenceLoss("apo_zero_unpaired", 1.0).unpaired_loss(policy, ref, batch[4])
    desirable = batch[4]
    assert bool((with_z[desirable] > without[desirable]).all())
    assert bool((with_z[~desirable] < without[~desirable]).all())


def test_a_resumed_kto_run_is_bit_identical(base, unpaired, tmp_path):
    from test_preference import full_and_resumed

    full, resumed = full_and_resumed(tmp_path, unpaired, base, **{"train.preference_loss": "kto"})
    assert full.unpaired and full.preference_loss.kind == "kto"
    assert [step for step, _ in resumed.history] == [4, 5, 6]
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 3]
    assert resumed.val_loss == full.val_loss and resumed.val_metrics == full.val_metrics
    assert step_losses(tmp_path / "resumed")[6] == step_losses(tmp_path / "full")[6]


@pytest.mark.distributed
@pytest.mark.parametrize("loss", ["kto", "bco_unpaired"])
def test_two_processes_train_kto_like_one(base, unpaired, tmp_path, loss):
    """DDP: 2 processes x 4 completions give the losses and val loss of 1 process x 8: the mismatched rows are
    drawn within the global micro-batch and the reference point is averaged over both processes (BCO: its running
    mean reward takes both processes' rewards)."""
    from distributed_jobs import one_and_two

    settings = {"data.path": str(unpaired), "train.init_from": str(base), "train.dpo_beta": 1.0,
                "train.preference_loss": loss, "optim.lr": 1e-2}
    one, two = one_and_two(tmp_path, settings)
    assert [loss for _, loss in two["history"]] == pytest.approx([loss for _, loss in one["history"]], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    assert one["history"][-1][1] < one["history"][0][1]


@pytest.mark.distributed
def test_fsdp_trains_kto_like_one_process_with_the_reference_sharded(base, unpaired, tmp_path):
    """FSDP (train.parallel fsdp): 2 processes x 4 completions give the losses and val loss of 1 process x 8, with
    the policy's no-gradient forward on the mismatched rows and the sharded reference's on both kinds of rows; each
    process holds half of the reference."""
    from distributed_jobs import one_and_two

    settings = {"data.path": str(unpaired), "train.init_from": str(base), "train.dpo_beta": 1.0,
                "train.preference_loss": "kto", "optim.lr": 1e-2}
    one, two = one_and_two(tmp_path, settings, {"train.parallel": "fsdp"})
    assert two["sharded"]
    assert [loss for _, loss in two["history"]] == pytest.approx([loss for _, loss in one["history"]], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    assert two["held"] < 0.6 and one["reference_held"] == 1.0
    assert two["reference_held"] == pytest.approx(two["held"])


def test_settings_that_cannot_work_on_unpaired_data_are_refused(base, unpaired, tmp_path):
    cases = [({"train.preference_loss": "dpo"}, "set --train.preference_loss kto"),
             ({"train.preference_nll_weight": 0.5}, "unpaired data has no pairs"),
             ({"train.init_from": "none"}, "set train.init_from"),
             ({"train.best_metric": "val_reward_accuracy"}, "measured on preference data"),
             ({"train.dpo_label_smoothing": 0.1}, "not by kto"),
             ({"data.packing": True}, "drop data.packing")]
    for i, (overrides, message) in enumerate(cases):
        with pytest.raises((ConfigError, DataError), match=message):
            Trainer(kto(tmp_path / f"run{i}", unpaired, base, **overrides), progress=False, tensorboard=False)
    sft = tmp_path / "sft"
    assert main(["prepare", str(write_jsonl(tmp_path / "r.jsonl", reverse_records(30))), "--task", "sft",
                 "--tokenizer", str(base), "--out", str(sft)]) == 0
    with pytest.raises(ConfigError, match="is not preference data"):
        Trainer(kto(tmp_path / "sftrun", sft, base, **{"train.preference_loss": "dpo",
                                                       "train.kto_undesirable_weight": 2.0}),
                progress=False, tensorboard=False)
    assert not any(p.name.startswith("run") or p.name == "sftrun" for p in tmp_path.iterdir())


def test_kto_on_pairs_and_a_pair_loss_checkpoint_on_unpaired_data_are_refused(base, unpaired, tmp_path):
    pairs = tmp_path / "pairs"
    assert prepare_pairs(base, pairs, write_jsonl(tmp_path / "p.jsonl", preference_records(30))) == 0
    with pytest.raises(ConfigError, match="this is pair data"):
        Trainer(kto(tmp_path / "a", pairs, base), progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match="weigh unpaired completions"):
        Trainer(kto(tmp_path / "b", pairs, base, **{"train.preference_loss": "dpo", "train.kto_desirable_weight": 2}),
                progress=False, tensorboard=False)
    dpo_run = Trainer(kto(tmp_path / "dpo", pairs, base, **{"train.preference_loss": "dpo", "train.max_steps": 1}),
                      progress=False, tensorboard=False)
    dpo_run.fit()
    assert main(["eval", str(dpo_run.last_checkpoint), "--data", str(unpaired), "--split", "val"]) == 2


# ------------------------------------------------------------------------------------------------------ plan
@pytest.mark.parametrize("loss, forwards", [("kto", 3), ("apo_zero_unpaired", 1)])
def test_plan_counts_the_reference_and_the_mismatched_rows(loss, forwards):
    """A batch of B unpaired completions trains B sequences; the frozen copy is kept and its forward runs on them,
    and kto also runs the policy's and the reference's forward on the B mismatched rows: 3 forwards of 2N +
    attention/3 FLOPs per token in all (apo_zero_unpaired: 1). --measure trains real Trainer steps on random
    completions."""
    from lmforge.plan import measure, plan
    from test_plan import B, L, C, T, config, hand_parameters

    P, _ = hand_parameters()
    p = plan(config(**{"train.preference_loss": loss}), device="h100", task="unpaired")
    tokens = plan(config(), device="h100")
    attention = 12 * L * C * T
    N = (p.flops_per_token - attention) // 6
    assert p.tokens_per_step == B * T and p.activations == tokens.activations
    assert p.reference == 4 * P and p.reference_forward
    assert p.step_flops_per_token == p.flops_per_token + forwards * (2 * N + attention // 3)
    from lmforge.plan import format_plan

    note = "(unpaired completions, with their mismatched rows' forward)" if loss == "kto" else "(unpaired completions)"
    assert [line for line in format_plan(p).splitlines() if line.startswith("training tokens")][0].endswith(note)
    assert p.mismatched_forward == (loss == "kto")
    measured = measure(config(**{"train.num_threads": 1, "train.preference_loss": loss}), steps=1, task="unpaired")
    assert measured["peak_rss"] > measured["runtime_rss"] > 0 and measured["step_time"] > 0
