"""Reward models (train.objective reward): a one-output classify head trained on preference pairs with the
Bradley-Terry loss, in the one training loop; `lmforge eval`, `lmforge reward`, best-of-n generation, the Python
RewardModel and the Hugging Face export.

The loss is checked by hand in float64, the trainer's and eval's rewards against each example scored alone from the
checkpoint (no padding), and the loss against TRL's RewardTrainer on the Hugging Face export of the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_for_inference
from lmforge.cli import main
from lmforge.data.batches import Examples, ExampleBatches, fit_context, pad_rows, reward_pair_batch
from lmforge.data.tasks import load_examples
from lmforge.errors import ConfigError, DataError
from lmforge.generate import RewardModel, load
from lmforge.preference_loss import reward_model_loss
from lmforge.train import Trainer
from test_plan import built  # noqa: F401 (a fixture)
from test_preference import base, dpo, pairs, prepared, preference_records  # noqa: F401 (fixtures)
from test_tasks import make_base, reverse_records, write_jsonl
from tiny_training import step_losses

LOG2 = math.log(2.0)


def reward_config(run_dir: Path, data: Path, base: Path, **overrides: object):
    """A reward model started from `base` on preference `data` (6 steps of 8 pairs by default)."""
    return dpo(run_dir, data, base, **{"train.objective": "reward", "train.dpo_beta": 0.1, **overrides})


@pytest.fixture(scope="module")
def reward_run(base, pairs, tmp_path_factory) -> Trainer:
    """30 steps of a reward model on the capitals pairs (centred, c = 0.01), evaluated every 10 steps."""
    run = tmp_path_factory.mktemp("reward") / "run"
    trainer = Trainer(reward_config(run, pairs, base, **{"train.max_steps": 30, "optim.lr": 1e-3,
                                                         "train.eval_interval": 10,
                                                         "train.reward_center_coefficient": 0.01,
                                                         "train.best_metric": "val_reward_accuracy"}),
                      progress=False, tensorboard=False)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("center", [0.0, 0.05])
def test_the_loss_is_bradley_terry_by_hand_with_its_gradient(center):
    chosen = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.1, 0.4, -3.0, 0.0], dtype=torch.float64, requires_grad=True)
    loss = reward_model_loss(chosen, rejected, center)
    for i in range(4):
        c, r = float(chosen[i].detach()), float(rejected[i].detach())
        expected = -math.log(1.0 / (1.0 + math.exp(-(c - r)))) + center * (c + r) ** 2
        assert float(loss[i].detach()) == pytest.approx(expected, abs=1e-6)
    loss.sum().backward()
    for i in range(4):
        c, r = float(chosen[i].detach()), float(rejected[i].detach())
        s = 1.0 / (1.0 + math.exp(-(c - r)))
        assert float(chosen.grad[i]) == pytest.approx(-(1 - s) + 2 * center * (c + r), abs=1e-5)
        assert float(rejected.grad[i]) == pytest.approx((1 - s) + 2 * center * (c + r), abs=1e-5)
    assert float(reward_model_loss(torch.zeros(1), torch.zeros(1))) == pytest.approx(LOG2)


def test_whole_pair_rows_keep_the_start_token_and_lose_the_earliest_prompt_tokens():
    ids = np.array([1, 10, 11, 12, 20, 21, 2])  # start, prompt 10-12, completion 20-21, end
    assert fit_context(ids, 7, 1).tolist() == ids.tolist()
    assert fit_context(ids, 5, 1).tolist() == [1, 12, 20, 21, 2]
    assert fit_context(ids, 5, 0).tolist() == [11, 12, 20, 21, 2]
    tokens = np.array([1, 5, 6, 2, 1, 5, 7, 8, 2, 1, 9, 6, 2, 1, 9, 7, 7, 2])  # two pairs
    examples = Examples(tokens, np.array([0, 4, 9, 13, 18]), np.array([2, 2, 2, 2]))
    x, mask = reward_pair_batch(examples, np.array([1, 0]), pad_id=3, max_tokens=4, keep=1)
    assert x.tolist() == [[1, 9, 6, 2], [1, 7, 7, 2], [1, 5, 6, 2], [1, 7, 8, 2]]  # pair 1, then pair 0
    assert mask.all()
    x, mask = pad_rows([np.array([4, 5]), np.array([6])], pad_id=0, side="left")
    assert x.tolist() == [[4, 5], [0, 6]] and mask.tolist() == [[True, True], [False, True]]
    stream = ExampleBatches(examples, 4, 2, shuffle=False, pairs=True, whole=1, pad_id=3)
    x, mask = stream.next_batch()
    assert x.shape == (4, 4) and x[0].tolist() == [1, 5, 6, 2] and x[1].tolist() == [1, 7, 8, 2]
    with pytest.raises(DataError, match="preference pairs"):
        ExampleBatches(examples, 4, 2, whole=1)


def scored_alone(run: Path, examples: Examples, n_pairs: int, model: torch.nn.Module | None = None) -> torch.Tensor:
    """(n_pairs, 2) rewards of the first n_pairs pairs' chosen and rejected examples, each run alone through the
    checkpoint's model (or `model`) with no padding and no mask (the last token is the end token)."""
    loaded, tokenizer, config = load_for_inference(run)
    model = (model if model is not None else loaded).eval()
    block = config.model.block_size
    out = torch.zeros(n_pairs, 2)
    with torch.no_grad():
        for e in range(2 * n_pairs):
            ids = np.asarray(examples.tokens[examples.offsets[e]:examples.offsets[e + 1]])
            if len(ids) > block:  # the start token kept, the earliest prompt tokens dropped
                ids = np.concatenate([ids[:1], ids[len(ids) - block + 1:]])
            assert ids[0] == tokenizer.start_id and ids[-1] == tokenizer.end_id
            out[e // 2, e % 2] = model(torch.as_tensor(ids, dtype=torch.long)[None])[0, 0]
    return out


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_first_step_and_the_val_loss_are_the_loss_by_hand_with_the_centring_term(base, pairs, tmp_path, capsys,
                                                                                      dropout):
    """A fresh head (rewards far from centred): the val loss before training and the first step's loss (the first 8
    train pairs, in order) are the Bradley-Terry loss plus c (r_w + r_l)^2 of each pair scored alone; a base trained
    with dropout trains without it (as TRL's RewardTrainer), or the two rewards of a pair would be noisy."""
    import copy

    if dropout:
        base = make_base(tmp_path / "dropout", **{"model.dropout": dropout})
    trainer = Trainer(reward_config(tmp_path / "run", pairs, base, **{
        "train.reward_center_coefficient": 1.0, "data.sampling": "sequential", "train.max_steps": 1,
        "train.eval_interval": 0}), progress=False, tensorboard=False)
    start = copy.deepcopy(trainer.raw_model)
    val, train = load_examples(pairs, "val"), load_examples(pairs, "train")
    alone = scored_alone(base, val, len(val) // 2, start)
    centred, plain = (float(reward_model_loss(alone[:, 0].double(), alone[:, 1].double(), c).mean()) for c in (1, 0))
    assert centred - plain > 1e-2  # the term matters here
    assert trainer.evaluate() == pytest.approx(centred, abs=1e-5)
    trainer.fit()
    first = scored_alone(base, train, 8, start)
    assert trainer.history[0][1] == pytest.approx(float(reward_model_loss(first[:, 0], first[:, 1], 1.0).mean()),
                                                  abs=1e-5)
    capsys.readouterr()  # `lmforge eval` takes the run's centring term too
    assert main(["eval", str(tmp_path / "run"), "--split", "val", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(trainer.val_loss, abs=1e-5)


def test_a_reward_model_learns_the_preference_and_eval_agrees_with_each_pair_alone(reward_run, pairs, capsys):
    """The trainer's val loss and rewards (padded batches) equal the Bradley-Terry loss of each val pair scored
    alone, and `lmforge eval` gives the same numbers and a row per pair."""
    assert reward_run.val_metrics["val_reward_accuracy"] >= 0.9 and reward_run.val_loss < 0.3
    assert reward_run.val_metrics["val_reward_margin"] > 1.0
    state = json.loads((reward_run.last_checkpoint / "state.json").read_text())
    assert state["task"]["task"] == "reward" and state["task"]["template"]["name"] == "plain"
    evals = [r for r in map(json.loads, (reward_run.run_dir / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30] and "val_perplexity" not in evals[-1]
    examples = load_examples(pairs, "val")
    n = len(examples) // 2
    assert reward_run.config.train.eval_batches * reward_run.config.train.batch_size >= n  # every val pair
    alone = scored_alone(reward_run.run_dir, examples, n)
    by_hand = reward_model_loss(alone[:, 0].double(), alone[:, 1].double(), 0.01).mean()
    assert reward_run.val_loss == pytest.approx(float(by_hand), abs=1e-5)
    assert reward_run.val_metrics["val_chosen_reward"] == pytest.approx(float(alone[:, 0].mean()), abs=1e-5)
    assert reward_run.val_metrics["val_rejected_reward"] == pytest.approx(float(alone[:, 1].mean()), abs=1e-5)
    capsys.readouterr()
    assert main(["eval", str(reward_run.run_dir), "--split", "val"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(reward_run.val_loss, abs=1e-5) and result["pairs"] == n
    assert result["reward_accuracy"] == reward_run.val_metrics["val_reward_accuracy"]
    rows = [json.loads(line) for line in Path(result["predictions"]).read_text().splitlines()]
    assert len(rows) == n and [r["chosen_reward"] for r in rows] == pytest.approx(alone[:, 0].tolist(), abs=1e-5)
    assert all(r["correct"] == (r["chosen_reward"] > r["rejected_reward"]) for r in rows)
    assert rows[0]["prompt"].endswith("\n") and rows[0]["chosen"] == rows[0]["chosen"].upper()


def test_the_python_reward_model_scores_text_as_training_read_it(reward_run, tmp_path):
    """lmforge.load gives a RewardModel; a prompt through the learned template (or already rendered, template off)
    and a completion get the reward eval gave that pair; best_of ranks by it."""
    judge = load(str(reward_run.run_dir))
    assert isinstance(judge, RewardModel)
    assert main(["eval", str(reward_run.run_dir), "--split", "test", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()][:6]
    raw = load(str(reward_run.run_dir), template=False)
    got = raw.score([r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows],
                    batch_size=4)
    assert got == pytest.approx([r["chosen_reward"] for r in rows] + [r["rejected_reward"] for r in rows], abs=1e-5)
    word = rows[0]["prompt"].rstrip("\n")
    assert judge.score([word], [rows[0]["chosen"]]) == pytest.approx([rows[0]["chosen_reward"]], abs=1e-5)
    ranked = judge.best_of(word, [word, word.upper()])
    assert [text for text, _ in ranked] == [word.upper(), word] and ranked[0][1] > ranked[1][1]
    assert judge.score([], []) == []
    with pytest.raises(ConfigError, match="one prompt per completion"):
        judge.score([word], ["a", "b"])


def test_the_hf_export_scores_as_lmforge_and_trls_reward_trainer_takes_the_same_loss(reward_run, pairs, tmp_path):
    """`lmforge export --format hf` writes a GPT2ForSequenceClassification with one label: transformers gives each
    whole example the same reward, and TRL's RewardTrainer.compute_loss on the val pairs as token ids (its own
    collator, padding with the pad token) gives lmforge's val loss, the centring term included."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    assert main(["export", str(reward_run.run_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.config.num_labels == 1 and tokenizer.pad_token_id is not None
    examples = load_examples(pairs, "val")
    n = len(examples) // 2
    block, keep = reward_run.config.model.block_size, int(tokenizer.bos_token_id is not None)
    whole = [fit_context(np.asarray(examples.tokens[examples.offsets[e]:examples.offsets[e + 1]]), block, 1).tolist()
             for e in range(2 * n)]
    assert keep == 1
    rows = [{"chosen_ids": whole[2 * i], "rejected_ids": whole[2 * i + 1]} for i in range(n)]
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=None,
                        center_rewards_coefficient=0.01)
    trl = RewardTrainer(model=hf, args=args, processing_class=tokenizer,
                        train_dataset=Dataset.from_list([{"chosen": "AB", "rejected": "ab"}]))
    trl.model.eval()
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        loss, outputs = trl.compute_loss(trl.model, dict(batch), return_outputs=True)
    assert float(loss) == pytest.approx(reward_run.val_loss, abs=2e-5)
    alone = scored_alone(reward_run.run_dir, examples, n)
    hf_rewards = outputs.logits.squeeze(-1).view(2, n).T  # TRL's batch: every chosen row, then every rejected one
    assert hf_rewards.reshape(-1).tolist() == pytest.approx(alone.reshape(-1).tolist(), abs=1e-4)


def test_a_resumed_reward_run_is_bit_identical(base, pairs, tmp_path):
    from test_preference import full_and_resumed

    full, resumed = full_and_resumed(tmp_path, pairs, base, **{"train.objective": "reward", "train.dpo_beta": 0.1})
    assert [step for step, _ in resumed.history] == [4, 5, 6]
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 3]
    assert resumed.val_loss == full.val_loss and resumed.val_metrics == full.val_metrics
    assert step_losses(tmp_path / "resumed")[6] == step_losses(tmp_path / "full")[6]


def test_a_lora_reward_model_trains_its_head_and_adapters_only(base, pairs, tmp_path):
    trainer = Trainer(reward_config(tmp_path / "run", pairs, base, **{"lora.r": 4, "lora.targets": "q,v",
                                                                       "train.max_steps": 20, "optim.lr": 1e-2,
                                                                       "train.eval_interval": 20}),
                      progress=False, tensorboard=False)
    trainable = {name for name, p in trainer.raw_model.named_parameters() if p.requires_grad}
    assert "classifier.weight" in trainable and all("lora" in n or n == "classifier.weight" for n in trainable)
    trainer.fit()
    assert trainer.val_metrics["val_reward_accuracy"] >= 0.8
    judge = load(str(tmp_path / "run"))
    assert isinstance(judge, RewardModel) and judge.score(["abc"], ["ABC"])[0] > judge.score(["abc"], ["abc"])[0]


def test_splitting_the_batch_into_micro_batches_gives_the_same_losses(base, pairs, tmp_path):
    whole = Trainer(reward_config(tmp_path / "a", pairs, base, **{"train.max_steps": 3}),
                    progress=False, tensorboard=False)
    whole.fit()
    split = Trainer(reward_config(tmp_path / "b", pairs, base, **{"train.max_steps": 3, "train.batch_size": 4,
                                                                   "train.grad_accum": 2}),
                    progress=False, tensorboard=False)
    split.fit()
    assert [loss for _, loss in split.history] == pytest.approx([loss for _, loss in whole.history], abs=1e-6)


@pytest.mark.distributed
def test_two_processes_train_a_reward_model_like_one(base, pairs, tmp_path):
    from distributed_jobs import one_and_two

    settings = {"data.path": str(pairs), "train.init_from": str(base), "train.objective": "reward"}
    one, two = one_and_two(tmp_path, settings)
    assert [loss for _, loss in two["history"]] == pytest.approx([loss for _, loss in one["history"]], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    assert one["history"][0][1] != pytest.approx(one["history"][-1][1], abs=1e-3)


def test_settings_a_reward_model_cannot_use_are_refused(base, pairs, tmp_path):
    sft = tmp_path / "sft"
    assert main(["prepare", str(write_jsonl(tmp_path / "r.jsonl", reverse_records(30))), "--task", "sft",
                 "--tokenizer", str(base), "--out", str(sft)]) == 0
    cases = [(sft, {}, "is sft task data: prepare pairs"),
             (pairs, {"train.dpo_beta": 0.5}, "trains a reward model .* drop them"),
             (pairs, {"train.preference_loss": "simpo"}, "trains a reward model .* drop them"),
             (pairs, {"train.precompute_reference": True}, "trains a reward model .* drop them"),
             (pairs, {"train.early_exit_layer": 1}, "a reward model predicts no tokens"),
             (pairs, {"data.packing": True}, "drop data.packing")]
    for i, (data, extra, message) in enumerate(cases):
        with pytest.raises((ConfigError, DataError), match=message):
            Trainer(reward_config(tmp_path / f"r{i}", data, base, **extra), progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match="set train.objective reward"):
        Trainer(dpo(tmp_path / "c", pairs, base, **{"train.reward_center_coefficient": 0.01}),
                progress=False, tensorboard=False)
    assert not any((tmp_path / name).exists() for name in [f"r{i}" for i in range(len(cases))] + ["c"])


def test_the_cli_scores_ranks_and_picks_the_best_of_n(reward_run, base, tmp_path, capsys):
    run = str(reward_run.run_dir)
    capsys.readouterr()
    assert main(["reward", run, "--prompt", "cab", "--completion", "cab", "--completion", "CAB", "--rank"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["completion"] for r in lines] == ["CAB", "cab"] and lines[0]["reward"] > lines[1]["reward"]
    judge = load(run)
    assert [r["reward"] for r in lines] == pytest.approx(judge.score(["cab", "cab"], ["CAB", "cab"]), abs=1e-6)
    records = write_jsonl(tmp_path / "answers.jsonl", [{"q": "fa", "completion": "fa"},
                                                       {"q": "fa", "completion": "FA"}])
    assert main(["reward", run, "--file", str(records), "--prompt-field", "q"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["completion"] for r in lines] == ["fa", "FA"] and lines[1]["reward"] > lines[0]["reward"]
    assert main(["generate", str(base), "--prompt", "ab", "--num-return-sequences", "4", "--max-new-tokens", "4",
                 "--seed", "3", "--reward-model", run]) == 0
    out = capsys.readouterr().out.splitlines()
    heads = [line for line in out if line.startswith("--- sample")]
    rewards = [float(h.split("reward ")[1].split()[0]) for h in heads]
    assert len(heads) == 4 and rewards == sorted(rewards, reverse=True) and "(best)" in heads[0]
    samples = load(str(base)).generate("ab", num_return_sequences=4, max_new_tokens=4, seed=3)  # the same four
    assert sorted(judge.score(["ab"] * 4, samples), reverse=True) == pytest.approx(rewards, abs=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["reward", "{run}", "--completion", "x"], "needs the --prompt"),
    (["reward", "{run}"], "nothing to score"),
    (["reward", "{base}", "--prompt", "a", "--completion", "b"], "is not a reward model"),
    (["reward", "{run}", "--file", "{txt}"], "give a .jsonl file"),
    (["classify", "{run}", "--text", "a"], "use `lmforge reward`"),
    (["generate", "{run}", "--prompt", "a"], "use `lmforge reward`"),
    (["generate", "{base}", "--prompt", "a", "--reward-model", "{base}"], "is not a reward model"),
])
def test_a_reward_model_misused_is_one_clear_line(reward_run, base, tmp_path, capsys, argv, message):
    txt = tmp_path / "a.txt"
    txt.write_text("a\n")
    values = {"run": str(reward_run.run_dir), "base": str(base), "txt": str(txt)}
    assert main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_eval_of_a_reward_model_on_other_data_is_refused(reward_run, base, tmp_path, capsys):
    sft = tmp_path / "sft"
    assert main(["prepare", str(write_jsonl(tmp_path / "r.jsonl", reverse_records(30))), "--task", "sft",
                 "--tokenizer", str(base), "--out", str(sft)]) == 0
    capsys.readouterr()
    assert main(["eval", str(reward_run.run_dir), "--data", str(sft), "--split", "val"]) == 2
    assert "is a reward model, measured on preference pairs" in capsys.readouterr().err


def test_the_plan_of_a_reward_model_counts_a_one_output_head_and_no_reference(built):
    """`lmforge plan --task preference --train.objective reward`: 2 sequences a pair, no frozen copy and no reference
    forward, the FLOPs of a model without the LM head (6 C (V - 1) a token less than the language model's), the head's
    activations two C-vectors a token (no logits); --measure trains it on random whole pairs. On other data: refused."""
    from test_plan import B, C, T, V, config

    from lmforge.model import flops_per_token
    from lmforge.plan import activation_elements, measure, plan

    settings = {"train.objective": "reward"}
    p = plan(config(**settings), device="h100", task="preference")
    lm = plan(config(), device="h100", task="preference")
    assert p.tokens_per_step == lm.tokens_per_step == 2 * B * T
    assert p.reference == 0 and not p.reference_forward and p.step_flops_per_token == p.flops_per_token
    assert p.flops_per_token == lm.flops_per_token - 6 * V * C + 6 * C  # the LM head out, a C x 1 head in
    classify = dataclasses.replace(config().model, head="classify", num_labels=1)
    assert p.flops_per_token == flops_per_token(classify, T)
    block, head = activation_elements(classify, T)
    assert head == 2 * C and p.activations == (classify.n_layer + 1) * 2 * B * T * block * 4.0 + 2 * B * T * head * 4.0
    with pytest.raises(ConfigError, match="plan it with --task preference"):
        plan(config(**settings), device="h100", task="sft")
    measured = measure(config(**settings, **{"train.num_threads": 1}), steps=1, task="preference")
    assert measured["peak_rss"] > measured["runtime_rss"] > 0
    trainer = built[-1]
    assert trainer.reward and trainer.reference is None and trainer.config.model.num_labels == 1
    assert trainer.step == 2 and trainer.tokens_seen == 2 * (2 * B * T)  # whole rows: block_size tokens each


def test_a_reward_model_continues_as_one_and_is_no_start_for_a_language_model(reward_run, pairs, base, tmp_path):
    """init_from a reward model: another reward run takes its head and body (and starts where it ended); DPO or sft
    from it is refused with one line (it has no LM head), and nothing is written."""
    sft = tmp_path / "sft"
    assert main(["prepare", str(write_jsonl(tmp_path / "r.jsonl", reverse_records(30))), "--task", "sft",
                 "--tokenizer", str(base), "--out", str(sft)]) == 0
    for name, data, kind in (("dpo", pairs, "preference"), ("sft", sft, "sft")):
        with pytest.raises(ConfigError, match=f"no language-model head to train on {kind} data"):
            Trainer(dpo(tmp_path / f"run-{name}", data, reward_run.run_dir, **{"train.dpo_beta": 0.1}),
                    progress=False, tensorboard=False)
        assert not (tmp_path / f"run-{name}").exists()
    more = Trainer(reward_config(tmp_path / "more", pairs, reward_run.run_dir, **{"train.max_steps": 1}),
                   progress=False, tensorboard=False)
    assert more.evaluate() == pytest.approx(reward_run.val_loss, abs=1e-5)  # the same weights, head included


def test_best_of_n_writes_ranked_samples_that_prepare_reads_as_pairs(reward_run, base, tmp_path, capsys):
    """`lmforge best-of-n`: for each prompt the policy's N samples (the ones generate gives with the same seed, in any
    batch size), each scored as RewardModel.score scores it, best first; chosen the best, rejected the worst,
    completion the best; `lmforge prepare --task preference` and `--task sft` read the file as it is."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("cab\n\nfed\nab\n", encoding="utf-8")
    common = ["best-of-n", str(base), "--reward-model", str(reward_run.run_dir), "--prompts", str(prompts),
              "--num-return-sequences", "4", "--max-new-tokens", "4", "--seed", "3", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a.jsonl"), "--batch-size", "2"]) == 0
    assert "3 prompt(s) ranked" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == ["cab", "fed", "ab"]
    judge, policy = load(str(reward_run.run_dir)), load(str(base))
    empty = 0
    for r in records:
        texts = [s["text"] for s in r["samples"]]
        rewards = [s["reward"] for s in r["samples"]]
        assert sorted(texts) == sorted(policy.generate(r["prompt"], num_return_sequences=4, max_new_tokens=4, seed=3))
        assert rewards == sorted(rewards, reverse=True)
        assert rewards == pytest.approx(judge.score([r["prompt"]] * 4, texts), abs=1e-5)
        usable = [(t, w) for t, w in zip(texts, rewards) if t.strip()]  # the best and worst non-empty samples
        assert (r["chosen"], r["rejected"], r["completion"]) == (usable[0][0], usable[-1][0], usable[0][0])
        assert (r["chosen_reward"], r["rejected_reward"]) == (usable[0][1], usable[-1][1])
        empty += len(texts) - len(usable)
    assert main([*common, "--out", str(tmp_path / "b.jsonl"), "--batch-size", "8"]) == 0
    assert empty > 0  # this policy ends some samples at once: they are ranked, but make no pair
    again = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [[s["text"] for s in r["samples"]] for r in again] == [[s["text"] for s in r["samples"]] for r in records]
    assert [r["chosen_reward"] for r in again] == pytest.approx([r["chosen_reward"] for r in records], abs=1e-5)
    for task in ("preference", "sft"):
        assert main(["prepare", str(tmp_path / "a.jsonl"), "--task", task, "--tokenizer", str(base), "--out",
                     str(tmp_path / f"data-{task}"), "--split", "0.34,0.33,0.33"]) == 0
    report = json.loads((tmp_path / "data-preference" / "report.json").read_text())
    assert sum(split["pairs"] for split in report["splits"].values()) == 3


def test_best_of_n_leaves_out_prompts_without_a_pair_and_refuses_misuse(reward_run, base, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("cab\nfed\n", encoding="utf-8")
    common = ["best-of-n", str(base), "--reward-model", str(reward_run.run_dir), "--prompts", str(prompts),
              "--max-new-tokens", "3", "--no-progress"]
    out = tmp_path / "greedy.jsonl"
    assert main([*common, "--num-return-sequences", "2", "--greedy", "--out", str(out)]) == 0  # the same sample
    assert out.read_text() == "" and "2 prompt(s) left out: fewer than two" in capsys.readouterr().err
    assert main([*common, "--num-return-sequences", "2", "--greedy", "--out", str(out), "--force"]) == 0
    capsys.readouterr()  # an empty output of its own is replaced
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"prompt": "keep me"}\n', encoding="utf-8")
    cases = [([*common, "--out", str(tmp_path / "x.jsonl")], "give --num-return-sequences N (2 or more)"),
             ([*common, "--num-return-sequences", "2", "--out", str(mine), "--force"], "is not a file `lmforge "),
             ([*common, "--num-return-sequences", "2", "--out", str(tmp_path / "x.txt")], "ending in .jsonl"),
             ([*common[:5], str(latin), *common[6:], "--num-return-sequences", "2", "--out", str(tmp_path / "x.jsonl")],
              f"--prompts {latin} cannot be read (UnicodeDecodeError)"),
             (["best-of-n", str(reward_run.run_dir), "--reward-model", str(reward_run.run_dir), "--prompts",
               str(prompts), "--num-return-sequences", "2", "--out", str(tmp_path / "y.jsonl")], "does not generate"),
             (["best-of-n", str(base), "--reward-model", str(base), "--prompts", str(prompts),
               "--num-return-sequences", "2", "--out", str(tmp_path / "z.jsonl")], "is not a reward model")]
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert mine.read_text() == '{"prompt": "keep me"}\n'
    assert not any((tmp_path / name).exists() for name in ("x.jsonl", "x.txt", "y.jsonl", "z.jsonl"))
