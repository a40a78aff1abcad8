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
  true log-probability of each id under that proposal, `tv_bound` a certified
  upper bound on its total-variation distance to the softmax, and `tv_estimate` an
  estimate of that distance from a few extra exactly-scored draws (`tv_draws`).
  With `target_tv`, queries whose estimate is above it are redone with a budget
  four times larger, up to `max_budget`.
"""

from __future__ import annotations

import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ._csr import permute_rows, slice_rows
from ._kernels.arrays import Csr
from ._kernels.bounds import dot_error, level_bounds, top_level_bounds
from ._kernels.dense import LOGZ_ERR
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
)
from ._kernels.sample import SampleOut, TopLevel, TrialOut, sample_batch, score_top_level, trial_batch
from ._threads import run_parallel
from ._validate import (
    as_exclude,
    as_vectors,
    check_bool,
    check_int,
    check_k,
    check_number,
    check_positive,
    check_positive_int,
    check_score_range,
    check_seed,
)
from .blocks import (
    cost_rule_work,
    level_nodes,
    level_of,
    node_log_masses,
    rejection_draws,
    sample_blocks,
    sample_blocks_exact,
)
from .brute import BF16_MIN_DIM, Bf16Codes, buffer_rows, certified_softmax, dense_softmax, native_bf16
from .tree import TreeIndex, locality_order

# bfloat16 codes per index, shared by its samplers: (index version, codes)
_CODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CODES_LOCK = threading.Lock()
_LEVEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # plan_level's cache


def index_codes(index: TreeIndex) -> Bf16Codes:
    """The bfloat16 codes of an index's slot array, built on first use and again after
    every write to the index (one pass over the vectors); shared by its samplers."""
    with _CODES_LOCK:
        got = _CODES.get(index)
        if got is None or got[0] != index.version:
            version, A = index.version, index.view().arrays
            got = (version, Bf16Codes.from_vectors(A.vecs, alive=A.slot_leaf >= 0))
            _CODES[index] = got
        return got[1]


def plan_level(index: TreeIndex) -> tuple[np.ndarray, np.ndarray]:
    """The nodes the plan bounds (the children of the root's children: the ~2 sqrt(N)
    top-level clusters; a leaf stands for itself) and their centers, contiguous; cached
    per index version."""
    with _CODES_LOCK:
        got = _LEVEL.get(index)
        if got is None or got[0] != index.version:
            view = index.view()
            nodes = level_nodes(view)
            got = (index.version, nodes, np.ascontiguousarray(view.arrays.center[nodes]))
            _LEVEL[index] = got
        return got[1], got[2]


# Queries per block of the dense pass: BruteForce's buffer policy (`buffer_rows`: up to
# 256 rows, fewer to hold the kept rows x N buffer near 1 GB), whose sgemm it matches, but
# never below DENSE_MIN_ROWS (64 rows made the float32 product ~1.2-1.8x slower per query
# on 1M x 64).
DENSE_MIN_ROWS = 32


def dense_rows(n_queries: int, n_targets: int, itemsize: int) -> int:
    """Queries per block of the dense pass for n_targets scores of itemsize bytes each."""
    return buffer_rows(n_queries, n_targets, itemsize, DENSE_MIN_ROWS)


# Exact mode's plan: a query whose predicted tree work exceeds PLAN_RATIO x N goes dense.
# The tree spends ~50-100 ns per target it evaluates (a scattered read, an exp, the
# frontier's bookkeeping) against a few ns per target for the dense pass (bench/README.md).
PLAN_RATIO = 0.03


def plan_work(
    bup: np.ndarray, eu: np.ndarray, el: np.ndarray, ew: np.ndarray, counts: np.ndarray, k: int, draw_cost: float
) -> np.ndarray:
    """Predicted exact-mode tree work (inner products) per query, from the bounds of one
    level of nodes (the sampler uses the ~2 sqrt(N) top-level clusters).

    bup: (B, K) upper bounds of the score below each node; eu, el, ew: (B, K) each node's
    upper, lower and estimated mass (the approx-mode weight), under one shift per row;
    counts: (K,) targets per node. A node is opened whole when the rejection draws it
    would otherwise cost (`treeidx.blocks.rejection_draws`) reach its targets (the exact
    mode's cost-aware rule, one level at once), and the predicted work is the opened
    targets plus the draws against the rest. Pessimistic where bounds tighten below the
    level (the tree opens nodes partially), and cheap: a few array operations per query,
    depending on that query alone.
    """
    counts = np.asarray(counts, np.float64)[None, :]
    draws = rejection_draws(eu, el, ew, k, draw_cost)
    return cost_rule_work(draws >= counts, counts, draws)


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
                distribution sampled and the softmax (0 in exact mode). Often near 1
                on real embeddings, where the node bounds are loose.
    nodes_opened, inner_products, proposals: (B,) per-query work; proposals / k
                is the number of draws per accepted sample. inner_products counts all
                of a query's work: the TV estimate's draws, and with `target_tv` every
                budget it was sampled at.
    frontier_size: (B,) entries on the final cut; 0 for a query answered by a
                dense pass (the plan's choice, or the dense_fallback give-up).
    tv_estimate: (B,) approx mode: an estimate of the same total-variation distance,
                from `tv_draws` extra draws scored exactly; biased upward by design,
                never above tv_bound (docs/sampling.md, "Reading tv_estimate"). NaN
                when tv_draws=0. Exact mode: 0.
    """

    ids: np.ndarray
    log_q: np.ndarray
    log_z: np.ndarray
    tv_bound: np.ndarray
    nodes_opened: np.ndarray
    inner_products: np.ndarray
    proposals: np.ndarray
    frontier_size: np.ndarray
    tv_estimate: np.ndarray | None = field(default=None)

    @property
    def draws_per_sample(self) -> np.ndarray:
        return self.proposals / self.ids.shape[1]


@dataclass(frozen=True)
class PlanComparison:
    """What `SoftmaxSampler.compare_plans` returns: exact mode's plans timed on the
    caller's queries (arrays over B queries).

    ms_per_query:   {"tree", "dense", "auto"}: milliseconds per query of `sample` with
                    that plan (the fastest of `repeats` calls), everything else as set.
    tree_work:      (B,) inner products each query spent with plan="tree".
    tree_gave_up:   (B,) whether the query reached the dense_fallback give-up under
                    plan="tree" (its tree work was wasted and the dense pass answered).
    predicted_work: (B,) the plan's prediction of the tree work (`predicted_work`).
    auto_dense_share: share of the queries plan="auto" answered by the dense pass.
    best_plan:      "tree" or "dense", whichever was faster on these queries: pass it as
                    `plan` (or keep "auto" when ms_per_query["auto"] is as fast).
    """

    ms_per_query: dict[str, float]
    tree_work: np.ndarray
    tree_gave_up: np.ndarray
    predicted_work: np.ndarray
    auto_dense_share: float
    best_plan: str


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


class _Chunk(NamedTuple):
    """A chunk of queries ready for the tree kernels, and the plan's verdict on it."""

    A: object  # TreeArrays
    q: np.ndarray  # the queries the tree takes, in locality order
    qidx: np.ndarray  # their indexes in the caller's batch (the random keys)
    top_nodes: np.ndarray
    tops: TopLevel
    params: Params
    excl: Csr
    order: np.ndarray  # chunk row of each tree query
    dense_rows: np.ndarray  # chunk rows the plan sends straight to the dense pass
    plan_dots: int  # inner products the plan spent per query


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
    dense_fallback: exact mode only, the safety net behind `plan`. A query the plan
        kept in the tree whose tree work (inner products in refinement and rejection
        draws together) reaches this fraction of the index is redone by the dense pass
        (see `dense_precision`): when the bounds are too loose to prune (a flat softmax,
        high intrinsic dimension), exact mode then costs about what brute force does
        instead of many times more. Its samples are exact either way; its log_z
        interval is then certified by the dense pass. None: never go dense (neither
        give up nor plan dense), unless plan="dense".
    plan: exact mode only, which queries skip the tree before any tree work.
        "auto" (default): per query, from its bounds on the ~2 sqrt(N) top-level
        clusters, the tree's work is predicted (`plan_work`, `predicted_work`); above
        `plan_ratio` · N the query goes to the dense pass. "tree": never (the
        dense_fallback give-up still applies). "dense": every query. The choice depends
        on the query alone, never on the batch, its order or the thread count. The
        prediction is pessimistic, far more so as N grows: on large indexes with a
        concentrated softmax "auto" goes dense where "tree" is several times faster
        (docs/sampling.md, "Predicting the tree's work"): `compare_plans` times the
        plans on your own queries and says which pays.
    plan_ratio: the tree-work share of N above which "auto" goes dense (about the ratio
        of a dense pass's cost per target to the tree's).
    dense_precision: how the dense pass scores the targets. "bf16": bfloat16 codes of
        the stored vectors (torch; built on first use, rebuilt when the index changes,
        2 bytes per coordinate) propose, and certified rejection against the float32
        scores keeps the draws exact (`BruteForce.sample_certified`); "fp32": the
        float32 product. "auto" (default): bf16 where torch is installed, the CPU has
        native bfloat16 products (AVX512-BF16 or AMX) and d >= 128 (below that the bf16
        product does not beat the float32 sgemm), else fp32.
    tv_draws: approx mode: targets drawn from the unopened part of each query's cut
        and scored exactly (one inner product each, counted in inner_products) to
        estimate the proposal's TV to the softmax (`SampleResult.tv_estimate`; one
        query's spread about 0.01-0.02 at 256 on clustered data, 0.08 on real
        embeddings at high perplexity, see docs/sampling.md); 0 skips the estimate
        (tv_estimate is NaN).
    target_tv: approx mode: a query whose tv_estimate is above this value is redone
        with a budget four times larger, until its estimate is at most target_tv or
        its budget reaches max_budget. Only those queries are redone; the samples
        returned are those of the last budget. None: one budget for every query.
    max_budget: the cap of target_tv's budget growth, in inner products (default:
        25% of the index, at least `budget`). Refinement also stops at `tolerance`, so
        a target_tv below about `tolerance` needs a smaller tolerance to be reached.
    batched: False (default): a frontier per query, refined node by node. True: the
        queries of a call are sampled together (`treeidx.blocks`, docs/sampling.md,
        "Batched mode"): each query opens whole top-level clusters (~2 sqrt(N) of
        them), and every cluster any query opened is scored once for all of them as
        one dense product. Approx mode opens clusters in decreasing estimated mass
        until `budget` (`tolerance` does not apply); exact mode opens those whose
        rejection draws would cost more than scoring them, and draws from the rest by
        rejection against their certified bounds (`plan`, `plan_ratio` and
        `dense_fallback` send a query to the dense pass as before). Coarser cuts, far
        less work per target: the choice for real embeddings at training
        temperatures, whose mass is spread over many clusters (bench/README.md).
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
        plan: str = "auto",
        plan_ratio: float = PLAN_RATIO,
        dense_precision: str = "auto",
        tv_draws: int = 256,
        target_tv: float | None = None,
        max_budget: int | None = None,
        batched: bool = False,
        block_size: int | None = None,
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
        self.tv_draws = check_int(tv_draws, "tv_draws", minimum=0)
        if target_tv is not None:
            if mode != "approx":
                raise ValueError("target_tv: approx mode only (exact mode's draws are exact: its TV is 0)")
            target_tv = check_number(target_tv, "target_tv", strict=True)
            if target_tv >= 1.0:
                raise ValueError(f"target_tv: expected a number in (0, 1), got {target_tv!r}")
            if self.tv_draws < 2:
                raise ValueError(f"target_tv needs tv_draws >= 2 to estimate the TV, got tv_draws={tv_draws!r}")
        if max_budget is not None:
            if target_tv is None:
                raise ValueError("max_budget caps target_tv's budget growth: set target_tv too")
            max_budget = check_positive_int(max_budget, "max_budget")
        self.target_tv = target_tv
        self.max_budget = max_budget
        self.batched = check_bool(batched, "batched")
        self.block_size = 0 if block_size is None else check_positive_int(block_size, "block_size")
        if plan not in ("auto", "tree", "dense"):
            raise ValueError(f"plan: expected 'auto', 'tree' or 'dense', got {plan!r}")
        self.plan = plan
        self.plan_ratio = check_number(plan_ratio, "plan_ratio", strict=True)
        if dense_precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"dense_precision: expected 'auto', 'fp32' or 'bf16', got {dense_precision!r}")
        self.dense_precision = dense_precision
        self._buf: np.ndarray | None = None  # the dense pass's score buffer (bytes)
        self._buf_lock = threading.Lock()

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

    def _max_budget(self) -> int:
        """The cap of target_tv's budget growth."""
        cap = self.max_budget if self.max_budget is not None else int(0.25 * len(self.index))
        return max(cap, self._budget())

    def _give_up(self) -> int:
        """Exact-mode work (inner products) after which a query goes dense."""
        if self.mode != "exact" or self.dense_fallback is None:
            return np.iinfo(np.int64).max // 4
        return max(1, int(self.dense_fallback * len(self.index)))

    def __repr__(self) -> str:
        return (
            f"SoftmaxSampler(mode={self.mode!r}, temperature={self.temperature}, "
            f"tolerance={self.tolerance}, budget={self.budget}"
            + (f", target_tv={self.target_tv}, max_budget={self.max_budget}" if self.target_tv is not None else "")
            + f", index={self.index!r})"
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
        tv_est = np.empty(B, np.float64)
        stats = np.zeros((B, 5), np.int64)
        status = np.zeros(B, np.int64)
        outs = (ids, log_q, log_z, tv, stats, status, tv_est)
        if self.batched:
            self._sample_batched(q, k, ptr, ex_slots, seed, outs)
        else:
            self._sample_frontier(q, k, ptr, ex_slots, seed, outs)
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
            tv_estimate=tv_est,
        )

    def _sample_batched(self, q, k, ptr, ex_slots, seed, outs) -> None:
        """batched=True (`treeidx.blocks`): exact mode by rejection against the block
        envelope, with the dense pass for the queries planned there or whose envelope is
        too loose; approx mode with target_tv's budget growth."""
        ids, log_q, log_z, tv, stats, status, tv_est = outs
        B = q.shape[0]
        slot_id = self.index.view().arrays.slot_id
        K = level_of(self.index, self.block_size).nodes.size
        if self.mode == "exact":
            plan_ratio = None if (self.plan == "tree" or self.dense_fallback is None) else self.plan_ratio
            if self.plan == "dense":
                plan_ratio = 0.0
            res = sample_blocks_exact(
                self.index,
                q,
                np.arange(B),
                k,
                beta=self.beta,
                draw_cost=self.draw_cost,
                plan_ratio=plan_ratio,
                seed=seed,
                ptr=ptr,
                ex_slots=ex_slots,
                block_size=self.block_size,
            )
            ids[:], log_q[:], log_z[:] = slot_id[res.slots], res.log_q, res.log_z
            tv[:], tv_est[:] = 0.0, 0.0
            stats[:, ST_OPENED], stats[:, ST_DOTS], stats[:, ST_PROPOSALS] = res.opened, res.dots, res.proposals
            stats[:, ST_FRONTIER] = K
            status[:] = OK
            dense = np.flatnonzero(res.dense)
            if dense.size:
                if self.dense_fallback is None and self.plan != "dense":
                    status[dense] = COLLAPSED
                else:
                    stats[dense, ST_PROPOSALS] = 0
                    self._sample_dense(q, dense, k, ptr, ex_slots, seed, ids, log_q, log_z, tv, stats, status)
            return

        def blocks(rows: np.ndarray, budget: int):
            sub_ptr, sub_ex = permute_rows(ptr, ex_slots, rows)
            return sample_blocks(
                self.index, q[rows], rows, k, beta=self.beta, budget=budget, tv_draws=self.tv_draws, seed=seed,
                ptr=sub_ptr, ex_slots=sub_ex, block_size=self.block_size,
            )  # fmt: skip

        rows = np.arange(B)
        budget = self._budget()
        res = blocks(rows, budget)
        dots = res.dots.copy()
        target = self.target_tv
        redo = res.tv_estimate > target if target is not None else np.zeros(B, bool)
        while redo.any() and budget < self._max_budget():
            rows = rows[redo]
            budget = min(4 * budget, self._max_budget())
            new = blocks(rows, budget)
            for name in ("slots", "log_q", "log_z", "tv_bound", "tv_estimate", "opened"):
                getattr(res, name)[rows] = getattr(new, name)
            dots[rows] += new.dots
            redo = new.tv_estimate > target
        ids[:], log_q[:], log_z[:], tv[:], tv_est[:] = (
            slot_id[res.slots],
            res.log_q,
            res.log_z,
            res.tv_bound,
            res.tv_estimate,
        )
        stats[:, ST_OPENED], stats[:, ST_DOTS], stats[:, ST_PROPOSALS] = res.opened, dots, k
        stats[:, ST_FRONTIER] = K
        status[:] = OK

    def _sample_frontier(self, q, k, ptr, ex_slots, seed, outs) -> None:
        """batched=False: a frontier per query (the kernels of _kernels/sample.py), the
        dense pass for the queries it gives up on, then target_tv's budget growth."""
        ids, log_q, log_z, tv, stats, status, tv_est = outs
        B = q.shape[0]
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
                tv_est=tv_est[lo:hi],
            )
        dense = np.flatnonzero(status == GAVE_UP)
        if dense.size:
            self._sample_dense(q, dense, k, ptr, ex_slots, seed, ids, log_q, log_z, tv, stats, status)
            tv_est[dense] = 0.0  # exact draws
        if self.target_tv is not None:
            self._meet_target_tv(q, k, ptr, ex_slots, seed, outs)

    def _meet_target_tv(self, q, k, ptr, ex_slots, seed, outs) -> None:
        """Redo the queries whose tv_estimate is above target_tv at a budget four times
        larger, until none is or the budget reaches the cap. A redone query keeps its
        random key (its index), so the result is the same whatever else is redone; its
        work (nodes opened, inner products) adds up over the budgets it was sampled at."""
        ids, log_q, log_z, tv, stats, status, tv_est = outs
        budget, cap = self._budget(), self._max_budget()
        while budget < cap:
            rows = np.flatnonzero((status == OK) & (tv_est > self.target_tv))
            if rows.size == 0:
                return
            budget = min(cap, 4 * budget)
            sub_ptr, sub_ex = permute_rows(ptr, ex_slots, rows)
            new = (
                np.empty((rows.size, k), np.int64),
                np.empty((rows.size, k), np.float64),
                np.empty((rows.size, 2), np.float64),
                np.empty(rows.size, np.float64),
                np.zeros((rows.size, 5), np.int64),
                np.zeros(rows.size, np.int64),
                np.empty(rows.size, np.float64),
            )
            for lo in range(0, rows.size, self.chunk_size):
                hi = min(lo + self.chunk_size, rows.size)
                c_ptr, c_ex = slice_rows(sub_ptr, sub_ex, lo, hi)
                self._sample_chunk(
                    q[rows[lo:hi]],
                    rows[lo:hi],
                    k,
                    c_ptr,
                    c_ex,
                    seed,
                    *(a[lo:hi] for a in new[:6]),
                    tv_est=new[6][lo:hi],
                    budget=budget,
                )
            work = stats[rows][:, [ST_OPENED, ST_DOTS]]
            for dst, src in zip(outs, new):
                dst[rows] = src
            stats[rows[:, None], [ST_OPENED, ST_DOTS]] += work

    def _sample_chunk(
        self, q, qidx, k, ptr, ex_slots, seed, ids, log_q, log_z, tv, stats, status, *, tv_est=None, budget=None
    ):
        if tv_est is None:
            tv_est = np.empty_like(tv)
        c = self._plan_chunk(q, qidx, k, ptr, ex_slots, budget=budget)
        if c.dense_rows.size:
            # planned dense: no tree work beyond the top level and the plan; the dense pass follows
            rows = c.dense_rows
            stats[rows] = 0
            stats[rows, ST_DOTS] = c.top_nodes.shape[0] + c.plan_dots
            stats[rows, ST_OPENED] = 1
            status[rows] = GAVE_UP
        if c.order.size == 0:
            return
        outs = (ids, log_q, log_z, tv, tv_est, stats, status)
        out = SampleOut(*(np.empty((c.order.size,) + a.shape[1:], a.dtype) for a in outs))
        run_parallel(sample_batch, c.A, c.q, c.qidx, c.top_nodes, c.tops, c.params, seed, c.excl, out)
        out.stats[:, ST_DOTS] += c.plan_dots
        for dst, src in zip(outs, out):
            dst[c.order] = src

    def _plan_chunk(self, q, qidx, k, ptr, ex_slots, *, budget=None) -> _Chunk:
        """What the kernels take for a chunk of queries, in locality order, and the plan's
        verdict (see _Chunk)."""
        view = self.index.view()
        A, top_nodes, top_centers, top_region = view.arrays, view.top_nodes, view.top_centers, view.top_region
        top_dots = np.empty((q.shape[0], top_centers.shape[0]), np.float32)
        run_parallel(score_top_level, q, top_centers, top_dots)
        # region by region, so consecutive queries on a thread share cached leaves
        order = locality_order(top_dots, top_region)
        q, top_dots = q[order], top_dots[order]
        ptr, ex_slots = permute_rows(ptr, ex_slots, order)
        tops = self._top_level_entries(A, q, top_dots, top_nodes)
        dense, plan_dots = self._plan_dense(A, q, k, view.n_slots)
        dense_rows = order[dense]
        if dense.any():
            keep = ~dense
            order, q = order[keep], q[keep]
            ptr, ex_slots = permute_rows(ptr, ex_slots, np.flatnonzero(keep))
            tops = TopLevel(*(a[keep] for a in tops))
        params = Params(
            beta=self.beta,
            k=k,
            exact=self.mode == "exact",
            tol=self.tolerance,
            budget=self._budget() if budget is None else int(budget),
            draw_cost=self.draw_cost,
            give_up=self._give_up(),
            tv_draws=self.tv_draws,
        )
        return _Chunk(A, q, qidx[order], top_nodes, tops, params, Csr(ptr, ex_slots), order, dense_rows, plan_dots)

    def _sample_dense(self, q, rows, k, ptr, ex_slots, seed, ids, log_q, log_z, tv, stats, status):
        """Exact samples for queries `rows` by one dense pass over the slot array: certified
        rejection from the bfloat16 codes (see `dense_precision`), or the float32 pass for
        the rest (and for a query whose certified bound is too wide to pay)."""
        view = self.index.view()
        A, n_slots = view.arrays, view.n_slots
        vecs, slot_id = A.vecs, A.slot_id
        sub_ptr, sub_ex = permute_rows(ptr, ex_slots, rows)
        n_allowed = len(self.index) - np.array([np.unique(sub_ex[a:b]).size for a, b in zip(sub_ptr[:-1], sub_ptr[1:])])
        if (n_allowed == 0).any():
            status[rows[n_allowed == 0]] = ALL_EXCLUDED
            return
        qr = q[rows]
        dead = np.flatnonzero(A.slot_leaf < 0)
        f32 = np.ones(rows.size, bool)
        codes = self._bf16_codes()
        if codes is not None:
            # each query's stream keyed by its own index: independent of which rows go dense
            keys = np.array([np.random.SeedSequence([seed, int(b)]).generate_state(1, np.uint64)[0] for b in rows])
            with self._dense_buffer(dense_rows(rows.size, n_slots, 2), n_slots, np.uint16) as buf16:
                idx, logp, lz3, props, _ = certified_softmax(
                    qr, vecs, codes, self.beta, keys, k, sub_ptr, sub_ex, buf16, dead
                )
            if (props == -1).any():
                bad = int(rows[np.flatnonzero(props == -1)[0]])
                raise ValueError(f"query {bad}: scores are not finite (vector/query norms too large for float32)")
            status[rows[props == -2]] = COLLAPSED
            done = props > 0
            r = rows[done]
            ids[r], log_q[r], log_z[r] = slot_id[idx[done]], logp[done], lz3[done, 1:]
            stats[r, ST_DOTS] += n_slots + props[done]
            stats[r, ST_PROPOSALS] = props[done]
            status[r] = OK
            f32 = props == -3
        if f32.any():
            r = rows[f32]
            f_ptr, f_ex = permute_rows(sub_ptr, sub_ex, np.flatnonzero(f32))
            ids[r], log_q[r], log_z[r] = self._sample_dense_f32(q, r, k, f_ptr, f_ex, seed, dead)
            stats[r, ST_DOTS] += n_slots
            stats[r, ST_PROPOSALS] = k
            status[r] = OK
        tv[rows] = 0.0  # exact draws
        stats[rows, ST_FRONTIER] = 0

    def _sample_dense_f32(self, q, rows, k, sub_ptr, sub_ex, seed, dead):
        """The float32 dense pass for queries `rows`: (ids, log_q, log_z interval)."""
        A = self.index.view().arrays
        # each query's uniforms keyed by its own index: independent of which rows go dense
        u = np.stack([np.random.default_rng([seed, int(b)]).random(k) for b in rows])
        idx, logp, logz, pad = self._dense_pass(q[rows], rows, sub_ptr, sub_ex, u, dead)
        return A.slot_id[idx], logp, np.stack([logz - pad, logz + pad], 1)

    def _dense_pass(self, qr, rows, sub_ptr, sub_ex, u, dead):
        """Inverse-CDF draws for uniforms u over all stored vectors (`dense_softmax`); returns
        (slot index, log P, log Z of the float32 scores, the pad that certifies it)."""
        A = self.index.view().arrays
        n = A.vecs.shape[0]
        with self._dense_buffer(dense_rows(rows.size, n, 4), n, np.float32) as buf:
            idx, logp, logz, bad = dense_softmax(qr, A.vecs, self.beta, u, sub_ptr, sub_ex, buf, dead=dead)
        if bad >= 0:
            raise ValueError(
                f"query {int(rows[bad])}: scores are not finite (vector/query norms too large for float32)"
            )
        # log Z of the float32 scores, padded by their rounding bound and the pass's own
        qn = np.linalg.norm(qr.astype(np.float64), axis=1)
        pad = self.beta * np.array([dot_error(self.index.dim, float(n), float(A.nu_max[0])) for n in qn])
        pad += LOGZ_ERR
        return idx, logp, logz, pad

    @contextmanager
    def _dense_buffer(self, rows: int, n: int, dtype):
        """A (rows, n) score buffer, kept between calls as BruteForce keeps its own (a
        fresh one page-faults on every call: ~2 ms/query at 1M); a second caller at the
        same time gets a fresh one."""
        if not self._buf_lock.acquire(blocking=False):
            yield np.empty((rows, n), dtype)
            return
        try:
            nbytes = rows * n * np.dtype(dtype).itemsize
            if self._buf is None or self._buf.nbytes < nbytes:
                self._buf = np.empty(nbytes, np.uint8)
            yield self._buf[:nbytes].view(dtype).reshape(rows, n)
        finally:
            self._buf_lock.release()

    def _plan_dense(self, A, q: np.ndarray, k: int, n_slots: int) -> tuple[np.ndarray, int]:
        """((B,) bool: the queries of a chunk that go straight to the dense pass, the
        inner products the plan spent per query)."""
        B = q.shape[0]
        if self.mode != "exact":
            return np.zeros(B, bool), 0
        if self.plan == "dense":
            return np.ones(B, bool), 0
        if self.plan == "tree" or self.dense_fallback is None:
            return np.zeros(B, bool), 0
        work = self._predicted_work(A, q, k)
        return work > self.plan_ratio * n_slots, plan_level(self.index)[0].size

    def predicted_work(self, queries, k: int) -> np.ndarray:
        """The plan's prediction of each query's exact-mode tree work, in inner products
        (`plan_work` on the top-level clusters' bounds). Compare with the work a
        `sample` call reports (`inner_products`) to check the plan on your data."""
        q = as_vectors(queries, self.index.dim, "queries")
        return self._predicted_work(self.index.view().arrays, q, check_k(k))

    def compare_plans(self, queries, k: int, *, seed: int = 0, repeats: int = 2) -> PlanComparison:
        """Time exact mode's three plans on your own queries and say which pays.

        The plan's prediction is cautious: on a large index with a concentrated softmax,
        "auto" can send every query to the dense pass where "tree" is several times
        faster (docs/sampling.md, "Predicting the tree's work"). Call this once with a
        few hundred representative queries, at the temperature and k you train with,
        then construct the sampler with `plan=result.best_plan`. Nothing of this
        sampler changes: the plans run on copies with the same settings.

        queries: (B, d) as for `sample`. seed: the samples' seed (every plan draws with
        it). repeats: timed calls per plan, in turn (the fastest counts); a first,
        untimed call on a few queries sets up buffers and compiled kernels.
        Exact mode only (approx mode has no plan: ValueError).
        """
        if self.mode != "exact":
            raise ValueError("compare_plans: exact mode only (approx mode has no plan)")
        q = as_vectors(queries, self.index.dim, "queries")
        k = check_k(k)
        seed = check_seed(seed)
        repeats = check_positive_int(repeats, "repeats")
        samplers = {plan: self._with_plan(plan) for plan in ("tree", "dense", "auto")}
        for s in samplers.values():
            s.sample(q[:8], k, seed=seed)  # buffers and first-call costs outside the timing
        best: dict = {plan: np.inf for plan in samplers}
        results: dict = {}
        for _ in range(repeats):
            for plan, s in samplers.items():
                t = time.perf_counter()
                results[plan] = s.sample(q, k, seed=seed)
                best[plan] = min(best[plan], time.perf_counter() - t)
        ms = {plan: 1e3 * t / q.shape[0] for plan, t in best.items()}
        # a query answered by the dense pass has no cut: under plan="tree", a give-up
        return PlanComparison(
            ms_per_query=ms,
            tree_work=results["tree"].inner_products,
            tree_gave_up=results["tree"].frontier_size == 0,
            predicted_work=self.predicted_work(q, k),
            auto_dense_share=float(np.mean(results["auto"].frontier_size == 0)),
            best_plan=min(("tree", "dense"), key=lambda p: ms[p]),
        )

    def _with_plan(self, plan: str) -> SoftmaxSampler:
        """A sampler with this one's settings and another plan."""
        return SoftmaxSampler(
            self.index,
            temperature=self.temperature,
            mode=self.mode,
            tolerance=self.tolerance,
            budget=self.budget,
            draw_cost=self.draw_cost,
            chunk_size=self.chunk_size,
            dense_fallback=self.dense_fallback,
            plan=plan,
            plan_ratio=self.plan_ratio,
            dense_precision=self.dense_precision,
            tv_draws=self.tv_draws,
            target_tv=self.target_tv,
            max_budget=self.max_budget,
            batched=self.batched,
            block_size=self.block_size or None,
        )

    def _predicted_work(self, A, q: np.ndarray, k: int) -> np.ndarray:
        B = q.shape[0]
        nodes, centers = plan_level(self.index)
        dots = np.empty((B, nodes.size), np.float32)
        blo = np.empty(dots.shape, np.float64)
        bup = np.empty(dots.shape, np.float64)
        run_parallel(level_bounds, A, q, centers, nodes, dots, blo, bup)
        flo, fup, w = node_log_masses(A, nodes, q, dots, blo, bup, self.beta)
        shift = fup.max(axis=1, keepdims=True)
        eu, el, ew = (np.exp(a - shift) for a in (fup, flo, w))
        return plan_work(bup, eu, el, ew, A.count[nodes], k, self.draw_cost)

    def _bf16_codes(self) -> Bf16Codes | None:
        """The index's bfloat16 codes (built on first use and after every write), or None
        when the dense pass is float32."""
        if self.dense_precision == "fp32":
            return None
        if self.dense_precision == "auto" and (not native_bf16() or self.index.dim < BF16_MIN_DIM):
            return None
        return index_codes(self.index)

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
            c = self._plan_chunk(q[r], r, k, sub_ptr, sub_ex)
            if c.dense_rows.size:  # the plan's dense rows: their trials come from the dense pass
                d = r[c.dense_rows]
                out.status[d] = GAVE_UP
                out.stats[d, ST_DOTS] = c.top_nodes.shape[0] + c.plan_dots
                out.stats[d, ST_OPENED] = 1
            if c.order.size:
                part = TrialOut(*(np.empty((c.order.size,) + a.shape[1:], a.dtype) for a in out))
                run_parallel(
                    trial_batch, c.A, c.q, c.qidx, c.top_nodes, c.tops, c.params, seed, c.excl, m_arr[c.qidx], part
                )
                part.stats[:, ST_DOTS] += c.plan_dots
                for dst, src in zip(out, part):
                    dst[r[c.order]] = src
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
        dead = np.flatnonzero(view.arrays.slot_leaf < 0)
        idx, logp, logz, pad = self._dense_pass(q[rows], rows, sub_ptr, sub_ex, u, dead)
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
        flo, fup, w = node_log_masses(A, top_nodes, q, top_dots, blo, bup, beta)
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
