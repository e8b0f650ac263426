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


def test_completion_loss_counts_only_completion_tokens_and_is_batch_independent():
    """Sums -log p over the completion tokens (and end token) of each example, the prompt excluded, and divides by
    their number; reference: each example alone, unpadded, scored by hand."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    from lmforge.config import ModelConfig
    from lmforge.data.batches import Examples
    from lmforge.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    lengths, prompts = [6, 11, 4, 9], [3, 5, 2, 1]
    tokens = np.random.default_rng(0).integers(3, 32, sum(lengths))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    examples = Examples(tokens, offsets, np.array(prompts))
    loss_sum, counted = 0.0, 0
    with torch.no_grad():
        for (a, b), p in zip(zip(offsets[:-1], offsets[1:]), prompts):
            ids = torch.from_numpy(tokens[a:b])
            logits = model(ids[None, :-1])[0]  # (L-1, V): position j predicts ids[j + 1]
            loss_sum += float(F.cross_entropy(logits[p - 1:], ids[p:], reduction="sum"))
            counted += len(ids) - p
    for batch_size in (1, 3):
        got = completion_loss(model, examples, batch_size=batch_size)
        assert got["tokens"] == counted == sum(lengths) - sum(prompts)
        assert got["loss_sum"] == pytest.approx(loss_sum, rel=1e-5)
        assert got["loss"] == pytest.approx(loss_sum / counted, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(loss_sum / counted), rel=1e-5)


def test_classifier_evaluation_reports_the_mean_loss_and_the_predicted_and_gold_probabilities():
    """evaluate_classify on an untrained classifier (so some predictions are wrong): loss is the mean cross-entropy
    over the examples, each row's probability is that of the predicted class and reference_probability that of
    the gold class; reference: each example alone, unpadded."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lmforge.config import ModelConfig
    from lmforge.data.batches import Examples
    from lmforge.eval.tasks import evaluate_classify
    from lmforge.model import GPT
    from lmforge.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, head="classify",
                            num_labels=3)).eval()
    lengths, gold = [3, 9, 5, 2, 7, 4], [0, 2, 1, 2, 0, 1]
    tokens = np.random.default_rng(1).integers(3, 32, sum(lengths))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    examples = Examples(tokens, offsets, None, np.array(gold))
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(tokens[a:b])[None]) for a, b in zip(offsets[:-1], offsets[1:])])
    probs = torch.softmax(logits.float(), -1)
    predicted = probs.argmax(-1).tolist()
    assert predicted != gold  # the check below needs wrong predictions
    metrics, rows = evaluate_classify(model, byte_tokenizer(), examples, ["a", "b", "c"], pad_id=2, batch_size=4)
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits.float(), torch.tensor(gold))), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(np.mean(np.array(predicted) == np.array(gold)))
    assert [r["prediction"] for r in rows] == [["a", "b", "c"][q] for q in predicted]
    assert [r["correct"] for r in rows] == [q == g for q, g in zip(predicted, gold)]
    for i, (row, q, g) in enumerate(zip(rows, predicted, gold)):
        assert row["probability"] == pytest.approx(float(probs[i, q]), abs=1e-5)
        assert row["reference_probability"] == pytest.approx(float(probs[i, g]), abs=1e-5)


def test_split_prompts_cuts_at_the_prompt_length_and_drops_only_a_final_end_token():
    """References are the completions without their end token (so the decoding budget is the longest reference + 1
    for the end token); an example cut before its end token keeps its whole completion."""
    import numpy as np

    from lmforge.data.batches import Examples

    start, end = 0, 1
    rows = [[start, 5, 6, 7, 8, end], [start, 9, 4, end, 4], [start, 3, end]]
    examples = Examples(np.array(sum(rows, [])), np.cumsum([0] + [len(r) for r in rows]), np.array([3, 2, 2]))
    prompts, references = split_prompts(examples, end)
    assert prompts == [[start, 5, 6], [start, 9], [start, 3]]
    assert references == [[7, 8], [4, end, 4], []]
