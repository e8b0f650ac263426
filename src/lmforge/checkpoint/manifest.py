"""What a checkpoint directory holds and how every reader checks it before loading anything.

manifest.json, written last, lists the sha256 and size of every file; expected_files says which files a checkpoint
of each kind must hold; verify_checkpoint checks both. Nothing is pickled: tensors go through safetensors (each
file's header is checked against its size before anything is allocated, check_safetensors), everything else
through JSON; a pickle file planted under a checkpoint name is refused, never opened.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

from lmforge.errors import CheckpointError
from lmforge.files import sha256_file

FORMAT = "lmforge-checkpoint-v1"
MANIFEST = "manifest.json"
# What a checkpoint may hold: tensors as safetensors, everything else as JSON. Nothing else is ever read.
SAFETENSORS_FILES = ("model.safetensors", "optimizer.safetensors")
JSON_FILES = ("state.json", "config.json", "tokenizer.json")
# A sharded checkpoint (train.checkpoint_format: sharded) holds, instead of the two safetensors files above, one
# model and one optimizer file per rank of the job that wrote it, and shards.json: which rows of which tensor each
# file holds (see save_sharded_checkpoint).
SHARD_INDEX = "shards.json"
SHARD_FILE = re.compile(r"(model|optim)-rank(\d+)-of-(\d+)\.safetensors")
MAX_SHARDS = 1 << 16
# Files that are (or usually are) Python pickles: loading one can run any code, so they are refused.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
MAX_JSON_BYTES = 256 << 20  # a state.json or tokenizer.json larger than this is not one lmforge wrote
MAX_HEADER_BYTES = 16 << 20  # safetensors headers of lmforge checkpoints are a few KB


def refuse_pickles(directory: Path) -> None:
    """Raise CheckpointError if `directory` holds a file named like a pickle (ckpt.pt, model.bin, ...).

    Such a file is never opened: unpickling runs whatever code the file names.
    """
    try:
        planted = sorted(f.name for f in directory.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    except OSError:
        return
    if planted:
        raise CheckpointError(f"{directory / planted[0]} looks like a pickle file, which lmforge never loads (unpickling "
                              f"can run any code); use a checkpoint written by lmforge train (safetensors + JSON)")


def _read_json(path: Path, what: str) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{what} {path} is larger than {MAX_JSON_BYTES >> 20} MiB; the checkpoint is corrupt, "
                                  f"use another one")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete, use another one") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError):
        raise CheckpointError(f"{what} {path} is not valid JSON; the checkpoint is corrupt, use another one") from None
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be read ({e.strerror or e}); use another checkpoint") from None


def verify_checkpoint(ckpt: str | Path) -> dict:
    """Check every file against manifest.json (size and sha256); return the manifest or raise CheckpointError.

    The error names the file: missing, truncated, corrupt, or a planted pickle.
    """
    ckpt = Path(ckpt)
    manifest = _read_json(ckpt / MANIFEST, "checkpoint manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{ckpt / MANIFEST} is not an {FORMAT} manifest; pass a checkpoint written by lmforge train")
    refuse_pickles(ckpt)
    if "state.json" not in manifest["files"]:  # it says which other files belong: see expected_files
        raise _unlisted(ckpt, "state.json", "every checkpoint's step and kind")
    for name, entry in manifest["files"].items():
        known = name in SAFETENSORS_FILES + JSON_FILES + (SHARD_INDEX,) or SHARD_FILE.fullmatch(name)
        if not known or not isinstance(entry, dict):
            raise CheckpointError(f"{ckpt / MANIFEST} lists {name!r}, which is not a checkpoint file lmforge writes; "
                                  f"the checkpoint is corrupt or tampered with, use another one")
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} listed in {MANIFEST} is missing; use another checkpoint")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} has {size} bytes, {MANIFEST} says "
                                  f"{entry.get('bytes')} (truncated?); delete it and use an earlier checkpoint")
        if sha256_file(f) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} does not match its sha256 in {MANIFEST}; "
                                  f"delete it and use an earlier checkpoint")
    state = _read_json(ckpt / "state.json", "checkpoint state")  # verified just above
    if not isinstance(state, dict):
        raise CheckpointError(f"{ckpt / 'state.json'} is not a JSON object; the checkpoint is corrupt, use another one")
    shards = state.get("shards")
    if shards is not None and not (type(shards) is int and 1 <= shards <= MAX_SHARDS):
        raise CheckpointError(f"{ckpt / 'state.json'} has a malformed 'shards' entry ({shards!r}); the checkpoint is "
                              f"corrupt, use another one")
    expected = expected_files(state)
    for name, why in expected.items():
        if name not in manifest["files"]:
            raise _unlisted(ckpt, name, why)
    for name in manifest["files"]:
        if name not in expected:
            raise CheckpointError(f"{ckpt / MANIFEST} lists {name}, which this kind of checkpoint does not hold "
                                  f"(see its state.json); the checkpoint is corrupt or tampered with, use another one")
    return manifest


def expected_files(state: dict) -> dict[str, str]:
    """{file: why it belongs} for a checkpoint whose state.json holds `state`: the one rule of which files a
    checkpoint of each kind holds, that save_checkpoint writes by and verify_checkpoint requires.

    Every kind (a full model, a LoRA run's adapters and heads, a classifier, a merged or an imported model) holds
    model.safetensors, config.json and state.json. A checkpoint train can resume (state "ranks": each process's
    RNG and data position) also holds optimizer.safetensors; one with a tokenizer (state "tokenizer_sha256")
    holds tokenizer.json. A sharded checkpoint (state "shards": N, the processes that wrote it) holds
    model-rank{r}-of-{N}.safetensors (and optim-rank{r}-of-{N}.safetensors) for every rank r, and shards.json,
    instead of the two whole files. A manifest without one of these would let that file load unverified.
    """
    files = {"config.json": "every checkpoint's model config", "state.json": "every checkpoint's step and kind"}
    shards = state.get("shards")
    if shards is None:
        files["model.safetensors"] = "every checkpoint's weights"
        if "ranks" in state:
            files["optimizer.safetensors"] = "a training checkpoint's optimizer state"
    else:
        files[SHARD_INDEX] = "a sharded checkpoint's index of rows"
        for rank in range(int(shards)):
            files[shard_file("model", rank, int(shards))] = f"rank {rank}'s rows of the weights"
            if "ranks" in state:
                files[shard_file("optim", rank, int(shards))] = f"rank {rank}'s rows of the optimizer state"
    if state.get("tokenizer_sha256"):
        files["tokenizer.json"] = "the tokenizer its state.json names"
    return files


def shard_file(kind: str, rank: int, world_size: int) -> str:
    """The file of a sharded checkpoint that holds rank `rank`'s rows: kind "model" (weights) or "optim"."""
    return f"{kind}-rank{rank}-of-{world_size}.safetensors"


def has_optimizer_state(manifest: dict) -> bool:
    """Whether a verified checkpoint's manifest lists optimizer state (whole or sharded): what train can resume."""
    return any(name == "optimizer.safetensors" or name.startswith("optim-rank") for name in manifest["files"])


def _unlisted(ckpt: Path, name: str, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {ckpt} is incomplete: {MANIFEST} does not list {name} ({why}), so it "
                           f"cannot be verified; use another checkpoint (a run directory falls back to its newest "
                           f"intact one)")


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors file's header against the file's size before anything is allocated.

    Returns the header (tensor name -> {dtype, shape, data_offsets}, plus "__metadata__"). Raises
    CheckpointError naming the file when the header is malformed, claims more bytes than the file has,
    or lets tensors overlap or leave gaps.
    """
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file ({why}); the checkpoint is corrupt, use another one")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise bad(f"header claims {n} bytes, the file has {size}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e}); use another checkpoint") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError):
        raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_bytes, spans = size - 8 - n, []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise bad("metadata is not a mapping of strings")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in _DTYPE_BYTES:
            raise bad(f"tensor {name!r} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < 2**40 for d in shape):
            raise bad(f"tensor {name!r} has an invalid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise bad(f"tensor {name!r} lies outside the file's {data_bytes} data bytes")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[entry["dtype"]]:
            raise bad(f"tensor {name!r} of shape {shape} does not fill its {offsets[1] - offsets[0]} bytes")
        spans.append(offsets)
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise bad("tensors overlap or leave gaps")
        end = stop
    if end != data_bytes:
        raise bad(f"tensors cover {end} of {data_bytes} data bytes")
    return header


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text[:400]
