"""The sampler's draw stage: from a refined cut to k samples and a certified log Z.

Exact mode draws an entry in proportion to its upper bound (an evaluated leaf: its
exact mass), a uniform target below it, and accepts it with probability
e^(beta <q, y>) / e^(up) per target; accepted targets follow the softmax exactly,
whatever the cut. Approx mode draws from the proposal weights without rejection and
reports the proposal's own log-probability. docs/sampling.md has the derivations.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba as nb
import numpy as np

from .bounds import dot32
from .frontier import (
    ALL_EXCLUDED,
    COLLAPSED,
    ENTRIES,
    GAVE_UP,
    NEG_INF,
    OK,
    ST_ACCEPTED,
    ST_DOTS,
    ST_FRONTIER,
    ST_PROPOSALS,
    frontier_max,
    hidden_excluded_mass,
    is_excluded_slot,
    lse_shifted,
    reshift,
)
from .rng import U64, splitmix64, uniform01

# The TV estimate's extra draws use their own stream (the returned ids do not change).
TV_STREAM = U64(0x7476657374696D61)
# The estimate takes the unopened mass this many standard errors high: the TV estimate
# grows with the mass, so this biases it upward (docs/sampling.md).
TV_SE_UP = 1.0
# Half of those draws come from a wider proposal: each unopened node's log-weight moved
# this share of the way up to its log upper bound.
TV_WIDEN = 0.5


class Proposal(NamedTuple):
    """What draws are made from: an alias table over the alive entries of the cut."""

    entry: np.ndarray  # int64 cut entry of each alias slot
    weight: np.ndarray  # float64 its weight, relative to the shift
    prob: np.ndarray  # float64 Walker alias table
    alias: np.ndarray  # int64
    total: float  # sum of weight
    excluded: float  # approx mode: weight on excluded targets inside unopened nodes
    shift: float  # Mw: the shift of approx mode's proposal weights


@nb.njit(cache=True, inline="always")
def settle_shift(cut, exact):
    """Final shifts: M (bounds) moves down to the cut's largest upper bound, and approx
    mode's proposal weights get their own shift Mw. Returns Mw.

    An unopened node with a loose upper bound can set M far above every target's real
    weight; the lower bounds and proposal weights, which sit far below the upper ones,
    would then underflow to 0."""
    E, nf = cut.entries, cut.n[ENTRIES]
    if NEG_INF < frontier_max(E.up, E, nf) < cut.shift[0]:
        reshift(cut)
    Mw = cut.shift[0]
    if not exact:
        Mw = frontier_max(E.w, E, nf)
        if Mw > NEG_INF:
            for j in range(nf):
                E.ew[j] = lse_shifted(E.w[j], Mw)
    return Mw


@nb.njit(cache=True, inline="always")
def certificate(cut, X):
    """Certified (log lower, log upper) bound of log Z over the allowed targets, and the
    upper total relative to the shift (<= 0: nothing is allowed).

    The segment trees' totals are pairwise sums of positive terms: relative error
    below depth * 2^-52, covered by the pad."""
    M = cut.shift[0]
    U, L = cut.sums.up[1], cut.sums.lo[1]
    exw = hidden_excluded_mass(X, M)
    pad = (64 + X.slots.shape[0] + 8) * 2.3e-16
    La = L * (1.0 - pad) - exw * (1.0 + pad)
    Ua = U * (1.0 + pad) - exw * (1.0 - pad)
    log_lo = math.log(La) + M if La > 0.0 else NEG_INF
    log_up = math.log(Ua) + M if Ua > 0.0 else NEG_INF
    return log_lo, log_up, Ua


@nb.njit(cache=True)
def build_proposal(cut, exact, excluded, Mw):
    """One weight per alive entry: an evaluated leaf's exact mass, else the upper bound
    (exact mode: the rejection envelope) or the proposal weight (approx mode)."""
    E, nf = cut.entries, cut.n[ENTRIES]
    cap = cut.sums.up.shape[0] >> 1
    ent = np.empty(nf, np.int64)
    ew = np.empty(nf, np.float64)
    tot = 0.0
    ne = 0
    for j in range(nf):
        if not E.alive[j]:
            continue
        w = E.ew[j] if (E.off[j] >= 0 or not exact) else cut.sums.up[cap + j]
        tot += w
        ent[ne] = j
        ew[ne] = w
        ne += 1
    prob = np.empty(ne, np.float64)
    alias = np.empty(ne, np.int64)
    if tot > 0.0:  # else every weight underflowed: the caller reports COLLAPSED
        build_alias(ew, ne, tot, prob, alias)
    return Proposal(ent[:ne], ew[:ne], prob, alias, tot, excluded, Mw)


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
        l = large[nl - 1]  # noqa: E741
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


@nb.njit(cache=True, inline="always")
def hidden_excluded_proposal(T, cut, X):
    """Approx mode: proposal weight that falls on excluded targets still inside unopened
    nodes (renormalised away: those draws are discarded)."""
    E = cut.entries
    q_ex = 0.0
    for jx in range(X.slots.shape[0]):
        if X.hidden[jx]:
            e = find_entry(T, cut, X.slots[jx])
            if e >= 0:
                q_ex += E.ew[e] / T.count[E.node[e]]
    return q_ex


@nb.njit(cache=True)
def hidden_excluded_share(T, exact, X, cut):
    """Share of the proposal that falls on excluded targets hidden in unopened nodes
    (each is proposed like any target of its node: the node's weight / its count)."""
    E, nf = cut.entries, cut.n[ENTRIES]
    cap = cut.sums.up.shape[0] >> 1
    tot = 0.0
    for j in range(nf):
        if E.alive[j]:
            tot += cut.sums.up[cap + j] if (exact and E.off[j] < 0) else E.ew[j]
    waste = 0.0
    for jx in range(X.slots.shape[0]):
        if X.hidden[jx]:
            e = find_entry(T, cut, X.slots[jx])
            if e >= 0:
                w = cut.sums.up[cap + e] if exact else E.ew[e]
                waste += w / T.count[E.node[e]]
    if not tot > 0.0:
        return 1.0  # every weight underflowed under the shift: refining can only help
    return waste / tot


@nb.njit(cache=True)
def find_entry(T, cut, s):
    """The cut entry whose unopened node holds slot s."""
    E, nf = cut.entries, cut.n[ENTRIES]
    u = T.slot_leaf[s]
    while u >= 0:
        for j in range(nf):
            if E.alive[j] and E.off[j] < 0 and E.node[j] == u:
                return j
        u = T.parent[u]
    return -1


@nb.njit(cache=True, inline="always")
def tv_bound(cut, prop, Ua):
    """Approx mode's certified total-variation bound: 1 - sum_v min(L_v / U, W_v / W)
    over the entries, plus the over-count of excluded targets in that overlap."""
    cap = cut.sums.up.shape[0] >> 1
    allowed = prop.total - prop.excluded
    overlap = 0.0
    for jj in range(prop.entry.shape[0]):
        overlap += min(cut.sums.lo[cap + prop.entry[jj]] / Ua, prop.weight[jj] / allowed)
    return min(1.0, max(0.0, 1.0 - overlap + prop.excluded / allowed))


@nb.njit(cache=True, inline="always")
def alias_pick(prop, u):
    """The cut entry for a uniform u in [0, 1): Walker's alias method, O(1)."""
    ne = prop.entry.shape[0]
    r = u * ne
    jj = min(int(r), ne - 1)
    if r - jj >= prop.prob[jj]:
        jj = prop.alias[jj]
    return prop.entry[jj]


@nb.njit(cache=True, inline="always")
def leaf_pick(cut, off, end, u):
    """Score index of an evaluated leaf's target by its exact weight, or -1 when the
    draw lands on an excluded target (weight 0, kept only in rounding)."""
    S = cut.scores
    r = u * S.cum[end - 1]
    i = off + np.searchsorted(S.cum[off:end], r, side="right")
    if i >= end or S.w[i] == NEG_INF:
        return -1
    return i


@nb.njit(cache=True, inline="always")
def uniform_descendant(T, v, r):
    """The r-th target (0 <= r < count[v]) below v: one lookup when the subtree's
    slots are contiguous, else a descent by child counts."""
    while T.leaf_start[v] < 0:
        if T.node_lo[v] >= 0:
            return T.node_lo[v] + r
        c = T.first_child[v]
        while r >= T.count[c]:
            r -= T.count[c]
            c = T.next_sibling[c]
        v = c
    return T.leaf_start[v] + r


# A draw batch's proposal kinds: a target of an evaluated leaf (by its exact weight), a
# uniform target of an unopened node, or one that landed on an excluded target.
PROPOSED_LEAF, PROPOSED_NODE, PROPOSED_EXCLUDED = 0, 1, 2
DRAW_BATCH = 512  # proposals drawn ahead of their acceptance, at most


class TrialRow(NamedTuple):
    """One query's accepted trials (`draw_trials`): rows of the batch's outputs."""

    ids: np.ndarray  # int64 accepted ids
    w: np.ndarray  # float64 beta <q, y> (exact) or log-proposal probability (approx)
    trial: np.ndarray  # int64 the trial that accepted each


class DrawBatch(NamedTuple):
    """Proposals drawn ahead of their acceptance. Exact mode scores a batch's node
    proposals in one tight loop: their targets are random rows of the vectors, and
    independent loads in a short loop overlap their cache misses, which the accept /
    reject branches of one-at-a-time draws serialised."""

    kind: np.ndarray  # int64 PROPOSED_*
    entry: np.ndarray  # int64 the cut entry drawn
    at: np.ndarray  # int64 leaf: score index (-1 on an excluded target); node: slot
    u: np.ndarray  # float64 exact mode: the acceptance uniform of a node proposal
    wy: np.ndarray  # float64 exact mode: beta <q, y> of a node proposal's target


@nb.njit(cache=True)
def draw_batch_buffers():
    n = DRAW_BATCH
    return DrawBatch(
        np.empty(n, np.int64),
        np.empty(n, np.int64),
        np.empty(n, np.int64),
        np.empty(n, np.float64),
        np.empty(n, np.float64),
    )


@nb.njit(cache=True, inline="always")
def propose(T, P, X, cut, prop, key, ctr, B, m):
    """m proposals into B[:m]. Each takes the same counters of the stream as when
    proposals were drawn and accepted one at a time (an entry, a target, and for an
    exact-mode node proposal its acceptance uniform), so a batch changes no sample.
    Returns the next counter."""
    node, off = cut.entries.node, cut.entries.off
    count, leaf_size = T.count, T.leaf_size
    for t in range(m):
        j = alias_pick(prop, uniform01(key + ctr))
        ctr += U64(1)
        B.entry[t] = j
        v = node[j]
        if off[j] >= 0:
            B.kind[t] = PROPOSED_LEAF
            B.at[t] = leaf_pick(cut, off[j], off[j] + leaf_size[v], uniform01(key + ctr))
            ctr += U64(1)
            continue
        s = uniform_descendant(T, v, int(uniform01(key + ctr) * count[v]))
        ctr += U64(1)
        B.at[t] = s
        if is_excluded_slot(X, s):
            B.kind[t] = PROPOSED_EXCLUDED
            continue
        B.kind[t] = PROPOSED_NODE
        if P.exact:
            B.u[t] = uniform01(key + ctr)
            ctr += U64(1)
    return ctr


@nb.njit(cache=True, inline="always")
def score_proposals(T, Q, P, B, m):
    """Exact mode: beta <q, y> of the node proposals' targets (approx mode scores none)."""
    if P.exact:
        vecs, q, beta, kind, at, wy = T.vecs, Q.vec, P.beta, B.kind, B.at, B.wy
        for t in range(m):
            if kind[t] == PROPOSED_NODE:
                wy[t] = beta * dot32(q, vecs[at[t]])


@nb.njit(cache=True, inline="always")
def next_batch_size(k, acc, props):
    """Proposals to draw ahead: the expected need for the k - acc samples left at the
    acceptance rate so far, a quarter more, within [16, DRAW_BATCH]."""
    if acc == 0:
        return DRAW_BATCH if props > 0 else min(DRAW_BATCH, max(16, 2 * k))
    need = (k - acc) * props / acc
    return min(DRAW_BATCH, max(16, int(1.25 * need) + 1))


@nb.njit(cache=True, inline="always")
def take_proposal(T, P, cut, prop, B, t, log_allowed, stats):
    """Proposal t of batch B, taken in its turn: (its slot, its value) where the value
    is beta <q, y> in exact mode and the proposal's log-probability in approx mode, or
    (-1, 0.0) when it is dropped (an excluded target, or rejected)."""
    kind = B.kind[t]
    if kind == PROPOSED_EXCLUDED:
        return -1, 0.0
    if kind == PROPOSED_LEAF:
        i = B.at[t]
        if i < 0:
            return -1, 0.0
        w_y = cut.scores.w[i]
        return cut.scores.slot[i], (w_y if P.exact else w_y - prop.shift - log_allowed)
    j = B.entry[t]
    log_count = math.log(T.count[cut.entries.node[j]])
    if P.exact:  # approx mode's log q is the proposal's: no score needed
        stats[ST_DOTS] += 1
        if not B.u[t] < math.exp(B.wy[t] - cut.entries.up[j] + log_count):
            return -1, 0.0
        return B.at[t], B.wy[t]
    return B.at[t], cut.entries.w[j] - log_count - prop.shift - log_allowed


@nb.njit(cache=True, inline="always")
def unreached_scores(P, B, t0, m):
    """Node proposals of B[t0:m] that exact mode scored but never took: work all the same."""
    n = 0
    if P.exact:
        for t in range(t0, m):
            n += B.kind[t] == PROPOSED_NODE
    return n


@nb.njit(cache=True, _nrt=False)  # no allocation here: see sample.refine_in_place
def draw(T, Q, P, X, cut, prop, key, B, ids, log_q, stats):
    """k draws into ids / log_q (exact mode: beta <q, y>, normalised by the caller),
    proposed in batches (B: draw_batch_buffers). A batch's proposals are taken in
    order until k are accepted; node proposals scored but not reached count as work."""
    slot_id = T.slot_id
    log_allowed = math.log(prop.total - prop.excluded)
    props, acc = 0, 0
    ctr = U64(0)
    max_props = 1000 * P.k + 100000
    while acc < P.k:
        m = next_batch_size(P.k, acc, props)
        ctr = propose(T, P, X, cut, prop, key, ctr, B, m)
        score_proposals(T, Q, P, B, m)
        for t in range(m):
            if props >= max_props:
                return COLLAPSED  # cannot happen with valid bounds
            if P.exact and stats[ST_DOTS] >= P.give_up:  # loose bounds: cheaper to go dense
                return GAVE_UP
            props += 1
            s, value = take_proposal(T, P, cut, prop, B, t, log_allowed, stats)
            if s < 0:
                continue
            ids[acc] = slot_id[s]
            log_q[acc] = value
            acc += 1
            if acc == P.k:
                stats[ST_DOTS] += unreached_scores(P, B, t + 1, m)
                break
    stats[ST_PROPOSALS] = props
    stats[ST_ACCEPTED] = acc
    return OK


@nb.njit(cache=True)
def tv_estimate_stage(T, Q, P, X, cut, prop, key, log_lo, log_up):
    """Approx mode: an estimate of the TV distance between the proposal and the softmax
    from P.tv_draws extra targets drawn in the cut's unopened part and scored exactly
    (docs/sampling.md). Returns (estimate, inner products spent).

    The opened leaves' mass O is known exactly. The unopened mass and the unopened part
    of the TV are importance-sampled: half the draws from the proposal there, half from
    a wider one (log-weights moved TV_WIDEN of the way up to the node's upper bound,
    where mass the proposal underweights hides), each stratified over its cumulative
    weight and weighed against the mixture of the two."""
    node, off, w, up = cut.entries.node, cut.entries.off, cut.entries.w, cut.entries.up
    vecs, count = T.vecs, T.count
    ne = prop.entry.shape[0]
    cum = np.empty(ne, np.float64)  # cumulative proposal weight of the unopened entries
    uent = np.empty(ne, np.int64)
    opened, wall, nu = 0.0, 0.0, 0
    for jj in range(ne):  # the order of build_proposal's sum: O == total when all opened
        j = prop.entry[jj]
        if off[j] >= 0:
            opened += prop.weight[jj]
        else:
            wall += prop.weight[jj]
            cum[nu] = wall
            uent[nu] = j
            nu += 1
    if nu == 0:
        return 0.0, 0  # fully opened: the proposal is the softmax
    m = P.tv_draws if wall > 0.0 else 0  # no weight left unopened: nothing to draw
    # the wider proposal's log-weights, their shift and cumulative weight
    lwide = np.empty(nu, np.float64)
    mwide = NEG_INF
    for jj in range(nu):
        j = uent[jj]
        lwide[jj] = w[j] + TV_WIDEN * (up[j] - w[j]) if w[j] > NEG_INF else NEG_INF
        mwide = max(mwide, lwide[jj])
    cwide = np.empty(nu, np.float64)
    tw = 0.0
    for jj in range(nu):
        tw += math.exp(lwide[jj] - mwide) if lwide[jj] > NEG_INF else 0.0
        cwide[jj] = tw
    lz = np.empty(m, np.float64)  # log p~(y) / q'(y), q' the mixture density; -inf: excluded
    lqr = np.empty(m, np.float64)  # log Q(y) / q'(y)
    log_a, log_wall, log_tw = math.log(prop.total - prop.excluded), math.log(wall), math.log(tw)
    half = m // 2
    k2 = splitmix64(key ^ TV_STREAM)
    ctr = U64(0)
    for i in range(m):
        u = uniform01(k2 + ctr)
        if i < half:  # stratum i of the proposal
            jj = np.searchsorted(cum[:nu], (i + u) / half * wall, side="right")
        else:  # stratum i - half of the wider one
            jj = np.searchsorted(cwide, (i - half + u) / (m - half) * tw, side="right")
        j = uent[min(jj, nu - 1)]
        v = node[j]
        s = uniform_descendant(T, v, min(int(uniform01(k2 + ctr + U64(1)) * count[v]), count[v] - 1))
        ctr += U64(2)
        # both densities of y (per target: the node's share / its count)
        lq_u = w[j] - prop.shift - log_wall - math.log(count[v])
        lq_w = w[j] + TV_WIDEN * (up[j] - w[j]) - mwide - log_tw - math.log(count[v])
        hi = max(lq_u, lq_w)
        lmix = hi + math.log((half * math.exp(lq_u - hi) + (m - half) * math.exp(lq_w - hi)) / m)
        lqr[i] = lq_u + log_wall - log_a - lmix
        lz[i] = NEG_INF
        if not is_excluded_slot(X, s):
            lz[i] = P.beta * dot32(Q.vec, vecs[s]) - prop.shift - lmix
    est = tv_from_ratios(lz, lqr, opened, prop.total - prop.excluded, log_lo - prop.shift, log_up - prop.shift)
    return est, m


@nb.njit(cache=True)
def tv_from_ratios(lz, lqr, opened, allowed, log_lo, log_up):
    """TV(P, Q) = sum_y (Q(y) - P(y))_+ from the unopened draws: lz = log p~(y)/q'(y),
    lqr = log Q(y)/q'(y) (weights relative to the proposal's shift; lz = -inf: an
    excluded draw, which Q never returns).

    Z = O + Z_u with Z_u ~= mean(p~/q'), taken TV_SE_UP standard errors high and
    clipped into the certified [log_lo, log_up]. On the opened leaves Q / P = Z / A for
    every target, so their part is (O / A) (1 - A / Z)_+ exactly; the unopened part is
    the draws' mean of (Q - P)_+ / q'. Both grow with Z."""
    m = lz.shape[0]
    mx = NEG_INF
    for i in range(m):
        mx = max(mx, lz[i])
    log_zu = NEG_INF
    if mx > NEG_INF:
        s1, s2 = 0.0, 0.0
        for i in range(m):
            e = math.exp(lz[i] - mx) if lz[i] > NEG_INF else 0.0
            s1 += e
            s2 += e * e
        mean = s1 / m
        var = max(0.0, s2 / m - mean * mean) * m / max(m - 1, 1)
        log_zu = mx + math.log(mean + TV_SE_UP * math.sqrt(var / m))
    log_o = math.log(opened) if opened > 0.0 else NEG_INF
    if m == 0:
        log_z = log_up  # nothing to estimate Z_u from: its certified upper end
    else:
        hi = max(log_o, log_zu)
        log_z = hi + math.log(math.exp(log_o - hi) + math.exp(log_zu - hi)) if hi > NEG_INF else NEG_INF
    log_z = min(max(log_z, log_lo), log_up)
    tv = opened / allowed * max(0.0, 1.0 - math.exp(math.log(allowed) - log_z))
    acc = 0.0
    for i in range(m):
        if lz[i] > NEG_INF:
            acc += max(0.0, math.exp(lqr[i]) - math.exp(min(lz[i] - log_z, 700.0)))
        else:
            acc += 0.0  # an excluded target: Q(y) = P(y) = 0
    if m > 0:
        tv += acc / m
    return min(1.0, max(0.0, tv))


@nb.njit(cache=True, inline="always")
def draw_stage(T, Q, P, X, cut, key, out, b):
    """Certificate, proposal and draws for query b of the batch; returns its status."""
    Mw = settle_shift(cut, P.exact)
    log_lo, log_up, Ua = certificate(cut, X)
    if Ua <= 0.0:
        return ALL_EXCLUDED
    q_ex = 0.0 if P.exact else hidden_excluded_proposal(T, cut, X)
    prop = build_proposal(cut, P.exact, q_ex, Mw)
    if not prop.total > 0.0:
        return COLLAPSED  # every proposal weight underflowed (ruled out by the callers' checks)
    out.tv[b] = 0.0 if P.exact else tv_bound(cut, prop, Ua)
    stats = out.stats[b]
    status = draw(T, Q, P, X, cut, prop, key, draw_batch_buffers(), out.ids[b], out.log_q[b], stats)
    if status != OK:
        return status
    out.tv_est[b] = 0.0
    if not P.exact:
        if P.tv_draws > 0:
            est, dots = tv_estimate_stage(T, Q, P, X, cut, prop, key, log_lo, log_up)
            out.tv_est[b] = min(est, out.tv[b])  # the certified bound caps it
            stats[ST_DOTS] += dots
        else:
            out.tv_est[b] = np.nan
    if P.exact:
        # log Z estimate: the acceptance rate is Z / (proposal total), clipped into the
        # certificate
        props = stats[ST_PROPOSALS]
        est = math.log(prop.total) + cut.shift[0] + math.log(P.k / props)
        logz = min(max(est, log_lo), log_up)
        for i in range(P.k):
            out.log_q[b, i] = out.log_q[b, i] - logz
    out.log_z[b, 0] = log_lo
    out.log_z[b, 1] = log_up
    stats[ST_FRONTIER] = prop.entry.shape[0]
    return OK


@nb.njit(cache=True, _nrt=False)  # no allocation here: see sample.refine_in_place
def draw_trials(T, Q, P, X, cut, prop, key, B, m, kept, stats):
    """The draw stage as independent trials, for a sampler spread over several indexes.

    Exact mode: m trials against the cut (fewer if ids fills up first); each is accepted with probability
    Z / (the proposal's total), and an accepted target is distributed as the softmax over
    the allowed ids. Approx mode: proposals until m are kept (excluded ones are
    discarded, as in `draw`). Accepted ids go to kept.ids[:n] (kept: TrialRow), with
    beta <q, y> (exact) or their log-proposal probability (approx) in kept.w[:n] and the
    number of the trial that accepted each (from 0) in kept.trial[:n]. Returns n, or -1
    when approx mode stalls.
    Proposed in batches as in `draw` (B: draw_batch_buffers), with the same samples."""
    slot_id = T.slot_id
    ids, w, trial = kept
    log_allowed = math.log(prop.total - prop.excluded)
    props, acc = 0, 0
    ctr = U64(0)
    max_props = 1000 * m + 100000
    cap = ids.shape[0]
    while (props < m and acc < cap) if P.exact else (acc < m):
        n = min(DRAW_BATCH, m - props) if P.exact else next_batch_size(m, acc, props)
        ctr = propose(T, P, X, cut, prop, key, ctr, B, n)
        score_proposals(T, Q, P, B, n)
        for t in range(n):
            if props >= max_props:
                return -1
            props += 1
            s, value = take_proposal(T, P, cut, prop, B, t, log_allowed, stats)
            if s < 0:
                continue
            ids[acc] = slot_id[s]
            w[acc] = value
            trial[acc] = props - 1
            acc += 1
            if (acc == cap) if P.exact else (acc == m):
                stats[ST_DOTS] += unreached_scores(P, B, t + 1, n)
                break
    stats[ST_PROPOSALS] += props
    stats[ST_ACCEPTED] += acc
    return acc
