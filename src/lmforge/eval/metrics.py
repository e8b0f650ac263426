"""Task metrics of a fine-tuned model, as pure functions over predictions and references, and their files.

Text to text (`text_metrics`, per example `example_scores`):

    bleu, chrf        corpus BLEU and chrF of sacrebleu with its defaults (13a tokenizer, mixed case,
                      exp smoothing; chrF: character 6-grams, beta 2), on sacrebleu's 0-100 scale, with
                      sacrebleu's signature so a number can be reproduced. Per example: sentence BLEU with
                      effective order (sacrebleu's advice for single sentences) and sentence chrF.
    rouge1/2/L        F-measure of rouge-score's RougeScorer with the Porter stemmer on (as commonly
                      reported), averaged over examples, 0-1. rougeL is the plain longest common
                      subsequence over the whole text (not rougeLsum's per-sentence variant). rouge-score's
                      tokenizer keeps only ASCII letters and digits: text in other scripts scores 0.
    exact_match, f1   the SQuAD v1.1 definitions (Rajpurkar et al. 2016, the official evaluation script),
                      averaged over examples, 0-1: both texts are normalised (lowercase, drop punctuation,
                      drop the articles a/an/the, collapse whitespace); EM is 1 when they are equal, F1 is
                      the harmonic mean of the precision and recall of the shared tokens (a multiset).
                      When both normalise to nothing F1 is 1, like EM (the SQuAD v2.0 script's rule; v1.1
                      gave 0 there, making F1 < EM).

Classification (`classification_metrics`): accuracy, macro-F1 and per-class precision / recall / F1 /
support over the label set, and the confusion matrix (rows gold, columns predicted). A ratio with a zero
denominator is 0 (scikit-learn's zero_division=0): a class never predicted has precision 0, a class
absent from both gold and predictions has F1 0 and still counts in the macro average.

Files: `write_predictions` (predictions.jsonl), `write_metrics` (metrics.json) and `plot_confusion_matrix`
(a PNG of `confusion_figure`) write atomically through lmforge.files.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lmforge.errors import DataError
from lmforge.files import atomic_file, atomic_path

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


# --------------------------------------------------------------------------------------- text to text
def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions for {len(references)} references: "
                        f"give exactly one prediction per reference")
    if not predictions:
        raise DataError("no examples to score: the predictions and references are empty; evaluate a non-empty split")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts are equal after normalize_answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 in [0, 1]: harmonic mean of the precision and recall of the normalised tokens both share.

    Shared tokens count as a multiset (a token twice in each text is shared twice). Both empty after
    normalisation: 1.0; exactly one empty: 0.0.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus metrics of `predictions` against one reference each (see the module docstring for scales).

    Returns {'examples', 'bleu', 'chrf', 'rouge1', 'rouge2', 'rougeL', 'exact_match', 'f1',
    'bleu_signature', 'chrf_signature'}. Raises DataError on different lengths or no examples.
    """
    from rouge_score.rouge_scorer import RougeScorer  # imports nltk: about a second, paid only when scoring
    from sacrebleu.metrics import BLEU, CHRF

    _check_pairs(predictions, references)
    predictions, references = list(predictions), list(references)
    bleu, chrf = BLEU(), CHRF()
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rouge = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]  # score(target, prediction)
    n = len(predictions)
    return {
        "examples": n,
        "bleu": bleu.corpus_score(predictions, [references]).score,
        "chrf": chrf.corpus_score(predictions, [references]).score,
        **{t: sum(r[t].fmeasure for r in rouge) / n for t in ROUGE_TYPES},
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "f1": sum(map(token_f1, predictions, references)) / n,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def example_scores(prediction: str, reference: str) -> dict[str, float]:
    """One example's scores for predictions.jsonl: {'bleu', 'chrf' (sentence level, 0-100), 'exact_match', 'f1' (0-1)}."""
    from sacrebleu.metrics import BLEU, CHRF

    return {
        "bleu": BLEU(effective_order=True).sentence_score(prediction, [reference]).score,
        "chrf": CHRF().sentence_score(prediction, [reference]).score,
        "exact_match": exact_match(prediction, reference),
        "f1": token_f1(prediction, reference),
    }


# ------------------------------------------------------------------------------------- classification
def _label_ids(ids: Iterable[int], num_labels: int, what: str) -> np.ndarray:
    ids = np.asarray(list(ids))
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{what} label ids must be integers, got {ids.dtype} values such as {ids.flat[0]!r}")
    bad = ids[(ids < 0) | (ids >= num_labels)]
    if bad.size:
        raise DataError(f"{what} label id {int(bad[0])} is out of range for {num_labels} labels (0..{num_labels - 1}); "
                        f"pass the label set the model was trained with")
    return ids.astype(np.int64)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator elementwise, 0 where the denominator is 0 (zero_division=0)."""
    out = np.zeros(len(numerator), dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def confusion_matrix(predicted: Sequence[int], gold: Sequence[int], num_labels: int) -> np.ndarray:
    """(K, K) int64 counts, K = num_labels: entry [g, p] is the number of examples of gold class g predicted as p."""
    pred = _label_ids(predicted, num_labels, "predicted")
    true = _label_ids(gold, num_labels, "gold")
    return np.bincount(true * num_labels + pred, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def classification_metrics(predicted: Sequence[int], gold: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Metrics of predicted against gold label ids (each in 0..len(labels)-1); `labels` names the ids in order.

    Returns {'examples', 'accuracy', 'macro_f1', 'labels', 'per_class': {label: {'precision', 'recall', 'f1',
    'support' (gold count)}}, 'confusion_matrix' (K lists of K ints, rows gold, columns predicted)}.
    Raises DataError on different lengths, no examples, no or repeated labels, or an id out of range.
    """
    labels = [str(label) for label in labels]
    if not labels:
        raise DataError("the label set is empty: pass the names of the model's classes")
    repeated = [label for label, count in Counter(labels).items() if count > 1]
    if repeated:
        raise DataError(f"label {repeated[0]!r} appears {labels.count(repeated[0])} times in the label set: "
                        f"names must be unique")
    if len(predicted) != len(gold):
        raise DataError(f"{len(predicted)} predicted labels for {len(gold)} gold labels: "
                        f"give exactly one prediction per example")
    if len(gold) == 0:
        raise DataError("no examples to score: the predicted and gold labels are empty; evaluate a non-empty split")
    return confusion_metrics(confusion_matrix(predicted, gold, len(labels)), labels)


def confusion_metrics(matrix: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """classification_metrics' dict from a (K, K) confusion matrix (rows gold, columns predicted, at least one
    example), for callers that sum counts themselves (the trainer, over processes)."""
    labels = [str(label) for label in labels]
    matrix = np.asarray(matrix, dtype=np.int64)  # (K, K)
    tp = np.diag(matrix)                                      # (K,)
    support, predicted_count = matrix.sum(axis=1), matrix.sum(axis=0)  # gold and predicted counts per class, (K,)
    precision, recall = _ratio(tp, predicted_count), _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted_count)  # 2PR/(P+R) = 2TP/(2TP+FP+FN), defined whenever TP > 0
    return {
        "examples": int(matrix.sum()),
        "accuracy": float(tp.sum() / matrix.sum()),
        "macro_f1": float(f1.mean()),
        "labels": labels,
        "per_class": {label: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                              "support": int(support[k])} for k, label in enumerate(labels)},
        "confusion_matrix": matrix.tolist(),
    }


def confusion_figure(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str = "Confusion matrix"):
    """A matplotlib Figure of `matrix` (K x K counts, rows gold, columns predicted): cells shaded by count with
    the count written in each (up to 40 classes), label names on both axes, and `title`."""
    from matplotlib.figure import Figure  # a bare Figure renders to files without touching pyplot's global state

    counts = np.asarray(matrix)
    k = len(labels)
    if k == 0 or counts.shape != (k, k):
        raise DataError(f"a confusion matrix of shape {counts.shape} for {k} labels: it must be K x K for K >= 1 labels")
    size = min(4 + 0.6 * k, 30)  # inches: room for K cells and their labels, bounded for large label sets
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    slanted = any(len(str(label)) > 3 for label in labels)  # long names overlap when written level
    ax.set_xticks(range(k), labels=list(labels), rotation=45 if slanted else 0, ha="right" if slanted else "center")
    ax.set_yticks(range(k), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    if k <= 40:  # beyond that the numbers no longer fit in the cells
        threshold = counts.max() / 2
        for g in range(k):
            for p in range(k):
                ax.text(p, g, str(int(counts[g, p])), ha="center", va="center", fontsize=9,
                        color="white" if counts[g, p] > threshold else "black")  # legible on dark cells
    return fig


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    """Write confusion_figure(matrix, labels, title) to `path` as a PNG, atomically; return the path."""
    fig = confusion_figure(matrix, labels, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # the temporary name has no .png: say the format
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


# ------------------------------------------------------------------------------------------------ files
def write_predictions(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write `rows` to `path` as JSON lines, one object per example in order (UTF-8, not escaped), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> Path:
    """Write `metrics` to `path` as JSON (indent 2, UTF-8, not escaped), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        f.write(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return path
