"""TextClassifier's answers and refusals (generate/classify.py): top_k bounds, every label past the label count, the
label names matching the head's classes, and each text's probabilities those of the model reading it alone."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.generate.classify import TextClassifier
from lmforge.model import GPT
from lmforge.tokenizer import byte_tokenizer

TOKENIZER = byte_tokenizer()
LABELS = ["neg", "neutral", "pos"]


def classifier(num_labels: int = 3) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16,
                           head="classify", num_labels=num_labels)).eval()


@pytest.mark.parametrize("top_k", [0, -1])
def test_a_top_k_below_one_is_refused(top_k):
    with pytest.raises(ConfigError, match=f"top_k={top_k} is invalid"):
        TextClassifier(classifier(), TOKENIZER, LABELS).classify(["good day"], top_k=top_k)


def test_a_top_k_past_the_label_count_gives_every_label_most_probable_first():
    clf = TextClassifier(classifier(), TOKENIZER, LABELS)
    texts = ["good day", "a rather long and awful afternoon"]
    probs = clf.probabilities(texts)
    for answer, row in zip(clf.classify(texts, top_k=10), probs):
        assert sorted(label for label, _ in answer) == sorted(LABELS)
        values = [p for _, p in answer]
        assert values == sorted(values, reverse=True) and sum(values) == pytest.approx(1.0, abs=1e-6)
        assert {label: p for label, p in answer} == {label: pytest.approx(float(p)) for label, p in zip(LABELS, row)}
    assert [len(a) for a in clf.classify(texts, top_k=2)] == [2, 2]


@pytest.mark.parametrize("names", [LABELS[:2], LABELS + ["extra"]])
def test_label_names_that_do_not_match_the_heads_classes_are_refused(names):
    with pytest.raises(ConfigError, match=f"{len(names)} label names for a classifier of 3 classes"):
        TextClassifier(classifier(), TOKENIZER, names)


def test_each_texts_probabilities_are_the_softmax_of_the_model_reading_it_alone():
    model = classifier()
    clf = TextClassifier(model, TOKENIZER, LABELS)
    texts = ["ok", "a much longer text than the first one", "mid size", "x" * 60 + "a tail past the context"]
    got = clf.probabilities(texts, batch_size=2)
    with torch.no_grad():
        for text, row in zip(texts, got):
            ids = [TOKENIZER.start_id, *TOKENIZER.encode(text)[:46], TOKENIZER.end_id]  # cut from the right
            torch.testing.assert_close(row, torch.softmax(model(torch.tensor([ids]))[0].float(), -1),
                                       atol=1e-5, rtol=1e-5)
