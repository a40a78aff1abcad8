"""The sampler's cut of the tree: its records, its log-mass sums, its growth.

A cut is a set of entries covering every target once. Entry e is either an unopened
node, with certified bounds [lo, up] of the log of its share of the partition
function, or an evaluated leaf (off[e] >= 0), whose targets' exact log-weights sit
in the score buffer. docs/sampling.md derives the bounds and the proposal.

Masses are kept in float64 relative to a shift M (exp(x - M) never overflows). The
totals U = sum e^(up - M) and L = sum e^(lo - M) live in two segment trees over the
entries: an update recomputes parent sums from children, so no subtraction ever
cancels precision and the totals stay exact to rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba as nb
import numpy as np

from .heaps import grow_f

NEG_INF = -np.inf

# counters of Cut.n
ENTRIES, SCORES, QUEUED = 0, 1, 2
# per-query statistics columns
ST_OPENED, ST_DOTS, ST_PROPOSALS, ST_ACCEPTED, ST_FRONTIER = range(5)
# per-query status: 0 done; everything excluded; acceptance collapsed; exact-mode work
# reached `give_up` (the caller redoes the query densely)
OK, ALL_EXCLUDED, COLLAPSED, GAVE_UP = 0, -1, -2, -3


class Params(NamedTuple):
    """The sampler's settings (SoftmaxSampler's, in kernel units)."""

    beta: float  # 1 / temperature
    k: int  # samples per query
    exact: bool  # rejection (exact) or proposal (approx) draws
    tol: float  # stop refining once U <= (1 + tol) L
    budget: int  # inner products refinement may spend
    draw_cost: float  # one rejection draw, in inner products (exact mode's stopping rule)
    give_up: int  # exact-mode work after which the caller redoes the query densely
    tv_draws: int  # approx mode: extra draws that estimate the TV (0: no estimate)


class Query(NamedTuple):
    vec: np.ndarray  # (d,) float32
    norm: float  # ||q||
    norm2: float  # ||q||^2


class Excluded(NamedTuple):
    """A query's excluded targets: their slots and exact log-weights, and whether each
    still hides inside an unopened node (whose bounds then count its weight)."""

    slots: np.ndarray
    w: np.ndarray
    hidden: np.ndarray


class Entries(NamedTuple):
    """The cut's entries (capacity grows; the first cut.n[ENTRIES] are used)."""

    node: np.ndarray  # int64 tree node
    lo: np.ndarray  # float64 log-lower bound of the entry's mass
    up: np.ndarray  # float64 log-upper bound
    w: np.ndarray  # float64 log-proposal weight (approx mode's draw weight)
    off: np.ndarray  # int64 >= 0: an evaluated leaf, offset of its scores; -1: a node
    alive: np.ndarray  # bool: still on the cut (not replaced by its refinement)
    blo: np.ndarray  # float64 bounds of <q, y> below the node: its children's are
    bup: np.ndarray  # clipped into them
    ew: np.ndarray  # float64 e^(w - M): the proposal weight under the shift


class Scores(NamedTuple):
    """Evaluated leaves' targets, one leaf after another."""

    w: np.ndarray  # float64 beta <q, y>, -inf for an excluded target
    slot: np.ndarray  # int64
    cum: np.ndarray  # float64 running sum of e^(w - leaf max) within each leaf


class Heap(NamedTuple):
    """Max-heap of the entries to refine, by priority."""

    key: np.ndarray  # float64
    entry: np.ndarray  # int64


class Sums(NamedTuple):
    """Segment trees of e^(up - M) and e^(lo - M) over the entries: leaf j at
    [cap + j], cap = len / 2, every internal node the sum of its two children."""

    up: np.ndarray
    lo: np.ndarray


class Cut(NamedTuple):
    entries: Entries
    scores: Scores
    heap: Heap
    sums: Sums
    n: np.ndarray  # int64 counters: ENTRIES used, SCORES used, QUEUED in the heap
    shift: np.ndarray  # float64 [M]


# ---------------------------------------------------------------- formulas
# Both are written with numpy ufuncs so that one definition serves the kernels
# (compiled, per entry) and sampling.py's top level (`.py_func` on whole arrays).


@nb.njit(cache=True, inline="always")
def log_gap(lo, up):
    """log(e^up - e^lo) for finite lo <= up (a zero gap gives up - 690.8)."""
    return up + np.log(-np.expm1(np.minimum(lo - up, -1e-300)))


@nb.njit(cache=True, inline="always")
def entry_log_gap(lo, up):
    """log_gap of one entry. Where lo < up - 40, -expm1(lo - up) rounds to exactly 1, so
    the gap is up itself: the two transcendental calls are skipped, the value is the same."""
    if lo - up < -40.0:
        return up
    return log_gap(lo, up)


@nb.njit(cache=True, inline="always")
def proposal_log_weight(log_count, beta, dot, qn2, msd, dim, log_lo, log_up):
    """Approx mode's log-mass estimate of a node, clipped into its certified interval.

    Second-order estimate: n e^(beta <q, c>) times E e^(beta <q, y - c>) with the
    deviations' second moment msd spread evenly over the dim directions.
    """
    est = log_count + beta * dot + 0.5 * beta * beta * qn2 * msd / dim
    return np.minimum(np.maximum(est, log_lo), log_up)


@nb.njit(cache=True, inline="always")
def lse_shifted(x, M):
    """e^(x - M), and 0 for x = -inf."""
    return math.exp(x - M) if x > NEG_INF else 0.0


@nb.njit(cache=True, inline="always")
def hidden_excluded_mass(X, M):
    """Mass, relative to the shift M, of the excluded targets still counted inside
    unopened nodes' bounds (subtracted from both totals)."""
    exw = 0.0
    for j in range(X.slots.shape[0]):
        if X.hidden[j]:
            exw += lse_shifted(X.w[j], M)
    return exw


@nb.njit(cache=True, inline="always")
def is_excluded_slot(X, s):
    for j in range(X.slots.shape[0]):
        if X.slots[j] == s:
            return True
    return False


# ---------------------------------------------------------------- segment trees


@nb.njit(cache=True, inline="always")
def seg_set(sums, j, u, l):
    """Set entry j's (upper, lower) weight and recompute its ancestors' sums."""
    segU, segL = sums.up, sums.lo
    i = (segU.shape[0] >> 1) + j
    segU[i] = u
    segL[i] = l
    i >>= 1
    while i >= 1:
        segU[i] = segU[2 * i] + segU[2 * i + 1]
        segL[i] = segL[2 * i] + segL[2 * i + 1]
        i >>= 1


@nb.njit(cache=True, inline="always")
def seg_set_leaves(sums, j0, j1):
    """Recompute the ancestors' sums of entries j0..j1-1, whose leaves were just written.

    One pass per level over the range's parents: the same sums as a seg_set per entry
    (each internal node is the sum of its two children, whatever the order of updates),
    at about 2 (j1 - j0) + 2 log2(cap) additions instead of (j1 - j0) log2(cap)."""
    segU, segL = sums.up, sums.lo
    cap = segU.shape[0] >> 1
    a, z = (cap + j0) >> 1, (cap + j1 - 1) >> 1
    while a >= 1:
        for i in range(a, z + 1):
            segU[i] = segU[2 * i] + segU[2 * i + 1]
            segL[i] = segL[2 * i] + segL[2 * i + 1]
        a >>= 1
        z >>= 1


@nb.njit(cache=True)
def seg_build(sums):
    """Internal sums of both segment trees from their leaves."""
    segU, segL = sums.up, sums.lo
    for i in range((segU.shape[0] >> 1) - 1, 0, -1):
        segU[i] = segU[2 * i] + segU[2 * i + 1]
        segL[i] = segL[2 * i] + segL[2 * i + 1]


@nb.njit(cache=True)
def seg_grow(sums):
    """Twice the capacity, keeping every leaf."""
    cap = sums.up.shape[0] >> 1
    grown = Sums(np.zeros(4 * cap, np.float64), np.zeros(4 * cap, np.float64))
    grown.up[2 * cap : 3 * cap] = sums.up[cap : 2 * cap]
    grown.lo[2 * cap : 3 * cap] = sums.lo[cap : 2 * cap]
    seg_build(grown)
    return grown


@nb.njit(cache=True)
def seg_fill(sums, E, nf, M):
    """Rebuild both segment trees from the alive entries under shift M."""
    cap = sums.up.shape[0] >> 1
    sums.up[:] = 0.0
    sums.lo[:] = 0.0
    for j in range(nf):
        if E.alive[j]:
            sums.up[cap + j] = lse_shifted(E.up[j], M)
            sums.lo[cap + j] = lse_shifted(E.lo[j], M)
    seg_build(sums)


# ---------------------------------------------------------------- the cut


@nb.njit(cache=True)
def grow_entries(E, n):
    """The entries with room for index n (unchanged when they have it)."""
    return Entries(
        grow_f(E.node, n),
        grow_f(E.lo, n),
        grow_f(E.up, n),
        grow_f(E.w, n),
        grow_f(E.off, n),
        grow_f(E.alive, n),
        grow_f(E.blo, n),
        grow_f(E.bup, n),
        grow_f(E.ew, n),
    )


@nb.njit(cache=True, inline="always")
def has_room(cut, entries, scores, queued):
    """Whether the cut has room for entry index `entries`, score index `scores` and heap
    index `queued` (else `grown` makes a copy that has)."""
    return (
        entries < cut.entries.node.shape[0]
        and entries < cut.sums.up.shape[0] >> 1
        and scores < cut.scores.w.shape[0]
        and queued < cut.heap.key.shape[0]
    )


@nb.njit(cache=True)
def grown(cut, entries, scores, queued):
    """A copy of the cut with room for those indices; its arrays grow."""
    E, S, H, sums = cut.entries, cut.scores, cut.heap, cut.sums
    if entries >= E.node.shape[0]:
        E = grow_entries(E, entries)
    while entries >= sums.up.shape[0] >> 1:
        sums = seg_grow(sums)
    if scores >= S.w.shape[0]:
        S = Scores(grow_f(S.w, scores), grow_f(S.slot, scores), grow_f(S.cum, scores))
    if queued >= H.key.shape[0]:
        H = Heap(grow_f(H.key, queued), grow_f(H.entry, queued))
    return Cut(E, S, H, sums, cut.n, cut.shift)


@nb.njit(cache=True, inline="always")
def push(cut, key, entry):
    """Queue an entry for refinement (the heap has room: see has_room)."""
    H = cut.heap
    i = cut.n[QUEUED]
    cut.n[QUEUED] = i + 1
    while i > 0:  # sift up
        p = (i - 1) >> 1
        if H.key[p] >= key:
            break
        H.key[i] = H.key[p]
        H.entry[i] = H.entry[p]
        i = p
    H.key[i] = key
    H.entry[i] = entry


@nb.njit(cache=True)
def frontier_max(x, E, nf):
    """The largest x[j] over alive entries j (x: E.up for the shift M, E.w for Mw)."""
    M = NEG_INF
    for j in range(nf):
        if E.alive[j] and x[j] > M:
            M = x[j]
    return M


@nb.njit(cache=True)
def reshift(cut):
    """Move the shift M to the cut's largest log-upper bound: re-sum both segment
    trees and re-exponentiate the proposal weights under it. Returns M."""
    E, nf = cut.entries, cut.n[ENTRIES]
    M = frontier_max(E.up, E, nf)
    seg_fill(cut.sums, E, nf, M)
    for j in range(nf):
        E.ew[j] = lse_shifted(E.w[j], M)
    cut.shift[0] = M
    return M
