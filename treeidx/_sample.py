"""numba kernels of the softmax sampler (BRIEF §3): frontier refinement, then draws.

Per query: a frontier (a cut of the tree) whose entries are either unopened
nodes, with certified log-mass bounds [log n + beta*lo, log n + beta*up], or
evaluated leaves, whose targets' exact log-weights beta*<q, y> sit in a score
buffer. The entry with the largest gap (upper - lower mass) is refined first.

Sums are kept in float64 relative to a shift M (the largest log-upper seen), so
exp never overflows; they are recomputed from the frontier whenever a large
cancellation could have eaten their precision.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

from ._bounds import dot32, dot_error, node_bounds
from ._build import U64, splitmix64, uniform01
from ._search import grow_f, heap_pop, heap_push, heapify

NEG_INF = -np.inf

# per-query statistics columns
ST_OPENED, ST_DOTS, ST_PROPOSALS, ST_ACCEPTED, ST_FRONTIER = range(5)
# per-query status: 0 done; everything excluded; acceptance collapsed; exact-mode work
# reached `give_up` (the caller redoes the query densely)
OK, ALL_EXCLUDED, COLLAPSED, GAVE_UP = 0, -1, -2, -3


@nb.njit(cache=True, inline="always")
def log_gap(lo: float, up: float) -> float:
    """log(e^up - e^lo), for lo <= up."""
    if up == NEG_INF:
        return NEG_INF
    d = lo - up
    if d > -1e-300:
        return NEG_INF
    return up + math.log(-math.expm1(d))


@nb.njit(cache=True)
def grow_frontier(n, f_node, f_lo, f_up, f_w, f_off, f_alive, f_blo, f_bup, f_ew):
    """The frontier arrays with room for index n (unchanged when they have it)."""
    return (grow_f(f_node, n), grow_f(f_lo, n), grow_f(f_up, n), grow_f(f_w, n), grow_f(f_off, n),
            grow_f(f_alive, n), grow_f(f_blo, n), grow_f(f_bup, n), grow_f(f_ew, n))


@nb.njit(cache=True, inline="always")
def lse_shifted(x, M):
    return math.exp(x - M) if x > NEG_INF else 0.0


@nb.njit(cache=True)  # no fastmath: the frontier sums rely on IEEE order
def _sample_one(q, top_nodes, t_blo, t_bup, t_flo, t_fup, t_w, t_prio, t_eu, t_el, t_ew, t_M,
                beta, k, exact, tol, budget, draw_cost, give_up, key,
                vecs, slot_id, center, csq, radius, nu_min, nu_max, sqsum, count,
                first_child, next_sibling, leaf_start, leaf_size, slot_leaf, parent, node_lo,
                ex_slots, out_ids, out_logq, out_logz, out_tv, stats):
    dim = q.shape[0]
    qn2 = 0.0
    for t in range(dim):
        qn2 += float(q[t]) * float(q[t])
    qnorm = math.sqrt(qn2)
    # --- frontier arrays (entry e): node, log-lower, log-upper, log-proposal, exact-leaf offset
    cap = 256
    f_node = np.empty(cap, np.int64)
    f_lo = np.empty(cap, np.float64)
    f_up = np.empty(cap, np.float64)
    f_w = np.empty(cap, np.float64)
    f_off = np.empty(cap, np.int64)      # >= 0: evaluated leaf, offset into the score buffer
    f_alive = np.empty(cap, np.bool_)
    f_blo = np.empty(cap, np.float64)    # node's bounds on <q, y> (for acceptance)
    f_bup = np.empty(cap, np.float64)
    f_ew = np.empty(cap, np.float64)     # e^(f_w - M): the proposal weight under the shift M
    nf = 0
    sc_w = np.empty(1024, np.float64)    # beta * <q, y> of evaluated targets (-inf if excluded)
    sc_slot = np.empty(1024, np.int64)
    sc_cum = np.empty(1024, np.float64)  # running sum of e^(w - leaf max) within each leaf
    nsc = 0
    hk = np.empty(256, np.float64)
    hv = np.empty(256, np.int64)
    hs = 0
    # excluded targets: exact weights, and whether they still hide inside an unopened node
    nex = ex_slots.shape[0]
    ex_w = np.empty(nex, np.float64)
    for j in range(nex):
        s = ex_slots[j]
        ex_w[j] = beta * dot32(q, vecs[s])
    ex_open = np.ones(nex, np.bool_)
    # --- root entry
    # --- the root is opened for every query alike: its children (the top level) arrive
    # with their bounds, proposal weights and priorities computed for the whole batch
    ntop = top_nodes.shape[0]
    if ntop >= cap:
        f_node, f_lo, f_up, f_w, f_off, f_alive, f_blo, f_bup, f_ew = grow_frontier(
            ntop, f_node, f_lo, f_up, f_w, f_off, f_alive, f_blo, f_bup, f_ew)
        hk = grow_f(hk, ntop); hv = grow_f(hv, ntop)
    for j in range(ntop):
        f_node[j], f_off[j], f_alive[j] = top_nodes[j], -1, True
        f_lo[j], f_up[j], f_w[j] = t_flo[j], t_fup[j], t_w[j]
        f_blo[j], f_bup[j] = t_blo[j], t_bup[j]
        hk[j], hv[j] = t_prio[j], j
    nf = ntop
    hs = ntop
    heapify(hk, hv, hs)
    # The top level's shifted weights come exponentiated in bulk (numpy) with their shift.
    M = t_M
    for j in range(ntop):
        f_ew[j] = t_ew[j]
    # The totals U, L (relative to the shift M) live in two segment trees over the
    # frontier entries: an update recomputes parent sums from children, so no
    # subtraction ever cancels precision, and the totals stay exact to rounding.
    scap = 1
    while scap < 2 * nf + 64:
        scap *= 2
    segU = np.zeros(2 * scap, np.float64)
    segL = np.zeros(2 * scap, np.float64)
    for j in range(ntop):
        segU[scap + j] = t_eu[j]
        segL[scap + j] = t_el[j]
    seg_build(segU, segL, scap)
    U, L = segU[1], segL[1]
    dots, opened = nex + ntop, 1
    # forced: the refinement rules have stopped, but excluded targets inside unopened
    # nodes would take most of the proposals (each one a rejected draw): open the
    # entries that hold them, whatever the budget, until none is left
    forced = False
    while True:
        if exact and dots >= give_up:
            stats[ST_OPENED], stats[ST_DOTS] = opened, dots  # work wasted, reported
            return GAVE_UP
        if forced:
            jx = -1
            for j in range(nex):
                if ex_open[j]:
                    jx = j
                    break
            if jx < 0:
                break
            e = find_entry(ex_slots[jx], slot_leaf, parent, f_node, f_alive, f_off, nf)
            if e < 0:  # not inside an unopened node (cannot happen while ex_open)
                ex_open[jx] = False
                continue
        else:
            # --- stopping rule
            exw = 0.0
            for j in range(nex):
                if ex_open[j]:
                    exw += lse_shifted(ex_w[j], M)
            La = L - exw
            Ua = U - exw
            stop = hs == 0 or (La > 0.0 and Ua <= (1.0 + tol) * La) or dots >= budget
            if not stop:
                gk, e, hs = heap_pop(hk, hv, hs)
                if not f_alive[e] or gk == NEG_INF:
                    continue
                if exact and La > 0.0:
                    # cost-aware: refining e saves at most k * gap/La proposals of draw_cost each
                    saved = k * math.exp(gk - M) / La * draw_cost
                    if saved < open_cost(f_node[e], leaf_start, leaf_size, first_child, next_sibling):
                        hk, hv, hs = heap_push(hk, hv, hs, gk, e)  # keep it; its mass is still drawable
                        stop = True
            if stop:
                if nex > 0 and excluded_share(exact, ex_slots, ex_open, slot_leaf, parent, f_node,
                                              f_alive, f_off, f_ew, segU, scap, count, nf) > 0.5:
                    forced = True
                    continue
                break
        v = f_node[e]
        cost = open_cost(v, leaf_start, leaf_size, first_child, next_sibling)
        f_alive[e] = False
        opened += 1
        seg_set(segU, segL, scap, e, 0.0, 0.0)
        if leaf_start[v] >= 0:
            s0 = leaf_start[v]
            m = leaf_size[v]
            sc_w = grow_f(sc_w, nsc + m)
            sc_slot = grow_f(sc_slot, nsc + m)
            sc_cum = grow_f(sc_cum, nsc + m)
            mx, lsum_lo, lsum_up = NEG_INF, 0.0, 0.0
            for i in range(m):
                s = s0 + i
                sc = dot32(q, vecs[s])
                w = beta * sc
                # a target excluded for this query weighs nothing here
                for j in range(nex):
                    if ex_slots[j] == s:
                        w = NEG_INF
                        ex_open[j] = False
                sc_w[nsc + i] = w
                sc_slot[nsc + i] = s
            dots += m
            err = beta * dot_error(dim, qnorm, nu_max[v])
            # log-sum with the leaf's own max as shift: relative to M its mass may underflow
            for i in range(m):
                mx = max(mx, sc_w[nsc + i])
            for i in range(m):
                w = sc_w[nsc + i]
                if w > NEG_INF:
                    lsum_lo += math.exp(w - mx)
                sc_cum[nsc + i] = lsum_lo
            lsum_up = lsum_lo
            nf_i = nf
            if nf >= f_node.shape[0]:
                f_node, f_lo, f_up, f_w, f_off, f_alive, f_blo, f_bup, f_ew = grow_frontier(
                    nf, f_node, f_lo, f_up, f_w, f_off, f_alive, f_blo, f_bup, f_ew)
            f_node[nf_i], f_off[nf_i], f_alive[nf_i] = v, nsc, True
            f_w[nf_i] = math.log(lsum_up) + mx if lsum_up > 0.0 else NEG_INF  # exact log-sum
            f_lo[nf_i] = math.log(lsum_lo) + mx - err if lsum_lo > 0.0 else NEG_INF
            f_up[nf_i] = math.log(lsum_up) + mx + err if lsum_up > 0.0 else NEG_INF
            lsum_lo = lse_shifted(f_lo[nf_i], M)
            lsum_up = lse_shifted(f_up[nf_i], M)
            f_ew[nf_i] = lse_shifted(f_w[nf_i], M)
            f_blo[nf_i], f_bup[nf_i] = 0.0, 0.0
            nf += 1
            nsc += m
            if nf_i >= scap:
                segU, segL, scap = seg_grow(segU, segL, scap)
            seg_set(segU, segL, scap, nf_i, lsum_up, lsum_lo)
            # float32 rounding of the scores is the only gap left: never refine again
        else:
            plo, pup = f_blo[e], f_bup[e]
            last = nf + cost
            if last >= f_node.shape[0]:  # room for every child at once
                f_node, f_lo, f_up, f_w, f_off, f_alive, f_blo, f_bup, f_ew = grow_frontier(
                    last, f_node, f_lo, f_up, f_w, f_off, f_alive, f_blo, f_bup, f_ew)
            c = first_child[v]
            while c >= 0:
                a = dot32(q, center[c])
                lo, up = node_bounds(a, qnorm, csq[c], radius[c], nu_min[c], nu_max[c], dim)
                lo, up = max(lo, plo), min(up, pup)  # both bound the child's targets
                if up < lo:
                    up = lo
                lc = math.log(count[c])
                f_node[nf], f_off[nf], f_alive[nf] = c, -1, True
                f_lo[nf], f_up[nf] = lc + beta * lo, lc + beta * up
                f_blo[nf], f_bup[nf] = lo, up
                # proposal (approx mode): second-moment estimate of the node's mass,
                # clipped into its certified interval
                msd = sqsum[c] / max(count[c], 1)
                est = lc + beta * a + 0.5 * beta * beta * qn2 * msd / dim
                f_w[nf] = min(max(est, f_lo[nf]), f_up[nf])
                if nf >= scap:
                    segU, segL, scap = seg_grow(segU, segL, scap)
                seg_set(segU, segL, scap, nf, lse_shifted(f_up[nf], M), lse_shifted(f_lo[nf], M))
                f_ew[nf] = lse_shifted(f_w[nf], M)
                # exact mode refines where the envelope wastes most (the gap); approx
                # mode where the estimated mass is largest, as an IVF probes its best lists
                prio = log_gap(f_lo[nf], f_up[nf]) if exact else f_w[nf]
                hk, hv, hs = heap_push(hk, hv, hs, prio, nf)
                nf += 1
                c = next_sibling[c]
            dots += cost
        # precision guard: re-sum from the frontier once cancellation could matter
        U, L = segU[1], segL[1]
        if U < 1e-250:  # everything shrank far below the shift: re-shift
            M = reshift(segU, segL, scap, f_up, f_lo, f_w, f_ew, f_alive, nf)
            U, L = segU[1], segL[1]
    # Re-shift to the final cut's largest upper bound: a node whose (loose) upper bound
    # set M far above every target's real weight would otherwise leave the lower
    # bounds and proposal weights, which sit far below the upper ones, underflowing to 0.
    if NEG_INF < frontier_max(f_up, f_alive, nf) < M:
        M = reshift(segU, segL, scap, f_up, f_lo, f_w, f_ew, f_alive, nf)
    # Approx mode draws from the proposal weights alone: shift them by their own
    # largest, so that an unopened node with a loose upper bound far above every
    # proposal weight cannot make them all underflow.
    Mw = M
    if not exact:
        Mw = frontier_max(f_w, f_alive, nf)
        if Mw > NEG_INF:
            for j in range(nf):
                f_ew[j] = lse_shifted(f_w[j], Mw)
    # --- certified log Z interval of the allowed targets: the segment trees' totals are
    # pairwise sums of positive terms (relative error < depth * 2^-52, padded below)
    U, L = segU[1], segL[1]
    exw = 0.0
    for j in range(nex):
        if ex_open[j]:
            exw += lse_shifted(ex_w[j], M)
    pad = (64 + nex + 8) * 2.3e-16
    La = L * (1.0 - pad) - exw * (1.0 + pad)
    Ua = U * (1.0 + pad) - exw * (1.0 - pad)
    if Ua <= 0.0:
        return ALL_EXCLUDED
    log_lo = math.log(La) + M if La > 0.0 else NEG_INF
    log_up = math.log(Ua) + M
    # --- proposal: per alive entry a weight; exact leaves expand to their targets
    ent = np.empty(nf, np.int64)
    ew = np.empty(nf, np.float64)
    tot = 0.0
    ne = 0
    for j in range(nf):
        if not f_alive[j]:
            continue
        if f_off[j] >= 0 or not exact:
            w = f_ew[j]  # an opened leaf's exact weight, or the approx proposal's
        else:
            w = segU[scap + j]  # the rejection envelope: the upper bound
        tot += w
        ent[ne] = j
        ew[ne] = w
        ne += 1
    if not tot > 0.0:
        return COLLAPSED  # every proposal weight underflowed (ruled out by the callers' checks)
    a_prob = np.empty(ne, np.float64)
    a_alias = np.empty(ne, np.int64)
    build_alias(ew, ne, tot, a_prob, a_alias)
    # proposal mass sitting on excluded targets inside unopened nodes (renormalised away)
    q_ex = 0.0
    if not exact:
        for jx in range(nex):
            if ex_open[jx]:
                e = find_entry(ex_slots[jx], slot_leaf, parent, f_node, f_alive, f_off, nf)
                if e >= 0:
                    q_ex += f_ew[e] / count[f_node[e]]
    # certified TV bound (approx): 1 - sum_v min(L_v / U_alw, W_v / W_alw)
    tv = 0.0
    if not exact:
        overlap = 0.0
        for jj in range(ne):
            j = ent[jj]
            wj = ew[jj]
            overlap += min(segL[scap + j] / Ua, wj / (tot - q_ex))
        # counting excluded targets as overlap above over-counts it by at most this much
        tv = min(1.0, max(0.0, 1.0 - overlap + q_ex / (tot - q_ex)))
    out_tv[0] = tv
    # --- draws
    props, acc = 0, 0
    ctr = U64(0)
    max_props = 1000 * k + 100000
    while acc < k:
        if props >= max_props:
            return COLLAPSED  # cannot happen with valid bounds
        if exact and dots >= give_up:  # loose bounds: draws cost more than a dense pass
            stats[ST_OPENED], stats[ST_DOTS] = opened, dots
            return GAVE_UP
        props += 1
        # an entry by Walker's alias method: O(1) whatever the frontier size
        r = uniform01(key + ctr) * ne
        ctr += U64(1)
        jj = min(int(r), ne - 1)
        if r - jj >= a_prob[jj]:
            jj = a_alias[jj]
        j = ent[jj]
        v = f_node[j]
        if f_off[j] >= 0:  # evaluated leaf: pick a target by its exact weight
            off, end = f_off[j], f_off[j] + leaf_size[v]
            r2 = uniform01(key + ctr) * sc_cum[end - 1]
            ctr += U64(1)
            i = off + np.searchsorted(sc_cum[off:end], r2, side="right")
            if i >= end or sc_w[i] == NEG_INF:
                continue
            s = sc_slot[i]
            w_y = sc_w[i]
            lq = sc_w[i] - Mw - math.log(tot - q_ex)
        else:  # unopened node: a uniform target below it
            r2 = int(uniform01(key + ctr) * count[v])
            ctr += U64(1)
            s = uniform_descendant(v, r2, first_child, next_sibling, leaf_start, count, node_lo)
            excluded = False
            for jx in range(nex):
                if ex_slots[jx] == s:
                    excluded = True
            if excluded:
                continue
            w_y = 0.0
            if exact:  # approx mode's log q is the proposal's: no score needed
                w_y = beta * dot32(q, vecs[s])
                dots += 1
                if uniform01(key + ctr) >= math.exp(w_y - f_up[j] + math.log(count[v])):
                    ctr += U64(1)
                    continue
                ctr += U64(1)
            lq = f_w[j] - math.log(count[v]) - Mw - math.log(tot - q_ex)
        out_ids[acc] = slot_id[s]
        out_logq[acc] = w_y if exact else lq
        acc += 1
    if exact:
        # log Z estimate: the acceptance rate is Z / (proposal total), clipped into the certificate
        est = math.log(tot) + M + math.log(acc / props)
        logz = min(max(est, log_lo), log_up)
        for i in range(k):
            out_logq[i] = out_logq[i] - logz
    out_logz[0] = log_lo
    out_logz[1] = log_up
    stats[ST_OPENED] = opened
    stats[ST_DOTS] = dots
    stats[ST_PROPOSALS] = props
    stats[ST_ACCEPTED] = acc
    stats[ST_FRONTIER] = ne
    return OK


@nb.njit(cache=True)
def build_alias(w, n, total, prob, alias):
    """Vose's alias table for weights w[:n] summing to total."""
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    ns, nl = 0, 0
    scaled = np.empty(n, np.float64)
    for i in range(n):
        scaled[i] = w[i] * n / total
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        l = large[nl - 1]
        prob[s] = scaled[s]
        alias[s] = l
        scaled[l] = (scaled[l] + scaled[s]) - 1.0
        if scaled[l] < 1.0:
            nl -= 1
            small[ns] = l
            ns += 1
    for i in range(nl):
        prob[large[i]] = 1.0
        alias[large[i]] = large[i]
    for i in range(ns):  # only rounding leaves entries here
        prob[small[i]] = 1.0
        alias[small[i]] = small[i]


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


@nb.njit(cache=True, inline="always")
def seg_set(segU, segL, cap, j, u, l):
    """Set entry j's (upper, lower) weight and recompute its ancestors' sums."""
    i = cap + j
    segU[i] = u
    segL[i] = l
    i >>= 1
    while i >= 1:
        segU[i] = segU[2 * i] + segU[2 * i + 1]
        segL[i] = segL[2 * i] + segL[2 * i + 1]
        i >>= 1


@nb.njit(cache=True)
def seg_build(segU, segL, cap):
    """Internal sums of both segment trees from their leaves."""
    for i in range(cap - 1, 0, -1):
        segU[i] = segU[2 * i] + segU[2 * i + 1]
        segL[i] = segL[2 * i] + segL[2 * i + 1]


@nb.njit(cache=True)
def seg_grow(segU, segL, cap):
    """Double the capacity, keeping every leaf."""
    nu = np.zeros(4 * cap, np.float64)
    nl = np.zeros(4 * cap, np.float64)
    nu[2 * cap: 3 * cap] = segU[cap: 2 * cap]
    nl[2 * cap: 3 * cap] = segL[cap: 2 * cap]
    seg_build(nu, nl, 2 * cap)
    return nu, nl, 2 * cap


@nb.njit(cache=True)
def seg_fill(segU, segL, cap, f_up, f_lo, f_alive, nf, M):
    """Rebuild both segment trees from the frontier under shift M."""
    segU[:] = 0.0
    segL[:] = 0.0
    for j in range(nf):
        if f_alive[j]:
            segU[cap + j] = lse_shifted(f_up[j], M)
            segL[cap + j] = lse_shifted(f_lo[j], M)
    for i in range(cap - 1, 0, -1):
        segU[i] = segU[2 * i] + segU[2 * i + 1]
        segL[i] = segL[2 * i] + segL[2 * i + 1]


@nb.njit(cache=True)
def reshift(segU, segL, cap, f_up, f_lo, f_w, f_ew, f_alive, nf):
    """Move the shift M to the frontier's largest log-upper bound: re-sum both
    segment trees and re-exponentiate the proposal weights under it. Returns M."""
    M = frontier_max(f_up, f_alive, nf)
    seg_fill(segU, segL, cap, f_up, f_lo, f_alive, nf, M)
    for j in range(nf):
        f_ew[j] = lse_shifted(f_w[j], M)
    return M


@nb.njit(cache=True)
def frontier_max(f_up, f_alive, nf):
    """The largest log-upper bound of the alive frontier (the shift M)."""
    M = NEG_INF
    for j in range(nf):
        if f_alive[j] and f_up[j] > M:
            M = f_up[j]
    return M


@nb.njit(cache=True, inline="always")
def uniform_descendant(v, r, first_child, next_sibling, leaf_start, count, node_lo):
    """The r-th target (0 <= r < count[v]) below v: one lookup when the subtree's
    slots are contiguous, else a descent by child counts."""
    while leaf_start[v] < 0:
        if node_lo[v] >= 0:
            return node_lo[v] + r
        c = first_child[v]
        while r >= count[c]:
            r -= count[c]
            c = next_sibling[c]
        v = c
    return leaf_start[v] + r


@nb.njit(cache=True, inline="always")
def open_cost(v, leaf_start, leaf_size, first_child, next_sibling):
    """Inner products to open node v: its leaf's targets, or one per child."""
    if leaf_start[v] >= 0:
        return leaf_size[v]
    cost = 0
    c = first_child[v]
    while c >= 0:
        cost += 1
        c = next_sibling[c]
    return cost


@nb.njit(cache=True)
def excluded_share(exact, ex_slots, ex_open, slot_leaf, parent, f_node, f_alive, f_off, f_ew,
                   segU, scap, count, nf):
    """Share of the proposal that falls on excluded targets inside unopened nodes (each is
    proposed like any target of its node: the node's weight / its count)."""
    tot = 0.0
    for j in range(nf):
        if f_alive[j]:
            tot += segU[scap + j] if (exact and f_off[j] < 0) else f_ew[j]
    waste = 0.0
    for jx in range(ex_slots.shape[0]):
        if ex_open[jx]:
            e = find_entry(ex_slots[jx], slot_leaf, parent, f_node, f_alive, f_off, nf)
            if e >= 0:
                w = segU[scap + e] if exact else f_ew[e]
                waste += w / count[f_node[e]]
    if not tot > 0.0:
        return 1.0  # every weight underflowed under the shift: refining can only help
    return waste / tot


@nb.njit(cache=True)
def find_entry(s, slot_leaf, parent, f_node, f_alive, f_off, nf):
    """Frontier entry whose unopened node holds slot s."""
    u = slot_leaf[s]
    while u >= 0:
        for j in range(nf):
            if f_alive[j] and f_off[j] < 0 and f_node[j] == u:
                return j
        u = parent[u]
    return -1


@nb.njit(cache=True, parallel=True, nogil=True)
def sample_batch(queries, qidx, top_nodes, t_blo, t_bup, t_flo, t_fup, t_w, t_prio, t_eu, t_el,
                 t_ew, t_M,
                 beta, k, exact, tol, budget, draw_cost, give_up, seed,
                 vecs, slot_id, center, csq, radius, nu_min, nu_max, sqsum, count,
                 first_child, next_sibling, leaf_start, leaf_size, slot_leaf, parent, node_lo,
                 ex_ptr, ex_slots, out_ids, out_logq, out_logz, out_tv, stats, status):
    """Rows may come in any order: each row's random stream is keyed by its
    original index qidx[b], so results do not depend on order or thread count."""
    for b in nb.prange(queries.shape[0]):
        key = splitmix64(splitmix64(U64(seed)) ^ U64(qidx[b]))
        status[b] = _sample_one(queries[b], top_nodes, t_blo[b], t_bup[b], t_flo[b], t_fup[b],
                                t_w[b], t_prio[b], t_eu[b], t_el[b], t_ew[b], t_M[b], beta, k, exact, tol, budget, draw_cost, give_up, key,
                                vecs, slot_id, center, csq, radius, nu_min, nu_max, sqsum, count,
                                first_child, next_sibling, leaf_start, leaf_size, slot_leaf, parent,
                                node_lo, ex_slots[ex_ptr[b]: ex_ptr[b + 1]],
                                out_ids[b], out_logq[b], out_logz[b], out_tv[b:b + 1], stats[b])
