"""Guards for train.precompute_reference that test_preference_precompute cannot see: its non-preference case also
sets train.dpo_beta (refused on its own), its batches are checked only through training, and `lmforge plan` is only
asked about preference data. So:
  - precompute_reference alone, on data that is not preference data, is refused;
  - the batches of pairs carry exactly their own rows' precomputed values, for every process's share;
  - `lmforge plan` notes the scoring pass only for preference data.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.data.batches import ExampleBatches, Examples, fixed_example_batches, pair_rows
from lmforge.errors import ConfigError
from lmforge.train import Trainer
from test_preference import base  # noqa: F401  (a fixture: the tokenizer run)
from test_tasks import reverse_records, write_jsonl
from tiny_training import tiny_config


def test_precompute_reference_alone_on_sft_data_is_refused(base, tmp_path):
    """Only train.precompute_reference set (every other preference setting at its default), on sft data: refused
    before anything is written, naming the data and the setting."""
    sft = tmp_path / "sft"
    assert main(["prepare", str(write_jsonl(tmp_path / "r.jsonl", reverse_records(30))), "--task", "sft",
                 "--tokenizer", str(base), "--out", str(sft)]) == 0
    config = tiny_config(tmp_path / "run", **{"data.path": str(sft), "train.init_from": str(base),
                                              "train.precompute_reference": True})
    assert config.train.dpo_beta == 0.1 and config.train.preference_loss == "dpo"  # nothing else set
    with pytest.raises(ConfigError, match=f"precompute_reference set a preference loss, but {sft} is not preference"):
        Trainer(config, progress=False, tensorboard=False)
    assert not (tmp_path / "run").exists()


def toy_pairs(n_pairs: int) -> Examples:
    """n_pairs pairs of examples of 3 to 6 tokens (prompt 2), with distinct precomputed values: row i holds -i - 0.5."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 7, size=2 * n_pairs)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    examples = Examples(rng.integers(1, 50, size=int(offsets[-1])).astype(np.int64), offsets,
                        np.full(2 * n_pairs, 2, dtype=np.int64))
    examples.reference_logps = -np.arange(2 * n_pairs, dtype=np.float32) - 0.5
    return examples


@pytest.mark.parametrize("world_size", [1, 2])
def test_batches_of_pairs_carry_their_own_rows_values(world_size):
    """Every batch of pairs, shuffled train batches and each process's val batches, carries as its third tensor the
    values of its own rows (2p chosen, 2p + 1 rejected), the rows its x and y hold."""
    examples = toy_pairs(11)
    values = examples.reference_logps
    for rank in range(world_size):
        stream = ExampleBatches(examples, 16, 3, shuffle=True, seed=4, rank=rank, world_size=world_size, pairs=True)
        for _ in range(5):
            first = stream.position + rank * 3
            x, y, ref = stream.next_batch()
            rows = pair_rows(stream.example_index(first, 3))
            assert ref.dtype == torch.float32 and ref.tolist() == values[rows].tolist()
            assert x.shape[0] == len(rows) == len(ref)
        val = fixed_example_batches(examples, 16, 3, 10, rank=rank, world_size=world_size, pairs=True)
        seen = [p for g in range(0, 11, 3 * world_size) for p in range(g + rank * 3, min(g + rank * 3 + 3, 11))]
        assert np.concatenate([b[2].numpy() for b in val]).tolist() == values[pair_rows(np.array(seen))].tolist()
    examples.reference_logps = None
    assert all(len(b) == 2 for b in fixed_example_batches(examples, 16, 3, 10, pairs=True))


def test_plan_notes_the_scoring_pass_only_for_preference_data():
    """precompute_reference is about preference data: a plan of sft or token data says nothing of it (and counts
    what it counts without it), while a preference plan notes the scoring pass."""
    from lmforge.plan import format_plan, plan
    from test_plan import config

    for task in ("tokens", "sft"):
        pre = plan(config(**{"train.precompute_reference": True}), device="h100", task=task)
        assert "precompute_reference" not in format_plan(pre) and "scores the data once" not in format_plan(pre)
        assert pre.total_memory == plan(config(), device="h100", task=task).total_memory
    assert "scores the data once before the first step" in format_plan(
        plan(config(**{"train.precompute_reference": True}), device="h100", task="preference"))
