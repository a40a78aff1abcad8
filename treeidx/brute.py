"""Exact brute-force baselines and oracles: top-k search and softmax sampling.

These are ground truth for the tests and the yardstick for the benchmarks, so they are
both exact and as fast as we could make them on a 2-core CPU (see bench/brute_yardstick.py
for the variants measured).

Scores are the float32 BLAS product <q, x> (one reused batch_size x N buffer). Everything
derived from them (weights, log Z, log P, the sampling CDF) is computed in float64, so the
"exact" softmax here is the softmax of the float32 scores, evaluated to float64 precision:

* exp is a float64 polynomial (error ~1 ulp); weights below e^-700 of their chunk's
  maximum are set to 0 (they cannot be represented in float64 anyway): the total mass
  dropped is < N * e^-700 relative to Z, i.e. nothing.
* log Z = logsumexp over chunks of (beta*c + log sum_chunk exp(beta*(s - c))), all float64.
* sampling is inverse-CDF with sorted float64 uniforms over a float64 two-level
  (chunk, element) cumulative sum, so no weight is lost to float32 prefix-sum rounding
  (torch.multinomial accumulates float32 weights in float32 and silently drops weights
  below ~eps * running sum: on a 4M row that is a visible bias). The remaining error is
  float64 rounding of the sums, ~1e-16 relative per probability.

`BruteForce(..., precision="bf16" | "int8")` is the reduced-precision peer a user would
try first: the scores come from a bfloat16 product (AVX512-BF16 / AMX where the CPU has
them) or from int8 codes (symmetric, one scale per vector and per query; int32
accumulation), and the same float64 pass turns them into a sampling distribution Q. That
Q is NOT the softmax of the float32 scores, but its normaliser is summed over all N in
the same pass, so the returned log-probabilities are exact for Q: a sampled-softmax loss
corrected with them stays consistent. `tv_to_exact` reports TV(Q, softmax). Both need
torch (imported on first use).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

from ._threads import run_parallel
from ._validate import as_exclude, as_ids, as_vectors, check_k, check_positive, check_positive_int

_CHUNK = 2048  # floats per chunk: 8 KiB of scores + 16 KiB of float64 weights stay in L1/L2

PRECISIONS = ("fp32", "bf16", "int8")
_BF16_NEG_INF = 0xFF80  # bit pattern of bfloat16 -inf


# ---------------------------------------------------------------------------------------
# numba kernels
# ---------------------------------------------------------------------------------------


@intrinsic
def _i64_as_f64(typingctx, x):
    """Reinterpret int64 bits as float64 (vectorizable; numba has no bitcast)."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@intrinsic
def _bf16_as_f32(typingctx, x):
    """The float32 whose high 16 bits are the bfloat16 bits x (uint16): exact widening."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return sig, codegen


def _load(s, i):
    """Score i of a row as float32: float32 rows as they are, uint16 rows as bfloat16 bits.
    (numba-only: the overload below is what compiles.)"""
    raise NotImplementedError


@overload(_load, inline="always")
def _load_overload(s, i):
    if isinstance(s, types.Array) and s.dtype == types.uint16:
        return lambda s, i: _bf16_as_f32(s[i])
    return lambda s, i: s[i]


_LOG2E = 1.4426950408889634
_LN2_HI = 0.693147180369123816490  # Cody-Waite split of ln 2: n*_LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10


@nb.njit(inline="always")
def _exp_nonpos(x: float) -> float:
    """exp(x) in float64 for x <= 0 (or -inf), ~1 ulp; 0 below -700.

    Written out because numba has no SVML here and libm's scalar exp does not vectorize;
    this polynomial does (AVX-512), which is what makes the fused kernel fast.
    """
    xc = max(x, -708.0)
    n = math.floor(xc * _LOG2E + 0.5)
    r = (xc - n * _LN2_HI) - n * _LN2_LO  # |r| <= ln2/2
    # Taylor to degree 13: truncation < 2e-17 relative on |r| <= 0.347
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    scale = _i64_as_f64((np.int64(n) + 1023) << 52)
    return p * scale if x > -700.0 else 0.0


@nb.njit(fastmath={"nnan"}, inline="always")
def _max_f32(s, lo: int, hi: int) -> float:
    m = -np.inf
    for i in range(lo, hi):
        v = _load(s, i)
        m = v if v > m else m
    return m


@nb.njit(inline="always")
def _weights(s, lo: int, hi: int, c: float, beta: float, w) -> None:
    """w[i-lo] = exp(beta*(s[i] - c)) in float64 (c = chunk max, so arguments are <= 0)."""
    for i in range(lo, hi):
        w[i - lo] = _exp_nonpos(beta * (np.float64(_load(s, i)) - c))


@nb.njit(fastmath={"reassoc", "nsz", "contract"}, inline="always")
def _sum(w, n: int) -> float:
    t = 0.0
    for i in range(n):
        t += w[i]
    return t


@nb.njit(parallel=True, cache=True)
def _softmax_rows(buf, nrows: int, beta: float, u, out_idx, out_logp, out_logz) -> int:
    """Per row of buf[:nrows]: exact float64 log Z and k inverse-CDF draws.

    buf: float32 scores, or bfloat16 scores as uint16 bits (read widened, no copy).
    u: (nrows, k) uniforms in [0, 1) (k may be 0: log Z only). Returns the first row
    whose scores are not finite or all -inf (then outputs are unspecified), else -1.
    """
    n = buf.shape[1]
    k = u.shape[1]
    nchunk = (n + _CHUNK - 1) // _CHUNK
    bad_row = np.zeros(nrows, np.bool_)  # per row: a scalar written inside prange is thread-private
    for r in nb.prange(nrows):
        s = buf[r]
        w = np.empty(_CHUNK, np.float64)
        cmax = np.empty(nchunk, np.float64)  # chunk max score
        clog = np.empty(nchunk, np.float64)  # log of chunk mass in absolute units
        csum = np.empty(nchunk, np.float64)  # chunk mass relative to its max
        big = -np.inf
        ok = True
        # pass 1: one read of the row from memory; exp+sum on the L1-resident chunk
        for ci in range(nchunk):
            lo = ci * _CHUNK
            hi = min(lo + _CHUNK, n)
            c = np.float64(_max_f32(s, lo, hi))
            cmax[ci] = c
            if c == -np.inf:
                csum[ci] = 0.0
                clog[ci] = -np.inf
                continue
            if not (c < np.inf):
                ok = False
                break
            _weights(s, lo, hi, c, beta, w)
            t = _sum(w, hi - lo)
            csum[ci] = t
            clog[ci] = beta * c + math.log(t)
            if clog[ci] > big:
                big = clog[ci]
        if not ok or big == -np.inf:
            bad_row[r] = True
            continue
        # chunk masses relative to the largest: float64 two-level CDF
        tot = 0.0
        lastc = 0
        for ci in range(nchunk):
            if clog[ci] != -np.inf:
                tot += math.exp(clog[ci] - big)
                lastc = ci
        logz = big + math.log(tot)
        out_logz[r] = logz
        if k == 0:
            continue
        order = np.argsort(u[r])  # walk the row once with sorted targets
        j = 0
        acc = 0.0  # mass (relative to big) of chunks before ci
        for ci in range(nchunk):
            if j >= k:
                break
            if clog[ci] == -np.inf:
                continue
            e = math.exp(clog[ci] - big)
            last = ci == lastc  # targets rounding past the total land here
            if not last and u[r, order[j]] * tot >= acc + e:
                acc += e
                continue
            # at least one target falls in this chunk: expand it
            lo = ci * _CHUNK
            hi = min(lo + _CHUNK, n)
            c = cmax[ci]
            _weights(s, lo, hi, c, beta, w)
            scale = csum[ci] / e  # target mass -> chunk-relative units
            inner = 0.0
            i = lo
            while j < k:
                t = u[r, order[j]] * tot
                if not last and t >= acc + e:
                    break  # rounding at chunk edge is resolved by the chunk test
                tt = (t - acc) * scale
                while i < hi and inner + w[i - lo] <= tt:
                    inner += w[i - lo]
                    i += 1
                if i >= hi:
                    # float64 rounding at the chunk's end: the last nonzero weight
                    pick = hi - 1
                    while w[pick - lo] == 0.0:
                        pick -= 1
                else:
                    pick = i
                dst = order[j]
                out_idx[r, dst] = pick
                out_logp[r, dst] = beta * np.float64(_load(s, pick)) - logz
                j += 1
            acc += e
    for r in range(nrows):
        if bad_row[r]:
            return r
    return -1


@nb.njit(parallel=True, cache=True)
def _mask_rows(buf, nrows: int, ptr, rows) -> None:
    """buf[b, rows[ptr[b]:ptr[b+1]]] = -inf (exclusions)."""
    for b in nb.prange(nrows):
        for t in range(ptr[b], ptr[b + 1]):
            buf[b, rows[t]] = -np.inf


@nb.njit(parallel=True, cache=True)
def _mask_rows_bf16(buf, nrows: int, ptr, rows) -> None:
    """_mask_rows for bfloat16 scores held as uint16 bits."""
    for b in nb.prange(nrows):
        for t in range(ptr[b], ptr[b + 1]):
            buf[b, rows[t]] = _BF16_NEG_INF


@nb.njit(parallel=True, cache=True)
def _dequantize_rows(buf, nrows: int, qscale, xscale) -> None:
    """In place: the int32 products held in buf[:nrows] (as bits) -> float32 scores
    acc * qscale[b] * xscale[i] (the int32 is exact; one float32 rounding)."""
    acc = buf.view(np.int32)
    for b in nb.prange(nrows):
        qs = np.float64(qscale[b])
        for i in range(buf.shape[1]):
            buf[b, i] = np.float32(np.float64(acc[b, i]) * qs * np.float64(xscale[i]))


@nb.njit(fastmath={"reassoc", "nsz", "contract"}, inline="always")
def _row_logz(s, beta: float) -> tuple[float, float]:
    """(max score, sum of exp(beta (s - max))) of one row, float64; (-inf, 0) if all -inf."""
    m = np.float64(_max_f32(s, 0, s.shape[0]))
    if m == -np.inf:
        return m, 0.0
    t = 0.0
    for i in range(s.shape[0]):
        t += _exp_nonpos(beta * (np.float64(_load(s, i)) - m))
    return m, t


@nb.njit(parallel=True, cache=True)
def _tv_rows(a, b, nrows: int, beta: float, out) -> None:
    """out[r] = TV(softmax(beta a[r]), softmax(beta b[r])) in float64 (NaN for a row
    that is all -inf in either); a, b: float32 scores or bfloat16 bits."""
    for r in nb.prange(nrows):
        ma, za = _row_logz(a[r], beta)
        mb, zb = _row_logz(b[r], beta)
        if za == 0.0 or zb == 0.0:
            out[r] = np.nan
            continue
        t = 0.0
        for i in range(a.shape[1]):
            pa = _exp_nonpos(beta * (np.float64(_load(a[r], i)) - ma)) / za
            pb = _exp_nonpos(beta * (np.float64(_load(b[r], i)) - mb)) / zb
            t += abs(pa - pb)
        out[r] = 0.5 * t


def quantize_int8(x: np.ndarray, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 codes: x[i] ≈ codes[i] * scale[i].

    scale[i] = max_j |x[i, j]| / 127 (1 for an all-zero row), codes = round(x / scale)
    in [-127, 127]. Returns (codes (n, d) int8, scale (n,) float32). Rows are done a
    block at a time, so the float temporaries stay small."""
    x = np.asarray(x, dtype=np.float32)
    codes = np.empty(x.shape, np.int8)
    scale = np.empty(x.shape[0], np.float32)
    for lo in range(0, x.shape[0], block):
        xb = x[lo : lo + block]
        a = np.abs(xb).max(axis=1) if xb.shape[1] else np.zeros(xb.shape[0], np.float32)
        sc = np.where(a > 0, a / np.float32(127), np.float32(1)).astype(np.float32)
        codes[lo : lo + block] = np.clip(np.rint(xb / sc[:, None]), -127, 127)
        scale[lo : lo + block] = sc
    return codes, scale


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 numbers held as uint16 bits (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def check_precision(precision) -> str:
    """'fp32', 'bf16' or 'int8', else a ValueError."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    return precision


def _torch_for(precision: str):
    """torch, imported on first use: the reduced-precision products are torch's."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"precision={precision!r} needs torch (its bfloat16 / int8 matrix products): pip install 'treeidx[torch]'"
        ) from e
    return torch


def score_block(
    q: np.ndarray,
    vectors: np.ndarray,
    lo: int,
    hi: int,
    ptr: np.ndarray,
    rows: np.ndarray,
    buf: np.ndarray,
    dead: np.ndarray | None = None,
) -> np.ndarray:
    """Scores <q_b, x> of queries lo..hi into buf, excluded and dead rows at -inf."""
    b = buf[: hi - lo]
    # numpy's BLAS sgemm rather than torch.matmul: the faster here (bench/brute_yardstick.py)
    np.matmul(q[lo:hi], vectors.T, out=b)
    if dead is not None and dead.size:
        b[:, dead] = -np.inf
    if ptr[hi] > ptr[lo]:
        run_parallel(_mask_rows, b, hi - lo, ptr[lo : hi + 1] - ptr[lo], rows[ptr[lo] : ptr[hi]])
    return b


def dense_softmax(
    q: np.ndarray,
    vectors: np.ndarray,
    beta: float,
    u: np.ndarray,
    ptr: np.ndarray,
    rows: np.ndarray,
    buf: np.ndarray,
    dead: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Exact softmax draws over every row of `vectors`, len(buf) queries at a time.

    u: (B, k) uniforms; (ptr, rows): per-query CSR of excluded rows; dead: rows that
    hold no target (never drawn). Returns (row index (B, k), log P (B, k), log Z (B,),
    the first query whose scores are not finite or all excluded, else -1).
    """
    nq, k = u.shape
    idx = np.zeros((nq, k), np.int64)
    logp = np.empty((nq, k), np.float64)
    logz = np.empty(nq, np.float64)
    step = buf.shape[0]
    for lo in range(0, nq, step):
        hi = min(lo + step, nq)
        b = score_block(q, vectors, lo, hi, ptr, rows, buf, dead)
        bad = run_parallel(_softmax_rows, b, hi - lo, beta, u[lo:hi], idx[lo:hi], logp[lo:hi], logz[lo:hi])
        if bad >= 0:
            return idx, logp, logz, lo + bad
    return idx, logp, logz, -1


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------


def _topk_rows(buf: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest entries, descending, with their column indices.

    torch.topk is several times faster than numpy's partition here
    (bench/brute_yardstick.py), so it is used when torch is installed; it is imported
    on first use so that `import treeidx` never loads it.
    """
    try:
        import torch
    except ImportError:
        part = np.argpartition(-buf, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(buf, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        return np.take_along_axis(vals, order, axis=1), np.take_along_axis(part, order, axis=1)
    v, i = torch.topk(torch.from_numpy(buf), k, dim=1, largest=True, sorted=True)
    return v.numpy(), i.numpy()


def _check_beta(beta) -> float:
    return check_positive(beta, "beta")


def _beta_of(beta, temperature, where: str) -> float:
    """1 / temperature, the scale every other sampler takes; `beta` (the inverse
    temperature, this class's old argument) still works with a DeprecationWarning."""
    if temperature is not None:
        if beta is not None:
            raise TypeError(f"{where}: pass temperature= or beta=, not both")
        return 1.0 / check_positive(temperature, "temperature")
    if beta is None:
        raise TypeError(f"{where}: missing temperature= (P(y|q) ∝ exp(<q, y> / temperature))")
    warnings.warn(
        f"BruteForce.{where}(..., beta) is deprecated: pass temperature=1/beta like every other sampler",
        DeprecationWarning,
        stacklevel=3,
    )
    return _check_beta(beta)


class BruteForce:
    """Inner-product search and softmax sampling over all N vectors.

    Holds a float32 C-contiguous copy of the vectors and one reused (batch_size x N)
    score buffer, allocated on first use, so repeated calls do not allocate large
    arrays. Not thread-safe (the buffer is shared).

    precision: how the softmax methods (`sample`, `log_partition`, `probabilities`)
    score the targets.

    * ``"fp32"`` (default): float32 BLAS products; the exact softmax of the float32 scores.
    * ``"bf16"``: queries and vectors rounded to bfloat16, products by torch (accumulated
      in float32, rounded to bfloat16 on output). Keeps a bfloat16 copy of the vectors
      (2 bytes per coordinate) beside the float32 one.
    * ``"int8"``: symmetric int8 codes, one scale per vector and per query
      (`quantize_int8`), exact int32 products by `torch._int_mm`, times the two scales
      in float32. Keeps the codes (1 byte per coordinate) and scales.

    With bf16 or int8 the sampled distribution is Q ∝ exp(beta s~) for the reduced-
    precision scores s~, **not the exact softmax**; the returned log-probabilities and
    log Z are exact (float64) for Q, its normaliser summed over all N in the same pass.
    `tv_to_exact` measures TV(Q, softmax of the float32 scores). `search` always ranks
    by the float32 scores. The reduced-precision paths need torch.
    """

    def __init__(
        self, vectors: np.ndarray, ids: np.ndarray | None = None, *, batch_size: int = 256, precision: str = "fp32"
    ) -> None:
        self.precision = check_precision(precision)
        self.vectors = np.array(as_vectors(vectors, None, "vectors"), dtype=np.float32, order="C", copy=True)
        n, self.dim = self.vectors.shape
        self.ids = np.arange(n, dtype=np.int64) if ids is None else as_ids(ids, n).copy()
        self.batch_size = check_positive_int(batch_size, "batch_size")
        order = np.argsort(self.ids, kind="stable")
        self._sorted_ids = self.ids[order]
        self._sorted_rows = order.astype(np.int64)
        self._buf: np.ndarray | None = None
        self._fbuf: np.ndarray | None = None  # bf16: float32 buffer for search
        self._lowp = None  # torch tensor: bf16 vectors, or int8 codes
        self._xscale: np.ndarray | None = None  # int8: per-vector scales
        if precision == "bf16":
            torch = _torch_for(precision)
            self._lowp = torch.from_numpy(self.vectors).to(torch.bfloat16)
        elif precision == "int8":
            torch = _torch_for(precision)
            codes, self._xscale = quantize_int8(self.vectors)
            self._lowp = torch.from_numpy(codes)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    # -- internals ----------------------------------------------------------------------

    @property
    def _score_dtype(self) -> type:
        # bf16 scores are kept as their uint16 bits: numpy has no bfloat16
        return np.uint16 if self.precision == "bf16" else np.float32

    def _buffer(self, rows: int) -> np.ndarray:
        if self._buf is None:
            self._buf = np.empty((self.batch_size, len(self)), self._score_dtype)
        return self._buf[:rows]

    def _search_buffer(self, rows: int) -> np.ndarray:
        """A float32 buffer for the float32 scores `search` ranks by."""
        if self._score_dtype is np.float32:
            return self._buffer(rows)
        if self._fbuf is None:
            self._fbuf = np.empty((self.batch_size, len(self)), np.float32)
        return self._fbuf[:rows]

    def _proposal_block(
        self, q: np.ndarray, lo: int, hi: int, ptr: np.ndarray, rows: np.ndarray, buf: np.ndarray
    ) -> np.ndarray:
        """Scores of queries lo..hi at this object's precision into buf (float32, or
        bfloat16 bits for bf16; see `_buffer`), excluded rows at -inf."""
        if self.precision == "fp32":
            return score_block(q, self.vectors, lo, hi, ptr, rows, buf)
        torch = _torch_for(self.precision)
        b = buf[: hi - lo]
        if self.precision == "bf16":
            out = torch.from_numpy(b.view(np.int16)).view(torch.bfloat16)
            torch.matmul(torch.from_numpy(q[lo:hi]).to(torch.bfloat16), self._lowp.T, out=out)
            mask = _mask_rows_bf16
        else:
            codes, qscale = quantize_int8(q[lo:hi])
            torch._int_mm(torch.from_numpy(codes), self._lowp.T, out=torch.from_numpy(b.view(np.int32)))
            run_parallel(_dequantize_rows, b, hi - lo, qscale, self._xscale)
            mask = _mask_rows
        if ptr[hi] > ptr[lo]:
            run_parallel(mask, b, hi - lo, ptr[lo : hi + 1] - ptr[lo], rows[ptr[lo] : ptr[hi]])
        return b

    def _excluded_rows(self, exclude, nq: int) -> tuple[np.ndarray, np.ndarray]:
        """CSR of excluded *row* indices per query (unknown ids dropped)."""
        ptr, ex = as_exclude(exclude, nq)
        if ex.size == 0:
            return ptr, ex
        pos = np.searchsorted(self._sorted_ids, ex)
        pos_c = np.minimum(pos, len(self) - 1)
        known = self._sorted_ids[pos_c] == ex
        c = np.concatenate(([0], np.cumsum(known)))
        counts = c[ptr[1:]] - c[ptr[:-1]]
        newptr = np.zeros(nq + 1, np.int64)
        np.cumsum(counts, out=newptr[1:])
        return newptr, self._sorted_rows[pos_c[known]]

    # -- search -------------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Iterable[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by inner product: (scores (B, k) float32 descending, ids (B, k) int64)."""
        q = as_vectors(queries, self.dim, "queries")
        k = check_k(k)
        nq = q.shape[0]
        ptr, rows = self._excluded_rows(exclude, nq)
        allowed = len(self) - np.diff(ptr)
        if k > allowed.min():
            raise ValueError(f"k={k} exceeds the number of allowed rows ({int(allowed.min())})")
        out_s = np.empty((nq, k), np.float32)
        out_i = np.empty((nq, k), np.int64)
        for lo in range(0, nq, self.batch_size):
            hi = min(lo + self.batch_size, nq)
            buf = score_block(q, self.vectors, lo, hi, ptr, rows, self._search_buffer(hi - lo))
            if not np.isfinite(buf.max(axis=1)).all():
                raise ValueError("scores overflow float32 (vector/query norms too large)")
            v, i = _topk_rows(buf, k)
            out_s[lo:hi] = v
            out_i[lo:hi] = self.ids[i]
        return out_s, out_i

    # -- softmax ------------------------------------------------------------------------

    def _softmax(self, queries, k: int, beta, exclude, seed):
        q = as_vectors(queries, self.dim, "queries")
        beta = _check_beta(beta)
        nq = q.shape[0]
        ptr, rows = self._excluded_rows(exclude, nq)
        empty = np.flatnonzero(len(self) - np.diff(ptr) == 0)
        if empty.size:
            raise ValueError(f"query {int(empty[0])}: every row is excluded")
        # all uniforms drawn up front: output depends on the seed, not on batch_size
        u = np.random.default_rng(seed).random((nq, k))
        if self.precision == "fp32":
            idx, logp, logz, bad = dense_softmax(
                q, self.vectors, beta, u, ptr, rows, self._buffer(min(nq, self.batch_size))
            )
        else:
            idx, logp, logz, bad = self._proposal_softmax(q, beta, u, ptr, rows)
        if bad >= 0:
            raise ValueError(f"query {bad}: scores are not finite (vector/query norms too large for float32)")
        return idx, logp, logz

    def sample(
        self,
        queries: np.ndarray,
        k: int,
        beta: float | None = None,
        exclude: Sequence[Iterable[int]] | None = None,
        seed: int | np.random.SeedSequence | None = None,
        *,
        temperature: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """k exact draws with replacement from P(y|q) ∝ exp(beta <q, y>) over allowed rows,
        beta = 1 / temperature (`beta` itself is deprecated).

        Returns (ids (B, k) int64, log P of each draw (B, k) float64 = beta*s - log Z,
        log Z (B,) float64). Same seed -> same output, whatever batch_size. Draws are
        i.i.d. in output order (the uniforms keep their original order).

        With precision bf16 / int8, s are the reduced-precision scores: the draws come
        from Q ∝ exp(beta s~), not from P, and log Q and Q's log Z are returned, exact for
        Q (use them as the proposal's log q). bf16 products may round differently with
        the batch's shape, so there only the uniforms are independent of batch_size.
        """
        k = check_k(k)
        beta = _beta_of(beta, temperature, "sample")
        idx, logp, logz = self._softmax(queries, k, beta, exclude, seed)
        return self.ids[idx], logp, logz

    def log_partition(
        self,
        queries: np.ndarray,
        beta: float | None = None,
        exclude: Sequence[Iterable[int]] | None = None,
        *,
        temperature: float | None = None,
    ) -> np.ndarray:
        """Exact float64 log Z = logsumexp(<q, y> / temperature) over allowed rows, per query
        (with precision bf16 / int8: Q's normaliser, from the reduced-precision scores)."""
        return self._softmax(queries, 0, _beta_of(beta, temperature, "log_partition"), exclude, 0)[2]

    def probabilities(
        self,
        query: np.ndarray,
        beta: float | None = None,
        exclude: Iterable[int] | None = None,
        *,
        temperature: float | None = None,
    ) -> np.ndarray:
        """Float64 softmax over all N rows (row order) for one query; excluded rows get 0.

        The distribution `sample` draws from: the exact softmax of the float32 scores, or
        Q for precision bf16 / int8."""
        q = as_vectors(query, self.dim, "query")
        if q.shape[0] != 1:
            raise ValueError(f"query: expected a single query, got {q.shape[0]}")
        beta = _beta_of(beta, temperature, "probabilities")
        ex = None if exclude is None else [exclude]
        ptr, rows = self._excluded_rows(ex, 1)
        if ptr[1] >= len(self):
            raise ValueError("query 0: every row is excluded")
        if self.precision == "fp32":
            s = (q @ self.vectors.T)[0].astype(np.float64)  # same float32 scores as the sampler
        else:
            buf = self._proposal_block(
                q, 0, 1, np.zeros(2, np.int64), rows[:0], np.empty((1, len(self)), self._score_dtype)
            )
            s = (bf16_to_f32(buf[0]) if buf.dtype == np.uint16 else buf[0]).astype(np.float64)
        if not np.isfinite(s).all():
            raise ValueError("scores overflow float32 (vector/query norms too large)")
        x = beta * s
        x[rows] = -np.inf
        m = x.max()
        p = np.exp(x - m)
        return p / p.sum()

    def tv_to_exact(
        self,
        queries: np.ndarray,
        beta: float | None = None,
        exclude: Sequence[Iterable[int]] | None = None,
        *,
        block: int = 16,
        temperature: float | None = None,
    ) -> np.ndarray:
        """Per query, the total variation between the distribution `sample` draws from
        and the exact softmax of the float32 scores: (B,) float64, 0 for precision fp32.

        Both softmaxes are summed in float64 over all N rows, `block` queries at a time
        (two block x N score arrays). Excluded rows have weight 0 in both."""
        q = as_vectors(queries, self.dim, "queries")
        beta = _beta_of(beta, temperature, "tv_to_exact")
        block = check_k(block, "block")
        nq = q.shape[0]
        ptr, rows = self._excluded_rows(exclude, nq)
        empty = np.flatnonzero(len(self) - np.diff(ptr) == 0)
        if empty.size:
            raise ValueError(f"query {int(empty[0])}: every row is excluded")
        out = np.zeros(nq, np.float64)
        if self.precision == "fp32" or nq == 0:
            return out
        step = min(block, nq)
        exact = np.empty((step, len(self)), np.float32)
        prop = np.empty((step, len(self)), self._score_dtype)
        for lo in range(0, nq, step):
            hi = min(lo + step, nq)
            a = score_block(q, self.vectors, lo, hi, ptr, rows, exact)
            b = self._proposal_block(q, lo, hi, ptr, rows, prop)
            run_parallel(_tv_rows, a, b, hi - lo, beta, out[lo:hi])
        if not np.isfinite(out).all():
            raise ValueError(
                f"query {int(np.flatnonzero(~np.isfinite(out))[0])}: scores are not "
                "finite (vector/query norms too large for float32)"
            )
        return out

    def _proposal_softmax(
        self, q: np.ndarray, beta: float, u: np.ndarray, ptr: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """dense_softmax over the reduced-precision scores (same float64 pass)."""
        nq, k = u.shape
        idx = np.zeros((nq, k), np.int64)
        logp = np.empty((nq, k), np.float64)
        logz = np.empty(nq, np.float64)
        buf = self._buffer(min(nq, self.batch_size))
        step = buf.shape[0]
        for lo in range(0, nq, step):
            hi = min(lo + step, nq)
            b = self._proposal_block(q, lo, hi, ptr, rows, buf)
            bad = run_parallel(_softmax_rows, b, hi - lo, beta, u[lo:hi], idx[lo:hi], logp[lo:hi], logz[lo:hi])
            if bad >= 0:
                return idx, logp, logz, lo + bad
        return idx, logp, logz, -1
