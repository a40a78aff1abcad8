"""Batched sampling: whole clusters of a cut of the tree, scored as dense blocks.

`SoftmaxSampler(batched=True)` samples the queries of a call together
(docs/sampling.md, "Batched mode"):

1. The cut is the ~2 sqrt(N) top-level clusters, or with `block_size` the deepest cut
   whose subtrees hold at most that many targets. One product scores its centers for
   every query. Each cluster gets the approx mode's mass estimate (second moment,
   clipped into its certified interval) and its certified bounds.
2. Each query opens clusters. Approx mode opens them in decreasing estimated mass until
   their targets reach the `budget`. Exact mode opens those whose rejection draws would
   cost more than scoring them. A cluster holding one of the query's excluded ids is
   always opened.
3. Each cluster opened by any query is scored once, for all the queries that opened it,
   as one dense (queries x targets) BLAS product.
4. Drawing:
   - approx: the exact softmax inside the opened clusters; for the rest, the cluster's
     estimated mass spread uniformly over its targets. `log_q` is exact for that
     proposal, whose normaliser is summed in the same pass. `tv_estimate` comes from
     `tv_draws` exactly scored draws of the unopened part, and `tv_bound` is certified.
   - exact: rejection against the same blocks, with the unopened clusters' certified
     bounds as the envelope.

Against the per-query frontier this gives up the finer cut of deep nodes for the speed
of dense products. That pays on real embeddings, whose softmax mass is spread over many
clusters: there the frontier's per-target bookkeeping costs far more than BLAS does.

The scores come from BLAS, whose rounding may differ with the number of queries that
share a cluster. So a query's samples are reproducible for the same batch and seed,
whatever the thread count. When the same query arrives in another batch, they agree to
the last float32 bit, but not always bit for bit.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from dataclasses import dataclass

import numpy as np

from ._kernels.blocks import NodeSlots, PairScores, draw_blocks, pair_masses, reject_blocks, tv_draws_blocks
from ._kernels.bounds import dot_error, top_level_bounds
from ._kernels.dense import LOGZ_ERR
from ._kernels.frontier import proposal_log_weight
from ._threads import run_parallel
from .tree import TreeIndex, TreeView

# Queries sampled together: the more share a cluster, the better its product runs
# (1,024 queries at 10% of 1M ran the products 1.5x faster than groups of 256). The flat
# score buffer (group x budget float32) is held under BLOCK_BYTES, as the dense pass
# holds its own score buffer near 1 GB.
BLOCK_BYTES = 1 << 30
MAX_GROUP = 1024


def logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    """log sum exp along an axis; -inf for an all -inf row (the core runs without scipy)."""
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


_LEVELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def level_nodes(view: TreeView) -> np.ndarray:
    """The children of the root's children (a leaf child stands for itself): the
    ~2 sqrt(N) top-level clusters."""
    A = view.arrays
    nodes = []
    for v in view.top_nodes:
        c = A.first_child[v]
        if c < 0:
            nodes.append(v)
        while c >= 0:
            nodes.append(c)
            c = A.next_sibling[c]
    return np.asarray(nodes, np.int64)


@dataclass(frozen=True)
class Level:
    """One level of clusters and where their targets are: node j holds the slots
    slots[ptr[j]:ptr[j + 1]] (ascending); `start[j]` is the first of them when they are
    consecutive (then the vectors are a view), else -1 (they are gathered)."""

    nodes: np.ndarray
    centers: np.ndarray
    counts: np.ndarray
    ptr: np.ndarray
    slots: np.ndarray
    start: np.ndarray
    slot_node: np.ndarray  # (n_slots,) the level node of each slot, -1 for a free slot
    slot_pos: np.ndarray  # (n_slots,) its position among that node's slots

    def record(self) -> NodeSlots:
        return NodeSlots(self.ptr, self.slots, self.counts)

    def vectors(self, vecs: np.ndarray, j: int) -> np.ndarray:
        lo, hi = self.ptr[j], self.ptr[j + 1]
        if self.start[j] >= 0:
            return vecs[self.start[j] : self.start[j] + hi - lo]
        return vecs[self.slots[lo:hi]]


def cut_nodes(view: TreeView, max_size: int) -> np.ndarray:
    """The cut of the tree where subtrees first hold at most max_size targets (a larger
    leaf stands for itself): the blocks of the batched sampler. Never coarser than the
    top-level clusters."""
    A = view.arrays
    out = []
    stack = list(level_nodes(view))
    while stack:
        v = stack.pop()
        c = A.first_child[v]
        if c < 0 or A.count[v] <= max_size:
            out.append(v)
            continue
        while c >= 0:
            stack.append(c)
            c = A.next_sibling[c]
    return np.sort(np.asarray(out, np.int64))


def level_of(index: TreeIndex, max_size: int = 0) -> Level:
    """The index's Level (the top-level clusters, or with max_size the cut_nodes), built
    on first use and again after every write (cached)."""
    with _LOCK:
        got = _LEVELS.get(index)
        if got is not None and got[0] == index.version and max_size in got[1]:
            return got[1][max_size]
        version, view = index.version, index.view()
        level = _build_level(view, max_size)
        levels = got[1] if got is not None and got[0] == version else {}
        levels[max_size] = level
        _LEVELS[index] = (version, levels)
        return level


def _build_level(view: TreeView, max_size: int) -> Level:
    A = view.arrays
    nodes = cut_nodes(view, max_size) if max_size > 0 else level_nodes(view)
    n_nodes = A.parent.shape[0]
    # every node's ancestor on the level (climbing one step per pass)
    anc = np.full(n_nodes, -1, np.int64)
    anc[nodes] = np.arange(nodes.size)
    cur = np.arange(n_nodes)
    todo = np.flatnonzero(anc < 0)
    while todo.size:
        cur[todo] = A.parent[cur[todo]]
        alive = cur[todo] >= 0
        found = np.zeros(todo.size, bool)
        found[alive] = anc[cur[todo[alive]]] >= 0
        anc[todo[found]] = anc[cur[todo[found]]]
        todo = todo[alive & ~found]
    live = np.flatnonzero(A.slot_leaf >= 0)
    slot_node = np.full(A.slot_leaf.shape[0], -1, np.int64)
    slot_node[live] = anc[A.slot_leaf[live]]
    if (slot_node[live] < 0).any():
        raise RuntimeError("a stored target has no top-level cluster above it; the index is corrupt")
    order = live[np.argsort(slot_node[live], kind="stable")]
    counts = np.bincount(slot_node[live], minlength=nodes.size).astype(np.int64)
    ptr = np.zeros(nodes.size + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    slot_pos = np.full(A.slot_leaf.shape[0], -1, np.int64)
    slot_pos[order] = np.arange(order.size) - ptr[slot_node[order]]
    first = order[np.minimum(ptr[:-1], max(order.size - 1, 0))]
    last = order[np.maximum(ptr[1:] - 1, 0)]
    start = np.where((counts > 0) & (last - first + 1 == counts), first, -1)
    centers = np.ascontiguousarray(A.center[nodes])
    return Level(nodes, centers, counts, ptr, order, start, slot_node, slot_pos)


def query_groups(B: int, per_query: int, ptr: np.ndarray, ex_slots: np.ndarray):
    """(lo, hi, excluded-slot CSR of rows lo:hi) for groups of queries whose scores, at
    most per_query each, fit BLOCK_BYTES."""
    group = int(max(1, min(MAX_GROUP, BLOCK_BYTES // (4 * max(per_query, 1)))))
    for lo in range(0, B, group):
        hi = min(lo + group, B)
        yield lo, hi, ptr[lo : hi + 1] - ptr[lo], ex_slots[ptr[lo] : ptr[hi]]


@dataclass
class BlockResult:
    """Per query: slots (B, k), log_q (B, k), log_z (B, 2) certified, tv_bound, tv_estimate,
    opened clusters and inner products."""

    slots: np.ndarray
    log_q: np.ndarray
    log_z: np.ndarray
    tv_bound: np.ndarray
    tv_estimate: np.ndarray
    opened: np.ndarray
    dots: np.ndarray


def sample_blocks(
    index: TreeIndex,
    q: np.ndarray,
    qidx: np.ndarray,
    k: int,
    *,
    beta: float,
    budget: int,
    tv_draws: int,
    seed: int,
    ptr: np.ndarray,
    ex_slots: np.ndarray,
    block_size: int = 0,
) -> BlockResult:
    """Approx samples for queries q (B, d) float32; qidx: their positions in the caller's
    batch (each query's random stream is keyed by (seed, qidx)); ptr/ex_slots: the
    excluded slots per query (CSR). See the module docstring."""
    level = level_of(index, block_size)
    A = index.view().arrays
    B = q.shape[0]
    out = BlockResult(
        slots=np.empty((B, k), np.int64),
        log_q=np.empty((B, k), np.float64),
        log_z=np.empty((B, 2), np.float64),
        tv_bound=np.empty(B, np.float64),
        tv_estimate=np.empty(B, np.float64),
        opened=np.empty(B, np.int64),
        dots=np.empty(B, np.int64),
    )
    for lo, hi, sub_ptr, sub in query_groups(B, budget, ptr, ex_slots):
        _sample_group(level, A, q[lo:hi], qidx[lo:hi], k, beta, budget, tv_draws, seed, sub_ptr, sub, out, lo)
    return out


def node_log_masses(A, nodes: np.ndarray, q: np.ndarray, dots, blo, bup, beta: float):
    """Per query and node, from <q, center> (dots) and the certified score bounds below
    the node (blo, bup): (certified log lower mass, certified log upper mass, approx mode's
    estimate clipped between them), n e^(beta lo) <= Z_v <= n e^(beta up)."""
    count = A.count[nodes]
    with np.errstate(divide="ignore"):  # an empty node: no mass
        lc = np.log(count.astype(np.float64))
    flo, fup = lc + beta * blo, lc + beta * bup
    qn2 = np.einsum("ij,ij->i", q, q, dtype=np.float64)[:, None]
    msd = A.sqsum[nodes] / np.maximum(count, 1)
    # the kernels' own formula (numpy ufuncs inside), evaluated on whole arrays
    w = proposal_log_weight.py_func(lc, beta, dots, qn2, msd, q.shape[1], flo, fup)
    return flo, fup, w


def rejection_draws(eu: np.ndarray, el: np.ndarray, ew: np.ndarray, k: int, draw_cost: float) -> np.ndarray:
    """(B, K) what leaving each node unopened would cost in rejection draws, in inner
    products: k draw_cost U_j / Z, from each node's upper, lower and estimated mass under
    one shift per row. Z is the geometric mean of the certified lower total L = sum el and
    the estimate W = sum ew (W overshoots where a weight is clipped to its upper bound, L
    undershoots where the bounds are loose). The exact mode's cost rule opens a node when
    this reaches its targets."""
    z = np.sqrt(el.sum(axis=1) * ew.sum(axis=1))[:, None]
    z = np.maximum(z, np.finfo(np.float64).tiny)
    with np.errstate(over="ignore"):  # inf: a node no draw can afford, opened
        return k * draw_cost * eu / z


def cost_rule_work(opened: np.ndarray, counts: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """(B,) predicted work: the opened nodes' targets plus the draws against the rest."""
    return (np.where(opened, counts, 0.0) + np.where(opened, 0.0, draws)).sum(axis=1)


def cluster_log_masses(level: Level, A, q: np.ndarray, beta: float):
    """Per query and cluster: (estimated log mass, certified log lower and upper mass)."""
    dots = np.ascontiguousarray(q @ level.centers.T)  # one BLAS product for the level
    blo = np.empty(dots.shape, np.float64)
    bup = np.empty(dots.shape, np.float64)
    run_parallel(top_level_bounds, A, q, dots, level.nodes, blo, bup)
    flo, fup, w = node_log_masses(A, level.nodes, q, dots, blo, bup, beta)
    return w, flo, fup


def opening_order(level: Level, w: np.ndarray) -> np.ndarray:
    """(B, K) the clusters in the order approx mode opens them, from their estimated log
    masses w: by decreasing estimated mass per target (empty clusters last). Per target,
    because opening costs a cluster's size and takes its mass out of the proposal's
    error: the knapsack's greedy order (on real text it gives a lower TV at equal work
    than the mass alone; bench.proposal_tv)."""
    filled = level.counts > 0
    log_n = np.log(np.where(filled, level.counts, 1).astype(np.float64))
    density = np.where(filled[None, :], w - log_n[None, :], -np.inf)
    return np.argsort(-density, axis=1, kind="stable")


def _open(level: Level, w: np.ndarray, budget: int, ex_rows: np.ndarray, ex_slots: np.ndarray) -> np.ndarray:
    """(B, K) bool: the clusters each query opens: in `opening_order` until their targets
    reach the budget (at least one), plus every cluster holding an excluded slot."""
    B, K = w.shape
    rank = opening_order(level, w)
    cum = np.cumsum(level.counts[rank], axis=1)
    m = np.minimum((cum < budget).sum(axis=1) + 1, K)
    opened = np.zeros((B, K), bool)
    np.put_along_axis(opened, rank, np.arange(K)[None, :] < m[:, None], axis=1)
    opened[ex_rows, level.slot_node[ex_slots]] = True
    opened &= level.counts[None, :] > 0
    return opened


@dataclass
class Pairs:
    """The opened (cluster, query) pairs, by cluster, and their scores: pair p is cluster
    j[p] for query b[p], its scores in scores[off[p] : off[p] + size[p]] (the cluster's
    slot order; an excluded target's score is -inf); pair_of (B, K) maps back (-1: not
    opened); max/sum: the float32 maximum and the float64 sum of exp(beta (s - max));
    mass: the log mass beta max + log sum."""

    j: np.ndarray
    b: np.ndarray
    off: np.ndarray
    size: np.ndarray
    scores: np.ndarray
    pair_of: np.ndarray
    max: np.ndarray
    sum: np.ndarray
    mass: np.ndarray

    def record(self) -> PairScores:
        return PairScores(self.scores, self.off, self.size, self.max, self.sum)


@functools.cache
def _torch():
    """torch if installed, else None. Its sgemm is the faster on the blocks' small
    products (tens of queries by one cluster), numpy's on the dense pass's large ones."""
    try:
        import torch
    except ImportError:
        return None
    with warnings.catch_warnings():
        # The index's vectors are read-only and are only read; torch says so once per process.
        warnings.simplefilter("ignore", UserWarning)
        ro = np.zeros(1, np.float32)
        ro.setflags(write=False)
        torch.from_numpy(ro)
    return torch


def _matmul_into(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out = a @ b.T (float32)."""
    torch = _torch()
    if torch is None:
        np.matmul(a, b.T, out=out)
    else:
        torch.matmul(torch.from_numpy(a), torch.from_numpy(b).T, out=torch.from_numpy(out))


def _score_pairs(level: Level, A, q: np.ndarray, opened: np.ndarray, beta: float, ex_rows, ex_slots) -> Pairs:
    """Each opened cluster scored once for every query that opened it (one BLAS product)."""
    B, K = opened.shape
    pj, pb = np.nonzero(opened.T)
    size = level.counts[pj]
    off = np.zeros(pj.size, np.int64)
    np.cumsum(size[:-1], out=off[1:])
    scores = np.empty(int(size.sum()), np.float32)
    bounds = np.flatnonzero(np.diff(pj, prepend=-1, append=K + 1))
    for s, e in zip(bounds[:-1], bounds[1:]):
        j = pj[s]
        n = level.counts[j]
        block = scores[off[s] : off[s] + (e - s) * n].reshape(e - s, n)
        _matmul_into(q[pb[s:e]], level.vectors(A.vecs, j), block)
    pair_of = np.full((B, K), -1, np.int64)
    pair_of[pb, pj] = np.arange(pj.size)
    if ex_slots.size:
        p = pair_of[ex_rows, level.slot_node[ex_slots]]
        scores[off[p[p >= 0]] + level.slot_pos[ex_slots[p >= 0]]] = -np.inf  # -1: a row not scored here
    pmax = np.empty(pj.size, np.float64)
    psum = np.empty(pj.size, np.float64)
    run_parallel(pair_masses, scores, off, size, beta, pmax, psum)
    with np.errstate(divide="ignore"):
        pmass = beta * pmax + np.log(psum)
    pmass[psum == 0] = -np.inf
    return Pairs(pj, pb, off, size, scores, pair_of, pmax, psum, pmass)


def _log_z_interval(level, A, q, beta, opened, pairs: Pairs, flo, fup):
    """Certified (log of the opened mass, lower, upper) log Z: the opened mass from float32
    scores, padded by their rounding, plus the unopened clusters' certified intervals."""
    B = q.shape[0]
    qn = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
    pad = beta * np.array([dot_error(q.shape[1], float(a), float(A.nu_max[0])) for a in qn]) + LOGZ_ERR
    m_open = np.full(opened.shape, -np.inf)
    m_open[pairs.b, pairs.j] = pairs.mass
    log_open = logsumexp(m_open, axis=1) if B else np.empty(0)
    shut = ~opened & (level.counts[None, :] > 0)
    zlo = np.logaddexp(log_open - pad, logsumexp(np.where(shut, flo, -np.inf), axis=1))
    zup = np.logaddexp(log_open + pad, logsumexp(np.where(shut, fup, -np.inf), axis=1))
    return log_open, zlo, zup, shut


def _sample_group(level, A, q, qidx, k, beta, budget, tv_draws, seed, ptr, ex_slots, out, lo) -> None:
    B, K = q.shape[0], level.nodes.size
    w, flo, fup = cluster_log_masses(level, A, q, beta)
    ex_rows = np.repeat(np.arange(B), np.diff(ptr))
    opened = _open(level, w, max(budget - K, 1), ex_rows, ex_slots)
    pairs = _score_pairs(level, A, q, opened, beta, ex_rows, ex_slots)
    pb, pj, pair_of = pairs.b, pairs.j, pairs.pair_of
    logm = w.copy()
    logm[pb, pj] = pairs.mass
    # the random streams: per query, keyed by its position in the caller's batch
    gens = [np.random.default_rng([seed, int(b)]) for b in qidx]
    raw = np.stack([g.random(2 * k) for g in gens])
    order = np.argsort(raw[:, :k], axis=1, kind="stable")
    u = np.concatenate([np.take_along_axis(raw[:, :k], order, axis=1), raw[:, k:]], axis=1)
    slots = np.empty((B, k), np.int64)
    logq = np.empty((B, k), np.float64)
    lz = np.empty(B, np.float64)
    run_parallel(
        draw_blocks,
        logm,
        pair_of,
        pairs.record(),
        level.record(),
        beta,
        u,
        order,
        (slots, logq, lz),
    )
    r = slice(lo, lo + B)
    out.slots[r], out.log_q[r] = slots, logq
    log_open, zlo, zup, shut = _log_z_interval(level, A, q, beta, opened, pairs, flo, fup)
    out.log_z[r, 0], out.log_z[r, 1] = zlo, zup
    out.tv_bound[r] = _tv_bound(level, opened, shut, log_open, logm, flo, fup, lz, zlo, zup)
    tv_gens = [np.random.default_rng([seed, int(b), 1]) for b in qidx]  # its own stream: ids do not depend on it
    est, drawn = _tv_estimate(level, A, q, logm, pair_of, beta, log_open, lz, shut, tv_gens, tv_draws)
    out.tv_estimate[r] = np.minimum(est, out.tv_bound[r])
    out.opened[r] = opened.sum(axis=1)
    out.dots[r] = K + (opened * level.counts[None, :]).sum(axis=1) + drawn


def _tv_bound(level, opened, shut, log_open, logm, flo, fup, lz, zlo, zup) -> np.ndarray:
    """Certified TV(proposal, softmax): inside opened clusters the proposal is the softmax
    rescaled by Z/Z^ (Z in [zlo, zup]); in an unopened one every target gets its cluster's
    estimate / n, against a true probability in [e^(flo)/(n Zup), e^(fup)/(n Zlo)]."""
    lz, zlo, zup = lz[:, None], zlo[:, None], zup[:, None]
    frac_open = np.exp(log_open[:, None] - lz)
    t_open = frac_open * np.maximum(np.abs(1.0 - np.exp(lz - zlo)), np.abs(1.0 - np.exp(lz - zup)))
    qm = np.exp(logm - lz)
    t_shut = np.maximum(np.abs(qm - np.exp(flo - zup)), np.abs(qm - np.exp(fup - zlo)))
    t_shut = np.where(shut, t_shut, 0.0).sum(axis=1, keepdims=True)
    return np.minimum(1.0, 0.5 * (t_open + t_shut))[:, 0]


def _tv_estimate(level, A, q, logm, pair_of, beta, log_open, lz, shut, gens, m) -> tuple[np.ndarray, np.ndarray]:
    """(TV estimate per query, inner products spent). Inside the opened clusters the
    proposal is the softmax times Z/Z^, so that part is closed form given Z; the unopened
    part and Z itself are estimated by importance sampling from m draws of the unopened
    proposal. Conservative: the largest value over Z's estimate +- one standard error,
    plus one standard error of the unopened part's mean."""
    B = q.shape[0]
    has_shut = shut.any(axis=1)
    if m == 0:
        return np.where(has_shut, np.nan, 0.0), np.zeros(B, np.int64)
    raw = np.stack([g.random(2 * m) for g in gens])
    u = np.concatenate([np.sort(raw[:, :m], axis=1), raw[:, m:]], axis=1)
    logw = np.empty((B, m), np.float64)
    logr = np.empty((B, m), np.float64)
    run_parallel(tv_draws_blocks, q, A.vecs, logm, pair_of, level.record(), beta, u, logw, logr)
    frac_open = np.exp(log_open - lz)[:, None]
    frac_shut = 1.0 - frac_open
    with np.errstate(invalid="ignore", over="ignore"):
        t = np.exp(logw - logr - lz[:, None])  # T_unopened / Z^ per draw (unbiased)
        tau = t.mean(axis=1, keepdims=True)
        se = t.std(axis=1, ddof=1, keepdims=True) / np.sqrt(m) if m > 1 else np.abs(tau)
        best = np.zeros((B, 1))
        for z in (np.maximum(tau - se, 0.0), tau, tau + se):
            ratio = frac_open + z  # Z / Z^
            ratio = np.maximum(ratio, np.finfo(np.float64).tiny)
            dev = np.abs(frac_shut - t / ratio)
            part = frac_open * np.abs(1.0 - 1.0 / ratio) + dev.mean(axis=1, keepdims=True)
            part += dev.std(axis=1, ddof=1, keepdims=True) / np.sqrt(m) if m > 1 else 0.0
            best = np.maximum(best, part)
    est = np.clip(0.5 * best[:, 0], 0.0, 1.0)
    est = np.where(has_shut, est, 0.0)
    return est, np.where(has_shut, m, 0).astype(np.int64)


# Exact mode: a query whose predicted work (opened targets plus rejection draws) passes
# plan_ratio * N goes to the dense pass; a query still short of k acceptances after this
# many proposals does too (the envelope is too loose to pay).
def proposal_cap(k: int) -> int:
    return 1000 * k + 100_000


@dataclass
class ExactBlocks:
    """Per query: slots (B, k), log_q (B, k) = beta<q,y> - log Z^, log_z (B, 2) certified,
    opened clusters, inner products, proposals, and `dense`: the queries left to the
    caller's dense pass (planned there, or the envelope too loose)."""

    slots: np.ndarray
    log_q: np.ndarray
    log_z: np.ndarray
    opened: np.ndarray
    dots: np.ndarray
    proposals: np.ndarray
    dense: np.ndarray


def sample_blocks_exact(
    index: TreeIndex,
    q: np.ndarray,
    qidx: np.ndarray,
    k: int,
    *,
    beta: float,
    draw_cost: float,
    plan_ratio: float | None,
    seed: int,
    ptr: np.ndarray,
    ex_slots: np.ndarray,
    block_size: int = 0,
) -> ExactBlocks:
    """Exact samples for queries q by rejection against the block envelope (module
    docstring): each query opens the clusters whose rejection draws would cost more than
    scoring them (the exact mode's cost rule, at the cluster level), the opened clusters
    are scored as dense blocks, and draws from an unopened cluster are accepted against
    its certified bound. plan_ratio None: never plan dense."""
    level = level_of(index, block_size)
    A = index.view().arrays
    B = q.shape[0]
    out = ExactBlocks(
        slots=np.zeros((B, k), np.int64),
        log_q=np.zeros((B, k), np.float64),
        log_z=np.zeros((B, 2), np.float64),
        opened=np.zeros(B, np.int64),
        dots=np.zeros(B, np.int64),
        proposals=np.zeros(B, np.int64),
        dense=np.zeros(B, bool),
    )
    most = len(index) if plan_ratio is None else max(1, int(plan_ratio * len(index)))
    for lo, hi, sub_ptr, sub in query_groups(B, most, ptr, ex_slots):
        _exact_group(level, A, q[lo:hi], qidx[lo:hi], k, beta, draw_cost, plan_ratio, seed, sub_ptr, sub, out, lo)
    return out


def _open_exact(level: Level, w, flo, fup, k: int, draw_cost: float, ex_rows, ex_slots):
    """(opened (B, K), predicted work (B,)): the exact mode's cost rule at the cluster
    level (`rejection_draws`), plus every cluster holding an excluded slot."""
    shift = fup.max(axis=1, keepdims=True)
    eu, el, ew = (np.exp(a - shift) for a in (fup, flo, w))
    draws = rejection_draws(eu, el, ew, k, draw_cost)
    counts = level.counts[None, :]
    opened = draws >= counts
    opened[ex_rows, level.slot_node[ex_slots]] = True
    opened &= counts > 0
    return opened, cost_rule_work(opened, counts, draws)


def _exact_group(level, A, q, qidx, k, beta, draw_cost, plan_ratio, seed, ptr, ex_slots, out, lo) -> None:
    B, K = q.shape[0], level.nodes.size
    w, flo, fup = cluster_log_masses(level, A, q, beta)
    ex_rows = np.repeat(np.arange(B), np.diff(ptr))
    opened, work = _open_exact(level, w, flo, fup, k, draw_cost, ex_rows, ex_slots)
    dense = work > plan_ratio * A.count[0] if plan_ratio is not None else np.zeros(B, bool)
    opened[dense] = False  # nothing scored for them here
    pairs = _score_pairs(level, A, q, opened, beta, ex_rows, ex_slots)
    logenv = fup.copy()
    logenv[pairs.b, pairs.j] = pairs.mass
    logenv[~opened & (level.counts[None, :] == 0)] = -np.inf
    with np.errstate(divide="ignore"):
        lup = fup - np.log(level.counts.astype(np.float64))[None, :]  # beta * per-target bound
    keys = np.array([np.random.SeedSequence([seed, int(b), 2]).generate_state(1, np.uint64)[0] for b in qidx])
    slots = np.zeros((B, k), np.int64)
    wy = np.zeros((B, k), np.float64)
    cnt = np.zeros((B, 3), np.int64)
    live = np.flatnonzero(~dense)
    if live.size:
        sub = (slots[live], wy[live], cnt[live])
        run_parallel(
            reject_blocks,
            q[live],
            A.vecs,
            logenv[live],
            lup[live],
            np.ascontiguousarray(pairs.pair_of[live]),
            pairs.record(),
            level.record(),
            beta,
            keys[live],
            proposal_cap(k),
            sub,
        )
        slots[live], wy[live], cnt[live] = sub
    props, sprop, sacc = cnt[:, 0], cnt[:, 1], cnt[:, 2]
    log_open, zlo, zup, shut = _log_z_interval(level, A, q, beta, opened, pairs, flo, fup)
    # log Z^: the opened mass plus the unopened envelope times its acceptance rate (the
    # clusters' estimates where no draw went there), clipped into the certified interval
    env_shut = logsumexp(np.where(shut, fup, -np.inf), axis=1)
    est_shut = logsumexp(np.where(shut, w, -np.inf), axis=1)
    with np.errstate(divide="ignore"):
        rate_shut = np.where(sprop > 0, env_shut + np.log(np.maximum(sacc, 0) / np.maximum(sprop, 1)), est_shut)
    lz_hat = np.clip(np.logaddexp(log_open, rate_shut), zlo, zup)
    r = slice(lo, lo + B)
    out.slots[r] = slots
    out.log_q[r] = wy - lz_hat[:, None]
    out.log_z[r, 0], out.log_z[r, 1] = zlo, zup
    out.opened[r] = opened.sum(axis=1)
    out.dots[r] = K + (opened * level.counts[None, :]).sum(axis=1) + sprop
    out.proposals[r] = props
    out.dense[r] = dense | (props < 0)
