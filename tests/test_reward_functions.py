"""train.online_reward_function: a user's Python function as the judge of online training and GRPO (rule-based
rewards, TRL's reward_funcs), alone or beside a reward model.

It is called with the prompts as the model reads them, the samples and the data's own completions (the reference
answers), as text; its rewards are what GRPO trains on (20 steps raise the share of A's when the function counts
them), they add to a reward model's; a function that cannot be loaded, raises, or returns the wrong number of values
or a non-finite one stops the run with one line naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.data.batches import IGNORE_INDEX
from lmforge.errors import ConfigError
from lmforge.train import Trainer
from lmforge.train.metrics import read_metrics
from test_grpo import grpo
from test_online_preference import A, a_pairs, judge_run, online, policy  # noqa: F401 (fixtures)
from test_preference import base, dpo  # noqa: F401 (fixtures)

A_SHARE = '''
CALLS = []


def a_share(prompts, completions, references):
    CALLS.append((list(prompts), list(completions), list(references)))
    return [sum(c == "A" for c in text) / max(len(text), 1) for text in completions]
'''


def function_file(tmp_path: Path, body: str = A_SHARE, name: str = "rewards.py") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def test_grpo_learns_from_a_reward_function_alone(a_pairs, policy, judge_run, tmp_path):
    """No reward model: the function sees each prompt as the model reads it, each sample and the example's own
    completion as text (G samples a prompt, prompt-major), and 20 GRPO steps on sft data raise its reward."""
    sft = policy.parent / "data"
    spec = f"{function_file(tmp_path)}:a_share"
    settings = {"train.online_reward_model": None, "train.online_reward_function": spec, "train.max_steps": 20,
                "train.eval_batches": 4, "train.eval_interval": 20}
    trainer = Trainer(grpo(tmp_path / "run", sft, policy, judge_run, **settings), progress=False, tensorboard=False)
    assert trainer.online.judge is None
    calls = trainer.online.function.fns[0][1].__globals__["CALLS"]
    batch = trainer.val_batches[0]
    (x, y, _), rewards = trainer.online.groups(trainer.raw_model, batch, 4, 7, 0)
    prompts, completions, references = calls[-1]
    tok = trainer.online.tokenizer
    for k, (row, labels) in enumerate(zip(batch[0], batch[1])):
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        for g in range(4):
            assert prompts[4 * k + g] == tok.decode(row[:first + 1].tolist())
            assert references[4 * k + g] == tok.decode(labels[labels != IGNORE_INDEX].tolist())
            sample = y[4 * k + g]
            assert completions[4 * k + g] == tok.decode(sample[sample != IGNORE_INDEX].tolist())
    want = [sum(c == "A" for c in text) / max(len(text), 1) for text in completions]
    assert rewards.flatten().tolist() == pytest.approx(want)
    assert any(r for r in references) and len(set(references)) > 1
    trainer.evaluate()
    before = trainer.val_metrics["val_online_reward"]
    trainer.fit()
    assert trainer.val_metrics["val_online_reward"] > before + 0.2


def test_a_functions_rewards_add_to_the_reward_models(a_pairs, policy, judge_run, tmp_path):
    spec = f"{function_file(tmp_path)}:a_share"
    both = Trainer(grpo(tmp_path / "both", a_pairs, policy, judge_run, **{"train.online_reward_function": spec}),
                   progress=False, tensorboard=False)
    alone = Trainer(grpo(tmp_path / "alone", a_pairs, policy, judge_run), progress=False, tensorboard=False)
    batch = both.train_data.next_batch()
    _, summed = both.online.groups(both.raw_model, batch, 4, 3, 0)
    _, model_only = alone.online.groups(alone.raw_model, batch, 4, 3, 0)
    _, completions, _ = both.online.function.fns[0][1].__globals__["CALLS"][-1]
    function = torch.tensor([sum(c == "A" for c in t) / max(len(t), 1) for t in completions]).view(-1, 4)
    torch.testing.assert_close(summed, model_only + function)
    assert function.abs().max() > 0


@pytest.mark.parametrize("body,spec,words", [
    (A_SHARE, "{path}", "is not FILE.py:NAME"),
    (A_SHARE, "{dir}/missing.py:a_share", "missing.py does not exist"),
    ("import not_a_module_anywhere\n", "{path}:f", "importing .* failed: ModuleNotFoundError"),
    (A_SHARE, "{path}:nope", "has no function nope"),
    (A_SHARE, "no_such_package_x.mod:f", "importing no_such_package_x.mod failed"),
])
def test_a_function_that_cannot_be_loaded_is_refused(a_pairs, policy, judge_run, tmp_path, body, spec, words):
    path = function_file(tmp_path, body)
    spec = spec.format(path=path, dir=tmp_path)
    with pytest.raises(ConfigError, match=words):
        Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{"train.online_reward_function": spec}),
                progress=False, tensorboard=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("body,words", [
    ("def f(p, c, r):\n    raise KeyError('answer')\n", "failed: KeyError: 'answer'"),
    ("def f(p, c, r):\n    return [1.0]\n", "one finite number per completion: got 1 for 32"),
    ("def f(p, c, r):\n    return [float('nan')] * len(c)\n", "not all finite"),
    ("def f(p, c, r):\n    return ['x'] * len(c)\n", "failed: ValueError"),
])
def test_a_function_that_fails_stops_the_run_with_one_line(a_pairs, policy, judge_run, tmp_path, body, words):
    spec = f"{function_file(tmp_path, body)}:f"
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{"train.online_reward_function": spec}),
                      progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match=words) as info:
        trainer.fit()
    assert "\n" not in str(info.value) and "train.online_reward_function" in str(info.value)


def test_the_cli_names_a_bad_function_in_one_line(a_pairs, policy, tmp_path, capsys):
    code = main(["train", "--data", str(a_pairs), "--train.init_from", str(policy), "--run-dir", str(tmp_path / "r"),
                 "--train.preference_loss", "grpo", "--train.online_reward_function", f"{tmp_path}/none.py:f",
                 "--train.online_max_new_tokens", "5", "--train.max_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "none.py does not exist" in err[0]


def test_several_functions_add_up(a_pairs, policy, judge_run, tmp_path):
    """A comma-separated list of functions (a format reward and a correctness reward, say): each is called on the same
    texts and their rewards are summed; one that fails is named alone."""
    path = function_file(tmp_path, A_SHARE + "\n\ndef length(prompts, completions, references):\n"
                                            "    CALLS.append((prompts, completions, references))\n"
                                            "    return [float(len(c)) + 0.25 for c in completions]\n"
                                            "\n\ndef half(prompts, completions, references):\n"
                                            "    return [0.5] * len(completions)\n"
                                            "\n\ndef broken(prompts, completions, references):\n"
                                            "    raise RuntimeError('no answer field')\n")
    spec = f"{path}:length, {path}:half"
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{"train.online_reward_model": None,
                                                                             "train.online_reward_function": spec}),
                      progress=False, tensorboard=False)
    assert [name for name, _ in trainer.online.function.fns] == [f"{path}:length", f"{path}:half"]
    _, rewards = trainer.online.groups(trainer.raw_model, trainer.train_data.next_batch(), 4, 1, 0)
    _, completions, _ = trainer.online.function.fns[0][1].__globals__["CALLS"][-1]
    assert rewards.flatten().tolist() == pytest.approx([len(t) + 0.75 for t in completions])
    failing = Trainer(grpo(tmp_path / "bad", a_pairs, policy, judge_run, **{
        "train.online_reward_function": f"{path}:a_share,{path}:broken"}), progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match=f"train.online_reward_function {path}:broken failed: RuntimeError"):
        failing.online.groups(failing.raw_model, failing.train_data.next_batch(), 4, 1, 0)


def test_the_log_carries_each_judges_mean_reward(a_pairs, policy, judge_run, tmp_path):
    """With a reward model and two functions, each train record carries online_reward and each judge's mean reward
    (online_reward/reward_model, online_reward/NAME) over the step's samples, which add up to online_reward; with one
    judge only the total is logged."""
    path = function_file(tmp_path, "def length(p, c, r):\n    return [float(len(x)) for x in c]\n"
                                   "\n\ndef half(p, c, r):\n    return [0.5] * len(c)\n")
    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.online_reward_function": f"{path}:length,{path}:half", "train.max_steps": 2, "train.grad_accum": 2,
        "train.batch_size": 3, "train.log_interval": 1}), progress=False, tensorboard=False)
    data_state = trainer.train_data.state_dict()
    parts = []
    for i in range(2):
        trainer.sample_groups(trainer.train_data.next_batch(), 0, i)
        parts.append(dict(trainer.online.last_parts))
    trainer.train_data.load_state_dict(data_state)
    trainer.fit()
    first = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"][0]
    keys = ["online_reward/reward_model", "online_reward/length", "online_reward/half"]
    assert [k for k in first if k.startswith("online_reward/")] == keys
    for key in keys:
        assert first[key] == pytest.approx(np.mean([p[key.partition("/")[2]] for p in parts]), abs=1e-9)
    assert first["online_reward/half"] == 0.5
    assert sum(first[k] for k in keys) == pytest.approx(first["online_reward"], abs=1e-6)
    alone = Trainer(grpo(tmp_path / "alone", a_pairs, policy, judge_run, **{"train.max_steps": 1}),
                    progress=False, tensorboard=False)
    alone.fit()
    record = [r for r in read_metrics(tmp_path / "alone") if r["kind"] == "train"][0]
    assert "online_reward" in record and not any(k.startswith("online_reward/") for k in record)


def test_reward_weights_weigh_each_judge(a_pairs, policy, judge_run, tmp_path):
    """train.online_reward_weights (TRL's reward_weights): one weight per function in order, then the reward model's;
    the reward is the weighted sum of each judge's rewards on the same samples, the log's parts stay unweighted, and
    a negative weight makes a penalty."""
    path = function_file(tmp_path, A_SHARE + "\n\ndef length(prompts, completions, references):\n"
                                            "    return [float(len(c)) for c in completions]\n")
    spec = f"{path}:a_share,{path}:length"
    runs = {}
    for name, weights in (("plain", None), ("weighted", "2,-0.5,0.25")):
        runs[name] = Trainer(grpo(tmp_path / name, a_pairs, policy, judge_run, **{
            "train.online_reward_function": spec, "train.online_reward_weights": weights}), progress=False,
            tensorboard=False)
    batch = runs["plain"].train_data.next_batch()
    _, plain = runs["plain"].online.groups(runs["plain"].raw_model, batch, 4, 3, 0)
    calls = runs["plain"].online.function.fns[0][1].__globals__["CALLS"]
    _, completions, _ = calls[-1]
    share = np.asarray([sum(c == "A" for c in t) / max(len(t), 1) for t in completions])
    length = np.asarray([float(len(t)) for t in completions])
    model = plain.flatten().double().numpy() - share - length  # the reward model's part of the unweighted sum
    _, weighted = runs["weighted"].online.groups(runs["weighted"].raw_model, batch, 4, 3, 0)
    assert runs["weighted"].online.function.fns[0][1].__globals__["CALLS"][-1][1] == completions  # the same samples
    want = 2 * share - 0.5 * length + 0.25 * model
    assert weighted.flatten().tolist() == pytest.approx(want.tolist(), abs=1e-4)
    assert not np.allclose(want, plain.flatten().numpy(), atol=1e-2) and np.ptp(length) > 0
    parts = runs["weighted"].online.last_parts
    assert parts["length"] == pytest.approx(length.mean()) and parts["a_share"] == pytest.approx(share.mean())


@pytest.mark.parametrize("weights, words", [("1", "1 weight(s) for 2 judge(s)"), ("1,2,3", "3 weight(s) for 2"),
                                            ("1,x", "finite numbers"), ("1,nan", "finite numbers")])
def test_reward_weights_that_do_not_fit_the_judges_are_refused(a_pairs, policy, judge_run, tmp_path, weights, words):
    path = function_file(tmp_path)
    with pytest.raises(ConfigError, match=f"online_reward_weights.*{re.escape(words)}"):
        grpo(tmp_path / "run", a_pairs, policy, judge_run, **{"train.online_reward_function": f"{path}:a_share",
                                                               "train.online_reward_weights": weights})
    with pytest.raises(ConfigError, match="online_reward_weights weighs .* there are none"):
        dpo(tmp_path / "dpo", a_pairs, policy, **{"train.online_reward_weights": "1"})


def test_a_padded_vocabulary_samples_only_the_tokenizers_ids(a_pairs, policy, judge_run, tmp_path):
    """A policy whose embedding has rows past the tokenizer's (as imported models often pad it) never samples those
    ids: the reward function gets text and the reward model real tokens. The padded rows here score as high as the
    end token, so without the limit they are drawn."""
    import dataclasses

    trainer = Trainer(grpo(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.online_reward_function": f"{function_file(tmp_path)}:a_share"}), progress=False, tensorboard=False)
    model, vocab, extra = trainer.raw_model, trainer.online.tokenizer.vocab_size, 16
    assert model.config.vocab_size == vocab
    head = torch.nn.Linear(model.config.n_embd, vocab + extra, bias=False)
    embedding = torch.nn.Embedding(vocab + extra, model.config.n_embd)
    with torch.no_grad():
        head.weight[:vocab] = model.lm_head.weight
        head.weight[vocab:] = model.lm_head.weight[trainer.online.end_id]  # as likely as the end token
        embedding.weight[:vocab] = model.tok_emb.weight
    model.lm_head, model.tok_emb = head, embedding
    model.config = dataclasses.replace(model.config, vocab_size=vocab + extra)
    (x, y, _), rewards = trainer.online.groups(model, trainer.train_data.next_batch(), 4, 1, 0)
    sampled = y[y != IGNORE_INDEX]
    assert sampled.max() < vocab and sampled.numel() > 20 and torch.isfinite(rewards).all()
    from lmforge.generate import GenerateConfig, generate_batch_ids

    drawn = generate_batch_ids(model, [p.tolist() for p in trainer.online.prompts(trainer.train_data.next_batch())],
                               GenerateConfig(max_new_tokens=5, num_return_sequences=4, seed=1), end_id=1)
    assert max(t for rows in drawn for ids in rows for t in ids) >= vocab  # without the limit they come up
