"""Guards of reward-model behaviour the main tests (test_reward_model, test_serve_reward) leave open: padding and
fitting whole rows to the context, a tokenizer without a start token, examples longer than the context through
training, eval and RewardModel, every policy-loss setting refused, encoders, eval's --max-examples, and the
server's token limit at its boundary.

Each was found by a mutation hunt: a small break of the code that every earlier test passed.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_for_inference
from lmforge.cli import main
from lmforge.data.batches import Examples, ExampleBatches, fit_context, fixed_example_batches, pad_rows
from lmforge.data.batches import reward_pair_batch
from lmforge.data.tasks import load_examples
from lmforge.errors import ConfigError
from lmforge.generate import load
from lmforge.preference_loss import reward_model_loss
from lmforge.serve import ServeConfig, load_app
from lmforge.train import Trainer
from test_plan import built  # noqa: F401 (a fixture)
from test_preference import base, pairs, prepare_pairs  # noqa: F401 (fixtures)
from test_reward_model import reward_config, reward_run  # noqa: F401 (a fixture)
from test_serve import running
from test_serve_reward import make_reward_run
from test_tasks import write_jsonl


def test_fit_context_keeps_the_first_keep_tokens_and_the_last_ones_for_every_length():
    """A row of L tokens fitted to M keeps min(L, M) tokens: all of them when L <= M (an example of exactly M
    tokens is untouched), else its first `keep` tokens followed by its last M - keep ones."""
    for length in range(1, 12):
        ids = np.arange(100, 100 + length)
        for max_tokens in range(2, 10):
            for keep in (0, 1):
                got = fit_context(ids, max_tokens, keep).tolist()
                if length <= max_tokens:
                    assert got == ids.tolist()
                else:
                    assert got == ids[:keep].tolist() + ids[length - (max_tokens - keep):].tolist()


def test_whole_pair_rows_are_right_padded_with_the_pad_id_and_masked_at_real_tokens():
    """Rows of different lengths: each row is its example (fitted to max_tokens) followed by pad_id, the mask True
    exactly at the example's tokens; pad_rows pads with the id it is given on either side."""
    rows = [[0, 5, 6, 1], [0, 7, 1], [0, 5, 9, 9, 9, 1], [0, 8, 1]]  # two pairs; one row too long for 5 tokens
    tokens = np.array(sum(rows, []))
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    examples = Examples(tokens, offsets, np.ones(4, dtype=np.int64))
    x, mask = reward_pair_batch(examples, np.array([0, 1]), pad_id=2, max_tokens=5, keep=1)
    fitted = [r if len(r) <= 5 else r[:1] + r[len(r) - 4:] for r in rows]
    assert x.tolist() == [r + [2] * (5 - len(r)) for r in fitted]
    assert mask.tolist() == [[True] * len(r) + [False] * (5 - len(r)) for r in fitted]
    for side in ("right", "left"):
        x, mask = pad_rows([np.array([4, 5, 6]), np.array([7])], pad_id=9, side=side)
        assert x.tolist() == ([[4, 5, 6], [7, 9, 9]] if side == "right" else [[4, 5, 6], [9, 9, 7]])
        assert (x[~mask] == 9).all() and mask.sum().item() == 4


def test_a_tokenizer_without_a_start_token_gives_whole_rows_cut_from_their_first_token():
    """whole=0 (no start token to keep) is still a reward model's stream: batches of (x, mask), a too-long example
    losing its first tokens, in training and validation batches alike."""
    rows = [[10, 11, 12, 13, 1], [10, 11, 1], [20, 21, 1], [20, 22, 23, 1]]  # examples of up to block_size + 1
    tokens = np.array(sum(rows, []))
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    examples = Examples(tokens, offsets, np.ones(4, dtype=np.int64))
    expected = [r[len(r) - 4:] if len(r) > 4 else r + [2] * (4 - len(r)) for r in rows]
    stream = ExampleBatches(examples, 4, 2, shuffle=False, pairs=True, whole=0, pad_id=2)
    batch = stream.next_batch()
    assert len(batch) == 2 and batch[1].dtype == torch.bool
    assert batch[0].tolist() == expected and batch[1].sum(dim=1).tolist() == [min(len(r), 4) for r in rows]
    (val,) = fixed_example_batches(examples, 4, 2, 1, pad_id=2, pairs=True, whole=0)
    assert len(val) == 2 and val[0].tolist() == expected and val[1].dtype == torch.bool


def test_a_stream_example_one_token_longer_than_the_context_is_cut_to_block_size():
    """An example of block_size + 1 tokens (the longest preparing writes) becomes a row of block_size tokens: the
    start token and its last block_size - 1 tokens."""
    rows = [[0, 5, 6, 7, 8, 1], [0, 5, 9, 1]]
    examples = Examples(np.array(sum(rows, [])), np.array([0, 6, 10]), np.array([3, 3]))
    x, mask = ExampleBatches(examples, 5, 1, shuffle=False, pairs=True, whole=1, pad_id=2).next_batch()
    assert x.tolist() == [[0, 6, 7, 8, 1], [0, 5, 9, 1, 2]] and mask.sum().item() == 9


def scored_alone(model: torch.nn.Module, examples: Examples, n_pairs: int, block: int) -> torch.Tensor:
    """(n_pairs, 2) rewards of the first pairs' examples, each run alone (no padding, no mask) after cutting it to
    `block` tokens by hand: its start token, then its last block - 1 tokens (an example may end without its end
    token, when preparing cut a long completion)."""
    out = torch.zeros(n_pairs, 2)
    with torch.no_grad():
        for e in range(2 * n_pairs):
            ids = np.asarray(examples.tokens[examples.offsets[e]:examples.offsets[e + 1]]).tolist()
            ids = ids if len(ids) <= block else ids[:1] + ids[len(ids) - block + 1:]
            out[e // 2, e % 2] = model.eval()(torch.tensor(ids, dtype=torch.long)[None])[0, 0]
    return out


@pytest.fixture(scope="module")
def long_pairs(base, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Preference data whose examples all exceed a reward model's 16 tokens: long prompts (prepare keeps 17 tokens,
    the model 16) and, every fourth record, a short prompt with completions longer than the context."""
    rng = random.Random(5)
    records = []
    for i in range(40):
        word = "".join(rng.choice("abcdef") for _ in range(12))
        if i % 4 == 3:
            records.append({"prompt": word[:2], "chosen": (word + word).upper()[:20], "rejected": (word + word)[:20]})
        else:
            records.append({"prompt": word, "chosen": word[:8].upper(), "rejected": word[:8]})
    root = tmp_path_factory.mktemp("long")
    assert prepare_pairs(base, root / "data", write_jsonl(root / "records.jsonl", records),
                         extra=("--split", "0.5,0.25,0.25")) == 0
    return root / "data", records


def test_examples_longer_than_the_context_train_evaluate_and_score_alike(long_pairs, base, tmp_path, capsys):
    """Every example longer than block_size: the trainer's val loss is the Bradley-Terry loss of each val pair scored
    alone with its start token kept and its earliest tokens dropped; `lmforge eval` gives the trained run's val loss
    and rewards equal to each pair scored alone; RewardModel.score of the original records (through the template)
    gives those rewards too."""
    data, records = long_pairs
    val = load_examples(data, "val")
    n = len(val) // 2
    assert all(val.offsets[e + 1] - val.offsets[e] == 17 for e in range(len(val)))  # every one cut by one
    trainer = Trainer(reward_config(tmp_path / "run", data, base, **{
        "data.sampling": "sequential", "train.max_steps": 1, "train.eval_interval": 0, "train.batch_size": 4}),
        progress=False, tensorboard=False)
    start = copy.deepcopy(trainer.raw_model)
    alone = scored_alone(start, val, n, 16)
    assert trainer.evaluate() == pytest.approx(float(reward_model_loss(alone[:, 0], alone[:, 1]).mean()), abs=1e-5)
    trainer.fit()
    run = tmp_path / "run"
    alone = scored_alone(load_for_inference(run)[0], val, n, 16)
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "val", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(trainer.val_loss, abs=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["chosen_reward"] for r in rows] == pytest.approx(alone[:, 0].tolist(), abs=1e-5)
    assert [r["rejected_reward"] for r in rows] == pytest.approx(alone[:, 1].tolist(), abs=1e-5)
    judge = load(str(run))
    for i, row in enumerate(rows):  # the record each pair came from: its completions start with the decoded ones
        (record,) = [r for r in records if r["chosen"].startswith(row["chosen"]) and r["prompt"].endswith(
            row["prompt"].rstrip("\n"))]
        got = judge.score([record["prompt"]] * 2, [record["chosen"], record["rejected"]])
        assert got == pytest.approx(alone[i].tolist(), abs=1e-5)
    assert any(len(r["chosen"]) > 16 for r in records if any(r["chosen"].startswith(row["chosen"]) for row in rows))


@pytest.mark.parametrize("setting", [{"train.dpo_label_smoothing": 0.1}, {"train.simpo_gamma": 1.0},
                                     {"train.preference_nll_weight": 0.5}, {"train.kto_desirable_weight": 2.0},
                                     {"train.kto_undesirable_weight": 2.0}, {"train.preference_loss": "orpo"}])
def test_every_policy_loss_setting_is_refused_for_a_reward_model(base, pairs, tmp_path, setting):
    """A reward model's loss has only reward_center_coefficient: each setting of a language model's preference loss
    is refused before anything is written."""
    with pytest.raises(ConfigError, match="trains a reward model .* drop them"):
        Trainer(reward_config(tmp_path / "run", pairs, base, **setting), progress=False, tensorboard=False)
    assert not (tmp_path / "run").exists()


def test_an_encoder_trains_as_a_reward_model(pairs, tmp_path):
    """An encoder (model.causal false) reads whole examples too: a reward model may be one (only text-to-text
    training of an encoder is refused), and its val loss is its loss."""
    trainer = Trainer(reward_config(tmp_path / "run", pairs, tmp_path, **{
        "train.init_from": "none", "model.causal": False, "train.max_steps": 2, "train.eval_interval": 0}),
        progress=False, tensorboard=False)
    assert trainer.reward and not trainer.config.model.causal and trainer.config.model.num_labels == 1
    trainer.fit()
    assert trainer.val_loss is not None and np.isfinite(trainer.val_loss)


def test_eval_max_examples_counts_pairs_of_a_reward_model(reward_run, tmp_path, capsys):
    """`lmforge eval --max-examples 3` of a reward model measures the first 3 pairs: their rows are the first 3 of
    the full evaluation, and the loss their mean."""
    capsys.readouterr()
    assert main(["eval", str(reward_run.run_dir), "--split", "val", "--out", str(tmp_path / "all")]) == 0
    capsys.readouterr()
    assert main(["eval", str(reward_run.run_dir), "--split", "val", "--max-examples", "3",
                 "--out", str(tmp_path / "three")]) == 0
    result = json.loads(capsys.readouterr().out)
    full = [json.loads(line) for line in (tmp_path / "all" / "predictions.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "three" / "predictions.jsonl").read_text().splitlines()]
    assert result["pairs"] == 3 and len(rows) == 3
    for row, whole in zip(rows, full):  # the same pairs; rewards up to the padding of other batch shapes
        assert {k: row[k] for k in ("prompt", "chosen", "rejected", "correct")} == \
            {k: whole[k] for k in ("prompt", "chosen", "rejected", "correct")}
        assert (row["chosen_reward"], row["rejected_reward"]) == pytest.approx(
            (whole["chosen_reward"], whole["rejected_reward"]), abs=1e-5)
    chosen = torch.tensor([r["chosen_reward"] for r in rows])
    rejected = torch.tensor([r["rejected_reward"] for r in rows])
    center = reward_run.config.train.reward_center_coefficient
    assert result["loss"] == pytest.approx(float(reward_model_loss(chosen, rejected, center).mean()), abs=1e-5)


def test_eval_of_a_reward_model_refuses_an_assistant_model(reward_run, base, capsys):
    """A reward model generates nothing, so `lmforge eval --assistant-model` is refused in one line."""
    capsys.readouterr()
    assert main(["eval", str(reward_run.run_dir), "--split", "val", "--assistant-model", str(base)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop --assistant-model" in err[0]


def test_the_server_takes_a_pair_of_exactly_max_prompt_tokens(tmp_path):
    """serve.max_prompt_tokens is the most tokens a pair may have (as RewardModel encodes it): a pair of exactly
    that many is scored, one more is refused with 422, and usage counts the encoded tokens."""
    run = make_reward_run(tmp_path)
    judge = load(str(run), device="cpu")
    pair = {"prompt": "Who wrote Hamlet?", "completion": "Shakespeare."}
    tokens = len(judge.encode(pair["prompt"], pair["completion"]))
    for limit, status in ((tokens, 200), (tokens - 1, 422)):
        app = load_app(str(run), ServeConfig(max_prompt_tokens=limit), device="cpu")
        with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/reward", json={"input": pair})
        assert r.status_code == status, r.text
        if status == 200:
            assert r.json()["usage"]["prompt_tokens"] == tokens
            assert r.json()["data"][0]["reward"] == pytest.approx(judge.score([pair["prompt"]],
                                                                              [pair["completion"]])[0], abs=1e-5)


def test_a_tie_is_no_win_in_eval(reward_run, pairs):
    """A head that gives every example the same reward (its weights zeroed): no pair counts as correct, reward
    accuracy is 0 (the chosen must score strictly higher, as the trainer's val_reward_accuracy), the loss log 2."""
    from lmforge.eval.preference import evaluate_reward_model

    model, tokenizer, _ = load_for_inference(reward_run.run_dir)
    with torch.no_grad():
        model.classifier.weight.zero_()
    metrics, rows = evaluate_reward_model(model.eval(), tokenizer, load_examples(pairs, "val"), max_pairs=4)
    assert len(rows) == 4 and not any(r["correct"] for r in rows)
    assert metrics["reward_accuracy"] == 0.0 and metrics["loss"] == pytest.approx(np.log(2.0), abs=1e-6)


def test_the_python_reward_model_refuses_other_heads_and_templates_it_cannot_fill(tmp_path):
    """RewardModel takes one score from a classify head (a two-label classifier is no reward model), and a prompt
    template with fields besides the prompt is refused in words rather than rendered with a field missing."""
    from lmforge.config import ModelConfig
    from lmforge.data.tasks import resolve_template
    from lmforge.generate import RewardModel
    from lmforge.model import GPT
    from lmforge.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    shape = {"vocab_size": tok.vocab_size, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 16,
             "head": "classify"}
    with pytest.raises(ConfigError, match="not a reward model"):
        RewardModel(GPT(ModelConfig(**shape, num_labels=2)), tok)
    judge = RewardModel(GPT(ModelConfig(**shape, num_labels=1)), tok, resolve_template("{context}\nQ: {prompt}\nA:"))
    with pytest.raises(ConfigError, match="besides the prompt"):
        judge.score(["Who?"], ["Me."])
    assert len(judge.score([[{"role": "user", "content": "Who?"}]], ["Me."])) == 1  # a chat prompt needs no field


def test_lmforge_reward_refuses_a_batch_size_below_one(reward_run, capsys):
    """`lmforge reward --batch-size 0` is one clear line (exit 2), not a crash inside the scoring loop."""
    capsys.readouterr()
    assert main(["reward", str(reward_run.run_dir), "--prompt", "ab", "--completion", "AB", "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size 0 is invalid" in err[0]


def test_plan_measure_of_a_reward_model_trains_on_whole_pair_batches(built):  # noqa: F811 (a fixture)
    """`lmforge plan --measure` of a reward model steps on the batches training uses: whole rows with their
    attention mask (x, mask bool), not a language model's (x, labels)."""
    from test_plan import config

    from lmforge.plan import measure

    measure(config(**{"train.objective": "reward", "train.num_threads": 1}), steps=1, task="preference")
    x, mask = built[-1].train_data.next_batch()
    assert mask.dtype == torch.bool and mask.shape == x.shape and bool(mask.all())
