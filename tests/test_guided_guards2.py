"""RegexGuide's rules the decoding tests leave open (generate/guided.py): a row is complete only on a full match, a
row off the pattern (one that ended) is not masked, and a pattern that matches the empty text is usable even where
no token can begin a longer match."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.generate.guided import RegexGuide, regex_guide, token_texts
from lmforge.tokenizer import byte_tokenizer

TOKENIZER = byte_tokenizer()


def test_a_row_is_complete_only_on_a_full_match_that_no_token_extends():
    guide = RegexGuide("ab", ["a", "c", None], 3)  # no token writes "b": after "a" nothing can follow
    assert not guide.continuations(guide.state([0])).any()
    assert not guide.complete([0])  # stuck, but not a match
    whole = RegexGuide("ab", ["a", "b"], 2)
    assert not whole.complete([0]) and whole.complete([0, 1])


def test_a_row_off_the_pattern_may_take_any_token_and_the_others_stay_masked():
    texts = token_texts(TOKENIZER)
    guide = RegexGuide("[0-9]+", texts, TOKENIZER.vocab_size)
    digit, letter = TOKENIZER.encode("7"), TOKENIZER.encode("x")
    allowed = guide.allowed([digit, letter], [TOKENIZER.end_id], torch.device("cpu"))
    assert guide.state(letter) is None and allowed[1].all()
    assert allowed[0].sum() == 10 + 1 and allowed[0, TOKENIZER.end_id]  # ten digits, and the end: a full match


def test_a_pattern_matching_the_empty_text_is_usable_where_no_token_begins_more():
    # "é" is two bytes: no byte token of its own is a whole character, so only the empty match is reachable
    guide = regex_guide("é?", TOKENIZER, TOKENIZER.vocab_size)
    assert not guide.continuations(guide.automaton.initial).any()
    assert guide.allowed([[]], [TOKENIZER.end_id], torch.device("cpu"))[0].nonzero().flatten().tolist() == \
        [TOKENIZER.end_id]
    with pytest.raises(ConfigError, match="no token of this vocabulary can begin a match"):
        regex_guide("é", TOKENIZER, TOKENIZER.vocab_size)
