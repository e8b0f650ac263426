"""Text generation: decoding over a GPT and its KV cache.

One decoding step per new token:  prefill the prompts once -> turn the last logits into scores
(repetition penalty, no-repeat n-grams, then temperature / top-k / top-p / min-p) -> pick a token
(greedy argmax, or a draw) -> feed that one token through the cache -> ... until the new-token budget,
or until every sequence has stopped (an end token, a stop token id, or a stop string in its text).
Beam search (num_beams > 1) keeps the num_beams most likely continuations instead (see beam_search).

Prompts are encoded as <START> + prompt tokens, the way documents were stored for training
(<START> text <END>). A prompt longer than block_size is cropped from the left, with a warning.

Batches: several prompts (and num_return_sequences copies of each) decode as one batch, left-padded to
the longest prompt. The model gets an attention mask, so a row's positions count only its own tokens
and no query sees a pad: each row computes what it would alone (equal up to float rounding in the
order of sums). Sampling gives each row its own random generator (sample j of every prompt is seeded
from (seed, j): see row_generators), so a prompt draws the same tokens alone or in a batch.

Past the context: a learned/sinusoidal/RoPE position cannot go beyond block_size, so when the sequence
fills the window it slides: the cache is rebuilt by one forward pass over the newest block_size // 2
tokens and decoding continues from there. The model therefore always sees between block_size/2 and
block_size tokens of context, and pays one prefill per block_size/2 new tokens (nanoGPT instead runs
the newest block_size tokens through the whole model for every new token: a full window, many times slower).
A padded batch slides all rows at once, when its longest row fills the window: a batched row equals its
unbatched result as long as the longest prompt plus the new tokens fit in block_size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from lmforge.config import doc
from lmforge.errors import ConfigError
from lmforge.model import GPT, KVCache

EARLY_STOPPING = (True, False, "never")


@dataclass
class GenerateConfig:
    """How to continue a prompt."""

    max_new_tokens: Optional[int] = doc("Tokens to generate at most (when max_length is null); null = 100.", None)
    max_length: Optional[int] = doc("Prompt (with <START>) plus new tokens at most; overrides max_new_tokens.", None)
    greedy: bool = doc("Always take the most likely token (as does temperature 0).", False)
    temperature: float = doc("Divide logits by this before sampling; 0 = greedy.", 1.0)
    top_k: Optional[int] = doc("Sample only among the k most likely tokens; null = all.", None)
    top_p: Optional[float] = doc("Nucleus sampling: the smallest set of tokens with probability >= top_p; null = 1 = all.", None)
    min_p: Optional[float] = doc("Sample only tokens with probability >= min_p * that of the most likely; null = all.", None)
    repetition_penalty: float = doc("Divide positive logits (multiply negative ones) of tokens already in the "
                                    "sequence, prompt included, by this (Keskar et al. 2019); 1 = off.", 1.0)
    no_repeat_ngram_size: int = doc("Never repeat an n-gram of this size (prompt included); 0 = off.", 0)
    num_beams: int = doc("Beam search with this many beams (deterministic: no sampling options apply); 1 = off.", 1)
    length_penalty: float = doc("Beam search: a finished beam scores sum(log p) / new_tokens ** length_penalty.", 1.0)
    early_stopping: Union[bool, str] = doc("Beam search: true = stop when num_beams beams have finished; false = "
                                           "also until no running beam can beat them (heuristic); 'never' = exact.",
                                           False)
    stop_strings: Optional[list[str]] = doc("Stop a sequence when its text contains one of these; the text "
                                            "returned ends before it. Not with beam search.", None)
    stop_token_ids: Optional[list[int]] = doc("Token ids that end a sequence, besides the tokenizer's end token "
                                              "(excluded from the output).", None)
    seed: Optional[int] = doc("Seed of the sampling generators (same seed, same tokens); null = random.", None)
    num_return_sequences: int = doc("Continuations returned per prompt (generated as one batch; with beam "
                                    "search the best ones, at most num_beams).", 1)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_length", "top_k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"generate.{name}={value!r} is invalid: a positive integer or null")
        if not self.temperature >= 0.0:
            raise ConfigError(f"generate.temperature={self.temperature!r} is invalid: 0 (greedy) or a positive number")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"generate.top_p={self.top_p!r} is invalid: a probability in (0, 1]")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"generate.min_p={self.min_p!r} is invalid: a probability in [0, 1]")
        if not self.repetition_penalty > 0.0:
            raise ConfigError(f"generate.repetition_penalty={self.repetition_penalty!r} is invalid: a positive "
                              "number (1 = off, above 1 discourages repeats)")
        for name in ("num_return_sequences", "num_beams"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"generate.{name}={value!r} is invalid: a positive integer")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise ConfigError(f"generate.no_repeat_ngram_size={self.no_repeat_ngram_size!r} is invalid: "
                              "0 (off) or a positive integer")
        if self.early_stopping not in EARLY_STOPPING or not isinstance(self.early_stopping, (bool, str)):
            raise ConfigError(f"generate.early_stopping={self.early_stopping!r} is invalid: true, false or 'never'")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ConfigError(f"generate.num_return_sequences={self.num_return_sequences} is more than "
                              f"num_beams={self.num_beams}: beam search returns at most num_beams sequences")
        if self.stop_strings is not None:
            if isinstance(self.stop_strings, str):
                self.stop_strings = [self.stop_strings]
            if not all(isinstance(s, str) and s for s in self.stop_strings):
                raise ConfigError(f"generate.stop_strings={self.stop_strings!r} is invalid: a list of non-empty strings")
            if self.num_beams > 1:
                raise ConfigError(f"generate.stop_strings={self.stop_strings!r} cannot be used with beam search "
                                  "(num_beams > 1): use stop_token_ids, or num_beams=1")
        if self.stop_token_ids is not None and not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ConfigError(f"generate.stop_token_ids={self.stop_token_ids!r} is invalid: a list of token ids")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    def new_tokens(self, prompt_len: int) -> int:
        """The new-token budget after a prompt of prompt_len tokens: max_length if set, else max_new_tokens."""
        if self.max_length is not None:
            if self.max_length <= prompt_len:
                raise ConfigError(f"generate.max_length={self.max_length} leaves no room after a prompt of "
                                  f"{prompt_len} tokens; raise it or set max_new_tokens")
            return self.max_length - prompt_len
        return self.max_new_tokens if self.max_new_tokens is not None else 100

    def end_ids(self, end_id: Optional[int]) -> list[int]:
        """The token ids that end a sequence: the tokenizer's end token and stop_token_ids."""
        ids = [end_id] if end_id is not None else []
        return ids + [t for t in (self.stop_token_ids or []) if t not in ids]


# ------------------------------------------------------------------------------------ scoring tokens
def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores (B, V) of tokens already seen (B, V) bool: positive ones divided by `penalty`, negative ones
    multiplied (CTRL, Keskar et al. 2019, sec. 4.1, as Hugging Face applies it), so above 1 they all drop."""
    penalized = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalized, scores)


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


def next_token(logits: torch.Tensor, config: GenerateConfig, generator: Union[None, torch.Generator,
               Sequence[torch.Generator]] = None) -> torch.Tensor:
    """The next token (B,) from last-position scores (B, V): the argmax, or a draw after temperature and
    the filters. `generator`: one for the whole batch, or one per row (each row then draws alone)."""
    if config.is_greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / config.temperature, config.top_k, config.top_p, config.min_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generator)]).squeeze(1)


def row_generators(config: GenerateConfig, copies: int, prompts: int, device: torch.device) -> list[torch.Generator]:
    """One generator per row (prompt-major: prompt p, copy j is row p * copies + j): copy 0 seeded with
    `seed`, copy j > 0 with the j-th number a generator seeded with `seed` draws, so a prompt draws the
    same tokens alone or batched with others."""
    seed = config.seed if config.seed is not None else torch.Generator().seed()  # null: a fresh random seed
    draws = torch.randint(2**62, (copies,), generator=torch.Generator().manual_seed(seed)).tolist()
    seeds = [seed] + draws[1:]
    return [torch.Generator(device=device).manual_seed(seeds[j]) for _ in range(prompts) for j in range(copies)]


# ---------------------------------------------------------------------------------------- sequences
def crop_prompt(prompt_ids: Sequence[int], block_size: int) -> list[int]:
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
    The cache holds the columns start..n-1 (start moves when the window slides).
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
        self.cache = KVCache.for_model(model, B)
        self.block = model.config.block_size

    def next_logits(self, model: GPT) -> torch.Tensor:
        """Last-position logits (B, V), feeding the cache what it lacks: the prompts, one new column, or,
        when the window is full, the newest block // 2 columns again (see the module docstring)."""
        if self.cache.pos == self.block:
            self.cache.reset()
            self.start = self.n - max(1, self.block // 2)
        first = self.start + self.cache.pos  # the first column the cache lacks
        mask = self.real[:, self.start:self.n] if self.real is not None else None
        return model(self.tokens[:, first:self.n], self.cache, mask)[:, -1]

    def append(self, token: torch.Tensor) -> None:
        self.tokens[:, self.n] = token
        self.n += 1

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (B,), in that order: tokens, padding and cache (beam search)."""
        self.tokens = self.tokens.index_select(0, index)
        self.real = self.real.index_select(0, index) if self.real is not None else None
        self.cache.reorder(index)

    def seen_tokens(self, vocab_size: int) -> torch.Tensor:
        """(B, V) bool: the tokens present in each row so far (pads excluded)."""
        ids = self.tokens[:, :self.n]
        if self.real is not None:
            ids = ids.masked_fill(~self.real[:, :self.n], vocab_size)  # pads go to an extra column
        seen = torch.zeros(ids.size(0), vocab_size + 1, dtype=torch.bool, device=ids.device)
        return seen.scatter_(1, ids, True)[:, :vocab_size]

    def new_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.width:self.n]  # (B, new tokens so far)


def process_scores(scores: torch.Tensor, seqs: Sequences, config: GenerateConfig) -> torch.Tensor:
    """Scores (B, V) after the repetition penalty and the no-repeat n-gram ban (Hugging Face's logits
    processors of the same names); temperature and the filters come later, when sampling."""
    if config.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seqs.seen_tokens(scores.size(-1)), config.repetition_penalty)
    if config.no_repeat_ngram_size > 0:
        real = seqs.real[:, :seqs.n] if seqs.real is not None else None
        banned = banned_ngram_tokens(seqs.tokens[:, :seqs.n], real, config.no_repeat_ngram_size, scores.size(-1))
        scores = scores.masked_fill(banned, -torch.inf)
    return scores


# ---------------------------------------------------------------------------------------- stopping
class Stopping:
    """Which rows have stopped: an end token, the row's budget, or (with a tokenizer) a stop string in its text."""

    def __init__(self, budgets: list[int], end_ids: Sequence[int], device: torch.device,
                 stop_strings: Optional[Sequence[str]] = None, tokenizer: Any = None) -> None:
        self.done = torch.zeros(len(budgets), dtype=torch.bool, device=device)
        self.budgets = torch.tensor(budgets, device=device)
        self.end_ids = torch.tensor(list(end_ids), dtype=torch.long, device=device)
        self.stop_strings = list(stop_strings or [])
        if self.stop_strings and tokenizer is None:
            raise ConfigError("stop_strings need the tokenizer to read the text; pass tokenizer=")
        self.longest = max((len(s) for s in self.stop_strings), default=0)
        self.decoders = [tokenizer.stream_decoder() for _ in budgets] if self.stop_strings else []
        self.texts = [""] * len(budgets)

    def update(self, token: torch.Tensor, step: int) -> bool:
        """Record step `step`'s tokens (B,); True when every row has stopped."""
        self.done |= torch.isin(token, self.end_ids) | (self.budgets <= step + 1)
        for row in range(len(self.decoders)):
            if not self.done[row]:
                piece = self.decoders[row].push(int(token[row]))
                self.texts[row] += piece
                tail = self.texts[row][-(len(piece) + self.longest - 1):] if piece else ""
                if any(s in tail for s in self.stop_strings):
                    self.done[row] = True
        return bool(self.done.all())


def cut_at_stop_string(text: str, stop_strings: Optional[Sequence[str]]) -> str:
    """text up to (not including) the earliest occurrence of any stop string."""
    cuts = [text.find(s) for s in stop_strings or [] if s in text]
    return text[:min(cuts)] if cuts else text


# ---------------------------------------------------------------------------------------- decoding
def prepare_prompts(model: GPT, prompts: Sequence[Sequence[int]], config: GenerateConfig) -> tuple[list, list]:
    """(cropped prompts, new-token budget of each)."""
    cropped = [crop_prompt(p, model.config.block_size) for p in prompts]
    return cropped, [config.new_tokens(len(p)) for p in cropped]


@torch.inference_mode()
def decode_batch(model: GPT, prompts: Sequence[Sequence[int]], config: GenerateConfig,
                 end_ids: Sequence[int] = (), tokenizer: Any = None,
                 generators: Optional[Sequence[torch.Generator]] = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) long with B = len(prompts) * num_return_sequences
    (prompt-major), per step, by greedy decoding or sampling (not beam search). Sampling draws from
    `generators`, one per row, when given (default: row_generators).

    Stops after the step where every row has stopped (an id in end_ids, its budget, a stop string:
    stopped rows keep being fed, their later tokens are to be ignored), or after the longest budget.
    The model should be in eval mode.
    """
    prompts, budgets = prepare_prompts(model, prompts, config)
    copies = config.num_return_sequences
    rows = [p for p in prompts for _ in range(copies)]
    device = model.tok_emb.weight.device
    if generators is None and not config.is_greedy:
        generators = row_generators(config, copies, len(prompts), device)
    if generators is not None and len(generators) == 1:
        generators = generators[0]
    stopping = Stopping([b for b in budgets for _ in range(copies)], end_ids, device, config.stop_strings, tokenizer)
    seqs = Sequences(model, rows, max(budgets))
    plain = config.repetition_penalty == 1.0 and config.no_repeat_ngram_size == 0
    for step in range(max(budgets)):
        logits = seqs.next_logits(model)  # (B, V)
        scores = logits if plain else process_scores(logits, seqs, config)
        token = next_token(scores, config, generators)  # (B,)
        seqs.append(token)
        yield token
        if stopping.update(token, step):
            return


def decode(model: GPT, prompt_ids: Sequence[int], config: GenerateConfig,
           end_id: Optional[int] = None) -> Iterator[torch.Tensor]:
    """decode_batch for one prompt: the next token (num_return_sequences,) per step."""
    return decode_batch(model, [prompt_ids], config, config.end_ids(end_id))


@torch.inference_mode()
def beam_search(model: GPT, prompts: Sequence[Sequence[int]], config: GenerateConfig,
                end_ids: Sequence[int] = ()) -> list[list[list[int]]]:
    """The num_return_sequences best of num_beams beams for each prompt: [prompt][rank] -> new token ids
    (an end id ends a beam and is left out). Hugging Face's beam search, step for step:

    all num_beams * V continuations of the running beams are scored by their summed log-probabilities
    (after repetition penalty / n-gram ban); of the best K = max(2, 1 + len(end_ids)) * num_beams, those
    ending in an end id (or reaching the budget) and ranked within the first num_beams become finished
    hypotheses, scored sum(log p) / new_tokens ** length_penalty (the best num_beams are kept), and the
    best num_beams others run on. A prompt is done when num_beams hypotheses are finished and either
    early_stopping is true or no running beam can still beat the worst of them: its score divided by the
    current length ** length_penalty (the budget's length with 'never' and length_penalty > 0) is no higher.
    """
    prompts, budgets = prepare_prompts(model, prompts, config)
    nb, P = config.num_beams, len(prompts)
    device = model.tok_emb.weight.device
    seqs = Sequences(model, [p for p in prompts for _ in range(nb)], max(budgets))
    beam_scores = torch.zeros(P, nb, device=device)  # summed log-probabilities of the running beams
    beam_scores[:, 1:] = -1e9  # all beams start equal: let only the first one propose continuations
    K = max(2, 1 + len(end_ids)) * nb
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(P)]  # (score, tokens), best first
    done = [False] * P
    for step in range(max(budgets)):
        log_probs = process_scores(F.log_softmax(seqs.next_logits(model).float(), dim=-1), seqs, config)  # (P*nb, V)
        V = log_probs.size(-1)
        totals = (log_probs + beam_scores.view(-1, 1)).view(P, nb * V)  # every continuation of every beam
        top_scores, top_index = totals.topk(K, dim=-1)  # (P, K), best first
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        history = seqs.new_tokens().tolist()  # (P*nb, new tokens so far)
        parents, tokens, scores = [], [], []
        for p in range(P):
            if done[p]:  # keep its beams as they are; their tokens are never read
                parents += [p * nb + b for b in range(nb)]
                tokens += [0] * nb
                scores += beam_scores[p].tolist()
                continue
            last = step + 1 == budgets[p]
            running: list[tuple[int, int, float]] = []
            for rank, (score, index) in enumerate(zip(top_scores[p], top_index[p])):
                beam, token = divmod(index, V)
                if token in end_ids or last:
                    if rank < nb:
                        add_hypothesis(finished[p], score / (step + 1) ** config.length_penalty,
                                       history[p * nb + beam] + [token], nb)
                elif len(running) < nb:
                    running.append((p * nb + beam, token, score))
            running += [(p * nb, 0, -1e9)] * (nb - len(running))  # (only at the end of the budget)
            parents += [r[0] for r in running]
            tokens += [r[1] for r in running]
            scores += [r[2] for r in running]
            length = budgets[p] if config.early_stopping == "never" and config.length_penalty > 0 else step + 1
            done[p] = last or (len(finished[p]) == nb and (
                config.early_stopping is True or running[0][2] / length ** config.length_penalty <= finished[p][-1][0]))
        if all(done):
            break
        seqs.reorder(torch.tensor(parents, device=device))
        seqs.append(torch.tensor(tokens, device=device))
        beam_scores = torch.tensor(scores, device=device).view(P, nb)
    return [[[t for t in hyp if t not in end_ids] for _, hyp in finished[p][:config.num_return_sequences]]
            for p in range(P)]


def add_hypothesis(finished: list[tuple[float, list[int]]], score: float, tokens: list[int], keep: int) -> None:
    """Insert a finished beam into `finished` (best first), keeping the best `keep`."""
    finished.append((score, tokens))
    finished.sort(key=lambda hyp: -hyp[0])  # stable: an earlier hypothesis wins a tie
    del finished[keep:]


def generate_batch_ids(model: GPT, prompts: Sequence[Sequence[int]], config: Optional[GenerateConfig] = None,
                       end_id: Optional[int] = None, tokenizer: Any = None,
                       **kwargs: Any) -> list[list[list[int]]]:
    """New token ids for each prompt and each of its num_return_sequences sequences: [prompt][sequence] -> ids
    (without the prompt, cut before the first end id: end_id or a stop_token_ids entry, and within the
    prompt's budget). Options come as a GenerateConfig or as its fields in kwargs; stop_strings need the
    tokenizer (they end generation; cutting the text at them is left to the caller: see generate)."""
    config = config or GenerateConfig(**kwargs)
    end_ids = config.end_ids(end_id)
    if not prompts:
        return []
    if config.num_beams > 1:
        return beam_search(model, prompts, config, end_ids)
    with warnings.catch_warnings():  # a cropped prompt is reported once, by the decoding below
        warnings.simplefilter("ignore")
        _, budgets = prepare_prompts(model, prompts, config)
    steps = list(decode_batch(model, prompts, config, end_ids, tokenizer))
    copies = config.num_return_sequences
    table = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(len(prompts) * copies)]
    out = []
    for p, budget in enumerate(budgets):
        rows = []
        for row in table[p * copies:(p + 1) * copies]:
            row = row[:budget]
            ends = [row.index(e) for e in end_ids if e in row]
            rows.append(row[:min(ends)] if ends else row)
        out.append(rows)
    return out


def generate_ids(model: GPT, prompt_ids: Sequence[int], config: Optional[GenerateConfig] = None,
                 end_id: Optional[int] = None, **kwargs: Any) -> list[list[int]]:
    """New token ids (without the prompt, cut before end_id) for each of num_return_sequences samples.
    Options come as a GenerateConfig or as its fields in kwargs."""
    return generate_batch_ids(model, [prompt_ids], config, end_id, **kwargs)[0]


# ----------------------------------------------------------------------------------------------- text
def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """<START> + the prompt's tokens, the way training documents begin.

    A tokenizer without a start token (GPT-2's) puts nothing first; an empty prompt then starts from its
    end token, as GPT-2 samples "from nothing" (its <|endoftext|> separates documents)."""
    start = [tokenizer.start_id] if tokenizer.start_id is not None else []
    ids = start + tokenizer.encode(prompt)
    if not ids and tokenizer.end_id is not None:
        ids = [tokenizer.end_id]
    return ids


class Completion(NamedTuple):
    """One generated continuation, with what a server reports about it."""

    text: str  # the new text, ending before a stop string
    token_ids: list[int]  # the new tokens, without an end token
    finish_reason: str  # "stop" (end token, stop token id or stop string) or "length" (the budget ran out)
    prompt_tokens: int  # tokens of the prompt as the model saw it (<START> included, after cropping)


def complete(model: GPT, tokenizer: Any, prompts: Sequence[str], config: Optional[GenerateConfig] = None,
             **kwargs: Any) -> list[list[Completion]]:
    """The num_return_sequences Completions of each prompt, all decoded as one batch: [prompt][sequence]."""
    config = config or GenerateConfig(**kwargs)
    if not prompts:
        return []
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    ids = generate_batch_ids(model, encoded, config, tokenizer.end_id, tokenizer)
    out = []
    for prompt, rows in zip(encoded, ids):
        n_prompt = min(len(prompt), model.config.block_size)
        budget = config.new_tokens(n_prompt)
        completions = []
        for row in rows:
            text = tokenizer.decode(row)
            cut = cut_at_stop_string(text, config.stop_strings)
            reason = "stop" if len(row) < budget or len(cut) < len(text) else "length"
            completions.append(Completion(cut, row, reason, n_prompt))
        out.append(completions)
    return out


def generate(model: GPT, tokenizer: Any, prompt: Union[str, Sequence[str]], config: Optional[GenerateConfig] = None,
             **kwargs: Any) -> Union[str, list[str], list[list[str]]]:
    """The continuation of `prompt` (the new text only, ending before a stop string).

    prompt a str: a str, or a list of num_return_sequences texts when that is above 1.
    prompt a list of str (decoded as one batch): one entry per prompt, each a str or such a list.
    """
    config = config or GenerateConfig(**kwargs)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    out: list = []
    for rows in complete(model, tokenizer, prompts, config):
        texts = [c.text for c in rows]
        out.append(texts[0] if config.num_return_sequences == 1 else texts)
    return out[0] if isinstance(prompt, str) else out


def stream(model: GPT, tokenizer: Any, prompt: str, config: Optional[GenerateConfig] = None,
           **kwargs: Any) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces while it is generated (one sequence, no beams).
    The pieces join to generate()'s text; text that may begin a stop string is held back until it does not."""
    config = config or GenerateConfig(**kwargs)
    if config.num_return_sequences != 1 or config.num_beams != 1:
        raise ConfigError("stream() generates one sequence without beam search; set num_return_sequences=1 and "
                          "num_beams=1, or use generate()")
    end_ids = config.end_ids(tokenizer.end_id)
    steps = decode_batch(model, [prompt_ids(tokenizer, prompt)], config, end_ids, tokenizer)
    pieces = text_pieces(tokenizer, (int(t[0]) for t in steps), end_ids)
    return until_stop_string(pieces, config.stop_strings) if config.stop_strings else pieces


def text_pieces(tokenizer: Any, token_ids: Iterator[int], end_ids: Optional[Sequence[int]] = None) -> Iterator[str]:
    """Decode token ids arriving one by one into text pieces, up to an end id (default: the tokenizer's);
    the pieces join to the full text.

    The tokenizer's stream decoder holds back the bytes of a character cut in the middle (byte tokens,
    BPE pieces) until the tokens that complete it arrive, so no piece carries half a character.
    """
    end_ids = [tokenizer.end_id] if end_ids is None else end_ids
    decoder = tokenizer.stream_decoder()
    for token_id in token_ids:
        if token_id in end_ids:
            break
        piece = decoder.push(token_id)
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:  # bytes that never formed a complete character
        yield rest


def until_stop_string(pieces: Iterator[str], stop_strings: Sequence[str]) -> Iterator[str]:
    """Pass text pieces on up to the first stop string (excluded), then stop pulling. The longest tail
    that could be the start of a stop string is held back until the next piece settles it."""
    pending = ""
    for piece in pieces:
        pending += piece
        cut = cut_at_stop_string(pending, stop_strings)
        if len(cut) < len(pending):
            if cut:
                yield cut
            return
        hold = max((k for s in stop_strings for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        if len(pending) > hold:
            yield pending[:len(pending) - hold]
            pending = pending[len(pending) - hold:]
    if pending:
        yield pending


# ------------------------------------------------------------------------------ faster CPU decoding
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Int8Linear(torch.nn.Module):
    """nn.Linear with int8 weights, one scale per output channel (weight-only quantization, as torchao's
    int8 weight-only; symmetric: w ~= scale * q, q in [-127, 127]). Decoding one token reads every weight
    once, so a quarter of fp32's bytes is most of the speed; the product runs on bf16 activations
    (PyTorch's _weight_int8pack_mm kernel) and returns fp32."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("qweight", (w / scale[:, None]).round().to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.qweight, self.scale)
        y = y.float().view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def apply_inference_dtype(model: GPT, dtype: str = "fp32", quantize: Optional[str] = None) -> GPT:
    """The model for decoding with fewer bytes read per token: `dtype` fp32 (exact, default) | bf16 | fp16
    casts every weight; `quantize="int8"` replaces every nn.Linear by an Int8Linear (CPU, fp32 model;
    the token embedding stays fp32). Modifies and returns `model`."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is invalid: choose one of {', '.join(DTYPES)}")
    if quantize not in (None, "int8"):
        raise ConfigError(f"quantize={quantize!r} is invalid: null or 'int8'")
    model = model.to(DTYPES[dtype])
    if quantize == "int8":
        if model.tok_emb.weight.device.type != "cpu" or dtype != "fp32":
            raise ConfigError("quantize='int8' runs on the CPU with dtype fp32; use --device cpu, or bf16 instead")
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(module, name, Int8Linear(child))
    return model


def apply_compile(model: GPT) -> GPT:
    """torch.compile(model, dynamic=True): one graph serves every cache length and batch size (the first
    calls compile, tens of seconds on a CPU); a decoding step then runs as a few fused kernels instead of
    ~50 module calls, which is most of the time of a small model."""
    return torch.compile(model, dynamic=True)  # type: ignore[return-value]


class TextGenerator:
    """A model and its tokenizer, ready to continue prompts: .generate(prompt, **kw), .stream(prompt, **kw).
    compile=True decodes through apply_compile(model)."""

    def __init__(self, model: GPT, tokenizer: Any, compile: bool = False) -> None:
        self.model = apply_compile(model.eval()) if compile else model.eval()
        self.tokenizer = tokenizer

    def generate(self, prompt: Union[str, Sequence[str]], **kwargs: Any) -> Union[str, list[str], list[list[str]]]:
        """The continuation of prompt, or of each prompt of a list (one batch); kwargs are GenerateConfig
        fields. A str per prompt, or a list of them when num_return_sequences > 1."""
        return generate(self.model, self.tokenizer, prompt, **kwargs)

    def stream(self, prompt: str, **kwargs: Any) -> Iterator[str]:
        """Text pieces of one continuation as they are generated; kwargs are GenerateConfig fields."""
        return stream(self.model, self.tokenizer, prompt, **kwargs)

    def complete(self, prompts: Sequence[str], **kwargs: Any) -> list[list[Completion]]:
        """Completion(text, token_ids, finish_reason, prompt_tokens) per prompt and sequence, as one batch."""
        return complete(self.model, self.tokenizer, prompts, **kwargs)


def load(path: str, device: str = "cpu", dtype: str = "fp32", quantize: Optional[str] = None,
         compile: bool = False) -> TextGenerator:
    """A TextGenerator over the checkpoint at `path` (a run directory: its newest complete checkpoint);
    dtype / quantize as apply_inference_dtype (default fp32, exact), compile as apply_compile."""
    from lmforge.checkpoint import load_for_inference  # imported on use: reads files, pulls in the tokenizer

    model, tokenizer, _ = load_for_inference(path, device)
    return TextGenerator(apply_inference_dtype(model, dtype, quantize), tokenizer, compile)
