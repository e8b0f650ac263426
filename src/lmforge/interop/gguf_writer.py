"""gguf's GGUFWriter with its metadata arrays packed whole.

gguf-py packs an array value item by item (a Python call, a type check and a struct.pack per token of the
vocabulary: about 150,000 of each for a 50,000-token model's token list, types and scores). The subclass writes the
same bytes in one struct.pack for an array of numbers and one join for an array of strings, the array's type found
as gguf finds it (GGUFValueType.get_type); any other value, and any array gguf refuses, goes to gguf's own.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path
from typing import Any


@functools.cache
def _writer_class() -> type:
    import gguf

    Type = gguf.GGUFValueType

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if vtype != Type.ARRAY or isinstance(val, (bytes, str)) or not isinstance(val, (list, tuple)) or not val:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            if sub_type is None:  # GGUFValueType.get_type of one item of each Python type the array holds
                found = {Type.get_type(v) for v in {type(v): v for v in val}.values()}
                if len(found) != 1:
                    return super()._pack_val(val, vtype, add_vtype, sub_type)  # (gguf's error)
            kind = sub_type if sub_type is not None else found.pop()
            order = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
            head = (struct.pack(order + "I", vtype) if add_vtype else b"") + struct.pack(order + "IQ", kind, len(val))
            number = self._simple_value_packing.get(kind)
            if number is not None:
                return head + struct.pack(("" if kind == Type.BOOL else order) + f"{len(val)}{number}", *val)
            if kind == Type.STRING:
                encoded = [v.encode("utf-8") if isinstance(v, str) else v for v in val]
                return head + b"".join(struct.pack(order + "Q", len(e)) + e for e in encoded)
            return super()._pack_val(val, vtype, add_vtype, sub_type)  # (arrays of arrays)

    return Writer


def gguf_writer(path: str | Path | None, arch: str) -> Any:
    """A gguf.GGUFWriter of `path` for architecture `arch` that packs metadata arrays whole (the same bytes)."""
    return _writer_class()(None if path is None else str(path), arch)
