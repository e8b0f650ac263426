"""llama.cpp's importance-matrix files, read and written: what `lmforge imatrix` writes and `lmforge export --imatrix`
reads, and what llama.cpp's llama-imatrix writes and llama-quantize --imatrix reads.

Two formats, both keyed by GGUF tensor names ("blk.0.attn_q.weight"):
    GGUF (llama-imatrix's default since 2025): general.type "imatrix"; imatrix.datasets (the calibration files),
        imatrix.chunk_count and imatrix.chunk_size (windows read, tokens each); per matrix the float32 tensors
        NAME.in_sum2 (its input columns' sums of squares, (columns, matrices)), NAME.counts (vectors read, one per
        matrix: 1 for a dense one) and optionally NAME.in_sum (the plain sums). A column's importance is its
        in_sum2 over its count (a count of 0: importance 1, as llama-quantize does).
    .dat (the older one, still what many shared imatrix files are): int32 entries; per entry int32 name length,
        the name, int32 calls, int32 values, float32 values (each column's mean square times the calls); then,
        optionally, int32 chunks and int32 length + the dataset's name. A column's importance is its value over the
        calls.
Read without unpickling anything: the GGUF by the gguf package's reader (numpy views of the file), the .dat by
struct over a memory map of it, every length checked against what is left of the file.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lmforge import __version__
from lmforge.errors import LmforgeError
from lmforge.interop.gguf_imatrix import Activations


class ImatrixFileError(LmforgeError):
    """A file that is not an importance matrix llama.cpp or lmforge wrote, or is damaged."""


class ImportanceMatrix(NamedTuple):
    """An importance matrix as read from a file: each GGUF matrix's columns' mean squares, and where they came
    from (for the quantize.imatrix.* keys of a GGUF model quantized under it)."""
    values: dict[str, np.ndarray]  # GGUF tensor name -> (columns,) float32
    datasets: list[str]
    chunk_count: int


def write_imatrix(path: Path, entries: dict[str, Activations], *, arch: str, datasets: list[str],
                  chunk_count: int, chunk_size: int) -> None:
    """Write `entries` (GGUF tensor name -> its input's Activations) as llama-imatrix's GGUF file at `path`
    (the caller makes it atomic), in sorted name order as llama-imatrix writes them."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)  # general.architecture too: which model family it was measured on
    writer.add_type("imatrix")
    writer.add_string("lmforge.version", __version__)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, list(datasets))
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, chunk_count)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
    for name in sorted(entries):
        a = entries[name]
        if a.sum is not None:  # (a file added to that had none: in_sum is optional to llama.cpp)
            writer.add_tensor(f"{name}.in_sum", a.sum.astype(np.float32).reshape(1, -1))  # ggml (columns, 1)
        writer.add_tensor(f"{name}.in_sum2", a.sum2.astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[a.count]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_imatrix(path: str | Path) -> ImportanceMatrix:
    """The importance matrix in `path`, llama.cpp's GGUF or .dat format; ImatrixFileError in one line naming what
    is wrong (missing, not an imatrix, damaged)."""
    path = Path(path)
    if not path.is_file():
        raise ImatrixFileError(f"--imatrix {path}: no such file; give an imatrix file from `lmforge imatrix` or "
                               "llama.cpp's llama-imatrix")
    with path.open("rb") as f:
        gguf_magic = f.read(4) == b"GGUF"
    return _read_gguf(path) if gguf_magic else _read_dat(path)


def _read_gguf(path: Path) -> ImportanceMatrix:
    reader, entries = _gguf_entries(path)
    values = {name: np.where(n[:, None] > 0, sum2 / np.maximum(n, 1)[:, None], 1.0).reshape(-1).astype(np.float32)
              for name, (sum2, _, n) in entries.items()}
    return ImportanceMatrix(values, *_metadata(reader))


def read_sums(path: str | Path, model_matrices: dict[str, int]) -> tuple[dict[str, Activations], list[str], int]:
    """The sums of a GGUF imatrix file ({GGUF name: Activations}, its datasets, its chunk count), to add more text to
    (llama-imatrix --in-file): every entry one dense matrix of `model_matrices` ({name: columns}) as long as its
    rows; ImatrixFileError in one line otherwise (a .dat file keeps means, not sums)."""
    path = Path(path)
    if not path.is_file():
        raise ImatrixFileError(f"--in-file {path}: no such file; give an imatrix file `lmforge imatrix` or "
                               "llama-imatrix wrote")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ImatrixFileError(f"--in-file {path} is not an imatrix GGUF file (llama.cpp's older .dat files keep "
                                   "means, not the sums to add to): give a .gguf one")
    reader, entries = _gguf_entries(path, "--in-file")
    found = {}
    for name, (sum2, total, n) in entries.items():
        if len(n) != 1 or name not in model_matrices or sum2.shape[1] != model_matrices[name]:
            raise ImatrixFileError(f"--in-file {path}: its entry {name} ({len(n)} x {sum2.shape[1]} columns) is no "
                                   "matrix of this model; it was measured on another model")
        found[name] = Activations(sum2[0], None if total is None else total[0], int(n[0]))
    return found, *_metadata(reader)


def _gguf_entries(path: Path, option: str = "--imatrix") -> tuple[object, dict]:
    """gguf's reader of `path` and {name: (in_sum2 (matrices, columns) float64, in_sum likewise or None, counts
    (matrices,) rounded)}; ImatrixFileError for a damaged file, one without importance data or mismatched tensors."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001  (a damaged file: the reader raises ValueError, struct and numpy errors)
        raise ImatrixFileError(f"{option} {path} is a damaged GGUF file ({type(e).__name__}): write it again with "
                               "`lmforge imatrix` or llama-imatrix") from None
    tensors = {t.name: t for t in reader.tensors}
    names = sorted(n[:-len(".in_sum2")] for n in tensors if n.endswith(".in_sum2"))
    if not names:
        raise ImatrixFileError(f"{option} {path} is a GGUF file without importance data (no .in_sum2 tensors: a "
                               "model?); give the imatrix file that `lmforge imatrix` or llama-imatrix wrote")
    entries = {}
    f32 = gguf.GGMLQuantizationType.F32
    for name in names:
        sum2, counts, total = tensors[f"{name}.in_sum2"], tensors.get(f"{name}.counts"), tensors.get(f"{name}.in_sum")
        if counts is None or sum2.tensor_type != f32 or counts.tensor_type != f32 \
                or sum2.n_elements % counts.n_elements \
                or (total is not None and (total.tensor_type != f32 or total.n_elements != sum2.n_elements)):
            raise ImatrixFileError(f"{option} {path}: the sums and counts of {name} do not match (all float32, "
                                   "one count per matrix); write the file again")
        n = np.rint(np.asarray(counts.data, dtype=np.float64).reshape(-1))
        shape = (len(n), -1)
        entries[name] = (np.asarray(sum2.data, dtype=np.float64).reshape(shape),
                         None if total is None else np.asarray(total.data, dtype=np.float64).reshape(shape), n)
    return reader, entries


def _metadata(reader) -> tuple[list[str], int]:
    """An imatrix GGUF file's datasets and chunk count (empty and 0 where it has none)."""
    import gguf

    return _strings(reader, gguf.Keys.IMatrix.DATASETS), _integer(reader, gguf.Keys.IMatrix.CHUNK_COUNT)


def _strings(reader, key: str) -> list[str]:
    field = reader.fields.get(key)
    if field is None:
        return []
    return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]


def _integer(reader, key: str) -> int:
    field = reader.fields.get(key)
    return 0 if field is None else int(field.parts[field.data[0]][0])


def _read_dat(path: Path) -> ImportanceMatrix:
    if path.stat().st_size < 4:
        raise ImatrixFileError(f"--imatrix {path} is neither an imatrix GGUF file nor llama.cpp's .dat one (it holds "
                               f"{path.stat().st_size} bytes); give the file llama-imatrix or `lmforge imatrix` wrote")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # not read whole: a wrong
        return _parse_dat(path, data)  # file given by mistake may be large


def _parse_dat(path: Path, data: mmap.mmap) -> ImportanceMatrix:
    at = 0

    def take(n: int, what: str) -> bytes:
        nonlocal at
        if n < 0 or at + n > len(data):
            raise ImatrixFileError(f"--imatrix {path} is neither an imatrix GGUF file nor a whole llama.cpp .dat one "
                                   f"(it ends inside {what}); give the file llama-imatrix or `lmforge imatrix` wrote")
        at += n
        return data[at - n:at]

    def int32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    entries = int32("the entry count")
    if not 0 < entries <= len(data) // 16:  # an entry takes at least 16 bytes
        raise ImatrixFileError(f"--imatrix {path} is neither an imatrix GGUF file nor llama.cpp's .dat one (it "
                               f"would hold {entries} entries); give the file llama-imatrix or `lmforge imatrix` wrote")
    values = {}
    for i in range(entries):
        try:
            name = take(int32(f"entry {i}'s name length"), f"entry {i}'s name").decode("utf-8")
        except UnicodeDecodeError:
            raise ImatrixFileError(f"--imatrix {path}: entry {i}'s name is not text; the file is damaged or not an "
                                   "imatrix file") from None
        calls, n = int32(f"{name}'s calls"), int32(f"{name}'s value count")
        if n < 1:
            raise ImatrixFileError(f"--imatrix {path}: {name} holds {n} values; the file is damaged")
        v = np.frombuffer(take(4 * n, f"{name}'s values"), dtype="<f4").astype(np.float64)
        values[name] = (v / calls if calls > 0 else v).astype(np.float32)
    chunks, datasets = 0, []
    if at + 4 <= len(data):  # optional: the chunks read and the calibration file's name
        chunks = int32("the chunk count")
        if at + 4 <= len(data):
            length = int32("the dataset name's length")
            if 0 < length <= len(data) - at:
                datasets = [take(length, "the dataset name").decode("utf-8", "replace")]
    return ImportanceMatrix(values, datasets, chunks)


def imatrix_summary(path: str | Path) -> str:
    """One line on an imatrix file: its matrices, the windows of text they were measured over, and that text."""
    imatrix = read_imatrix(path)
    head = " (the head's too)" if "output.weight" in imatrix.values else ""
    return (f"{path}: {len(imatrix.values)} matrices{head}, measured over {imatrix.chunk_count} windows of "
            f"{', '.join(imatrix.datasets) or 'unnamed text'}")
