"""llama.cpp's K-quants and 4-bit non-linear quants, written by lmforge: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS and
IQ4_NL blocks, and the file types named after them (Q4_K_M, the format most GGUF models are shared in, Q4_K_S, Q5_K_M,
Q5_K_S, Q6_K, Q3_K_L, Q3_K_M, Q3_K_S, Q2_K, IQ4_XS, IQ4_NL) that choose a type per tensor.

A K-quant block covers 256 weights of a row (a "super-block") in sub-blocks with scales of their own:

    Q2_K  16 sub-blocks of 16; w ~ d * sc_j * q - dmin * m_j, q in 0..3, sc_j and m_j 4-bit. 84 bytes: 2.625 bits.
    Q3_K  16 sub-blocks of 16; w ~ d * sc_j * (q - 4), q in 0..7 (the third bit apart, in hmask), sc_j a 6-bit
          signed integer. 110 bytes: 3.4375 bits per weight.
    Q4_K  8 sub-blocks of 32; each weight w ~ d * sc_j * q - dmin * m_j, q in 0..15; sc_j and m_j are 6-bit
          integers packed in 12 bytes, d and dmin float16. 144 bytes: 4.5 bits per weight.
    Q5_K  the same with q in 0..31 (the fifth bit of each q apart, in qh). 176 bytes: 5.5 bits per weight.
    Q6_K  16 sub-blocks of 16; w ~ d * sc_j * (q - 32), q in 0..63 (low four bits in ql, high two in qh), sc_j a
          signed 8-bit integer, d float16. 210 bytes: 6.5625 bits per weight.
    IQ4_NL  blocks of 32 (not 256); w ~ d * v[q], q in 0..15 indexing 16 fixed non-linear values (denser near 0,
          where most weights are), d float16. 18 bytes: 4.5 bits per weight.
    IQ4_XS  the same values in super-blocks of 256: 8 sub-blocks of 32 with 6-bit scales against one float16.
          136 bytes: 4.25 bits per weight.

The quantizers follow llama.cpp's reference ones (quantize_row_q2_K_ref ... q6_K_ref: what llama-quantize runs
without an importance matrix), vectorised over all blocks with numpy in float32: each sub-block searches a few
candidate scales for the one of least weighted error (Q2_K, Q4_K, Q5_K also the best minimum by least squares;
Q3_K refines its levels one weight at a time), the sub-block scales are then quantized against the super-block's
largest, and every weight is rounded once more against the scale it will really be read with. Each sub-block is a
column of an (n, M) array, so every sum runs in llama.cpp's order: a sum in another order can make another
candidate win a near tie, and the bytes are llama-quantize's own (benchmarks/gguf_llama_cpp.py compares whole
files). Blocks are quantized in cache-sized chunks on all cores (numpy's loops release the GIL).

Given an importance matrix (quantize(..., importance): per column, the mean square of the activations it multiplies;
gguf_imatrix measures it), Q2_K to Q6_K follow llama.cpp's quantize_row_*_impl instead, what llama-quantize --imatrix
runs: each weight's error weighed by its column's importance times sqrt(sigma2 + x^2), the sub-blocks' scales and
minimums fitted under those weights (make_qkx3_quants, make_qx_quants), and the scales themselves quantized by
make_qp_quants (or make_qx_quants for Q3_K) with each sub-block weighing its weights' sum. IQ4_XS and IQ4_NL
(quantize_row_iq4_nl_impl) search each sub-block's scale under the same weights, sigma2 taken over the super-block
(256 weights for IQ4_XS, the block of 32 for IQ4_NL).

The mixes follow llama.cpp's llama_tensor_get_type: the head (output, or token_embd when it is also the head) is
Q6_K; under *_M, attn_v (or GPT-2's fused attn_qkv) and ffn_down of the first and last eighth of the layers and of
every third layer between are Q6_K; under Q4_K_S the first four attn_v and the first eighth of the ffn_down are
Q5_K; Q3_K_M gives the first two attn_v Q5_K and the rest Q4_K, the first sixteenth of the ffn_down Q5_K and the
rest Q4_K, attn_output Q4_K; Q3_K_L gives those three Q5_K; Q2_K gives attn_v Q3_K (Q4_K with four or more query
heads per key/value head), ffn_down and attn_output Q3_K; IQ4_XS and IQ4_NL give the first eighth of the ffn_down
Q5_K, and attn_v too with four or more query heads per key/value head. A matrix whose rows are not a whole number
of 256 weights takes llama.cpp's fallback: Q2_K and Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS ->
IQ4_NL (and float16 when the rows are not whole blocks of 32 either); under an importance matrix those Q4_0, Q5_0
and Q5_1 rows are weighed too (quantize_legacy: llama.cpp's quantize_row_q4_0_impl ... q5_1_impl; Q8_0 takes none).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

QK_K = 256  # weights per super-block
MIXES = ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "iq4_xs", "iq4_nl")
BASE = {"q6_k": "q6_k", "q5_k_m": "q5_k", "q5_k_s": "q5_k", "q4_k_m": "q4_k", "q4_k_s": "q4_k", "q3_k_l": "q3_k",
        "q3_k_m": "q3_k", "q3_k_s": "q3_k", "q2_k": "q2_k", "iq4_xs": "iq4_xs", "iq4_nl": "iq4_nl"}
# rows not a whole number of super-blocks
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl"}
BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210, "iq4_xs": 136, "iq4_nl": 144}  # per 256
_CHUNK = 1024  # super-blocks quantized at once: temporaries of 1 MiB stay in cache (1.75x faster than 4096)
_EPS = np.float32(1e-15)  # llama.cpp's GROUP_MAX_EPS: a sub-block below it is all zeros
_LAYER = re.compile(r"blk\.(\d+)\.")


# ------------------------------------------------------------------------------------------ which type
def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(mix: str, name: str, n_layer: int, head: bool, columns: int, gqa: int = 1) -> str:
    """The type a matrix of `columns` weights per row takes under `mix` (q4_k_m, ..., iq4_xs): q2_k .. q6_k,
    iq4_xs, iq4_nl, or a fallback block type (q4_0, q5_0, q5_1, q8_0, iq4_nl) or f16 when its rows are not whole
    blocks. `gqa`: query heads per key/value head (Q2_K and IQ4 give the values more bits from 4)."""
    base = BASE[mix]
    if head:
        return "q6_k" if columns % QK_K == 0 else "q8_0"
    match = _LAYER.match(name)
    layer = int(match.group(1)) if match else 0
    kind = base
    values = name.endswith("attn_v.weight") or name.endswith("attn_qkv.weight")  # GPT-2's fused q, k, v count
    if values:
        kind = {"q2_k": "q4_k" if gqa >= 4 else "q3_k", "q3_k_m": "q5_k" if layer < 2 else "q4_k",
                "q3_k_l": "q5_k"}.get(mix, kind)
    elif name.endswith("ffn_down.weight"):
        kind = {"q2_k": "q3_k", "q3_k_m": "q5_k" if layer < n_layer // 16 else "q4_k", "q3_k_l": "q5_k"}.get(mix, kind)
    elif name.endswith("attn_output.weight"):
        kind = {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(mix, kind)
    if mix in ("iq4_xs", "iq4_nl") and ((values and gqa >= 4)
                                        or (name.endswith("ffn_down.weight") and layer < n_layer // 8)):
        kind = "q5_k"
    if values or name.endswith("ffn_down.weight"):
        if mix in ("q4_k_m", "q5_k_m") and _more_bits(layer, n_layer):
            kind = "q6_k"
        elif mix == "q4_k_s" and (layer < 4 if values else layer < n_layer // 8):
            kind = "q5_k"
    if columns % (32 if kind == "iq4_nl" else QK_K) == 0:
        return kind
    fallback = FALLBACK.get(kind, "f16")
    return fallback if columns % 32 == 0 else "f16"


# ------------------------------------------------------------------------------------------ quantizers
WEIGHTED = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs", "iq4_nl")  # those that take an importance matrix here


def quantize(data: np.ndarray, kind: str, importance: np.ndarray | None = None) -> np.ndarray:
    """A float matrix (rows, columns), columns a multiple of 256 -> its bytes (rows, columns / 256 * block bytes)
    as llama.cpp stores a `kind` (q2_k | q3_k | q4_k | q5_k | q6_k | iq4_xs | iq4_nl) tensor; iq4_nl takes rows of
    whole blocks of 32. importance (columns,): how much each column's error costs (an importance matrix's entry for
    this tensor, the mean square of the activations each column multiplies): then the quantizers are llama.cpp's
    quantize_row_*_impl, which weigh each weight's error by it."""
    rows, columns = data.shape
    size = 32 if kind == "iq4_nl" else QK_K
    if columns % size:
        raise ValueError(f"{kind} needs rows of whole blocks of {size} weights, not {columns}")
    if importance is not None and kind not in WEIGHTED:
        raise ValueError(f"an importance matrix is taken by {', '.join(WEIGHTED)} here, not {kind}")
    if importance is not None and np.shape(importance) != (columns,):
        raise ValueError(f"the importance has {np.size(importance)} values for {columns} columns")
    blocks = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, size)
    encode = {"q2_k": _q2_k, "q3_k": _q3_k, "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k, "iq4_xs": _iq4_xs,
              "iq4_nl": _iq4_nl}[kind]
    per = _CHUNK * QK_K // size
    starts = range(0, len(blocks), per)
    if importance is None:
        work = [(encode, blocks[i:i + per]) for i in starts]
    else:  # block b of the matrix covers columns (b % blocks per row) * size onwards
        by_block = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1, size)
        work = [(encode, blocks[i:i + per], by_block[np.arange(i, min(i + per, len(blocks))) % len(by_block)])
                for i in starts]
    with ThreadPoolExecutor(max(1, min(len(work), os.cpu_count() or 1))) as pool:  # numpy's loops free the GIL
        out = np.concatenate(list(pool.map(lambda job: job[0](*job[1:]), work)))
    return out.reshape(rows, columns * BYTES[kind] // QK_K)


def _round(x: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int: to the nearest integer, ties to even (the float trick it uses rounds so)."""
    return np.rint(x).astype(np.int32)


def _f16(x: np.ndarray) -> np.ndarray:
    """Float16 as stored (round to nearest even), and the float32 it reads back as."""
    half = x.astype(np.float16)
    return half, half.astype(np.float32)


def _scale_and_min(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                   nstep: int, mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's make_qkx2_quants for M sub-blocks at once, each a column: x, w (n, M) -> scale (M,), minimum
    (M,, >= 0: the value read is scale * q - minimum) and q (n, M) in 0..nmax, the candidate of least weighted
    squared error (absolute error with `mad`, as Q2_K measures it). Sums run down the columns (numpy adds the
    rows of an (n, M) array in order), as llama.cpp's loops do: a sum in another order can make another candidate
    win a near tie."""
    f32 = np.float32
    low = np.minimum(x.min(axis=0), f32(0))
    high = x.max(axis=0)
    flat = high == low
    span = np.where(flat, f32(1), high - low)
    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    q = np.clip(np.rint(iscale * (x - low)), 0, nmax)  # levels as floats (exact): no conversions in the loop
    first = scale * q + low - x
    best = (w * (np.abs(first) if mad else first * first)).sum(axis=0, dtype=f32)
    sum_w, sum_x = w.sum(axis=0, dtype=f32), (w * x).sum(axis=0, dtype=f32)
    # q is a function of (the minimum it was measured from, the inverse scale): keep the winner's, remake q once
    from_low, from_iscale = low, iscale
    for step in range(nstep + 1):  # llama.cpp measures each candidate from the best minimum so far
        span = high - low
        span = np.where(span == 0, f32(1), span)
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span
        trial = _levels(x, low, iscale, nmax)
        wl = w * trial
        sum_l, sum_l2, sum_xl = wl.sum(0, dtype=f32), (wl * trial).sum(0, dtype=f32), (wl * x).sum(0, dtype=f32)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0
        this_min = np.where(positive, f32(0), this_min)
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        diff = this_scale * trial
        diff += this_min
        diff -= x
        if mad:
            np.abs(diff, out=diff)
        else:
            diff *= diff
        diff *= w
        error = diff.sum(axis=0, dtype=f32)
        better = ok & (error < best) & ~flat
        from_low, from_iscale = np.where(better, low, from_low), np.where(better, iscale, from_iscale)
        best = np.where(better, error, best)
        scale = np.where(better, this_scale, scale)
        low = np.where(better, this_min, low)
    q = np.where(flat, 0, _levels(x, from_low, from_iscale, nmax))
    scale = np.where(flat, f32(0), scale)
    return scale.astype(f32), (-low).astype(f32), q.astype(np.int32)


def _levels(x: np.ndarray, low: np.ndarray, iscale: np.ndarray, nmax: int) -> np.ndarray:
    """round((x - low) * iscale) within 0..nmax, as floats: a candidate's levels in _scale_and_min."""
    q = x - low
    q *= iscale
    np.rint(q, out=q)
    return np.clip(q, 0, nmax, out=q)


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit minimums per block (N, 8) -> llama.cpp's 12 bytes (get_scale_min_k4)."""
    out = np.zeros((len(ls), 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _with_minimums(blocks: np.ndarray, size: int, nmax: int, rmin: float, nstep: int, levels: int,
                   weights: Callable[[np.ndarray], np.ndarray], mad: bool = False) -> tuple[np.ndarray, ...]:
    """Q2_K, Q4_K and Q5_K's shared part, sub-blocks of `size` with a scale and a minimum each, quantized to
    0..`levels` against the block's largest: -> d, dmin (float16), the sub-blocks' scale and minimum levels
    (N, 256 / size) and q (N, 256) in 0..nmax."""
    f32 = np.float32
    n, per = len(blocks), QK_K // size
    x = np.ascontiguousarray(blocks.reshape(n * per, size).T)  # (size, sub-blocks): sums in llama.cpp's order
    scales, mins, q = _scale_and_min(x, weights(x), nmax, rmin, 0.1, nstep, mad)
    scales, mins, q = scales.reshape(n, per), mins.reshape(n, per), q.T.reshape(n, per, size)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    inv_scale = np.where(max_scale > 0, f32(levels) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
    inv_min = np.where(max_min > 0, f32(levels) / np.where(max_min > 0, max_min, f32(1)), f32(0))
    ls = np.clip(_round(inv_scale[:, None] * scales), 0, levels).astype(np.uint8)
    lm = np.clip(_round(inv_min[:, None] * mins), 0, levels).astype(np.uint8)
    d_half, d = _f16(max_scale / f32(levels))
    dmin_half, dmin = _f16(max_min / f32(levels))
    return _requantized(blocks, q, d_half, d, dmin_half, dmin, ls, lm, nmax)


def _requantized(blocks: np.ndarray, q: np.ndarray, d_half: np.ndarray, d: np.ndarray, dmin_half: np.ndarray,
                 dmin: np.ndarray, ls: np.ndarray, lm: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    """Every weight rounded again against the scale and minimum it will be read with (a sub-block whose scale reads
    as 0 keeps its levels q (N, per, size)) -> d, dmin as bytes, ls, lm, q (N, 256)."""
    f32 = np.float32
    n, per, size = q.shape
    step = d[:, None] * ls.astype(f32)  # each sub-block's scale as it will be read
    shift = dmin[:, None] * lm.astype(f32)
    x = blocks.reshape(n, per, size)
    again = np.clip(_round((x + shift[..., None]) / np.where(step == 0, f32(1), step)[..., None]), 0, nmax)
    q = np.where((step == 0)[..., None], q, again).reshape(n, QK_K)
    return d_half[:, None].view(np.uint8), dmin_half[:, None].view(np.uint8), ls, lm, q.astype(np.uint8)


def _around_mean(x: np.ndarray) -> np.ndarray:
    """Q4_K and Q5_K's weights: the sub-block's RMS plus each weight's magnitude."""
    return np.sqrt((x * x).sum(axis=0, dtype=np.float32) / np.float32(len(x))) + np.abs(x)


def _importance_weights(blocks: np.ndarray, qw: np.ndarray, times: int = 2) -> np.ndarray:
    """llama.cpp's weights under an importance matrix: qw * sqrt(sigma2 + x^2), sigma2 `times` the block's mean
    square (summed in order; Q2_K takes it once, the others twice)."""
    xt = np.ascontiguousarray(blocks.T)
    sigma2 = np.float32(times) * (xt * xt).sum(axis=0, dtype=np.float32) / np.float32(QK_K)
    return qw * np.sqrt(sigma2[:, None] + blocks * blocks)


def _scale_levels(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's make_qp_quants for N sets of k non-negative values at once: x, w (k, N) -> the scale (N,) and
    levels (k, N) in 0..nmax of least weighted squared error: the best of 9 candidate scales, then each level moved
    one at a time while that improves the fit (five passes). Levels are stored as llama.cpp's uint8 would hold them."""
    f32 = np.float32
    top = np.maximum(x.max(axis=0), f32(0))
    zero = top == 0
    top = np.where(zero, f32(1), top)
    iscale = f32(nmax) / top
    levels = np.rint(iscale * x)
    scale = f32(1) / iscale
    diff = x - scale * levels
    best = ((w * diff) * diff).sum(axis=0, dtype=f32)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial_iscale = (f32(0.1) * f32(step) + f32(nmax)) / top
        trial = np.minimum(f32(nmax), np.rint(trial_iscale * x))
        diff = x - (f32(1) / trial_iscale) * trial
        error = ((w * diff) * diff).sum(axis=0, dtype=f32)
        better = error < best
        best = np.where(better, error, best)
        iscale = np.where(better, trial_iscale, iscale)
    levels = np.mod(np.minimum(f32(nmax), np.rint(iscale * x)), f32(256))
    wx = w * x
    sum_lx, sum_l2 = (wx * levels).sum(axis=0, dtype=f32), ((w * levels) * levels).sum(axis=0, dtype=f32)
    for _ in range(5):  # a set whose pass changed nothing would change nothing again: no need to stop it apart
        for i in range(len(x)):
            l_i = levels[i]
            slx, sl2 = sum_lx - wx[i] * l_i, sum_l2 - (w[i] * l_i) * l_i
            ok = (slx > 0) & (sl2 > 0)
            new = np.minimum(f32(nmax), np.rint((x[i] * sl2) / np.where(ok, slx, f32(1))))
            slx, sl2 = slx + wx[i] * new, sl2 + (w[i] * new) * new
            take = ok & (new != l_i) & ((slx * slx) * sum_l2 > (sum_lx * sum_lx) * sl2)
            levels[i] = np.where(take, np.mod(new, f32(256)), l_i)
            sum_lx, sum_l2 = np.where(take, slx, sum_lx), np.where(take, sl2, sum_l2)
    scale = np.where(zero, f32(0), sum_lx / np.where(zero, f32(1), sum_l2))
    return scale.astype(f32), np.where(zero, 0, levels).astype(np.uint8)


def _weighted_minimums(blocks: np.ndarray, qw: np.ndarray, size: int, nmax: int, levels: int = 63,
                       times: int = 2) -> tuple[np.ndarray, ...]:
    """_with_minimums under an importance matrix (llama.cpp's quantize_row_q4_K_impl, q5_K_impl, q2_K_impl): the
    sub-blocks' scales and minimums of least weighted error (make_qkx3_quants), then quantized to 0..`levels` by
    make_qp_quants, each sub-block weighing as much as its weights' sum. Q2_K's levels share a byte, (ls | lm << 4)
    as C's uint8 keeps it, which is what its weights are read with."""
    f32 = np.float32
    n, per = len(blocks), QK_K // size
    w = _importance_weights(blocks, qw, times)
    x = np.ascontiguousarray(blocks.reshape(n * per, size).T)
    w = np.ascontiguousarray(w.reshape(n * per, size).T)
    scales, mins, q = _scale_and_min(x, w, nmax, -0.9, 0.05, 36)
    sub_weight = np.ascontiguousarray(w.sum(axis=0, dtype=f32).reshape(n, per).T)
    d_block, ls = _scale_levels(np.ascontiguousarray(scales.reshape(n, per).T), sub_weight, levels)
    m_block, lm = _scale_levels(np.ascontiguousarray(mins.reshape(n, per).T), sub_weight, levels)
    ls, lm = ls.T, lm.T
    if levels == 15:  # one byte per sub-block
        both = ls | (lm << 4)
        ls, lm = both & 0xF, both >> 4
    d_half, d = _f16(d_block)
    dmin_half, dmin = _f16(m_block)
    return _requantized(blocks, q.T.reshape(n, per, size), d_half, d, dmin_half, dmin, ls, lm, nmax)


def _q4_k(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    d, dmin, ls, lm, q = (_with_minimums(blocks, 32, 15, -1.0, 20, 63, _around_mean) if qw is None
                          else _weighted_minimums(blocks, qw, 32, 15))
    q = q.reshape(-1, 4, 2, 32)  # 64 weights at a time: the first 32 in the low nibbles, the next 32 in the high
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d, dmin, _pack_scales(ls, lm), qs], axis=1)


def _q5_k(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    d, dmin, ls, lm, q = (_with_minimums(blocks, 32, 31, -0.5, 15, 63, _around_mean) if qw is None
                          else _weighted_minimums(blocks, qw, 32, 31))
    q = q.reshape(-1, 4, 2, 32)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    high = (q >> 4).astype(np.uint8)  # the fifth bit: chunk c's first half at bit 2c, its second at 2c + 1
    qh = np.zeros((len(q), 32), dtype=np.uint8)
    for c in range(4):
        qh |= (high[:, c, 0] << (2 * c)) | (high[:, c, 1] << (2 * c + 1))
    return np.concatenate([d, dmin, _pack_scales(ls, lm), qh, qs], axis=1)


def _largest(x: np.ndarray, axis: int) -> np.ndarray:
    """The signed value of largest magnitude along `axis`: the first of equals, as llama.cpp's strict > keeps."""
    return np.take_along_axis(x, np.expand_dims(np.abs(x).argmax(axis=axis), axis), axis=axis).squeeze(axis)


def _pack_2bit(q: np.ndarray) -> np.ndarray:
    """Levels 0..3 (N, 256) -> 64 bytes each: per half of 128, byte l holds weights l, l + 32, l + 64, l + 96."""
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _q2_k(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """16 sub-blocks of 16, w ~ d * sc_j * q - dmin * m_j, q in 0..3, sc_j and m_j 4 bits (one byte per
    sub-block), the scale search weighing absolute errors by |x| (squared ones by the importance, given one)."""
    d, dmin, ls, lm, q = (_with_minimums(blocks, 16, 3, -0.5, 15, 15, np.abs, mad=True) if qw is None
                          else _weighted_minimums(blocks, qw, 16, 3, levels=15, times=1))
    return np.concatenate([ls | (lm << 4), _pack_2bit(q), d, dmin], axis=1)


def _q3_levels(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's make_q3_quants with its refinement, for M sub-blocks at once, each a column: x (n, M) -> scale
    (M,) and q (n, M) in 0..2 nmax - 1. Starting from the largest magnitude's scale, each weight in turn (in
    order: a change moves the sums the next one sees) takes the level that best raises sum(w x l)^2 / sum(w l^2),
    w = x^2, for up to five passes."""
    f32 = np.float32
    peak = _largest(x, axis=0)
    zero = np.abs(peak) < _EPS
    iscale = f32(-nmax) / np.where(zero, f32(1), peak)
    q = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx, suml2 = (wx * q).sum(axis=0, dtype=f32), (w * q * q).sum(axis=0, dtype=f32)
    changed = _q3_pass(x, w, wx, q, sumlx, suml2, nmax)  # the first pass over every sub-block, in place
    active = np.flatnonzero(changed)  # llama.cpp stops a sub-block after a pass without changes
    for _ in range(4):
        if not len(active):
            break
        xa, wa, wxa, qa, lx, l2 = x[:, active], w[:, active], wx[:, active], q[:, active], sumlx[active], suml2[active]
        changed = _q3_pass(xa, wa, wxa, qa, lx, l2, nmax)
        q[:, active], sumlx[active], suml2[active] = qa, lx, l2
        active = active[changed]
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    return np.where(zero, f32(0), scale), np.where(zero, 0, q.astype(np.int32) + nmax)


def _q3_pass(x: np.ndarray, w: np.ndarray, wx: np.ndarray, q: np.ndarray, lx: np.ndarray, l2: np.ndarray,
             nmax: int) -> np.ndarray:
    """One pass of make_q3_quants's refinement over the columns of x (n, M), updating the levels q and the sums
    lx = sum(w x q), l2 = sum(w q^2) in place, weight by weight in order; -> which columns changed. llama.cpp's
    expressions, in its order: slx = lx - w x l, sl2 = l2 - w l l, new = round(x sl2 / slx) where slx > 0, taken
    when it raises slx^2 / sl2 above lx^2 / l2."""
    f32 = np.float32
    m = x.shape[1]
    changed = np.zeros(m, dtype=bool)
    slx, sl2, new, t, slx2, sl22 = (np.empty(m, dtype=f32) for _ in range(6))
    for i in range(len(x)):
        li = q[i]  # a view: levels are taken in place
        np.subtract(lx, np.multiply(wx[i], li, out=t), out=slx)
        np.multiply(w[i], li, out=t)
        np.subtract(l2, np.multiply(t, li, out=t), out=sl2)
        positive = slx > 0
        np.multiply(x[i], sl2, out=new)
        np.divide(new, slx, out=new, where=positive)
        np.rint(new, out=new)
        np.clip(new, -nmax, nmax - 1, out=new)
        np.add(slx, np.multiply(wx[i], new, out=t), out=slx2)
        np.multiply(w[i], new, out=t)
        np.add(sl2, np.multiply(t, new, out=t), out=sl22)
        take = positive
        take &= new != li
        take &= sl22 > 0
        take &= (slx2 * slx2) * l2 > (lx * lx) * sl22
        np.copyto(li, new, where=take)
        np.copyto(lx, slx2, where=take)
        np.copyto(l2, sl22, where=take)
        changed |= take
    return changed


def _q3_k(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """16 sub-blocks of 16, w ~ d * sc_j * (q - 4), q in 0..7 (its third bit apart, in hmask), sc_j a 6-bit
    signed scale packed into 12 bytes. Under an importance matrix (quantize_row_q3_K_impl) each sub-block's scale is
    make_qx_quants's under the weights, and the scales' own scale too, each sub-block weighing its weights' sum."""
    f32 = np.float32
    n = len(blocks)
    x = np.ascontiguousarray(blocks.reshape(n * 16, 16).T)
    if qw is None:
        scales, q = _q3_levels(x, 4)
        scales, q = scales.reshape(n, 16), q.T.reshape(n, 16, 16)
        max_scale = _largest(scales, axis=1)
        empty = max_scale == 0
        iscale = f32(-32) / np.where(empty, f32(1), max_scale)
        levels = np.where(empty[:, None], 32, np.clip(_round(iscale[:, None] * scales), -32, 31) + 32)
        d_block = np.where(empty, f32(0), f32(1) / iscale)
    else:
        w = np.ascontiguousarray(_importance_weights(blocks, qw).reshape(n * 16, 16).T)
        scales, q = _signed_scale(x, 4, w)
        scales, q = scales.reshape(n, 16), q.T.reshape(n, 16, 16)
        sub_weight = np.ascontiguousarray(w.sum(axis=0, dtype=f32).reshape(n, 16).T)
        d_block, levels = _signed_scale(np.ascontiguousarray(scales.T), 32, sub_weight)
        levels, empty = levels.T, np.zeros(n, dtype=bool)  # an all-zero block: levels 0 and d 0, as C's
    levels = levels.astype(np.uint8)
    packed = np.zeros((n, 12), dtype=np.uint8)
    packed[:, :8] = (levels[:, :8] & 0xF) | ((levels[:, 8:] & 0xF) << 4)
    high = levels >> 4
    packed[:, 8:] = high[:, 0:4] | (high[:, 4:8] << 2) | (high[:, 8:12] << 4) | (high[:, 12:16] << 6)
    packed[empty] = 0
    d_half, d = _f16(d_block.astype(f32))
    step = d[:, None] * (levels.astype(f32) - f32(32))
    x = blocks.reshape(n, 16, 16)
    again = np.clip(_round(x / np.where(step == 0, f32(1), step)[..., None]), -4, 3) + 4
    q = np.where((step == 0)[..., None], q, again).reshape(n, 8, 32)
    hmask = np.zeros((n, 32), dtype=np.uint8)  # weight j's third bit: byte j % 32, bit j // 32
    for bit in range(8):
        hmask |= (q[:, bit] > 3).astype(np.uint8) << bit
    q = np.where(q > 3, q - 4, q).reshape(n, QK_K)
    return np.concatenate([hmask, _pack_2bit(q), packed, d_half[:, None].view(np.uint8)], axis=1)


def _signed_scale(x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's make_qx_quants (weights w, else x^2) for M sub-blocks at once, each a column: x (n, M) -> scale
    (M,) and q (n, M) in 0..2 nmax - 1 (the value read is scale * (q - nmax)), the best of 19 candidate scales."""
    f32 = np.float32
    peak = _largest(x, axis=0)
    zero = np.abs(peak) < _EPS
    peak = np.where(zero, f32(1), peak)
    w = x * x if w is None else w
    wx = w * x  # llama.cpp's w * x * l, left to right

    def levels(iscale: np.ndarray) -> np.ndarray:
        q = np.multiply(iscale, x)  # levels as floats (exact)
        np.rint(q, out=q)
        return np.clip(q, -nmax, nmax - 1, out=q)

    def candidate(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = levels(iscale)
        wq = w * q
        wq *= q
        q *= wx
        return q.sum(axis=0, dtype=f32), wq.sum(axis=0, dtype=f32)

    chosen = f32(-nmax) / peak  # the winner's inverse scale: its levels are made once, at the end
    sumlx, suml2 = candidate(chosen)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / peak
        slx, sl2 = candidate(iscale)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        chosen = np.where(better, iscale, chosen)
        scale = np.where(better, slx / np.where(sl2 > 0, sl2, f32(1)), scale)
        best = np.where(better, scale * slx, best)
    return np.where(zero, f32(0), scale), np.where(zero, 0, levels(chosen).astype(np.int32) + nmax)


def _q6_k(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Under an importance matrix the sub-blocks' scales weigh each error by it alone (quantize_row_q6_K_impl)."""
    f32 = np.float32
    n = len(blocks)
    columns = None if qw is None else np.ascontiguousarray(qw.reshape(n * 16, 16).T)
    scales, q = _signed_scale(np.ascontiguousarray(blocks.reshape(n * 16, 16).T), 32, columns)
    scales, q = scales.reshape(n, 16), q.T.reshape(n, 16, 16)
    max_scale = _largest(scales, axis=1)
    empty = np.abs(max_scale) < _EPS
    iscale = f32(-128) / np.where(empty, f32(1), max_scale)
    d_half, d = _f16(f32(1) / iscale)
    sc = np.minimum(127, _round(iscale[:, None] * scales)).astype(np.int8)
    step = d[:, None] * sc.astype(f32)
    x = blocks.reshape(n, 16, 16)
    again = np.clip(_round(x / np.where(step == 0, f32(1), step)[..., None]), -32, 31) + 32
    q = np.where((step == 0)[..., None], q, again).reshape(n, 2, 4, 32).astype(np.uint8)
    low, high = q & 0xF, q >> 4  # per half of 128: four runs of 32
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d_half[:, None].view(np.uint8)],
                         axis=1)
    out[empty] = 0  # llama.cpp writes an all-zero block (d = 0) for a block of zeros
    return out


# ------------------------------------------------------------------------------------------ IQ4
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


# The grid's values are integers, so the two values around v depend only on floor(v): per floor k in -128..127, the
# index of the last value <= k (at least 0, at most 14) and the two values there; v's nearest is then one comparison.
_FLOOR_INDEX = np.clip(np.searchsorted(IQ4_VALUES, np.arange(-128, 128), side="right") - 1, 0, 14).astype(np.intp)
_FLOOR_LOW, _FLOOR_HIGH = IQ4_VALUES[_FLOOR_INDEX], IQ4_VALUES[_FLOOR_INDEX + 1]


def _nearest_value(v: np.ndarray, index: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """llama.cpp's best_index_int8 over IQ4_VALUES: the index of the nearest value (None without `index`), a tie to
    the upper one (x - low < high - x in float, as C compares), and that value. Below the first value or above the
    last, the comparison itself picks the end."""
    k = np.floor(v)
    np.clip(k, -128, 127, out=k)
    j = k.astype(np.intp)
    j += 128
    low, high = np.take(_FLOOR_LOW, j), np.take(_FLOOR_HIGH, j)
    upper = (v - low) >= (high - v)
    return (np.take(_FLOOR_INDEX, j) + upper if index else None), np.where(upper, high, low)


def _iq4_scales(x: np.ndarray, w: np.ndarray | None = None, ntry: int = 7) -> np.ndarray:
    """llama.cpp's IQ4 sub-block scale, for M sub-blocks of 32 at once, each a column: x (32, M) -> d (M,): the value
    read is d * IQ4_VALUES[index]; 0 for a sub-block below GROUP_MAX_EPS. Each weight's error weighs w (32, M):
    x^2, or under an importance matrix qw * sqrt(sigma2 + x^2)."""
    f32 = np.float32
    peak = _largest(x, axis=0)
    zero = np.abs(peak) < _EPS
    peak = np.where(zero, f32(1), peak)
    w = x * x if w is None else w

    def sums(iscale):
        q = _nearest_value(iscale * x, index=False)[1]
        wq = w * q
        return (wq * x).sum(axis=0, dtype=f32), (wq * q).sum(axis=0, dtype=f32)

    d = -peak / IQ4_VALUES[0]
    sumqx, sumq2 = sums(f32(1) / d)
    d = sumqx / np.where(sumq2 > 0, sumq2, f32(1))
    best = d * sumqx
    for step in range(-ntry, ntry + 1):
        sqx, sq2 = sums((f32(step) + IQ4_VALUES[0]) / peak)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = np.where(better, sqx / np.where(sq2 > 0, sq2, f32(1)), d)
        best = np.where(better, d * sqx, best)
    return np.where(zero, f32(0), d)


def _pack_iq4(index: np.ndarray) -> np.ndarray:
    """Indices (N, 32 k) -> 16 k bytes: per group of 32, byte j holds index j (low nibble) and j + 16 (high)."""
    q = index.reshape(len(index), -1, 2, 16).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(len(index), -1)


def _iq4_nl(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Blocks of 32 (N, 32), w ~ d * IQ4_VALUES[index]: 18 bytes per 32. qw (N, 32): the blocks' importance (its
    sigma2 is twice a block's mean square: IQ4_NL's super-block is the block)."""
    f32 = np.float32
    x = np.ascontiguousarray(blocks.reshape(-1, 32).T)
    w = None
    if qw is not None:
        sigma2 = f32(2) * (x * x).sum(axis=0, dtype=f32) / f32(32)
        w = np.ascontiguousarray(qw.reshape(-1, 32).T) * np.sqrt(sigma2 + x * x)
    d = _iq4_scales(x, w)
    inv = np.where(d != 0, f32(1) / np.where(d != 0, d, f32(1)), f32(0))
    index = _nearest_value(inv * x)[0].T
    d_half, _ = _f16(d)
    out = np.concatenate([d_half[:, None].view(np.uint8), _pack_iq4(index)], axis=1)  # (N*8, 18)
    return out.reshape(len(blocks), -1)


def _iq4_xs(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Super-blocks of 256: 8 sub-blocks of 32 with 6-bit scales against one float16: 136 bytes. qw (N, 256): the
    importance, its sigma2 twice the super-block's mean square (as the K-quants')."""
    f32 = np.float32
    n = len(blocks)
    x = np.ascontiguousarray(blocks.reshape(n * 8, 32).T)
    w = None if qw is None else np.ascontiguousarray(_importance_weights(blocks, qw).reshape(n * 8, 32).T)
    scales = _iq4_scales(x, w).reshape(n, 8)
    d = -_largest(scales, axis=1) / f32(32)
    inv = np.where(d != 0, f32(1) / np.where(d != 0, d, f32(1)), f32(0))
    levels = np.clip(_round(inv[:, None] * scales), -32, 31)
    step = d[:, None] * levels.astype(f32)
    inv_step = np.where(step != 0, f32(1) / np.where(step != 0, step, f32(1)), f32(0))
    index = _nearest_value(inv_step[..., None] * blocks.reshape(n, 8, 32))[0].reshape(n, QK_K)
    levels = (levels + 32).astype(np.uint16)
    low, high = (levels & 0xF).astype(np.uint8), levels >> 4
    scales_l = low[:, 0::2] | (low[:, 1::2] << 4)
    scales_h = np.zeros(n, dtype=np.uint16)
    for ib in range(8):
        scales_h |= high[:, ib] << (2 * ib)
    d_half, _ = _f16(d)
    return np.concatenate([d_half[:, None].view(np.uint8), scales_h[:, None].view(np.uint8), scales_l,
                           _pack_iq4(index)], axis=1)


# ------------------------------------------------------------------------------------------------------------ q8_0
def quantize_q8_0(data: np.ndarray) -> np.ndarray:
    """A float matrix (rows, columns), columns a multiple of 32 -> its q8_0 bytes (rows, columns / 32 * 34), the bytes
    gguf's quantizer (and llama.cpp's reference) writes: per block of 32 the scale d = max |x| / 127 as float16, then
    each x / d rounded half away from zero (by x times 1 / d, in float32, as gguf's numpy does) as int8. In chunks on
    every core (numpy frees the GIL), where gguf's own goes through the rows 16 at a time in one thread."""
    rows, columns = data.shape
    if columns % 32:
        raise ValueError(f"q8_0 needs rows of whole blocks of 32 weights, not {columns}")
    blocks = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, 32)
    per = _CHUNK * 8
    work = [blocks[i:i + per] for i in range(0, len(blocks), per)]
    with ThreadPoolExecutor(max(1, min(len(work), os.cpu_count() or 1))) as pool:
        out = np.concatenate(list(pool.map(_q8_0, work)))
    return out.reshape(rows, columns // 32 * 34)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    f32 = np.float32
    d = np.abs(blocks).max(axis=1, keepdims=True) / f32(127)  # (n, 1)
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, f32(0), f32(1) / d)
    v = blocks * inverse
    q = np.copysign(np.floor(np.abs(v) + f32(0.5)), v)  # half away from zero (gguf's np_roundf: exact for |v| <= 127)
    return np.concatenate([d.astype(np.float16).view(np.uint8), q.astype(np.int8).view(np.uint8)], axis=1)


# ------------------------------------------------------------------------------------------ legacy types, weighted
LEGACY_WEIGHTED = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}  # bytes per block of 32


def quantize_legacy(data: np.ndarray, kind: str, importance: np.ndarray) -> np.ndarray:
    """A float matrix (rows, columns), columns a multiple of 32 -> its `kind` (q4_0 | q4_1 | q5_0 | q5_1) bytes
    (rows, columns / 32 * block bytes) under an importance matrix's entry (columns,), as llama.cpp's
    quantize_row_*_impl write them (llama-quantize --imatrix; without one, gguf's quantizers write llama.cpp's
    reference bytes): each weight's error weighs importance * sqrt(sigma2 + x^2), sigma2 the row's mean square
    (summed in order); the scale of q4_0 and q5_0 by make_qx_quants, the scale and minimum of q4_1 and q5_1 by
    make_qkx3_quants (their levels as found: no second rounding)."""
    f32 = np.float32
    rows, columns = data.shape
    if columns % 32 or np.shape(importance) != (columns,):
        raise ValueError(f"{kind} takes rows of whole blocks of 32 and an importance per column")
    x = np.ascontiguousarray(data, dtype=f32)
    sigma2 = np.cumsum(x * x, axis=1, dtype=f32)[:, -1] / f32(columns)  # cumsum adds in order, as C's loop does
    w = np.asarray(importance, dtype=f32)[None, :] * np.sqrt(sigma2[:, None] + x * x)
    xt, wt = np.ascontiguousarray(x.reshape(-1, 32).T), np.ascontiguousarray(w.reshape(-1, 32).T)  # (32, blocks)
    parts = []
    if kind in ("q4_0", "q5_0"):
        nmax = 8 if kind == "q4_0" else 16
        d, q = _signed_scale(xt, nmax, wt)
        parts.append(_f16(d)[0][:, None].view(np.uint8))
    else:
        nmax = 15 if kind == "q4_1" else 31
        d, minimum, q = _scale_and_min(xt, wt, nmax, -0.9, 0.05, 36)
        parts += [_f16(d)[0][:, None].view(np.uint8), _f16(-minimum)[0][:, None].view(np.uint8)]
    q = q.T.astype(np.uint32)  # (blocks, 32)
    if kind in ("q5_0", "q5_1"):  # the fifth bits: weight j's at bit j of a little-endian uint32
        high = ((q >> 4) << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
        parts.append(high[:, None].view(np.uint8))
    parts.append(((q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)).astype(np.uint8))
    return np.concatenate(parts, axis=1).reshape(rows, columns // 32 * LEGACY_WEIGHTED[kind])
