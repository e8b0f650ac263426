"""interop.gguf_writer: gguf's GGUFWriter with metadata arrays packed whole writes the bytes gguf's own writes."""

from __future__ import annotations

import enum

import pytest

gguf = pytest.importorskip("gguf")

from lmforge.interop.gguf_writer import gguf_writer  # noqa: E402


class Kind(enum.IntEnum):  # as gguf.TokenType: int values of a subclass
    A = 1
    B = 6


@pytest.mark.parametrize("value,sub_type", [
    (["<s>", "a", "\u00e9t\u00e9", "\u2581the", b"\xff\xfe", bytearray(b"x")], None),  # strings, bytes among them
    ([1, -2, 300000], None), ([0.5, -1.25, 3e-8], None), ([True, False, True], None),
    ([Kind.A, Kind.B, 3], None),  # IntEnum and int: INT32
    ([1, 2, 3], gguf.GGUFValueType.UINT32), ([0.1, 0.2], gguf.GGUFValueType.FLOAT64),
    ([7, 8], gguf.GGUFValueType.INT64), (["x", "y"], gguf.GGUFValueType.STRING),
    ([[1, 2], [3]], None),  # arrays of arrays: gguf's own packing
    (list(range(50_000)), None),
], ids=["strings", "ints", "floats", "bools", "int-enums", "uint32", "float64", "int64", "typed-strings", "nested",
        "long"])
def test_arrays_pack_to_the_bytes_ggufs_writer_packs(value, sub_type):
    ours, theirs = gguf_writer(None, "llama"), gguf.GGUFWriter(None, "llama")
    for add_vtype in (True, False):
        expected = theirs._pack_val(value, gguf.GGUFValueType.ARRAY, add_vtype, sub_type)
        assert ours._pack_val(value, gguf.GGUFValueType.ARRAY, add_vtype, sub_type) == expected


@pytest.mark.parametrize("value", [["a", 1], [1, 2.0], []], ids=["string-and-int", "int-and-float", "empty"])
def test_arrays_gguf_refuses_are_refused_alike(value):
    with pytest.raises(ValueError) as theirs:
        gguf.GGUFWriter(None, "llama")._pack_val(value, gguf.GGUFValueType.ARRAY, True)
    with pytest.raises(ValueError) as ours:
        gguf_writer(None, "llama")._pack_val(value, gguf.GGUFValueType.ARRAY, True)
    assert str(ours.value) == str(theirs.value)


def test_other_values_are_ggufs_own():
    ours, theirs = gguf_writer(None, "llama"), gguf.GGUFWriter(None, "llama")
    for value, kind in (("text", gguf.GGUFValueType.STRING), (7, gguf.GGUFValueType.UINT32),
                        (True, gguf.GGUFValueType.BOOL), (1.5, gguf.GGUFValueType.FLOAT32)):
        assert ours._pack_val(value, kind, True) == theirs._pack_val(value, kind, True)
