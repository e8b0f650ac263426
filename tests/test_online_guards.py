"""Guards of online preference training (train/online.py, train.online_reward_model) and `lmforge best-of-n`: the
prompt and judge fitting, the tie rule, temperature, the model's mode, the seeds of micro-batches and of
evaluations, what is logged and validated, the config checks, rank_samples' shapes and best-of-n's CLI rules.

OnlinePairs is exercised directly with a random tiny GPT and a stand-in judge (any object with score_ids and
model.config.block_size), so the expected pairs can be computed by hand with generate_batch_ids."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmforge.cli import RANKED_KEYS, _is_ranked, main
from lmforge.config import ModelConfig
from lmforge.data.batches import IGNORE_INDEX, Examples, fit_context, pad_examples
from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, generate_batch_ids
from lmforge.generate.reward import rank_samples
from lmforge.model import GPT
from lmforge.train import Trainer
from lmforge.train.online import OnlinePairs
from test_online_preference import a_pairs, judge_run, online, policy  # noqa: F401 (fixtures)
from test_preference import base, dpo  # noqa: F401 (fixtures)

START, END, PAD, BLOCK, NEW = 2, 1, 0, 16, 5


class Judge:
    """A stand-in reward model: scores rows with `fn` and keeps every row it was given."""

    def __init__(self, fn, block_size: int = BLOCK) -> None:
        self.model = SimpleNamespace(config=SimpleNamespace(block_size=block_size))
        self.fn, self.rows = fn, []

    def score_ids(self, rows):
        self.rows += [np.asarray(r).tolist() for r in rows]
        return [float(self.fn(np.asarray(r))) for r in rows]


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=40, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16))


def pair_batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of pairs in the data's layout: each prompt ([start] + ids) with two one-token completions + [end]."""
    rows = [p + [c, END] for p in prompts for c in (30, 31)]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    ex = Examples(np.concatenate(rows).astype(np.int64), offsets, np.asarray([len(p) for p in prompts for _ in "cr"]))
    return pad_examples(ex, np.arange(len(rows)), PAD)


def seed_of(seed: int, step: int, micro: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, np.uint64)[0] >> 1)


def rows_of(x: torch.Tensor, y: torch.Tensor) -> list[list[int]]:
    """Each row of a pair batch whole: its inputs up to the last label, then that label."""
    out = []
    for r in range(len(x)):
        labelled = (y[r] != IGNORE_INDEX).nonzero().flatten()
        out.append(torch.cat([x[r, :labelled[-1] + 1], y[r, labelled[-1:]]]).tolist())
    return out


def expected_rows(prompts: list[list[int]], drawn: list[list[list[int]]]) -> list[list[int]]:
    return [p + ids + ([END] if len(ids) < NEW else []) for p, pair in zip(prompts, drawn) for ids in pair]


PROMPTS = [[START, 5, 6, 7], [START, 8, 9], [START, 10, 11, 12, 13]]


def test_a_tie_keeps_the_draw_order_and_the_samples_are_drawn_at_the_configured_temperature():
    """With every reward equal, row 2k is prompt k's first sample and 2k + 1 its second (the tie rule), drawn with
    train.online_temperature and the (seed, step, micro) seed: what generate_batch_ids draws by hand."""
    model = tiny_gpt()
    pairs = OnlinePairs(Judge(lambda r: 0.0), BLOCK, NEW, 0.4, 11, START, END, PAD)
    (x, y), mean = pairs(model, pair_batch(PROMPTS), 2, 1)
    config = GenerateConfig(max_new_tokens=NEW, temperature=0.4, num_return_sequences=2, seed=seed_of(11, 2, 1))
    drawn = generate_batch_ids(model, PROMPTS, config, end_id=END)
    assert rows_of(x, y) == expected_rows(PROMPTS, drawn) and mean == 0.0
    assert any(a != b for a, b in drawn)  # the two samples differ: the order is not vacuous
    hot = generate_batch_ids(model, PROMPTS, GenerateConfig(max_new_tokens=NEW, num_return_sequences=2,
                                                            seed=seed_of(11, 2, 1)), end_id=END)
    assert hot != drawn  # temperature 1 draws other tokens: the temperature was used


def test_the_higher_reward_goes_first_whatever_the_draw_order():
    """A judge that prefers longer rows: each pair's chosen row is its longer sample (a strict preference swaps)."""
    model = tiny_gpt()
    pairs = OnlinePairs(Judge(lambda r: len(r)), BLOCK, NEW, 1.0, 3, START, END, PAD)
    (x, y), mean = pairs(model, pair_batch(PROMPTS), 0, 0)
    drawn = generate_batch_ids(model, PROMPTS, GenerateConfig(max_new_tokens=NEW, num_return_sequences=2,
                                                              seed=seed_of(3, 0, 0)), end_id=END)
    full = expected_rows(PROMPTS, drawn)
    want = []
    for k in range(len(PROMPTS)):
        a, b = full[2 * k], full[2 * k + 1]
        want += [a, b] if len(a) >= len(b) else [b, a]
    assert rows_of(x, y) == want and mean == pytest.approx(np.mean([len(r) for r in full]))


def test_sampling_puts_the_model_back_in_the_mode_it_was_in():
    """OnlinePairs samples in eval mode and leaves a training model training, an evaluating one evaluating."""
    model = tiny_gpt()
    pairs = OnlinePairs(Judge(lambda r: 0.0), BLOCK, NEW, 1.0, 3, START, END, PAD)
    model.train()
    pairs(model, pair_batch(PROMPTS), 0, 0)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    pairs(model, pair_batch(PROMPTS), 0, 0)
    assert not any(m.training for m in model.modules())


def test_a_long_prompt_loses_its_earliest_tokens_after_the_start_token():
    """prompts(): [start] + prompt fitted to block_size - max_new_tokens tokens, the start token kept (so prompt and
    sample fit block_size: a judge of the same context reads them uncut); without a start token (start_id None) the
    earliest tokens go from the very beginning."""
    long = [START] + list(range(3, 17))  # 15 tokens, 11 fit
    batch = pair_batch([long, [START, 5, 6]])
    pairs = OnlinePairs(Judge(lambda r: 0.0), BLOCK, NEW, 1.0, 3, START, END, PAD)
    got = [p.tolist() for p in pairs.prompts(batch)]
    assert got == [[START] + list(range(7, 17)), [START, 5, 6]]
    assert len(got[0]) == BLOCK - NEW
    bare = OnlinePairs(Judge(lambda r: 0.0), BLOCK, NEW, 1.0, 3, None, END, PAD)
    assert [p.tolist() for p in bare.prompts(batch)] == [long[4:], [START, 5, 6]]
    judge = Judge(lambda r: 0.0)  # the policy's context: every row, prompt and sample, reaches it uncut
    (x, y), _ = OnlinePairs(judge, BLOCK, NEW, 1.0, 3, START, END, PAD)(tiny_gpt(), batch, 0, 0)
    assert judge.rows == rows_of(x, y) and max(map(len, judge.rows)) <= BLOCK


def test_the_judge_reads_each_row_fitted_to_its_own_context_while_the_pairs_keep_them_whole():
    """A judge with a shorter context than the policy's scores each row cut as fit_context cuts it (start token
    kept, earliest prompt tokens gone); the pairs that come out hold the rows uncut."""
    model = tiny_gpt()
    judge = Judge(lambda r: float(r.sum() % 7), block_size=6)
    pairs = OnlinePairs(judge, BLOCK, NEW, 1.0, 5, START, END, PAD)
    (x, y), _ = pairs(model, pair_batch(PROMPTS), 1, 0)
    drawn = generate_batch_ids(model, PROMPTS, GenerateConfig(max_new_tokens=NEW, num_return_sequences=2,
                                                              seed=seed_of(5, 1, 0)), end_id=END)
    full = expected_rows(PROMPTS, drawn)
    assert judge.rows == [fit_context(np.asarray(r), 6, 1).tolist() for r in full]
    assert all(len(r) <= 6 and r[0] == START for r in judge.rows)
    assert sorted(rows_of(x, y)) == sorted(full) and max(map(len, full)) > 6


def test_micro_batches_and_evaluations_sample_with_seeds_of_their_own(a_pairs, policy, judge_run, tmp_path):
    """With grad_accum 2 each step samples its micro-batches as micro 0 and 1 of one step, a new step per optimizer
    step; every evaluation samples val batch k as (the one evaluation step, k), a step no training step takes; the
    log's online_reward is the mean reward of the step's last micro-batch."""
    trainer = Trainer(online(tmp_path / "run", a_pairs, policy, judge_run, **{
        "train.max_steps": 3, "train.grad_accum": 2, "train.eval_interval": 2, "train.eval_batches": 2}),
        progress=False, tensorboard=False)
    real, calls = trainer.online, []

    def spy(model, batch, step, micro):
        training = model.training  # evaluations sample with the model in eval mode
        out = real(model, batch, step, micro)
        calls.append((training, step, micro, out[1], trainer.step))
        return out
    spy.last_parts = {}  # each judge's mean reward, what the trainer logs (one judge here: not logged)
    trainer.online = spy
    trainer.fit()
    training = [c[1:] for c in calls if c[0]]
    evaluation = [c[1:] for c in calls if not c[0]]
    assert [(micro, at) for _, micro, _, at in training] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    steps = [step for step, _, _, _ in training]
    assert steps[0::2] == steps[1::2] and len(set(steps[0::2])) == 3
    n = len(trainer.val_batches)
    assert n == 2 and len(evaluation) >= 2 * n and len({step for step, _, _, _ in evaluation}) == 1
    assert [micro for _, micro, _, _ in evaluation] == list(range(n)) * (len(evaluation) // n)
    assert not {step for step, _, _, _ in evaluation} & set(steps)
    logged = {r["step"]: r["online_reward"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text()
                                                           .splitlines()) if r["kind"] == "train"}
    assert logged == pytest.approx({at + 1: mean for _, micro, mean, at in training if micro == 1}, abs=1e-6)


def test_validation_loss_stays_on_the_datas_pairs(a_pairs, policy, judge_run, tmp_path):
    """With online training the val loss and val_reward_accuracy are the preference loss of the data's val pairs
    (preference_terms online=False, by hand), not of samples."""
    trainer = Trainer(online(tmp_path / "run", a_pairs, policy, judge_run, **{"train.eval_batches": 2,
                                                                              "train.max_steps": 2}),
                      progress=False, tensorboard=False)
    trainer.fit()  # away from the reference, where every pair's loss is log 2 whatever its completions
    loss = trainer.evaluate()
    assert abs(loss - np.log(2.0)) > 1e-3
    losses, wins = [], []
    with torch.no_grad():
        for batch in trainer.val_batches:
            terms, chosen, rejected = trainer.preference_terms(trainer.model, batch, online=False)
            losses += terms.tolist()
            wins += (chosen > rejected).tolist()
    assert loss == pytest.approx(float(np.mean(losses)), abs=1e-5)
    assert trainer.val_metrics["val_reward_accuracy"] == pytest.approx(float(np.mean(wins)), abs=1e-9)


def test_online_settings_alone_and_zero_temperature_or_length_are_refused(a_pairs, policy, judge_run, tmp_path):
    """train.online_max_new_tokens alone (no reward model) is refused, as are online_temperature 0 and
    online_max_new_tokens 0."""
    with pytest.raises(ConfigError, match="needs train.online_reward_model"):
        dpo(tmp_path / "x", a_pairs, policy, **{"train.online_max_new_tokens": 8})
    with pytest.raises(ConfigError, match="online_temperature"):
        online(tmp_path / "y", a_pairs, policy, judge_run, **{"train.online_temperature": 0})
    with pytest.raises(ConfigError, match="online_max_new_tokens"):
        online(tmp_path / "z", a_pairs, policy, judge_run, **{"train.online_max_new_tokens": 0})


def test_rank_samples_keeps_each_prompts_samples_and_takes_one_sample_as_a_string():
    """rank_samples over several batches: each prompt's own samples, scored as (prompt, sample), best first; with
    num_return_sequences 1 the generator gives one string a prompt, which is one sample, not its characters."""
    generator = SimpleNamespace(generate=lambda chunk, config: [
        f"{p}!" if config.num_return_sequences == 1 else [f"{p}{j}" for j in range(config.num_return_sequences)]
        for p in chunk])
    judge = SimpleNamespace(score=lambda prompts, texts: [float(len(p) * 10 + int(t[-1]) * (-1) ** len(p))
                                                          if t[-1].isdigit() else float(len(t)) for p, t in
                                                          zip(prompts, texts)])
    prompts = ["a", "bb", "ccc", "dd", "e"]
    got = list(rank_samples(generator, judge, prompts, GenerateConfig(num_return_sequences=3), batch_size=2))
    for p, ranked in zip(prompts, got):
        scores = judge.score([p] * 3, [f"{p}{j}" for j in range(3)])
        assert ranked == sorted(zip([f"{p}{j}" for j in range(3)], scores), key=lambda item: -item[1])
    one = list(rank_samples(generator, judge, prompts, GenerateConfig(num_return_sequences=1), batch_size=2))
    assert one == [[(f"{p}!", float(len(p) + 1))] for p in prompts]


def test_only_a_file_with_exactly_best_of_ns_keys_counts_as_its_own(tmp_path):
    """_is_ranked: a first line with exactly RANKED_KEYS, or an empty file; extra or missing keys are someone
    else's file."""
    record = {key: None for key in RANKED_KEYS}
    cases = {"exact.jsonl": json.dumps(record) + "\n", "empty.jsonl": "",
             "extra.jsonl": json.dumps({**record, "note": "mine"}) + "\n",
             "fewer.jsonl": json.dumps({k: v for k, v in record.items() if k != "samples"}) + "\n",
             "list.jsonl": json.dumps(sorted(RANKED_KEYS)) + "\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert {name: _is_ranked(tmp_path / name) for name in cases} == {
        "exact.jsonl": True, "empty.jsonl": True, "extra.jsonl": False, "fewer.jsonl": False, "list.jsonl": False}


def test_best_of_n_refuses_a_zero_batch_no_prompts_and_its_own_input_as_output(base, judge_run, tmp_path, capsys):
    """--batch-size 0, a --prompts file without a prompt, and --out the --prompts file (a ranked file read again
    with --force) are one clear line each, exit 2, nothing written or replaced."""
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n", encoding="utf-8")
    prompts = tmp_path / "p.txt"
    prompts.write_text("cab\n", encoding="utf-8")
    ranked = tmp_path / "ranked.jsonl"
    text = json.dumps({**{key: None for key in RANKED_KEYS}, "prompt": "ab"}) + "\n"
    ranked.write_text(text, encoding="utf-8")
    common = ["best-of-n", str(base), "--reward-model", str(judge_run), "--num-return-sequences", "2",
              "--max-new-tokens", "3", "--no-progress"]
    cases = [([*common, "--prompts", str(prompts), "--batch-size", "0", "--out", str(tmp_path / "a.jsonl")],
              "--batch-size 0 is invalid"),
             ([*common, "--prompts", str(blank), "--out", str(tmp_path / "b.jsonl")], "holds no prompt"),
             ([*common, "--prompts", str(ranked), "--out", str(ranked), "--force"], "is the input")]
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()
    assert ranked.read_text(encoding="utf-8") == text


def test_best_of_n_pairs_only_non_blank_different_samples(base, judge_run, tmp_path, capsys, monkeypatch):
    """A blank (whitespace-only) sample is ranked and listed but never chosen or rejected; a prompt whose non-blank
    samples are one text is left out."""
    import lmforge.generate.reward as reward_module

    ranked = {"p1": [("  ", 3.0), ("good", 2.0), ("bad", 1.0), ("\n", 0.5)],
              "p2": [(" ", 1.0), ("same", 0.5), ("same", 0.2)]}
    monkeypatch.setattr(reward_module, "rank_samples", lambda generator, judge, prompts, config, batch_size:
                        iter([ranked[p] for p in prompts]))
    prompts = tmp_path / "p.txt"
    prompts.write_text("p1\np2\n", encoding="utf-8")
    out = tmp_path / "r.jsonl"
    assert main(["best-of-n", str(base), "--reward-model", str(judge_run), "--prompts", str(prompts),
                 "--num-return-sequences", "3", "--no-progress", "--out", str(out)]) == 0
    assert "1 prompt(s) ranked" in capsys.readouterr().err
    (record,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    picked = (record["prompt"], record["chosen"], record["rejected"], record["completion"])
    assert picked == ("p1", "good", "bad", "good")
    assert (record["chosen_reward"], record["rejected_reward"]) == (2.0, 1.0)
    assert record["samples"] == [{"text": t, "reward": r} for t, r in ranked["p1"]]


def test_best_of_n_no_template_gives_the_prompts_as_they_are(policy, judge_run, tmp_path, capsys):
    """--no-template: the policy samples the raw prompt (load(template=False).generate), not its templated form."""
    from lmforge.generate import load

    prompts = tmp_path / "p.txt"
    prompts.write_text("cab1\nfed2\n", encoding="utf-8")
    out = tmp_path / "r.jsonl"
    main(["best-of-n", str(policy), "--reward-model", str(judge_run), "--prompts", str(prompts), "--no-template",
          "--num-return-sequences", "4", "--max-new-tokens", "4", "--seed", "5", "--no-progress", "--out", str(out)])
    records = {r["prompt"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    raw, templated = load(str(policy), template=False), load(str(policy))
    differs = False
    for prompt in ("cab1", "fed2"):
        want = sorted(raw.generate(prompt, num_return_sequences=4, max_new_tokens=4, seed=5))
        if prompt in records:
            assert sorted(s["text"] for s in records[prompt]["samples"]) == want
        differs |= want != sorted(templated.generate(prompt, num_return_sequences=4, max_new_tokens=4, seed=5))
    assert records and differs  # the template changes what is sampled: the flag was honoured


def test_the_plan_notes_online_sampling_only_for_online_preference_runs():
    """`lmforge plan`: the sampling is counted (and noted) for preference data with train.online_reward_model only."""
    from test_plan import config

    from lmforge.plan import plan

    def noted(task: str, **settings: object) -> bool:
        return any("online sampling counted" in n for n in plan(config(**settings), device="h100", task=task).notes)

    assert noted("preference", **{"train.online_reward_model": "runs/rm"})
    assert not noted("preference")
