"""numba kernels of the softmax sampler: per query, plan, refine, draw (docs/sampling.md).

* plan: the initial cut is the root's children, whose bounds, proposal weights and
  priorities sampling.py computes for the whole batch (`TopLevel`);
* refine: the entry of highest priority is replaced by its children, or an unopened
  leaf by its targets' exact weights, until a stopping rule fires (exact mode: the
  gap e^up - e^lo first; approx mode: the largest estimated mass first);
* draw (draw.py): a certified log Z interval from the cut, then the draws.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba as nb
import numpy as np

from .bounds import dot32, dot_error, node_bounds_of, squared_norm
from .draw import (
    TrialRow,
    build_proposal,
    certificate,
    draw_batch_buffers,
    draw_stage,
    draw_trials,
    find_entry,
    hidden_excluded_proposal,
    hidden_excluded_share,
    settle_shift,
    tv_bound,
)
from .frontier import (
    COLLAPSED,
    ENTRIES,
    GAVE_UP,
    NEG_INF,
    OK,
    QUEUED,
    SCORES,
    ST_DOTS,
    ST_FRONTIER,
    ST_OPENED,
    Cut,
    Entries,
    Excluded,
    Heap,
    Query,
    Scores,
    Sums,
    entry_log_gap,
    grown,
    has_room,
    hidden_excluded_mass,
    lse_shifted,
    proposal_log_weight,
    push,
    reshift,
    seg_build,
    seg_set,
    seg_set_leaves,
)
from .heaps import heap_pop, heapify
from .rng import U64, splitmix64


class TopLevel(NamedTuple):
    """The initial cut of every query of a batch, (B, K) over the root's K children."""

    blo: np.ndarray  # bounds of <q, y> below the node
    bup: np.ndarray
    flo: np.ndarray  # bounds of the log-mass: log n + beta * (blo, bup)
    fup: np.ndarray
    w: np.ndarray  # log-proposal weight (proposal_log_weight)
    prio: np.ndarray  # refinement priority
    eu: np.ndarray  # e^(fup - shift), e^(flo - shift), e^(w - shift)
    el: np.ndarray
    ew: np.ndarray
    shift: np.ndarray  # (B,) the largest fup of each row


class SampleOut(NamedTuple):
    """Per-query outputs (rows of the batch)."""

    ids: np.ndarray  # (B, k) int64
    log_q: np.ndarray  # (B, k) float64
    log_z: np.ndarray  # (B, 2) float64
    tv: np.ndarray  # (B,) float64 certified TV bound
    tv_est: np.ndarray  # (B,) float64 TV estimate (draw.tv_estimate_stage)
    stats: np.ndarray  # (B, 5) int64, columns ST_*
    status: np.ndarray  # (B,) int64: OK, ALL_EXCLUDED, COLLAPSED or GAVE_UP


@nb.njit(cache=True, parallel=True, nogil=True)
def sample_batch(T, queries, qidx, top_nodes, top, P, seed, excl, out):
    """Rows may come in any order: each row's random stream is keyed by its
    original index qidx[b], so results do not depend on order or thread count."""
    status = out.status  # bound outside the loop: numba drops prange writes through a record
    for b in nb.prange(queries.shape[0]):
        key = splitmix64(splitmix64(U64(seed)) ^ U64(qidx[b]))
        ex_slots = excl.values[excl.ptr[b] : excl.ptr[b + 1]]
        status[b] = sample_one(T, queries[b], b, top_nodes, top, P, key, ex_slots, out)


@nb.njit(cache=True)  # no fastmath: the frontier sums rely on IEEE order
def sample_one(T, q, b, top_nodes, top, P, key, ex_slots, out):
    """Query b of the batch: plan, refine, draw. Returns its status.

    The stages are separate functions in the source and inlined here (numba IR):
    passing the cut between compiled functions cost a few percent in a same-process
    benchmark. sample_one itself is not inlined into sample_batch: the parallel loop's
    array analysis rejects the growing arrays' rebinding."""
    stats = out.stats[b]
    Q, X, cut, status = plan_and_refine(T, q, b, top_nodes, top, P, ex_slots, stats)
    if status != OK:
        return status
    return draw_stage(T, Q, P, X, cut, key, out, b)


@nb.njit(cache=True, inline="always")
def plan_and_refine(T, q, b, top_nodes, top, P, ex_slots, stats):
    """The stages every path shares: query b's record, its excluded weights, its cut
    planned from the top level and refined. Returns (Q, X, cut, status); stats reset."""
    qn2 = squared_norm(q)
    Q = Query(q, math.sqrt(qn2), qn2)
    X = excluded_weights(T, q, P.beta, ex_slots)
    stats[:] = 0
    stats[ST_DOTS] = ex_slots.shape[0] + top_nodes.shape[0]
    stats[ST_OPENED] = 1  # the root, opened for the whole batch
    cut = plan(top_nodes, top, b)
    cut, status = refine(T, Q, P, X, cut, stats)
    return Q, X, cut, status


@nb.njit(cache=True, inline="always")
def excluded_weights(T, q, beta, ex_slots):
    """The exact log-weights of a query's excluded targets, all still hidden."""
    n = ex_slots.shape[0]
    w = np.empty(n, np.float64)
    for j in range(n):
        w[j] = beta * dot32(q, T.vecs[ex_slots[j]])
    return Excluded(ex_slots, w, np.ones(n, np.bool_))


# ------------------------------------------------------------------------- plan


@nb.njit(cache=True, inline="always")
def plan(top_nodes, top, b):
    """The initial cut of query b: the top level, queued by priority."""
    ntop = top_nodes.shape[0]
    cap = max(256, ntop + 1)
    E = Entries(
        np.empty(cap, np.int64),
        np.empty(cap, np.float64),
        np.empty(cap, np.float64),
        np.empty(cap, np.float64),
        np.empty(cap, np.int64),
        np.empty(cap, np.bool_),
        np.empty(cap, np.float64),
        np.empty(cap, np.float64),
        np.empty(cap, np.float64),
    )
    H = Heap(np.empty(cap, np.float64), np.empty(cap, np.int64))
    for j in range(ntop):
        E.node[j], E.off[j], E.alive[j] = top_nodes[j], -1, True
        E.lo[j], E.up[j], E.w[j] = top.flo[b, j], top.fup[b, j], top.w[b, j]
        E.blo[j], E.bup[j] = top.blo[b, j], top.bup[b, j]
        E.ew[j] = top.ew[b, j]
        H.key[j], H.entry[j] = top.prio[b, j], j
    heapify(H.key, H.entry, ntop)
    scap = 1
    while scap < 2 * ntop + 64:
        scap *= 2
    sums = Sums(np.zeros(2 * scap, np.float64), np.zeros(2 * scap, np.float64))
    for j in range(ntop):
        sums.up[scap + j] = top.eu[b, j]
        sums.lo[scap + j] = top.el[b, j]
    seg_build(sums)
    S = Scores(np.empty(1024, np.float64), np.empty(1024, np.int64), np.empty(1024, np.float64))
    n = np.zeros(3, np.int64)
    n[ENTRIES] = ntop
    n[QUEUED] = ntop
    return Cut(E, S, H, sums, n, np.full(1, top.shift[b]))


# ----------------------------------------------------------------------- refine


@nb.njit(cache=True, inline="always")
def refine(T, Q, P, X, cut, stats):
    """Open entries in priority order until the cut is tight enough (U <= (1 + tol) L),
    the budget is spent, or (exact mode) further refinement would cost more than the
    rejection draws it saves. Returns the cut (a grown copy when it ran out of room) and
    OK, or GAVE_UP."""
    while True:
        status, ne, ns, nq = refine_in_place(T, Q, P, X, cut, stats)
        if status != NEED_ROOM:
            break
        cut = grown(cut, ne, ns, nq)
    if status != OK:
        return cut, status
    return open_hidden_excluded(T, Q, P, X, cut, stats)


# refine_in_place's answer when the cut must grow before the next opening
NEED_ROOM = 1


@nb.njit(cache=True, _nrt=False)
def refine_in_place(T, Q, P, X, cut, stats):
    """refine's loop, compiled without numba's runtime (_nrt=False: it allocates
    nothing). With the runtime, every rebinding of the cut and many reads of its
    fields updated the reference counts of its ~18 arrays, atomically: half the loop's
    time. So the cut is never rebound here. Returns (OK or GAVE_UP, 0, 0, 0), or
    (NEED_ROOM, entries, scores, queued) when the next opening needs a cut with room
    for those indices (`grown`); the caller grows it and calls again."""
    while cut.n[QUEUED] > 0:
        M = cut.shift[0]
        exw = hidden_excluded_mass(X, M)
        La = cut.sums.lo[1] - exw
        Ua = cut.sums.up[1] - exw
        if La > 0.0 and Ua <= (1.0 + P.tol) * La:
            break
        if stats[ST_DOTS] >= P.budget:
            break
        if P.exact and stats[ST_DOTS] >= P.give_up:
            return GAVE_UP, 0, 0, 0  # the work so far is wasted, and reported
        e = cut.heap.entry[0]  # the top: popped next, and opened unless dead or massless
        if not cut.entries.alive[e] or cut.heap.key[0] == NEG_INF:
            cut.n[QUEUED] = heap_pop(cut.heap.key, cut.heap.entry, cut.n[QUEUED])[2]
            continue
        v = cut.entries.node[e]
        cost = node_cost(T, v)
        ne, ns, nq = room_to_open(T, cut, v, cost)
        if not has_room(cut, ne, ns, nq):
            return NEED_ROOM, ne, ns, nq  # e stays on top: the next call opens it
        gk, e, queued = heap_pop(cut.heap.key, cut.heap.entry, cut.n[QUEUED])
        cut.n[QUEUED] = queued
        if P.exact and La > 0.0:
            # cost-aware: refining e saves at most k * gap/La proposals of draw_cost each
            saved = P.k * math.exp(gk - M) / La * P.draw_cost
            if saved < cost:
                push(cut, gk, e)  # keep it queued; its mass is still drawable
                break
        open_entry(T, Q, P, X, cut, e, cost, stats)
    return OK, 0, 0, 0


@nb.njit(cache=True, inline="always")
def room_to_open(T, cut, v, cost):
    """(entry, score, heap) indices the cut must have room for to open node v: a leaf
    adds one entry and its targets' scores, a node its `cost` children, each queued."""
    nf = cut.n[ENTRIES]
    if T.leaf_start[v] >= 0:
        return nf, cut.n[SCORES] + T.leaf_size[v], 0
    return nf + cost, 0, cut.n[QUEUED] + cost


@nb.njit(cache=True, inline="always")
def open_entry(T, Q, P, X, cut, e, cost, stats):
    """Replace entry e by its refinement: a leaf's exact scores, or a node's children,
    in place: the cut must have room for it (`room_to_open`)."""
    v = cut.entries.node[e]
    cut.entries.alive[e] = False
    stats[ST_OPENED] += 1
    seg_set(cut.sums, e, 0.0, 0.0)
    if T.leaf_start[v] >= 0:
        open_leaf(T, Q, P, X, cut, v, stats)
    else:
        open_children(T, Q, P, cut, e, v, cost, stats)
    # precision guard: everything shrank far below the shift, re-shift
    if cut.sums.up[1] < 1e-250:
        reshift(cut)


@nb.njit(cache=True)
def open_hidden_excluded(T, Q, P, X, cut, stats):
    """Once refinement has stopped: if excluded targets hidden in unopened nodes would
    take most of the proposals (each one a rejected or discarded draw), open the entries
    that hold them, whatever the budget, until none is hidden. Returns (cut, status)."""
    if X.slots.shape[0] == 0 or hidden_excluded_share(T, P.exact, X, cut) <= 0.5:
        return cut, OK
    for j in range(X.slots.shape[0]):
        while X.hidden[j]:
            if P.exact and stats[ST_DOTS] >= P.give_up:
                return cut, GAVE_UP
            e = find_entry(T, cut, X.slots[j])
            if e < 0:  # not inside an unopened node (cannot happen while hidden)
                X.hidden[j] = False
                break
            v = cut.entries.node[e]
            cost = node_cost(T, v)
            ne, ns, nq = room_to_open(T, cut, v, cost)
            if not has_room(cut, ne, ns, nq):
                cut = grown(cut, ne, ns, nq)
            open_entry(T, Q, P, X, cut, e, cost, stats)
    return cut, OK


@nb.njit(cache=True, inline="always")
def node_cost(T, v):
    """Inner products that opening v costs: a leaf's targets, or a node's children."""
    if T.leaf_start[v] >= 0:
        return T.leaf_size[v]
    cost = 0
    c = T.first_child[v]
    while c >= 0:
        cost += 1
        c = T.next_sibling[c]
    return cost


@nb.njit(cache=True, inline="always")
def open_leaf(T, Q, P, X, cut, v, stats):
    """Replace leaf v by an evaluated-leaf entry: its targets' exact log-weights (an
    excluded target weighs nothing). Float32 rounding of the scores is the only gap
    left, so the entry is never refined again."""
    nf, nsc = cut.n[ENTRIES], cut.n[SCORES]
    m = T.leaf_size[v]
    E, S = cut.entries, cut.scores
    mx = score_leaf(T, Q.vec, P.beta, X, v, S, nsc)
    stats[ST_DOTS] += m
    err = P.beta * dot_error(Q.vec.shape[0], Q.norm, T.nu_max[v])
    # log-sum with the leaf's own max as shift: relative to M its mass may underflow
    lsum = 0.0
    for i in range(m):
        w = S.w[nsc + i]
        if w > NEG_INF:
            lsum += math.exp(w - mx)
        S.cum[nsc + i] = lsum
    M = cut.shift[0]
    E.node[nf], E.off[nf], E.alive[nf] = v, nsc, True
    E.w[nf] = math.log(lsum) + mx if lsum > 0.0 else NEG_INF  # the exact log-sum
    E.lo[nf] = math.log(lsum) + mx - err if lsum > 0.0 else NEG_INF
    E.up[nf] = math.log(lsum) + mx + err if lsum > 0.0 else NEG_INF
    E.ew[nf] = lse_shifted(E.w[nf], M)
    E.blo[nf], E.bup[nf] = 0.0, 0.0
    cut.n[ENTRIES] = nf + 1
    cut.n[SCORES] = nsc + m
    seg_set(cut.sums, nf, lse_shifted(E.up[nf], M), lse_shifted(E.lo[nf], M))


@nb.njit(cache=True, inline="always")
def score_leaf(T, q, beta, X, v, S, at):
    """beta <q, y> of leaf v's targets into S.w[at:] (-inf for excluded ones, which are
    then no longer hidden); returns the largest."""
    vecs, ex_slots, hidden, sw, sslot = T.vecs, X.slots, X.hidden, S.w, S.slot  # loops index locals
    s0, m = T.leaf_start[v], T.leaf_size[v]
    for i in range(m):
        s = s0 + i
        w = beta * dot32(q, vecs[s])
        for j in range(ex_slots.shape[0]):
            if ex_slots[j] == s:
                w = NEG_INF
                hidden[j] = False
        sw[at + i] = w
        sslot[at + i] = s
    mx = NEG_INF
    for i in range(m):
        mx = max(mx, sw[at + i])
    return mx


@nb.njit(cache=True, inline="always")
def open_children(T, Q, P, cut, e, v, cost, stats):
    """Replace entry e (node v) by its children, each bounded (clipped into v's own
    bounds, which hold for them too), weighted and queued."""
    nf0 = nf = cut.n[ENTRIES]
    E = cut.entries
    node, f_lo, f_up, f_w, off, alive, blo, bup, ew = E  # the loop indexes locals
    center, count, sqsum, next_sibling = T.center, T.count, T.sqsum, T.next_sibling
    q, beta, exact, M = Q.vec, P.beta, P.exact, cut.shift[0]
    cap = cut.sums.up.shape[0] >> 1
    seg_up, seg_lo = cut.sums.up, cut.sums.lo
    plo, pup = blo[e], bup[e]
    c = T.first_child[v]
    while c >= 0:
        a = dot32(q, center[c])
        lo, up = node_bounds_of(T, c, a, Q.norm)
        lo, up = max(lo, plo), min(up, pup)
        if up < lo:
            up = lo
        lc = math.log(count[c])
        node[nf], off[nf], alive[nf] = c, -1, True
        f_lo[nf], f_up[nf] = lc + beta * lo, lc + beta * up
        blo[nf], bup[nf] = lo, up
        seg_up[cap + nf] = lse_shifted(f_up[nf], M)
        seg_lo[cap + nf] = lse_shifted(f_lo[nf], M)
        if exact:
            # exact mode draws an unopened node by its upper bound (the envelope), so
            # its proposal weight is that bound; it refines where the envelope wastes
            # most (the gap)
            f_w[nf], ew[nf] = f_up[nf], seg_up[cap + nf]
            push(cut, entry_log_gap(f_lo[nf], f_up[nf]), nf)
        else:
            # approx mode: the estimated mass, and refinement where it is largest, as
            # an IVF probes its best lists
            msd = sqsum[c] / max(count[c], 1)
            f_w[nf] = proposal_log_weight(lc, beta, a, Q.norm2, msd, q.shape[0], f_lo[nf], f_up[nf])
            ew[nf] = lse_shifted(f_w[nf], M)
            push(cut, f_w[nf], nf)
        nf += 1
        c = next_sibling[c]
    seg_set_leaves(cut.sums, nf0, nf)
    cut.n[ENTRIES] = nf
    stats[ST_DOTS] += cost


@nb.njit(cache=True, parallel=True, nogil=True)
def score_top_level(queries, centers, out):
    """out[b, j] = <q_b, center_j> in float32.

    The sampler's top level is small (the root's children), so this is cheap here,
    and unlike a numpy (OpenBLAS) product it runs on numba's threads only: BLAS
    worker threads spin after each call and, on a background sampling thread,
    steal the cores the training step runs on."""
    for b in nb.prange(queries.shape[0]):
        for j in range(centers.shape[0]):
            out[b, j] = dot32(queries[b], centers[j])


# ----------------------------------------------------------------------- trials


class TrialOut(NamedTuple):
    """Per-query outputs of `trial_batch` (rows of the batch)."""

    ids: np.ndarray  # (B, cap) int64 accepted ids, the first n[b] of each row
    w: np.ndarray  # (B, cap) float64 beta <q, y> (exact) or log-proposal (approx)
    trial: np.ndarray  # (B, cap) int64 the trial (from 0) that accepted each id
    n: np.ndarray  # (B,) int64 accepted
    log_env: np.ndarray  # (B,) float64 log of the proposal's total mass (see trial_one)
    log_z: np.ndarray  # (B, 2) float64 certified log Z interval
    tv: np.ndarray  # (B,) float64 approx mode's TV bound (0 in exact mode)
    stats: np.ndarray  # (B, 5) int64, columns ST_*
    status: np.ndarray  # (B,) int64: OK, COLLAPSED or GAVE_UP


@nb.njit(cache=True, parallel=True, nogil=True)
def trial_batch(T, queries, qidx, top_nodes, top, P, seed, excl, m, out):
    """`trial_one` for every row; row b's random stream is keyed by qidx[b] (any order,
    any thread count)."""
    status = out.status  # bound outside the loop: numba drops prange writes through a record
    for b in nb.prange(queries.shape[0]):
        key = splitmix64(splitmix64(U64(seed)) ^ U64(qidx[b]))
        ex_slots = excl.values[excl.ptr[b] : excl.ptr[b + 1]]
        status[b] = trial_one(T, queries[b], b, top_nodes, top, P, key, ex_slots, m[b], out)


@nb.njit(cache=True)  # no fastmath: the frontier sums rely on IEEE order
def trial_one(T, q, b, top_nodes, top, P, key, ex_slots, m, out):
    """Query b: plan and refine as `sample_one` (the same cut for the same Params), then
    m trials (`draw.draw_trials`) instead of draws until k are accepted. m < 0: as many
    as this index alone needs for k accepted ids with high probability,
    1.25 (k + 3 sqrt(k) + 3) U / L + 16 (approx mode: U / L read as 1), stopping early
    once the row's capacity of accepted ids is full.

    log_env: exact mode, the log of the proposal's total (upper bounds of unopened
    entries, exact masses of evaluated leaves): one trial is accepted with probability
    exactly Z / e^log_env. Approx mode: the log of the proposal mass on allowed targets.
    -inf when the certificate rules out every target of this index."""
    stats = out.stats[b]
    out.n[b] = 0
    out.tv[b] = 0.0
    Q, X, cut, status = plan_and_refine(T, q, b, top_nodes, top, P, ex_slots, stats)
    if status != OK:
        return status
    Mw = settle_shift(cut, P.exact)
    log_lo, log_up, Ua = certificate(cut, X)
    out.log_z[b, 0] = log_lo
    out.log_z[b, 1] = log_up
    if Ua <= 0.0:  # nothing allowed here
        out.log_env[b] = NEG_INF
        return OK
    q_ex = 0.0 if P.exact else hidden_excluded_proposal(T, cut, X)
    prop = build_proposal(cut, P.exact, q_ex, Mw)
    if not prop.total > 0.0 or not prop.total - prop.excluded > 0.0:
        return COLLAPSED
    out.log_env[b] = math.log(prop.total - prop.excluded) + Mw
    if not P.exact:
        out.tv[b] = tv_bound(cut, prop, Ua)
    stats[ST_FRONTIER] = prop.entry.shape[0]
    if m < 0:
        m = auto_trials(P, out.log_env[b] - log_lo, out.ids.shape[1])
    kept = TrialRow(out.ids[b], out.w[b], out.trial[b])
    n = draw_trials(T, Q, P, X, cut, prop, key, draw_batch_buffers(), m, kept, stats)
    if n < 0:
        return COLLAPSED
    out.n[b] = n
    return OK


@nb.njit(cache=True, inline="always")
def auto_trials(P, log_ratio, cap):
    """Trials that give k accepted ids with high probability at the acceptance rate
    L / U >= e^-log_ratio (exact mode: at most 10^9; they stop early once the row's
    cap accepted ids are stored), or k draws with slack (approx mode: at most cap)."""
    if not P.exact:
        return min(int(math.ceil(1.25 * (P.k + 3.0 * math.sqrt(P.k) + 3.0))) + 16, cap)
    want = 1.25 * (P.k + 3.0 * math.sqrt(P.k) + 3.0) * math.exp(min(log_ratio, 20.0)) + 16.0
    return int(min(math.ceil(want), 1e9))
