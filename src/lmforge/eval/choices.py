"""Multiple-choice evaluation by log-likelihood, zero- or few-shot: the way lm-evaluation-harness scores HellaSwag,
ARC, PIQA and the like, on a file of your own (model and data hubs are not needed).

Each example is a context, two or more choices and the index of the right one. The model scores every choice as
a continuation of the context:

    loglikelihood(choice) = sum over the choice's tokens t_i of log p(t_i | context, t_1 .. t_{i-1})

    acc        the choice with the highest log-likelihood is the answer
    acc_norm   the same after dividing each by its choice's length in characters (long choices are not
               penalised for having more tokens), lm-evaluation-harness's acc_norm
    *_stderr   the standard error of the mean over examples (sample standard deviation / sqrt(n))

Tokens as lm-evaluation-harness makes them (`encode_pair`), so a model imported from Hugging Face scores what the
harness scores with the same weights: the continuation is `delimiter + choice` (a space by default, the harness's
target_delimiter), whitespace ending the context moves to the continuation, the whole text is encoded once and the
continuation is what follows the context's own tokens (a BPE merge across the boundary goes to the choice). Where
the context's tokens are not the start of the whole text's (the context ends inside a word: "Hel" + "lo"), the
harness would score the wrong tokens (whole[len(context):] is not the choice's text); lmforge encodes the choice on
its own there. The
context starts with <START> as training documents do (generate.rows.prompt_ids); without a start token, an empty
context is the end token (GPT-2's <|endoftext|>). A sequence longer than block_size + 1 loses context tokens from
the left, as the harness's window does (counted in `truncated`).

Few-shot: k other examples (`num_fewshot`, drawn with a fixed seed from the same file, the example itself left out,
or from `fewshot_file`) written as `context + delimiter + right choice`, joined and followed by `fewshot_delimiter`
(a blank line), come before each context.

Records (.jsonl or .parquet, through data.tasks.read_records): {"context": str, "choices": [str, ...], "answer":
index}; the field names are options (HellaSwag: ctx / endings / label), and the context may be written from
several fields by a template ("Question: {question}\nAnswer:", as the harness's ARC task writes it). `choices` may
also be ARC's object
{"text": [...], "label": ["A", "B", ...]}; `answer` an index (an int or a string of digits), one of those labels, or
the text of a choice.

Scoring (`score_choices`) reads each context once for all its choices, through a KV cache, and applies the LM head
only at the choices' positions (GPT.token_logits), not at every position of every sequence.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from lmforge.data.tasks import read_records, template_fields
from lmforge.errors import ConfigError, DataError
from lmforge.eval.progress import progress_bar

FEWSHOT_SEED = 1234  # lm-evaluation-harness's default


@dataclass
class ChoiceTask:
    """What `lmforge eval --choices FILE` reads and how it builds each example's context."""

    file: str
    context_field: str = "context"
    choices_field: str = "choices"
    answer_field: str = "answer"
    delimiter: str = " "              # between a context and a choice
    num_fewshot: int = 0
    fewshot_seed: int = FEWSHOT_SEED
    fewshot_file: Optional[str] = None  # the shots' pool; None: the evaluated file, each example leaving itself out
    fewshot_delimiter: str = "\n\n"   # after each shot
    context_template: Optional[str] = None  # the context written from record fields: "Question: {question}\nAnswer:"


@dataclass
class ChoiceExample:
    context: str
    choices: list[str]
    answer: int
    where: str                        # FILE:LINE
    labels: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ reading
def read_choice_examples(path: str | Path, task: ChoiceTask) -> list[ChoiceExample]:
    """The examples of a .jsonl or .parquet file; DataError naming the file, line and field of the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file: pass a .jsonl file of {{context, choices, answer}} "
                        f"records")
    if path.suffix.lower() not in (".jsonl", ".parquet"):
        raise DataError(f"{path}: multiple-choice records are read from .jsonl or .parquet (their choices are a "
                        f"list), not {path.suffix or 'a file without a suffix'}")
    examples = []
    for where, record, problem in read_records(path):
        if problem is not None:
            raise DataError(f"{where}: {problem}: fix or remove the line")
        examples.append(_example(record, where, task))
    if not examples:
        raise DataError(f"{path} holds no records: write one {{context, choices, answer}} object per line")
    return examples


def _example(record: dict, where: str, task: ChoiceTask) -> ChoiceExample:
    def missing(name: str, flag: str) -> DataError:
        return DataError(f"{where}: no field {name!r} (fields: {', '.join(map(repr, record)) or 'none'}): name the "
                         f"right one with {flag}")

    fields = template_fields(task.context_template) if task.context_template else [task.context_field]
    for name in fields:
        if name not in record:
            raise missing(name, "--context-template" if task.context_template else "--context-field")
        if not isinstance(record[name], str):
            raise DataError(f"{where}: {name!r} is a {type(record[name]).__name__}, not a string")
    if task.choices_field not in record:
        raise missing(task.choices_field, "--choices-field")
    if task.answer_field not in record:
        raise missing(task.answer_field, "--answer-field")
    context = task.context_template.format_map(record) if task.context_template else record[task.context_field]
    choices, labels = record[task.choices_field], []
    if isinstance(choices, dict) and set(choices) >= {"text", "label"}:  # ARC: {"text": [...], "label": [...]}
        choices, labels = choices["text"], choices["label"]
        if not (isinstance(choices, list) and isinstance(labels, list) and len(labels) == len(choices)):
            raise DataError(f"{where}: {task.choices_field!r} must hold a list of texts and a list of as many labels")
        labels = [str(label) for label in labels]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: {task.choices_field!r} must be a list of two or more strings (or ARC's "
                        f"{{\"text\": [...], \"label\": [...]}}), not {str(choices)[:60]!r}")
    if not task.delimiter and any(not c for c in choices):
        raise DataError(f"{where}: a choice is empty, and with no delimiter it has no tokens to score")
    return ChoiceExample(context, choices, _answer(record[task.answer_field], choices, labels, where,
                                                   task.answer_field), where, labels)


def _answer(value: Any, choices: list[str], labels: list[str], where: str, name: str) -> int:
    """The index of the right choice: an int, a string of digits, one of the labels, or the text of a choice."""
    index = None
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str):
        if value in labels:
            index = labels.index(value)
        elif value.strip().isdigit():
            index = int(value)
        elif value in choices:
            index = choices.index(value)
    if index is None or not 0 <= index < len(choices):
        raise DataError(f"{where}: {name!r} is {str(value)[:40]!r}, not one of the {len(choices)} choices: give its "
                        f"index (0 to {len(choices) - 1}){', a label' if labels else ''} or its text")
    return index


# -------------------------------------------------------------------------------------------- contexts
def contexts(examples: Sequence[ChoiceExample], task: ChoiceTask,
             pool: Optional[Sequence[ChoiceExample]] = None) -> list[str]:
    """Each example's context after its task.num_fewshot shots, drawn from `pool` (default: the examples; an
    example never gets itself) with a generator seeded by task.fewshot_seed and the example's index, so an example
    gets the same shots however many of the file's examples are evaluated (pass the whole file as the pool)."""
    k = task.num_fewshot
    if k == 0:
        return [e.context for e in examples]
    pool = list(examples if pool is None else pool)
    out = []
    for i, example in enumerate(examples):
        candidates = [j for j, shot in enumerate(pool) if shot is not example]
        if k > len(candidates):
            raise ConfigError(f"--num-fewshot {k} needs {k + len(pool) - len(candidates)} examples in the pool of "
                              f"shots, which has {len(pool)}: lower it or pass a larger --fewshot-file")
        picks = random.Random(task.fewshot_seed * 1_000_003 + i).sample(candidates, k)
        shots = [pool[j].context + task.delimiter + pool[j].choices[pool[j].answer] for j in picks]
        out.append(task.fewshot_delimiter.join(shots) + task.fewshot_delimiter + example.context)
    return out


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness makes them (see the module's docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    start = [tokenizer.start_id] if tokenizer.start_id is not None else []
    if not context and not start:
        if tokenizer.end_id is None:
            raise ConfigError("an empty context needs a start or an end token to come first, and this tokenizer has "
                              "neither: give every example a context")
        return [tokenizer.end_id], tokenizer.encode(continuation)
    whole = start + tokenizer.encode(context + continuation)
    ids = start + tokenizer.encode(context)
    if whole[:len(ids)] == ids:
        return ids, whole[len(ids):]
    return ids, tokenizer.encode(continuation)  # a word cut in two: whole[len(ids):] would not be the choice's text


# ------------------------------------------------------------------------------------------------- scoring
Score = tuple[float, bool, bool]  # (log-likelihood, greedy, truncated)


def _picked(model: nn.Module, hidden: torch.Tensor, targets: list[int], owner: list[int], n: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability, count of tokens that were not the most likely) for each of n owners: hidden (N, C)
    holds the states that predict targets (N,), target i belonging to owner[i]."""
    logp = model.token_logits(hidden).float().log_softmax(-1)  # (N, V): the LM head at the scored positions only
    target = torch.tensor(targets, device=hidden.device)
    owner_t = torch.tensor(owner, device=hidden.device)
    picked = logp.gather(-1, target[:, None])[:, 0].double()
    sums = torch.zeros(n, dtype=torch.float64, device=hidden.device).index_add_(0, owner_t, picked)
    misses = torch.zeros(n, device=hidden.device).index_add_(0, owner_t, (logp.argmax(-1) != target).float())
    return sums.cpu(), misses.cpu()


def _check_choice(continuation: list[int], block: int) -> None:
    if not continuation:
        raise ValueError("a continuation without tokens has no log-likelihood")
    if len(continuation) > block:
        raise DataError(f"a choice of {len(continuation)} tokens is longer than the model's block_size ({block}): "
                        f"it cannot be scored; shorten it")


@torch.no_grad()
def score_continuations(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                        progress: bool = False) -> list[Score]:
    """(log-likelihood, greedy, truncated) of each (context ids, continuation ids): the summed log-probability of
    the continuation's tokens after the context, whether each of them is the most likely token there, and whether
    the context lost tokens on the left to fit block_size. The sequence fed is the last block_size + 1 tokens of
    context + continuation, less its last token (lm-evaluation-harness's window), one sequence per pair."""
    block = model.config.block_size
    feeds = []
    for context, continuation in pairs:
        _check_choice(continuation, block)
        whole = (context + continuation)[-(block + 1):]
        feeds.append((whole[:-1], continuation, len(context) + len(continuation) > block + 1))
    device = next(model.parameters()).device
    order = sorted(range(len(feeds)), key=lambda i: -len(feeds[i][0]))  # longest first: fewer pads per batch
    out: list[Optional[Score]] = [None] * len(feeds)
    with progress_bar(len(feeds), "choices", "seq", progress) as bar:
        for at in range(0, len(order), batch_size):
            batch = [feeds[i] for i in order[at:at + batch_size]]
            x = torch.zeros((len(batch), len(batch[0][0])), dtype=torch.long)
            rows, cols, targets, owner = [], [], [], []
            for b, (fed, continuation, _) in enumerate(batch):
                x[b, :len(fed)] = torch.tensor(fed)  # right padding: a causal model's real positions never see it
                n = len(continuation)
                rows += [b] * n
                cols += range(len(fed) - n, len(fed))
                targets += continuation
                owner += [b] * n
            hidden = model.hidden_states(x.to(device))  # (B, T, C)
            sums, misses = _picked(model, hidden[rows, cols], targets, owner, len(batch))
            for b, i in enumerate(order[at:at + batch_size]):
                out[i] = (float(sums[b]), bool(misses[b] == 0), batch[b][2])
            bar.update(len(batch))
    return out  # type: ignore[return-value]


@torch.no_grad()
def score_choices(model: nn.Module, questions: Sequence[tuple[list[int], list[list[int]]]], batch_size: int = 16,
                  progress: bool = False) -> list[list[Score]]:
    """Each question's (context ids, every choice's ids) -> a Score per choice, as score_continuations gives
    them, reading each context once for all its choices.

    A batch of questions (about batch_size choices in all) runs in two passes over a KV cache: the contexts,
    left-padded, then each choice's tokens but its last, right-padded, after a copy of its context's cached keys
    and values (KVCache.reorder); the state after the context predicts a choice's first token. Four choices of
    12 tokens after a 40-token context feed 88 tokens instead of 4 x 52. A question that does not fit the block
    whole (some choice would cut its context) goes through score_continuations, sequence by sequence.
    """
    from lmforge.model import KVCache

    block = model.config.block_size
    for _, choices in questions:
        for continuation in choices:
            _check_choice(continuation, block)
    fits = [len(ctx) + max(map(len, choices)) <= block + 1 for ctx, choices in questions]
    out: list[list[Score]] = [[] for _ in questions]
    rest = [(i, ctx, c) for i, (ctx, choices) in enumerate(questions) if not fits[i] for c in choices]
    for (i, _, _), score in zip(rest, score_continuations(model, [(ctx, c) for _, ctx, c in rest], batch_size)):
        out[i].append(score)
    device, dtype = model.tok_emb.weight.device, model.tok_emb.weight.dtype
    order = sorted((i for i in range(len(questions)) if fits[i]), key=lambda i: -len(questions[i][0]))
    with progress_bar(sum(len(c) for _, c in questions), "choices", "seq", progress) as bar:
        bar.update(len(rest))
        at = 0
        while at < len(order):
            batch = [order[at]]  # longest context first: then a batch is as wide as its first context
            width = len(questions[order[at]][0])
            tail = max(map(len, questions[order[at]][1])) - 1
            while at + len(batch) < len(order):
                ctx, choices = questions[order[at + len(batch)]]
                more_tail = max(tail, max(map(len, choices)) - 1)
                if sum(len(questions[i][1]) for i in batch) + len(choices) > batch_size or width + more_tail > block:
                    break
                batch.append(order[at + len(batch)])
                tail = more_tail
            at += len(batch)
            x = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for b, i in enumerate(batch):
                ctx = questions[i][0]
                x[b, width - len(ctx):], mask[b, width - len(ctx):] = torch.tensor(ctx), True  # left padding
            cache = KVCache(model.config, len(batch), max_len=width + tail, device=device, dtype=dtype)
            after_context = model.hidden_states(x.to(device), cache, mask.to(device))[:, -1]  # (E, C)
            parent = [b for b, i in enumerate(batch) for _ in questions[i][1]]  # each choice's question row
            choices = [c for i in batch for c in questions[i][1]]
            hidden = after_context[parent]  # (N, C): predicts every choice's first token
            targets, owner = [c[0] for c in choices], list(range(len(choices)))
            if tail > 0:
                y = torch.zeros((len(choices), tail), dtype=torch.long)
                more = torch.zeros((len(choices), tail), dtype=torch.bool)
                rows, cols = [], []
                for n, c in enumerate(choices):
                    y[n, :len(c) - 1], more[n, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long), True
                    rows += [n] * (len(c) - 1)
                    cols += range(len(c) - 1)
                    targets += c[1:]
                    owner += [n] * (len(c) - 1)
                cache.reorder(torch.tensor(parent, device=device))
                seen = torch.cat([mask[parent], more], dim=1).to(device)  # (N, width + tail)
                states = model.hidden_states(y.to(device), cache, seen)  # (N, tail, C)
                hidden = torch.cat([hidden, states[rows, cols]])
            sums, misses = _picked(model, hidden, targets, owner, len(choices))
            n = 0
            for i in batch:
                for _ in questions[i][1]:
                    out[i].append((float(sums[n]), bool(misses[n] == 0), False))
                    n += 1
            bar.update(len(choices))
    return out


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: the sample standard deviation (n - 1) over sqrt(n); 0 for one value."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def evaluate_choices(model: nn.Module, tokenizer: Any, examples: Sequence[ChoiceExample], task: ChoiceTask,
                     pool: Optional[Sequence[ChoiceExample]] = None, batch_size: int = 16,
                     progress: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, one row per example) of a causal language model on multiple-choice examples."""
    if model.config.head != "lm" or not model.config.causal:
        raise ConfigError("multiple-choice evaluation scores choices as continuations, which needs a language model "
                          "(a decoder with its LM head); this checkpoint is "
                          + ("a classifier" if model.config.head != "lm" else "an encoder (model.causal: false)"))
    questions = []
    for context, example in zip(contexts(examples, task, pool), examples):
        pairs = [encode_pair(tokenizer, context, task.delimiter + choice) for choice in example.choices]
        for choice, (_, ids) in zip(example.choices, pairs):
            if not ids:
                raise DataError(f"{example.where}: the choice {choice!r} has no tokens after its context: give it text")
        questions.append((pairs[0][0], [ids for _, ids in pairs]))  # one context: encode_pair splits it alike
    rows, acc, acc_norm = [], [], []
    for example, scores in zip(examples, score_choices(model, questions, batch_size, progress)):
        ll = [score[0] for score in scores]
        norm = [v / max(len(c), 1) for v, c in zip(ll, example.choices)]
        n = len(ll)
        pred, pred_norm = max(range(n), key=ll.__getitem__), max(range(n), key=norm.__getitem__)
        acc.append(float(pred == example.answer))
        acc_norm.append(float(pred_norm == example.answer))
        rows.append({"where": example.where, "context": example.context, "choices": example.choices,
                     "answer": example.answer, "loglikelihoods": ll, "greedy": [score[1] for score in scores],
                     "prediction": pred, "prediction_norm": pred_norm, "correct": pred == example.answer,
                     "correct_norm": pred_norm == example.answer, "truncated": any(score[2] for score in scores)})
    metrics = {"acc": sum(acc) / len(acc), "acc_stderr": mean_stderr(acc),
               "acc_norm": sum(acc_norm) / len(acc_norm), "acc_norm_stderr": mean_stderr(acc_norm),
               "chance": sum(1 / len(e.choices) for e in examples) / len(examples),
               "examples": len(examples), "choices": sum(len(e.choices) for e in examples),
               "num_fewshot": task.num_fewshot,
               "truncated": sum(r["truncated"] for r in rows)}
    return metrics, rows


def evaluate_choices_checkpoint(path: str | Path, task: ChoiceTask, *, max_examples: Optional[int] = None,
                                batch_size: int = 16, device: str = "auto", out: Optional[str | Path] = None,
                                progress: bool = False) -> dict[str, Any]:
    """Evaluate a run or checkpoint directory on task.file (its first max_examples examples when given); writes
    OUT/predictions.jsonl and OUT/metrics.json (OUT: RUN_DIR/eval/choices-FILESTEM by default) and returns the
    metrics with 'file', 'checkpoint', 'predictions'."""
    from lmforge.checkpoint import load_for_inference, verified_checkpoint
    from lmforge.eval.metrics import write_metrics, write_predictions

    every = read_choice_examples(task.file, task)  # bad data fails before the model loads
    pool = read_choice_examples(task.fewshot_file, task) if task.fewshot_file else every
    examples = every[:max_examples] if max_examples is not None else every
    ckpt, manifest = verified_checkpoint(path)
    model, tokenizer, _ = load_for_inference(ckpt, device=device, manifest=manifest)
    if tokenizer is None:
        raise DataError(f"{ckpt} has no tokenizer.json, so its choices cannot be encoded: evaluate a checkpoint of a "
                        f"run trained on prepared data")
    metrics, rows = evaluate_choices(model, tokenizer, examples, task, pool, batch_size, progress)
    out_dir = Path(out) if out is not None else Path(ckpt).parent.parent / "eval" / f"choices-{Path(task.file).stem}"
    write_predictions(out_dir / "predictions.jsonl", rows)
    result = {**metrics, "file": str(task.file), "checkpoint": str(ckpt),
              "predictions": str(out_dir / "predictions.jsonl")}
    write_metrics(out_dir / "metrics.json", result)
    return result
