"""Task metrics: BLEU/chrF/ROUGE equal their libraries' own results, EM/F1 follow SQuAD, classification metrics
equal scikit-learn's, and the files they write are whole and read back equal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from lmforge.errors import DataError
from lmforge.eval.metrics import (classification_metrics, confusion_figure, example_scores, exact_match,
                                  normalize_answer, plot_confusion_matrix, text_metrics, token_f1, write_metrics,
                                  write_predictions)

# Different lengths (so the brevity penalty differs between the two directions), inflections (so stemming
# changes ROUGE), punctuation and articles (so SQuAD normalisation matters).
PREDICTIONS = [
    "The cat is running across the garden.",
    "A quick brown fox jumps over the dogs",
    "Paris",
    "he walked slowly to the old station in the rain",
    "the results were published yesterday",
]
REFERENCES = [
    "The cat runs across a garden!",
    "The quick brown fox jumped over the lazy dog.",
    "paris.",
    "He walks to the station in heavy rain.",
    "Results published on Monday were surprising.",
]


# --------------------------------------------------------------------------------------- text to text
def test_bleu_and_chrf_equal_sacrebleus_corpus_scores():
    got = text_metrics(PREDICTIONS, REFERENCES)
    bleu = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES])
    chrf = sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES])
    assert 5 < bleu.score < 95 and 5 < chrf.score < 95  # the text is neither a perfect nor a null match
    assert got["bleu"] == pytest.approx(bleu.score, abs=1e-9)
    assert got["chrf"] == pytest.approx(chrf.score, abs=1e-9)
    assert got["bleu"] != pytest.approx(sacrebleu.corpus_bleu(REFERENCES, [PREDICTIONS]).score)  # the order matters
    assert got["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert got["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    assert got["examples"] == len(PREDICTIONS)


def test_rouge_equals_rouge_scores_stemmed_f_measure_averaged_over_examples():
    got = text_metrics(PREDICTIONS, REFERENCES)
    for stemmed in (True, False):
        scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stemmed)
        scores = [scorer.score(ref, pred) for pred, ref in zip(PREDICTIONS, REFERENCES)]
        means = {t: float(np.mean([s[t].fmeasure for s in scores])) for t in ("rouge1", "rouge2", "rougeL")}
        for t, mean in means.items():
            if stemmed:
                assert got[t] == pytest.approx(mean, abs=1e-12), t
            elif t == "rouge1":
                assert got[t] > mean + 0.02  # runs/running, walked/walks, jumps/jumped match only when stemmed
    assert got["rouge1"] > got["rouge2"] > 0


# (prediction, reference, EM, F1) worked out by hand from the SQuAD v1.1 definitions.
SQUAD_CASES = [
    ("The Cat!", "cat", 1.0, 1.0),                          # casing, punctuation, an article
    ("an apple a day", "Apple, day.", 1.0, 1.0),            # both -> "apple day"
    ("another anthem", "other them", 0.0, 0.0),             # articles go only as whole words: nothing shared
    ("don't stop", "dont stop", 1.0, 1.0),                  # punctuation is deleted, not replaced by a space
    # "quick brown fox jumps" vs "quick red fox": shared {quick, fox} = 2; P = 2/4, R = 2/3,
    # F1 = 2 * (1/2) * (2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    ("the quick brown fox jumps", "A quick red fox.", 0.0, 4 / 7),
    # "cat cat cat" vs "cat cat dog": shared as a multiset min(3, 2) = 2; P = 2/3, R = 2/3, F1 = 2/3
    ("the cat cat cat", "cat cat dog", 0.0, 2 / 3),
    ("The", "a!", 1.0, 1.0),                                # both normalise to nothing: F1 = EM
    ("the", "cat", 0.0, 0.0),                               # only the prediction is empty
    ("Paris", "London", 0.0, 0.0),
]


@pytest.mark.parametrize("prediction,reference,em,f1", SQUAD_CASES)
def test_exact_match_and_token_f1_follow_squad(prediction, reference, em, f1):
    assert exact_match(prediction, reference) == em
    assert token_f1(prediction, reference) == pytest.approx(f1, abs=1e-12)
    assert token_f1(reference, prediction) == pytest.approx(f1, abs=1e-12)  # F1 is symmetric


def test_normalize_answer_lowercases_strips_punctuation_and_articles_and_collapses_space():
    assert normalize_answer("  The  Eiffel-Tower,\tin   an   A.D. era!  ") == "eiffeltower in ad era"


def test_text_metrics_average_em_and_f1_over_examples():
    predictions, references, ems, f1s = zip(*SQUAD_CASES)
    got = text_metrics(list(predictions), list(references))
    assert got["exact_match"] == pytest.approx(sum(ems) / len(ems), abs=1e-12)
    assert got["f1"] == pytest.approx(sum(f1s) / len(f1s), abs=1e-12)


def test_example_scores_are_sacrebleus_sentence_scores_and_squads():
    for prediction, reference in zip(PREDICTIONS, REFERENCES):
        got = example_scores(prediction, reference)
        assert got["bleu"] == pytest.approx(sacrebleu.sentence_bleu(prediction, [reference]).score, abs=1e-9)
        assert got["chrf"] == pytest.approx(sacrebleu.sentence_chrf(prediction, [reference]).score, abs=1e-9)
        assert (got["exact_match"], got["f1"]) == (exact_match(prediction, reference), token_f1(prediction, reference))
    assert example_scores("The cat sat.", "The cat sat.") == pytest.approx({"bleu": 100, "chrf": 100, "exact_match": 1, "f1": 1})
    # A 3-word sentence has no 4-grams: with effective order BLEU uses orders 1-3 only, all precisions 1, so
    # BLEU = brevity penalty = exp(1 - 4/3) = 71.65 (corpus BLEU, with all four orders, would be 0).
    assert example_scores("the cat sat", "the cat sat on")["bleu"] == pytest.approx(100 * np.exp(1 - 4 / 3), abs=1e-9)
    paris = example_scores("Paris", "paris.")  # case and punctuation count for BLEU/chrF, not for EM/F1
    assert paris["bleu"] == 0.0 and 0 < paris["chrf"] < 100 and (paris["exact_match"], paris["f1"]) == (1.0, 1.0)


@pytest.mark.parametrize("predictions,references,message", [
    (["a", "b"], ["a"], r"^2 predictions for 1 references: give exactly one prediction per reference$"),
    ([], [], r"^no examples to score: the predictions and references are empty"),
])
def test_text_metrics_refuse_mismatched_or_empty_input(predictions, references, message):
    with pytest.raises(DataError, match=message):
        text_metrics(predictions, references)


# ------------------------------------------------------------------------------------- classification
LABELS = ["negative", "neutral", "positive", "sarcastic", "mixed", "spam"]


def fixed_classification_case():
    """60 examples: class 3 absent from gold and predictions, 4 only in gold (never predicted), 5 only predicted."""
    rng = np.random.default_rng(1234)
    gold = rng.choice([0, 1, 2, 4], size=60)
    guess = rng.choice([0, 1, 2, 5], size=60)
    predicted = np.where((rng.random(60) < 0.6) & (gold != 4), gold, guess)
    assert 3 not in gold and 3 not in predicted and 4 not in predicted and 5 not in gold
    return predicted.tolist(), gold.tolist()


def test_classification_metrics_equal_scikit_learns():
    sk = pytest.importorskip("sklearn.metrics")
    predicted, gold = fixed_classification_case()
    ids = list(range(len(LABELS)))
    got = classification_metrics(predicted, gold, LABELS)
    assert got["examples"] == 60 and got["labels"] == LABELS
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(gold, predicted), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(sk.f1_score(gold, predicted, labels=ids, average="macro", zero_division=0),
                                            abs=1e-12)
    precision, recall, f1, support = sk.precision_recall_fscore_support(gold, predicted, labels=ids, zero_division=0)
    assert list(got["per_class"]) == LABELS
    for k, label in enumerate(LABELS):
        row = got["per_class"][label]
        assert row["precision"] == pytest.approx(precision[k], abs=1e-12), label
        assert row["recall"] == pytest.approx(recall[k], abs=1e-12), label
        assert row["f1"] == pytest.approx(f1[k], abs=1e-12), label
        assert row["support"] == support[k], label
    assert got["confusion_matrix"] == sk.confusion_matrix(gold, predicted, labels=ids).tolist()  # rows gold
    assert got["per_class"]["sarcastic"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert 0 < got["macro_f1"] < np.mean([got["per_class"][x]["f1"] for x in ("negative", "neutral", "positive")])


def test_classification_metrics_by_hand():
    # gold  0 0 1 1 2;  predicted 0 1 1 1 0  ->  rows gold, columns predicted
    got = classification_metrics([0, 1, 1, 1, 0], [0, 0, 1, 1, 2], ["a", "b", "c"])
    assert got["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert got["accuracy"] == pytest.approx(3 / 5)
    # a: P 1/2 R 1/2 F1 1/2;  b: P 2/3 R 1 F1 4/5;  c: never predicted, P 0 R 0 F1 0
    assert [got["per_class"][x]["f1"] for x in "abc"] == pytest.approx([1 / 2, 4 / 5, 0.0])
    assert got["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)
    assert [got["per_class"][x]["support"] for x in "abc"] == [2, 2, 1]


@pytest.mark.parametrize("predicted,gold,labels,message", [
    ([0, 1], [0], ["a", "b"], r"^2 predicted labels for 1 gold labels: give exactly one prediction per example$"),
    ([], [], ["a", "b"], r"^no examples to score: the predicted and gold labels are empty"),
    ([0, 2], [0, 1], ["a", "b"], r"^predicted label id 2 is out of range for 2 labels \(0\.\.1\); pass the label set"),
    ([0, 1], [-1, 1], ["a", "b"], r"^gold label id -1 is out of range for 2 labels \(0\.\.1\)"),
    ([0.0, 1.0], [0, 1], ["a", "b"], r"^predicted label ids must be integers, got float64"),
    ([0], [0], [], r"^the label set is empty"),
    ([0], [0], ["a", "b", "a"], r"^label 'a' appears 2 times in the label set: names must be unique$"),
])
def test_classification_metrics_refuse_bad_input(predicted, gold, labels, message):
    with pytest.raises(DataError, match=message):
        classification_metrics(predicted, gold, labels)


# ------------------------------------------------------------------------------------------------ files
def test_confusion_figure_shows_counts_labels_and_title():
    matrix = [[5, 1, 0], [2, 7, 0], [0, 3, 12]]
    fig = confusion_figure(matrix, ["cat", "dog", "bird"], title="test split")
    (ax, _colorbar) = fig.axes
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}  # (row, col)
    assert cells == {(g, p): str(matrix[g][p]) for g in range(3) for p in range(3)}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "bird"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "bird"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("predicted", "gold", "test split")
    assert np.array_equal(ax.images[0].get_array(), np.array(matrix))  # row g is gold class g
    with pytest.raises(DataError, match=r"shape \(3, 3\) for 2 labels"):
        confusion_figure(matrix, ["cat", "dog"])


def test_plot_confusion_matrix_writes_a_png_and_no_temporary(tmp_path):
    predicted, gold = fixed_classification_case()
    metrics = classification_metrics(predicted, gold, LABELS)
    out = plot_confusion_matrix(metrics["confusion_matrix"], LABELS, tmp_path / "eval" / "confusion.png")
    assert out == tmp_path / "eval" / "confusion.png"
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    from matplotlib.image import imread

    height, width, _ = imread(out).shape
    assert height > 300 and width > 300
    assert [p.name for p in out.parent.iterdir()] == ["confusion.png"]


def test_predictions_and_metrics_files_read_back_equal(tmp_path):
    rows = [{"input": f"translate: chat {i}", "reference": REFERENCES[i], "prediction": PREDICTIONS[i],
             "score": example_scores(PREDICTIONS[i], REFERENCES[i])} for i in range(len(PREDICTIONS))]
    rows.append({"input": "naïve café — 東京", "reference": "x", "prediction": "", "score": {"f1": 0.0}})
    path = write_predictions(tmp_path / "predictions.jsonl", iter(rows))
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows  # one object per line, in order
    assert "東京" in lines[-1]  # written as text, not escaped
    metrics = {"text": text_metrics(PREDICTIONS, REFERENCES),
               "classification": classification_metrics(*fixed_classification_case(), LABELS)}
    path = write_metrics(tmp_path / "metrics.json", metrics)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == metrics and text.startswith('{\n  "text": {\n    "examples": 5,')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "predictions.jsonl"]
