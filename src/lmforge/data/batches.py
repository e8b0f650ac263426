"""Batches of (input ids, labels) drawn from a flat token array, deterministic from a seed and resumable.

A batch stream is a sequence of *global* micro-batches of ``batch_size * world_size`` windows; process
``rank`` takes rows ``[rank * batch_size, (rank + 1) * batch_size)`` of each. So one process with
batch B*K sees exactly the windows that K processes with batch B see together, and k micro-batches of
B/k cover the same windows as one batch of B.

- random:     each window starts at a uniformly drawn offset (numpy PCG64 seeded by `seed`).
- sequential: consecutive non-overlapping windows from the start of the array, wrapping around.

The state (`position` = global micro-batches drawn, and the RNG state) is a small JSON-safe dict that
a checkpoint stores; restoring it continues the stream exactly where it stopped.

Any object with ``next_batch() -> (x, y)``, ``state_dict()`` and ``load_state_dict(state)`` can feed
the trainer (fine-tuning datasets whose labels hold IGNORE_INDEX for prompt tokens, for example).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from lmforge.errors import DataError


class Batches(Protocol):
    """What the trainer needs from a training data stream."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids (B, T) long, labels (B, T) long) on the CPU."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TokenBatches:
    """Windows of `block_size` + 1 tokens from `tokens`; labels are the inputs shifted left by one.

    tokens: 1-D integer array (an np.memmap of a split works, nothing is copied beyond each batch).
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, *, seed: int = 0,
                 sampling: str = "random", rank: int = 0, world_size: int = 1) -> None:
        if tokens.ndim != 1:
            raise DataError(f"token array must be 1-D, got shape {tokens.shape}")
        if len(tokens) < block_size + 1:
            raise DataError(f"split has {len(tokens)} tokens, fewer than block_size+1={block_size + 1}; "
                            f"lower model.block_size or prepare more data")
        if sampling not in ("random", "sequential"):
            raise DataError(f"sampling={sampling!r} is invalid: choose random or sequential")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.sampling = sampling
        self.rank = rank
        self.world_size = world_size
        self.position = 0  # global micro-batches drawn so far
        self.rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def num_windows(self) -> int:
        """Non-overlapping windows in one sequential pass."""
        return (len(self.tokens) - 1) // self.block_size

    def _global_starts(self) -> np.ndarray:
        """Start offsets of the next global micro-batch (batch_size * world_size windows)."""
        n = self.batch_size * self.world_size
        if self.sampling == "random":
            return self.rng.integers(0, len(self.tokens) - self.block_size, size=n)
        first = self.position * n
        return (np.arange(first, first + n) % self.num_windows) * self.block_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of the next global micro-batch: x, y of shape (batch_size, block_size)."""
        starts = self._global_starts()
        self.position += 1
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        T = self.block_size
        windows = np.stack([np.asarray(self.tokens[s:s + T + 1], dtype=np.int64) for s in mine])  # (B, T+1)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe: {'position', 'rng', 'sampling', 'seed'}."""
        return {"position": self.position, "rng": self.rng.bit_generator.state,
                "sampling": self.sampling, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self.rng.bit_generator.state = state["rng"]


def fixed_batches(tokens: np.ndarray, block_size: int, batch_size: int, num_batches: int, *, seed: int = 0,
                  rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same `num_batches` random batches every call (for periodic validation), this rank's rows of each."""
    stream = TokenBatches(tokens, block_size, batch_size, seed=seed, sampling="random",
                          rank=rank, world_size=world_size)
    return [stream.next_batch() for _ in range(num_batches)]
