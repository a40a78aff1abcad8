"""Dense softmax passes over a (rows x N) score buffer: the brute-force sampler's kernels.

Scores arrive as float32, or as bfloat16 held in uint16 bits (read widened, no copy).

* `softmax_rows`: per row, the exact log Z and k inverse-CDF draws. One pass over the
  row, chunk by chunk (`CHUNK` targets): the chunk's float32 maximum c, then the
  float32 weights exp(beta (s - c)) summed in float64. The draws pick a chunk from the
  float64 chunk masses (a two-level CDF) and re-scan only the chunks they land in, with
  the same weights recomputed bit for bit.
* `certified_rows`: exact softmax draws of the float32 scores by rejection from the
  softmax of reduced-precision scores s~ (bfloat16), given a per-query certified bound
  eps >= |s - s~| for every target (docs/sampling.md, "Certified compressed scores").

Accuracy of the weights (`exp32_nonpos`): the argument beta (s - c) <= 0 is formed in
float32 (relative error 2^-24) and exponentiated by a float32 polynomial (relative error
< 2^-22), so a weight e^x carries a relative error below (|x| + 4) 2^-23; weights below
e^-87 of their chunk's maximum are 0 (mass lost < CHUNK e^-87 of the chunk's). For the
weights that matter (x > -30) that is < 4e-6, a hundred times below the float32 rounding
of the scores themselves (beta * d 2^-24 |q||y|), which both passes inherit.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

from .bounds import dot32
from .rng import U64, uniform01

CHUNK = 2048  # targets per chunk: 8 KiB of float32 scores, re-read from L1
BF16_NEG_INF = 0xFF80  # bit pattern of bfloat16 -inf
EXP_FLOOR = -87.0  # float32 weights below e^EXP_FLOOR (relative to the chunk max) are 0
# bound on the error of a log Z (or log-probability) from these weights: every weight's
# relative error is below (|x| + 4) 2^-23 with |x| <= 87 (module docstring); the weights
# floored to 0 lose < N e^-87 of the mass, nothing at any N that fits in memory
LOGZ_ERR = (-EXP_FLOOR + 4.0) * 2.0**-23


@intrinsic
def _i32_as_f32(typingctx, x):
    """Reinterpret int32 bits as float32 (vectorizable; numba has no bitcast)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _bf16_as_f32(typingctx, x):
    """The float32 whose high 16 bits are the bfloat16 bits x (uint16): exact widening."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return sig, codegen


def load(s, i):
    """Score i of a row as float32: float32 rows as they are, uint16 rows as bfloat16 bits.
    (numba-only: the overload below is what compiles.)"""
    raise NotImplementedError


@overload(load, inline="always")
def _load_overload(s, i):
    if isinstance(s, types.Array) and s.dtype == types.uint16:
        return lambda s, i: _bf16_as_f32(s[i])
    return lambda s, i: s[i]


_F = np.float32
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693359375)  # Cody-Waite split of ln 2 in float32: n * _LN2_HI is exact
_LN2_LO = _F(-2.12194440e-4)
_HALF = _F(0.5)
_FLOOR = _F(EXP_FLOOR)
_C = [_F(1.0 / math.factorial(i)) for i in range(8)]
_C2, _C3, _C4, _C5, _C6, _C7 = _C[2:]
_ONE = _F(1.0)


@nb.njit(inline="always")
def exp32_nonpos(x):
    """exp(x) in float32 for float32 x <= 0 (or -inf); 0 below EXP_FLOOR.

    Written out so that LLVM vectorises it (16 lanes with AVX-512); Taylor to degree 7
    on |r| <= ln2/2: truncation < 3e-9, so the error is the float32 evaluation's."""
    xc = max(x, _FLOOR)
    n = np.floor(xc * _LOG2E + _HALF)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = _C7
    p = p * r + _C6
    p = p * r + _C5
    p = p * r + _C4
    p = p * r + _C3
    p = p * r + _C2
    p = p * r + _ONE
    p = p * r + _ONE
    scale = _i32_as_f32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
    return p * scale if x > _FLOOR else _F(0.0)


# The two reductions below are not IR-inlined on purpose: numba would compile an inlined
# body with the caller's strict flags and the loop would not vectorise; LLVM still
# inlines them, keeping their fast-math flags (exact here: max and a sum of terms >= 0).
@nb.njit(cache=True, fastmath={"nnan", "nsz", "reassoc"})
def chunk_max(s, lo, hi):
    """max of s[lo:hi] as float32 (16 running maxima: LLVM vectorises this form)."""
    acc = np.full(16, _F(-np.inf))
    top = lo + ((hi - lo) // 16) * 16
    for i in range(lo, top, 16):
        for j in range(16):
            v = load(s, i + j)
            acc[j] = v if v > acc[j] else acc[j]
    m = _F(-np.inf)
    for j in range(16):
        m = acc[j] if acc[j] > m else m
    for i in range(top, hi):
        v = load(s, i)
        m = v if v > m else m
    return m


@nb.njit(inline="always")
def chunk_weights(s, lo, hi, c, beta32, w):
    """w[i - lo] = exp(beta (s[i] - c)) in float32 (no fast-math: Cody-Waite needs its order)."""
    for i in range(lo, hi):
        w[i - lo] = exp32_nonpos((load(s, i) - c) * beta32)


@nb.njit(cache=True, fastmath={"reassoc", "nsz", "contract"})
def sum_f64(w, n):
    """Sum of float32 w[:n] in float64 (any order: every term is >= 0)."""
    t = 0.0
    for i in range(n):
        t += np.float64(w[i])
    return t


@nb.njit(inline="always")
def row_masses(s, beta, cmax, csum, clog):
    """Per chunk of row s: its max (cmax), its mass relative to the max (csum) and its
    log mass (clog). Returns the largest clog, or NaN if a score is not finite (+inf or
    NaN), -inf if every score is -inf."""
    n = s.shape[0]
    beta32 = np.float32(beta)
    w = np.empty(CHUNK, np.float32)
    big = -np.inf
    for ci in range(cmax.shape[0]):
        lo = ci * CHUNK
        hi = min(lo + CHUNK, n)
        c = chunk_max(s, lo, hi)
        cmax[ci] = c
        if c == -np.inf:
            csum[ci] = 0.0
            clog[ci] = -np.inf
            continue
        if not (c < np.inf):
            return np.nan
        chunk_weights(s, lo, hi, c, beta32, w)
        t = sum_f64(w, hi - lo)
        csum[ci] = t
        clog[ci] = beta * np.float64(c) + math.log(t)
        big = max(big, clog[ci])
    return big


@nb.njit(inline="always")
def inverse_cdf(s, beta, cmax, csum, clog, big, tot, u, order, out_idx):
    """out_idx[j] = the target that uniform u[j] selects, walking u in ascending `order`
    over the two-level CDF (chunk masses exp(clog - big) summing to tot, then weights)."""
    n, nchunk, m = s.shape[0], cmax.shape[0], u.shape[0]
    beta32 = np.float32(beta)
    lastc = 0
    for ci in range(nchunk):
        if clog[ci] != -np.inf:
            lastc = ci
    w = np.empty(CHUNK, np.float32)
    j = 0
    acc = 0.0  # mass (relative to big) of the chunks before ci
    for ci in range(nchunk):
        if j >= m:
            break
        if clog[ci] == -np.inf:
            continue
        e = math.exp(clog[ci] - big)
        last = ci == lastc  # targets rounding past the total land here
        if not last and u[order[j]] * tot >= acc + e:
            acc += e
            continue
        # at least one target falls in this chunk: its weights, bit for bit as summed
        lo = ci * CHUNK
        hi = min(lo + CHUNK, n)
        chunk_weights(s, lo, hi, cmax[ci], beta32, w)
        scale = csum[ci] / e  # target mass -> chunk-relative units
        inner = 0.0
        i = lo
        while j < m:
            t = u[order[j]] * tot
            if not last and t >= acc + e:
                break  # rounding at the chunk's edge is resolved by the chunk test
            tt = (t - acc) * scale
            while i < hi and inner + np.float64(w[i - lo]) <= tt:
                inner += np.float64(w[i - lo])
                i += 1
            pick = i
            if i >= hi:  # float64 rounding at the chunk's end: the last positive weight
                pick = hi - 1
                while w[pick - lo] == 0.0:
                    pick -= 1
            out_idx[order[j]] = pick
            j += 1
        acc += e


@nb.njit(parallel=True, cache=True)
def softmax_rows(buf, nrows, beta, u, out_idx, out_logp, out_logz):
    """Per row of buf[:nrows]: the float64 log Z and k inverse-CDF draws.

    u: (nrows, k) uniforms in [0, 1) (k may be 0: log Z only). Returns the first row
    whose scores are not finite or all -inf (then outputs are unspecified), else -1.
    Sorting the row's uniforms walks the row once however many draws it takes."""
    n = buf.shape[1]
    k = u.shape[1]
    nchunk = (n + CHUNK - 1) // CHUNK
    bad_row = np.zeros(nrows, np.bool_)  # per row: a scalar written inside prange is thread-private
    for r in nb.prange(nrows):
        s = buf[r]
        cmax = np.empty(nchunk, np.float32)
        clog = np.empty(nchunk, np.float64)
        csum = np.empty(nchunk, np.float64)
        big = row_masses(s, beta, cmax, csum, clog)
        if not (big > -np.inf):
            bad_row[r] = True
            continue
        tot = 0.0
        for ci in range(nchunk):
            if clog[ci] != -np.inf:
                tot += math.exp(clog[ci] - big)
        logz = big + math.log(tot)
        out_logz[r] = logz
        if k == 0:
            continue
        idx = np.empty(k, np.int64)
        inverse_cdf(s, beta, cmax, csum, clog, big, tot, u[r], np.argsort(u[r]), idx)
        for j in range(k):
            out_idx[r, j] = idx[j]
            out_logp[r, j] = beta * np.float64(load(s, idx[j])) - logz
    for r in range(nrows):
        if bad_row[r]:
            return r
    return -1


# Certified rejection: out_logz columns
LZ_POINT, LZ_LO, LZ_UP = 0, 1, 2
# log-space pad of the proposal's normaliser for its float32 weights (module docstring)
G_PAD = 1e-4


@nb.njit(cache=True)
def certified_row(s, q, vecs, beta, eps, key, k, idx, score, cap):
    """Exact draws for one row: propose target i with probability ∝ exp(beta (s~_i + eps))
    (the inverse-CDF pass over the reduced-precision scores s~), accept it with
    probability exp(beta (s_i - s~_i - eps)) <= 1, s_i = dot32(q, vecs[i]).

    Fills idx[:k] and score[:k] (the exact float32 scores of the accepted targets) in
    proposal order; proposals come in rounds of counter-based uniforms keyed by `key`.
    Returns (log G, mean acceptance probability, proposals); proposals = -1 if the row
    is all -inf or not finite, -2 if fewer than k of `cap` proposals were accepted."""
    n = s.shape[0]
    nchunk = (n + CHUNK - 1) // CHUNK
    cmax = np.empty(nchunk, np.float32)
    clog = np.empty(nchunk, np.float64)
    csum = np.empty(nchunk, np.float64)
    big = row_masses(s, beta, cmax, csum, clog)
    if not (big > -np.inf):
        return 0.0, 0.0, -1
    tot = 0.0
    for ci in range(nchunk):
        if clog[ci] != -np.inf:
            tot += math.exp(clog[ci] - big)
    log_g = big + math.log(tot)
    got, made, asum = 0, 0, 0.0
    counter = U64(0)
    while got < k:
        if made >= cap:
            return log_g, asum / max(made, 1), -2
        # enough for the rest at the typical acceptance e^(-beta eps) (the proof's bound
        # is e^(-2 beta eps)), so that one round usually suffices
        m = int(min(1.25 * (k - got) * math.exp(min(beta * eps, 20.0)), 100000.0)) + 8
        u = np.empty(m, np.float64)
        for j in range(m):
            u[j] = uniform01(key ^ counter)
            counter += U64(1)
        pick = np.empty(m, np.int64)
        inverse_cdf(s, beta, cmax, csum, clog, big, tot, u, np.argsort(u), pick)
        for j in range(m):
            i = pick[j]
            sc = dot32(q, vecs[i])
            a = math.exp(min(beta * (np.float64(sc) - np.float64(load(s, i)) - eps), 0.0))
            acc = uniform01(key ^ counter) < a
            counter += U64(1)
            made += 1
            asum += a
            if acc:
                idx[got] = i
                score[got] = sc
                got += 1
                if got == k:
                    break
    return log_g, asum / made, made


@nb.njit(parallel=True, cache=True)
def certified_rows(buf, nrows, q, vecs, beta, eps, keys, cap, out_idx, out_logp, out_logz, out_prop):
    """`certified_row` for each row r of buf[:nrows] (query q[r], bound eps[r], stream
    keys[r]). out_logz[r] = (log Ẑ, lower, upper): the certified interval log G ± beta eps
    (padded by G_PAD) and the point estimate log G + beta eps + log(mean acceptance),
    clipped into it; out_logp = beta s - log Ẑ. out_prop[r] = proposals made (< 0: see
    certified_row)."""
    k = out_idx.shape[1]
    for r in nb.prange(nrows):
        idx = np.zeros(k, np.int64)
        score = np.zeros(k, np.float32)
        log_g, mean_a, made = certified_row(buf[r], q[r], vecs, beta, eps[r], keys[r], k, idx, score, cap)
        out_prop[r] = made
        if made < 0:
            continue
        lo = log_g - beta * eps[r] - G_PAD
        up = log_g + beta * eps[r] + G_PAD
        point = log_g + beta * eps[r] + math.log(mean_a) if mean_a > 0.0 else lo
        point = min(max(point, lo), up)
        out_logz[r, LZ_POINT] = point
        out_logz[r, LZ_LO] = lo
        out_logz[r, LZ_UP] = up
        for j in range(k):
            out_idx[r, j] = idx[j]
            out_logp[r, j] = beta * np.float64(score[j]) - point


@nb.njit(parallel=True, cache=True)
def mask_rows(buf, nrows, ptr, rows):
    """buf[b, rows[ptr[b]:ptr[b+1]]] = -inf (exclusions)."""
    for b in nb.prange(nrows):
        for t in range(ptr[b], ptr[b + 1]):
            buf[b, rows[t]] = -np.inf


@nb.njit(parallel=True, cache=True)
def mask_rows_bf16(buf, nrows, ptr, rows):
    """mask_rows for bfloat16 scores held as uint16 bits."""
    for b in nb.prange(nrows):
        for t in range(ptr[b], ptr[b + 1]):
            buf[b, rows[t]] = BF16_NEG_INF


@nb.njit(parallel=True, cache=True)
def mask_columns_bf16(buf, nrows, cols):
    """buf[:nrows, cols] = bfloat16 -inf (rows that hold no target)."""
    for b in nb.prange(nrows):
        for t in range(cols.shape[0]):
            buf[b, cols[t]] = BF16_NEG_INF


@nb.njit(parallel=True, cache=True)
def dequantize_rows(buf, nrows, qscale, xscale):
    """In place: the int32 products held in buf[:nrows] (as bits) -> float32 scores
    acc * qscale[b] * xscale[i] (the int32 is exact; one float32 rounding)."""
    acc = buf.view(np.int32)
    for b in nb.prange(nrows):
        qs = np.float64(qscale[b])
        for i in range(buf.shape[1]):
            buf[b, i] = np.float32(np.float64(acc[b, i]) * qs * np.float64(xscale[i]))


@nb.njit(inline="always")
def row_logz(s, beta):
    """(max score, sum of exp(beta (s - max))) of one row, float64; (-inf, 0) if all -inf."""
    m = chunk_max(s, 0, s.shape[0])
    if m == -np.inf:
        return m, 0.0
    beta32 = np.float32(beta)
    t = 0.0
    for i in range(s.shape[0]):
        t += np.float64(exp32_nonpos((load(s, i) - m) * beta32))
    return m, t


@nb.njit(parallel=True, cache=True)
def tv_rows(a, b, nrows, beta, out):
    """out[r] = TV(softmax(beta a[r]), softmax(beta b[r])) in float64 (NaN for a row
    that is all -inf in either); a, b: float32 scores or bfloat16 bits."""
    beta32 = np.float32(beta)
    for r in nb.prange(nrows):
        ma, za = row_logz(a[r], beta)
        mb, zb = row_logz(b[r], beta)
        if za == 0.0 or zb == 0.0:
            out[r] = np.nan
            continue
        t = 0.0
        for i in range(a.shape[1]):
            pa = np.float64(exp32_nonpos((load(a[r], i) - ma) * beta32)) / za
            pb = np.float64(exp32_nonpos((load(b[r], i) - mb) * beta32)) / zb
            t += abs(pa - pb)
        out[r] = 0.5 * t


NORM_ROWS = 4096  # rows per parallel task of code_norms


@nb.njit(cache=True, parallel=True, nogil=True)
def code_norms(vecs, bits, alive, out):
    """Per block of NORM_ROWS rows, over the rows where alive: the largest ‖y‖², ‖y − ỹ‖²
    and ‖ỹ‖² (float64 sums), y the float32 vectors, ỹ their bfloat16 codes (bits)."""
    n, d = vecs.shape
    for c in nb.prange(out.shape[0]):
        m0 = m1 = m2 = 0.0
        for i in range(c * NORM_ROWS, min(n, (c + 1) * NORM_ROWS)):
            if not alive[i]:
                continue
            s0 = s1 = s2 = 0.0
            for j in range(d):
                y = np.float64(vecs[i, j])
                t = np.float64(_bf16_as_f32(bits[i, j]))
                s0 += y * y
                s1 += (y - t) * (y - t)
                s2 += t * t
            m0, m1, m2 = max(m0, s0), max(m1, s1), max(m2, s2)
        out[c, 0], out[c, 1], out[c, 2] = m0, m1, m2
