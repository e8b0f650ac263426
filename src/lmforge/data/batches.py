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
the trainer. ``ExampleBatches`` is the one for task data (``lmforge prepare --task sft | classify``): whole
examples, right-padded; sft labels carry IGNORE_INDEX on prompt tokens and padding, and a classify batch is
(x, labels (B,), attention_mask (B, T)): the mask travels as a third element because the classifier needs it
to find each row's last real token (a pad id may equal the end token's id, so the ids cannot say).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch

from lmforge.errors import DataError

IGNORE_INDEX = -100  # a label that adds nothing to the loss (prompt tokens, padding); train.loss uses this one


class Batches(Protocol):
    """What the trainer needs from a training data stream."""

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """(input ids (B, T) long, labels (B, T) long) on the CPU; for a classifier
        (input ids (B, T) long, labels (B,) long, attention_mask (B, T) bool)."""
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


# -------------------------------------------------------------------------------- masked language model
def mask_tokens(x: torch.Tensor, mask_id: int, vocab_size: int, probability: float,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (Devlin et al. 2019) of token ids x (B, T): (inputs, labels).

    Each position is chosen with `probability`; a chosen one becomes mask_id (80%), a random token (10%) or stays
    as it is (10%), and its label is the original token; every other label is IGNORE_INDEX, so the loss counts
    the chosen positions only. The random tokens are drawn from [0, vocab_size) without the mask token.
    """
    chosen = rng.random(x.shape) < probability  # (B, T)
    action = rng.random(x.shape)  # (B, T): < 0.8 mask, < 0.9 random, else unchanged
    random_ids = rng.integers(0, vocab_size - 1, size=x.shape)
    random_ids = random_ids + (random_ids >= mask_id)  # skip the mask id itself
    ids = x.numpy()
    inputs = np.where(chosen & (action < 0.8), mask_id, np.where(chosen & (action < 0.9), random_ids, ids))
    labels = np.where(chosen, ids, IGNORE_INDEX)
    return torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(labels.astype(np.int64))


class MaskedBatches:
    """Masked-language-model batches over a TokenBatches stream: each window of block_size tokens masked by
    ``mask_tokens``, the masking drawn from a generator seeded with (seed, the stream's position), so it depends
    only on where the stream is: the state is the stream's, and a resumed run masks exactly as before."""

    def __init__(self, stream: TokenBatches, mask_id: int, vocab_size: int, probability: float = 0.15,
                 seed: int = 0) -> None:
        self.stream, self.mask_id, self.vocab_size = stream, mask_id, vocab_size
        self.probability, self.seed = probability, seed

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T) with masked positions, labels (B, T): the original tokens at the chosen positions."""
        rng = np.random.default_rng([self.seed % 2**63, self.stream.position, self.stream.rank])
        x, _ = self.stream.next_batch()  # the next-token targets are not used: the labels are x itself
        return mask_tokens(x, self.mask_id, self.vocab_size, self.probability, rng)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def fixed_masked_batches(tokens: np.ndarray, block_size: int, batch_size: int, num_batches: int, mask_id: int,
                         vocab_size: int, probability: float = 0.15, *, seed: int = 0, rank: int = 0,
                         world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same masked validation batches on every call (see fixed_batches, MaskedBatches)."""
    stream = MaskedBatches(TokenBatches(tokens, block_size, batch_size, seed=seed, sampling="random", rank=rank,
                                        world_size=world_size), mask_id, vocab_size, probability, seed)
    return [stream.next_batch() for _ in range(num_batches)]


# ------------------------------------------------------------------------------------ task examples
class Examples:
    """Examples of a task split: token ids of every example concatenated, with offsets and prompt lengths
    (sft) or class labels (classify).

    tokens: (N,) integer ids; offsets: (n+1,) int64, example i is tokens[offsets[i]:offsets[i+1]];
    prompt_lengths: (n,) tokens at the start of each example that carry no loss (start token and prompt), or
    None; labels: (n,) int64 class ids (classify), or None; desirable: (n,) bool, unpaired preference data's label
    of each completion (`prepare --task unpaired`), or None; margins: (n,) float32, preference data's margin of each
    example's pair (the same on both; `prepare` of records with a "margin"), or None. reference_logps: (n,) float32,
    preference data's completion log-probabilities under the frozen reference when precomputed
    (train.precompute_reference), or None: then every batch of pairs carries its rows' values as a third tensor
    (``pair_batch``). Unpaired data precomputed also fixes each example's mismatched row: kl_partners (n,) int64,
    whose completion follows the example's prompt there, and reference_kl_logps (n,) float32, that row's reference
    log-probability; its batches carry both values (``unpaired_batch``).
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, prompt_lengths: Optional[np.ndarray],
                 labels: Optional[np.ndarray] = None, *, desirable: Optional[np.ndarray] = None,
                 margins: Optional[np.ndarray] = None) -> None:
        self.tokens, self.offsets, self.prompt_lengths, self.labels = tokens, offsets, prompt_lengths, labels
        self.desirable, self.margins = desirable, margins
        self.reference_logps: Optional[np.ndarray] = None
        self.kl_partners: Optional[np.ndarray] = None
        self.reference_kl_logps: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """(n,) tokens per example."""
        return np.diff(self.offsets)

    def prompt_and_completion(self, e: int) -> tuple[list[int], list[int]]:
        """The token ids of example ``e`` (sft or preference) split where its loss starts: (prompt, completion)."""
        ids = np.asarray(self.tokens[int(self.offsets[e]):int(self.offsets[e + 1])]).tolist()
        p = int(self.prompt_lengths[e])
        return ids[:p], ids[p:]


def example_pair(examples: Examples, e: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of sft example ``e`` of L tokens t: x = t[:-1], y = t[1:], with IGNORE_INDEX where
    the target is a prompt token (the first prompt_length - 1 targets), so only the completion and its end
    token are learned."""
    a, b = examples.offsets[e], examples.offsets[e + 1]
    t = np.asarray(examples.tokens[a:b], dtype=np.int64)
    y = t[1:].copy()
    y[:max(int(examples.prompt_lengths[e]) - 1, 0)] = IGNORE_INDEX
    return t[:-1], y


def pad_examples(examples: Examples, index: np.ndarray, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples ``index`` as one right-padded batch: x, y of shape (B, T), T = longest example - 1.

    Row r holds example_pair(index[r]) and then padding, where y is IGNORE_INDEX. Padding needs no attention
    mask for a causal model: the pads come after every real token of their row, and a position attends only to
    earlier ones, so no real position sees them (x holds ``pad_id`` there; any id would do).
    """
    T = int(examples.lengths[index].max()) - 1
    x = np.full((len(index), T), pad_id, dtype=np.int64)  # (B, T)
    y = np.full((len(index), T), IGNORE_INDEX, dtype=np.int64)  # (B, T)
    for r, e in enumerate(index):
        xe, ye = example_pair(examples, int(e))
        x[r, :len(xe)], y[r, :len(ye)] = xe, ye
    return torch.from_numpy(x), torch.from_numpy(y)


def pack_examples(examples: Examples, rows: list[list[int]], pad_id: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sft examples packed several to a row: x, y (B, T) and sequence ids (B, T), T = the fullest row.

    Row r holds example_pair of each example of rows[r], one after another, then padding; sequence ids number
    the examples of a row 1, 2, 3, ... (0 on padding). Given to the model as its attention_mask, they keep each
    example from attending to the others and restart positions at 0, so a packed row computes exactly what its
    examples would alone, with less padding (tests check the loss).
    """
    pairs = [[example_pair(examples, e) for e in row] for row in rows]
    T = max(sum(len(xe) for xe, _ in row) for row in pairs)
    x = np.full((len(rows), T), pad_id, dtype=np.int64)  # (B, T)
    y = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)  # (B, T)
    ids = np.zeros((len(rows), T), dtype=np.int64)  # (B, T)
    for r, row in enumerate(pairs):
        at = 0
        for i, (xe, ye) in enumerate(row):
            x[r, at:at + len(xe)], y[r, at:at + len(ye)], ids[r, at:at + len(xe)] = xe, ye, i + 1
            at += len(xe)
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(ids)


def pad_labelled_examples(examples: Examples, index: np.ndarray, pad_id: int = 0,
                          side: str = "right") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classify examples ``index`` as one padded batch: x (B, T), labels (B,), attention_mask (B, T) bool.

    T = the longest example; a row holds its whole example (the classifier reads the hidden state of its last
    real token, no shift), padded on the right (default) or the left with ``pad_id``; attention_mask is True at
    real tokens. The model gives each row the same logits either way (tests check it).
    """
    rows = [examples.tokens[a:b] for a, b in zip(examples.offsets[index], examples.offsets[index + 1])]
    x, mask = pad_rows(rows, pad_id, side)
    return x, torch.from_numpy(np.asarray(examples.labels[index], dtype=np.int64)), mask


def pad_rows(rows: Sequence[np.ndarray], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Whole token rows as one padded batch: x (B, T), T the longest row, and attention_mask (B, T) bool, True at
    real tokens; padded with ``pad_id`` on the right or the left."""
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r}: choose right or left")
    T = max(len(row) for row in rows)
    x = np.full((len(rows), T), pad_id, dtype=np.int64)  # (B, T)
    mask = np.zeros((len(rows), T), dtype=bool)  # (B, T)
    for r, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(T - len(row), T)
        x[r, cols] = np.asarray(row, dtype=np.int64)
        mask[r, cols] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


def fit_context(ids: np.ndarray, max_tokens: int, keep: int) -> np.ndarray:
    """Example ids cut to at most max_tokens: a longer example loses the tokens right after its first ``keep`` (its
    start token, when the tokenizer has one), its earliest prompt tokens, as preparing shortens prompts. A reward
    model reads whole examples, one token more than the inputs of next-token training, and this is how both its
    training and its scoring fit them to the context (block_size)."""
    excess = len(ids) - max_tokens
    return ids if excess <= 0 else np.concatenate([ids[:keep], ids[keep + excess:]])


def reward_pair_batch(examples: Examples, pairs: np.ndarray, pad_id: int, max_tokens: int, keep: int
                      ) -> tuple[torch.Tensor, ...]:
    """A reward model's batch of preference pairs ``pairs``: x (2P, T) and attention_mask (2P, T), rows 2k and
    2k + 1 pair k's chosen and rejected example whole (prompt, completion, end token: the head reads the last),
    each fitted to max_tokens (``fit_context``), right-padded; with margins in the data, each pair's (P,) third."""
    rows = [fit_context(np.asarray(examples.tokens[examples.offsets[e]:examples.offsets[e + 1]]), max_tokens, keep)
            for e in pair_rows(pairs)]
    x, mask = pad_rows(rows, pad_id)
    if examples.margins is None:
        return x, mask
    return x, mask, torch.from_numpy(np.asarray(examples.margins[2 * np.asarray(pairs)], dtype=np.float32))


def text_batches(tok: Any, ids: Sequence[np.ndarray], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Encoded texts (each [start] text [end]: data.tasks.encode_text_example) as right-padded batches of at most
    batch_size, padded as training padded (the pad token, else the end token): (x (B, T), attention_mask (B, T)
    bool), what a classifier and an embedder read (generate.classify, generate.embed)."""
    offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64)
    examples = Examples(np.concatenate(ids), offsets, None, np.zeros(len(ids), dtype=np.int64))
    pad = tok.pad_id if tok.pad_id is not None else tok.end_id
    for start in range(0, len(ids), batch_size):
        x, _, mask = pad_labelled_examples(examples, np.arange(start, min(start + batch_size, len(ids))), pad)
        yield x, mask


class ExampleBatches:
    """Batches of whole examples (task data), deterministic from a seed and resumable; see ``pad_examples``
    (sft) and ``pad_labelled_examples`` (classify).

    Examples are drawn 0, 1, 2, ... over the whole job and cut into batches as TokenBatches cuts windows:
    global micro-batch g holds draws [g * B * W, (g + 1) * B * W), process ``rank`` takes its B of them. Draw i
    is example order_e[i mod n] of epoch e = i // n, where order_e is a permutation drawn from a generator
    seeded with (seed, e) when ``shuffle``, else the stored order. So the stream depends only on (seed, i), and
    the state is ``{"position", "rng": {"kind": "permutation", "seed"}, "sampling", "examples"}``.

    ``packing`` (sft): a global micro-batch is B * W rows filled with the next draws in order, as many whole
    examples to a row as fit in block_size (see ``pack_examples``); it takes as many draws as it holds, so the
    stream and its state are the same as without packing, only cut into batches differently.

    ``pairs`` (preference data, examples 2i chosen and 2i+1 rejected): a draw is a pair, and a batch of B draws is
    2B rows, chosen and rejected alternating (``pair_rows``), so a pair never straddles batches or processes.

    ``unpaired`` (unpaired preference data, for KTO): a batch is ``unpaired_batch``, whose mismatched rows pair each
    draw's prompt with the previous draw's completion within the global micro-batch (the first draw's with the
    last's), so W processes with B draws each build the rows one process with B * W builds.

    ``whole`` (with ``pairs``, for a reward model): a batch is ``reward_pair_batch``, each example whole, those longer
    than block_size losing the prompt tokens after their first ``whole`` tokens (1: a start token; else 0).
    """

    def __init__(self, examples: Examples, block_size: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, pad_id: int = 0, packing: bool = False,
                 pairs: bool = False, unpaired: bool = False, whole: Optional[int] = None) -> None:
        if len(examples) == 0:
            raise DataError("the split holds no examples: prepare more data or change --split")
        longest = int(examples.lengths.max())
        limit = block_size + (examples.labels is None)  # an sft example of L tokens is L-1 inputs; classify: L
        if longest > limit:
            raise DataError(f"an example has {longest} tokens, more than {limit} (block_size={block_size}): prepare "
                            f"the data with --max-length {limit}")
        self.examples = examples
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.pad_id = pad_id
        if packing and examples.labels is not None:
            raise DataError("data.packing packs sft examples (text to text); a classifier reads one example per row: "
                            "drop data.packing")
        if packing and pairs:
            raise DataError("data.packing packs sft examples; preference pairs are scored one completion to a row: "
                            "drop data.packing")
        if packing and unpaired:
            raise DataError("data.packing packs sft examples; unpaired preference data is scored one completion to a "
                            "row: drop data.packing")
        if unpaired and examples.desirable is None:
            raise DataError("unpaired preference training needs each example's desirable label: prepare the data with "
                            "`lmforge prepare --task unpaired`")
        if pairs and len(examples) % 2:
            raise DataError(f"preference data holds pairs of examples, but the split has {len(examples)}: re-run "
                            "`lmforge prepare --task preference --force`")
        if whole is not None and not pairs:
            raise DataError("a reward model learns from preference pairs: prepare them with `lmforge prepare --task "
                            "preference`")
        self.packing = packing
        self.pairs = pairs
        self.whole = whole
        self.unpaired = unpaired
        self.draws = len(examples) // 2 if pairs else len(examples)  # what one epoch draws: examples or pairs
        self.position = 0  # examples drawn so far, over all processes
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) last used

    @property
    def sampling(self) -> str:
        return "random" if self.shuffle else "sequential"

    def order(self, epoch: int) -> np.ndarray:
        """The example order of one epoch."""
        if not self.shuffle:
            return np.arange(self.draws)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed % 2**63, epoch]).permutation(self.draws))
        return self._order[1]

    def example_index(self, first: int, count: int) -> np.ndarray:
        """The examples (pairs, with ``pairs``) of draws first .. first+count-1 of the stream."""
        n = self.draws
        draws = np.arange(first, first + count)
        return np.array([self.order(i // n)[i % n] for i in draws.tolist()], dtype=np.int64)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """This process's rows of the next global micro-batch: x, y of shape (batch_size, T), T <= block_size;
        classify examples: x, labels (batch_size,), attention_mask (batch_size, T); preference pairs: x, y of shape
        (2 * batch_size, T), rows 2k and 2k + 1 the chosen and the rejected example of pair k."""
        if self.packing:
            rows, drawn = self.packed_rows(self.position)
            self.position += drawn
            return pack_examples(self.examples, rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size],
                                 self.pad_id)
        if self.unpaired:
            drawn = self.example_index(self.position, self.batch_size * self.world_size)  # the global micro-batch
            self.position += len(drawn)
            mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            partners = np.roll(drawn, 1) if self.examples.kl_partners is None else self.examples.kl_partners[drawn]
            return unpaired_batch(self.examples, drawn[mine], partners[mine], self.pad_id, self.block_size + 1)
        index = self.example_index(self.position + self.rank * self.batch_size, self.batch_size)
        self.position += self.batch_size * self.world_size
        if self.pairs:
            return self.pair_batch(index)
        if self.examples.labels is not None:
            return pad_labelled_examples(self.examples, index, self.pad_id)
        return pad_examples(self.examples, index, self.pad_id)

    def pair_batch(self, pairs: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The batch of preference pairs ``pairs``: for a policy's loss (``pair_batch``), or whole (``whole``)."""
        if self.whole is not None:
            return reward_pair_batch(self.examples, pairs, self.pad_id, self.block_size, self.whole)
        return pair_batch(self.examples, pairs, self.pad_id)

    def packed_rows(self, first: int) -> tuple[list[list[int]], int]:
        """The B * W rows of the global micro-batch whose first draw is ``first``, and the draws they hold."""
        inputs = self.examples.lengths - 1  # an sft example of L tokens fills L - 1 columns
        rows: list[list[int]] = []
        row: list[int] = []
        width = drawn = 0
        while True:
            e = int(self.example_index(first + drawn, 1)[0])
            if row and width + int(inputs[e]) > self.block_size:  # full: the next row starts with e
                rows.append(row)
                if len(rows) == self.batch_size * self.world_size:
                    return rows, drawn
                row, width = [], 0
            row.append(e)
            width += int(inputs[e])
            drawn += 1

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe: {'position', 'rng', 'sampling', 'examples'}."""
        return {"position": self.position, "rng": {"kind": "permutation", "seed": self.seed},
                "sampling": self.sampling, "examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        seed = (state.get("rng") or {}).get("seed")
        if state.get("sampling") != self.sampling or seed != self.seed or state.get("examples") != len(self.examples):
            raise DataError(f"saved example stream (sampling={state.get('sampling')}, seed={seed}, "
                            f"{state.get('examples')} examples) does not match this run (sampling={self.sampling}, "
                            f"seed={self.seed}, {len(self.examples)} examples); resume with the same data, "
                            f"data.sampling and train.seed")
        self.position = int(state["position"])


def pair_rows(pairs: np.ndarray) -> np.ndarray:
    """The example rows of preference pairs ``pairs``: 2p (chosen) and 2p + 1 (rejected) for each, in turn."""
    return np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)


def pair_batch(examples: Examples, pairs: np.ndarray, pad_id: int) -> tuple[torch.Tensor, ...]:
    """The batch of preference pairs ``pairs``: x, y of 2P rows (``pair_rows``, right-padded as ``pad_examples``),
    and the rows' precomputed reference log-probabilities (2P,) when the examples have them."""
    rows = pair_rows(pairs)
    x, y = pad_examples(examples, rows, pad_id)
    if examples.reference_logps is None:
        return x, y
    return x, y, torch.from_numpy(examples.reference_logps[rows])


def unpaired_batch(examples: Examples, index: np.ndarray, partners: np.ndarray, pad_id: int, max_length: int
                   ) -> tuple[torch.Tensor, ...]:
    """A batch of unpaired preference examples ``index`` for KTO: (x, y, kl_x, kl_y, desirable), and when the
    reference was precomputed (examples.reference_logps) its values of the examples and of their mismatched rows.

    x, y: the examples, right-padded as ``pad_examples``; kl_x, kl_y: the mismatched rows KTO estimates its KL term
    from, row r the prompt of example index[r] followed by the completion of example partners[r] (its end token
    included), cut from the right to ``max_length`` tokens, labels on the completion only, padded the same way;
    desirable: (B,) bool, each example's label."""
    x, y = pad_examples(examples, index, pad_id)
    rows, prompt_lengths = [], []
    for e, f in zip(index.tolist(), partners.tolist()):
        prompt, _ = examples.prompt_and_completion(e)
        _, completion = examples.prompt_and_completion(f)
        ids = (prompt + completion)[:max_length]
        rows.append(np.array(ids, dtype=np.int64))
        prompt_lengths.append(min(len(prompt), len(ids)))
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    mismatched = Examples(np.concatenate(rows), np.concatenate([[0], np.cumsum(lengths)]),
                          np.array(prompt_lengths, dtype=np.int64))
    kl_x, kl_y = pad_examples(mismatched, np.arange(len(rows)), pad_id)
    desirable = torch.from_numpy(np.asarray(examples.desirable[index], dtype=bool))
    if examples.reference_logps is None:
        return x, y, kl_x, kl_y, desirable
    return (x, y, kl_x, kl_y, desirable, torch.from_numpy(examples.reference_logps[index]),
            torch.from_numpy(examples.reference_kl_logps[index]))


def kl_partners(n: int, group: int) -> np.ndarray:
    """(n,) the mismatched partner of each of n unpaired examples when they are fixed (train.precompute_reference):
    the examples in stored order in groups of `group` (the global micro-batch), each group rotated by one, as a
    sequential stream's batches pair them (ExampleBatches: each example with the one before it in its batch, the
    first with the last); TRL's KTO fixes its rows' partners the same way. A last group of one takes the example
    before it."""
    e = np.arange(n)
    first = e - e % group
    last = np.minimum(first + group, n) - 1
    partners = np.where(e == first, last, e - 1)
    return np.where(partners == e, (e - 1) % max(n, 1), partners)


def fixed_example_batches(examples: Examples, block_size: int, batch_size: int, num_batches: int, *,
                          rank: int = 0, world_size: int = 1, pad_id: int = 0,
                          pairs: bool = False, unpaired: bool = False, whole: Optional[int] = None
                          ) -> list[tuple[torch.Tensor, ...]]:
    """Validation batches of task data: the split in its stored order, at most ``num_batches`` global batches
    (fewer when they cover it; the last one wraps to the start); this process's rows of each. Classify examples,
    preference pairs (batch_size pairs to a batch) and unpaired examples do not wrap (accuracy counts each once):
    the last batch is shorter, a process may get none. An unpaired example's mismatched row takes the previous
    evaluated example's completion (the first takes the last's), whatever the batches and processes."""
    stream = ExampleBatches(examples, block_size, batch_size, shuffle=False, rank=rank, world_size=world_size,
                            pad_id=pad_id, pairs=pairs, unpaired=unpaired, whole=whole)
    if examples.labels is not None or pairs or unpaired:
        n = min(stream.draws, num_batches * batch_size * world_size)
        rows = [np.arange(g + rank * batch_size, min(g + (rank + 1) * batch_size, n))
                for g in range(0, n, batch_size * world_size)]
        if unpaired:
            partners = examples.kl_partners if examples.kl_partners is not None else (np.arange(n) - 1) % n
            return [unpaired_batch(examples, index, partners[index], pad_id, block_size + 1)
                    for index in rows if len(index)]
        if pairs:
            return [stream.pair_batch(index) for index in rows if len(index)]
        return [pad_labelled_examples(examples, index, pad_id) for index in rows if len(index)]
    needed = -(-len(examples) // (batch_size * world_size))
    return [stream.next_batch() for _ in range(min(num_batches, needed))]
