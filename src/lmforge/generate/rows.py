"""The state of a decode: the batch's token table and KV cache (Sequences), and each row's own settings and
progress (Row), its text cut at stop strings (StopText) and its random stream (row_generators).

Rows of one batch are independent: each has its own budget, end ids, stop strings, sampling options
and generator. The rule that ends a row lives in Row.advance, once, for every reader (complete, stream,
the CLI and the server).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Sequence

import torch

from lmforge.errors import ConfigError
from lmforge.generate.config import GenerateConfig
from lmforge.generate.healing import heal
from lmforge.model import GPT, KVCache


# --------------------------------------------------------------------------------------------- the batch
def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """<START> + the prompt's tokens, the way training documents begin.

    A tokenizer without a start token (GPT-2's) puts nothing first; an empty prompt then starts from its
    end token, as GPT-2 samples "from nothing" (its <|endoftext|> separates documents). A prompt that writes the
    start token itself (an imported tokenizer reads special tokens in text: a chat template's bos) gets no second."""
    ids = tokenizer.encode(prompt)
    if tokenizer.start_id is not None and ids[:1] != [tokenizer.start_id]:
        ids = [tokenizer.start_id] + ids
    if not ids and tokenizer.end_id is not None:
        ids = [tokenizer.end_id]
    return ids


def crop_prompt(prompt_ids: Sequence[int], block_size: int) -> list[int]:
    """The prompt's last block_size tokens (with a warning when that drops some)."""
    ids = list(prompt_ids)
    if not ids:
        raise ConfigError("the prompt is empty and there is no start token; pass at least one token")
    if len(ids) > block_size:
        warnings.warn(f"prompt of {len(ids)} tokens is longer than block_size={block_size}; "
                      f"keeping its last {block_size} tokens", stacklevel=4)
        ids = ids[-block_size:]
    return ids


class Sequences:
    """Rows of token ids being extended one column per step, left-padded to a common width, with their KV cache.

    tokens (B, width + budget): the prompts right-aligned at column `width`, new tokens after it;
    real (B, width + budget) bool marks real tokens (None when no row is padded); `n` columns are filled.
    The cache holds the columns start..n-1 (start moves when the window slides: see the package docstring).
    """

    def __init__(self, model: GPT, prompts: list[list[int]], budget: int, pad_id: int = 0) -> None:
        device = model.tok_emb.weight.device
        B, self.width = len(prompts), max(len(p) for p in prompts)
        self.tokens = torch.full((B, self.width + budget), pad_id, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            self.tokens[row, self.width - len(prompt):self.width] = torch.tensor(prompt, dtype=torch.long)
        self.real = None
        if any(len(p) != self.width for p in prompts):
            pads = torch.tensor([self.width - len(p) for p in prompts], device=device)
            self.real = torch.arange(self.tokens.size(1), device=device)[None, :] >= pads[:, None]  # (B, width+budget)
        self.n, self.start = self.width, 0
        self.compiled = hasattr(model, "decode_step")  # a CompiledGPT (generate.compiled): its step, its cache
        self.block = model.config.block_size
        # as many columns as the rows can fill before the window slides: not block_size's when they end sooner
        self.cache = model.new_cache(B) if self.compiled else \
            KVCache.for_model(model, B, min(self.block, self.width + budget))

    def next_logits(self, model: GPT) -> torch.Tensor:
        """Last-position logits (B, V), feeding the cache what it lacks: the prompts, one new column, or,
        when the window is full, the newest block // 2 columns again."""
        if self.cache.pos == self.block:
            self.cache.reset()
            self.start = self.n - max(1, self.block // 2)
        first = self.start + self.cache.pos  # the first column the cache lacks
        if self.compiled and self.cache.pos > 0 and self.n - first == 1:  # one new column: the compiled step
            keys = self.real[:, self.start:self.n] if self.real is not None else \
                torch.ones(self.tokens.size(0), self.n - self.start, dtype=torch.bool, device=self.tokens.device)
            return model.decode_step(self.tokens[:, first:self.n], keys, self.cache)
        mask = self.real[:, self.start:self.n] if self.real is not None else None
        return model.last_logits(self.tokens[:, first:self.n], self.cache, mask)

    def append(self, token: torch.Tensor) -> None:
        self.tokens[:, self.n] = token
        self.n += 1

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (B,), in that order: tokens, padding and cache (beam search)."""
        self.tokens = self.tokens.index_select(0, index)
        self.real = self.real.index_select(0, index) if self.real is not None else None
        self.cache.reorder(index)

    def so_far(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(tokens (B, n), real (B, n) or None): every row's prompt and new tokens so far."""
        return self.tokens[:, :self.n], (self.real[:, :self.n] if self.real is not None else None)

    def new_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.width:self.n]  # (B, new tokens so far)


# ----------------------------------------------------------------------------------------------- a row
class StopText:
    """The text of one sequence as its tokens arrive, cut before the first stop string.

    push(token) decodes one token (the tokenizer's stream decoder holds back the bytes of a character cut
    in the middle) and returns the text now settled: text that can no longer turn out to be the start of
    a stop string. `stopped` turns True when a stop string appears; `text` then ends before it. close()
    returns what is left at the end. The pieces returned join to `text`. `lead`: bytes the text begins with, before
    any token (token healing: what the healed last prompt token adds to the prompt's text).
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str] = (), lead: bytes = b"") -> None:
        self.decoder = tokenizer.stream_decoder()
        self.stops = tuple(stop_strings)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text, self.sent, self.stopped = "", 0, False
        self.lead = self.decoder.push_bytes(lead)  # goes out with the first token's text

    def push(self, token_id: int, look: bool = True) -> str:
        """look=False: the stop strings are not looked for in this token's text (before min_new_tokens); a stop
        string that begins in it and ends in a later token's still counts."""
        piece, self.lead = self.lead + self.decoder.push(token_id), ""
        return self._add(piece, final=False, look=look)

    def close(self) -> str:
        piece, self.lead = self.lead + self.decoder.flush(), ""
        return self._add(piece, final=True)

    def _add(self, piece: str, final: bool, look: bool = True) -> str:
        if piece and not self.stopped:
            start = max(0, len(self.text) - self.longest + 1)  # a new match ends inside the new piece
            self.text += piece
            cuts = [i for s in self.stops if (i := self.text.find(s, start)) >= 0] if look else []
            if cuts:
                self.text, self.stopped = self.text[:min(cuts)], True
        end = len(self.text) if self.stopped or final else len(self.text) - self._held()
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def _held(self) -> int:
        """Length of the longest tail of the text that begins a stop string (held back until settled)."""
        for k in range(min(len(self.text), self.longest - 1), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stops):
                return k
        return 0


class Logprobs(NamedTuple):
    """The model's log probability of one token and of the k most likely tokens at its position (from the raw
    logits: before penalties, temperature and filters, as OpenAI and vLLM report them)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log probability), most likely first


class Event(NamedTuple):
    """What one decoding step did to one row."""

    row: int                 # index of the row in the decode
    token: Optional[int]     # the new token, or None when the row ended on an end id (not part of the output)
    text: str                # text settled by this step ("" without a tokenizer, or while held back)
    finish: Optional[str]    # None while running; "stop" (end id or stop string) | "length" (budget spent)
    logprobs: Optional[Logprobs] = None  # of `token`, when the row asks for them (Row.top_logprobs)


@dataclass(eq=False)
class Row:
    """One sequence of a decode: its prompt and settings, and where it stands."""

    prompt: list[int]                           # cropped to block_size
    config: GenerateConfig                      # its scoring options (GenerateConfig.scoring)
    budget: int                                 # new tokens at most
    end_ids: frozenset[int]                     # ids that end it, left out of its output
    generator: Optional[torch.Generator] = None  # its random draws (None: greedy)
    text: Optional[StopText] = None             # with a tokenizer: its text, stop strings applied
    tokens: list[int] = field(default_factory=list)  # new tokens so far (an end id is not one)
    finish: Optional[str] = None                # "stop" | "length" | "cancelled" (the reader left)
    top_logprobs: Optional[int] = None          # report each token's Logprobs with this many alternatives
    guide: Any = None                           # guided_regex / guided_json: its generate.guided.RegexGuide
    negative: Optional[list[int]] = None        # guidance_scale != 1: the unconditional side's prompt
    deadline: Optional[float] = None            # max_time: time.monotonic() past which it ends ("length")
    drafted: int = 0                            # speculative decoding: tokens guessed for it,
    accepted: int = 0                           # and of those, kept
    adapter: Optional[str] = None               # the LoRA adapter set it decodes with (lora.use_adapter); None:
    #                                             the base beside rows that name one, else what the caller chose

    def advance(self, index: int, token: int) -> Event:
        """Take this step's token: the one rule that ends a row (an end id, a stop string, a guided choice or
        pattern complete, the budget of tokens or of time)."""
        if token in self.end_ids:
            self.finish = "stop"
            return Event(index, None, self.text.close() if self.text else "", "stop")
        self.tokens.append(token)
        piece = self.text.push(token, look=len(self.tokens) >= self.config.min_new_tokens) if self.text else ""
        chosen = (self.config.guided_choice_ids is not None and self._chose()) or \
            (self.guide is not None and self.guide.complete(self.tokens))
        spent = len(self.tokens) >= self.budget or (self.deadline is not None and time.monotonic() >= self.deadline)
        if self.text is not None and not self.text.stopped and (spent or chosen):
            piece += self.text.close()  # the bytes a last, cut character left: a stop string may end in them
        if (self.text is not None and self.text.stopped) or chosen:
            self.finish = "stop"
        elif spent:
            self.finish = "length"
        return Event(index, token, piece, self.finish)

    def _chose(self) -> bool:
        """Whether the tokens are one of the guided choices and begin no longer one (then an end id decides)."""
        n = len(self.tokens)
        choices = [list(c) for c in self.config.guided_choice_ids or ()]
        return self.tokens in choices and not any(len(c) > n and c[:n] == self.tokens for c in choices)


def row_generators(config: GenerateConfig, copies: int, prompts: int, device: torch.device) -> list[torch.Generator]:
    """One generator per row (prompt-major: prompt p, copy j is row p * copies + j): copy 0 seeded with
    `seed`, copy j > 0 with the j-th number a generator seeded with `seed` draws, so a prompt draws the
    same tokens alone or batched with others."""
    seed = config.seed if config.seed is not None else torch.Generator().seed()  # null: a fresh random seed
    draws = torch.randint(2**62, (copies,), generator=torch.Generator().manual_seed(seed)).tolist()
    seeds = [seed] + draws[1:]
    return [torch.Generator(device=device).manual_seed(seeds[j]) for _ in range(prompts) for j in range(copies)]


def make_rows(model: GPT, prompts: Sequence[Sequence[int]], config: GenerateConfig, end_id: Optional[int] = None,
              tokenizer: Any = None) -> list[Row]:
    """num_return_sequences Rows per prompt (prompt-major), each with its budget, end ids, generator and
    (with a tokenizer) its text. Stop strings and token healing need the tokenizer."""
    if config.stop_strings and tokenizer is None:
        raise ConfigError("stop_strings need the tokenizer to read the text; pass tokenizer=")
    if config.token_healing and tokenizer is None:
        raise ConfigError("token_healing needs the tokenizer to find the tokens that extend the prompt's last; pass "
                          "tokenizer=")
    pattern = config.guided_pattern
    if pattern is not None and tokenizer is None:
        raise ConfigError("guided_regex and guided_json need the tokenizer to read the tokens' text; pass "
                          "tokenizer=")
    config = within_tokenizer(with_token_ids(config, tokenizer), model.config.vocab_size, tokenizer)
    config.check_vocabulary(model.config.vocab_size)
    healed = [heal(model, tokenizer, crop_prompt(p, model.config.block_size)) if config.token_healing else
              (crop_prompt(p, model.config.block_size), b"") for p in prompts]  # (prompt, bytes its text gains)
    cropped = [prompt for prompt, _ in healed]
    copies, device = config.num_return_sequences, model.tok_emb.weight.device
    generators = [None] * (len(cropped) * copies) if config.is_greedy else \
        row_generators(config, copies, len(cropped), device)
    end_ids = frozenset(config.end_ids(end_id))
    guide = None
    if pattern is not None:
        from lmforge.generate.guided import regex_guide

        guide = regex_guide(pattern, tokenizer, model.config.vocab_size)
    start = tokenizer.start_id if tokenizer is not None else None
    deadline = time.monotonic() + config.max_time if config.max_time is not None else None
    negatives = [None if config.guidance_scale == 1.0 else crop_prompt(
        config.negative_prompt_ids or ([start] if start is not None else prompt[-1:]), model.config.block_size)
        for prompt in cropped]
    return [Row(prompt, config, config.new_tokens(len(prompt)), end_ids, generators[p * copies + j],
                StopText(tokenizer, config.stop_strings or (), healed[p][1]) if tokenizer is not None else None,
                guide=guide, negative=negatives[p], deadline=deadline)
            for p, prompt in enumerate(cropped) for j in range(copies)]


def within_tokenizer(config: GenerateConfig, vocab_size: int, tokenizer: Any) -> GenerateConfig:
    """`config` with the ids of a model of vocab_size that the tokenizer has no token for suppressed: a padded
    embedding's extra rows (many imported models round their vocabulary up) would otherwise be drawn now and then,
    and no text stands for them."""
    if tokenizer is None or tokenizer.vocab_size >= vocab_size:
        return config
    past = set(range(tokenizer.vocab_size, vocab_size))
    return dataclasses.replace(config, suppress_tokens=sorted(set(config.suppress_tokens or ()) | past))


def with_token_ids(config: GenerateConfig, tokenizer: Any) -> GenerateConfig:
    """`config` with the texts that stand for token sequences encoded: bad_words into bad_words_ids, each text as
    written and after a space (a word inside the text is often another token than at its start), as vLLM does;
    guided_choice into guided_choice_ids, each as the tokenizer encodes it after the prompt (encode_continuation:
    no SentencePiece first-word space); negative_prompt into
    negative_prompt_ids, as a prompt (prompt_ids)."""
    if not config.bad_words and config.guided_choice is None and config.negative_prompt is None:
        return config
    if tokenizer is None:
        raise ConfigError("bad_words, guided_choice and negative_prompt need the tokenizer to encode them; pass "
                          "tokenizer=, or give bad_words_ids / guided_choice_ids / negative_prompt_ids")
    changes: dict[str, Any] = {}
    if config.negative_prompt is not None:
        changes.update(negative_prompt=None, negative_prompt_ids=prompt_ids(tokenizer, config.negative_prompt))
    if config.bad_words:
        sequences = [list(ids) for ids in config.bad_words_ids or ()]
        for word in config.bad_words:
            for form in (word.lstrip(), " " + word.lstrip()):
                ids = tokenizer.encode_continuation(form)
                if ids and ids not in sequences:
                    sequences.append(ids)
        changes.update(bad_words=None, bad_words_ids=sequences)
    if config.guided_choice is not None:
        changes.update(guided_choice=None,
                       guided_choice_ids=[tokenizer.encode_continuation(c) for c in config.guided_choice])
    return dataclasses.replace(config, **changes)
