"""Batches of (input ids, labels) drawn from a flat token array, deterministic from a seed and resumable.

Windows are numbered 0, 1, 2, ... over the whole job. Global micro-batch g holds windows
[g * B * W, (g + 1) * B * W) for batch_size B and world_size W, and process `rank` takes the B windows
starting at g * B * W + rank * B. So one process with batch B*K sees exactly the windows that K
processes with batch B see together, and k micro-batches of B/k cover the same windows as one batch of B.

- random:     window i starts at splitmix64(seed, i) mod (tokens - block_size): a counter-based random
              generator, so the stream depends only on (seed, i), not on how it is cut into batches.
- sequential: window i is the (i mod n)-th of the n consecutive non-overlapping windows (wraps around).

The state is ``{"position": windows drawn so far, "rng": {"kind": "splitmix64", "seed": seed}, "sampling"}``,
a small JSON-safe dict that a checkpoint stores; restoring it continues the stream exactly where it stopped.

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

    tokens: 1-D integer array (an np.memmap of a split works; only each batch's windows are read).
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
        self.position = 0  # windows drawn so far, over all processes

    @property
    def num_windows(self) -> int:
        """Non-overlapping windows in one sequential pass."""
        return (len(self.tokens) - 1) // self.block_size

    def window_starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of windows first .. first+count-1 of the stream."""
        index = np.arange(first, first + count, dtype=np.uint64)
        if self.sampling == "random":
            return (splitmix64(self.seed, index) % np.uint64(len(self.tokens) - self.block_size)).astype(np.int64)
        return (index % np.uint64(self.num_windows)).astype(np.int64) * self.block_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of the next global micro-batch: x, y of shape (batch_size, block_size)."""
        B, T = self.batch_size, self.block_size
        starts = self.window_starts(self.position + self.rank * B, B)
        self.position += B * self.world_size
        windows = np.stack([np.asarray(self.tokens[s:s + T + 1], dtype=np.int64) for s in starts])  # (B, T+1)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe: {'position', 'rng', 'sampling'}."""
        return {"position": self.position, "rng": {"kind": "splitmix64", "seed": self.seed},
                "sampling": self.sampling}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        seed = (state.get("rng") or {}).get("seed")
        if state.get("sampling") != self.sampling or seed != self.seed:
            raise DataError(f"saved data stream (sampling={state.get('sampling')}, seed={seed}) does not match this "
                            f"run (sampling={self.sampling}, seed={self.seed}); resume with the same data.sampling "
                            f"and train.seed")
        self.position = int(state["position"])


def splitmix64(seed: int, index: np.ndarray) -> np.ndarray:
    """Uniform 64-bit integers, one per element of `index` (uint64), from the SplitMix64 finaliser.

    Steele, Lea & Flood, "Fast splittable pseudorandom number generators" (OOPSLA 2014).
    """
    with np.errstate(over="ignore"):
        z = np.uint64(seed % 2**64) + (index + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def fixed_batches(tokens: np.ndarray, block_size: int, batch_size: int, num_batches: int, *, seed: int = 0,
                  rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same `num_batches` random batches on every call (periodic validation); this process's rows of each."""
    stream = TokenBatches(tokens, block_size, batch_size, seed=seed, sampling="random",
                          rank=rank, world_size=world_size)
    return [stream.next_batch() for _ in range(num_batches)]
