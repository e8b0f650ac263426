"""gguf_header: a GGUF file's metadata and tensor table read without the gguf package's reader, checked against that
reader on files gguf's own writer makes (every value type, arrays of strings and of arrays, tensors of several
types) and on lmforge's export; a damaged file (cut anywhere inside its header, wrong magic or version, arrays
nested deep enough to overflow a recursive reader) is refused with GGUFHeaderError, never read past its end."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_interop import GPT2_STYLE, lmforge_run  # noqa: E402

gguf = pytest.importorskip("gguf")

from lmforge.interop.gguf_export import export_gguf, gguf_summary, is_gguf_export  # noqa: E402
from lmforge.interop.gguf_header import GGUFArray, GGUFHeaderError, read_header, tensor_bytes  # noqa: E402
from lmforge.tokenizer import byte_tokenizer  # noqa: E402


def every_kind(path: Path) -> Path:
    """A GGUF file with a value of every type gguf writes and tensors of three types."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**60)
    writer.add_int64("t.i64", -(2**60))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "naïve — 床")
    writer.add_array("t.strings", ["a", "", "ü" * 300])
    writer.add_array("t.ints", [1, 2, 3, 4, 5])
    writer.add_array("t.floats", [0.5, 1.5])
    writer.add_array("t.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    writer.add_tensor("w", rng.standard_normal((3, 64), dtype=np.float32))
    writer.add_tensor("h", rng.standard_normal((2, 32)).astype(np.float16))
    writer.add_tensor("q", gguf.quants.quantize(rng.standard_normal((4, 64), dtype=np.float32),
                                                gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("v", rng.standard_normal(7, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def same_as_gguf_reader(path: Path) -> None:
    header, reader = read_header(path), gguf.GGUFReader(str(path))
    theirs = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(header.metadata) == list(theirs)
    for key, field in theirs.items():
        ours = header.metadata[key]
        if isinstance(ours, GGUFArray):
            assert ours.type == int(field.types[1]), key  # (gguf's reader flattens an array of arrays)
            assert ours.type == 9 or ours.length == len(field.contents()), key
        else:
            assert ours == field.contents() or (isinstance(ours, float) and np.float32(ours) == field.contents()), key
    assert [(t.name, t.shape, t.type, t.offset) for t in header.tensors] == \
        [(t.name, tuple(int(n) for n in t.shape), int(t.tensor_type), int(t.data_offset) - reader.data_offset)
         for t in reader.tensors]
    assert header.version == int(reader.fields["GGUF.version"].contents())
    assert header.data_offset == reader.data_offset
    whole = read_header(path, values=True)
    for key, field in theirs.items():
        ours = whole.metadata[key]
        if isinstance(header.metadata[key], GGUFArray) and header.metadata[key].type == 9:
            ours = [v for part in ours for v in part]  # gguf's reader flattens an array of arrays
        assert ours == field.contents() or np.array_equal(np.float32(ours), field.contents()), key
    for info, t in zip(whole.tensors, reader.tensors):
        ours = gguf.quants.dequantize(tensor_bytes(path, whole, info), gguf.GGMLQuantizationType(info.type))
        assert np.array_equal(ours, gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)), info.name


def test_every_value_type_and_tensor_reads_as_ggufs_reader_reads_it(tmp_path):
    path = every_kind(tmp_path / "every.gguf")
    same_as_gguf_reader(path)
    meta = read_header(path).metadata
    assert meta["t.str"] == "naïve — 床" and meta["t.u64"] == 2**60 and meta["t.bool"] is True
    assert meta["t.strings"] == GGUFArray(8, 3) and meta["t.nested"] == GGUFArray(9, 2)
    values = read_header(path, values=True).metadata
    assert values["t.strings"] == ["a", "", "ü" * 300] and values["t.nested"] == [[1, 2], [3]]
    assert values["t.ints"] == [1, 2, 3, 4, 5] and values["t.floats"] == [0.5, 1.5]
    assert [t.shape for t in read_header(path).tensors] == [(64, 3), (32, 2), (64, 4), (7,)]  # ggml's order


def test_an_export_with_a_whole_vocabulary_reads_as_ggufs_reader_reads_it(tmp_path):
    run = lmforge_run(tmp_path, byte_tokenizer(), **GPT2_STYLE)
    path = export_gguf(run, tmp_path / "m.gguf", dtype="q8_0")
    same_as_gguf_reader(path)
    assert is_gguf_export(path) and not is_gguf_export(every_kind(tmp_path / "theirs.gguf"))
    reader = gguf.GGUFReader(str(path))
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    bits = 8 * sum(int(t.n_bytes) for t in matrices) / sum(int(t.n_elements) for t in matrices)
    assert gguf_summary(path).endswith(f"{bits:.2f} bits per matrix weight")


def test_a_damaged_header_is_refused_not_read_past(tmp_path):
    whole = every_kind(tmp_path / "every.gguf").read_bytes()
    inside = gguf.GGUFReader(str(tmp_path / "every.gguf")).data_offset - 32  # before the padding up to the data
    cut = tmp_path / "cut.gguf"
    for size in sorted({*range(0, 40), *np.random.default_rng(0).integers(40, inside, 60).tolist()}):
        cut.write_bytes(whole[:size])
        with pytest.raises(GGUFHeaderError):
            read_header(cut)
        assert not is_gguf_export(cut)
    only_metadata = tmp_path / "only-metadata.gguf"  # no tensor table after it: the array is the last thing read
    writer = gguf.GGUFWriter(str(only_metadata), "llama")
    writer.add_array("t.floats", [0.5] * 100)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    cut.write_bytes(only_metadata.read_bytes()[:-8])
    with pytest.raises(GGUFHeaderError, match="ends inside its header"):
        read_header(cut)
    key = b"deep"  # arrays nested 200,000 deep, each of one: a recursion that would overflow Python's stack
    nested = b"".join(struct.pack("<IQ", 9, 1) for _ in range(200_000)) + struct.pack("<IQ", 4, 0)
    cut.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, len(key)) + key + struct.pack("<I", 9) + nested)
    for values in (False, True):
        with pytest.raises(GGUFHeaderError, match="nests arrays more than 16 deep"):
            read_header(cut, values=values)
    for bad, why in ((b"GGUX" + whole[4:], "magic"), (whole[:4] + b"\x01\x00\x00\x00" + whole[8:], "version 1")):
        cut.write_bytes(bad)
        with pytest.raises(GGUFHeaderError, match=why):
            read_header(cut)

