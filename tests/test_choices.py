"""Multiple-choice evaluation (eval/choices.py, `lmforge eval --choices`): the log-likelihoods, acc and acc_norm
lm-evaluation-harness computes for the same model exported to Hugging Face; acc and acc_norm pick what a model
that writes a known text prefers; shots, records and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError, DataError
from lmforge.eval.choices import ChoiceExample, ChoiceTask, contexts, encode_pair, read_choice_examples
from lmforge.generate import generate_ids, prompt_ids
from lmforge.tokenizer import train_bpe
from test_interop import CORPUS, GPT2_STYLE, lmforge_run
from test_serve import scripted_run


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def quiz_records(run: Path, tok) -> list[dict]:
    """Examples that reach every rule of the harness's tokens: a context ending in spaces, an empty one, one longer
    than the block (truncated), choices of very different lengths, and the model's own greedy continuation."""
    from lmforge.checkpoint import load_for_inference

    model, _, _ = load_for_inference(run, "cpu")
    context = "The quick brown fox"
    greedy = generate_ids(model, prompt_ids(tok, context), greedy=True, max_new_tokens=4, end_id=None)[0]
    records = [{"context": context, "choices": [" jumps", tok.decode(greedy), " over the lazy dog", "!"], "answer": 1},
               {"context": "Hello, world!  ", "choices": ["This", "is a small corpus", "Привет"], "answer": 0},
               {"context": "", "choices": ["Hello", "床前明月光", " the"], "answer": 2},
               {"context": "床前明月光，" + "q w e r t y " * 8 + "疑是地上霜。", "choices": ["举头望明月", "低头思故乡。", "x"],
                "answer": 0}]
    phrases = [s for line in CORPUS[:3] for s in line.replace("!", ".").replace("。", ".").split(".") if s.strip()]
    for i, phrase in enumerate(phrases):  # more examples, so acc and acc_norm are not all 0 or 1 by chance
        words = phrase.split(" ")  # split between words: a cut inside one may leave the choice no tokens of its own
        if len(words) < 3:
            continue
        head, tail = " ".join(words[:len(words) // 2]), " " + " ".join(words[len(words) // 2:])
        records.append({"context": head, "choices": [tail, tail[:2], " the lazy dog jumps over"], "answer": i % 3})
    return records


def harness_setup(tmp_path: Path, monkeypatch, skip: int | None = None) -> tuple[Path, Path, object]:
    """(run, quiz file, lm-evaluation-harness TaskManager holding task "quiz" on it): a random GPT-2-style model with
    a byte-level BPE, exported to tmp_path/hf; the quiz of quiz_records (less record `skip`), no target delimiter."""
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the harness and datasets read local files only
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tok = train_bpe(CORPUS, 400)
    run = lmforge_run(tmp_path, tok, **GPT2_STYLE)
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    quiz = write_jsonl(tmp_path / "quiz.jsonl", [r for i, r in enumerate(quiz_records(run, tok)) if i != skip])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "quiz.yaml").write_text(
        f"task: quiz\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {quiz}\ntest_split: test\n"
        f"output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        f"target_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return run, quiz, TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)


def test_loglikelihoods_acc_and_acc_norm_equal_lm_evaluation_harness_on_the_exported_model(tmp_path, monkeypatch):
    """The same checkpoint, exported to Hugging Face, scored by lm-evaluation-harness's own HFLM on the same file:
    every choice's log-likelihood and is-greedy, acc and acc_norm agree (BPE tokens across the context/choice
    boundary, trailing whitespace, an empty context, a context cut to the block)."""
    lm_eval = pytest.importorskip("lm_eval")
    run, quiz, tasks = harness_setup(tmp_path, monkeypatch)
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'hf'},add_bos_token=True,dtype=float32", tasks=["quiz"],
        task_manager=tasks, log_samples=True, device="cpu", batch_size=4)
    samples = sorted(theirs["samples"]["quiz"], key=lambda s: s["doc_id"])
    results = theirs["results"]["quiz"]

    for batch_size in (16, 1):
        out = tmp_path / f"ours-{batch_size}"
        assert main(["eval", str(run), "--choices", str(quiz), "--choice-delimiter", "", "--batch-size",
                     str(batch_size), "--out", str(out), "--no-progress"]) == 0
        ours = json.loads((out / "metrics.json").read_text())
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == len(samples) == ours["examples"]
        for row, sample in zip(rows, samples):
            want = [r[0] for r in sample["resps"]]
            assert row["loglikelihoods"] == pytest.approx([w[0] for w in want], rel=1e-5, abs=1e-4)
            assert row["greedy"] == [w[1] for w in want]
        assert ours["acc"] == pytest.approx(results["acc,none"])
        assert ours["acc_norm"] == pytest.approx(results["acc_norm,none"])
        assert ours["acc_stderr"] == pytest.approx(results["acc_stderr,none"])
    assert rows[0]["greedy"][1] and not any(rows[0]["greedy"][i] for i in (0, 2, 3))  # the model's own text
    assert any(r["prediction"] != r["prediction_norm"] for r in rows)  # the two metrics really differ here
    assert 0 < ours["acc"] < 1 and ours["truncated"] >= 1 and rows[3]["truncated"]


def test_lm_evaluation_harness_scores_through_the_server_what_eval_choices_scores(tmp_path, monkeypatch):
    """lm-evaluation-harness's `local-completions` model (OpenAI completions with echo and logprobs, token ids sent
    as prompts, the exported tokenizer) against `lmforge serve` on loopback: the same log-likelihoods, greedy flags,
    acc and acc_norm as `lmforge eval --choices` (questions that fit the block: for a longer one the harness's API
    window is one token shorter than its hf model's)."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm_eval[api]
    from lmforge.serve import ServeConfig, load_app
    from test_serve import running

    run, quiz, tasks = harness_setup(tmp_path, monkeypatch, skip=3)  # 3: longer than the block
    records = quiz.read_text().splitlines()
    assert main(["eval", str(run), "--choices", str(quiz), "--choice-delimiter", "", "--out", str(tmp_path / "ours"),
                 "--no-progress"]) == 0
    ours = json.loads((tmp_path / "ours" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "ours" / "predictions.jsonl").read_text().splitlines()]
    with running(load_app(str(run), ServeConfig(), device="cpu")) as url:
        theirs = lm_eval.simple_evaluate(
            model="local-completions", tasks=["quiz"], log_samples=True,
            model_args=f"base_url={url}/v1/completions,model=run,tokenizer={tmp_path / 'hf'},"
                       f"tokenizer_backend=huggingface,add_bos_token=True,max_length=48",
            task_manager=tasks)
    samples = sorted(theirs["samples"]["quiz"], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows) == len(records)
    for row, sample in zip(rows, samples):
        assert row["loglikelihoods"] == pytest.approx([r[0][0] for r in sample["resps"]], rel=1e-5, abs=1e-4)
        assert row["greedy"] == [r[0][1] for r in sample["resps"]]
    assert ours["acc"] == pytest.approx(theirs["results"]["quiz"]["acc,none"])
    assert ours["acc_norm"] == pytest.approx(theirs["results"]["quiz"]["acc_norm,none"])
    assert any(any(row["greedy"]) for row in rows) and ours["truncated"] == 0


def test_acc_takes_the_likeliest_choice_and_acc_norm_the_likeliest_per_character(tmp_path):
    """A model that writes " Paris is" after "The capital of France is" whatever it reads: a choice it would write
    scores ~0, each other token about -160. "Q" (one wrong token, -160 per character) beats " PaQQQ" (four
    wrong, -107 per character) on the sum, and loses per character."""
    context = "The capital of France is"
    run = scripted_run(tmp_path, " Paris is", start=len(context))  # <START> is position 0: the context ends at 24
    quiz = write_jsonl(tmp_path / "quiz.jsonl", [
        {"context": context, "choices": ["Rome", "Paris"], "answer": 1},
        {"context": context, "choices": ["Paris", "Rome"], "answer": 1},
        {"context": context, "choices": ["Q", "PaQQQ"], "answer": 0},
    ])
    assert main(["eval", str(run), "--choices", str(quiz), "--no-progress"]) == 0
    out = run / "eval" / "choices-quiz"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["loglikelihoods"][1] > -1e-3 and rows[0]["loglikelihoods"][0] < -100 and rows[0]["greedy"] == [
        False, True]
    assert [r["prediction"] for r in rows] == [1, 0, 0] and [r["prediction_norm"] for r in rows] == [1, 0, 1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["acc"] == pytest.approx(2 / 3) and metrics["acc_norm"] == pytest.approx(1 / 3)
    assert metrics["acc_stderr"] == pytest.approx((1 / 3) ** 0.5 / 3 ** 0.5)  # sample std of (1, 0, 1) over sqrt 3
    assert metrics["chance"] == 0.5 and metrics["choices"] == 6 and metrics["num_fewshot"] == 0


def test_encode_pair_gives_a_merge_across_the_boundary_and_trailing_spaces_to_the_choice():
    tok = train_bpe(CORPUS, 400)
    context, ids = "The quick brown fox", tok.encode("The quick brown fox jumps")
    got_context, got_choice = encode_pair(tok, context + " ", "jumps")  # the space moves to the choice
    assert got_context == [tok.start_id] + tok.encode(context) and got_context + got_choice == [tok.start_id] + ids
    assert got_choice != tok.encode("jumps")  # " jumps" is not "jumps" in a byte-level BPE
    assert prompt_ids(tok, "Hel") != prompt_ids(tok, "Hello, world")[:len(prompt_ids(tok, "Hel"))]  # "Hello": 1 token
    cut = encode_pair(tok, "Hel", "lo, world")  # the whole text's tokens past the context's would be ", world"
    assert cut == (prompt_ids(tok, "Hel"), tok.encode("lo, world")) and tok.decode(cut[1]) == "lo, world"


def test_shots_are_solved_examples_drawn_with_a_seed_leaving_the_example_out():
    examples = [ChoiceExample(f"q{i}?", [f"a{i}", f"b{i}"], i % 2, f"f:{i}") for i in range(8)]
    task = ChoiceTask("f", num_fewshot=3)
    got = contexts(examples, task)
    for i, text in enumerate(got):
        *shots, last = text.split("\n\n")
        assert last == f"q{i}?" and len(shots) == 3 and len(set(shots)) == 3
        for shot in shots:
            j = int(shot[1:shot.index("?")])
            assert j != i and shot == f"q{j}? {'ab'[j % 2]}{j}"  # context, the delimiter, the right choice
    assert contexts(examples, task) == got and contexts(examples[:3], task, pool=examples) == got[:3]
    assert contexts(examples, ChoiceTask("f", num_fewshot=3, fewshot_seed=7)) != got
    assert contexts(examples, ChoiceTask("f")) == [e.context for e in examples]
    pool = [ChoiceExample("p?", ["yes", "no"], 1, "g:1")]
    assert contexts(examples[:2], ChoiceTask("f", num_fewshot=1, delimiter="", fewshot_delimiter="|"), pool) == [
        "p?no|q0?", "p?no|q1?"]
    with pytest.raises(ConfigError, match="--num-fewshot 8 needs 9 examples"):
        contexts(examples, ChoiceTask("f", num_fewshot=8))


def test_hellaswag_and_arc_shaped_records_read_with_field_names(tmp_path):
    hellaswag = write_jsonl(tmp_path / "hs.jsonl", [{"ctx": "A man", "endings": ["sits.", "runs.", "a", "b"],
                                                     "label": "2"}])
    arc = write_jsonl(tmp_path / "arc.jsonl", [
        {"question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "answerKey": "C"},
        {"question": "R?", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "1"}])
    (got,) = read_choice_examples(hellaswag, ChoiceTask("", "ctx", "endings", "label"))
    assert (got.context, got.choices, got.answer) == ("A man", ["sits.", "runs.", "a", "b"], 2)
    first, second = read_choice_examples(arc, ChoiceTask("", "question", "choices", "answerKey"))
    assert (first.choices, first.answer, second.answer) == (["x", "y", "z"], 2, 0)  # labels before digits
    by_text = write_jsonl(tmp_path / "t.jsonl", [{"context": "c", "choices": ["yes", "no"], "answer": "no"}])
    assert read_choice_examples(by_text, ChoiceTask(""))[0].answer == 1
    template = ChoiceTask("", choices_field="choices", answer_field="answerKey",
                          context_template="Question: {question}\nAnswer:")  # the harness's ARC prompt
    assert [e.context for e in read_choice_examples(arc, template)] == ["Question: Q?\nAnswer:",
                                                                         "Question: R?\nAnswer:"]
    with pytest.raises(DataError, match="arc.jsonl:1: no field 'topic'.*--context-template"):
        read_choice_examples(arc, ChoiceTask("", answer_field="answerKey", context_template="{topic}: {question}"))


BAD_RECORDS = [
    ({"choices": ["a", "b"], "answer": 0}, "no field 'context'.*--context-field"),
    ({"context": "c", "answer": 0}, "no field 'choices'.*--choices-field"),
    ({"context": "c", "choices": ["a", "b"]}, "no field 'answer'.*--answer-field"),
    ({"context": 3, "choices": ["a", "b"], "answer": 0}, "'context' is a int, not a string"),
    ({"context": "c", "choices": "ab", "answer": 0}, "list of two or more strings"),
    ({"context": "c", "choices": ["a"], "answer": 0}, "list of two or more strings"),
    ({"context": "c", "choices": ["a", 2], "answer": 0}, "list of two or more strings"),
    ({"context": "c", "choices": ["a", "b"], "answer": 2}, "'answer' is '2', not one of the 2 choices"),
    ({"context": "c", "choices": ["a", "b"], "answer": -1}, "not one of the 2 choices"),
    ({"context": "c", "choices": ["a", "b"], "answer": "c"}, "not one of the 2 choices"),
    ({"context": "c", "choices": ["a", "b"], "answer": True}, "not one of the 2 choices"),
    ({"context": "c", "choices": {"text": ["a", "b"], "label": ["A"]}, "answer": "A"}, "as many labels"),
]


@pytest.mark.parametrize("record, words", BAD_RECORDS)
def test_a_bad_record_is_one_line_naming_its_line(tmp_path, record, words):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"context": "ok", "choices": ["a", "b"], "answer": 0}, record])
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{words}"):
        read_choice_examples(path, ChoiceTask(""))


def test_bad_files_and_flags_are_one_line_with_exit_2_and_write_nothing(tmp_path, capsys):
    run = scripted_run(tmp_path, "x", start=1)
    good = write_jsonl(tmp_path / "good.jsonl", [{"context": "c", "choices": ["a", "b"], "answer": 0}])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "quiz.csv").write_text("context,choices,answer\nc,a,0\n")
    (tmp_path / "broken.jsonl").write_text('{"context": "c", "choices": ["a", "b"], "answer": 0}\n{"context": \n')
    (tmp_path / "empty-choice.jsonl").write_text('{"context": "c", "choices": ["", "b"], "answer": 0}\n')
    cases = [
        (["--choices", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--choices", str(tmp_path / "empty.jsonl")], "holds no records"),
        (["--choices", str(tmp_path / "quiz.csv")], "read from .jsonl or .parquet"),
        (["--choices", str(tmp_path / "broken.jsonl")], "broken.jsonl:2: not valid JSON"),
        (["--choices", str(tmp_path / "empty-choice.jsonl"), "--choice-delimiter", ""], "a choice is empty"),
        (["--choices", str(good), "--split", "test"], "--split cannot go with --choices"),
        (["--choices", str(good), "--temperature", "0.5", "--max-tokens", "9"],
         "--max-tokens, --temperature cannot go with --choices"),
        (["--choices", str(good), "--num-fewshot", "-1"], "--num-fewshot -1 is invalid"),
        (["--choices", str(good), "--num-fewshot", "1"], "--num-fewshot 1 needs 2 examples"),
        (["--choices", str(good), "--fewshot-file", str(tmp_path / "nope.jsonl")], "nope.jsonl does not exist"),
        (["--choices", str(good), "--context-template", "no fields"], "--context-template 'no fields' names no field"),
        (["--choices", str(good), "--context-template", "{a!r}"], "use plain record field names"),
    ]
    for flags, words in cases:
        assert main(["eval", str(run), *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, (flags, err)
    assert not (run / "eval").exists()


@pytest.mark.parametrize("kind", ["classifier", "encoder"])
def test_a_classifier_or_an_encoder_is_refused_with_the_reason(tmp_path, capsys, kind):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import ModelConfig, RunConfig
    from lmforge.model import GPT
    from lmforge.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.save(tmp_path / "tokenizer.json")
    extra = {"head": "classify", "num_labels": 2} if kind == "classifier" else {"causal": False}
    config = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16, **extra)
    save_checkpoint(tmp_path / "run", 1, GPT(config), None, RunConfig(model=config), {}, tmp_path / "tokenizer.json")
    quiz = write_jsonl(tmp_path / "q.jsonl", [{"context": "c", "choices": ["a", "b"], "answer": 0}])
    assert main(["eval", str(tmp_path / "run"), "--choices", str(quiz)]) == 2
    assert f"this checkpoint is {'a classifier' if kind == 'classifier' else 'an encoder'}" in capsys.readouterr().err


def test_a_choice_longer_than_the_block_is_refused(tmp_path, capsys):
    run = scripted_run(tmp_path, "x", start=1, block_size=16)
    quiz = write_jsonl(tmp_path / "q.jsonl", [{"context": "c", "choices": ["a" * 20, "b"], "answer": 0}])
    assert main(["eval", str(run), "--choices", str(quiz)]) == 2
    assert "a choice of 21 tokens is longer than the model's block_size (16)" in capsys.readouterr().err


QUIZ = [{"context": f"the cat sat on mat {i}", "choices": [",", " and", " the dog", "zq"], "answer": i % 4}
        for i in range(10)]


def test_training_logs_the_scores_eval_choices_gives_for_the_same_weights(tmp_path):
    """train.choices_file: at every second evaluation and at the end the run logs val_choices_acc and
    val_choices_acc_norm, and at the last step they are what `lmforge eval --choices` gives on its checkpoint."""
    from lmforge.train import Trainer
    from test_eval import TEXTS
    from tiny_training import tiny_config, write_prepared_data

    data = write_prepared_data(tmp_path / "data", TEXTS)
    quiz = write_jsonl(tmp_path / "quiz.jsonl", QUIZ)
    config = tiny_config(tmp_path / "run", **{"data.path": str(data), "model.block_size": 32, "train.max_steps": 12,
                                              "train.eval_interval": 3, "train.choices_file": str(quiz),
                                              "train.choices_every": 2, "train.best_metric": "val_choices_acc_norm"})
    Trainer(config, progress=False, tensorboard=False).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in records if "val_choices_acc" in r}
    assert sorted(scored) == [6, 12]  # every second evaluation (3, 6, 9, 12), and the last step
    assert main(["eval", str(tmp_path / "run"), "--choices", str(quiz), "--out", str(tmp_path / "e"),
                 "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert (scored[12]["val_choices_acc"], scored[12]["val_choices_acc_norm"]) == pytest.approx(
        (metrics["acc"], metrics["acc_norm"]))
    assert metrics["checkpoint"].endswith("step-00000012")


@pytest.mark.parametrize("overrides, words", [
    ({"train.choices_file": "missing.jsonl"}, "does not exist"),
    ({"train.choices_file": "long.jsonl"}, "long.jsonl:1: the choice 'xxxx"),
    ({"train.best_metric": "val_choices_acc"}, "measured on train.choices_file's questions"),
    ({"train.choices_file": "quiz.jsonl", "train.parallel": "fsdp"}, "train.parallel=fsdp shards them"),
])
def test_a_bad_choices_setting_fails_before_training(tmp_path, overrides, words):
    from lmforge.train import Trainer
    from test_eval import TEXTS
    from tiny_training import tiny_config, write_prepared_data

    data = write_prepared_data(tmp_path / "data", TEXTS)
    write_jsonl(tmp_path / "quiz.jsonl", QUIZ)
    write_jsonl(tmp_path / "long.jsonl", [{"context": "a", "choices": ["x" * 40, "y"], "answer": 0}])
    values = {k: str(tmp_path / v) if k == "train.choices_file" else v for k, v in overrides.items()}
    with pytest.raises((ConfigError, DataError), match=words):
        Trainer(tiny_config(tmp_path / "run", **{"data.path": str(data), **values}), progress=False, tensorboard=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.distributed
def test_two_processes_each_score_a_share_of_the_questions_and_log_what_one_process_logs(tmp_path):
    """Under torchrun each process scores every second question and the counts are summed: 2 processes log the
    val_choices_acc and val_choices_acc_norm of 1 process with the same global batch (an odd number of questions,
    so the shares differ)."""
    from distributed_jobs import read_history, torchrun_worker, worker
    from lmforge.tokenizer import byte_tokenizer

    byte_tokenizer().save(tmp_path / "tokenizer.json")
    quiz = write_jsonl(tmp_path / "quiz.jsonl", QUIZ[:7])
    overrides = {"train.choices_file": str(quiz), "model.vocab_size": 259, "tokenizer_file": str(tmp_path /
                                                                                                  "tokenizer.json")}
    worker(tmp_path / "one", 8, 1, False, "", json.dumps(overrides))
    torchrun_worker(tmp_path / "two", 4, 1, False, "", json.dumps(overrides))
    one, two = read_history(tmp_path / "one"), read_history(tmp_path / "two")
    assert two["world_size"] == 2 and set(one["choices"]) == {"val_choices_acc", "val_choices_acc_norm"}
    assert two["choices"] == pytest.approx(one["choices"], abs=1e-9)
    assert all(0 <= v <= 1 and round(v * 7, 6) == round(v * 7) for v in one["choices"].values())  # hits out of 7
