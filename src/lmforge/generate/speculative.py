"""Speculative decoding: a cheap drafter guesses the next k tokens, the model checks all of them in one forward pass.

    per step: the drafter guesses d_1..d_k after the text so far -> the model reads [last token, d_1..d_k] at once
    (one pass over k + 1 positions, its KV cache extended) and gives p_0..p_k, its distribution after each prefix
    -> greedy: keep d_j while it is the argmax of p_{j-1}; sampling: keep d_j with probability
    min(1, p_{j-1}(d_j) / q_j(d_j)), q_j the drafter's distribution (Leviathan et al. 2023, Chen et al. 2023)
    -> at the first refusal, the model's own token (greedy: its argmax; sampling: a draw from max(0, p - q),
    normalised); when all k are kept, one more from p_k -> the cache forgets the refused positions.

Each step yields between 1 and k + 1 tokens for one forward pass of the model. Greedy decoding gives plain
greedy decoding's tokens exactly (up to float rounding in near ties); sampling gives tokens with plain
sampling's distribution (the same distribution, not the same draws for a seed: the draws happen in another
order). Penalties, the n-gram ban, temperature and the filters apply at every checked position as they would
one token at a time, so p_j is exactly what plain decoding would sample from there.

Drafters:
    PromptLookup  no model: the tokens that followed the latest earlier occurrence of the text's last n tokens
                  (n from max_matching_ngram_size down to 1); pays where the output repeats its input
                  (summaries, answers quoted from a context, code edits). Hugging Face's prompt_lookup_num_tokens.
    DraftModel    a smaller model with the same vocabulary decodes k tokens ahead with its own KV cache
                  (Hugging Face's assistant_model); or the model's own first layers (early_exit: LayerSkip,
                  Hugging Face's assistant_early_exit).

Rows decode in turn, each with its own KV cache (each step keeps a different number of tokens per row). Past the
context the window slides as in plain decoding (see the package docstring): a checked block never crosses a slide,
so every position sees exactly the context plain decoding would give it.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Collection, Iterator, Optional, Protocol, Sequence

import torch

from lmforge.errors import ConfigError
from lmforge.generate.config import GenerateConfig
from lmforge.generate.processors import draw, marked, penalizes, process_scores, sampling_logits, token_logprobs
from lmforge.generate.rows import Event, Row
from lmforge.model import GPT, KVCache


# ------------------------------------------------------------------------------------ scores -> choice
def distributions(logits: torch.Tensor, prefix: Sequence[int], extra: Sequence[int], config: GenerateConfig,
                  generated: Optional[Sequence[int]] = None, end_ids: Collection[int] = (), guide: Any = None,
                  budget: Optional[int] = None) -> torch.Tensor:
    """Scores (J, V) -> what plain decoding would pick from at each position j, whose text is prefix + extra[:j]
    (of which generated + extra[:j] was generated: the presence and frequency penalties and min_new_tokens count
    those; None = they are off; `end_ids`, `guide` (guided_regex) and `budget` (new tokens at most: where
    forced_eos_token_id applies; None = nowhere) the row's): the processed scores (greedy) or the sampling
    probabilities (after temperature and the filters), watermarked when the config asks."""
    if penalizes(config):
        rows = [process_scores(logits[j:j + 1], torch.tensor([list(prefix) + list(extra[:j])], device=logits.device),
                               None, config, None if generated is None else [list(generated) + list(extra[:j])],
                               end_ids, guide, None if budget is None else [budget])
                for j in range(logits.size(0))]
        logits = torch.cat(rows)
    contexts = [list(prefix[-64:]) + list(extra[:j]) for j in range(logits.size(0))] if config.watermark else None
    if config.is_greedy:
        return marked(logits, config, contexts)
    return sampling_logits(logits, config, contexts).softmax(-1)


# ---------------------------------------------------------------------------------------- drafters
class Drafter(Protocol):
    def propose(self, tokens: list[int], k: int, config: GenerateConfig, generator: Optional[torch.Generator],
                generated: int = 0, end_ids: Collection[int] = (), guide: Any = None
                ) -> tuple[list[int], Optional[torch.Tensor]]:
        """Up to k guessed next tokens after `tokens` (whose last `generated` were generated: what the presence and
        frequency penalties and min_new_tokens count; `end_ids` and `guide` the row's), and the (k', V) distribution
        each was drawn from (None when the guesses are certain: a one-hot q)."""


class PromptLookup:
    """Guesses from the text itself: find the latest earlier occurrence of its last n tokens (n from max_ngram down
    to 1) and propose the tokens that followed it."""

    def __init__(self, max_ngram: int = 2) -> None:
        self.max_ngram = max_ngram

    def propose(self, tokens: list[int], k: int, config: GenerateConfig, generator: Optional[torch.Generator],
                generated: int = 0, end_ids: Collection[int] = (), guide: Any = None
                ) -> tuple[list[int], Optional[torch.Tensor]]:
        L = len(tokens)
        for n in range(min(self.max_ngram, L - 1), 0, -1):
            tail = tokens[L - n:]
            for i in range(L - n - 1, -1, -1):  # latest first; the match must be followed by a token
                if tokens[i:i + n] == tail:
                    return tokens[i + n:i + n + k], None
        return [], None


class DraftModel:
    """A smaller causal model with the target's vocabulary, decoding ahead with its own KV cache (one row). The
    cache keeps what it has read of the text; after a step, the guesses the target refused are forgotten. A
    CompiledGPT (generate.compiled) guesses through its compiled one-token step. Its guesses go through the row's
    penalties and bans too (those over the generated tokens included), as the model's check will."""

    def __init__(self, model: GPT) -> None:
        self.model = model.eval()
        self.block = model.config.block_size
        self.compiled = hasattr(model, "decode_step")
        self.cache = model.new_cache(1) if self.compiled else KVCache.for_model(model, 1)
        self.fed: list[int] = []  # the tokens the cache holds, from column `start` of the text
        self.start = 0

    def propose(self, tokens: list[int], k: int, config: GenerateConfig, generator: Optional[torch.Generator],
                generated: int = 0, end_ids: Collection[int] = (), guide: Any = None
                ) -> tuple[list[int], Optional[torch.Tensor]]:
        n = len(tokens)
        same = 0  # how much of the cache is still the text
        for a, b in zip(self.fed, tokens[self.start:]):
            if a != b:
                break
            same += 1
        self.fed, self.cache.pos = self.fed[:same], same
        if n - self.start >= self.block:  # the window is full: keep the newest half
            self.start, self.fed, self.cache.pos = n - max(1, self.block // 2), [], 0
        k = min(k, self.block - (n - self.start) + 1)
        device = self.model.tok_emb.weight.device
        guesses: list[int] = []
        probs = []
        new = tokens[self.start + len(self.fed):]
        for j in range(k):
            x = torch.tensor([new], device=device)
            if self.compiled and len(new) == 1 and self.cache.pos > 0:
                logits = self.model.decode_step(x, torch.ones(1, self.cache.pos + 1, dtype=torch.bool,
                                                              device=device), self.cache)  # (1, V)
            else:
                logits = self.model(x, self.cache)[:, -1]  # (1, V)
            self.fed += new
            scores = distributions(logits, tokens + guesses, [], config, tokens[n - generated:] + guesses, end_ids,
                                   guide)
            if config.is_greedy:
                token = int(scores.argmax(-1))
            else:
                token = int(draw(scores, generator))
                probs.append(scores[0])
            guesses.append(token)
            new = [token]
            threshold = config.assistant_confidence_threshold
            if threshold is not None and float(_probabilities(scores, config)[0, token]) < threshold:
                break  # unsure of this guess: the next ones would likely be refused with it
        return guesses, (torch.stack(probs) if probs else None)


def _probabilities(scores: torch.Tensor, config: GenerateConfig) -> torch.Tensor:
    """distributions' (1, V) scores as probabilities: greedy's processed scores through softmax, sampling's as they
    are (Hugging Face's ConfidenceCriteria reads the softmax of the draft's processed scores)."""
    return scores.float().softmax(-1) if config.is_greedy else scores


# ------------------------------------------------------------------------------------------ one row
class Target:
    """The model's view of one row: the text, and a KV cache holding text[start:-1] (all but the newest token)."""

    def __init__(self, model: GPT, prompt: list[int]) -> None:
        self.model, self.block = model, model.config.block_size
        self.tokens = list(prompt)
        self.cache = KVCache.for_model(model, 1)
        self.start = 0
        self._fill()

    def _fill(self) -> None:
        past = self.tokens[self.start:-1]
        if past:
            self.model(torch.tensor([past], device=self.model.tok_emb.weight.device), self.cache)

    def room(self) -> int:
        """Guesses one pass can check: the window must not slide inside it. Slides first when it must."""
        n = len(self.tokens)
        if n - self.start > self.block:  # plain decoding's rule: keep the newest block // 2 tokens
            self.start = n - max(1, self.block // 2)
            self.cache.reset()
            self._fill()
        return self.block - (n - self.start)

    def check(self, guesses: list[int]) -> torch.Tensor:
        """Logits (k + 1, V) after the text and after each prefix of the guesses; the cache now holds them all."""
        x = torch.tensor([self.tokens[-1:] + guesses], device=self.model.tok_emb.weight.device)
        return self.model(x, self.cache)[0]

    def take(self, kept: list[int], checked: int) -> None:
        """Keep `kept` (accepted guesses + the model's own token): the cache forgets the `checked` guesses'
        positions that were refused."""
        self.cache.pos -= checked - (len(kept) - 1)
        self.tokens += kept


def accept(guesses: list[int], q: Optional[torch.Tensor], p: torch.Tensor, config: GenerateConfig,
           generator: Optional[torch.Generator]) -> list[int]:
    """The guesses kept and the model's own next token, from the model's choices p (k + 1, V): processed scores
    (greedy) or probabilities (sampling); q (k, V) the drafter's probabilities (None: certain guesses)."""
    if config.is_greedy:
        choice = p.argmax(-1).tolist()
        kept = 0
        while kept < len(guesses) and guesses[kept] == choice[kept]:
            kept += 1
        return guesses[:kept] + [choice[kept]]
    for j, d in enumerate(guesses):
        q_d = q[j, d] if q is not None else 1.0
        u = torch.rand((), generator=generator, device=p.device, dtype=p.dtype)
        if u * q_d < p[j, d]:  # kept with probability min(1, p/q)
            continue
        if q is not None:
            left = (p[j] - q[j]).clamp_(min=0)
        else:
            left = p[j].clone()
            left[d] = 0
        if float(left.sum()) <= 0:  # p == q up to rounding: nothing left over, p itself is the distribution
            left = p[j]
        return guesses[:j] + [int(draw(left[None], generator))]
    return guesses + [int(draw(p[len(guesses)][None], generator))]


@torch.inference_mode()
def speculative_rows(model: GPT, rows: Sequence[Row], drafter_for: Callable[[Row], Drafter],
                     k: int) -> Iterator[list[Event]]:
    """Decode `rows` by speculation (drafter_for(row) gives each row its Drafter; k guesses per step at most), each
    with its own KV cache; yield, per step, the Events of the tokens that step kept for every unfinished row (one
    speculative step per row, rows in turn: each row's tokens are those it gets alone). Rows end by Row.advance, as
    in decode.decode_rows; each row's `drafted` / `accepted` count its guesses. A row whose config has the heuristic
    num_assistant_tokens_schedule guesses 2 more after a step that kept all its guesses, 1 fewer (1 at least) after
    one that did not."""
    live = [(index, row, Target(model, row.prompt), drafter_for(row)) for index, row in enumerate(rows)]
    guesses = [k] * len(rows)  # each row's guesses per step
    while True:
        live = [entry for entry in live if entry[1].finish is None]  # a reader may end a row (a server's cancel)
        if not live:
            return
        events: list[Event] = []
        for index, row, target, drafter in live:
            drafted, accepted = row.drafted, row.accepted
            events += _step(index, row, target, drafter, guesses[index])
            if row.config.num_assistant_tokens_schedule == "heuristic" and row.drafted > drafted:
                every = row.accepted - accepted == row.drafted - drafted
                guesses[index] = guesses[index] + 2 if every else max(1, guesses[index] - 1)
        yield events


def _step(index: int, row: Row, target: Target, drafter: Drafter, k: int) -> list[Event]:
    """One speculative step of one row: guess, check in one pass, keep; the Events of the kept tokens."""
    room = min(target.room(), row.budget - len(row.tokens) - 1, k)
    guesses, q = drafter.propose(target.tokens, room, row.config, row.generator, len(row.tokens), row.end_ids,
                                 row.guide) if room > 0 else ([], None)
    guesses = guesses[:room]
    q = q[:len(guesses)] if q is not None else None
    logits = target.check(guesses)  # (len(guesses) + 1, V)
    p = distributions(logits, target.tokens, guesses, row.config, row.tokens, row.end_ids, row.guide, row.budget)
    kept = accept(guesses, q, p, row.config, row.generator)
    row.drafted += len(guesses)
    row.accepted += len(kept) - 1
    target.take(kept, len(guesses))
    top = token_logprobs(logits[:len(kept)], torch.tensor(kept, device=logits.device), row.top_logprobs) \
        if row.top_logprobs is not None else None
    events = []
    for j, token in enumerate(kept):
        event = row.advance(index, token)
        if top is not None and event.token is not None:
            event = event._replace(logprobs=top[j]._replace(top=top[j].top[:row.top_logprobs]))
        events.append(event)
        if row.finish is not None:
            break
    return events


def early_exit(model: GPT, layers: int) -> GPT:
    """`model` cut after its first `layers` blocks: the same modules and weights (nothing copied), then the final
    norm and the head, which read the layer's output as they read the last one's (self-speculative decoding's draft).
    A compiled model's eager model is cut."""
    model = getattr(model, "model", model)  # a CompiledGPT (generate.compiled) holds the model it compiled
    n = model.config.n_layer
    if not 1 <= layers < n:
        raise ConfigError(f"generate.assistant_early_exit={layers} is not below the model's {n} layers: the draft is "
                          f"the model's first layers, 1 to {n - 1}")
    cut = copy.copy(model)  # a shallow copy: its own table of submodules, the same submodules
    cut._modules = dict(model._modules)
    cut.blocks = torch.nn.ModuleList(list(model.blocks)[:layers])
    cut.config = dataclasses.replace(model.config, n_layer=layers)
    return cut


def check_assistant(model: GPT, assistant: GPT) -> None:
    """A draft model must read and write the target's tokens: a causal language model with the same vocabulary."""
    if assistant.config.head != "lm" or not assistant.config.causal:
        raise ConfigError("the assistant (draft) model must be a causal language model (model.head lm, model.causal "
                          "true): it guesses the next tokens")
    if assistant.config.vocab_size != model.config.vocab_size:
        raise ConfigError(f"the assistant (draft) model has vocab_size {assistant.config.vocab_size} and the model "
                          f"{model.config.vocab_size}: a draft model must use the same tokenizer")
