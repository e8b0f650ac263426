"""Multiple-choice scoring at the edge of the window, and few-shot contexts that differ from example to example."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.eval.choices import ChoiceExample, ChoiceTask, contexts, score_choices, score_continuations
from lmforge.model import GPT

BLOCK = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=20, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()


def direct(model, context: list[int], continuation: list[int]) -> float:
    """The summed log-probability of `continuation` after the last BLOCK + 1 - len(continuation) context tokens,
    from one plain forward pass."""
    whole = (context + continuation)[-(BLOCK + 1):]
    with torch.no_grad():
        logp = model(torch.tensor([whole[:-1]]))[0].float().log_softmax(-1)
    n = len(continuation)
    return float(sum(logp[len(whole) - 1 - n + i, t] for i, t in enumerate(continuation)))


def test_a_sequence_of_exactly_block_size_plus_one_tokens_is_not_truncated_and_one_more_is(model):
    choice = [5, 6, 7, 8]
    fits = [1, 2, 3, 4, 9]  # 5 + 4 = block_size + 1 tokens: block_size fed, nothing lost
    over = [0] + fits       # one more: the first context token is lost
    (ll_fits, _, cut_fits), (ll_over, _, cut_over) = score_continuations(model, [(fits, choice), (over, choice)])
    assert (cut_fits, cut_over) == (False, True)
    assert ll_fits == pytest.approx(direct(model, fits, choice), abs=1e-4)
    assert ll_over == pytest.approx(direct(model, over, choice), abs=1e-4) == pytest.approx(ll_fits, abs=1e-4)
    cached = score_choices(model, [(fits, [choice, [5, 6]]), (over, [choice])])  # through the KV cache path too
    assert [[s[2] for s in scores] for scores in cached] == [[False, False], [True]]
    assert cached[0][0][0] == pytest.approx(ll_fits, abs=1e-4) and cached[1][0][0] == pytest.approx(ll_over, abs=1e-4)


def test_each_example_draws_its_own_shots():
    """As lm-evaluation-harness's sampler: the shots vary from example to example (each is drawn with a generator
    seeded by the seed and the example's index), not one fixed set for the whole file."""
    examples = [ChoiceExample(f"q{i}?", [f"a{i}", f"b{i}"], 0, f"f:{i}") for i in range(12)]
    shots = [tuple(text.split("\n\n")[:-1]) for text in contexts(examples, ChoiceTask("f", num_fewshot=2))]
    assert len({frozenset(s) for s in shots}) >= len(examples) // 2
