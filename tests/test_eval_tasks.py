"""Evaluating a fine-tuned text-to-text model: completion loss, decoded predictions, metrics, files."""

import json

import pytest

from lmforge.cli import main
from lmforge.data.tasks import load_examples
from lmforge.eval.metrics import text_metrics
from lmforge.eval.tasks import completion_loss, split_prompts
from lmforge.generate import GenerateConfig, generate_batch_ids, load
from lmforge.train import Trainer
from test_tasks import FINE_TUNE, make_base, prepare, reverse_records, write_jsonl
from tiny_training import tiny_config


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(run dir, task data dir) of a tiny base fine-tuned on the word-reversal task."""
    root = tmp_path_factory.mktemp("tuned")
    base = make_base(root)
    assert prepare(base, root / "sft", write_jsonl(root / "r.jsonl", reverse_records(200))) == 0  # "{prompt}\n"
    values = {**FINE_TUNE, "data.path": str(root / "sft"), "train.init_from": str(base)}
    Trainer(tiny_config(root / "run", **values), progress=False, tensorboard=False).fit()
    return root / "run", root / "sft"


def test_eval_of_a_fine_tuned_model_writes_its_predictions_and_their_metrics(tuned, capsys):
    run, data = tuned
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "val", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    out = run / "eval" / "val"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert printed == saved and saved["examples"] == len(rows) == len(load_examples(data, "val"))
    # the predictions are the greedy continuations of the stored prompts, the references their completions
    gen = load(str(run))
    examples = load_examples(data, "val")
    prompts, references = split_prompts(examples, gen.tokenizer.end_id)
    budget = max(len(r) for r in references) + 1
    greedy = generate_batch_ids(gen.model, prompts, GenerateConfig(temperature=0.0, max_new_tokens=budget),
                                gen.tokenizer.end_id, gen.tokenizer)
    assert [r["prediction"] for r in rows] == [gen.tokenizer.decode(g[0]) for g in greedy]
    assert [r["reference"] for r in rows] == [gen.tokenizer.decode(r) for r in references]
    assert all(r["input"][:-1][::-1] == r["reference"] for r in rows)  # "abc\n" (the template) -> "cba"
    # the metrics are those of the predictions in the file, the loss that of the completions
    expected = text_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows])
    assert {k: saved[k] for k in expected} == pytest.approx(expected)
    assert saved["completion_loss"] == pytest.approx(completion_loss(gen.model, examples)["loss"], rel=1e-6)
    assert saved["exact_match"] == pytest.approx(sum(r["exact_match"] for r in rows) / len(rows))


def test_eval_options_reach_the_decoder_and_the_output_directory(tuned, tmp_path, capsys):
    run, _ = tuned
    assert main(["eval", str(run), "--split", "test", "--max-examples", "3", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "report"), "--device", "cpu"]) == 0
    rows = (tmp_path / "report" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text(encoding="utf-8"))
    assert len(rows) == 3 and saved["generation"]["max_new_tokens"] == 2 and saved["generation"]["temperature"] == 0
    assert all(len(json.loads(r)["prediction"]) <= 2 for r in rows)  # byte tokens: at most 2 characters
    assert main(["eval", str(run), "--max-examples", "0"]) == 2


def test_generate_and_serve_apply_the_template_the_model_learned_with(tuned, capsys):
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app

    run, _ = tuned
    gen = load(str(run))
    assert gen.template["prompt"] == "{prompt}\n" and gen.render("abc") == "abc\n"
    raw = load(str(run), template=False)
    assert raw.template is None and raw.render("abc") == "abc"
    expected = raw.generate("abc\n", max_new_tokens=6, temperature=0.0)
    assert gen.generate("abc", max_new_tokens=6, temperature=0.0) == expected
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "abc", "--max-new-tokens", "6", "--temperature", "0",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "abc" + expected + "\n"
    assert main(["generate", str(run), "--prompt", "abc", "--max-new-tokens", "6", "--temperature", "0",
                 "--no-template", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "abc" + raw.generate("abc", max_new_tokens=6, temperature=0.0) + "\n"
    with TestClient(create_app(gen), base_url="http://127.0.0.1") as client:  # a Host the server answers
        body = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 6, "temperature": 0}).json()
    assert body["choices"][0]["text"] == expected
    gen.template = {**gen.template, "prompt": "{context}\n{prompt}\n", "fields": ["context", "prompt"]}
    with pytest.raises(Exception, match="needs the field"):
        gen.render("abc")
    assert gen.render("abc", context="x") == "x\nabc\n"


def test_eval_decodes_speculatively_to_the_same_predictions(tuned, tmp_path, capsys, monkeypatch):
    from lmforge.generate.speculative import DraftModel, PromptLookup

    run, _ = tuned
    calls = {DraftModel: 0, PromptLookup: 0}
    for cls in calls:  # count the drafters' real guesses: the options reached the decoder
        def counted(self, *a, _real=cls.propose, _cls=cls, **k):
            calls[_cls] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(cls, "propose", counted)

    def predictions(*extra: str) -> list[str]:
        out = tmp_path / "-".join(extra).replace("/", "_").strip("-") or "plain"
        assert main(["eval", str(run), "--max-examples", "8", "--out", str(out), "--device", "cpu", *extra]) == 0
        return [json.loads(r)["prediction"] for r in (out / "predictions.jsonl").read_text().splitlines()]

    plain = predictions()
    assert predictions("--prompt-lookup-num-tokens", "4") == plain
    assert predictions("--assistant-model", str(run), "--num-assistant-tokens", "3") == plain  # itself as the draft
    assert calls[DraftModel] > 0 and calls[PromptLookup] > 0
    capsys.readouterr()
    assert main(["eval", str(run), "--num-assistant-tokens", "3", "--device", "cpu"]) == 2  # no assistant to use it
    assert "--assistant-model" in capsys.readouterr().err
