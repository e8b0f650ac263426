"""Preference fine-tuning (DPO): `lmforge prepare --task preference`, batches of pairs, the loss against a frozen
reference in the one training loop (full and LoRA), resume, and `lmforge eval` on pairs.

The loss is checked against the paper's formula computed by hand in float64, and the trainer's validation loss
against a by-hand computation from the checkpoint's and the base's weights on each pair run alone (no padding).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_for_inference
from lmforge.cli import main
from lmforge.data.batches import ExampleBatches, Examples, fixed_example_batches
from lmforge.data.tasks import load_examples, read_task_manifest
from lmforge.errors import ConfigError, DataError
from lmforge.lora import LoRALinear, adapters_off, apply_lora, merge_lora
from lmforge.model import GPT
from lmforge.preference_loss import dpo_loss, sequence_logprobs
from lmforge.tokenizer import Tokenizer
from lmforge.train import Trainer
from test_tasks import make_base, reverse_records, write_jsonl
from tiny_training import step_losses, tiny_config

LOG2 = math.log(2.0)


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """n distinct words 'abc': chosen 'ABC' (in capitals), rejected 'abc' (a copy): a preference a tiny model learns."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < n:
        words["".join(rng.choice("abcdef") for _ in range(rng.randint(2, 5)))] = None
    return [{"prompt": word, "chosen": word.upper(), "rejected": word} for word in words]


def prepare_pairs(base: Path, out: Path, *inputs: Path, extra: tuple = (), task: str = "preference") -> int:
    return main(["prepare", *map(str, inputs), "--task", task, "--tokenizer", str(base), "--out", str(out),
                 *map(str, extra)])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"))


def prepared(base: Path, tmp_path_factory, task: str, records: list[dict]) -> Path:
    """`records` prepared as `task` data (preference or unpaired) with the base's tokenizer, 80/10/10."""
    root = tmp_path_factory.mktemp(task)
    assert prepare_pairs(base, root / "data", write_jsonl(root / "records.jsonl", records),
                         extra=("--split", "0.8,0.1,0.1"), task=task) == 0
    return root / "data"


@pytest.fixture(scope="module")
def pairs(base, tmp_path_factory) -> Path:
    """Preference data of 300 capitals records (distinct words), 80/10/10."""
    return prepared(base, tmp_path_factory, "preference", preference_records(300))


def dpo(run_dir: Path, data: Path, base: Path, **overrides: object):
    values = {"data.path": str(data), "train.init_from": str(base), "train.max_steps": 6, "train.batch_size": 8,
              "train.eval_interval": 0, "train.eval_batches": 4, "optim.lr": 3e-3, "train.dpo_beta": 1.0}
    values.update(overrides)
    return tiny_config(run_dir, **values)


def decoded_pairs(data: Path, split: str) -> list[tuple[list[int], list[int], list[int], list[int]]]:
    """(chosen prompt ids, chosen completion ids, rejected prompt ids, rejected completion ids) of every pair."""
    ex = load_examples(data, split)
    return [ex.prompt_and_completion(i) + ex.prompt_and_completion(i + 1) for i in range(0, len(ex), 2)]


def trl_rows(examples: Examples, reference: torch.nn.Module | None = None) -> list[dict]:
    """The pairs as the token-id rows TRL's DataCollatorForPreference takes (prompt_ids, chosen_ids, rejected_ids),
    with a reference model: also ref_chosen_logps / ref_rejected_logps, each completion's summed log-probability
    under that Hugging Face model's own forward (float64 log-softmax), for TRL's precomputed-reference path."""
    rows = []
    for i in range(0, len(examples), 2):
        row = {}
        for e, side in ((i, "chosen"), (i + 1, "rejected")):
            prompt, completion = examples.prompt_and_completion(e)
            row["prompt_ids"], row[f"{side}_ids"] = prompt, completion
            if reference is not None:
                row[f"ref_{side}_logps"] = hf_completion_logp(reference, prompt, completion)
        rows.append(row)
    return rows


def hf_completion_logp(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> float:
    """The summed log-probability of `completion` after `prompt` under a Hugging Face model's own forward (float64
    log-softmax): the reference values the TRL parity tests hand TRL as precomputed ones."""
    ids = prompt + completion
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt), len(ids)))


# ---------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_loss_is_the_papers_formula_by_hand(smoothing):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(7, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    beta = 0.3
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, smoothing)
    for i in range(7):
        margin = beta * ((float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i])))
        sig = 1.0 / (1.0 + math.exp(-margin))
        expected = -(1 - smoothing) * math.log(sig) - smoothing * math.log(1.0 - sig)
        assert float(loss[i]) == pytest.approx(expected, rel=1e-6)
        assert float(chosen[i]) == pytest.approx(beta * (float(pc[i]) - float(rc[i])), rel=1e-6)
        assert float(rejected[i]) == pytest.approx(beta * (float(pr[i]) - float(rr[i])), rel=1e-6)
    zero = torch.zeros(3)
    assert torch.allclose(dpo_loss(zero, zero, zero, zero, 0.1)[0], torch.full((3,), LOG2))  # policy = reference
    far = torch.tensor([400.0, -400.0])  # no overflow: log sigmoid of a large margin
    extreme = dpo_loss(far, -far, torch.zeros(2), torch.zeros(2), 1.0)[0]
    assert torch.isfinite(extreme).all() and float(extreme[0]) < 1e-30 and float(extreme[1]) == pytest.approx(800.0)


def test_sequence_logprobs_sum_the_labelled_tokens_only():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=g)
    labels = torch.tensor([[-100, 2, 3, -100, -100], [1, 1, 1, 1, 1], [-100, -100, -100, -100, 6]])
    got = sequence_logprobs(logits, labels)
    logp = torch.log_softmax(logits.double(), dim=-1)
    for r in range(3):
        expected = sum(float(logp[r, t, labels[r, t]]) for t in range(5) if labels[r, t] != -100)
        assert float(got[r]) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------- the data
def test_pairs_are_stored_chosen_then_rejected_with_one_prompt(base, tmp_path):
    records = preference_records(40, seed=3)
    records.append(dict(records[0]))  # an exact duplicate goes
    records.append({**records[1], "rejected": records[1]["rejected"] + "x"})  # another rejected: a new pair
    assert prepare_pairs(base, tmp_path / "d", write_jsonl(tmp_path / "p.jsonl", records),
                         extra=("--template", "Q: {prompt}\nA: ", "--max-length", "40")) == 0
    tok = Tokenizer.load(tmp_path / "d" / "tokenizer.json")
    manifest = read_task_manifest(tmp_path / "d")
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert manifest["task"] == "preference" and manifest["template"]["prompt"] == "Q: {prompt}\nA: "
    assert report["duplicates"] == 1 and report["pairs"] == 42
    assert sum(s["pairs"] for s in report["splits"].values()) == 41
    wanted = {(f"Q: {r['prompt']}\nA: ", r["chosen"], r["rejected"]) for r in records}
    seen = set()
    for split in ("train", "val", "test"):
        for cp, cc, rp, rc in decoded_pairs(tmp_path / "d", split):
            assert cp == rp and cp[0] == tok.start_id  # one prompt for both
            assert cc[-1] == tok.end_id and rc[-1] == tok.end_id
            seen.add((tok.decode(cp), tok.decode(cc), tok.decode(rc)))
    assert seen == wanted


def test_a_conversation_prompt_and_assistant_turn_completions(base, tmp_path):
    records = [{"prompt": [{"role": "user", "content": f"say {w}"}], "chosen": [{"role": "assistant", "content": w}],
                "rejected": [{"role": "assistant", "content": w[::-1]}]} for w in ("ab", "cd", "ef", "fa")]
    assert prepare_pairs(base, tmp_path / "d", write_jsonl(tmp_path / "c.jsonl", records),
                         extra=("--max-length", "40")) == 0
    tok = Tokenizer.load(tmp_path / "d" / "tokenizer.json")
    texts = [(tok.decode(cp), tok.decode(cc)) for s in ("train", "val", "test")
             for cp, cc, _, _ in decoded_pairs(tmp_path / "d", s)]
    assert sorted(texts) == sorted((f"<|user|>\nsay {w}\n<|assistant|>\n", w) for w in ("ab", "cd", "ef", "fa"))
    assert json.loads((tmp_path / "d" / "report.json").read_text())["chat_records"] == 4


@pytest.mark.parametrize("bad, reason", [
    ({"prompt": "ab", "chosen": "ba", "rejected": "ba"}, "are the same text"),
    ({"prompt": "ab", "chosen": "ba"}, "no field 'rejected' (rejected)"),
    ({"prompt": "ab", "chosen": "  ", "rejected": "ab"}, "empty chosen completion"),
    ({"prompt": "ab", "chosen": [{"role": "assistant", "content": "b"}, {"role": "assistant", "content": "a"}],
      "rejected": "ab"}, "not one {\"role\": \"assistant\""),
    ({"prompt": [{"role": "user"}], "chosen": "ba", "rejected": "ab"}, "prompt[0] is not a {\"role\": string"),
    ({"prompt": 7, "chosen": "ba", "rejected": "ab"}, "is a int, not a string"),
])
def test_a_bad_pair_is_one_clear_error_or_skipped_and_counted(base, tmp_path, capsys, bad, reason):
    records = preference_records(6)
    records.insert(3, bad)
    path = write_jsonl(tmp_path / "p.jsonl", records)
    capsys.readouterr()
    assert prepare_pairs(base, tmp_path / "d", path) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"p.jsonl:4: " in err and reason in err and "--skip-bad" in err
    assert not (tmp_path / "d").exists()
    assert prepare_pairs(base, tmp_path / "d", path, extra=("--skip-bad",)) == 0
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["bad_records"] == 1 and report["bad"][0]["where"].endswith("p.jsonl:4") and report["pairs"] == 6


def test_a_long_pair_keeps_one_prompt_for_both_or_is_dropped(base, tmp_path):
    long = {"prompt": "abcdefghij" * 2, "chosen": "0123456", "rejected": "01"}
    records = [long] + preference_records(6, seed=5)
    path = write_jsonl(tmp_path / "p.jsonl", records)
    assert prepare_pairs(base, tmp_path / "d", path, extra=("--max-length", "12", "--split", "0.34,0.33,0.33")) == 0
    tok = Tokenizer.load(tmp_path / "d" / "tokenizer.json")
    found = [p for s in ("train", "val", "test") for p in decoded_pairs(tmp_path / "d", s)
             if tok.decode(p[1]) == "0123456"]
    assert len(found) == 1
    cp, cc, rp, rc = found[0]
    assert cp == rp  # the same prompt tokens, cut for the longer completion: 12 = start + "ij\\n" + 7 + end
    assert tok.decode(cp) == "ij\n" and len(cp) + len(cc) == 12 and tok.decode(rc) == "01"
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert sum(s["truncated"] for s in report["splits"].values()) == 1
    assert prepare_pairs(base, tmp_path / "d2", path, extra=("--max-length", "12", "--drop-long",
                                                             "--split", "0.34,0.33,0.33")) == 0
    report = json.loads((tmp_path / "d2" / "report.json").read_text())
    assert sum(s["dropped"] for s in report["splits"].values()) == 1
    assert sum(s["pairs"] for s in report["splits"].values()) == 6


# ------------------------------------------------------------------------------------------- the batches
def numbered_examples(n_pairs: int) -> Examples:
    """Example e is [e, e + 1000] with a one-token prompt: a row's first token names its example."""
    tokens = np.array([[e, e + 1000] for e in range(2 * n_pairs)], dtype=np.int64).reshape(-1)
    return Examples(tokens, np.arange(0, 4 * n_pairs + 1, 2, dtype=np.int64), np.ones(2 * n_pairs, dtype=np.int32))


def test_pair_batches_keep_pairs_together_draw_each_once_and_resume():
    ex = numbered_examples(12)
    streams = [ExampleBatches(ex, 8, 3, seed=4, rank=r, world_size=2, pairs=True) for r in range(2)]
    drawn = []
    for _ in range(2):  # 2 global batches of 2 x 3 pairs: one epoch
        for stream in streams:
            x, y = stream.next_batch()
            rows = x[:, 0].tolist()
            assert len(rows) == 6 and all(rows[k + 1] == rows[k] + 1 and rows[k] % 2 == 0 for k in range(0, 6, 2))
            assert y[:, 0].tolist() == [r + 1000 for r in rows]  # the completion token carries the label
            drawn += rows[0::2]
    assert sorted(drawn) == list(range(0, 24, 2))  # every pair once
    state = streams[0].state_dict()
    expected = streams[0].next_batch()[0]
    again = ExampleBatches(ex, 8, 3, seed=4, rank=0, world_size=2, pairs=True)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch()[0], expected)
    val = [b for r in range(2) for b in fixed_example_batches(ex, 8, 4, 10, rank=r, world_size=2, pairs=True)]
    assert sorted(int(v) for b in val for v in b[0][0::2, 0]) == list(range(0, 24, 2))  # no wrap: each once
    odd = Examples(ex.tokens[:6], ex.offsets[:4], ex.prompt_lengths[:3])
    with pytest.raises(DataError, match="pairs of examples"):
        ExampleBatches(odd, 8, 2, pairs=True)
    with pytest.raises(DataError, match="drop data.packing"):
        ExampleBatches(ex, 8, 2, pairs=True, packing=True)


# -------------------------------------------------------------------------------------------- training
def test_adapters_off_gives_the_base_model_and_refuses_merged_adapters():
    torch.manual_seed(0)
    from lmforge.config import LoRAConfig
    from tiny_training import VOCAB

    model = GPT(tiny_config(Path("unused")).model).eval()
    x = torch.randint(0, VOCAB, (2, 9))
    before = model(x)
    apply_lora(model, LoRAConfig(r=4, targets=["q", "v", "mlp"]))
    for name, p in model.named_parameters():
        if "lora" in name:
            p.data.normal_()  # adapters that change the output
    adapted = model(x)
    assert not torch.allclose(adapted, before, atol=1e-3)
    with adapters_off(model):
        assert torch.allclose(model(x), before, atol=1e-6)
    assert torch.allclose(model(x), adapted)  # back on after the block
    next(m for m in model.modules() if isinstance(m, LoRALinear)).merge()
    with pytest.raises(ValueError, match="unmerged"):
        with adapters_off(model):
            pass
    with pytest.raises(ValueError, match="has none"):
        with adapters_off(merge_lora(model)):
            pass


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_first_step_loss_is_log_2_and_training_leaves_the_reference_alone(base, pairs, tmp_path, lora, dropout):
    extra = {"lora.r": 4, "lora.targets": "q,v,mlp"} if lora else {}
    if dropout:  # a base trained with dropout: preference training turns it off, or the policy is noisy against
        base = make_base(tmp_path / "dropout", **{"model.dropout": dropout})  # its reference from the first step
    trainer = Trainer(dpo(tmp_path / "run", pairs, base, **extra), progress=False, tensorboard=False)
    trainer.fit()
    losses = [loss for _, loss in trainer.history]
    assert losses[0] == pytest.approx(LOG2, abs=1e-6)  # the policy is its reference at step 1
    assert losses[-1] != pytest.approx(LOG2, abs=1e-4)  # and then it is not
    base_model, _, _ = load_for_inference(base)
    reference = trainer.reference if not lora else trainer.raw_model
    with adapters_off(reference) if lora else torch.no_grad():
        for name, p in base_model.state_dict().items():
            assert torch.equal(reference.state_dict()[name], p), name


@pytest.fixture(scope="module")
def trained(base, pairs, tmp_path_factory) -> Trainer:
    """20 steps of full DPO on the capitals pairs (beta 0.1, the default), evaluated at the end: a loss well
    between log 2 and 0."""
    run = tmp_path_factory.mktemp("dpo") / "run"
    trainer = Trainer(dpo(run, pairs, base, **{"train.max_steps": 20, "optim.warmup_steps": 5, "optim.lr": 1e-3,
                                                "train.dpo_beta": 0.1, "train.best_metric": "val_reward_accuracy"}),
                      progress=False, tensorboard=False)
    trainer.fit()
    return trainer


def test_dpo_learns_to_prefer_the_chosen_completion(trained):
    assert 0.1 < trained.val_loss < LOG2 - 0.15
    assert trained.val_metrics["val_reward_accuracy"] >= 0.9
    assert trained.val_metrics["val_reward_margin"] > 0.2
    assert trained.val_metrics["val_chosen_reward"] > trained.val_metrics["val_rejected_reward"]
    evals = [r for r in map(json.loads, (trained.run_dir / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert "val_reward_accuracy" in evals[-1] and "val_perplexity" not in evals[-1]
    state = json.loads((trained.last_checkpoint / "state.json").read_text())
    assert state["task"]["task"] == "preference" and state["score"]["metric"] == "val_reward_accuracy"


def by_hand_val_loss(policy: GPT, reference: GPT, data: Path, beta: float, n_pairs: int
                     ) -> tuple[float, list[list[float]]]:
    """(DPO's mean loss over the first n_pairs val pairs, [policy chosen, policy rejected, reference chosen,
    reference rejected] log-probabilities of each pair), each completion run alone (no padding), in float64."""
    ex = load_examples(data, "val")
    losses, every = [], []
    for i in range(n_pairs):
        logps = []
        for model in (policy, reference):
            for e in (2 * i, 2 * i + 1):
                ids = torch.tensor(ex.tokens[ex.offsets[e]:ex.offsets[e + 1]].tolist())
                p = int(ex.prompt_lengths[e])
                with torch.no_grad():
                    logp = torch.log_softmax(model(ids[None, :-1])[0].double(), dim=-1)  # (L-1, V)
                logps.append(sum(float(logp[t - 1, ids[t]]) for t in range(p, len(ids))))
        pc, pr, rc, rr = logps
        margin = beta * ((pc - rc) - (pr - rr))
        losses.append(math.log1p(math.exp(-margin)))
        every.append(logps)
    return sum(losses) / len(losses), every


def test_the_trainers_val_loss_and_lmforge_eval_are_dpo_by_hand(trained, base, pairs, capsys):
    policy, _, config = load_for_inference(trained.last_checkpoint)
    reference, _, _ = load_for_inference(base)
    n = len(load_examples(pairs, "val")) // 2  # 4 val batches of 8 pairs hold all 30
    assert n <= 4 * 8
    expected, logps = by_hand_val_loss(policy, reference, pairs, config.train.dpo_beta, n)
    assert trained.val_loss == pytest.approx(expected, abs=1e-5)
    capsys.readouterr()
    assert main(["eval", str(trained.run_dir), "--split", "val", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(expected, abs=1e-5) and result["pairs"] == n
    assert result["reward_accuracy"] == pytest.approx(trained.val_metrics["val_reward_accuracy"])
    assert result["logp_accuracy"] == pytest.approx(sum(pc > pr for pc, pr, _, _ in logps) / n)
    assert result["reference_logp_accuracy"] == pytest.approx(sum(rc > rr for _, _, rc, rr in logps) / n)
    assert result["logp_accuracy"] > result["reference_logp_accuracy"]
    rows = [json.loads(line) for line in Path(result["predictions"]).read_text().splitlines()]
    assert len(rows) == n and all(r["chosen"] == r["prompt"].strip().upper() for r in rows)
    got = [value for r in rows for value in (r["chosen_logp"], r["rejected_logp"])]
    assert got == pytest.approx([value for pc, pr, _, _ in logps for value in (pc, pr)], abs=1e-4)
    assert sum(r["correct"] for r in rows) / n == pytest.approx(result["reward_accuracy"])


def test_before_any_step_the_val_loss_is_log_2_and_no_pair_is_won(base, pairs, tmp_path):
    trainer = Trainer(dpo(tmp_path / "run", pairs, base), progress=False, tensorboard=False)
    assert trainer.evaluate() == pytest.approx(LOG2, abs=1e-6)
    assert trainer.val_metrics == {"val_reward_accuracy": 0.0, "val_reward_margin": 0.0, "val_chosen_reward": 0.0,
                                   "val_rejected_reward": 0.0}  # a tie is not a win


def test_a_split_holding_half_a_pair_is_refused(pairs, tmp_path):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(pairs, tmp_path / "d")
    arrays = load_file(tmp_path / "d" / "val.safetensors")
    keep = int(arrays["offsets"][-2])  # drop the last example: the last pair loses its rejected one
    save_file({"tokens": arrays["tokens"][:keep], "offsets": arrays["offsets"][:-1],
               "prompt_lengths": arrays["prompt_lengths"][:-1]}, tmp_path / "d" / "val.safetensors")
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    manifest["splits"]["val"]["examples"] -= 1
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="does not hold the 59 examples"):
        load_examples(tmp_path / "d", "val")


def test_the_val_loss_and_rewards_equal_trls_dpo_trainer_on_the_same_weights(trained, base, pairs, tmp_path):
    """TRL's DPOTrainer (sigmoid loss) on the Hugging Face exports of the trained model and its reference, fed
    every val pair as token ids through TRL's own collator: the same mean loss and mean rewards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from datasets import Dataset

    assert main(["export", str(trained.run_dir), "--format", "hf", "--out", str(tmp_path / "policy")]) == 0
    assert main(["export", str(base), "--format", "hf", "--out", str(tmp_path / "reference")]) == 0
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "reference")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "policy")
    rows = trl_rows(load_examples(pairs, "val"))
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=trained.config.train.dpo_beta, loss_type=["sigmoid"],
                     report_to=[], use_cpu=True, max_length=None)
    trl = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                     train_dataset=Dataset.from_list([{"prompt": "ab\n", "chosen": "AB", "rejected": "ab"}]))
    trl.model.eval()
    with torch.no_grad():
        loss = trl._compute_loss(trl.model, DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(rows), False)
    metrics = {k: v[-1] for k, v in trl._metrics["eval"].items()}
    assert float(loss) == pytest.approx(trained.val_loss, abs=2e-5)
    assert metrics["rewards/chosen"] == pytest.approx(trained.val_metrics["val_chosen_reward"], abs=1e-4)
    assert metrics["rewards/rejected"] == pytest.approx(trained.val_metrics["val_rejected_reward"], abs=1e-4)
    assert metrics["rewards/accuracies"] == trained.val_metrics["val_reward_accuracy"]


def test_a_dpo_model_generates_with_the_template_it_learned(trained):
    from lmforge.generate import load

    generator = load(str(trained.run_dir))
    assert generator.template is not None and generator.template["prompt"] == "{prompt}\n"


def test_splitting_the_batch_into_micro_batches_gives_the_same_losses(base, pairs, tmp_path):
    whole = Trainer(dpo(tmp_path / "a", pairs, base, **{"train.max_steps": 3}), progress=False, tensorboard=False)
    whole.fit()
    split = Trainer(dpo(tmp_path / "b", pairs, base, **{"train.max_steps": 3, "train.batch_size": 4,
                                                         "train.grad_accum": 2}), progress=False, tensorboard=False)
    split.fit()
    assert [loss for _, loss in split.history] == pytest.approx([loss for _, loss in whole.history], abs=1e-6)


def full_and_resumed(tmp_path: Path, pairs: Path, base: Path, **extra: object) -> tuple[Trainer, Trainer]:
    """A 6-step run that saves and evaluates at step 3, and another resumed from that one checkpoint alone."""
    extra = {"train.max_steps": 6, "train.save_interval": 3, "train.eval_interval": 3, **extra}
    full = Trainer(dpo(tmp_path / "full", pairs, base, **extra), progress=False, tensorboard=False)
    full.fit()
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000003",
                    tmp_path / "resumed" / "checkpoints" / "step-00000003")
    resumed = Trainer(dpo(tmp_path / "resumed", pairs, base, **{**extra, "train.resume": "auto"}),
                      progress=False, tensorboard=False)
    resumed.fit()
    return full, resumed


@pytest.mark.parametrize("lora", [False, True])
def test_a_resumed_dpo_run_is_bit_identical(base, pairs, tmp_path, lora):
    lora_settings = {"lora.r": 4, "lora.targets": "q,v,mlp"} if lora else {}
    full, resumed = full_and_resumed(tmp_path, pairs, base, **lora_settings)
    assert [step for step, _ in resumed.history] == [4, 5, 6]
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 3]
    assert resumed.val_loss == full.val_loss and resumed.val_metrics == full.val_metrics
    assert step_losses(tmp_path / "resumed")[6] == step_losses(tmp_path / "full")[6]


def test_preference_settings_that_cannot_work_are_refused(base, pairs, tmp_path):
    with pytest.raises(ConfigError, match="set train.init_from"):
        Trainer(dpo(tmp_path / "a", pairs, base, **{"train.init_from": "none"}), progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match="drop train.early_exit_layer"):
        Trainer(dpo(tmp_path / "b", pairs, base, **{"train.early_exit_layer": 1}), progress=False, tensorboard=False)
    with pytest.raises(DataError, match="drop data.packing"):
        Trainer(dpo(tmp_path / "c", pairs, base, **{"data.packing": True}), progress=False, tensorboard=False)
    sft = tmp_path / "sft"
    assert main(["prepare", str(write_jsonl(tmp_path / "r.jsonl", reverse_records(30))), "--task", "sft",
                 "--tokenizer", str(base), "--out", str(sft)]) == 0
    with pytest.raises(ConfigError, match="is not preference data"):
        Trainer(dpo(tmp_path / "d", sft, base), progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match="measured on preference data"):
        Trainer(dpo(tmp_path / "e", sft, base, **{"train.dpo_beta": 0.1, "train.best_metric": "val_reward_margin"}),
                progress=False, tensorboard=False)
    assert not any((tmp_path / name).exists() for name in "abcde")


@pytest.mark.distributed
@pytest.mark.parametrize("lora", [False, True])
def test_two_processes_train_dpo_like_one(base, pairs, tmp_path, lora):
    """DDP: 2 processes x 4 pairs give the losses, val loss and rewards of 1 process x 8 pairs (full fine-tuning with
    its frozen copy, and LoRA with the adapters-off reference on each process)."""
    from distributed_jobs import one_and_two

    settings = {"data.path": str(pairs), "train.init_from": str(base), "train.dpo_beta": 1.0,
                **({"lora.r": 4, "lora.targets": "q,v,mlp", "optim.lr": 1e-2} if lora else {})}
    one, two = one_and_two(tmp_path, settings)
    assert one["history"][0][1] == pytest.approx(LOG2, abs=1e-6)
    assert [loss for _, loss in two["history"]] == pytest.approx([loss for _, loss in one["history"]], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5) and one["val_loss"] != pytest.approx(LOG2)


@pytest.mark.distributed
@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_fsdp_trains_preference_pairs_like_one_process_with_the_reference_sharded(base, pairs, tmp_path, loss):
    """FSDP (train.parallel fsdp): 2 processes x 4 pairs give the losses and val loss of 1 process x 8 pairs, and each
    process holds half of the frozen DPO reference as of the policy (ORPO keeps none)."""
    from distributed_jobs import one_and_two

    settings = {"data.path": str(pairs), "train.init_from": str(base), "train.dpo_beta": 1.0,
                "train.preference_loss": loss}
    one, two = one_and_two(tmp_path, settings, {"train.parallel": "fsdp"})
    assert two["sharded"]
    assert [loss for _, loss in two["history"]] == pytest.approx([loss for _, loss in one["history"]], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    assert two["held"] < 0.6
    if loss == "dpo":
        assert one["reference_held"] == 1.0 and two["reference_held"] == pytest.approx(two["held"])
    else:
        assert one["reference_held"] is None and two["reference_held"] is None
