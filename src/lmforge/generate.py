"""Text generation: decoding over a GPT and its KV cache.

Decoding steps, one token per step:  prefill the prompt once -> pick a token from the last logits
(greedy, or sample with temperature / top-k / top-p) -> feed that one token through the cache -> ...
until max_new_tokens, or every sequence has emitted the tokenizer's end token.

Prompts are encoded as <START> + prompt tokens, the way documents were stored for training
(<START> text <END>). A prompt longer than block_size is cropped from the left, with a warning.

Past the context: a learned/sinusoidal/RoPE position cannot go beyond block_size, so when the sequence
fills the window it slides: the cache is rebuilt by one forward pass over the newest block_size // 2
tokens and decoding continues from there. The model therefore always sees between block_size/2 and
block_size tokens of context, and pays one prefill per block_size/2 new tokens (nanoGPT instead runs
the newest block_size tokens through the whole model for every new token: a full window, many times slower).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from lmforge.config import doc
from lmforge.errors import ConfigError
from lmforge.model import GPT, KVCache


@dataclass
class GenerateConfig:
    """How to continue a prompt."""

    max_new_tokens: Optional[int] = doc("Tokens to generate at most (when max_length is null); null = 100.", None)
    max_length: Optional[int] = doc("Prompt (with <START>) plus new tokens at most; overrides max_new_tokens.", None)
    greedy: bool = doc("Always take the most likely token (as does temperature 0).", False)
    temperature: float = doc("Divide logits by this before sampling; 0 = greedy.", 1.0)
    top_k: Optional[int] = doc("Sample only among the k most likely tokens; null = all.", None)
    top_p: Optional[float] = doc("Nucleus sampling: the smallest set of tokens with probability >= top_p; null = 1 = all.", None)
    seed: Optional[int] = doc("Seed of the sampling generator (same seed, same tokens); null = random.", None)
    num_return_sequences: int = doc("Continuations generated (as one batch) for the prompt.", 1)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_length", "top_k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"generate.{name}={value!r} is invalid: a positive integer or null")
        if not self.temperature >= 0.0:
            raise ConfigError(f"generate.temperature={self.temperature!r} is invalid: 0 (greedy) or a positive number")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"generate.top_p={self.top_p!r} is invalid: a probability in (0, 1]")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            raise ConfigError(f"generate.num_return_sequences={self.num_return_sequences!r} is invalid: "
                              "a positive integer")

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


# ------------------------------------------------------------------------------------ picking a token
def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Set to -inf every logit (B, V) outside the top k, then outside the nucleus of mass top_p
    (Holtzman et al. 2020: the smallest most-likely set whose probability reaches top_p)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), -torch.inf)
    return logits


def next_token(logits: torch.Tensor, config: GenerateConfig, generator: Optional[torch.Generator]) -> torch.Tensor:
    """The next token (B,) from last-position logits (B, V)."""
    if config.is_greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / config.temperature, config.top_k, config.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)  # (B,)


# ---------------------------------------------------------------------------------------- decoding
def crop_prompt(prompt_ids: Sequence[int], block_size: int) -> list[int]:
    ids = list(prompt_ids)
    if not ids:
        raise ConfigError("the prompt is empty and there is no start token; pass at least one token")
    if len(ids) > block_size:
        warnings.warn(f"prompt of {len(ids)} tokens is longer than block_size={block_size}; "
                      f"keeping its last {block_size} tokens", stacklevel=3)
        ids = ids[-block_size:]
    return ids


@torch.inference_mode()
def decode(model: GPT, prompt_ids: Sequence[int], config: GenerateConfig,
           end_id: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Yield the next token of each of the num_return_sequences continuations, (B,) long, per step.

    Stops after the step where every sequence has produced end_id (finished ones keep being fed, their
    later tokens are to be ignored), or after the new-token budget. The model should be in eval mode.
    """
    prompt = crop_prompt(prompt_ids, model.config.block_size)
    budget = config.new_tokens(len(prompt))
    B, block = config.num_return_sequences, model.config.block_size
    device = model.tok_emb.weight.device
    generator = None
    if not config.is_greedy:
        generator = torch.Generator(device=device)
        if config.seed is not None:
            generator.manual_seed(config.seed)
        else:
            generator.seed()  # a fresh non-deterministic seed

    tokens = torch.empty(B, len(prompt) + budget, dtype=torch.long, device=device)  # (B, prompt + new)
    tokens[:, :len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    n = len(prompt)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache.for_model(model, B)
    logits = model(tokens[:, :n], cache)[:, -1]  # (B, V)
    for step in range(budget):
        token = next_token(logits, config, generator)  # (B,)
        tokens[:, n] = token
        n += 1
        yield token
        if end_id is not None:
            finished |= token == end_id
            if bool(finished.all()):
                return
        if step == budget - 1:
            return
        if cache.pos == block:  # the window is full: slide it (see the module docstring)
            cache.reset()
            logits = model(tokens[:, n - max(1, block // 2):n], cache)[:, -1]
        else:
            logits = model(tokens[:, n - 1:n], cache)[:, -1]


def generate_ids(model: GPT, prompt_ids: Sequence[int], config: Optional[GenerateConfig] = None,
                 end_id: Optional[int] = None, **kwargs: Any) -> list[list[int]]:
    """New token ids (without the prompt, cut before end_id) for each of num_return_sequences samples.
    Options come as a GenerateConfig or as its fields in kwargs."""
    config = config or GenerateConfig(**kwargs)
    steps = list(decode(model, prompt_ids, config, end_id))
    if not steps:
        return [[] for _ in range(config.num_return_sequences)]
    out = []
    for row in torch.stack(steps, dim=1).tolist():  # (B, steps)
        out.append(row[:row.index(end_id)] if end_id in row else row)
    return out


# ----------------------------------------------------------------------------------------------- text
def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """<START> + the prompt's tokens, the way training documents begin."""
    start = [tokenizer.start_id] if tokenizer.start_id is not None else []
    return start + tokenizer.encode(prompt)


def generate(model: GPT, tokenizer: Any, prompt: str, config: Optional[GenerateConfig] = None,
             **kwargs: Any) -> str | list[str]:
    """The continuation of `prompt` (the new text only); a list of num_return_sequences of them when above 1."""
    config = config or GenerateConfig(**kwargs)
    rows = generate_ids(model, prompt_ids(tokenizer, prompt), config, end_id=tokenizer.end_id)
    texts = [tokenizer.decode(row) for row in rows]
    return texts[0] if config.num_return_sequences == 1 else texts


def stream(model: GPT, tokenizer: Any, prompt: str, config: Optional[GenerateConfig] = None,
           **kwargs: Any) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces while it is generated (one sequence only)."""
    config = config or GenerateConfig(**kwargs)
    if config.num_return_sequences != 1:
        raise ConfigError("stream() generates one sequence; set num_return_sequences=1 or use generate()")
    tokens = (int(t[0]) for t in decode(model, prompt_ids(tokenizer, prompt), config, end_id=tokenizer.end_id))
    return text_pieces(tokenizer, tokens)


def text_pieces(tokenizer: Any, token_ids: Iterator[int]) -> Iterator[str]:
    """Decode token ids arriving one by one into text pieces, up to end_id; the pieces join to the full text.

    The tokenizer's stream decoder holds back the bytes of a character cut in the middle (byte tokens,
    BPE pieces) until the tokens that complete it arrive, so no piece carries half a character.
    """
    decoder = tokenizer.stream_decoder()
    for token_id in token_ids:
        if token_id == tokenizer.end_id:
            break
        piece = decoder.push(token_id)
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:  # bytes that never formed a complete character
        yield rest


class TextGenerator:
    """A model and its tokenizer, ready to continue prompts: .generate(prompt, **kw), .stream(prompt, **kw)."""

    def __init__(self, model: GPT, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer

    def generate(self, prompt: str, **kwargs: Any) -> str | list[str]:
        """The continuation of prompt (a list when num_return_sequences > 1); kwargs are GenerateConfig fields."""
        return generate(self.model, self.tokenizer, prompt, **kwargs)

    def stream(self, prompt: str, **kwargs: Any) -> Iterator[str]:
        """Text pieces of one continuation as they are generated; kwargs are GenerateConfig fields."""
        return stream(self.model, self.tokenizer, prompt, **kwargs)


def load(path: str, device: str = "cpu") -> TextGenerator:
    """A TextGenerator over the checkpoint at `path` (a run directory: its newest complete checkpoint)."""
    from lmforge.checkpoint import load_for_inference  # imported on use: reads files, pulls in the tokenizer

    model, tokenizer, _ = load_for_inference(path, device)
    return TextGenerator(model, tokenizer)
