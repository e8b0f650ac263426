"""Evaluation of a fine-tuned model on a split of its task data: text to text (sft) or classification.

Text to text:

    loss, perplexity   over the completion tokens (and end tokens) of every example, prompts excluded
                       (the training objective), whole split, deterministic
    predictions        each example's prompt (as the model saw it in training: template applied, <START>
                       first) decoded by the one decoding core, greedy by default (GenerateConfig options),
                       until the end token or the budget (default: the split's longest reference + 1)
    metrics            BLEU, chrF, ROUGE-1/2/L, exact match and token F1 of the predictions against the
                       references (eval.metrics), and per example in predictions.jsonl

Classification: the model's class probabilities for every example (as the classifier was trained: [start]
text [end], right-padded with an attention mask), the mean cross-entropy, accuracy, macro-F1, per-class
precision/recall/F1 and the confusion matrix (eval.metrics.classification_metrics), also drawn as OUT/confusion.png.

Preference pairs (DPO): DPO's loss, reward accuracy and margin against the run's reference model (eval/preference.py).

Writes OUT/predictions.jsonl (input, reference, prediction, scores per example) and OUT/metrics.json.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from lmforge.data.batches import IGNORE_INDEX, Examples, pad_examples
from lmforge.errors import ConfigError, DataError
from lmforge.eval.progress import progress_bar
from lmforge.generate import GenerateConfig, generate_batch_ids, load_assistant


@torch.no_grad()
def completion_loss(model: nn.Module, examples: Examples, batch_size: int = 16,
                    device: torch.device | str = "cpu", progress: bool = False) -> dict[str, float]:
    """Summed and mean loss of `model` on the completion tokens of every example: {'loss_sum', 'tokens',
    'loss', 'perplexity'} (what sft training minimises, over the whole split)."""
    loss_sum, counted = 0.0, 0
    with progress_bar(len(examples), "completion loss", "ex", progress) as bar:
        for start in range(0, len(examples), batch_size):
            x, y = pad_examples(examples, np.arange(start, min(start + batch_size, len(examples))))
            y = y.to(device)  # the head fused with the loss (GPT.forward's targets): no (B, T, V) logits
            loss_sum += float(model(x.to(device), targets=y, loss_chunk=1024))
            counted += int((y != IGNORE_INDEX).sum())
            bar.update(len(x))
    mean = loss_sum / max(counted, 1)
    return {"loss_sum": loss_sum, "tokens": counted, "loss": mean, "perplexity": math.exp(min(mean, 700.0))}


def split_prompts(examples: Examples, end_id: Optional[int]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, reference completion ids without the end token) of every example."""
    prompts, references = [], []
    for i in range(len(examples)):
        a, b, p = int(examples.offsets[i]), int(examples.offsets[i + 1]), int(examples.prompt_lengths[i])
        ids = np.asarray(examples.tokens[a:b]).tolist()
        completion = ids[p:]
        if completion and completion[-1] == end_id:
            completion = completion[:-1]
        prompts.append(ids[:p])
        references.append(completion)
    return prompts, references


def predict(model: nn.Module, tokenizer: Any, prompts: list[list[int]], config: GenerateConfig,
            batch_size: int = 16, progress: bool = False, assistant_model: Optional[nn.Module] = None) -> list[list[int]]:
    """The first continuation of each prompt (token ids, end token excluded), decoded in batches (speculatively
    with an assistant model or config.prompt_lookup_num_tokens: the same tokens when greedy)."""
    out: list[list[int]] = []
    with progress_bar(len(prompts), "generate", "ex", progress) as bar:
        for start in range(0, len(prompts), batch_size):
            rows = generate_batch_ids(model, prompts[start:start + batch_size], config, tokenizer.end_id, tokenizer,
                                      assistant_model)
            out += [sequences[0] for sequences in rows]
            bar.update(len(rows))
    return out


def evaluate_sft(model: nn.Module, tokenizer: Any, examples: Examples, *, generate: Optional[GenerateConfig] = None,
                 batch_size: int = 16, device: torch.device | str = "cpu", progress: bool = False,
                 assistant_model: Optional[nn.Module] = None) -> tuple[dict[str, Any], list[dict]]:
    """(metrics, prediction rows) of a text-to-text model on `examples`; see the module docstring."""
    from lmforge.eval.metrics import example_scores, text_metrics

    if len(examples) == 0:
        raise DataError("the split holds no examples to evaluate")
    if generate is not None and generate.token_healing:
        raise ConfigError("generate.token_healing is for prompts cut inside a word, and an evaluation's prompts end "
                          "where its training examples' prompts ended: leave token_healing off")
    prompts, references = split_prompts(examples, tokenizer.end_id)
    budget = max(len(r) for r in references) + 1  # room for the longest reference and its end token
    if generate is None:
        generate = GenerateConfig(temperature=0.0, max_new_tokens=budget)
    elif generate.max_new_tokens is None and generate.max_length is None:
        generate = replace(generate, max_new_tokens=budget)
    predicted = predict(model, tokenizer, prompts, generate, batch_size, progress, assistant_model)
    prediction_texts = [tokenizer.decode(ids) for ids in predicted]
    reference_texts = [tokenizer.decode(ids) for ids in references]
    metrics = {**text_metrics(prediction_texts, reference_texts), **{
        f"completion_{k}": v for k, v in completion_loss(model, examples, batch_size, device, progress).items()}}
    metrics["generation"] = {k: v for k, v in vars(generate).items() if v is not None}
    rows = [{"input": tokenizer.decode(p), "reference": r, "prediction": q, **example_scores(q, r)}
            for p, r, q in zip(prompts, reference_texts, prediction_texts)]
    return metrics, rows


def first_examples(examples: Examples, n: Optional[int]) -> Examples:
    """The first n examples (all of them when n is None or not smaller)."""
    if n is None or n >= len(examples):
        return examples
    return Examples(examples.tokens[:int(examples.offsets[n])], examples.offsets[:n + 1],
                    None if examples.prompt_lengths is None else examples.prompt_lengths[:n],
                    None if examples.labels is None else examples.labels[:n])


def sampled_text_metrics(model: nn.Module, tokenizer: Any, examples: Examples, batch_size: int = 16
                         ) -> dict[str, float]:
    """Task metrics during training: greedy predictions for `examples` (a fixed val sample) scored against their
    references, as {'val_bleu', 'val_chrf', 'val_rouge1', 'val_rouge2', 'val_rougeL', 'val_exact_match',
    'val_f1'}. Deterministic, consumes no random numbers (a resumed run measures the same)."""
    from lmforge.eval.metrics import text_metrics

    prompts, references = split_prompts(examples, tokenizer.end_id)
    budget = max(len(r) for r in references) + 1
    was_training = model.training
    model.eval()
    try:
        predicted = predict(model, tokenizer, prompts, GenerateConfig(temperature=0.0, max_new_tokens=budget),
                            batch_size)
    finally:
        model.train(was_training)
    scores = text_metrics([tokenizer.decode(ids) for ids in predicted], [tokenizer.decode(ids) for ids in references])
    return {f"val_{k}": float(v) for k, v in scores.items() if k not in ("examples",) and not k.endswith("signature")}


@torch.no_grad()
def evaluate_classify(model: nn.Module, tokenizer: Any, examples: Examples, labels: list[str], pad_id: int,
                      batch_size: int = 16, progress: bool = False) -> tuple[dict[str, Any], list[dict]]:
    """(metrics, prediction rows) of a classifier on labelled `examples`; see the module docstring."""
    from lmforge.data.batches import pad_labelled_examples
    from lmforge.eval.metrics import classification_metrics

    if len(examples) == 0:
        raise DataError("the split holds no examples to evaluate")
    device = next(model.parameters()).device
    probs, loss_sum = [], 0.0
    with progress_bar(len(examples), "classify", "ex", progress) as bar:
        for start in range(0, len(examples), batch_size):
            x, gold, mask = pad_labelled_examples(examples, np.arange(start, min(start + batch_size, len(examples))),
                                                  pad_id)
            logits = model(x.to(device), attention_mask=mask.to(device)).float()  # (B, K)
            loss_sum += float(torch.nn.functional.cross_entropy(logits, gold.to(device), reduction="sum"))
            probs.append(torch.softmax(logits, dim=-1).cpu())
            bar.update(len(x))
    p = torch.cat(probs)  # (n, K)
    gold = [int(y) for y in examples.labels]
    predicted = p.argmax(dim=-1).tolist()
    metrics = {**classification_metrics(predicted, gold, labels), "loss": loss_sum / len(examples)}
    rows = []
    for i, (g, q) in enumerate(zip(gold, predicted)):
        a, b = int(examples.offsets[i]), int(examples.offsets[i + 1])
        rows.append({"input": tokenizer.decode(np.asarray(examples.tokens[a:b]).tolist()), "reference": labels[g],
                     "prediction": labels[q], "probability": float(p[i, q]), "correct": g == q,
                     "reference_probability": float(p[i, g])})
    return metrics, rows


def evaluate_task_checkpoint(path: str | Path, data_dir: Optional[str | Path] = None, split: str = "val",
                             max_examples: Optional[int] = None, batch_size: int = 16, device: str = "auto",
                             out: Optional[str | Path] = None, generate: Optional[GenerateConfig] = None,
                             progress: bool = False) -> dict[str, Any]:
    """Evaluate a fine-tuned run or checkpoint on a split of its task data (data_dir: the data it was trained
    on by default); see evaluate_task_split."""
    from lmforge.checkpoint import load_for_inference, verified_checkpoint

    ckpt, ckpt_manifest = verified_checkpoint(path)
    model, tokenizer, config = load_for_inference(ckpt, device=device, manifest=ckpt_manifest)
    data_dir = Path(data_dir) if data_dir is not None else Path(config.data.path)
    return evaluate_task_split(model, tokenizer, config, ckpt, data_dir, split, max_examples=max_examples,
                               batch_size=batch_size, out=out, generate=generate, progress=progress)


def evaluate_task_split(model: nn.Module, tokenizer: Any, config: Any, ckpt: Path, data_dir: Path, split: str, *,
                        max_examples: Optional[int] = None, batch_size: int = 16, out: Optional[str | Path] = None,
                        generate: Optional[GenerateConfig] = None, progress: bool = False,
                        assistant: Optional[str] = None) -> dict[str, Any]:
    """Metrics of a loaded fine-tuned model (from checkpoint `ckpt`) on `split` of task data `data_dir` (the
    first max_examples examples when given); writes OUT/predictions.jsonl and OUT/metrics.json (OUT:
    RUN_DIR/eval/SPLIT by default) and returns the metrics with 'split', 'checkpoint', 'data', 'examples',
    'predictions'. assistant: a draft model's run or checkpoint directory (speculative decoding of text-to-text
    predictions)."""
    from lmforge.checkpoint import check_data_tokenizer
    from lmforge.data.tasks import load_examples, read_task_manifest
    from lmforge.eval.metrics import write_metrics, write_predictions

    manifest = read_task_manifest(data_dir)
    check_data_tokenizer(ckpt, Path(data_dir) / "tokenizer.json")
    reward = config.train.objective == "reward"  # a reward model: a classify head's one score, on pairs
    if reward and manifest["task"] != "preference":
        raise DataError(f"{ckpt} is a reward model, measured on preference pairs, and {data_dir} holds "
                        f"{manifest['task']} data: evaluate on `lmforge prepare --task preference` data")
    if not reward and (manifest["task"] == "classify") != (config.model.head == "classify"):
        raise DataError(f"{data_dir} holds {manifest['task']} data but the checkpoint's model has head "
                        f"{config.model.head!r}; evaluate on the data the model was fine-tuned on")
    if manifest["vocab_size"] != config.model.vocab_size:
        raise DataError(f"{data_dir} has vocab_size {manifest['vocab_size']} but the checkpoint's model has "
                        f"{config.model.vocab_size}; evaluate on the data the model was fine-tuned on")
    if assistant and (manifest["task"] == "classify" or reward):
        raise ConfigError("an assistant (draft) model speeds up generation, and a classifier generates nothing: "
                          "drop --assistant-model")
    if tokenizer is None:
        from lmforge.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
    out_dir = Path(out) if out is not None else Path(ckpt).parent.parent / "eval" / split
    if reward:  # pairs: max_examples counts pairs
        from lmforge.eval.preference import evaluate_reward_model

        metrics, rows = evaluate_reward_model(model, tokenizer, load_examples(data_dir, split),
                                              config.train.reward_center_coefficient, batch_size,
                                              next(model.parameters()).device, progress, max_examples)
    elif manifest["task"] in ("preference", "unpaired"):  # pairs: max_examples counts pairs
        metrics, rows = _evaluate_preference_split(model, tokenizer, config, ckpt, load_examples(data_dir, split),
                                                   max_examples, batch_size, progress, manifest["task"])
    elif manifest["task"] == "classify":
        examples = first_examples(load_examples(data_dir, split), max_examples)
        from lmforge.eval.metrics import plot_confusion_matrix

        labels = [str(label) for label in manifest["labels"]]
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.end_id  # as training padded
        metrics, rows = evaluate_classify(model, tokenizer, examples, labels, pad, batch_size, progress)
        plot_confusion_matrix(metrics["confusion_matrix"], labels, out_dir / "confusion.png",
                              title=f"{Path(ckpt).parent.parent.name}: {split} ({len(rows)} examples)")
        metrics["confusion_png"] = str(out_dir / "confusion.png")
    else:
        examples = first_examples(load_examples(data_dir, split), max_examples)
        device = next(model.parameters()).device
        drafter = load_assistant(assistant, model, tokenizer, str(ckpt), device) if assistant else None
        metrics, rows = evaluate_sft(model, tokenizer, examples, generate=generate, batch_size=batch_size,
                                     device=device, progress=progress, assistant_model=drafter)
    write_predictions(out_dir / "predictions.jsonl", rows)
    result = {**metrics, "split": split, "checkpoint": str(ckpt), "data": str(data_dir), "examples": len(rows),
              "predictions": str(out_dir / "predictions.jsonl")}
    write_metrics(out_dir / "metrics.json", result)
    return result


def _evaluate_preference_split(model: nn.Module, tokenizer: Any, config: Any, ckpt: Path, examples: Examples,
                               max_examples: Optional[int], batch_size: int, progress: bool, kind: str
                               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The preference loss's metrics of a checkpoint against its reference, the run's train.init_from (none for
    simpo and orpo) (eval/preference.py), on pairs (kind preference; max_examples counts pairs) or on unpaired
    completions (kind unpaired)."""
    from lmforge.eval.preference import evaluate_preference, evaluate_unpaired, load_reference
    from lmforge.preference_loss import PreferenceLoss

    loss = PreferenceLoss.of(config.train)
    if loss.group:
        raise ConfigError(f"{ckpt} was trained with GRPO on its own samples, and `lmforge eval` measures a pair "
                          "loss it never had: the run's val_online_reward (metrics.jsonl) is its measure; score its "
                          "samples with `lmforge best-of-n` or `lmforge reward`")
    if loss.unpaired != (kind == "unpaired"):
        raise DataError(f"{ckpt} was trained with train.preference_loss {loss.kind}, a loss of "
                        f"{'single completions' if loss.unpaired else 'pairs'}, and this is {kind} data: evaluate on "
                        "the data the model was fine-tuned on")
    if loss.needs_reference and config.train.init_from == "none":
        raise ConfigError(f"preference metrics compare a model with its reference, the model its run started from "
                          f"(train.init_from), and {ckpt} was trained from scratch: evaluate a model fine-tuned "
                          "with `--train.init_from`")
    device = next(model.parameters()).device
    reference = load_reference(config, ckpt, device) if loss.needs_reference else None
    if kind == "unpaired":
        return evaluate_unpaired(model, reference, tokenizer, examples, loss, config.model.block_size + 1, batch_size,
                                 device, progress, max_examples)
    return evaluate_preference(model, reference, tokenizer, examples, loss, batch_size, device, progress, max_examples)
