"""llama.cpp's importance-matrix files (interop.gguf_imatrix_file, `lmforge imatrix`, `export --imatrix`): what
lmforge writes is llama-imatrix's GGUF layout as llama.cpp's own gguf package reads it, with each matrix's sums
against a hand computation; files llama.cpp wrote (its GGUF layout written by its gguf package, its older .dat
layout) read back as the importance llama-quantize derives from them; an export under a file quantizes each matrix
under that file's entry (the head's too with --process-output); misuse is one line and writes nothing."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_export import MAKERS  # noqa: E402
from test_gguf_kquants import WIDE_LLAMA  # noqa: E402
from test_interop import LLAMA_STYLE, lmforge_run  # noqa: E402

gguf = pytest.importorskip("gguf")

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.interop.gguf_imatrix_file import read_imatrix  # noqa: E402
from lmforge.interop.gguf_kquants import quantize, quantize_legacy  # noqa: E402

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 6


def _field(reader, key):
    field = reader.fields[key]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode()
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [bytes(field.parts[i]).decode() for i in field.data]
    return int(field.parts[field.data[0]][0])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("imatrix")
    run = lmforge_run(root, MAKERS["char"](), **LLAMA_STYLE)
    text = root / "calibration.txt"
    text.write_text(TEXT)
    return run, text


def test_lmforge_imatrix_writes_llama_cpps_gguf_layout_with_each_matrixs_sums(llama, tmp_path, capsys):
    run, text = llama
    out = tmp_path / "llama.imatrix.gguf"
    capsys.readouterr()
    assert main(["imatrix", str(run), "--text", str(text), "--out", str(out), "--process-output"]) == 0
    printed, said = capsys.readouterr()
    assert printed == f"{out}\n"  # stdout: only the path; stderr: one line on it, no progress bar in a pipe
    reader = gguf.GGUFReader(str(out))  # llama.cpp's own reader
    model, tokenizer, _ = load_for_inference(run, "cpu")
    context, n_layer = model.config.block_size, model.config.n_layer
    tokens = torch.from_numpy(tokenizer.encode_array(TEXT).astype(np.int64))
    assert _field(reader, "general.type") == "imatrix"
    assert _field(reader, "imatrix.datasets") == ["calibration.txt"]
    assert _field(reader, "imatrix.chunk_size") == context
    assert _field(reader, "imatrix.chunk_count") == -(-len(tokens) // context)
    assert said == (f"{out}: {7 * n_layer + 1} matrices (the head's too), measured over {-(-len(tokens) // context)} "
                    "windows of calibration.txt\n"), said
    tensors = {t.name: t for t in reader.tensors}
    parts = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    names = {f"blk.{i}.{p}.weight" for i in range(n_layer) for p in parts} | {"output.weight"}
    assert set(tensors) == {f"{n}.{s}" for n in names for s in ("in_sum", "in_sum2", "counts")}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    with torch.no_grad():  # block 0's q/k/v read its first norm of the embeddings; the head the final hidden states
        windows = [tokens[i:i + context] for i in range(0, len(tokens), context)]
        first = torch.cat([model.blocks[0].norm_1(model.tok_emb(w)) for w in windows]).double()
        final = torch.cat([model.hidden_states(w[None])[0] for w in windows]).double()
    for name, x in (("blk.0.attn_k.weight", first), ("output.weight", final)):
        assert list(tensors[f"{name}.in_sum2"].shape) == [x.size(1), 1]  # ggml's (columns, matrices)
        np.testing.assert_allclose(np.asarray(tensors[f"{name}.in_sum2"].data).reshape(-1),
                                   (x ** 2).sum(0).numpy(), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(tensors[f"{name}.in_sum"].data).reshape(-1), x.sum(0).numpy(),
                                   rtol=1e-4, atol=1e-4)
        assert np.asarray(tensors[f"{name}.counts"].data).reshape(-1).tolist() == [len(tokens)]
    assert np.array_equal(tensors["blk.1.attn_q.weight.in_sum2"].data, tensors["blk.1.attn_v.weight.in_sum2"].data)
    assert not np.array_equal(tensors["blk.1.attn_q.weight.in_sum2"].data,
                              tensors["blk.1.ffn_down.weight.in_sum2"].data)
    out.unlink()  # without --process-output the head gets no entry, as llama-imatrix's default
    assert main(["imatrix", str(run), "--text", str(text), "--out", str(out)]) == 0
    assert "output.weight.in_sum2" not in {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert main(["imatrix", str(run), "--text", str(text), "--out", str(out), "--force"]) == 0  # ours: replaced


def _tensors(path):
    return {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in gguf.GGUFReader(str(path)).tensors}


def test_in_files_add_their_sums_as_llama_imatrix_does(llama, tmp_path):
    run, text = llama
    other = tmp_path / "winter.txt"
    other.write_text("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 8)
    a, b, ab, again = (tmp_path / f"{n}.imatrix.gguf" for n in ("a", "b", "ab", "again"))
    assert main(["imatrix", str(run), "--text", str(text), "--out", str(a), "--process-output"]) == 0
    assert main(["imatrix", str(run), "--text", str(other), "--out", str(b)]) == 0
    assert main(["imatrix", str(run), "--in-file", str(a), "--in-file", str(b), "--out", str(ab)]) == 0
    ta, tb, tab = _tensors(a), _tensors(b), _tensors(ab)
    assert set(tab) == set(ta) | set(tb)  # the head's entry, in a only, is kept with a's counts
    for name in tab:
        expected = ta.get(name, 0) + tb.get(name, 0)
        assert np.array_equal(tab[name], np.float32(expected) if np.ndim(expected) else expected), name
    reader = gguf.GGUFReader(str(ab))
    assert _field(reader, "imatrix.datasets") == ["calibration.txt", "winter.txt"]
    assert _field(reader, "imatrix.chunk_count") == sum(_field(gguf.GGUFReader(str(f)), "imatrix.chunk_count")
                                                        for f in (a, b))
    # reading the second text anew on top of the first file: the same sums (to float32 rounding)
    assert main(["imatrix", str(run), "--text", str(other), "--in-file", str(a), "--out", str(again)]) == 0
    tagain = _tensors(again)
    assert set(tagain) == set(tab)
    for name in tab:
        np.testing.assert_allclose(tagain[name], tab[name], rtol=1e-6, err_msg=name)


def test_start_each_window_reads_the_text_as_llama_imatrix_does(llama, tmp_path, capsys):
    from lmforge.interop.gguf_imatrix import start_each_window

    ids = start_each_window(torch.arange(1, 131), 64, 0)  # the start token in front, whole windows, each begun with it
    assert ids.tolist() == [0, *range(1, 64), 0, *range(65, 128)]
    run, text = llama
    out = tmp_path / "llama-like.imatrix.gguf"
    assert main(["imatrix", str(run), "--text", str(text), "--out", str(out), "--start-each-window"]) == 0
    model, tokenizer, _ = load_for_inference(run, "cpu")
    context = model.config.block_size
    tokens = torch.from_numpy(tokenizer.encode_array(TEXT).astype(np.int64))
    windows = start_each_window(tokens, context, tokenizer.start_id).reshape(-1, context)
    assert len(windows) == (len(tokens) + 1) // context and (windows[:, 0] == tokenizer.start_id).all()
    with torch.no_grad():
        x = model.blocks[0].norm_1(model.tok_emb(windows)).reshape(-1, model.config.n_embd).double()
    tensors = _tensors(out)
    np.testing.assert_allclose(tensors["blk.0.attn_q.weight.in_sum2"], (x ** 2).sum(0).numpy(), rtol=1e-5)
    assert tensors["blk.0.attn_q.weight.counts"].tolist() == [windows.numel()]
    assert _field(gguf.GGUFReader(str(out)), "imatrix.chunk_count") == len(windows)
    short = tmp_path / "short.txt"
    short.write_text("To be")
    capsys.readouterr()
    assert main(["imatrix", str(run), "--text", str(short), "--out", str(tmp_path / "no.gguf"),
                 "--start-each-window"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "less than one window" in err, err


def test_a_tied_head_gets_no_entry_and_process_output_says_so(tmp_path, capsys):
    from test_interop import GPT2_STYLE

    run = lmforge_run(tmp_path, MAKERS["char"](), **GPT2_STYLE)  # GPT-2 reads its head from token_embd
    text, out = tmp_path / "calibration.txt", tmp_path / "gpt2.imatrix.gguf"
    text.write_text(TEXT)
    capsys.readouterr()
    assert main(["imatrix", str(run), "--text", str(text), "--out", str(out), "--process-output"]) == 0
    said = capsys.readouterr().err.splitlines()
    assert said[0].startswith("warning: --process-output: this model's head is its token embedding (tied)"), said
    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert "output.weight.in_sum2" not in names and "token_embd.weight.in_sum2" not in names
    assert "blk.0.attn_qkv.weight.in_sum2" in names and "blk.1.ffn_up.weight.in_sum2" in names  # GPT-2's fused ones


def test_a_gguf_imatrix_as_llama_imatrix_writes_it_reads_as_llama_quantize_derives_it(tmp_path):
    path = tmp_path / "theirs.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")  # llama.cpp's gguf package, llama-imatrix's layout
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["wiki.train.raw", "code.txt"])
    writer.add_uint32("imatrix.chunk_count", 125)
    writer.add_uint32("imatrix.chunk_size", 512)
    rng = np.random.default_rng(0)
    dense = rng.random((1, 64), dtype=np.float32) * 100
    experts = rng.random((2, 32), dtype=np.float32) * 10  # two matrices (a MoE's experts), the second never used
    writer.add_tensor("blk.0.attn_q.weight.in_sum2", dense)
    writer.add_tensor("blk.0.attn_q.weight.counts", np.array([[64000.0]], dtype=np.float32))
    writer.add_tensor("blk.0.ffn_up_exps.weight.in_sum2", experts)
    writer.add_tensor("blk.0.ffn_up_exps.weight.counts", np.array([[300.0], [0.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    read = read_imatrix(path)
    assert read.datasets == ["wiki.train.raw", "code.txt"] and read.chunk_count == 125
    np.testing.assert_allclose(read.values["blk.0.attn_q.weight"], dense[0] / 64000, rtol=1e-6)
    np.testing.assert_allclose(read.values["blk.0.ffn_up_exps.weight"],
                               np.concatenate([experts[0] / 300, np.ones(32)]), rtol=1e-6)  # unused: 1


def _dat(path: Path, entries: dict[str, tuple[int, np.ndarray]], tail: bytes | None = None) -> None:
    """llama-imatrix's .dat layout (save_imatrix_legacy): values are the mean squares times the calls."""
    out = struct.pack("<i", len(entries))
    for name, (calls, values) in entries.items():
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", calls, len(values))
        out += values.astype("<f4").tobytes()
    path.write_bytes(out + (struct.pack("<i", 40) + struct.pack("<i", 9) + b"wiki.test" if tail is None else tail))


def test_a_dat_imatrix_reads_as_llama_quantize_derives_it(tmp_path):
    mean_square = np.random.default_rng(1).random(48, dtype=np.float32)
    _dat(tmp_path / "a.dat", {"blk.0.ffn_down.weight": (40, mean_square * 40), "blk.1.attn_v.weight": (0, mean_square)})
    read = read_imatrix(tmp_path / "a.dat")
    np.testing.assert_allclose(read.values["blk.0.ffn_down.weight"], mean_square, rtol=1e-6)
    np.testing.assert_allclose(read.values["blk.1.attn_v.weight"], mean_square)  # no calls: as stored
    assert read.chunk_count == 40 and read.datasets == ["wiki.test"]
    _dat(tmp_path / "b.dat", {"blk.0.ffn_down.weight": (40, mean_square * 40)}, tail=b"")  # the tail is optional
    assert read_imatrix(tmp_path / "b.dat").chunk_count == 0


@pytest.mark.parametrize("mix", ["q3_k_m", "iq4_xs"])
def test_export_under_an_imatrix_file_quantizes_each_matrix_under_its_entry(tmp_path, mix):
    run = lmforge_run(tmp_path, MAKERS["char"](), **{**LLAMA_STYLE, **WIDE_LLAMA})
    text, imatrix, out = tmp_path / "calibration.txt", tmp_path / "m.imatrix.gguf", tmp_path / f"{mix}.gguf"
    text.write_text(TEXT)
    assert main(["imatrix", str(run), "--text", str(text), "--out", str(imatrix), "--process-output"]) == 0
    assert main(["export", str(run), "--format", "gguf", "--gguf-type", mix, "--imatrix", str(imatrix),
                 "--out", str(out)]) == 0
    importance = read_imatrix(imatrix).values
    model, _, _ = load_for_inference(run, "cpu")
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    w = model.blocks[2].mlp.proj.weight.detach().numpy()
    kind = tensors["blk.2.ffn_down.weight"].tensor_type.name.lower()
    stored = np.asarray(tensors["blk.2.ffn_down.weight"].data).reshape(-1)
    assert np.array_equal(stored, quantize(w, kind, importance["blk.2.ffn_down.weight"]).reshape(-1))
    assert not np.array_equal(stored, quantize(w, kind).reshape(-1))
    head = model.lm_head.weight.detach().numpy()  # measured with --process-output: the head is weighed too
    kind = tensors["output.weight"].tensor_type.name.lower()
    stored = np.asarray(tensors["output.weight"].data).reshape(-1)
    assert np.array_equal(stored, quantize(head, kind, importance["output.weight"]).reshape(-1))
    assert not np.array_equal(stored, quantize(head, kind).reshape(-1))
    assert _field(reader, "quantize.imatrix.file") == imatrix.name
    assert _field(reader, "quantize.imatrix.dataset") == text.name
    assert _field(reader, "quantize.imatrix.entries_count") == len(importance) == 7 * model.config.n_layer + 1


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_0"])
def test_rows_that_fall_back_and_the_legacy_types_are_weighed_too(llama, tmp_path, mix):
    """LLAMA_STYLE's rows are 32 wide: under q4_k_m they fall back to q5_0 (and q5_1 ...), as llama-quantize's do,
    and are quantized under the importance there as llama.cpp's quantize_row_*_impl are; so is a q5_0 export. The
    head under q5_0 is q8_0 (its rows are not whole blocks of 256), which llama.cpp weighs under no importance
    either."""
    from gguf.quants import quantize as reference

    run, text = llama
    imatrix, out = tmp_path / "m.imatrix.gguf", tmp_path / f"{mix}.gguf"
    assert main(["imatrix", str(run), "--text", str(text), "--out", str(imatrix), "--process-output"]) == 0
    assert main(["export", str(run), "--format", "gguf", "--gguf-type", mix, "--imatrix", str(imatrix),
                 "--out", str(out)]) == 0
    importance = read_imatrix(imatrix).values
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    model, _, _ = load_for_inference(run, "cpu")
    w = model.blocks[0].attn.proj.weight.detach().numpy()
    kind = tensors["blk.0.attn_output.weight"].tensor_type.name.lower()
    assert kind in ("q4_0", "q4_1", "q5_0", "q5_1")
    stored = np.asarray(tensors["blk.0.attn_output.weight"].data).view(np.uint8)
    assert np.array_equal(stored, quantize_legacy(w, kind, importance["blk.0.attn_output.weight"]))
    assert not np.array_equal(stored, reference(w, gguf.GGMLQuantizationType[kind.upper()]))
    head = tensors["output.weight"]
    if mix == "q5_0":
        assert head.tensor_type == gguf.GGMLQuantizationType.Q8_0
        assert np.array_equal(np.asarray(head.data).view(np.uint8), reference(
            model.lm_head.weight.detach().numpy(), gguf.GGMLQuantizationType.Q8_0))


CASES = ["missing", "empty", "a model", "random bytes", "truncated dat", "another model", "wider model", "both options",
         "type", "hf", "over its input"]


@pytest.mark.parametrize("case", CASES)
def test_imatrix_file_misuse_is_one_line_and_writes_nothing(llama, tmp_path, capsys, case):
    run, text = llama
    imatrix, out = tmp_path / "m.imatrix", tmp_path / "out.gguf"
    assert main(["imatrix", str(run), "--text", str(text), "--out", str(imatrix)]) == 0
    args = ["export", str(run), "--format", "gguf", "--gguf-type", "q4_k_m", "--imatrix", str(imatrix)]
    if case == "missing":
        imatrix.unlink()
    elif case == "empty":
        imatrix.write_bytes(b"")
    elif case == "a model":  # a GGUF file, but a model's
        assert main(["export", str(run), "--format", "gguf", "--out", str(imatrix), "--force"]) == 0
    elif case == "random bytes":
        imatrix.write_bytes(np.random.default_rng(2).bytes(3000))
    elif case == "truncated dat":
        _dat(imatrix, {"blk.0.attn_q.weight": (1, np.ones(32))})
        imatrix.write_bytes(imatrix.read_bytes()[:60])
    elif case == "another model":  # no entry names a matrix of this one
        _dat(imatrix, {"model.layers.0.mlp.down_proj.weight": (1, np.ones(32))})
    elif case == "wider model":
        _dat(imatrix, {"blk.0.attn_q.weight": (1, np.ones(64))})
    elif case == "both options":
        args += ["--imatrix-text", str(text)]
    elif case == "type":
        args[args.index("q4_k_m")] = "q8_0"
    elif case == "hf":
        args = ["export", str(run), "--format", "hf", "--imatrix", str(imatrix)]
    else:
        out = imatrix
    before = imatrix.read_bytes() if imatrix.exists() else None
    capsys.readouterr()
    assert main(args + ["--out", str(out)] + (["--force"] if case == "over its input" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("input" if case == "over its input" else "--imatrix") in err, err
    if case != "over its input":
        assert not out.exists()
    assert (imatrix.read_bytes() if imatrix.exists() else None) == before


@pytest.mark.parametrize("case", ["missing text", "empty text", "not ours", "classifier", "neither", "in-file dat",
                                  "in-file of another model", "in-file missing"])
def test_imatrix_command_misuse_is_one_line_and_writes_nothing(llama, tmp_path, capsys, case):
    run, text = llama
    out = tmp_path / "m.imatrix.gguf"
    if case == "missing text":
        text = tmp_path / "nothing.txt"
    elif case == "empty text":
        text = tmp_path / "empty.txt"
        text.write_text("\n \n")
    elif case == "not ours":
        out.write_text("the user's notes\n")
    elif case == "classifier":
        run = lmforge_run(tmp_path / "cls", MAKERS["char"](), **LLAMA_STYLE, head="classify", num_labels=3)
    args = ["imatrix", str(run), "--text", str(text), "--out", str(out), "--force"]
    if case == "neither":
        args.remove("--text"), args.remove(str(text))
    elif case.startswith("in-file"):
        given = tmp_path / "given.imatrix"
        if case == "in-file dat":
            _dat(given, {"blk.0.attn_q.weight": (1, np.ones(32))})
        elif case == "in-file of another model":
            wide = lmforge_run(tmp_path / "wide", MAKERS["char"](), **{**LLAMA_STYLE, "n_embd": 64})
            assert main(["imatrix", str(wide), "--text", str(text), "--out", str(given)]) == 0
        args += ["--in-file", str(given)]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    word = {"neither": "--in-file", "in-file dat": ".dat", "in-file of another model": "another model",
            "in-file missing": "no such file", "classifier": "classify"}.get(case, str(out) if case == "not ours"
                                                                            else "--text")
    assert word in err, (case, err)
    if case == "not ours":
        assert out.read_text() == "the user's notes\n"
    else:
        assert not out.exists()
