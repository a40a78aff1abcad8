"""SoftmaxSampler: exact or certified-approximate samples of P(y|q) ∝ exp(<q, y> / temperature).

How it works (docs/sampling.md). For each query the sampler keeps a
cut of the tree. Each node on the cut carries certified bounds n·e^{β lo} ≤ Z_v ≤
n·e^{β up} on its share of the partition function. The node with the largest gap
is refined (its children, or a leaf's exact scores, replace it) until a stopping
rule fires. Then:

* mode="exact": draw a node ∝ its upper bound, a uniform target below it, and
  accept with probability e^{β<q,y> - β up} (evaluated leaves are drawn by their
  exact weights). Accepted ids follow the softmax over the allowed ids exactly, for
  any cut; refinement only changes the speed. Refinement stops when the rejection
  draws it would save cost less than the refinement itself (cost-aware rule), or
  when U ≤ (1 + tolerance) L.
* mode="approx": no rejection. Unopened nodes are proposed by a second-moment
  estimate of their mass, clipped into their certified interval; refinement stops
  at `budget` inner products (or U ≤ (1 + tolerance) L). The returned log_q is the
  true log-probability of each id under that proposal, and `tv_bound` a certified
  upper bound on its total-variation distance to the softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._csr import permute_rows, slice_rows
from ._kernels.arrays import Csr
from ._kernels.bounds import dot_error, top_level_bounds
from ._kernels.frontier import (
    ALL_EXCLUDED,
    COLLAPSED,
    GAVE_UP,
    OK,
    ST_DOTS,
    ST_FRONTIER,
    ST_OPENED,
    ST_PROPOSALS,
    Params,
    log_gap,
    proposal_log_weight,
)
from ._kernels.sample import SampleOut, TopLevel, TrialOut, sample_batch, score_top_level, trial_batch
from ._threads import run_parallel
from ._validate import (
    as_exclude,
    as_vectors,
    check_k,
    check_number,
    check_positive,
    check_positive_int,
    check_score_range,
    check_seed,
)
from .brute import dense_softmax
from .tree import TreeIndex, locality_order


@dataclass(frozen=True)
class SampleResult:
    """What `SoftmaxSampler.sample` returns (arrays over B queries).

    ids:        (B, k) int64 sampled target ids, with replacement.
    log_q:      (B, k) float64 log-probability of each id under the distribution
                it was drawn from. Exact mode: β<q,y> − log Ẑ, the log-softmax over
                the allowed ids, where log Ẑ is the rejection-rate estimate of log Z
                clipped into the certified interval log_z (so its error is at most the
                interval's width). Approx mode: the proposal's true log-probability.
    log_z:      (B, 2) certified lower and upper bounds of log Z(q) over the allowed ids.
    tv_bound:   (B,) certified bound on the total-variation distance between the
                distribution sampled and the softmax (0 in exact mode).
    nodes_opened, inner_products, proposals: (B,) per-query work; proposals / k
                is the number of draws per accepted sample.
    frontier_size: (B,) entries on the final cut; 0 for a query answered by the
                exact dense fallback (see SoftmaxSampler's dense_fallback).
    """

    ids: np.ndarray
    log_q: np.ndarray
    log_z: np.ndarray
    tv_bound: np.ndarray
    nodes_opened: np.ndarray
    inner_products: np.ndarray
    proposals: np.ndarray
    frontier_size: np.ndarray

    @property
    def draws_per_sample(self) -> np.ndarray:
        return self.proposals / self.ids.shape[1]


@dataclass(frozen=True)
class Trials:
    """What `SoftmaxSampler.trials` returns (arrays over B queries).

    ids:      (B, c) int64 accepted ids; row b holds n[b] of them, the rest is padding.
    w:        (B, c) float64. Exact mode: β<q,y> of each accepted id; approx mode: its
              log-probability under this index's proposal.
    trial:    (B, c) int64 the trial (from 0) that accepted each id: the accepted ids of
              the first m' trials are those with trial < m'.
    n:        (B,) int64 accepted ids per query.
    log_env:  (B,) float64. Exact mode: the log of the rejection envelope's mass U, so
              that one trial is accepted with probability exactly Z / U (Z over this
              index's allowed ids). Approx mode: the log of the proposal's estimate of Z.
              -inf when no id of this index is allowed.
    log_z:    (B, 2) certified lower and upper bounds of log Z over this index's allowed ids.
    tv_bound, nodes_opened, inner_products, proposals, frontier_size: (B,) as in SampleResult.
    """

    ids: np.ndarray
    n: np.ndarray
    w: np.ndarray
    trial: np.ndarray
    log_env: np.ndarray
    log_z: np.ndarray
    tv_bound: np.ndarray
    nodes_opened: np.ndarray
    inner_products: np.ndarray
    proposals: np.ndarray
    frontier_size: np.ndarray


class SoftmaxSampler:
    """Samples target ids from the softmax of inner products over a TreeIndex.

    temperature: P(y|q) ∝ exp(<q, y> / temperature).
    mode: "exact" (rejection; exact distribution) or "approx" (hard work budget).
    tolerance: stop refining once U ≤ (1 + tolerance) · L.
    budget: cap on inner products per query spent refining (approx mode default
        0.15% of the index + 1024; exact mode default: none, the cost-aware rule decides).
    draw_cost: cost of one rejection draw in inner products (tunes the exact
        mode's stopping rule; the result's distribution does not depend on it).
    chunk_size: queries processed together (bounds the per-batch work arrays).
    dense_fallback: exact mode only. A query whose tree work (inner products in
        refinement and rejection draws together) reaches this fraction of the index
        is redone by one dense exact pass over all stored vectors (a BLAS product and
        float64 inverse-CDF draws, as `treeidx.brute`): when the bounds are too loose
        to prune (a flat softmax, high intrinsic dimension), exact mode then costs
        about what brute force does instead of many times more. Its samples are exact
        either way; its log_z interval is then the exact log Z padded by the float32
        rounding bound. None: never fall back.
    """

    def __init__(
        self,
        index: TreeIndex,
        *,
        temperature: float,
        mode: str = "exact",
        tolerance: float = 0.05,
        budget: int | None = None,
        draw_cost: float = 3.0,
        chunk_size: int = 1024,
        dense_fallback: float | None = 0.05,
    ):
        if not isinstance(index, TreeIndex):
            raise TypeError(f"index: expected a TreeIndex, got {type(index).__name__}")
        if mode not in ("exact", "approx"):
            raise ValueError(f"mode: expected 'exact' or 'approx', got {mode!r}")
        if budget is not None and (
            isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, np.integer)) or budget < 1
        ):
            raise ValueError(f"budget: expected a positive integer or None, got {budget!r}")
        self.index = index
        self.temperature = check_positive(temperature, "temperature")
        self.mode = mode
        self.tolerance = check_number(tolerance, "tolerance")
        self.budget = None if budget is None else int(budget)
        self.draw_cost = check_number(draw_cost, "draw_cost", strict=True)
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        self.dense_fallback = (
            None if dense_fallback is None else check_number(dense_fallback, "dense_fallback", strict=True)
        )

    @property
    def beta(self) -> float:
        return 1.0 / self.temperature

    def _budget(self) -> int:
        if self.budget is not None:
            return int(self.budget)
        if self.mode == "approx":
            # about where approx mode's TV meets the sampling-noise floor on clustered data at
            # perplexity <= 100 (bench/README.md); flatter softmaxes need a larger budget
            return int(0.0015 * len(self.index)) + 1024
        return np.iinfo(np.int64).max // 4

    def _give_up(self) -> int:
        """Exact-mode work (inner products) after which a query goes dense."""
        if self.mode != "exact" or self.dense_fallback is None:
            return np.iinfo(np.int64).max // 4
        return max(1, int(self.dense_fallback * len(self.index)))

    def __repr__(self) -> str:
        return (
            f"SoftmaxSampler(mode={self.mode!r}, temperature={self.temperature}, "
            f"tolerance={self.tolerance}, budget={self.budget}, index={self.index!r})"
        )

    def sample(self, queries, k: int, *, exclude=None, seed: int | None = None) -> SampleResult:
        """Draw k ids per query (with replacement). See SampleResult for the fields.

        queries: (B, d) or (d,), numpy or torch (any float dtype; bf16 is widened).
        exclude: None, or per query an id set never to return (e.g. the positive): a
        sequence of B iterables of ids, a (B, m) array, or a (B,) integer array of one id
        per query; unknown ids are ignored; a scalar raises TypeError; a query whose every
        id is excluded raises ValueError.
        seed: an integer in [0, 2**63), or None for a fresh one; the same seed gives the
        same samples whatever the number of threads.
        ValueError also when a query's norm times the largest stored norm could overflow
        float32, or makes float32 rounding alone decide the softmax (see
        `_validate.check_score_range`).
        """
        index = self.index
        q = as_vectors(queries, index.dim, "queries")
        k = check_k(k)
        seed = int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else check_seed(seed)
        if len(index) == 0:
            raise ValueError("the index is empty")
        ptr, ex_slots = self._excluded_slots(exclude, q.shape[0])
        allowed = len(index) - np.diff(ptr)  # excluded slots are distinct per query
        if (allowed < 1).any():
            b = int(np.flatnonzero(allowed < 1)[0])
            raise ValueError(f"query {b}: every target in the index is excluded; nothing to sample")
        check_score_range(q, float(index.view().arrays.nu_max[0]), "queries", beta=self.beta)
        B = q.shape[0]
        ids = np.empty((B, k), np.int64)
        log_q = np.empty((B, k), np.float64)
        log_z = np.empty((B, 2), np.float64)
        tv = np.empty(B, np.float64)
        stats = np.zeros((B, 5), np.int64)
        status = np.zeros(B, np.int64)
        # chunks bound the (chunk x top-level) work arrays; results do not depend on them
        for lo in range(0, B, self.chunk_size):
            hi = min(lo + self.chunk_size, B)
            sub_ptr, sub_ex = slice_rows(ptr, ex_slots, lo, hi)
            self._sample_chunk(
                q[lo:hi],
                np.arange(lo, hi),
                k,
                sub_ptr,
                sub_ex,
                seed,
                ids[lo:hi],
                log_q[lo:hi],
                log_z[lo:hi],
                tv[lo:hi],
                stats[lo:hi],
                status[lo:hi],
            )
        dense = np.flatnonzero(status == GAVE_UP)
        if dense.size:
            self._sample_dense(q, dense, k, ptr, ex_slots, seed, ids, log_q, log_z, tv, stats, status)
        if (status == ALL_EXCLUDED).any():
            b = int(np.flatnonzero(status == ALL_EXCLUDED)[0])
            raise ValueError(f"query {b}: every target in the index is excluded; nothing to sample")
        if (status == COLLAPSED).any():
            b = int(np.flatnonzero(status == COLLAPSED)[0])
            hint = (
                "raise `budget` or leave it None: a small exact-mode budget leaves the bounds too loose for rejection"
                if self.mode == "exact" and self.budget is not None
                else "the bounds are too loose for rejection; keep dense_fallback set"
                if self.mode == "exact"
                else "this should not happen in approx mode; please report it"
            )
            raise RuntimeError(
                f"query {b}: sampling stalled ({self.mode} mode): fewer than k={k} of "
                f"{1000 * k + 100000} proposals were accepted; {hint}"
            )
        return SampleResult(
            ids=ids,
            log_q=log_q,
            log_z=log_z,
            tv_bound=tv,
            nodes_opened=stats[:, ST_OPENED],
            inner_products=stats[:, ST_DOTS],
            proposals=stats[:, ST_PROPOSALS],
            frontier_size=stats[:, ST_FRONTIER],
        )

    def _sample_chunk(self, q, qidx, k, ptr, ex_slots, seed, ids, log_q, log_z, tv, stats, status):
        A, q, qidx, top_nodes, tops, params, excl, order = self._plan_chunk(q, qidx, k, ptr, ex_slots)
        out = SampleOut(*(np.empty_like(a) for a in (ids, log_q, log_z, tv, stats, status)))
        run_parallel(sample_batch, A, q, qidx, top_nodes, tops, params, seed, excl, out)
        for dst, src in zip((ids, log_q, log_z, tv, stats, status), out):
            dst[order] = src

    def _plan_chunk(self, q, qidx, k, ptr, ex_slots):
        """What the kernels take for a chunk of queries, in locality order (`order`)."""
        view = self.index.view()
        A, top_nodes, top_centers, top_region = view.arrays, view.top_nodes, view.top_centers, view.top_region
        top_dots = np.empty((q.shape[0], top_centers.shape[0]), np.float32)
        run_parallel(score_top_level, q, top_centers, top_dots)
        # region by region, so consecutive queries on a thread share cached leaves
        order = locality_order(top_dots, top_region)
        q, top_dots = q[order], top_dots[order]
        ptr, ex_slots = permute_rows(ptr, ex_slots, order)
        tops = self._top_level_entries(A, q, top_dots, top_nodes)
        params = Params(
            beta=self.beta,
            k=k,
            exact=self.mode == "exact",
            tol=self.tolerance,
            budget=self._budget(),
            draw_cost=self.draw_cost,
            give_up=self._give_up(),
        )
        return A, q, qidx[order], top_nodes, tops, params, Csr(ptr, ex_slots), order

    def _sample_dense(self, q, rows, k, ptr, ex_slots, seed, ids, log_q, log_z, tv, stats, status):
        """Exact samples for queries `rows` by one dense pass over the slot array."""
        view = self.index.view()
        sub_ptr, sub_ex = permute_rows(ptr, ex_slots, rows)
        n_allowed = len(self.index) - np.array([np.unique(sub_ex[a:b]).size for a, b in zip(sub_ptr[:-1], sub_ptr[1:])])
        if (n_allowed == 0).any():
            status[rows[n_allowed == 0]] = ALL_EXCLUDED
            return
        # each query's uniforms keyed by its own index: independent of which rows go dense
        u = np.stack([np.random.default_rng([seed, int(b)]).random(k) for b in rows])
        idx, logp, logz, pad = self._dense_pass(q[rows], rows, sub_ptr, sub_ex, u)
        ids[rows] = view.arrays.slot_id[idx]
        log_q[rows] = logp
        log_z[rows] = np.stack([logz - pad, logz + pad], 1)
        tv[rows] = 0.0  # exact draws
        stats[rows, ST_DOTS] += view.n_slots
        stats[rows, ST_PROPOSALS] = k
        stats[rows, ST_FRONTIER] = 0
        status[rows] = OK

    def _dense_pass(self, qr, rows, sub_ptr, sub_ex, u):
        """Inverse-CDF draws for uniforms u over all stored vectors (`brute.dense_softmax`);
        returns (slot index, log P, exact log Z of the float32 scores, its rounding pad)."""
        index, view = self.index, self.index.view()
        A, n_slots = view.arrays, view.n_slots
        # 64 rows keep BLAS efficient at a quarter of BruteForce's 256-row buffer (256 MB at 1M)
        buf = np.empty((min(rows.size, 64), n_slots), np.float32)
        idx, logp, logz, bad = dense_softmax(
            qr, A.vecs, self.beta, u, sub_ptr, sub_ex, buf, dead=np.flatnonzero(A.slot_leaf < 0)
        )
        if bad >= 0:
            raise ValueError(
                f"query {int(rows[bad])}: scores are not finite (vector/query norms too large for float32)"
            )
        # the exact log Z of the float32 scores, padded by their rounding bound
        qn = np.linalg.norm(qr.astype(np.float64), axis=1)
        pad = self.beta * np.array([dot_error(index.dim, float(n), float(A.nu_max[0])) for n in qn])
        return idx, logp, logz, pad

    def trials(self, queries, m, *, k: int = 1, exclude=None, seed: int | None = None) -> Trials:
        """Independent rejection trials per query: the building block of a sampler spread
        over several indexes (`treeidx.distributed`). See Trials for the fields.

        m: trials per query (an integer, or one per query; 0 gives the envelopes only;
        -1: as many as this index alone needs for k accepted ids with high probability,
        from its certified acceptance rate L / U, stopping early once 6x that many ids
        were accepted; `proposals` says how many were run).
        Exact mode: m[b] trials against query b's refined cut, each accepted with
        probability exactly Z_b / e^log_env[b]; accepted ids follow the softmax over this
        index's allowed ids. Approx mode: m[b] draws from the proposal.
        k: the samples the refinement plans for (its cost-aware stopping rule). The cut,
        and with it log_env and log_z, depends on queries, exclude and k only, never on m
        or seed: a caller can ask for the envelopes first (m=0) and then for the trials.
        A query that exact mode's dense fallback takes gets log_env = its exact log Z, and
        every trial accepted (inverse-CDF draws over the stored vectors).
        Unlike `sample`, an empty index, or a query whose every id here is excluded, is
        not an error: its log_env and log_z are -inf and it gets no trials.
        """
        index = self.index
        q = as_vectors(queries, index.dim, "queries", allow_empty=True)
        B = q.shape[0]
        m_arr = np.asarray(m)
        if m_arr.dtype.kind not in "iu" or m_arr.ndim > 1 or (m_arr.ndim == 1 and m_arr.shape[0] != B):
            raise ValueError(f"m: expected an integer or {B} integers, got {m!r}")
        m_arr = np.broadcast_to(m_arr.astype(np.int64), (B,))
        if (m_arr < -1).any():
            raise ValueError(f"m: expected integers >= -1, got {int(m_arr.min())}")
        k = check_k(k)
        seed = int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else check_seed(seed)
        # "auto" rows store up to 6x (exact) the accepted ids k needs with high probability
        auto_cap = int(np.ceil((6.0 if self.mode == "exact" else 1.25) * (k + 3 * np.sqrt(k) + 3))) + 16
        cap = max(1, int(m_arr.max()) if B else 1, auto_cap if (m_arr < 0).any() else 1)
        out = TrialOut(
            np.zeros((B, cap), np.int64),
            np.zeros((B, cap), np.float64),
            np.zeros((B, cap), np.int64),
            np.zeros(B, np.int64),
            np.full(B, -np.inf),
            np.full((B, 2), -np.inf),
            np.zeros(B, np.float64),
            np.zeros((B, 5), np.int64),
            np.zeros(B, np.int64),
        )
        ptr, ex_slots = self._excluded_slots(exclude, B)
        rows = np.flatnonzero(len(index) - np.diff(ptr) >= 1)  # excluded slots are distinct per query
        if rows.size:
            check_score_range(q, float(index.view().arrays.nu_max[0]), "queries", beta=self.beta)
        for lo in range(0, rows.size, self.chunk_size):
            r = rows[lo : lo + self.chunk_size]
            sub_ptr, sub_ex = permute_rows(ptr, ex_slots, r)
            A, qs, qidx, top_nodes, tops, params, excl, order = self._plan_chunk(q[r], r, k, sub_ptr, sub_ex)
            part = TrialOut(*(np.empty_like(a[r]) for a in out))
            run_parallel(trial_batch, A, qs, qidx, top_nodes, tops, params, seed, excl, m_arr[qidx], part)
            for dst, src in zip(out, part):
                dst[r[order]] = src
        dense = np.flatnonzero(out.status == GAVE_UP)
        if dense.size:
            self._trials_dense(q, dense, m_arr, k, ptr, ex_slots, seed, out)
        if (out.status == COLLAPSED).any():
            b = int(np.flatnonzero(out.status == COLLAPSED)[0])
            raise RuntimeError(f"query {b}: sampling stalled ({self.mode} mode): the bounds are too loose")
        return Trials(
            ids=out.ids,
            w=out.w,
            trial=out.trial,
            n=out.n,
            log_env=out.log_env,
            log_z=out.log_z,
            tv_bound=out.tv,
            nodes_opened=out.stats[:, ST_OPENED],
            inner_products=out.stats[:, ST_DOTS],
            proposals=out.stats[:, ST_PROPOSALS],
            frontier_size=out.stats[:, ST_FRONTIER],
        )

    def _trials_dense(self, q, rows, m, k, ptr, ex_slots, seed, out):
        """Dense-fallback rows of `trials`: the envelope is the exact Z, so every trial is
        accepted, an inverse-CDF draw over the stored vectors."""
        view = self.index.view()
        sub_ptr, sub_ex = permute_rows(ptr, ex_slots, rows)
        auto = min(out.ids.shape[1], int(np.ceil(1.25 * (k + 3 * np.sqrt(k) + 3))) + 16)
        mr = np.where(m[rows] < 0, auto, m[rows])
        width = max(1, int(mr.max()))
        u = np.stack([np.random.default_rng([seed, int(b)]).random(width) for b in rows])
        idx, logp, logz, pad = self._dense_pass(q[rows], rows, sub_ptr, sub_ex, u)
        mask = np.arange(width)[None, :] < mr[:, None]
        out.ids[rows, :width] = np.where(mask, view.arrays.slot_id[idx], 0)
        out.w[rows, :width] = np.where(mask, logp + logz[:, None], 0.0)
        out.trial[rows, :width] = np.arange(width)[None, :]
        out.n[rows] = mr
        out.log_env[rows] = logz
        out.log_z[rows] = np.stack([logz - pad, logz + pad], 1)
        out.stats[rows, ST_DOTS] += view.n_slots
        out.stats[rows, ST_PROPOSALS] = mr
        out.stats[rows, ST_FRONTIER] = 0
        out.status[rows] = OK

    def _top_level_entries(self, A, q: np.ndarray, top_dots: np.ndarray, top_nodes: np.ndarray):
        """Frontier entries of the top level for the whole batch, vectorised.

        Bounds come from the same kernel as everywhere (`node_bounds`); the log-space
        algebra on them is done by numpy in bulk rather than per query and node.
        """
        beta = self.beta
        blo = np.empty(top_dots.shape, np.float64)
        bup = np.empty(top_dots.shape, np.float64)
        run_parallel(top_level_bounds, A, q, top_dots, top_nodes, blo, bup)
        lc = np.log(A.count[top_nodes].astype(np.float64))
        flo = lc + beta * blo
        fup = lc + beta * bup
        qn2 = np.einsum("ij,ij->i", q, q, dtype=np.float64)[:, None]
        msd = A.sqsum[top_nodes] / A.count[top_nodes]
        # the kernels' own formulas (numpy ufuncs inside), evaluated on whole arrays
        w = proposal_log_weight.py_func(lc, beta, top_dots, qn2, msd, q.shape[1], flo, fup)
        # exact mode refines where the envelope wastes most; approx mode the largest mass
        prio = log_gap.py_func(flo, fup) if self.mode == "exact" else w
        # shifted weights, exponentiated here in bulk rather than per query in the kernel
        shift = fup.max(axis=1)
        eu, el, ew = (np.exp(a - shift[:, None]) for a in (fup, flo, w))
        return TopLevel(blo, bup, flo, fup, w, prio, eu, el, ew, shift)

    def log_partition(self, queries, *, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """Certified (lower, upper) bounds of log Z(q) for each query."""
        r = self.sample(queries, 1, exclude=exclude, seed=0)
        return r.log_z[:, 0].copy(), r.log_z[:, 1].copy()

    def _excluded_slots(self, exclude, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-query CSR of the slots of excluded ids that are in the index."""
        ptr, ex = as_exclude(exclude, n_queries)
        if ex.size == 0:
            return ptr, ex
        view = self.index.view()
        keys = view.keys
        pos = np.minimum(np.searchsorted(keys, ex), max(keys.size - 1, 0))
        present = keys[pos] == ex if keys.size else np.zeros(ex.shape, bool)
        rows = np.repeat(np.arange(n_queries), np.diff(ptr))[present]
        slots = view.key_slot[pos[present]]
        new_ptr = np.zeros(n_queries + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=n_queries), out=new_ptr[1:])
        return new_ptr, slots.astype(np.int64)
