"""Decoding held to a regular expression (vLLM's guided_regex): the text a row generates always stays a prefix of a
full match, and the row ends once the match is complete and cannot go on.

    the pattern -> a finite automaton over characters (generate.automaton: interegular's, built in a child
    process with limits when a server's client sent the pattern) -> per automaton state, once: every token whose
    text walks from that state to a live one (one from which a final state is reachable) is allowed, and the end
    ids too where the state is final -> per step: walk the row's generated tokens to its state, mask the rest

A token's text is its bytes as UTF-8; a token that is only part of a character (byte-level BPE) is never allowed,
nor are special tokens. Any tokenization of the text is allowed, not just the one the tokenizer would choose.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Optional, Sequence

import torch

from lmforge.errors import ConfigError
from lmforge.generate.automaton import build


STATES = 1024  # token sequences whose automaton state a guide keeps (a decode's rows, this step and the last)


class RegexGuide:
    """The automaton of one pattern (generate.automaton) over one tokenizer's tokens. state(tokens) walks generated
    tokens; continuations(state) is the (V,) mask of tokens that keep a match reachable (built once per state)."""

    def __init__(self, pattern: str, token_texts: Sequence[Optional[str]], vocab_size: int) -> None:
        self.pattern, self.automaton = pattern, build(pattern)
        self.texts, self.vocab_size = list(token_texts), vocab_size
        self.finals, self.map, self._live = self.automaton.finals, self.automaton.map, self.automaton.live
        self._masks: dict[Any, torch.Tensor] = {}
        self._states: dict[tuple[int, ...], Optional[Any]] = {}  # token sequence -> state, the newest STATES

    def _walk(self, state: Any, text: str) -> Optional[Any]:
        """The state after reading `text` from `state`, or None where the automaton refuses it."""
        symbols, other = self.automaton.symbols, self.automaton.other
        for ch in text:
            symbol = symbols.get(ch, other)
            state = self.map.get(state, {}).get(symbol) if symbol is not None else None
            if state is None:
                return None
        return state

    def state(self, tokens: Sequence[int]) -> Optional[Any]:
        """The automaton's state after a row's generated tokens (None: off the pattern, which the mask prevents).
        Each step of a decode asks for its rows' tokens so far, one token longer than the step before: the states
        of the newest STATES sequences are kept, so a step walks one token, not the whole text again."""
        key = tuple(tokens)
        if key in self._states:
            return self._states[key]
        if key[:-1] in self._states:
            state, rest = self._states[key[:-1]], key[-1:]
        else:
            state, rest = self.automaton.initial, key
        for t in rest:
            if state is None:
                break
            text = self.texts[t] if 0 <= t < len(self.texts) else None
            state = self._walk(state, text) if text is not None else None
        self._states[key] = state
        if len(self._states) > STATES:
            del self._states[next(iter(self._states))]  # the oldest (dicts keep insertion order)
        return state

    def continuations(self, state: Any) -> torch.Tensor:
        """(V,) bool: the tokens whose text leads from `state` to a live state (built once per state)."""
        mask = self._masks.get(state)
        if mask is None:
            ids = [t for t, text in enumerate(self.texts) if text and self._walk(state, text) in self._live]
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            mask[ids] = True
            self._masks[state] = mask
        return mask

    def complete(self, tokens: Sequence[int]) -> bool:
        """Whether the tokens are a full match that no token can extend: the row is done."""
        state = self.state(tokens)
        return state in self.finals and not bool(self.continuations(state).any())

    def allowed(self, generated: Sequence[Sequence[int]], end_ids: Sequence[int], device: torch.device
                ) -> torch.Tensor:
        """(B, V) bool: per row, the tokens that keep its text on the pattern, and its end ids once the text is a
        full match. A row off the pattern (one that ended) may take any token."""
        rows = []
        for ids in generated:
            state = self.state(ids)
            if state is None:
                rows.append(torch.ones(self.vocab_size, dtype=torch.bool))
                continue
            mask = self.continuations(state)
            if state in self.finals and end_ids:
                mask = mask.clone()
                mask[list(end_ids)] = True
            rows.append(mask)
        return torch.stack(rows).to(device)


_TEXTS: "weakref.WeakKeyDictionary[Any, tuple[Optional[str], ...]]" = weakref.WeakKeyDictionary()


def token_texts(tokenizer: Any) -> tuple[Optional[str], ...]:
    """Each token's text (None for special tokens and for bytes that are not whole UTF-8 characters); read once
    per tokenizer (a server asks for every request)."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        special, found = set(tokenizer.special_token_ids), []
        for t in range(tokenizer.vocab_size):
            try:
                found.append(None if t in special else tokenizer.id_to_bytes(t).decode("utf-8"))
            except UnicodeDecodeError:
                found.append(None)
        texts = _TEXTS[tokenizer] = tuple(found)
    return texts


@functools.lru_cache(maxsize=32)
def _guide(pattern: str, texts: tuple[Optional[str], ...], vocab_size: int) -> RegexGuide:
    return RegexGuide(pattern, texts, vocab_size)


def regex_guide(pattern: str, tokenizer: Any, vocab_size: int) -> RegexGuide:
    """The guide of `pattern` over `tokenizer` (one per pattern and vocabulary: its masks are kept across decodes);
    a ConfigError where no token can begin a match."""
    guide = _guide(pattern, token_texts(tokenizer), vocab_size)
    if not guide.continuations(guide.automaton.initial).any() and guide.automaton.initial not in guide.finals:
        raise ConfigError(f"generate.guided_regex={pattern!r}: no token of this vocabulary can begin a match")
    return guide
