"""Attention maps of a text that fills the model's whole context: allowed, and each row a distribution over the
keys up to its query (the refusal starts one token later: tests/test_explain.py)."""

import torch

from lmforge.explain import attention_weights
from test_explain import TOLERANCE, by_hand, sharp_model


def test_a_text_exactly_as_long_as_the_context_gives_its_maps():
    model = sharp_model()
    T = model.config.block_size
    idx = torch.randint(0, 64, (T,), generator=torch.Generator().manual_seed(3))
    weights = attention_weights(model, idx)
    assert weights.shape == (model.config.n_layer, model.config.n_head, T, T)
    assert (weights.sum(-1) - 1).abs().max() <= 1e-5 and weights.triu(1).abs().max() == 0
    assert (weights - by_hand(model, idx)).abs().max() <= TOLERANCE
