"""llama.cpp's K-quants written by lmforge (interop.gguf_kquants): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS and IQ4_NL
blocks, the bytes of a scalar transcription of llama.cpp's reference loops, that the gguf package's dequantizers
(llama.cpp's layout) read back close to the weights, closer than the older types of as many bits; the mixes (Q6_K
down to Q2_K, IQ4) choose each tensor's type as llama-quantize does; an export loads in transformers with logits close
to the model's and imports back to what the file holds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_export import MAKERS, fields, load_theirs  # noqa: E402
from test_interop import GPT2_STYLE, LLAMA_STYLE, lmforge_run  # noqa: E402

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.interop.gguf_export import GGUF_TYPES, export_gguf  # noqa: E402
from lmforge.interop.gguf_import import import_gguf, read_gguf  # noqa: E402
from lmforge.interop.gguf_kquants import BYTES, MIXES, quantize, tensor_type  # noqa: E402

QT = gguf.GGMLQuantizationType


def weights(rows: int = 96, columns: int = 512, seed: int = 0) -> np.ndarray:
    """A matrix like a trained one: mostly small, a few outliers, one row of zeros, one all positive, one all
    negative, one constant."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, columns)) * 0.02).astype(np.float32)
    x[rng.integers(0, rows, 20), rng.integers(0, columns, 20)] *= 25
    x[1], x[2], x[3], x[4] = 0, np.abs(x[2]), -np.abs(x[3]), 0.01
    return x


def error(x: np.ndarray, kind: str, raw: np.ndarray | None = None) -> float:
    """Relative RMS error of `kind`'s bytes as llama.cpp's layout reads them (the gguf package's dequantizer)."""
    qt = QT[kind.upper()]
    raw = quantize(x, kind) if raw is None else raw
    block, size = gguf.GGML_QUANT_SIZES[qt]
    assert raw.dtype == np.uint8 and raw.shape == (x.shape[0], x.shape[1] // block * size)
    back = gguf.quants.dequantize(raw, qt)
    return float(np.sqrt(((back - x) ** 2).mean() / (x ** 2).mean()))


def legacy_error(x: np.ndarray, kind: str) -> float:
    qt = QT[kind.upper()]
    return float(np.sqrt(((gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt) - x) ** 2).mean()
                         / (x ** 2).mean()))


def test_k_quant_blocks_read_back_close_and_beat_the_older_types_of_as_many_bits():
    x = weights()
    q2, q3, q4, q5, q6 = (error(x, kind) for kind in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k"))
    assert q6 < q5 < q4 < q3 < q2 < 0.35
    # IQ4_NL (4.5 bits per weight) and IQ4_XS (4.25): a non-linear grid beats Q4_0's even steps of as many bits
    assert error(x, "iq4_nl") < 0.92 * legacy_error(x, "q4_0") and error(x, "iq4_xs") < legacy_error(x, "q4_0")
    # Q4_K (4.5 bits per weight) against Q4_0 (4.5) and Q4_1 (5); Q5_K (5.5) against Q5_0 (5.5); Q6_K (6.56)
    # against Q5_1 (6): the searched scales and minimums of 256-weight super-blocks win at the same size
    assert q4 < 0.8 * legacy_error(x, "q4_0") and q4 < legacy_error(x, "q4_1")
    assert q5 < 0.8 * legacy_error(x, "q5_0") and q6 < 0.55 * legacy_error(x, "q5_1")
    # measured 0.0753, 0.0381, 0.0203; without the search over candidate scales Q4_K is 0.083 and Q5_K 0.041
    for kind, bound in (("q4_k", 0.079), ("q5_k", 0.0395), ("q6_k", 0.0215)):
        assert error(x, kind) < bound, kind


@pytest.mark.parametrize("kind", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs", "iq4_nl"])
def test_every_weight_comes_back_from_its_own_place(kind):
    """Sub-blocks of scales 20x apart, so a weight packed into the wrong nibble, bit or sub-block, or a sub-block
    read with another's scale, shows: every weight must read back within a fifth of its sub-block's range (measured:
    0.12 for Q4_K and Q5_K, whose 6-bit sub-block scales are coarse next to the largest, 0.02 for Q6_K; Q2_K and
    Q3_K, of 4 and 8 levels and 4- and 6-bit scales, get scales 4x apart and a third of the range: 0.25 and 0.11)."""
    rng = np.random.default_rng(1)
    sub = 32 if kind in ("q4_k", "q5_k", "iq4_xs", "iq4_nl") else 16
    few = kind in ("q2_k", "q3_k")
    x = rng.uniform(-1, 1, (8, 512)).astype(np.float32)
    x *= np.repeat(rng.uniform(0.5 if few else 0.1, 2.0, (8, 512 // sub)), sub, axis=1).astype(np.float32)
    back = gguf.quants.dequantize(quantize(x, kind), QT[kind.upper()])
    blocks, backs = x.reshape(-1, sub), back.reshape(-1, sub)
    span = blocks.max(1) - blocks.min(1)
    assert np.all(np.abs(backs - blocks) <= span[:, None] / (3 if few else 5))


def test_a_grid_the_blocks_can_hold_is_held_to_float16_precision_and_zeros_stay_zero():
    grid = (np.arange(256) % 16).astype(np.float32) * 0.125  # 0 .. 1.875 in steps of 1/8: Q4_K's levels, min 0
    x = np.stack([grid, -grid[::-1], np.zeros(256, np.float32)])
    for kind in ("q4_k", "q5_k"):
        back = gguf.quants.dequantize(quantize(x[:1], kind), QT[kind.upper()])
        assert np.abs(back - x[:1]).max() <= 2e-3 * 1.875, kind
    for kind in ("q4_k", "q5_k", "q6_k"):
        raw = quantize(x[2:], kind)
        assert not gguf.quants.dequantize(raw, QT[kind.upper()]).any(), kind
    assert not quantize(x[2:], "q6_k").any()  # llama.cpp writes a block of zeros as zero bytes


# A scalar reference: llama.cpp's quantize_row_q2_K_ref ... q6_K_ref written as plain loops over one block,
# in float32 and in llama.cpp's order of operations, to hold the vectorised quantizer to the same bytes.
F = np.float32


def _ref_qkx2(x, w, nmax, rmin, rdelta, nstep, mad=False):
    lo, hi, sum_w, sum_x = x[0], x[0], w[0], F(w[0] * x[0])
    for i in range(1, len(x)):
        lo, hi = min(lo, x[i]), max(hi, x[i])
        sum_w, sum_x = F(sum_w + w[i]), F(sum_x + F(w[i] * x[i]))
    lo = min(lo, F(0))
    if hi == lo:
        return F(0), F(-lo), [0] * len(x)
    iscale = F(F(nmax) / F(hi - lo))
    scale = F(F(1) / iscale)
    q = [min(nmax, max(0, int(np.rint(F(iscale * F(v - lo)))))) for v in x]
    best = F(0)
    for v, wi, l in zip(x, w, q):
        diff = F(F(F(scale * F(l)) + lo) - v)
        best = F(best + F(wi * (abs(diff) if mad else F(diff * diff))))
    for step in range(nstep + 1):
        iscale = F(F(F(F(rmin) + F(F(rdelta) * F(step))) + F(nmax)) / F(hi - lo))
        trial = [min(nmax, max(0, int(np.rint(F(iscale * F(v - lo)))))) for v in x]
        sum_l = sum_l2 = sum_xl = F(0)
        for v, wi, l in zip(x, w, trial):
            wl = F(wi * F(l))
            sum_l, sum_l2, sum_xl = F(sum_l + wl), F(sum_l2 + F(wl * F(l))), F(sum_xl + F(wl * v))
        det = F(F(sum_w * sum_l2) - F(sum_l * sum_l))
        if det > 0:
            this_scale = F(F(F(sum_w * sum_xl) - F(sum_x * sum_l)) / det)
            this_min = F(F(F(sum_l2 * sum_x) - F(sum_l * sum_xl)) / det)
            if this_min > 0:
                this_min, this_scale = F(0), F(sum_xl / sum_l2)
            error = F(0)
            for v, wi, l in zip(x, w, trial):
                diff = F(F(F(this_scale * F(l)) + this_min) - v)
                error = F(error + F(wi * (abs(diff) if mad else F(diff * diff))))
            if error < best:
                q, best, scale, lo = trial, error, this_scale, this_min
    return scale, F(-lo), q


def _ref_q2_k(block):
    scales, mins, q = [], [], []
    for j in range(16):
        x = block[16 * j:16 * j + 16]
        sc, mn, l = _ref_qkx2(x, [F(abs(v)) for v in x], 3, -0.5, 0.1, 15, mad=True)
        scales.append(sc), mins.append(mn), q.extend(l)
    max_scale = max_min = F(0)
    for sc, mn in zip(scales, mins):
        max_scale, max_min = sc if sc > max_scale else max_scale, mn if mn > max_min else max_min
    ls = [int(np.rint(F(F(F(15) / max_scale) * v))) if max_scale > 0 else 0 for v in scales]
    lm = [int(np.rint(F(F(F(15) / max_min) * v))) if max_min > 0 else 0 for v in mins]
    d = np.float16(F(max_scale / F(15))) if max_scale > 0 else np.float16(0)
    dmin = np.float16(F(max_min / F(15))) if max_min > 0 else np.float16(0)
    for j in range(16):
        step = F(F(d) * F(ls[j]))
        if step:
            shift = F(F(dmin) * F(lm[j]))
            for i in range(16 * j, 16 * j + 16):
                q[i] = min(3, max(0, int(np.rint(F(F(block[i] + shift) / step)))))
    return bytes([a | (b << 4) for a, b in zip(ls, lm)]) + _ref_2bit(q) + d.tobytes() + dmin.tobytes()


def _ref_2bit(q):
    return bytes(q[h + i] | (q[h + i + 32] << 2) | (q[h + i + 64] << 4) | (q[h + i + 96] << 6)
                 for h in (0, 128) for i in range(32))


def _ref_q3(x, nmax):
    peak = _ref_largest(x)
    if abs(peak) < F(1e-15):
        return F(0), [0] * len(x)
    iscale = F(F(-nmax) / peak)
    q = [max(-nmax, min(nmax - 1, int(np.rint(F(iscale * v))))) for v in x]
    sumlx = suml2 = F(0)
    for v, l in zip(x, q):
        w = F(v * v)
        sumlx, suml2 = F(sumlx + F(F(w * v) * F(l))), F(suml2 + F(F(w * F(l)) * F(l)))
    for _ in range(5):
        changed = 0
        for i, v in enumerate(x):
            w = F(v * v)
            slx = F(sumlx - F(F(w * v) * F(q[i])))
            if slx > 0:
                sl2 = F(suml2 - F(F(w * F(q[i])) * F(q[i])))
                new = max(-nmax, min(nmax - 1, int(np.rint(F(F(v * sl2) / slx)))))
                if new != q[i]:
                    slx, sl2 = F(slx + F(F(w * v) * F(new))), F(sl2 + F(F(w * F(new)) * F(new)))
                    if sl2 > 0 and F(F(slx * slx) * suml2) > F(F(sumlx * sumlx) * sl2):
                        q[i], sumlx, suml2, changed = new, slx, sl2, changed + 1
        if not changed:
            break
    return (F(sumlx / suml2) if suml2 > 0 else F(0)), [l + nmax for l in q]


def _ref_signed(block, levels, nmax):
    """Q3_K's and Q6_K's first part: each sub-block of 16's scale and levels, and the scale of largest magnitude."""
    scales, q = [], []
    for j in range(16):
        sc, l = levels(block[16 * j:16 * j + 16], nmax)
        scales.append(sc), q.extend(l)
    return scales, q, _ref_largest(scales)


def _ref_largest(values):
    """The value of largest magnitude, the first of equals (C's `if (fabsf(v) > amax)`)."""
    largest = F(0)
    for v in values:
        if abs(v) > abs(largest):
            largest = v
    return largest


def _ref_q3_k(block):
    scales, q, max_scale = _ref_signed(block, _ref_q3, 4)
    packed, d = bytearray(12), np.float16(0)
    if max_scale:
        iscale = F(F(-32) / max_scale)
        for j, sc in enumerate(scales):
            level = max(-32, min(31, int(np.rint(F(iscale * sc))))) + 32
            packed[j % 8] |= (level & 0xF) << (4 * (j // 8))
            packed[8 + j % 4] |= (level >> 4) << (2 * (j // 4))
        d = np.float16(F(F(1) / iscale))
    return _ref_q3_tail(block, q, packed, d)


def _ref_q3_tail(block, q, packed, d):
    """Q3_K's end: the weights rounded again against the stored scales, the third bits apart, packed."""
    for j in range(16):
        level = ((packed[j % 8] >> (4 * (j // 8))) & 0xF) | (((packed[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)
        step = F(F(d) * F(level - 32))
        if step:
            for i in range(16 * j, 16 * j + 16):
                q[i] = max(-4, min(3, int(np.rint(F(block[i] / step))))) + 4
    hmask = bytearray(32)
    for i in range(256):
        if q[i] > 3:
            hmask[i % 32] |= 1 << (i // 32)
            q[i] -= 4
    return bytes(hmask) + _ref_2bit(q) + bytes(packed) + d.tobytes()


def _ref_q45_k(block, nmax, rmin, nstep):
    scales, mins, q = [], [], []
    for j in range(8):
        x = block[32 * j:32 * j + 32]
        sum_x2 = F(0)
        for v in x:
            sum_x2 = F(sum_x2 + F(v * v))
        av_x = F(np.sqrt(F(sum_x2 / F(32))))
        sc, mn, l = _ref_qkx2(x, [F(av_x + abs(v)) for v in x], nmax, rmin, 0.1, nstep)
        scales.append(sc), mins.append(mn), q.extend(l)
    max_scale = max_min = F(0)  # C's `if (v > largest)`: a -0.0 minimum leaves it +0.0
    for sc, mn in zip(scales, mins):
        max_scale, max_min = sc if sc > max_scale else max_scale, mn if mn > max_min else max_min
    inv_scale = F(F(63) / max_scale) if max_scale > 0 else F(0)
    inv_min = F(F(63) / max_min) if max_min > 0 else F(0)
    ls = [min(63, int(np.rint(F(inv_scale * v)))) for v in scales]
    lm = [min(63, int(np.rint(F(inv_min * v)))) for v in mins]
    return _ref_q45_tail(block, q, ls, lm, np.float16(F(max_scale / F(63))), np.float16(F(max_min / F(63))), nmax)


def _ref_q45_tail(block, q, ls, lm, d, dmin, nmax):
    """Q4_K and Q5_K's end: the weights rounded again against the stored scales, then packed."""
    packed = bytearray(12)
    for j in range(8):
        if j < 4:
            packed[j], packed[j + 4] = ls[j], lm[j]
        else:
            packed[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            packed[j - 4] |= (ls[j] >> 4) << 6
            packed[j] |= (lm[j] >> 4) << 6
    for j in range(8):
        step = F(F(d) * F(ls[j]))
        if step:
            shift = F(F(dmin) * F(lm[j]))
            for i in range(32 * j, 32 * j + 32):
                q[i] = min(nmax, max(0, int(np.rint(F(F(block[i] + shift) / step)))))
    out = bytearray(d.tobytes() + dmin.tobytes()) + packed
    if nmax == 31:  # Q5_K: the fifth bits, then the low four
        high = bytearray(32)
        for c in range(4):
            for i in range(32):
                high[i] |= ((q[64 * c + i] >> 4) << (2 * c)) | ((q[64 * c + 32 + i] >> 4) << (2 * c + 1))
        out += high
    for c in range(4):
        out += bytes((q[64 * c + i] & 0xF) | ((q[64 * c + 32 + i] & 0xF) << 4) for i in range(32))
    return bytes(out)


def _ref_qx(x, nmax, weights=None):
    """make_qx_quants(n, nmax, x, L, 1, weights): weights x^2 when none are given."""
    peak = _ref_largest(x)
    if abs(peak) < F(1e-15):
        return F(0), [0] * len(x)
    weights = [F(v * v) for v in x] if weights is None else weights

    def candidate(iscale):
        q = [max(-nmax, min(nmax - 1, int(np.rint(F(iscale * v))))) for v in x]
        sumlx = suml2 = F(0)
        for v, w, l in zip(x, weights, q):
            sumlx, suml2 = F(sumlx + F(F(w * v) * F(l))), F(suml2 + F(F(w * F(l)) * F(l)))
        return q, sumlx, suml2

    q, sumlx, suml2 = candidate(F(F(-nmax) / peak))
    scale = F(sumlx / suml2) if suml2 else F(0)
    best = F(scale * sumlx)
    for step in [*range(-9, 0), *range(1, 10)]:
        trial, slx, sl2 = candidate(F(F(-F(F(nmax) + F(F(0.1) * F(step)))) / peak))
        if sl2 > 0 and F(slx * slx) > F(best * sl2):
            q, scale = trial, F(slx / sl2)
            best = F(scale * slx)
    return scale, [l + nmax for l in q]


def _ref_q6_k(block):
    scales, q, max_scale = _ref_signed(block, _ref_qx, 32)
    return _ref_q6_tail(block, scales, q, max_scale)


def _ref_q6_tail(block, scales, q, max_scale):
    """Q6_K's end: the sub-blocks' scales quantized against the largest, the weights rounded again, packed."""
    if abs(max_scale) < F(1e-15):
        return bytes(210)
    iscale = F(F(-128) / max_scale)
    d = np.float16(F(F(1) / iscale))
    sc8 = [min(127, int(np.rint(F(iscale * v)))) for v in scales]
    for j in range(16):
        step = F(F(d) * F(sc8[j]))
        if step:
            for i in range(16 * j, 16 * j + 16):
                q[i] = max(-32, min(31, int(np.rint(F(block[i] / step))))) + 32
    ql, qh = bytearray(128), bytearray(64)
    for half in range(2):
        for i in range(32):
            a, b, c, e = (q[128 * half + i + 32 * k] for k in range(4))
            ql[64 * half + i] = (a & 0xF) | ((c & 0xF) << 4)
            ql[64 * half + 32 + i] = (b & 0xF) | ((e & 0xF) << 4)
            qh[32 * half + i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)
    return bytes(ql + qh + np.array(sc8, np.int8).tobytes() + d.tobytes())


IQ4 = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def _ref_nearest(v):
    """llama.cpp's best_index_int8: binary search, a tie to the upper value."""
    if v <= IQ4[0]:
        return 0
    if v >= IQ4[-1]:
        return 15
    lo, hi = 0, 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if v < IQ4[mid] else (mid, hi)
    return hi - 1 if F(v - F(IQ4[hi - 1])) < F(F(IQ4[hi]) - v) else hi


def _ref_iq4_scale(x, weight=None):
    """The sub-block's scale; each error weighs v^2, or `weight` (an importance matrix's, test_gguf_imatrix)."""
    peak = _ref_largest(x)
    if abs(peak) < F(1e-15):
        return F(0)
    weight = [F(v * v) for v in x] if weight is None else weight

    def sums(iscale):
        sqx = sq2 = F(0)
        for v, w in zip(x, weight):
            q = F(IQ4[_ref_nearest(F(iscale * v))])
            sqx, sq2 = F(sqx + F(F(w * q) * v)), F(sq2 + F(F(w * q) * q))
        return sqx, sq2

    d = F(F(-peak) / F(IQ4[0]))
    sqx, sq2 = sums(F(F(1) / d))
    d = F(sqx / sq2)
    best = F(d * sqx)
    for step in range(-7, 8):
        sqx, sq2 = sums(F(F(step + IQ4[0]) / peak))
        if sq2 > 0 and F(sqx * sqx) > F(best * sq2):
            d = F(sqx / sq2)
            best = F(d * sqx)
    return d


def _ref_iq4_pack(index):
    return bytes(index[32 * g + j] | (index[32 * g + 16 + j] << 4) for g in range(len(index) // 32) for j in range(16))


def _ref_iq4_nl(block, weight=None):
    out = b""
    for g in range(8):
        x = block[32 * g:32 * g + 32]
        d = _ref_iq4_scale(x, None if weight is None else weight[32 * g:32 * g + 32])
        inv = F(F(1) / d) if d else F(0)
        out += np.float16(d).tobytes() + _ref_iq4_pack([_ref_nearest(F(inv * v)) for v in x])
    return out


def _ref_iq4_xs(block, weight=None):
    scales = [_ref_iq4_scale(block[32 * g:32 * g + 32], None if weight is None else weight[32 * g:32 * g + 32])
              for g in range(8)]
    d = F(-_ref_largest(scales) / F(32))
    inv = F(F(1) / d) if d else F(0)
    index, low, high = [], bytearray(4), 0
    for g, sc in enumerate(scales):
        level = max(-32, min(31, int(np.rint(F(inv * sc)))))
        step = F(d * F(level))
        inv_step = F(F(1) / step) if step else F(0)
        index += [_ref_nearest(F(inv_step * v)) for v in block[32 * g:32 * g + 32]]
        low[g // 2] |= ((level + 32) & 0xF) << (4 * (g % 2))
        high |= ((level + 32) >> 4) << (2 * g)
    return np.float16(d).tobytes() + high.to_bytes(2, "little") + bytes(low) + _ref_iq4_pack(index)


REFERENCE = {"iq4_nl": _ref_iq4_nl, "iq4_xs": _ref_iq4_xs, "q2_k": _ref_q2_k, "q3_k": _ref_q3_k,
             "q4_k": lambda b: _ref_q45_k(b, 15, -1.0, 20), "q5_k": lambda b: _ref_q45_k(b, 31, -0.5, 15),
             "q6_k": _ref_q6_k}


@pytest.mark.parametrize("kind", list(REFERENCE))
def test_the_vectorised_quantizer_writes_the_bytes_of_llama_cpps_reference_loops(kind):
    """Same bytes, block for block, as the scalar loops above (llama.cpp's reference quantizers; its own
    llama-quantize writes these bytes too: benchmarks/gguf_llama_cpp.py compares whole files). The order of each
    sum, and each candidate measured from the best minimum so far, decide near ties between candidate scales."""
    x = weights(6, 512, seed=5)  # with rows of zeros, of one sign, constant; and outliers
    x[0, 256:] = -0.25
    ours = quantize(x, kind).reshape(-1, BYTES[kind])  # per 256 weights
    for block, raw in zip(x.reshape(-1, 256), ours):
        assert raw.tobytes() == REFERENCE[kind](list(block)), kind


def test_rows_not_a_whole_number_of_super_blocks_are_refused_by_the_quantizer():
    with pytest.raises(ValueError, match="256"):
        quantize(np.ones((2, 96), np.float32), "q4_k")


def test_mixes_choose_each_tensors_type_as_llama_quantize_does():
    n = 32  # Llama 7B's depth: llama.cpp's Q4_K_M gives Q6_K to layers 0-3, 28-31 and every third from 6 to 27
    more = [i for i in range(n) if tensor_type("q4_k_m", f"blk.{i}.ffn_down.weight", n, False, 4096) == "q6_k"]
    assert more == [0, 1, 2, 3, *range(6, 28, 3), 28, 29, 30, 31]
    assert [i for i in range(n) if tensor_type("q4_k_m", f"blk.{i}.attn_v.weight", n, False, 4096) == "q6_k"] == more
    assert {tensor_type("q4_k_m", f"blk.{i}.attn_q.weight", n, False, 4096) for i in range(n)} == {"q4_k"}
    # GPT-2's fused q, k, v: as attn_v (llama.cpp's ATTENTION_QKV counts as attention values)
    assert [i for i in range(n) if tensor_type("q4_k_m", f"blk.{i}.attn_qkv.weight", n, False, 4096) == "q6_k"] == more
    assert tensor_type("q4_k_s", "blk.3.attn_qkv.weight", n, False, 4096) == "q5_k"
    assert tensor_type("q5_k_m", "blk.3.ffn_down.weight", n, False, 4096) == "q6_k"
    assert tensor_type("q5_k_m", "blk.4.ffn_down.weight", n, False, 4096) == "q5_k"
    assert [i for i in range(n) if tensor_type("q4_k_s", f"blk.{i}.attn_v.weight", n, False, 4096) == "q5_k"] == [
        0, 1, 2, 3]
    assert [i for i in range(n) if tensor_type("q4_k_s", f"blk.{i}.ffn_down.weight", n, False, 4096) == "q5_k"] == [
        0, 1, 2, 3]
    assert {tensor_type("q5_k_s", f"blk.{i}.ffn_down.weight", n, False, 4096) for i in range(n)} == {"q5_k"}
    for mix in MIXES:  # the head is Q6_K, or Q8_0 when its rows are not whole super-blocks
        assert tensor_type(mix, "output.weight", n, True, 4096) == "q6_k"
        assert tensor_type(mix, "token_embd.weight", n, True, 4000) == "q8_0"
    def types(mix, part, gqa=1):
        return [tensor_type(mix, f"blk.{i}.{part}.weight", n, False, 4096, gqa) for i in range(n)]

    assert types("q3_k_m", "attn_v") == ["q5_k"] * 2 + ["q4_k"] * 30  # the first two attn_v
    assert types("q3_k_m", "ffn_down") == ["q5_k"] * 2 + ["q4_k"] * 30  # the first sixteenth
    assert set(types("q3_k_m", "attn_output")) == {"q4_k"} and set(types("q3_k_m", "attn_q")) == {"q3_k"}
    assert {t for part in ("attn_v", "ffn_down", "attn_output") for t in types("q3_k_l", part)} == {"q5_k"}
    assert {t for part in ("attn_v", "ffn_down", "attn_output", "ffn_up") for t in types("q3_k_s", part)} == {"q3_k"}
    assert set(types("q2_k", "attn_v")) == {"q3_k"} and set(types("q2_k", "attn_v", gqa=4)) == {"q4_k"}
    assert set(types("q2_k", "ffn_down")) == set(types("q2_k", "attn_output")) == {"q3_k"}
    assert set(types("q2_k", "attn_q")) == set(types("q2_k", "ffn_gate")) == {"q2_k"}
    assert types("iq4_xs", "ffn_down") == ["q5_k"] * 4 + ["iq4_xs"] * 28  # the first eighth, without an imatrix
    assert set(types("iq4_xs", "attn_v")) == {"iq4_xs"} and set(types("iq4_nl", "attn_v", gqa=4)) == {"q5_k"}
    assert tensor_type("iq4_xs", "blk.5.attn_q.weight", n, False, 96) == "iq4_nl"  # blocks of 32 fit
    assert tensor_type("iq4_nl", "blk.5.attn_q.weight", n, False, 96) == "iq4_nl"
    assert tensor_type("iq4_nl", "blk.5.attn_q.weight", n, False, 100) == "f16"
    assert tensor_type("q2_k", "blk.5.attn_q.weight", n, False, 96) == "q4_0"
    assert tensor_type("q3_k_s", "blk.5.attn_q.weight", n, False, 96) == "q4_0"
    # llama.cpp's fallback for rows that are not whole super-blocks: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0
    assert tensor_type("q4_k_m", "blk.5.attn_q.weight", n, False, 96) == "q5_0"
    assert tensor_type("q5_k_s", "blk.5.attn_q.weight", n, False, 96) == "q5_1"
    assert tensor_type("q4_k_m", "blk.0.ffn_down.weight", n, False, 96) == "q8_0"
    assert tensor_type("q4_k_m", "blk.5.attn_q.weight", n, False, 100) == "f16"


WIDE = dict(n_embd=256, n_layer=4)  # rows of whole super-blocks (GPT-2's MLP: 1024 wide)
WIDE_LLAMA = dict(WIDE, mlp_hidden=512)


@pytest.mark.parametrize("mix", ["q4_k_m", "q6_k", "q3_k_m"])
@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_a_k_quant_export_has_llama_quantizes_types_loads_in_transformers_and_imports_back(tmp_path, mix, style):
    tied = style == "gpt2"
    shape = {**GPT2_STYLE, **WIDE} if tied else {**LLAMA_STYLE, **WIDE_LLAMA}
    run = lmforge_run(tmp_path, MAKERS["char"](), **shape)
    path = export_gguf(run, tmp_path / "out" / f"{mix}.gguf", dtype=mix)
    model, _, _ = load_for_inference(run, "cpu")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name, t in tensors.items():
        if len(t.shape) == 2 and name != "position_embd.weight":
            head = name == ("token_embd.weight" if tied else "output.weight")
            gqa = model.config.n_head // model.config.n_kv_head
            assert t.tensor_type == QT[tensor_type(mix, name, 4, head, int(t.shape[0]), gqa).upper()], name
        else:
            assert t.tensor_type == QT.F32, name
    if mix == "q4_k_m":  # layers 2 and 3 of 4 get more bits, in the MLP's output and the attention's values
        for part in ("ffn_down", "attn_qkv" if tied else "attn_v"):
            types = [tensors[f"blk.{i}.{part}.weight"].tensor_type for i in range(4)]
            assert types == [QT.Q4_K, QT.Q4_K, QT.Q6_K, QT.Q6_K], part
        w = model.blocks[1].mlp.proj.weight.detach().numpy()
        assert np.array_equal(np.asarray(tensors["blk.1.ffn_down.weight"].data).reshape(-1),
                              quantize(w, "q4_k").reshape(-1))
    assert fields(path)["general.file_type"] == int(gguf.LlamaFileType["MOSTLY_" + mix.upper()])
    theirs, _ = load_theirs(path, model.config)  # transformers dequantizes with the gguf package
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, other = model(ids), theirs(ids).logits
    # measured on these ids: Llama-style 0.149, 0.042, 0.247 (four random layers amplify); GPT-2 less
    tolerance = {"q4_k_m": 0.25, "q6_k": 0.08, "q3_k_m": 0.4}[mix]
    assert 0 < (ours - other).abs().max() <= tolerance * ours.abs().max()
    back, _, _ = load_for_inference(import_gguf(path, tmp_path / "back"), "cpu")
    _, stored = read_gguf(path)
    assert torch.equal(back.blocks[1].mlp.proj.weight, stored["blk.1.ffn_down.weight"])
    with torch.no_grad():
        assert (back(ids) - other).abs().max() <= 1e-4 * other.abs().max()


def test_k_quant_mixes_through_the_cli_make_smaller_files_as_they_drop_bits_and_narrow_models_fall_back(tmp_path,
                                                                                                       capsys):
    run = lmforge_run(tmp_path, MAKERS["char"](), **{**LLAMA_STYLE, **WIDE_LLAMA})
    sizes, summaries = {}, {}
    order = ["q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k"]
    for dtype in order + ["iq4_xs", "iq4_nl"]:
        out = tmp_path / f"{dtype}.gguf"
        capsys.readouterr()
        assert main(["export", str(run), "--format", "gguf", "--gguf-type", dtype, "--out", str(out)]) == 0
        sizes[dtype] = out.stat().st_size
        printed = capsys.readouterr()
        assert printed.out.strip() == str(out)  # stdout: the path alone, for scripts
        summaries[dtype] = printed.err.strip()  # stderr: one line on what was written
    # q8_0: 34 bytes per 32 weights; q4_k_m: 4 layers' q4_k with q6_k for the head and 2 layers' attn_v and ffn_down
    assert summaries["q8_0"].endswith(f"(30 q8_0, 9 f32), {sizes['q8_0'] / 2**20:.1f} MiB, 8.50 bits per matrix "
                                      "weight"), summaries["q8_0"]
    assert "(25 q4_k, 9 f32, 5 q6_k)" in summaries["q4_k_m"], summaries["q4_k_m"]
    assert all(sizes[a] > sizes[b] for a, b in zip(order, order[1:])), sizes
    assert sizes["q4_k_m"] > sizes["iq4_nl"] > sizes["iq4_xs"] > sizes["q3_k_m"], sizes
    narrow = lmforge_run(tmp_path / "narrow", MAKERS["char"](), **{**LLAMA_STYLE, "n_embd": 64})
    path = export_gguf(narrow, tmp_path / "narrow.gguf", dtype="q4_k_m")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == QT.Q5_0 and types["output.weight"] == QT.Q8_0
    assert types["blk.1.ffn_down.weight"] == QT.Q8_0  # the last layer's gets more bits: Q6_K's fallback


def test_the_cli_offers_every_type_the_exporter_writes():
    from lmforge.cli import build_parser

    parser = build_parser()
    export = next(a for a in parser._subparsers._group_actions[0].choices["export"]._actions
                  if a.dest == "gguf_type")
    assert list(export.choices) == list(GGUF_TYPES)


def test_q8_0_writes_the_bytes_ggufs_own_quantizer_writes():
    """lmforge's threaded q8_0 against gguf.quants (llama.cpp's reference bytes): random rows of several widths, a
    block of zeros, a block whose values land exactly halfway between two levels (rounded away from zero), tiny and
    huge values."""
    from lmforge.interop.gguf_kquants import quantize_q8_0

    rng = np.random.default_rng(3)
    for shape in [(300, 96), (7, 32), (40, 8192)]:
        x = (rng.standard_normal(shape) * rng.choice([1e-6, 0.02, 3e3], size=(shape[0], 1))).astype(np.float32)
        x[0, :32] = 0
        x[1, :32] = [127.0] + [k + 0.5 for k in range(-15, 16)]  # d = 1: x / d lands on halves
        assert np.array_equal(quantize_q8_0(x), gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)), shape
    with pytest.raises(ValueError, match="whole blocks of 32"):
        quantize_q8_0(np.zeros((2, 48), dtype=np.float32))
