"""row_generators (generate/rows.py): copy 0 of each prompt draws from a generator seeded with the seed itself, the
other copies from their own streams, the same for every prompt."""

from __future__ import annotations

import torch

from lmforge.generate import GenerateConfig
from lmforge.generate.rows import row_generators


def test_copy_zero_is_seeded_with_the_seed_and_each_prompt_gets_the_same_copies():
    gens = row_generators(GenerateConfig(seed=1234), copies=3, prompts=2, device=torch.device("cpu"))
    draws = [torch.rand(4, generator=g) for g in gens]
    assert torch.equal(draws[0], torch.rand(4, generator=torch.Generator().manual_seed(1234)))
    assert all(torch.equal(draws[j], draws[3 + j]) for j in range(3))  # prompt-major: prompt 1 repeats prompt 0
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
