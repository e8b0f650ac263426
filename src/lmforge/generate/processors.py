"""From a row's last logits to its next token: classifier-free guidance, logit and sequence bias, penalties, bans
(n-grams, bad words, an end before min_new_tokens or min_length, suppressed tokens), forced first and last tokens,
the end's exponential decay length penalty, a guided choice, temperature, the filters (top-h / top-k / top-p / min-p
/ typical / epsilon / eta), a watermark, a pick.

Each function works on a batch of rows (B, V) that share one GenerateConfig's scoring options; the
decoding loop groups rows by those options (GenerateConfig.scoring), so rows with different settings
can share one forward pass.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, Union

import torch

from lmforge.generate.config import GenerateConfig
from lmforge.generate.rows import Logprobs
from lmforge.generate.watermark import watermark_scores

TOP_H_TOKENS = 100  # top_h weighs the entropy of this many most likely tokens (Hugging Face's top_n)


def guided_scores(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Sanchez et al. 2023): u + scale * (c - u) with c, u the log-softmax of the
    conditional and unconditional logits (B, V), in float32: log probabilities, then the other processors, as
    Hugging Face applies it (first)."""
    c, u = conditional.float().log_softmax(dim=-1), unconditional.float().log_softmax(dim=-1)
    return u + scale * (c - u)


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores (B, V) of tokens already seen (B, V) bool: positive ones divided by `penalty`, negative ones
    multiplied (CTRL, Keskar et al. 2019, sec. 4.1, as Hugging Face applies it), so above 1 they all drop."""
    penalized = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalized, scores)


def prompt_penalty(scores: torch.Tensor, in_prompt: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores (B, V) of the prompt's tokens (B, V) bool: positive ones multiplied by `penalty`, negative ones divided
    (Hugging Face's encoder_repetition_penalty: the repetition penalty turned around), so above 1 they all rise."""
    favoured = torch.where(scores > 0, scores * penalty, scores / penalty)
    return torch.where(in_prompt, favoured, scores)


@functools.lru_cache(maxsize=16)
def id_tensor(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The ids as a long tensor, made once per list and device (a padded vocabulary suppresses thousands of ids at
    every step: within_tokenizer)."""
    return torch.tensor(ids, dtype=torch.long, device=device)


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


def bias_logits(scores: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """Scores (B, V) with bias[t] added to every row's score of token t (OpenAI's logit_bias)."""
    ids, values = _bias_table(tuple(bias.items()), scores.dtype, scores.device)
    return scores.index_add(1, ids, values.expand(scores.size(0), -1))


@functools.lru_cache(maxsize=256)
def _bias_table(items: tuple[tuple[int, float], ...], dtype: torch.dtype, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, values) tensors of a logit bias, made once per bias (a decode asks every step)."""
    return (torch.tensor([t for t, _ in items], device=device),
            torch.tensor([b for _, b in items], dtype=dtype, device=device))


def sequence_bias(scores: torch.Tensor, tokens: torch.Tensor, real: Optional[torch.Tensor],
                  bias: dict[tuple[int, ...], float]) -> torch.Tensor:
    """Scores (B, V) with each sequence's bias added to the score of its last token in the rows of tokens (B, L)
    that end with the rest of it (a sequence of one token: in every row), as Hugging Face's SequenceBiasLogitsProcessor
    adds it. real (B, L) marks real tokens (None = all); a match touching a pad does not count."""
    B, L = tokens.shape
    singles, groups = _sequence_table(tuple(bias.items()), scores.dtype, tokens.device)
    added = torch.zeros_like(scores)
    if singles is not None:
        added.index_add_(1, singles[0], singles[1].expand(B, -1))
    for prefixes, lasts, values in groups:  # the sequences of n + 1 tokens: prefixes (S, n), lasts (S,), values (S,)
        n = prefixes.size(1)
        if n <= L:
            match = (tokens[:, None, L - n:] == prefixes[None]).all(dim=-1)  # (B, S)
            if real is not None:
                match &= real[:, None, L - n:].all(dim=-1)
            added.index_add_(1, lasts, match.to(scores.dtype) * values)
    return scores + added


@functools.lru_cache(maxsize=256)
def _sequence_table(items: tuple[tuple[tuple[int, ...], float], ...], dtype: torch.dtype, device: torch.device
                    ) -> tuple[Optional[tuple[torch.Tensor, torch.Tensor]],
                               list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """((ids, biases) of the one-token sequences or None, [(prefixes, last tokens, biases) per length >= 2])."""
    singles = [(s[0], b) for s, b in items if len(s) == 1]
    by_length: dict[int, list[tuple[tuple[int, ...], float]]] = {}
    for s, b in items:
        if len(s) > 1:
            by_length.setdefault(len(s), []).append((s, b))
    groups = [(torch.tensor([s[:-1] for s, _ in group], device=device),
               torch.tensor([s[-1] for s, _ in group], device=device),
               torch.tensor([b for _, b in group], dtype=dtype, device=device)) for group in by_length.values()]
    table = (torch.tensor([t for t, _ in singles], device=device),
             torch.tensor([b for _, b in singles], dtype=dtype, device=device)) if singles else None
    return table, groups


def bad_word_tokens(tokens: torch.Tensor, real: Optional[torch.Tensor], sequences: Sequence[Sequence[int]],
                    vocab_size: int) -> torch.Tensor:
    """(B, V) bool: the tokens that would complete one of `sequences` in each row of tokens (B, L), the last token
    of every sequence whose other tokens end the row (those of one token: always). real (B, L) marks real tokens
    (None = all); a match touching a pad does not count. Sequences of one length are matched at once."""
    B, L = tokens.shape
    singles, groups = _bad_word_table(tuple(tuple(s) for s in sequences), tokens.device)
    hits = torch.zeros(B, vocab_size, device=tokens.device)
    if singles is not None:
        hits[:, singles] = 1.0
    for prefixes, lasts in groups:  # prefixes (S, n), lasts (S,): the sequences of n + 1 tokens
        n = prefixes.size(1)
        if n <= L:
            match = (tokens[:, None, L - n:] == prefixes[None]).all(dim=-1)  # (B, S)
            if real is not None:
                match &= real[:, None, L - n:].all(dim=-1)
            hits.index_add_(1, lasts, match.float())  # several sequences may end in one token
    return hits > 0


@functools.lru_cache(maxsize=256)
def _bad_word_table(sequences: tuple[tuple[int, ...], ...], device: torch.device
                    ) -> tuple[Optional[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """(the one-token sequences' ids or None, [(prefixes (S, n), last tokens (S,)) per length n + 1 >= 2])."""
    singles = sorted({s[0] for s in sequences if len(s) == 1})
    by_length: dict[int, list[tuple[int, ...]]] = {}
    for s in sequences:
        if len(s) > 1:
            by_length.setdefault(len(s), []).append(s)
    groups = [(torch.tensor([s[:-1] for s in seqs], device=device), torch.tensor([s[-1] for s in seqs], device=device))
              for seqs in by_length.values()]
    return (torch.tensor(singles, device=device) if singles else None), groups


def ban_early_ends(scores: torch.Tensor, lengths: Sequence[int], minimum: int, end_ids: Sequence[int]) -> torch.Tensor:
    """Scores (B, V) with the end ids at -inf in the rows whose length so far (`lengths`: new tokens for
    min_new_tokens and, with minimum 1 and other ids, begin_suppress_tokens; prompt and new tokens for min_length)
    is below `minimum`."""
    short = [j for j, n in enumerate(lengths) if n < minimum]
    if not short:
        return scores
    scores = scores.clone()
    rows = slice(None) if len(short) == len(lengths) else torch.tensor(short, device=scores.device)[:, None]
    scores[rows, torch.tensor(list(end_ids), device=scores.device)] = -torch.inf
    return scores


def force_tokens(scores: torch.Tensor, rows: Sequence[int], ids: Sequence[int]) -> torch.Tensor:
    """Scores (B, V) with every token of `rows` at -inf but `ids`, at 0: those rows can take nothing else (Hugging
    Face's ForcedBOSTokenLogitsProcessor and ForcedEOSTokenLogitsProcessor)."""
    if not rows:
        return scores
    scores = scores.clone()
    index = torch.tensor(list(rows), device=scores.device)
    scores[index] = -torch.inf
    scores[index[:, None], torch.tensor(list(ids), device=scores.device)] = 0.0
    return scores


def decay_length_penalty(scores: torch.Tensor, generated: Sequence[Sequence[int]], start: int, factor: float,
                         end_ids: Sequence[int]) -> torch.Tensor:
    """Scores (B, V) with |s| * (factor ** k - 1) added to each end id's score s in the rows that generated start + k
    tokens so far, k >= 1 (Hugging Face's ExponentialDecayLengthPenalty; an infinite s is left alone, the result
    kept finite)."""
    grow = []
    for ids in generated:
        k = len(ids) - start
        try:
            grow.append(factor ** k - 1.0 if k > 0 else 0.0)
        except OverflowError:  # factor ** k past a float's range
            grow.append(math.inf)
    if not any(grow):
        return scores
    ends = torch.tensor(list(end_ids), device=scores.device)
    s = scores[:, ends]  # (B, E)
    biggest = torch.finfo(scores.dtype).max
    added = (s.abs() * torch.tensor(grow, device=scores.device)[:, None].clamp(max=biggest)).clamp(max=biggest)
    penalized = torch.where(s.isfinite(), (s + added.nan_to_num(0.0)).clamp(max=biggest), s)
    return scores.index_copy(1, ends, penalized.to(scores.dtype))


def choice_tokens(generated: Sequence[Sequence[int]], choices: Sequence[Sequence[int]], end_ids: Sequence[int],
                  vocab_size: int, device: torch.device) -> torch.Tensor:
    """(B, V) bool: the tokens each row may take next to stay on one of `choices` (token sequences) after its
    generated tokens: the next token of every choice they begin, and the end ids once they equal a choice. A row on
    none of them (one that ended) may take any token."""
    allowed = torch.zeros(len(generated), vocab_size, dtype=torch.bool, device=device)
    choices = [list(c) for c in choices]
    for j, ids in enumerate(generated):
        ids, n = list(ids), len(ids)
        nexts = [c[n] for c in choices if len(c) > n and c[:n] == ids]
        if ids in choices:
            nexts += list(end_ids)
        allowed[j, nexts or slice(None)] = True
    return allowed


def penalizes(config: GenerateConfig) -> bool:
    """Whether process_scores changes anything for rows of `config`."""
    return (config.repetition_penalty != 1.0 or config.no_repeat_ngram_size > 0 or config.presence_penalty != 0.0
            or config.frequency_penalty != 0.0 or config.min_new_tokens > 0 or bool(config.logit_bias)
            or config.encoder_repetition_penalty != 1.0 or config.min_length > 0
            or config.forced_bos_token_id is not None or config.forced_eos_token_id is not None
            or bool(config.sequence_bias) or bool(config.suppress_tokens) or bool(config.begin_suppress_tokens)
            or config.exponential_decay_length_penalty is not None
            or bool(config.bad_words_ids) or bool(config.guided_choice_ids)
            or config.guided_regex is not None or config.guided_json is not None)


def process_scores(scores: torch.Tensor, tokens: torch.Tensor, real: Optional[torch.Tensor],
                   config: GenerateConfig, generated: Optional[Sequence[Sequence[int]]] = None,
                   end_ids: Sequence[int] = (), guide: Any = None, budgets: Optional[Sequence[int]] = None
                   ) -> torch.Tensor:
    """Scores (B, V) after, in Hugging Face's order, the logit and sequence bias, the prompt's (encoder) repetition
    penalty, the repetition penalty and the no-repeat n-gram ban over each row's tokens so far (B, L) (real: (B, L)
    or None), the bad words, the ban of the end ids (`end_ids`) in rows with fewer than min_new_tokens generated
    tokens or shorter than min_length, the forced first token (rows that have generated nothing yet) and last token
    (rows one token short of their budget: `budgets`, B new-token budgets; None = not forced), the exponential decay
    length penalty of the end ids, the suppressed tokens and, in rows that have generated nothing yet, the
    begin-suppressed ones; then the presence and frequency penalties over each row's generated tokens (`generated`:
    B lists, the last of each row's tokens; None = those penalties, the prompt's penalty, min_new_tokens,
    min_length, the forced tokens, the length penalty, the begin-suppressed tokens and the guides off); last, the
    guided choice (only tokens that continue one of the choices) or the guided regex (`guide`, a
    generate.guided.RegexGuide: only tokens that keep a full match reachable). Temperature and the filters come
    later, in next_token."""
    counts = [len(ids) for ids in generated] if generated is not None else []  # each row's new tokens so far
    if config.logit_bias:
        scores = bias_logits(scores, config.logit_bias)
    if config.sequence_bias:
        scores = sequence_bias(scores, tokens, real, config.sequence_bias)
    if config.encoder_repetition_penalty != 1.0 and generated is not None:
        scores = prompt_penalty(scores, seen_tokens(tokens, prompt_columns(tokens, real, generated), scores.size(-1)),
                                config.encoder_repetition_penalty)
    if config.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seen_tokens(tokens, real, scores.size(-1)), config.repetition_penalty)
    if config.no_repeat_ngram_size > 0:
        banned = banned_ngram_tokens(tokens, real, config.no_repeat_ngram_size, scores.size(-1))
        scores = scores.masked_fill(banned, -torch.inf)
    if config.bad_words_ids:
        scores = scores.masked_fill(bad_word_tokens(tokens, real, config.bad_words_ids, scores.size(-1)), -torch.inf)
    if config.min_new_tokens > 0 and generated is not None and end_ids:
        scores = ban_early_ends(scores, counts, config.min_new_tokens, end_ids)
    if config.min_length > 0 and end_ids:
        lengths = real.sum(dim=1).tolist() if real is not None else [tokens.size(1)] * tokens.size(0)
        scores = ban_early_ends(scores, lengths, config.min_length, end_ids)
    if config.forced_bos_token_id is not None and generated is not None:
        scores = force_tokens(scores, [j for j, n in enumerate(counts) if n == 0], [config.forced_bos_token_id])
    if config.forced_eos_token_id is not None and generated is not None and budgets is not None:
        last = [j for j, (n, budget) in enumerate(zip(counts, budgets)) if n == budget - 1]
        scores = force_tokens(scores, last, config.forced_eos_token_id)
    if config.exponential_decay_length_penalty is not None and generated is not None and end_ids:
        scores = decay_length_penalty(scores, generated, *config.exponential_decay_length_penalty, end_ids)
    if config.suppress_tokens:
        scores = scores.index_fill(1, id_tensor(tuple(config.suppress_tokens), scores.device), -torch.inf)
    if config.begin_suppress_tokens and generated is not None:
        scores = ban_early_ends(scores, counts, 1, config.begin_suppress_tokens)  # (banned before one new token)
    if generated is not None and (config.presence_penalty != 0.0 or config.frequency_penalty != 0.0):
        scores = occurrence_penalties(scores, generated, config.presence_penalty, config.frequency_penalty)
    if generated is not None and config.guided_choice_ids:
        allowed = choice_tokens(generated, config.guided_choice_ids, end_ids, scores.size(-1), scores.device)
        scores = scores.masked_fill(~allowed, -torch.inf)
    if generated is not None and guide is not None:  # guided_regex: the rows' RegexGuide (generate.guided)
        scores = scores.masked_fill(~guide.allowed(generated, end_ids, scores.device), -torch.inf)
    return scores


def prompt_columns(tokens: torch.Tensor, real: Optional[torch.Tensor], generated: Sequence[Sequence[int]]
                   ) -> torch.Tensor:
    """(B, L) bool: the real columns of tokens (B, L) that hold each row's prompt, the rest being its last
    len(generated[j]) tokens."""
    B, L = tokens.shape
    ends = torch.tensor([L - len(ids) for ids in generated], device=tokens.device)
    prompt = torch.arange(L, device=tokens.device)[None, :] < ends[:, None]
    return prompt if real is None else prompt & real


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  min_p: Optional[float] = None, typical_p: Optional[float] = None,
                  epsilon: Optional[float] = None, eta: Optional[float] = None, top_h: Optional[float] = None
                  ) -> torch.Tensor:
    """Set to -inf every logit (B, V) outside the top-h set (arXiv 2509.02510: the most likely of the 100 most
    likely tokens, in order, while their entropy terms -p log p, p renormalised over those 100, sum to at most
    top_h times those 100's entropy), then outside the top k, then outside the nucleus of mass top_p
    (Holtzman et al. 2020: the smallest most-likely set whose probability reaches top_p), then below
    min_p times the top probability (Nguyen et al. 2024), then outside the typical set of mass typical_p (Meister
    et al. 2023: tokens taken in order of |-log p - entropy| until their probability reaches typical_p), then of
    probability below epsilon, then below min(eta, sqrt(eta) * exp(-entropy)) (Hewitt et al. 2022): Hugging
    Face's warpers, in its order. A token always survives: the most likely one (the most typical for typical_p)."""
    if top_h is not None:
        top, index = logits.topk(min(TOP_H_TOKENS, logits.size(-1)), dim=-1)  # (B, n), most likely first
        logp = top - top.logsumexp(dim=-1, keepdim=True)
        p = logp.softmax(dim=-1)
        entropy = -(logp.clamp(min=torch.finfo(logp.dtype).min) * p).sum(dim=-1, keepdim=True)  # as torch's Categorical
        terms = torch.special.entr(p)  # -p log p, 0 where p = 0
        within = terms.cumsum(dim=-1) <= top_h * entropy
        within[:, 0] = True
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, within)
        logits = logits.masked_fill(~keep, -torch.inf)
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
    if typical_p is not None and typical_p < 1.0:
        logp = logits.log_softmax(dim=-1)
        entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)  # (B, 1); a -inf logit adds nothing
        order = (-logp - entropy).abs().sort(dim=-1).indices  # most typical first; -inf logits last
        probs = logp.exp().gather(-1, order)
        outside = probs.cumsum(dim=-1) - probs >= typical_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), -torch.inf)
    if epsilon is not None:
        logits = _below(logits, epsilon)
    if eta is not None:
        logp = logits.log_softmax(dim=-1)
        entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)
        logits = _below(logits, (eta ** 0.5 * torch.exp(-entropy)).clamp(max=eta))
    return logits


def _below(logits: torch.Tensor, cutoff: Union[float, torch.Tensor]) -> torch.Tensor:
    """Logits (B, V) with those of probability below `cutoff` (a number or (B, 1)) set to -inf, but the top one."""
    drop = (logits.softmax(dim=-1) < cutoff) & (logits < logits.max(dim=-1, keepdim=True).values)
    return logits.masked_fill(drop, -torch.inf)


def sampling_logits(scores: torch.Tensor, config: GenerateConfig,
                    contexts: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """Processed scores (B, V) -> the logits a row samples from: float32, divided by the temperature, filtered, and
    watermarked after each row's tokens so far (`contexts`, needed with config.watermark), as Hugging Face orders
    them."""
    logits = filter_logits(scores.float() / config.temperature, config.top_k, config.top_p, config.min_p,
                           config.typical_p, config.epsilon_cutoff, config.eta_cutoff, config.top_h)
    return marked(logits, config, contexts)


def marked(scores: torch.Tensor, config: GenerateConfig, contexts: Optional[Sequence[Sequence[int]]]
           ) -> torch.Tensor:
    """Scores (B, V) with config's watermark after each row's tokens so far (unchanged without a watermark)."""
    mark = config.watermark_settings
    if mark is None:
        return scores
    if contexts is None:
        raise ValueError("a watermark needs each row's tokens so far (contexts)")
    return watermark_scores(scores, contexts, mark)


def last_tokens(tokens: Optional[torch.Tensor], real: Optional[torch.Tensor], width: int
                ) -> Optional[list[list[int]]]:
    """The last `width` real tokens of each row of tokens (B, L) (real: (B, L) or None): what a watermark reads."""
    if not width or tokens is None:
        return None
    tail = tokens[:, -width:].tolist()
    if real is None:
        return tail
    return [[t for t, r in zip(row, keep) if r] for row, keep in zip(tail, real[:, -width:].tolist())]


def next_token(scores: torch.Tensor, config: GenerateConfig, generator: Union[None, torch.Generator,
               Sequence[Optional[torch.Generator]]] = None,
               contexts: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """The next token (B,) from last-position scores (B, V): the argmax, or a draw after temperature and
    the filters; with a watermark, after it (`contexts`: each row's tokens so far). `generator`: one for the whole
    batch, or one per row (each row then draws alone)."""
    if config.is_greedy:
        return marked(scores, config, contexts).argmax(dim=-1)
    return draw(sampling_logits(scores, config, contexts).softmax(dim=-1), generator)


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
