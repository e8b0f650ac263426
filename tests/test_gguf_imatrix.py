"""GGUF K-quants under an importance matrix (interop.gguf_imatrix, gguf_kquants.quantize(..., importance), export
--imatrix-text): the bytes of a scalar transcription of llama.cpp's quantize_row_q2_K_impl to q6_K_impl;
less importance-weighted error than without; the importance is the mean square of each matrix's input columns over
the calibration text; the CLI writes it into the file's matrices (not the head's) and refuses what it cannot use."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_kquants import (F, _ref_2bit, _ref_iq4_nl, _ref_iq4_xs, _ref_largest, _ref_q3_tail,  # noqa: E402
                               _ref_q45_tail, _ref_q6_tail, _ref_qkx2, _ref_qx, weights)
from test_gguf_export import MAKERS  # noqa: E402
from test_interop import LLAMA_STYLE, lmforge_run  # noqa: E402

gguf = pytest.importorskip("gguf")

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.interop.gguf_imatrix import measure_importance, source_module  # noqa: E402
from lmforge.interop.gguf_kquants import BYTES, quantize, quantize_legacy  # noqa: E402

QT = gguf.GGMLQuantizationType


def _ref_qp(x, w, nmax):
    """make_qp_quants: levels stored as uint8 (a negative int wraps, as C's does)."""
    top = F(0)
    for v in x:
        top = max(top, v)
    if not top:
        return F(0), [0] * len(x)
    iscale = F(F(nmax) / top)
    levels = [int(np.rint(F(iscale * v))) % 256 for v in x]
    scale = F(F(1) / iscale)
    best = F(0)
    for v, wi, l in zip(x, w, levels):
        diff = F(v - F(scale * F(l)))
        best = F(best + F(F(wi * diff) * diff))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial = F(F(F(F(0.1) * F(step)) + F(nmax)) / top)
        trial_scale = F(F(1) / trial)
        error = F(0)
        for v, wi in zip(x, w):
            diff = F(v - F(trial_scale * F(min(nmax, int(np.rint(F(trial * v)))))))
            error = F(error + F(F(wi * diff) * diff))
        if error < best:
            best, iscale = error, trial
    sumlx = suml2 = F(0)
    for i, (v, wi) in enumerate(zip(x, w)):
        levels[i] = min(nmax, int(np.rint(F(iscale * v))))
        sumlx = F(sumlx + F(F(wi * v) * F(levels[i])))
        suml2 = F(suml2 + F(F(wi * F(levels[i])) * F(levels[i])))
        levels[i] %= 256
    for _ in range(5):
        changed = 0
        for i, (v, wi) in enumerate(zip(x, w)):
            slx = F(sumlx - F(F(wi * v) * F(levels[i])))
            sl2 = F(suml2 - F(F(wi * F(levels[i])) * F(levels[i])))
            if slx > 0 and sl2 > 0:
                new = min(nmax, int(np.rint(F(F(v * sl2) / slx))))
                if new != levels[i]:
                    slx, sl2 = F(slx + F(F(wi * v) * F(new))), F(sl2 + F(F(wi * F(new)) * F(new)))
                    if F(F(slx * slx) * suml2) > F(F(sumlx * sumlx) * sl2):
                        levels[i], sumlx, suml2, changed = new % 256, slx, sl2, changed + 1
        if not changed:
            break
    return F(sumlx / suml2), levels


def _ref_sigma2(block, times=2):
    total = F(0)
    for v in block:
        total = F(total + F(v * v))
    return F(F(F(times) * total) / F(256))


def _ref_weights(block, qw, sigma2):
    return [F(F(qw[i]) * F(np.sqrt(F(sigma2 + F(v * v))))) for i, v in enumerate(block)]


def _ref_sum(values):
    total = F(0)
    for v in values:
        total = F(total + v)
    return total


def _ref_q45_k_impl(block, qw, nmax):
    sigma2 = _ref_sigma2(block)
    scales, mins, sums, q = [], [], [], []
    for j in range(8):
        x = block[32 * j:32 * j + 32]
        w = _ref_weights(x, qw[32 * j:32 * j + 32], sigma2)
        sc, mn, l = _ref_qkx2(x, w, nmax, -0.9, 0.05, 36)  # make_qkx3_quants: the same loop with given weights
        scales.append(sc), mins.append(mn), sums.append(_ref_sum(w)), q.extend(l)
    d_block, ls = _ref_qp(scales, sums, 63)
    m_block, lm = _ref_qp(mins, sums, 63)
    return _ref_q45_tail(block, q, ls, lm, np.float16(d_block), np.float16(m_block), nmax)


def _ref_q6_k_impl(block, qw):
    scales, q = [], []
    for j in range(16):
        sc, l = _ref_qx(block[16 * j:16 * j + 16], 32, [F(v) for v in qw[16 * j:16 * j + 16]])
        scales.append(sc), q.extend(l)
    return _ref_q6_tail(block, scales, q, _ref_largest(scales))


def _ref_q2_k_impl(block, qw):
    weight = _ref_weights(block, qw, _ref_sigma2(block, times=1))
    scales, mins, sums, q = [], [], [], []
    for j in range(16):
        w = weight[16 * j:16 * j + 16]
        sc, mn, l = _ref_qkx2(block[16 * j:16 * j + 16], w, 3, -0.9, 0.05, 36)  # make_qkx3_quants, squared error
        scales.append(sc), mins.append(mn), sums.append(_ref_sum(w)), q.extend(l)
    dm, ls = _ref_qp(scales, sums, 15)
    mm, lm = _ref_qp(mins, sums, 15)
    packed = [(a | (b << 4)) & 0xFF for a, b in zip(ls, lm)]  # C's uint8
    d, dmin = np.float16(dm), np.float16(mm)
    for j in range(16):
        step = F(F(d) * F(packed[j] & 0xF))
        if step:
            shift = F(F(dmin) * F(packed[j] >> 4))
            for i in range(16 * j, 16 * j + 16):
                q[i] = min(3, max(0, int(np.rint(F(F(block[i] + shift) / step)))))
    return bytes(packed) + _ref_2bit(q) + d.tobytes() + dmin.tobytes()


def _ref_q3_k_impl(block, qw):
    weight = _ref_weights(block, qw, _ref_sigma2(block))
    scales, sums, q = [], [], []
    for j in range(16):
        w = weight[16 * j:16 * j + 16]
        sc, l = _ref_qx(block[16 * j:16 * j + 16], 4, w)
        scales.append(sc), sums.append(_ref_sum(w)), q.extend(l)
    d_block, levels = _ref_qx(scales, 32, sums)
    packed = bytearray(12)
    for j, level in enumerate(levels):
        packed[j % 8] |= (level & 0xF) << (4 * (j // 8))
        packed[8 + j % 4] |= (level >> 4) << (2 * (j // 4))
    return _ref_q3_tail(block, q, packed, np.float16(d_block))


def _ref_iq4_weights(x, qw):
    """quantize_row_iq4_nl_impl's weights: qw * sqrt(sigma2 + x^2), sigma2 twice the mean square of `x` (the
    super-block: 32 weights for IQ4_NL, 256 for IQ4_XS), summed in order."""
    sigma2 = F(0)
    for v in x:
        sigma2 = F(sigma2 + F(v * v))
    sigma2 = F(sigma2 * F(F(2) / F(len(x))))
    return [F(q * F(np.sqrt(F(sigma2 + F(v * v))))) for v, q in zip(x, qw)]


def _ref_iq4_nl_impl(block, qw):
    return _ref_iq4_nl(block, [w for g in range(0, 256, 32) for w in _ref_iq4_weights(block[g:g + 32], qw[g:g + 32])])


REFERENCE = {"iq4_nl": _ref_iq4_nl_impl, "iq4_xs": lambda b, w: _ref_iq4_xs(b, _ref_iq4_weights(b, w)),
             "q2_k": _ref_q2_k_impl, "q3_k": _ref_q3_k_impl, "q4_k": lambda b, w: _ref_q45_k_impl(b, w, 15),
             "q5_k": lambda b, w: _ref_q45_k_impl(b, w, 31), "q6_k": _ref_q6_k_impl}


def importance_like(columns, seed):
    """Column importances like an imatrix's: spread over orders of magnitude, some columns never used (0)."""
    rng = np.random.default_rng(seed)
    imp = (rng.gamma(0.5, 1.0, columns) ** 2).astype(np.float32)
    imp[rng.integers(0, columns, columns // 20)] = 0
    return imp


@pytest.mark.parametrize("kind", list(REFERENCE))
def test_the_weighted_quantizers_write_the_bytes_of_llama_cpps_impl_loops(kind):
    """Block for block the bytes of the scalar loops above (llama.cpp's quantize_row_*_impl; libggml's own
    ggml_quantize_chunk given the same importance writes them too: benchmarks/gguf_imatrix.py)."""
    x = weights(6, 512, seed=7)  # rows of zeros, of one sign, constant; outliers
    imp = importance_like(512, seed=8)
    ours = quantize(x, kind, imp).reshape(-1, BYTES[kind])
    by_block = imp.reshape(-1, 256)
    for b, (block, raw) in enumerate(zip(x.reshape(-1, 256), ours)):
        assert raw.tobytes() == REFERENCE[kind](list(block), list(by_block[b % 2])), (kind, b)


def _ref_legacy_impl(row, qw, kind):
    """quantize_row_q4_0_impl ... q5_1_impl over one row: sigma2 the row's mean square (summed in order, divided by
    its length), then per block of 32 make_qx_quants (q4_0, q5_0) or make_qkx3_quants (q4_1, q5_1)."""
    sigma2 = F(_ref_sum([F(v * v) for v in row]) / F(len(row)))
    out = b""
    for b in range(0, len(row), 32):
        x = row[b:b + 32]
        w = _ref_weights(x, qw[b:b + 32], sigma2)
        if kind in ("q4_0", "q5_0"):
            scale, q = _ref_qx(x, 8 if kind == "q4_0" else 16, w)
            out += np.float16(scale).tobytes()
        else:
            scale, minimum, q = _ref_qkx2(x, w, 15 if kind == "q4_1" else 31, -0.9, 0.05, 36)
            out += np.float16(scale).tobytes() + np.float16(-minimum).tobytes()
        if kind in ("q5_0", "q5_1"):
            out += sum((l >> 4) << j for j, l in enumerate(q)).to_bytes(4, "little")
        out += bytes((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4) for j in range(16))
    return out


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_the_legacy_types_under_an_importance_write_the_bytes_of_llama_cpps_impl_loops(kind):
    """What a K-quant's rows of whole blocks of 32 but not 256 fall back to (and --gguf-type q4_0 ... q5_1 with an
    importance matrix): the bytes of the scalar loops, row by row (libggml's ggml_quantize_chunk writes them too);
    and less importance-weighted error than llama.cpp's reference quantizer without it."""
    from gguf.quants import dequantize, quantize as reference

    x = weights(6, 384, seed=11)  # 384 columns: 12 blocks of 32, not whole blocks of 256
    imp = importance_like(384, seed=12)
    ours = quantize_legacy(x, kind, imp)
    for r, row in enumerate(x):
        assert ours[r].tobytes() == _ref_legacy_impl(list(row), list(imp), kind), (kind, r)
    x = weights(64, 1024, seed=13)
    imp = importance_like(1024, seed=14)
    raw = QT[kind.upper()]
    plain, weighted = reference(x, raw), quantize_legacy(x, kind, imp)
    cost = [float((imp * (dequantize(q, raw).reshape(x.shape) - x) ** 2).sum()) for q in (plain, weighted)]
    assert cost[1] < 0.9 * cost[0], cost


@pytest.mark.parametrize("kind", list(REFERENCE))
def test_the_importance_buys_less_error_where_it_is_large(kind):
    """The sum of importance x squared error falls against the quantizer without it (what the importance asks
    for), while the bytes differ."""
    from gguf.quants import dequantize

    x = weights(64, 1024, seed=9)
    imp = importance_like(1024, seed=10)
    plain, weighted = quantize(x, kind), quantize(x, kind, imp)
    assert not np.array_equal(plain, weighted)
    raw = QT[kind.upper()]
    cost = [float((imp * (dequantize(q, raw).reshape(x.shape) - x) ** 2).sum()) for q in (plain, weighted)]
    assert cost[1] < 0.9 * cost[0], cost


def test_an_importance_is_refused_for_types_without_it_and_of_the_wrong_length():
    x = weights(6, 512)
    with pytest.raises(ValueError, match="q5_k, q6_k, iq4_xs, iq4_nl here, not q8_0"):
        quantize(x, "q8_0", np.ones(512, np.float32))
    with pytest.raises(ValueError, match="256 values for 512 columns"):
        quantize(x, "q4_k", np.ones(256, np.float32))


def test_gguf_names_map_to_the_matrix_whose_input_they_read():
    assert source_module("blk.3.attn_q.weight") == source_module("blk.3.attn_v.weight") == "blocks.3.attn.qkv"
    assert source_module("blk.0.ffn_gate.weight") == "blocks.0.mlp.fc"
    assert source_module("blk.11.ffn_down.weight") == "blocks.11.mlp.proj"
    assert source_module("blk.2.attn_output.weight") == "blocks.2.attn.proj"
    assert source_module("output.weight") == "lm_head"  # measured only when asked (lmforge imatrix --process-output)
    assert source_module("blk.0.attn_norm.weight") is None and source_module("token_embd.weight") is None


def test_the_importance_is_each_input_columns_mean_square_over_the_text(tmp_path):
    run = lmforge_run(tmp_path, MAKERS["char"](), **LLAMA_STYLE)
    model, _, _ = load_for_inference(run, "cpu")
    context = model.config.block_size
    tokens = torch.randint(0, model.config.vocab_size, (2 * context + 5,), generator=torch.Generator().manual_seed(1))
    model.train()
    measured = measure_importance(model, tokens, context, batch_size=2)
    assert model.training  # left in the mode it was found in
    assert set(measured) == {f"blocks.{i}.{p}" for i in range(model.config.n_layer)
                             for p in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    with torch.no_grad():  # the first block's q/k/v read its first norm of the embeddings, window by window
        inputs = torch.cat([model.blocks[0].norm_1(model.tok_emb(tokens[i:i + context]))
                            for i in range(0, len(tokens), context)])
    expected = (inputs.double() ** 2).mean(0).float().numpy()
    np.testing.assert_allclose(measured["blocks.0.attn.qkv"], expected, rtol=1e-5)
    assert measured["blocks.0.mlp.proj"].shape == (model.blocks[0].mlp.proj.in_features,)


def test_export_with_imatrix_text_weighs_the_block_matrices_not_the_head(tmp_path, capsys):
    from test_gguf_kquants import WIDE_LLAMA

    run = lmforge_run(tmp_path, MAKERS["char"](), **{**LLAMA_STYLE, **WIDE_LLAMA})
    text = tmp_path / "calibration.txt"
    text.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20)
    out = tmp_path / "q4_k_m.gguf"
    assert main(["export", str(run), "--format", "gguf", "--gguf-type", "q4_k_m", "--imatrix-text", str(text),
                 "--out", str(out)]) == 0
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    model, tokenizer, _ = load_for_inference(run, "cpu")
    tokens = torch.from_numpy(tokenizer.encode_array(text.read_text()).astype(np.int64))
    importance = measure_importance(model, tokens, model.config.block_size)
    w = model.blocks[1].mlp.fc.weight.detach().numpy()  # ffn_gate: the first half of Llama's fused fc
    gate = w[:w.shape[0] // 2]
    stored = np.asarray(tensors["blk.1.ffn_gate.weight"].data).reshape(-1)
    assert np.array_equal(stored, quantize(gate, "q4_k", importance["blocks.1.mlp.fc"]).reshape(-1))
    assert not np.array_equal(stored, quantize(gate, "q4_k").reshape(-1))
    head = model.lm_head.weight.detach().numpy()
    assert np.array_equal(np.asarray(tensors["output.weight"].data).reshape(-1), quantize(head, "q6_k").reshape(-1))
    field = reader.fields["quantize.imatrix.entries_count"]
    assert int(field.parts[field.data[0]][0]) == 7 * model.config.n_layer  # q, k, v, output, gate, up, down
    assert "quantize.imatrix.file" in reader.fields


@pytest.mark.parametrize("case", ["type", "hf", "adapter", "empty", "binary", "missing"])
def test_imatrix_text_misuse_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    run = lmforge_run(tmp_path, MAKERS["char"](), **LLAMA_STYLE)
    text = tmp_path / "calibration.txt"
    text.write_text("some text to read\n")
    args = ["export", str(run), "--format", "gguf", "--gguf-type", "q4_k_m", "--imatrix-text", str(text)]
    if case == "type":
        args[args.index("q4_k_m")] = "q8_0"
    elif case == "hf":
        args = ["export", str(run), "--format", "hf", "--imatrix-text", str(text)]
    elif case == "adapter":  # an adapter file holds no quantized matrices
        args = ["export", str(run), "--format", "gguf", "--adapter", "--imatrix-text", str(text)]
    elif case == "empty":
        text.write_text("  \n")
    elif case == "binary":
        text.write_bytes(b"\xff\xfe\x00\x81" * 10)
    else:
        text.unlink()
    out = tmp_path / "out.gguf"
    capsys.readouterr()
    assert main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--imatrix-text" in err, err
    assert not out.exists()
