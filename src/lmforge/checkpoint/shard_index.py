"""Reading a sharded checkpoint (train.checkpoint_format sharded, written by sharded.save_sharded_checkpoint):
its shards.json, checked, and the rows of each tensor from the per-rank files that hold them.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open

from lmforge.checkpoint.manifest import MAX_SHARDS, SHARD_INDEX, _one_line, _read_json, check_safetensors, shard_file
from lmforge.errors import CheckpointError

# dtype name in shards.json -> (torch dtype, its safetensors code)
_SHARD_DTYPES = {"float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16"),
                 "float64": (torch.float64, "F64"), "int64": (torch.int64, "I64"), "int32": (torch.int32, "I32"),
                 "uint8": (torch.uint8, "U8"), "bool": (torch.bool, "BOOL")}


def checkpoint_shards(ckpt: str | Path) -> Optional[int]:
    """The number of processes that wrote a sharded checkpoint (its state.json "shards"), or None for a whole one."""
    shards = _read_json(Path(ckpt) / "state.json", "checkpoint state").get("shards")
    return shards if type(shards) is int else None


def read_shard_index(ckpt: str | Path) -> dict:
    """A sharded checkpoint's shards.json (see save_sharded_checkpoint), checked: every entry has a known dtype, a
    shape, and rows of ranks that exist which cover its dim 0 exactly once, in order. CheckpointError otherwise."""
    path = Path(ckpt) / SHARD_INDEX
    index = _read_json(path, "shard index")

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is malformed ({why}); the checkpoint is corrupt, use another one")

    if not isinstance(index, dict) or index.get("format") != "lmforge-shards-v1":
        raise bad("not an lmforge-shards-v1 index")
    n = index.get("world_size")
    if type(n) is not int or not 1 <= n <= MAX_SHARDS:
        raise bad(f"world_size {n!r}")
    for kind in ("model", "optim"):
        entries = index.get(kind, {})
        if not isinstance(entries, dict):
            raise bad(f"its {kind!r} entry is not a table")
        for name, entry in entries.items():
            shape, rows = (entry.get("shape"), entry.get("rows")) if isinstance(entry, dict) else (None, None)
            if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
                raise bad(f"{name} has no valid shape")
            if entry.get("dtype") not in _SHARD_DTYPES:
                raise bad(f"{name} has no known dtype")
            if not (isinstance(rows, list) and rows and all(isinstance(r, list) and len(r) == 3 and
                                                            all(type(x) is int for x in r) and 0 <= r[0] < n for r in rows)):
                raise bad(f"{name} has no valid rows")
            end = 0
            for _, start, stop in sorted(rows, key=lambda r: r[1]):
                if start != end or stop <= start:
                    raise bad(f"the rows of {name} overlap or leave gaps")
                end = stop
            if end != (shape[0] if shape else 1):
                raise bad(f"the rows of {name} cover {end} of its {shape[0] if shape else 1}")
    tied = index.get("tied", {})
    if not (isinstance(tied, dict) and all(isinstance(v, str) and v in index.get("model", {}) for v in tied.values())):
        raise bad("its 'tied' entry names weights it does not hold")
    return index


class ShardReader:
    """Rows of the tensors of one kind ("model" or "optim") of a sharded checkpoint. A rank's file is opened on first
    use (its header checked first) with safetensors' safe_open, which maps it: only the rows asked for are read."""

    def __init__(self, ckpt: str | Path, index: dict, kind: str):
        self.ckpt, self.kind, self.entries, self.world_size = Path(ckpt), kind, index.get(kind, {}), index["world_size"]
        self._files: dict[int, tuple[Any, dict]] = {}
        self._stack = ExitStack()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _file(self, rank: int) -> tuple[Any, dict]:
        if rank not in self._files:
            path = self.ckpt / shard_file(self.kind, rank, self.world_size)
            header = check_safetensors(path)
            try:
                self._files[rank] = (self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu")),
                                     header)
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"{path} cannot be read ({_one_line(e)}); the checkpoint is corrupt, use "
                                      f"another one") from None
        return self._files[rank]

    def rows(self, name: str, span: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Rows span = (start, stop) of tensor `name` along dim 0 (None: the whole tensor), read from the files of
        the ranks that hold them. Shape (stop - start, *shape[1:])."""
        entry = self.entries[name]
        shape, (dtype, code) = entry["shape"], _SHARD_DTYPES[entry["dtype"]]
        start, stop = span if span is not None else (0, shape[0] if shape else 1)
        parts = []
        for rank, first, last in sorted(entry["rows"], key=lambda r: r[1]):
            lo, hi = max(start, first), min(stop, last)
            if lo >= hi:
                continue
            f, header = self._file(rank)
            held = header.get(name)
            want = [last - first, *shape[1:]] if shape else []
            if not isinstance(held, dict) or held.get("shape") != want or held.get("dtype") != code:
                raise CheckpointError(f"{self.ckpt / shard_file(self.kind, rank, self.world_size)} does not hold {name} "
                                      f"as {SHARD_INDEX} says ({code} {want}); the checkpoint is corrupt, use another one")
            parts.append(f.get_tensor(name) if not shape else f.get_slice(name)[lo - first: hi - first])
        if not shape:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty((0, *shape[1:]), dtype=dtype)
