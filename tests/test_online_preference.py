"""Online preference training (train.online_reward_model): at every step the policy samples two completions of each
prompt, a reward model ranks them, and DPO trains on those pairs.

The setting is built so that there is something to learn: pairs whose chosen completion is all capital A's and whose
rejected one is lower-case letters train a reward model; a policy fine-tuned on both kinds of completion (half each)
samples either; online DPO must then make it write A's more often and raise the reward of what it writes. The pairs
are checked against the policy's own samples (the same seed) and the reward model's scores; resume is bit-identical
and 2 processes sample and train as 1.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.config import ModelConfig, RunConfig
from lmforge.data.batches import IGNORE_INDEX
from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, generate_batch_ids
from lmforge.model import GPT
from lmforge.tokenizer import train_char
from lmforge.train import Trainer
from test_preference import base, dpo, prepared  # noqa: F401 (fixtures)
from test_tasks import write_jsonl
from tiny_training import step_losses

LOG2 = math.log(2.0)
A = 68  # the byte tokenizer's id of "A" (3 special tokens first)


def a_records(n: int = 300) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt": "".join(rng.choice("abcdef") for _ in range(rng.randint(2, 5))) + str(i),
             "chosen": "A" * rng.randint(2, 4),
             "rejected": "".join(rng.choice("bcdxyz") for _ in range(rng.randint(2, 4)))} for i in range(n)]


@pytest.fixture(scope="module")
def a_pairs(base, tmp_path_factory) -> Path:
    return prepared(base, tmp_path_factory, "preference", a_records())


@pytest.fixture(scope="module")
def judge_run(base, a_pairs, tmp_path_factory) -> Path:
    """A reward model of the A pairs (val accuracy 1)."""
    run = tmp_path_factory.mktemp("judge") / "run"
    trainer = Trainer(dpo(run, a_pairs, base, **{"train.objective": "reward", "train.dpo_beta": 0.1,
                                                  "train.max_steps": 30, "optim.lr": 1e-3}),
                      progress=False, tensorboard=False)
    trainer.fit()
    assert trainer.val_metrics["val_reward_accuracy"] == 1.0
    return run


@pytest.fixture(scope="module")
def policy(base, tmp_path_factory) -> Path:
    """The base fine-tuned on the A records' completions, chosen and rejected alike (half each)."""
    root = tmp_path_factory.mktemp("policy")
    records = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"]}
               for i, r in enumerate(a_records())]
    assert main(["prepare", str(write_jsonl(root / "sft.jsonl", records)), "--task", "sft", "--tokenizer", str(base),
                 "--out", str(root / "data")]) == 0
    Trainer(dpo(root / "run", root / "data", base, **{"train.max_steps": 60, "optim.lr": 3e-3, "train.dpo_beta": 0.1}),
            progress=False, tensorboard=False).fit()
    return root / "run"


def online(run_dir: Path, data: Path, policy: Path, judge: Path, **overrides: object):
    return dpo(run_dir, data, policy, **{"train.dpo_beta": 0.1, "train.online_reward_model": str(judge),
                                         "train.online_max_new_tokens": 5, "optim.lr": 3e-3, **overrides})


def sampled(trainer: Trainer) -> tuple[float, float]:
    """(mean reward, share of A among the completion tokens) of the policy's samples of every val batch's prompts,
    drawn with the seed of the trainer's evaluations."""
    from lmforge.train.trainer import VAL_SAMPLING_STEP

    rewards, samples, share = 0.0, 0, []
    for k, batch in enumerate(trainer.val_batches):
        (x, y), reward = trainer.online(trainer.raw_model, batch, VAL_SAMPLING_STEP, k)
        labels = y[y != IGNORE_INDEX]
        rewards, samples = rewards + reward * len(x), samples + len(x)  # the batch's mean over its samples
        share.append(float((labels == A).float().mean()))
    return rewards / samples, float(np.mean(share))


def fit_and_sample(trainer: Trainer, sampled: Any) -> tuple[float, float, float, float]:
    """(reward before, reward after, share of A's before, after) of `sampled(trainer)` around trainer.fit(), each
    reward checked to be what the trainer's evaluation reports as val_online_reward."""
    reward_before, a_before = sampled(trainer)
    trainer.evaluate()
    assert trainer.val_metrics["val_online_reward"] == pytest.approx(reward_before, abs=1e-5)
    trainer.fit()
    reward_after, a_after = sampled(trainer)
    assert trainer.val_metrics["val_online_reward"] == pytest.approx(reward_after, abs=1e-5)
    return reward_before, reward_after, a_before, a_after


def test_online_dpo_makes_the_policy_write_what_the_reward_model_prefers(a_pairs, policy, judge_run, tmp_path):
    """20 online steps raise the share of A's in the policy's samples and their reward; the evaluations measure it:
    val_online_reward is the mean reward of two samples of every val prompt (the same draws as `sampled`), and it
    can pick the best checkpoint."""
    trainer = Trainer(online(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.max_steps": 20, "train.eval_batches": 4, "train.eval_interval": 10,
        "train.best_metric": "val_online_reward"}), progress=False, tensorboard=False)
    reward_before, reward_after, a_before, a_after = fit_and_sample(trainer, sampled)
    assert trainer.history[0][1] == pytest.approx(LOG2, abs=1e-6)  # the policy is its reference at step 1
    assert reward_after > reward_before + 0.5 and a_after > a_before + 0.2
    logged = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert all(isinstance(r["online_reward"], float) for r in logged)


def test_the_pairs_are_the_policys_samples_ranked_by_the_reward_model(a_pairs, policy, judge_run, tmp_path):
    """Each pair of the batch that comes out: the batch's prompt, then two samples the policy draws with the step's
    seed (generate_batch_ids, the same tokens), the one the reward model scores higher first; an end token after a
    sample that ended, none after one that ran out of tokens; the reported reward their mean."""
    trainer = Trainer(online(tmp_path / "run", a_pairs, policy, judge_run), progress=False, tensorboard=False)
    batch = trainer.train_data.next_batch()
    (x, y), mean = trainer.online(trainer.raw_model, batch, 3, 1)
    seed = int(np.random.SeedSequence([trainer.config.train.seed, 3, 1]).generate_state(1, np.uint64)[0] >> 1)
    prompts = trainer.online.prompts(batch)
    drawn = generate_batch_ids(trainer.raw_model, [p.tolist() for p in prompts],
                               GenerateConfig(max_new_tokens=5, num_return_sequences=2, seed=seed), end_id=1)
    judge, rewards, ended = trainer.online.judge, [], 0
    for k, prompt in enumerate(prompts):
        rows = []
        for r in (2 * k, 2 * k + 1):
            labelled = (y[r] != IGNORE_INDEX).nonzero().flatten()
            full = torch.cat([x[r, :labelled[-1] + 1], y[r, labelled[-1:]]]).numpy()
            assert full[:len(prompt)].tolist() == prompt.tolist() and int(labelled[0]) == len(prompt) - 1
            rows.append(full)
        samples = [row[len(prompt):].tolist() for row in rows]
        expected = [ids + [1] if len(ids) < 5 else ids for ids in drawn[k]]
        assert sorted(samples) == sorted(expected)
        ended += sum(len(ids) < 5 for ids in drawn[k])
        chosen, rejected = judge.score_ids(rows)
        assert chosen >= rejected
        rewards += [chosen, rejected]
    assert mean == pytest.approx(float(np.mean(rewards)), abs=1e-5)
    assert 0 < ended < 2 * len(prompts)  # both kinds of sample were drawn


def test_a_resumed_online_run_is_bit_identical(a_pairs, policy, judge_run, tmp_path):
    from test_preference import full_and_resumed

    extra = {"train.dpo_beta": 0.1, "train.online_reward_model": str(judge_run), "train.online_max_new_tokens": 5}
    full, resumed = full_and_resumed(tmp_path, a_pairs, policy, **extra)
    assert [step for step, _ in resumed.history] == [4, 5, 6]
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 3]
    assert step_losses(tmp_path / "resumed")[6] == step_losses(tmp_path / "full")[6]
    assert len({loss for _, loss in full.history}) > 3


@pytest.mark.distributed
def test_two_processes_sample_and_train_online_like_one(a_pairs, policy, judge_run, tmp_path):
    from distributed_jobs import one_and_two

    settings = {"data.path": str(a_pairs), "train.init_from": str(policy), "train.dpo_beta": 0.1,
                "train.online_reward_model": str(judge_run), "train.online_max_new_tokens": 5}
    one, two = one_and_two(tmp_path, settings)
    assert [loss for _, loss in two["history"]] == pytest.approx([loss for _, loss in one["history"]], abs=1e-5)
    assert one["history"][0][1] == pytest.approx(LOG2, abs=1e-6)


def other_tokenizer_judge(root: Path) -> Path:
    """A reward model checkpoint whose tokenizer is a character tokenizer, not the data's byte tokenizer."""
    tok = train_char(["abcdefABC xyz"])
    tok.save(root / "tokenizer.json")
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16,
                            head="classify", num_labels=1))
    save_checkpoint(root / "rm", 1, model, None, RunConfig(model=model.config),
                    {"task": {"task": "reward", "template": None}}, tokenizer_file=root / "tokenizer.json")
    return root / "rm"


def test_online_settings_that_cannot_work_are_refused(base, a_pairs, policy, judge_run, tmp_path):
    sft = tmp_path / "sft"
    assert main(["prepare", str(write_jsonl(tmp_path / "r.jsonl", [{"prompt": "ab", "completion": "AB"}] * 2 +
                                            [{"prompt": f"q{i}", "completion": "x"} for i in range(20)])),
                 "--task", "sft", "--tokenizer", str(base), "--out", str(sft)]) == 0
    other = other_tokenizer_judge(tmp_path)
    cases = [(sft, {}, "on sft data trains with GRPO"),
             (a_pairs, {"train.objective": "reward"}, "without train.objective reward"),
             (a_pairs, {"train.precompute_reference": True}, "cannot score ahead"),
             (a_pairs, {"train.parallel": "fsdp"}, "use train.parallel ddp"),
             (a_pairs, {"train.online_max_new_tokens": 16}, "leaves no room for a prompt"),
             (a_pairs, {"train.online_reward_model": str(policy)}, "is not a reward model"),
             (a_pairs, {"train.online_reward_model": str(other)}, "reads another tokenizer")]
    for i, (data, extra, words) in enumerate(cases):
        with pytest.raises(ConfigError, match=words):
            Trainer(online(tmp_path / f"run{i}", data, policy, judge_run, **extra), progress=False,
                    tensorboard=False)
        assert not (tmp_path / f"run{i}").exists()
    with pytest.raises(ConfigError, match="val_online_reward is measured with train.online_reward_model"):
        Trainer(dpo(tmp_path / "y", a_pairs, policy, **{"train.dpo_beta": 0.1,
                                                          "train.best_metric": "val_online_reward"}),
                progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match="needs train.online_reward_model"):
        dpo(tmp_path / "x", a_pairs, policy, **{"train.online_temperature": 0.7})


def test_lora_trains_online_against_its_adapters_off_and_counts_the_sampled_tokens(a_pairs, policy, judge_run,
                                                                                   tmp_path):
    """With LoRA the reference is the policy with its adapters off: log 2 at the first step, then not; tokens_seen
    counts the rows the samples made, not the data's pairs."""
    trainer = Trainer(online(tmp_path / "run", a_pairs, policy, judge_run, **{
        "lora.r": 4, "lora.targets": "q,v", "train.max_steps": 3, "optim.lr": 1e-2}), progress=False, tensorboard=False)
    real, seen = trainer.online, []

    def spy(model, batch, step, micro):
        out = real(model, batch, step, micro)
        if step < trainer.config.train.max_steps:  # a training step's samples (evaluations sample too)
            seen.append(out[0][0].numel())
        return out
    spy.last_parts = {}  # each judge's mean reward, what the trainer logs (one judge here: not logged)
    trainer.online = spy
    trainer.fit()
    losses = [loss for _, loss in trainer.history]
    assert losses[0] == pytest.approx(LOG2, abs=1e-6) and losses[-1] != pytest.approx(LOG2, abs=1e-4)
    assert len(seen) == 3 and trainer.tokens_seen == sum(seen)
    assert trainer.base is not None
