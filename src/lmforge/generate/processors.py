"""From a row's last logits to its next token: penalties, n-gram ban, temperature, top-k / top-p / min-p, a pick.

Each function works on a batch of rows (B, V) that share one GenerateConfig's scoring options; the
decoding loop groups rows by those options (GenerateConfig.scoring), so rows with different settings
can share one forward pass.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from lmforge.generate.config import GenerateConfig
from lmforge.generate.rows import Logprobs


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores (B, V) of tokens already seen (B, V) bool: positive ones divided by `penalty`, negative ones
    multiplied (CTRL, Keskar et al. 2019, sec. 4.1, as Hugging Face applies it), so above 1 they all drop."""
    penalized = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalized, scores)


def seen_tokens(tokens: torch.Tensor, real: Optional[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """(B, V) bool: the tokens present in each row of tokens (B, L); real (B, L) marks real tokens (None = all)."""
    ids = tokens if real is None else tokens.masked_fill(~real, vocab_size)  # pads go to an extra column
    seen = torch.zeros(ids.size(0), vocab_size + 1, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)[:, :vocab_size]


def banned_ngram_tokens(tokens: torch.Tensor, real: Optional[torch.Tensor], n: int, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: the tokens that would complete an n-gram already present in each row of tokens (B, L).
    real (B, L) marks real tokens (None = all); an n-gram touching a pad does not count."""
    B, L = tokens.shape
    banned = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=tokens.device)  # column V: no ban
    if L < n or n < 1:
        return banned[:, :vocab_size]
    grams = tokens.unfold(1, n, 1)  # (B, L-n+1, n): every n-gram
    last = tokens[:, L - n + 1:]  # (B, n-1): the prefix the next token would complete
    match = (grams[:, :, :-1] == last[:, None, :]).all(dim=-1)  # (B, L-n+1)
    if real is not None:
        match &= real.unfold(1, n, 1).all(dim=-1)
    candidates = torch.where(match, grams[:, :, -1], vocab_size)  # (B, L-n+1): the completing tokens
    return banned.scatter_(1, candidates, True)[:, :vocab_size]


def occurrence_penalties(scores: torch.Tensor, generated: Sequence[Sequence[int]], presence: float,
                         frequency: float) -> torch.Tensor:
    """Scores (B, V) minus frequency * c[j] + presence * (c[j] > 0), c[j] the number of times row j generated each
    token (OpenAI's presence and frequency penalties; the prompt's tokens do not count)."""
    counts = torch.zeros_like(scores)
    for j, ids in enumerate(generated):
        if ids:
            counts[j].index_add_(0, torch.tensor(list(ids), device=scores.device),
                                 torch.ones(len(ids), dtype=scores.dtype, device=scores.device))
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def penalizes(config: GenerateConfig) -> bool:
    """Whether process_scores changes anything for rows of `config`."""
    return (config.repetition_penalty != 1.0 or config.no_repeat_ngram_size > 0 or config.presence_penalty != 0.0
            or config.frequency_penalty != 0.0)


def process_scores(scores: torch.Tensor, tokens: torch.Tensor, real: Optional[torch.Tensor],
                   config: GenerateConfig, generated: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """Scores (B, V) after the repetition penalty and the no-repeat n-gram ban (Hugging Face's logits
    processors of the same names) over each row's tokens so far (B, L) (real: (B, L) or None), then the presence
    and frequency penalties over each row's generated tokens (`generated`: B lists; None = those penalties off);
    temperature and the filters come later, in next_token."""
    if config.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seen_tokens(tokens, real, scores.size(-1)), config.repetition_penalty)
    if config.no_repeat_ngram_size > 0:
        banned = banned_ngram_tokens(tokens, real, config.no_repeat_ngram_size, scores.size(-1))
        scores = scores.masked_fill(banned, -torch.inf)
    if generated is not None and (config.presence_penalty != 0.0 or config.frequency_penalty != 0.0):
        scores = occurrence_penalties(scores, generated, config.presence_penalty, config.frequency_penalty)
    return scores


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  min_p: Optional[float] = None) -> torch.Tensor:
    """Set to -inf every logit (B, V) outside the top k, then outside the nucleus of mass top_p
    (Holtzman et al. 2020: the smallest most-likely set whose probability reaches top_p), then below
    min_p times the top probability (Nguyen et al. 2024). The most likely token always survives."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), -torch.inf)
    if min_p is not None and min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, -torch.inf)
    return logits


def next_token(scores: torch.Tensor, config: GenerateConfig, generator: Union[None, torch.Generator,
               Sequence[Optional[torch.Generator]]] = None) -> torch.Tensor:
    """The next token (B,) from last-position scores (B, V): the argmax, or a draw after temperature and
    the filters. `generator`: one for the whole batch, or one per row (each row then draws alone)."""
    if config.is_greedy:
        return scores.argmax(dim=-1)
    logits = filter_logits(scores.float() / config.temperature, config.top_k, config.top_p, config.min_p)
    return draw(logits.softmax(dim=-1), generator)


def draw(probs: torch.Tensor, generator: Union[None, torch.Generator, Sequence[Optional[torch.Generator]]] = None
         ) -> torch.Tensor:
    """One token per row of probs (B, V), by inverse transform sampling: the first token whose cumulative
    probability exceeds u ~ U[0, total). Each row's u comes from its own generator (one call per row, then
    one vectorized search), so a row draws the same token alone or in any batch; a token of probability 0
    is never drawn (its cumulative sum equals its predecessor's)."""
    B = probs.size(0)
    if generator is None or isinstance(generator, torch.Generator):
        u = torch.rand(B, 1, generator=generator, device=probs.device, dtype=probs.dtype)
    else:
        u = torch.cat([torch.rand(1, 1, generator=g, device=probs.device, dtype=probs.dtype) for g in generator])
    cdf = probs.cumsum(dim=-1)  # (B, V)
    return (cdf < u * cdf[:, -1:]).sum(dim=-1).clamp_(max=probs.size(-1) - 1)  # (B,)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[Logprobs]:
    """Per row of logits (B, V): the log probability of tokens (B,) under log_softmax(logits) and the k most
    likely tokens with theirs (computed in float32)."""
    logp = logits.float().log_softmax(dim=-1)  # (B, V)
    chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()  # (B,)
    top = logp.topk(min(k, logp.size(-1)), dim=-1) if k > 0 else None
    rows = zip(top.indices.tolist(), top.values.tolist()) if top is not None else [((), ())] * len(chosen)
    return [Logprobs(t, lp, tuple(zip(ids, lps))) for t, lp, (ids, lps) in zip(tokens.tolist(), chosen, rows)]
