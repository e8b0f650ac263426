"""process_scores on a left-padded batch (generate/processors.py): each row's scores are those of the row alone, the
pads taking no part in the repetition penalty, the n-gram ban or the length, and a ban for a short row only."""

from __future__ import annotations

import pytest
import torch

from lmforge.generate import GenerateConfig
from lmforge.generate.processors import process_scores

V, PAD, END = 12, 0, 11


@pytest.mark.parametrize("options", [{"repetition_penalty": 1.7}, {"no_repeat_ngram_size": 2},
                                     {"min_length": 6}, {"encoder_repetition_penalty": 1.4}])
def test_each_row_of_a_padded_batch_scores_as_it_would_alone(options):
    config = GenerateConfig(**options)
    rows = [[3, 4, 3, 5, 2, 4, 3], [3, 4, 3]]  # the short row: 4 pads (id 0) on its left
    generated = [[2, 4, 3], [3]]
    width = max(map(len, rows))
    tokens = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    real = torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in rows])[:, None]
    torch.manual_seed(0)
    scores = torch.randn(2, V)
    scores[:, PAD] = 2.0  # a positive score the repetition penalty would lower were a pad seen
    batch = process_scores(scores, tokens, real, config, generated, [END])
    for j, row in enumerate(rows):
        alone = process_scores(scores[j:j + 1], torch.tensor([row]), None, config, [generated[j]], [END])
        assert torch.equal(batch[j], alone[0]), (j, batch[j], alone[0])
    assert not torch.equal(batch, scores)  # the option did something
