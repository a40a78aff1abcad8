"""Exact brute-force baselines and oracles: top-k search and softmax sampling.

These are ground truth for the tests and the yardstick for the benchmarks, so they are
both exact and as fast as we could make them on a 2-core CPU (see bench/brute_yardstick.py
for the variants measured).

Scores are the float32 BLAS product <q, x> (one reused batch_size x N buffer). One fused
pass per query row (`_kernels/dense.py`) turns them into log Z and the draws, so the
"exact" softmax here is the softmax of the float32 scores:

* per block of 2,048 targets: the float32 maximum c, then the float32 weights
  exp(beta*(s - c)) (a vectorised polynomial, relative error below (|x| + 4) 2^-23 for
  x = beta*(s - c) >= -87; smaller weights are 0) summed in float64. That error is a
  hundred times below the float32 rounding of the scores themselves.
* log Z = logsumexp over blocks of (beta*c + log block sum), in float64.
* sampling is inverse-CDF with sorted float64 uniforms over the float64 block masses,
  then within the block the draws land in (its weights recomputed bit for bit), so no
  weight is lost to float32 prefix-sum rounding (torch.multinomial accumulates float32
  weights in float32 and silently drops weights below ~eps * running sum: on a 4M row
  that is a visible bias).

`BruteForce(..., precision="bf16" | "int8")` is the reduced-precision peer a user would
try first: the scores come from a bfloat16 product (AVX512-BF16 / AMX where the CPU has
them) or from int8 codes (symmetric, one scale per vector and per query; int32
accumulation), and the same float64 pass turns them into a sampling distribution Q. That
Q is NOT the softmax of the float32 scores, but its normaliser is summed over all N in
the same pass, so the returned log-probabilities are exact for Q: a sampled-softmax loss
corrected with them stays consistent. `tv_to_exact` reports TV(Q, softmax). Both need
torch (imported on first use).

`BruteForce(..., precision="bf16").sample_certified` (or `.sample(..., exact=True)`)
is exact again: it proposes from the bfloat16 softmax and rejects against the float32
scores with a certified bound on |s - s~| for every target (`certified_eps`;
docs/sampling.md, "Certified compressed scores").
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ._csr import permute_rows
from ._kernels.bounds import dot_error
from ._kernels.dense import (
    LOGZ_ERR,
    LZ_LO,
    LZ_POINT,
    LZ_UP,
    NORM_ROWS,
    certified_rows,
    code_norms,
    dequantize_rows,
    mask_columns_bf16,
    mask_rows,
    mask_rows_bf16,
    softmax_rows,
    tv_rows,
)
from ._threads import run_parallel
from ._validate import as_exclude, as_ids, as_vectors, check_k, check_positive, check_positive_int

PRECISIONS = ("fp32", "bf16", "int8")
BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits, round to nearest)
F32_UNIT = 2.0**-24
# a certified query whose acceptance bound exp(-2 beta eps) is below e^-MAX_TWO_BETA_EPS
# goes to the float32 pass instead (rejection would waste more than bf16 saves)
MAX_TWO_BETA_EPS = 3.0
# Below this dimension torch's bfloat16 product is no faster than the float32 sgemm on
# the CPUs measured (bench/README.md: 1M x 64, bf16 9.9 vs fp32 5.9 ms/query), so an
# "auto" choice of the certified bf16 pass needs at least this many coordinates.
BF16_MIN_DIM = 128
# A (rows x N) score buffer, kept between calls, holds up to MAX_BATCH queries, fewer
# where N is so large that they would pass BUFFER_BYTES (float32 at 10M: 26 rows, 1 GB).
BUFFER_BYTES = 1 << 30
MAX_BATCH = 256


def buffer_rows(n_queries: int, n_targets: int, itemsize: int, min_rows: int = 1) -> int:
    """Queries per block of a (rows x n_targets) buffer of itemsize-byte scores: at most
    n_queries and MAX_BATCH, and within BUFFER_BYTES unless that is below min_rows."""
    fit = BUFFER_BYTES // max(1, n_targets * itemsize)
    return max(1, min(n_queries, MAX_BATCH, max(min_rows, fit)))


def default_batch_size(n: int) -> int:
    """BruteForce's default batch_size: `buffer_rows` for float32 scores of n targets."""
    return buffer_rows(MAX_BATCH, n, 4)


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


def native_bf16() -> bool:
    """Whether torch is installed (not imported here) and the CPU multiplies bfloat16
    natively (AVX512-BF16 or AMX-BF16; read from /proc/cpuinfo, so Linux only)."""
    global _NATIVE_BF16
    if _NATIVE_BF16 is None:
        ok = importlib.util.find_spec("torch") is not None
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            flags = ""
        _NATIVE_BF16 = ok and ("avx512_bf16" in flags or "amx_bf16" in flags)
    return _NATIVE_BF16


_NATIVE_BF16: bool | None = None


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


@dataclass(frozen=True)
class Bf16Codes:
    """bfloat16 codes ỹ of float32 vectors y, and what certifies scores made from them.

    codes: (n, d) torch bfloat16 tensor (2 bytes per coordinate).
    nu_max, residual_max, code_norm_max: max ‖y‖, max ‖y − ỹ‖ and max ‖ỹ‖ over the
    vectors (float64, rounded up). With them `certified_eps` bounds |s − s̃| for every
    target at once (docs/sampling.md, "Certified compressed scores").
    """

    codes: object
    nu_max: float
    residual_max: float
    code_norm_max: float

    @property
    def nbytes(self) -> int:
        """Memory of the codes (the three maxima aside)."""
        return int(self.codes.numel()) * 2

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, alive: np.ndarray | None = None) -> Bf16Codes:
        """Round float32 vectors to bfloat16 (torch, round to nearest) and take the maxima
        over the rows where `alive` (default all) holds; one pass over the vectors."""
        torch = _torch_for("bf16")
        x = np.asarray(vectors, dtype=np.float32)
        with warnings.catch_warnings():  # a read-only view (TreeView) is only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            codes = torch.from_numpy(x).to(torch.bfloat16)
        bits = codes.view(torch.int16).numpy().view(np.uint16)
        keep = np.ones(x.shape[0], bool) if alive is None else np.ascontiguousarray(alive, bool)
        out = np.zeros((-(-x.shape[0] // NORM_ROWS), 3), np.float64)
        run_parallel(code_norms, x, bits, keep, out)
        nu, res, cn = (float(np.sqrt(m)) for m in out.max(axis=0, initial=0.0))
        up = 1.0 + 1e-9  # float64 sums of squares of d terms: relative error < d 2^-53
        return cls(codes, nu * up, res * up, cn * up)


def certified_eps(q: np.ndarray, q_bits: np.ndarray, codes: Bf16Codes) -> np.ndarray:
    """Per query, eps >= |s − s̃| for every target: s = the float32 score dot32(q, y) the
    sampler treats as exact, s̃ = the bfloat16 product of the rounded query q̃ (q_bits)
    and the codes ỹ as torch computes it (float32 accumulation, bfloat16 output).

    |s − ⟨q, y⟩| ≤ dot_error(d, ‖q‖, ν_max)            (float32 dot product)
    |⟨q, y⟩ − ⟨q̃, ỹ⟩| ≤ ‖q − q̃‖ ν_max + ‖q̃‖ r_max      (rounding of query and target)
    |⟨q̃, ỹ⟩ − t| ≤ γ ‖q̃‖ ñ_max, γ = 2 (d + 2) 2^-24  (accumulation, any order, padded x2)
    |t − s̃| ≤ 1.25 · 2^-8 |t|                        (bfloat16 output, padded by 1/4)
    """
    d = q.shape[1]
    q64 = q.astype(np.float64)
    qt = bf16_to_f32(q_bits).astype(np.float64)
    up = 1.0 + 1e-9
    qn = np.sqrt((q64**2).sum(1)) * up
    qtn = np.sqrt((qt**2).sum(1)) * up
    dq = np.sqrt(((q64 - qt) ** 2).sum(1)) * up
    nu = 2.0 * (d + 2) * F32_UNIT
    gamma = nu / (1.0 - nu)
    cn = codes.code_norm_max
    eps = np.array([dot_error(d, float(v), codes.nu_max) for v in qn])
    eps += dq * codes.nu_max + qtn * codes.residual_max
    eps += gamma * qtn * cn + 1.25 * BF16_UNIT * (1.0 + gamma) * qtn * cn
    return eps * up + 1e-30


def bf16_scores(q: np.ndarray, codes: Bf16Codes, out: np.ndarray) -> np.ndarray:
    """out[:B] = the bfloat16 products of q (rounded to bfloat16) with the codes, as uint16
    bits; returns the rounded queries' bits (B, d)."""
    torch = _torch_for("bf16")
    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(torch.bfloat16)
    dst = torch.from_numpy(out[: q.shape[0]].view(np.int16)).view(torch.bfloat16)
    torch.matmul(qt, codes.codes.T, out=dst)
    return qt.view(torch.int16).numpy().view(np.uint16)


def certified_softmax(
    q: np.ndarray,
    vectors: np.ndarray,
    codes: Bf16Codes,
    beta: float,
    keys: np.ndarray,
    k: int,
    ptr: np.ndarray,
    rows: np.ndarray,
    buf: np.ndarray,
    dead: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact softmax draws of the float32 scores by rejection from the bfloat16 scores'
    softmax, len(buf) queries at a time (buf: uint16, (rows, N)).

    keys: (B,) uint64 random streams, one per query; (ptr, rows): per-query CSR of excluded
    rows; dead: rows that hold no target. Returns (row index (B, k), log P (B, k),
    log Z (B, 3): (estimate, certified lower, certified upper), proposals (B,), eps (B,)).
    proposals[b] = -1: scores not finite or all excluded; -2: rejection stalled;
    -3: eps too large for rejection to pay (2 beta eps > MAX_TWO_BETA_EPS), nothing drawn:
    the caller takes the float32 pass for those queries.
    """
    nq = q.shape[0]
    idx = np.zeros((nq, k), np.int64)
    logp = np.zeros((nq, k), np.float64)
    logz = np.zeros((nq, 3), np.float64)
    props = np.full(nq, -3, np.int64)
    eps = np.zeros(nq, np.float64)
    step = buf.shape[0]
    cap = 1000 * k + 100000
    for lo in range(0, nq, step):
        hi = min(lo + step, nq)
        b = buf[: hi - lo]
        q_bits = bf16_scores(q[lo:hi], codes, b)
        eps[lo:hi] = certified_eps(q[lo:hi], q_bits, codes)
        if dead is not None and dead.size:
            run_parallel(mask_columns_bf16, b, hi - lo, dead)
        if ptr[hi] > ptr[lo]:
            run_parallel(mask_rows_bf16, b, hi - lo, ptr[lo : hi + 1] - ptr[lo], rows[ptr[lo] : ptr[hi]])
        ok = 2.0 * beta * eps[lo:hi] <= MAX_TWO_BETA_EPS
        if not ok.any():
            continue
        sel = np.flatnonzero(ok)
        if sel.size < hi - lo:  # compact the rows that go on (the others stay -3)
            b[: sel.size] = b[sel]
        r_idx, r_logp = np.zeros((sel.size, k), np.int64), np.zeros((sel.size, k))
        r_logz, r_prop = np.zeros((sel.size, 3)), np.zeros(sel.size, np.int64)
        qs = np.ascontiguousarray(q[lo:hi][sel])
        run_parallel(
            certified_rows, b, sel.size, qs, vectors, beta, eps[lo:hi][sel], keys[lo:hi][sel], cap,
            r_idx, r_logp, r_logz, r_prop,
        )  # fmt: skip
        dst = lo + sel
        idx[dst], logp[dst], logz[dst], props[dst] = r_idx, r_logp, r_logz, r_prop
    return idx, logp, logz, props, eps


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
        run_parallel(mask_rows, b, hi - lo, ptr[lo : hi + 1] - ptr[lo], rows[ptr[lo] : ptr[hi]])
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
        bad = run_parallel(softmax_rows, b, hi - lo, beta, u[lo:hi], idx[lo:hi], logp[lo:hi], logz[lo:hi])
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


@dataclass(frozen=True)
class CertifiedSample:
    """What `BruteForce.sample_certified` returns (arrays over B queries).

    ids: (B, k) exact softmax draws; log_p: (B, k) β s − log Ẑ; log_z: (B, 3) columns
    (log Ẑ, certified lower, certified upper), log Ẑ the acceptance-rate estimate clipped
    into the interval; proposals: (B,) draws from the bfloat16 proposal (k / proposals is
    the acceptance rate); eps: (B,) the certified bound on |s − s̃| used.
    """

    ids: np.ndarray
    log_p: np.ndarray
    log_z: np.ndarray
    proposals: np.ndarray
    eps: np.ndarray


class BruteForce:
    """Inner-product search and softmax sampling over all N vectors.

    Holds a float32 C-contiguous copy of the vectors and one reused (batch_size x N)
    score buffer, allocated on first use, so repeated calls do not allocate large
    arrays. Not thread-safe (the buffer is shared). batch_size None: 256 queries per
    block, fewer where that buffer would pass 1 GB (`default_batch_size`); results do
    not depend on it.

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
        self,
        vectors: np.ndarray,
        ids: np.ndarray | None = None,
        *,
        batch_size: int | None = None,
        precision: str = "fp32",
    ) -> None:
        self.precision = check_precision(precision)
        self.vectors = np.array(as_vectors(vectors, None, "vectors"), dtype=np.float32, order="C", copy=True)
        n, self.dim = self.vectors.shape
        self.ids = np.arange(n, dtype=np.int64) if ids is None else as_ids(ids, n).copy()
        self.batch_size = default_batch_size(n) if batch_size is None else check_positive_int(batch_size, "batch_size")
        order = np.argsort(self.ids, kind="stable")
        self._sorted_ids = self.ids[order]
        self._sorted_rows = order.astype(np.int64)
        self._buf: np.ndarray | None = None
        self._fbuf: np.ndarray | None = None  # bf16: float32 buffer for search
        self._lowp = None  # torch tensor: bf16 vectors, or int8 codes
        self._xscale: np.ndarray | None = None  # int8: per-vector scales
        self._codes: Bf16Codes | None = None  # bf16: the codes and their certificate
        if precision == "bf16":
            self._codes = Bf16Codes.from_vectors(self.vectors)
            self._lowp = self._codes.codes
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
            mask = mask_rows_bf16
        else:
            codes, qscale = quantize_int8(q[lo:hi])
            torch._int_mm(torch.from_numpy(codes), self._lowp.T, out=torch.from_numpy(b.view(np.int32)))
            run_parallel(dequantize_rows, b, hi - lo, qscale, self._xscale)
            mask = mask_rows
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

    def _sampling_inputs(self, queries, beta, exclude):
        """Checked queries and beta, and the per-query excluded rows (ptr, rows)."""
        q = as_vectors(queries, self.dim, "queries")
        beta = _check_beta(beta)
        ptr, rows = self._excluded_rows(exclude, q.shape[0])
        empty = np.flatnonzero(len(self) - np.diff(ptr) == 0)
        if empty.size:
            raise ValueError(f"query {int(empty[0])}: every row is excluded")
        return q, beta, ptr, rows

    def _softmax(self, queries, k: int, beta, exclude, seed):
        q, beta, ptr, rows = self._sampling_inputs(queries, beta, exclude)
        nq = q.shape[0]
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
        exact: bool = False,
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

        exact=True with precision bf16: exact draws from P by certified rejection from Q
        (`sample_certified`); log P and log Z are then the estimate log Ẑ clipped into a
        certified interval. No effect with fp32 (always exact); an error with int8.
        """
        k = check_k(k)
        beta = _beta_of(beta, temperature, "sample")
        if exact and self.precision != "fp32":
            r = self._certified(queries, k, beta, exclude, seed)
            return r.ids, r.log_p, r.log_z[:, 0].copy()
        idx, logp, logz = self._softmax(queries, k, beta, exclude, seed)
        return self.ids[idx], logp, logz

    def sample_certified(
        self,
        queries: np.ndarray,
        k: int,
        *,
        temperature: float,
        exclude: Sequence[Iterable[int]] | None = None,
        seed: int | np.random.SeedSequence | None = None,
    ) -> CertifiedSample:
        """k exact draws per query from the softmax of the float32 scores, by rejection
        from the softmax of the bfloat16 scores (precision="bf16" only).

        Each proposal i ∝ exp(β(s̃_i + ε)) is accepted with probability
        exp(β(s_i − s̃_i − ε)) ≤ 1, where s_i is the target's float32 score (one inner
        product) and ε ≥ |s − s̃| a certified bound for every target (`certified_eps`), so
        accepted draws follow the softmax of the float32 scores exactly. A query whose
        bound would make rejection wasteful (2βε > MAX_TWO_BETA_EPS, e.g. a huge norm)
        takes the float32 pass instead (proposals = k, eps reported). Same seed, same
        draws, whatever batch_size or thread count.
        """
        if self.precision != "bf16":
            raise ValueError(f"sample_certified needs precision='bf16' (this BruteForce has {self.precision!r})")
        return self._certified(queries, check_k(k), 1.0 / check_positive(temperature, "temperature"), exclude, seed)

    def _certified(self, queries, k: int, beta: float, exclude, seed) -> CertifiedSample:
        if self.precision != "bf16":
            raise ValueError(f"exact=True needs precision 'fp32' or 'bf16', got {self.precision!r}")
        q, beta, ptr, rows = self._sampling_inputs(queries, beta, exclude)
        nq = q.shape[0]
        keys = np.random.default_rng(seed).integers(0, 2**63, nq, dtype=np.int64).astype(np.uint64)
        buf = self._buffer(min(nq, self.batch_size))
        idx, logp, logz, props, eps = certified_softmax(q, self.vectors, self._codes, beta, keys, k, ptr, rows, buf)
        if (props == -2).any():
            raise RuntimeError(f"query {int(np.flatnonzero(props == -2)[0])}: certified rejection stalled")
        if (props == -1).any():
            bad = int(np.flatnonzero(props == -1)[0])
            raise ValueError(f"query {bad}: scores are not finite (vector/query norms too large for float32)")
        far = np.flatnonzero(props == -3)
        if far.size:  # the float32 pass, with each query's uniforms from its own key
            u = np.stack([np.random.default_rng(int(keys[b])).random(k) for b in far])
            sub_ptr, sub_rows = permute_rows(ptr, rows, far)
            fbuf = self._search_buffer(min(far.size, self.batch_size))
            i2, lp2, lz2, bad = dense_softmax(q[far], self.vectors, beta, u, sub_ptr, sub_rows, fbuf)
            if bad >= 0:
                raise ValueError(
                    f"query {int(far[bad])}: scores are not finite (vector/query norms too large for float32)"
                )
            qn = np.linalg.norm(q[far].astype(np.float64), axis=1)
            pad = beta * np.array([dot_error(self.dim, float(v), self._codes.nu_max) for v in qn]) + LOGZ_ERR
            idx[far], logp[far] = i2, lp2
            logz[far, LZ_POINT], logz[far, LZ_LO], logz[far, LZ_UP] = lz2, lz2 - pad, lz2 + pad
            props[far] = k
        return CertifiedSample(
            ids=self.ids[idx],
            log_p=logp,
            log_z=logz[:, [LZ_POINT, LZ_LO, LZ_UP]],
            proposals=props,
            eps=eps,
        )

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
            run_parallel(tv_rows, a, b, hi - lo, beta, out[lo:hi])
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
            bad = run_parallel(softmax_rows, b, hi - lo, beta, u[lo:hi], idx[lo:hi], logp[lo:hi], logz[lo:hi])
            if bad >= 0:
                return idx, logp, logz, lo + bad
        return idx, logp, logz, -1
