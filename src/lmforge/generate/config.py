"""GenerateConfig: how to continue a prompt, checked once, on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from lmforge.config import doc
from lmforge.errors import ConfigError

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

    @property
    def scoring(self) -> tuple:
        """What turns a row's logits into its next token: rows with equal keys are scored as one group."""
        if self.is_greedy:
            return (True, None, None, None, None, self.repetition_penalty, self.no_repeat_ngram_size)
        return (False, self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                self.no_repeat_ngram_size)

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
