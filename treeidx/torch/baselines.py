"""The usual negative samplers, which treeidx is compared against, behind one interface.

Each has `sample(query_emb (B, d) Tensor, positive_ids (B,) Tensor | None) -> Negatives`
with ids and log_q on the queries' device, so a training loop can swap them for
`treeidx.torch.TreeNegativeSampler`, and pass `log_q` straight to
`sampled_softmax_loss`, whose correction is logit − log(k · Q).

    UniformSampler     uniform over the targets                log_q = −log N
    InBatch            no sampled negatives (k = 0)           the loss's in-batch columns
    StaleTopK          ANCE: top-k under stale target vectors  log_q = −log k (no correction)
    NegativeCache      Lindgren et al. 2021: softmax over a FIFO cache of stale vectors
    BruteForceSampler  the oracle: exact softmax over all fresh vectors, chunked
                       (precision="bf16" / "int8": the reduced-precision peer, a full-scan
                       proposal with its exact log q)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Union

import numpy as np
import torch

from .._validate import as_ids, check_nonnegative_int, check_positive_int, vectors_then_ids
from ..brute import BruteForce, check_precision
from ..tree import TreeIndex
from ._common import (
    Negatives,
    check_k,
    check_margin,
    check_positives,
    check_queries,
    check_temperature,
    empty_negatives,
    host_queries,
    log_q_dtype,
)

__all__ = ["UniformSampler", "InBatch", "StaleTopK", "NegativeCache", "BruteForceSampler"]

Vectors = Union[torch.Tensor, np.ndarray]


def _as_tensor(x: Vectors, what: str) -> torch.Tensor:
    """A detached 2-d floating tensor (numpy arrays are wrapped, not copied)."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dim() != 2 or t.shape[0] == 0 or not t.is_floating_point():
        raise ValueError(f"{what}: expected a non-empty floating (N, d) array, got {tuple(t.shape)} {t.dtype}")
    return t


class UniformSampler:
    """k ids per query drawn uniformly with replacement from all N targets.

    ids_or_n: the target ids, or N for ids 0..N-1. The positive is not excluded, so
    log_q = −log N exactly; pass pos_ids/neg_ids to the loss to mask accidental hits
    (which keeps the estimator consistent, see sampled_softmax_loss).
    """

    def __init__(self, ids_or_n: int | Vectors, *, k: int, seed: int = 0) -> None:
        if isinstance(ids_or_n, (int, np.integer)) and not isinstance(ids_or_n, bool):
            if ids_or_n < 1:
                raise ValueError(f"n: expected an integer >= 1, got {ids_or_n}")
            self.ids = np.arange(int(ids_or_n), dtype=np.int64)
        else:
            self.ids = as_ids(ids_or_n, None)
            if self.ids.size == 0:
                raise ValueError("ids: empty")
        self.k = check_k(k)
        self._rng = np.random.default_rng(check_nonnegative_int(seed))

    def sample(self, query_emb: torch.Tensor, positive_ids: torch.Tensor | None = None) -> Negatives:
        q = check_queries(query_emb)
        check_positives(positive_ids, q.shape[0])
        n = self.ids.shape[0]
        ids = self.ids[self._rng.integers(0, n, (q.shape[0], self.k))]
        return Negatives(
            ids=torch.from_numpy(ids).to(q.device),
            log_q=torch.full(ids.shape, -math.log(n), dtype=log_q_dtype(q), device=q.device),
        )


class InBatch:
    """No sampled negatives: (B, 0) tensors. Use the loss's in_batch_negatives=True."""

    k = 0

    def sample(self, query_emb: torch.Tensor, positive_ids: torch.Tensor | None = None) -> Negatives:
        q = check_queries(query_emb)
        check_positives(positive_ids, q.shape[0])
        return empty_negatives(q, 0)


class StaleTopK:
    """ANCE-style hard negatives: exact top-(skip + k) under stale target vectors.

    encode_targets() returns the (N, d) vectors of `ids` (in that order) under the
    current encoder; it is called on the first `sample` and then every `refresh_every`
    calls, and the index is rebuilt over its output. Between refreshes the results use
    those stale vectors (fresh queries). The first `skip` ranks are dropped (ANCE/RocketQA
    skip the very top, which holds most false negatives); the positive is excluded.

    backend: "brute" (BruteForce: no build cost, one BLAS product per batch), "tree"
    (TreeIndex: a build every refresh, then sub-linear exact search on clustered data),
    or "auto", decided at the first call from the queries one refresh serves: tree when
    N ≥ 20,000 and refresh_every × B ≥ 2·10^8 / N. Measured here (one thread, clustered
    unit vectors, d = 64): at N = 20k brute 0.20 ms/query, tree 0.045 ms/query + 1.2 s
    build (break-even ~8k queries per refresh); at N = 100k 0.91 vs 0.15 ms + 2.0 s
    (~2.6k queries).

    log_q = −log k: top-k is not a sample. Under the loss's logit − log(k · Q)
    correction this leaves the logits unchanged, i.e. plain hard-negative
    cross-entropy, which is what ANCE trains with (passing log_q=None is the same).
    """

    def __init__(
        self,
        encode_targets: Callable[[], Vectors],
        ids: Vectors,
        *,
        k: int,
        refresh_every: int,
        skip: int = 0,
        backend: str = "auto",
    ) -> None:
        if not callable(encode_targets):
            raise TypeError("encode_targets: expected a callable returning (N, d) vectors")
        self.encode_targets = encode_targets
        self.ids = as_ids(ids, None)
        self.k = check_k(k)
        if isinstance(skip, bool) or not isinstance(skip, (int, np.integer)) or skip < 0:
            raise ValueError(f"skip: expected an integer >= 0, got {skip!r}")
        if skip + self.k > self.ids.shape[0] - 1:
            raise ValueError(
                f"skip + k = {skip + self.k} exceeds the {self.ids.shape[0] - 1} targets other than a positive"
            )
        if backend not in ("auto", "brute", "tree"):
            raise ValueError(f"backend: expected 'auto', 'brute' or 'tree', got {backend!r}")
        self.refresh_every = check_positive_int(refresh_every, "refresh_every")
        self.skip = int(skip)
        self.backend = backend
        self.calls = 0
        self.refreshes = 0
        self._index: BruteForce | TreeIndex | None = None

    def _choose_backend(self, batch: int) -> None:
        if self.backend == "auto":
            n = self.ids.shape[0]
            served = self.refresh_every * max(batch, 1)
            self.backend = "tree" if n >= 20_000 and served * n >= 2e8 else "brute"

    def refresh(self) -> None:
        """Re-encode all targets now and rebuild the index."""
        self._choose_backend(1)
        v = _as_tensor(self.encode_targets(), "encode_targets()")
        if v.shape[0] != self.ids.shape[0]:
            raise ValueError(f"encode_targets(): expected {self.ids.shape[0]} rows (one per id), got {v.shape[0]}")
        x = host_queries(v)
        self._index = BruteForce(x, self.ids) if self.backend == "brute" else TreeIndex.build(x, self.ids)
        self.refreshes += 1

    @property
    def nbytes(self) -> int:
        """Host bytes of the current index (0 before the first refresh)."""
        if self._index is None:
            return 0
        if isinstance(self._index, TreeIndex):
            return int(self._index.nbytes)
        return int(self._index.vectors.nbytes + self._index.ids.nbytes)

    def sample(self, query_emb: torch.Tensor, positive_ids: torch.Tensor | None = None) -> Negatives:
        q = check_queries(query_emb)
        pos = check_positives(positive_ids, q.shape[0])
        if self.calls % self.refresh_every == 0:
            self._choose_backend(q.shape[0])
            self.refresh()
        self.calls += 1
        if q.shape[0] == 0:
            return empty_negatives(q, self.k)
        assert self._index is not None
        ex = None if pos is None else pos.cpu().numpy()
        _, found = self._index.search(host_queries(q), self.skip + self.k, exclude=ex)
        ids = np.ascontiguousarray(found[:, self.skip :])
        return Negatives(
            ids=torch.from_numpy(ids).to(q.device),
            log_q=torch.full(ids.shape, -math.log(self.k), dtype=log_q_dtype(q), device=q.device),
        )


class NegativeCache:
    """Lindgren et al. 2021: softmax negatives over a FIFO cache of stale embeddings.

    The cache holds up to `cache_size` (id, embedding) entries on `device` (default: the
    initial vectors' device). `update(vectors, ids)` enqueues freshly encoded targets
    (e.g. the batch's positives and negatives, encoded anyway), evicting the oldest
    entries; an id already cached loses its old entry, so each id is cached once, at
    the back of the queue. The constructor enqueues `vectors, ids` in order (the last
    `cache_size` are kept). Both take (vectors, ids), as `TreeIndex.build` and `insert`
    do; the old (ids, vectors) order still works, with a DeprecationWarning.

    `sample` draws k ids per query with replacement from the softmax over the cached
    entries' scores <q, v> / temperature (the positive excluded): i.i.d. draws with an
    exact log-probability, which is what the loss's log(k · Q) correction needs. The
    paper's Gumbel-max draws the same distribution; drawing by inverse CDF (float64)
    costs one pass over the cache per query instead of one per draw. (Gumbel top-k
    would draw without replacement, whose inclusion probabilities have no closed form.)
    log_q is the log-softmax over the cache.
    """

    def __init__(
        self,
        vectors: Vectors,
        ids: Vectors,
        *,
        k: int,
        temperature: float,
        cache_size: int,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        self.k = check_k(k)
        self.temperature = check_temperature(temperature)
        self.cache_size = check_positive_int(cache_size, "cache_size")
        vectors, ids = vectors_then_ids(vectors, ids, "NegativeCache")
        v = _as_tensor(vectors, "vectors")
        self.device = torch.device(device) if device is not None else v.device
        self._ids = torch.full((self.cache_size,), -1, dtype=torch.int64, device=self.device)
        self._vecs = torch.zeros((self.cache_size, v.shape[1]), dtype=torch.float32, device=self.device)
        self._live = torch.zeros(self.cache_size, dtype=torch.bool, device=self.device)
        self._head = 0  # next slot written = the oldest entry once the cache is full
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(check_nonnegative_int(seed))
        self._enqueue(v, ids)

    @property
    def dim(self) -> int:
        return int(self._vecs.shape[1])

    def __len__(self) -> int:
        return int(self._live.sum())

    @property
    def nbytes(self) -> int:
        """Bytes held on the cache's device: ids, vectors and the live mask."""
        return sum(t.numel() * t.element_size() for t in (self._ids, self._vecs, self._live))

    @property
    def cached_ids(self) -> torch.Tensor:
        """The cached ids, oldest first."""
        order = (torch.arange(self.cache_size, device=self.device) + self._head) % self.cache_size
        return self._ids[order][self._live[order]]

    def update(self, vectors: Vectors, ids: Vectors) -> None:
        """Enqueue fresh (vector, id) pairs, evicting the oldest entries."""
        vectors, ids = vectors_then_ids(vectors, ids, "NegativeCache.update")
        self._enqueue(vectors, ids)

    def _enqueue(self, vectors: Vectors, ids: Vectors) -> None:
        v = _as_tensor(vectors, "vectors")
        idn = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids)
        if idn.ndim != 1 or not np.issubdtype(idn.dtype, np.integer):
            raise ValueError(f"ids: expected a 1-d integer array, got {idn.dtype} {idn.shape}")
        idn = idn.astype(np.int64)
        if idn.shape[0] != v.shape[0]:
            raise ValueError(f"update: {idn.shape[0]} ids but {v.shape[0]} vectors")
        if v.shape[1] != self.dim:
            raise ValueError(f"vectors: expected dimension {self.dim}, got {v.shape[1]}")
        # a repeated id keeps its last vector; only the newest cache_size survive anyway
        _, last = np.unique(idn[::-1], return_index=True)
        keep = np.sort(idn.shape[0] - 1 - last)[-self.cache_size :]
        idn = idn[keep]
        t_ids = torch.from_numpy(idn).to(self.device)
        self._live &= ~torch.isin(self._ids, t_ids)  # the stale copy of a re-encoded id goes
        slots = (self._head + torch.arange(idn.shape[0], device=self.device)) % self.cache_size
        self._ids[slots] = t_ids
        self._vecs[slots] = v[torch.from_numpy(keep).to(v.device)].to(self.device, torch.float32)
        self._live[slots] = True
        self._head = (self._head + idn.shape[0]) % self.cache_size

    def sample(self, query_emb: torch.Tensor, positive_ids: torch.Tensor | None = None) -> Negatives:
        q = check_queries(query_emb, self.dim)
        pos = check_positives(positive_ids, q.shape[0])
        B = q.shape[0]
        qc = q.to(self.device, torch.promote_types(q.dtype, torch.float32))
        s = (qc @ self._vecs.to(qc.dtype).T) / self.temperature
        allowed = self._live[None, :].expand(B, -1)
        if pos is not None:
            allowed = allowed & (self._ids[None, :] != pos.to(self.device)[:, None])
        if B and not allowed.any(1).all():
            b = int((~allowed.any(1)).nonzero()[0])
            raise ValueError(f"query {b}: no cached entry other than its positive")
        s = s.masked_fill(~allowed, -math.inf)
        logp = torch.log_softmax(s, dim=1)
        u = torch.rand((B, self.k), generator=self._gen, dtype=torch.float64, device=self.device)
        slot = _inverse_cdf(torch.exp(logp.double()), u) if B else u.long()
        return Negatives(ids=self._ids[slot].to(q.device), log_q=logp.gather(1, slot).to(q.device, log_q_dtype(q)))


class BruteForceSampler:
    """The oracle: exact softmax samples over ALL targets' fresh vectors, in torch.

    targets: the (N, d) vectors of `ids` (N ids; default 0..N-1), or a callable
    returning them, called on every `sample` (re-encode everything: the cost treeidx
    avoids). Runs on `device` (default: the vectors' device); scores in float32
    (float64 for float64 queries). Two passes over chunks of `chunk_size` targets keep
    memory at B × chunk_size: pass 1 the log-mass of each chunk (logsumexp), then each
    draw picks a chunk by its mass and an element within the chunk by its weight,
    both by inverse CDF in float64 (torch.multinomial sums float32 weights and drops
    tiny ones). exclude_positives: the positive's weight is 0 and log Z excludes it.
    log_q = s_y − log Z, the exact log-softmax.

    precision: ``"fp32"`` (default, as above), or the reduced-precision peer a user
    would try first (as `treeidx.brute.BruteForce`): ``"bf16"`` scores from a bfloat16
    product (queries and vectors rounded to bfloat16), ``"int8"`` from symmetric int8
    codes with one scale per vector and per query (exact integer products: int32 by
    `torch._int_mm` where the device has it, else float64). The draws then come from
    Q ∝ exp(s~ / temperature), **not the exact softmax**, and log_q is exact for Q (its
    log Z summed over all targets in the same passes), so the loss's correction stays
    consistent. `tv_to_exact` reports TV(Q, softmax). The reduced-precision copy of
    fixed `targets` is made once (again if the tensor is modified in place).
    temperature is the proposal's: it may differ from the loss's (log_q is always the
    distribution actually drawn from). false_negative_margin: also give weight 0 to
    every target y with <q, v_y> >= <q, v_pos> - margin (raw inner products; the
    positive must be one of `ids`), so log Z and log_q are over the remaining targets
    (the same filter as TreeNegativeSampler's).
    """

    def __init__(
        self,
        targets: Vectors | Callable[[], Vectors],
        ids: Vectors | None = None,
        *,
        k: int,
        temperature: float,
        chunk_size: int = 16384,
        device: torch.device | str | None = None,
        seed: int = 0,
        exclude_positives: bool = True,
        precision: str = "fp32",
        false_negative_margin: float | None = None,
    ) -> None:
        self.k = check_k(k)
        false_negative_margin = check_margin(false_negative_margin)
        if false_negative_margin is not None:
            if not exclude_positives:
                raise ValueError("false_negative_margin needs exclude_positives=True")
        self.false_negative_margin = false_negative_margin
        self.temperature = check_temperature(temperature)
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        self.exclude_positives = bool(exclude_positives)
        self.precision = check_precision(precision)
        self._encode = targets if callable(targets) else None
        self._vectors = None if callable(targets) else _as_tensor(targets, "targets")
        if ids is None:
            if self._vectors is None:
                raise ValueError("ids: required when targets is a callable")
            ids = np.arange(self._vectors.shape[0])
        self.ids = torch.from_numpy(as_ids(ids, None if self._vectors is None else self._vectors.shape[0]))
        self.device = torch.device(device) if device is not None else None
        self._seed = check_nonnegative_int(seed)
        self._gen: dict[torch.device, torch.Generator] = {}
        self._coded: tuple | None = None  # (key, reduced-precision targets) of fixed targets

    def _generator(self, dev: torch.device) -> torch.Generator:
        if dev not in self._gen:
            self._gen[dev] = torch.Generator(device=dev)
            self._gen[dev].manual_seed(self._seed)
        return self._gen[dev]

    def _targets(self) -> torch.Tensor:
        v = self._vectors if self._encode is None else _as_tensor(self._encode(), "targets()")
        if v.shape[0] != self.ids.shape[0]:
            raise ValueError(f"targets: expected {self.ids.shape[0]} rows (one per id), got {v.shape[0]}")
        return v

    def _reduced(self, v: torch.Tensor, dev: torch.device):
        """The targets at this precision on dev: bf16 vectors, or (int8 codes, scales)."""
        key = (id(v), v._version, dev)
        if self._encode is None and self._coded is not None and self._coded[0] == key:
            return self._coded[1]
        if self.precision == "bf16":
            out = v.to(dev, torch.bfloat16)
        else:
            out = _quantize_int8(v.to(dev))
        if self._encode is None:
            self._coded = (key, out)
        return out

    def _scorer(
        self,
        q: torch.Tensor,
        v: torch.Tensor,
        dev: torch.device,
        dt: torch.dtype,
        pos: torch.Tensor | None,
        precision: str,
        thr: torch.Tensor | None = None,
    ) -> Callable:
        """scores(rows, lo, hi): (len(rows), hi − lo) logits s / temperature at `precision`,
        positives (if excluded) at −inf, and so is every target whose raw score reaches its
        row's threshold `thr` (the false-negative filter)."""
        ids = self.ids.to(dev)
        pc = pos.to(dev) if (pos is not None and self.exclude_positives) else None
        T = self.temperature
        if precision == "fp32":
            qc = q.to(dev, dt)

            def raw(rows, lo, hi):
                return qc[rows] @ v[lo:hi].to(dev, dt).T
        elif precision == "bf16":
            qb, vb = q.to(dev, torch.bfloat16), self._reduced(v, dev)

            def raw(rows, lo, hi):
                return (qb[rows] @ vb[lo:hi].T).to(dt)
        else:
            (qi, qs), (vi, vs) = _quantize_int8(q.to(dev)), self._reduced(v, dev)
            qs, vs = qs.to(dt), vs.to(dt)

            def raw(rows, lo, hi):
                return _int8_products(qi[rows], vi[lo:hi]).to(dt) * qs[rows][:, None] * vs[lo:hi][None, :]

        def scores(rows: torch.Tensor | slice, lo: int, hi: int) -> torch.Tensor:
            r = raw(rows, lo, hi)
            s = r / T
            if pc is not None:
                s = s.masked_fill(ids[lo:hi][None, :] == pc[rows][:, None], -math.inf)
            if thr is not None:
                s = s.masked_fill(r >= thr[rows][:, None], -math.inf)
            return s

        return scores

    def sample(self, query_emb: torch.Tensor, positive_ids: torch.Tensor | None = None) -> Negatives:
        v = self._targets()
        N = self.ids.shape[0]
        q = check_queries(query_emb, v.shape[1])
        pos = check_positives(positive_ids, q.shape[0])
        dev = self.device or v.device
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        ids = self.ids.to(dev)
        pc = pos.to(dev) if (pos is not None and self.exclude_positives) else None
        B, C = q.shape[0], self.chunk_size
        chunks = [(lo, min(lo + C, N)) for lo in range(0, N, C)]
        thr = None
        if self.false_negative_margin is not None and pc is not None:
            qc = q.to(dev, dt)
            order = torch.argsort(ids)
            at = torch.searchsorted(ids[order], pc).clamp_max(N - 1)
            row = order[at]
            if not bool((ids[row] == pc).all()):
                raise ValueError("false_negative_margin: a positive id is not among the sampler's ids")
            thr = (qc * v[row.to(v.device)].to(dev, dt)).sum(1) - self.false_negative_margin  # (B,) raw-score threshold
        scores = self._scorer(q, v, dev, dt, pos, self.precision, thr)

        gen = self._generator(dev)
        u = torch.rand((2, B, self.k), generator=gen, dtype=torch.float64, device=dev)
        lse = torch.stack([torch.logsumexp(scores(slice(None), lo, hi), 1) for lo, hi in chunks], 1)
        log_z = torch.logsumexp(lse, 1)  # (B,)
        if B and not torch.isfinite(log_z).all():
            raise ValueError("a query has no target to sample (all excluded, or scores overflow)")
        which = _inverse_cdf(torch.exp(lse.double() - log_z.double()[:, None]), u[0])
        idx = torch.empty((B, self.k), dtype=torch.int64, device=dev)
        log_q = torch.empty((B, self.k), dtype=dt, device=dev)
        for c, (lo, hi) in enumerate(chunks):
            hit = which == c
            rows = hit.any(1).nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            s = scores(rows, lo, hi)  # second pass, only rows with a draw here
            j = _inverse_cdf(torch.exp(s.double() - lse[rows, c : c + 1].double()), u[1, rows])
            h = hit[rows]
            r, col = rows[h.nonzero()[:, 0]], h.nonzero()[:, 1]
            idx[r, col] = lo + j[h]
            log_q[r, col] = (s.gather(1, j) - log_z[rows][:, None])[h]
        return Negatives(ids=ids[idx].to(q.device), log_q=log_q.to(q.device, log_q_dtype(q)))

    def tv_to_exact(self, query_emb: torch.Tensor, positive_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) float64 on the queries' device: TV between the distribution `sample` draws
        from and the exact softmax (the fp32 scores, as precision="fp32" samples); 0 for fp32.

        Two chunked passes (both log Z, then the summed |P − Q|), in float64."""
        v = self._targets()
        N = self.ids.shape[0]
        q = check_queries(query_emb, v.shape[1])
        pos = check_positives(positive_ids, q.shape[0])
        dev = self.device or v.device
        if self.precision == "fp32" or q.shape[0] == 0:
            return torch.zeros(q.shape[0], dtype=torch.float64, device=q.device)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        exact = self._scorer(q, v, dev, dt, pos, "fp32")
        prop = self._scorer(q, v, dev, dt, pos, self.precision)
        chunks = [(lo, min(lo + self.chunk_size, N)) for lo in range(0, N, self.chunk_size)]
        every = slice(None)
        lz = [
            torch.logsumexp(torch.stack([torch.logsumexp(f(every, lo, hi).double(), 1) for lo, hi in chunks], 1), 1)
            for f in (exact, prop)
        ]
        tv = torch.zeros(q.shape[0], dtype=torch.float64, device=dev)
        for lo, hi in chunks:
            p = torch.exp(exact(every, lo, hi).double() - lz[0][:, None])
            r = torch.exp(prop(every, lo, hi).double() - lz[1][:, None])
            tv += (p - r).abs().sum(1)
        return (0.5 * tv).to(q.device)


def _quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 codes and float32 scales, as `treeidx.brute.quantize_int8`."""
    x = x.to(torch.float32)
    a = x.abs().amax(1)
    scale = torch.where(a > 0, a / 127, torch.ones_like(a))
    return torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def _int8_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact a @ b.T of int8 codes (R, d) × (C, d): int32 by torch._int_mm where the device
    and shapes allow, else float64 (exact: |sum| ≤ d · 127² < 2^53)."""
    try:
        return torch._int_mm(a, b.T)
    except (RuntimeError, NotImplementedError, AttributeError):
        return a.to(torch.float64) @ b.to(torch.float64).T


def _inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of float64 weights w (R, n) (not all 0), the index of each uniform in u (R, m)."""
    cdf = torch.cumsum(w, 1)
    j = torch.searchsorted(cdf, (u * cdf[:, -1:]).contiguous(), right=True)
    # u·total can round up to total: fall back to the last index with weight (never a 0 one)
    n = w.shape[1]
    last = n - 1 - torch.argmax(torch.flip(w > 0, [1]).to(torch.int8), 1)
    return torch.minimum(j, last[:, None])
