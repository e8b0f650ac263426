"""A GGUF file's header, read without the gguf package's reader: its metadata (scalars and strings as values, arrays
as their element type and length, or with `values` as lists) and its tensor table (name, shape, type, offset), in
milliseconds where gguf.GGUFReader builds a numpy view of every item (2.6 s on GPT-2's 50,257-token vocabulary and
its merges); tensor_bytes gives a tensor's stored bytes, memory-mapped. For the checks that need no more (is this file
lmforge's export, what types does it hold) and for `lmforge import`.

The layout (GGUF version 2 and 3, little-endian): "GGUF", uint32 version, uint64 tensor count, uint64 key count; per
key a string (uint64 length + UTF-8 bytes), a uint32 value type and the value (an array: uint32 element type,
uint64 count, the elements); per tensor its name, uint32 dimensions, uint64 per dimension (ggml's order: the row
length first), uint32 type and uint64 offset into the data. Read by struct over a memory map; every length is
checked against what is left of the file, so a damaged file raises GGUFHeaderError rather than reading past it.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lmforge.errors import LmforgeError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_ALIGNMENT = 32  # where general.alignment does not say otherwise
_DEPTH = 16  # arrays nested deeper are refused (GGUF files nest two at most; a hostile one, deep enough to overflow)


class GGUFHeaderError(LmforgeError):
    """Not a GGUF file, or a damaged one."""


class GGUFArray(NamedTuple):
    """An array value, not read: its element type (GGUF's value type number) and length."""
    type: int
    length: int


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # ggml's order: the row length first
    type: int  # ggml's type number (gguf.GGMLQuantizationType)
    offset: int  # from the start of the data section


class GGUFHeader(NamedTuple):
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int  # where the tensor data begins: the header's end, aligned


class _Cursor:
    def __init__(self, buffer: mmap.mmap | bytes, values: bool) -> None:
        self.buffer, self.at, self.values = buffer, 0, values

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.buffer):
            raise GGUFHeaderError("ends inside its header")
        value = struct.unpack_from(fmt, self.buffer, self.at)[0]
        self.at += size
        return value

    def skip(self, size: int) -> None:
        if self.at + size > len(self.buffer):
            raise GGUFHeaderError("ends inside its header")
        self.at += size

    def string(self) -> str:
        length = self.take("<Q")
        start = self.at
        self.skip(length)
        try:
            return bytes(self.buffer[start:self.at]).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFHeaderError("holds a string that is not UTF-8") from None

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            if depth >= _DEPTH:
                raise GGUFHeaderError(f"nests arrays more than {_DEPTH} deep")
            element, length = self.take("<I"), self.take("<Q")
            if self.values:
                return self.array(element, length, depth + 1)
            self.skip_array(element, length, depth + 1)
            return GGUFArray(element, length)
        raise GGUFHeaderError(f"holds a value of unknown type {kind}")

    def array(self, element: int, length: int, depth: int) -> list:
        if element in _SCALARS:
            start = self.at
            self.skip(length * struct.calcsize(_SCALARS[element]))
            return np.frombuffer(self.buffer, np.dtype(_SCALARS[element]), length, start).tolist()
        if element in (_STRING, _ARRAY):
            return [self.value(element, depth) for _ in range(length)]
        raise GGUFHeaderError(f"holds an array of unknown type {element}")

    def skip_array(self, element: int, length: int, depth: int) -> None:
        if element in _SCALARS:
            self.skip(length * struct.calcsize(_SCALARS[element]))
        elif element == _STRING:
            for _ in range(length):
                self.skip(self.take("<Q"))
        elif element == _ARRAY:
            if depth >= _DEPTH:
                raise GGUFHeaderError(f"nests arrays more than {_DEPTH} deep")
            for _ in range(length):
                self.skip_array(self.take("<I"), self.take("<Q"), depth + 1)
        else:
            raise GGUFHeaderError(f"holds an array of unknown type {element}")


def read_header(path: str | Path, values: bool = False) -> GGUFHeader:
    """The metadata and tensor table of the GGUF file at `path` (`values`: arrays read as lists, else GGUFArray);
    GGUFHeaderError (naming why) for a file that is not GGUF version 2 or 3 or ends inside its header. OSError for
    one that cannot be opened."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise GGUFHeaderError("is too short for a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            if buffer[:4] != b"GGUF":
                raise GGUFHeaderError("does not begin with GGUF's magic")
            cursor = _Cursor(buffer, values)
            cursor.skip(4)
            version = cursor.take("<I")
            if version not in (2, 3):
                raise GGUFHeaderError(f"is GGUF version {version}, not 2 or 3 (or big-endian)")
            n_tensors, n_keys = cursor.take("<Q"), cursor.take("<Q")
            metadata = {}
            for _ in range(n_keys):
                key = cursor.string()
                metadata[key] = cursor.value(cursor.take("<I"))
            tensors = []
            for _ in range(n_tensors):
                name, dims = cursor.string(), cursor.take("<I")
                if dims > 8:
                    raise GGUFHeaderError(f"gives tensor {name} {dims} dimensions")
                shape = tuple(cursor.take("<Q") for _ in range(dims))
                tensors.append(TensorInfo(name, shape, cursor.take("<I"), cursor.take("<Q")))
            end = cursor.at
    alignment = metadata.get("general.alignment", _ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFHeaderError(f"sets general.alignment to {alignment!r}, not a power of two")
    return GGUFHeader(version, metadata, tensors, -(-end // alignment) * alignment)


def tensor_bytes(path: str | Path, header: GGUFHeader, tensor: TensorInfo) -> np.ndarray:
    """The stored bytes of `tensor` as a read-only memory map (rows, bytes per row): what gguf.quants.dequantize
    takes. GGUFHeaderError for a type gguf does not know, a row that is not whole blocks, or data past the file's
    end."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor.type)]
    except (ValueError, KeyError):
        raise GGUFHeaderError(f"gives tensor {tensor.name} the unknown type {tensor.type}") from None
    row = tensor.shape[0] if tensor.shape else 1
    rows = int(np.prod(tensor.shape[1:], dtype=np.int64)) if len(tensor.shape) > 1 else 1
    if row % block:
        raise GGUFHeaderError(f"gives tensor {tensor.name} rows of {row}, not whole blocks of {block}")
    start, size = header.data_offset + tensor.offset, rows * (row // block) * block_bytes
    if start + size > Path(path).stat().st_size:
        raise GGUFHeaderError(f"ends inside the data of tensor {tensor.name}")
    if size == 0:
        return np.zeros((rows, 0), dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(rows, size // max(rows, 1)))
