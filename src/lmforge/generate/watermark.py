"""A watermark in generated text and its detection (Kirchenbauer et al. 2023, "A Watermark for Large Language
Models"), as Hugging Face's WatermarkLogitsProcessor and WatermarkDetector make them, bit for bit.

Each step, the tokens before the next one seed a generator that splits the vocabulary: a random greenlist of
greenlist_ratio of it gets `bias` added to its scores (after temperature and the filters, as Hugging Face adds it).
Text generated so holds more green tokens than chance; anyone with the key counts them:

    z = (green - ratio * T) / sqrt(T * ratio * (1 - ratio))      T tokens scored

and text written without the watermark has z near 0 (a normal variable), watermarked text a large z (the
detector says so above z_threshold, 3 by default: one chance in 740 for unmarked text).

    seeding scheme   the generator's seed
    lefthash         key * the previous token (Algorithm 2 of the paper; context_width plays no part)
    selfhash         key * min over the last context_width tokens t of (table[t] + 1) * (table[next] + 1), the
                     next token included (Algorithm 3): the 40 likeliest next tokens are each checked against
                     their own greenlist, and those in it get the bias
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

TABLE_SIZE = 1_000_003  # Hugging Face's fixed table (selfhash)
SELFHASH_CANDIDATES = 40  # the likeliest next tokens selfhash checks (Hugging Face's, from the paper's code)


@dataclass(frozen=True)
class Watermark:
    """The watermark's settings (GenerateConfig's watermark_* fields; Hugging Face's WatermarkingConfig)."""

    greenlist_ratio: float = 0.25
    bias: float = 2.0
    key: int = 15485863
    scheme: str = "lefthash"
    context_width: int = 1


@functools.lru_cache(maxsize=4)
def _table(key: int) -> torch.Tensor:
    return torch.randperm(TABLE_SIZE, generator=torch.Generator().manual_seed(key))


def _seed(mark: Watermark, context: Sequence[int]) -> int:
    window = list(context[-mark.context_width:])
    if mark.scheme == "selfhash":  # in int64, wrapping around as Hugging Face's tensors do
        table = _table(mark.key)
        a = table[torch.tensor(window) % TABLE_SIZE] + 1
        seed = int((mark.key * a * (table[window[-1] % TABLE_SIZE] + 1)).min())
    else:
        seed = mark.key * window[-1]
    return seed % (2**64 - 1)


@functools.lru_cache(maxsize=4096)
def _greenlist(seed: int, vocab_size: int, size: int) -> torch.Tensor:
    return torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))[:size]


def greenlist(mark: Watermark, context: Sequence[int], vocab_size: int) -> torch.Tensor:
    """The green token ids after `context` (its last tokens seed the split; for selfhash the context ends with the
    token being judged)."""
    return _greenlist(_seed(mark, context), vocab_size, int(vocab_size * mark.greenlist_ratio))


def watermark_scores(scores: torch.Tensor, contexts: Sequence[Optional[Sequence[int]]], mark: Watermark
                     ) -> torch.Tensor:
    """Scores (B, V) with the bias added to each row's greenlist after its context (None, or shorter than
    context_width: the row is left alone, as Hugging Face skips a step with too few tokens)."""
    out = scores.clone()
    V = scores.size(-1)
    for j, context in enumerate(contexts):
        if context is None or len(context) < mark.context_width:
            continue
        if mark.scheme == "selfhash":
            candidates = scores[j].sort(descending=True).indices[:SELFHASH_CANDIDATES].tolist()
            green = [t for t in candidates if t in set(greenlist(mark, [*context, t], V).tolist())]
            if not green:
                continue
            ids = torch.tensor(green, device=scores.device)
        else:
            ids = greenlist(mark, context, V).to(scores.device)
        out[j, ids] += mark.bias
    return out


def detect(token_ids: Sequence[int], vocab_size: int, mark: Watermark, ignore_repeated_ngrams: bool = False,
           z_threshold: float = 3.0) -> dict:
    """Hugging Face's WatermarkDetector on one text's token ids (the generated ones, without the prompt and without a
    leading start token): every token after the first context_width (selfhash: after the first context_width - 1)
    scored green or not; with ignore_repeated_ngrams each distinct n-gram once. {num_tokens_scored,
    num_green_tokens, green_fraction, z_score, p_value, prediction (z > z_threshold)}."""
    ids = list(token_ids)
    n = mark.context_width + (0 if mark.scheme == "selfhash" else 1)
    if len(ids) < n:
        raise ValueError(f"{len(ids)} tokens: the watermark scores tokens after the first {n - 1}, give more text")
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    counts: dict[tuple, int] = {}
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    green_of = {g: int(g[-1]) in set(greenlist(mark, g if mark.scheme == "selfhash" else g[:-1],
                                              vocab_size).tolist()) for g in counts}
    scored = len(counts) if ignore_repeated_ngrams else len(grams)
    green = sum(green_of.values()) if ignore_repeated_ngrams else sum(c * green_of[g] for g, c in counts.items())
    ratio = mark.greenlist_ratio
    z = (green - ratio * scored) / math.sqrt(scored * ratio * (1 - ratio))
    p = 0.5 * math.erfc(z / math.sqrt(2))
    return {"num_tokens_scored": scored, "num_green_tokens": green, "green_fraction": green / scored,
            "z_score": z, "p_value": p, "prediction": z > z_threshold}
