"""MaskFiller's answers and refusals (generate/fill_mask.py): the mask token is never an answer even where the model
gives it mass, top_k below 1 is refused, and a text exactly as long as the context is read."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.generate.fill_mask import MaskFiller
from lmforge.model import GPT
from lmforge.tokenizer import byte_tokenizer

TOKENIZER = byte_tokenizer().with_mask_token()
BLOCK = 16


def filler() -> MaskFiller:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16,
                            causal=False))
    return MaskFiller(model, TOKENIZER)


def test_the_mask_token_is_never_proposed_and_the_others_keep_their_softmax_probabilities():
    f = filler()
    text = f"a {TOKENIZER.mask_token} b {TOKENIZER.mask_token}"
    ids = f.encode(text)
    with torch.no_grad():
        logits = f.model(torch.tensor([ids]))[0]
    where = [t for t, i in enumerate(ids) if i == TOKENIZER.mask_id]
    every = TOKENIZER.vocab_size - 1  # all but one token: the mask must be the one left out
    answers = f.top_tokens(text, top_k=every)
    assert len(answers) == len(where) == 2
    for answer, t in zip(answers, where):
        probs = torch.softmax(logits[t].float(), -1)
        assert probs[TOKENIZER.mask_id] > 0  # the model does give the mask token mass
        assert TOKENIZER.mask_id not in [i for i, _ in answer] and len(answer) == every
        assert {i: p for i, p in answer} == {i: pytest.approx(float(probs[i]), abs=1e-6) for i, _ in answer}


@pytest.mark.parametrize("top_k", [0, -2, True])
def test_a_top_k_below_one_is_refused(top_k):
    with pytest.raises(ConfigError, match="top_k=.* is invalid"):
        filler().fill_mask(f"x {TOKENIZER.mask_token}", top_k=top_k)


def test_a_text_of_exactly_the_context_is_read_and_one_token_more_is_refused():
    f = filler()
    fits = "a" * (BLOCK - 3) + TOKENIZER.mask_token  # <START> + 13 bytes + <MASK> + <END> = BLOCK tokens
    assert len(f.encode(fits)) == BLOCK and f.encode(fits)[-1] == TOKENIZER.end_id
    assert len(f.fill_mask(fits, top_k=2)) == 1
    with pytest.raises(ConfigError, match="more than the model's context"):
        f.encode("a" + fits)
