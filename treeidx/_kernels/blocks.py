"""Kernels of the batched approx sampler (treeidx/blocks.py).

The scores of every (node, query) pair the plan opened sit in one flat float32 buffer,
pair p at scores[off[p] : off[p] + size[p]] (the node's targets in its slot order).

* `pair_masses`: per pair, the float32 maximum c and the float64 sum of
  exp(beta (s - c)) (excluded targets carry -inf and weigh 0).
* `draw_blocks`: per query, log Z over its opened pairs and unopened nodes, and k
  inverse-CDF draws: a node by its mass, then a target inside it (by its exact
  weight in an opened node, uniformly in an unopened one).
* `tv_draws_blocks`: per query, m draws from the unopened part of the proposal,
  scored exactly, for the importance estimate of the proposal's TV to the softmax.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba as nb
import numpy as np

from .bounds import dot32
from .dense import chunk_max, chunk_weights, sum_f64
from .rng import uniform01

NEG_INF = -np.inf


class PairScores(NamedTuple):
    """The opened (node, query) pairs' scores: pair p's in scores[off[p] : off[p] + size[p]];
    pmax/psum: their float32 maximum and float64 sum of exp(beta (s - pmax))."""

    scores: np.ndarray
    off: np.ndarray
    size: np.ndarray
    pmax: np.ndarray
    psum: np.ndarray


class NodeSlots(NamedTuple):
    """Node j of the cut holds the slots slots[ptr[j] : ptr[j + 1]] (counts[j] of them)."""

    ptr: np.ndarray
    slots: np.ndarray
    counts: np.ndarray


@nb.njit(cache=True, parallel=True, nogil=True)
def pair_masses(scores, off, size, beta, out_max, out_sum):
    """Per opened pair: the maximum score c and the float64 sum of the float32 weights
    exp(beta (s - c)) (the dense pass's vectorised weights, `chunk_weights`)."""
    beta32 = np.float32(beta)
    for p in nb.prange(off.shape[0]):
        o, n = off[p], size[p]
        c = chunk_max(scores, o, o + n)
        out_max[p] = c
        if c == NEG_INF:
            out_sum[p] = 0.0
            continue
        w = np.empty(n, np.float32)
        chunk_weights(scores, o, o + n, c, beta32, w)
        out_sum[p] = sum_f64(w, n)


@nb.njit(cache=True, inline="always")
def log_total(logm):
    """logsumexp of a row of log masses (-inf entries weigh 0)."""
    m = NEG_INF
    for j in range(logm.shape[0]):
        m = max(m, logm[j])
    if m == NEG_INF:
        return m
    s = 0.0
    for j in range(logm.shape[0]):
        if logm[j] > NEG_INF:
            s += math.exp(logm[j] - m)
    return m + math.log(s)


@nb.njit(cache=True, inline="always")
def pick_in_pair(w, n, target):
    """Index in [0, n) where the running float64 sum of the pair's weights w (the same
    float32 weights `pair_masses` summed) passes `target`."""
    acc = 0.0
    last = -1
    for i in range(n):
        if w[i] > 0.0:
            acc += np.float64(w[i])
            last = i
            if acc > target:
                return i
    return last  # rounding: the sum fell just short of target


@nb.njit(cache=True, parallel=True, nogil=True)
def draw_blocks(logm, pair_of, P, L, beta, u, order, out):
    """k draws per query. logm (B, K): log mass of every node (opened: its exact mass;
    unopened: the clipped estimate); pair_of (B, K): the opened pair or -1; u (B, 2k):
    uniforms, the first k sorted ascending (their original positions in `order`), the
    last k pick inside a node. out: (slots (B, k), log_q (B, k), log_z (B,))."""
    scores, off, size, pmax, psum = P
    node_ptr, node_slots, counts = L
    out_slot, out_logq, out_lz = out
    K = logm.shape[1]
    k = order.shape[1]
    beta32 = np.float32(beta)
    wmax = max(1, np.max(counts))  # the largest node: one weight buffer per query
    for b in nb.prange(logm.shape[0]):
        w = np.empty(wmax, np.float32)
        w_of = -1  # the pair whose weights w holds: draws arrive grouped by node
        lz = log_total(logm[b])
        out_lz[b] = lz
        acc = 0.0
        j = -1
        mass_j = 0.0
        for t in range(k):
            target = u[b, t]
            while acc <= target and j < K - 1:
                j += 1
                mass_j = math.exp(logm[b, j] - lz) if logm[b, j] > NEG_INF else 0.0
                acc += mass_j
            while j > 0 and mass_j == 0.0:  # rounding past the last node with mass
                j -= 1
                mass_j = math.exp(logm[b, j] - lz) if logm[b, j] > NEG_INF else 0.0
            p = pair_of[b, j]
            if p >= 0:
                if w_of != p:
                    chunk_weights(scores, off[p], off[p] + size[p], pmax[p], beta32, w)
                    w_of = p
                i = pick_in_pair(w, size[p], u[b, k + t] * psum[p])
                slot = node_slots[node_ptr[j] + i]
                logq = beta * (np.float64(scores[off[p] + i]) - pmax[p]) + (beta * pmax[p] - lz)
            else:
                i = min(int(u[b, k + t] * counts[j]), counts[j] - 1)
                slot = node_slots[node_ptr[j] + i]
                logq = logm[b, j] - math.log(counts[j]) - lz
            out_slot[b, order[b, t]] = slot
            out_logq[b, order[b, t]] = logq


@nb.njit(cache=True, parallel=True, nogil=True)
def tv_draws_blocks(q, vecs, logm, pair_of, L, beta, u, out_logw, out_logr):
    """m draws per query from the unopened nodes' proposal r (a node by its estimated
    mass, a uniform target in it): out_logw = beta <q, y> (exact, float64 of a float32
    product) and out_logr = log r(y), relative to the unopened estimated total. u (B, 2m):
    the first m sorted ascending, the last m pick the target. A query with no unopened
    node gets -inf in both."""
    node_ptr, node_slots, counts = L
    K = logm.shape[1]
    m = out_logw.shape[1]
    for b in nb.prange(logm.shape[0]):
        c = NEG_INF
        for j in range(K):
            if pair_of[b, j] < 0 and logm[b, j] > c:
                c = logm[b, j]
        if c == NEG_INF:
            for t in range(m):
                out_logw[b, t] = NEG_INF
                out_logr[b, t] = NEG_INF
            continue
        tot = 0.0
        for j in range(K):
            if pair_of[b, j] < 0 and logm[b, j] > NEG_INF:
                tot += math.exp(logm[b, j] - c)
        ltot = c + math.log(tot)
        acc = 0.0
        j = -1
        mass_j = 0.0
        for t in range(m):
            while acc <= u[b, t] and j < K - 1:
                j += 1
                mass_j = math.exp(logm[b, j] - ltot) if pair_of[b, j] < 0 and logm[b, j] > NEG_INF else 0.0
                acc += mass_j
            while j > 0 and mass_j == 0.0:
                j -= 1
                mass_j = math.exp(logm[b, j] - ltot) if pair_of[b, j] < 0 and logm[b, j] > NEG_INF else 0.0
            i = min(int(u[b, m + t] * counts[j]), counts[j] - 1)
            slot = node_slots[node_ptr[j] + i]
            out_logw[b, t] = beta * np.float64(dot32(q[b], vecs[slot]))
            out_logr[b, t] = logm[b, j] - ltot - math.log(counts[j])


@nb.njit(cache=True, inline="always")
def search_cdf(cdf, t):
    """The first j with cdf[j] > t (the last index when rounding puts t past the end)."""
    lo, hi = 0, cdf.shape[0] - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cdf[mid] > t:
            hi = mid
        else:
            lo = mid + 1
    return lo


@nb.njit(cache=True, parallel=True, nogil=True)
def reject_blocks(q, vecs, logenv, lup, pair_of, P, L, beta, keys, cap, out):
    """Exact softmax draws by rejection against the block envelope: an opened node's
    targets by their exact weights (always accepted), an unopened node's with the
    per-target bound e^(lup) (a uniform target, accepted with probability
    e^(beta <q, y> - lup)). Proposals are i.i.d., so the accepted ones are exact draws.
    logenv (B, K): log envelope mass of each node; lup (B, K): beta times the upper
    bound of <q, y> below it. out: (slots (B, k), scores beta<q,y> (B, k), counts (B, 3):
    proposals, unopened proposals, unopened accepted); proposals is -1 when `cap`
    proposals did not give k acceptances."""
    scores, off, size, pmax, psum = P
    node_ptr, node_slots, counts = L
    out_slot, out_w, out_cnt = out
    K = logenv.shape[1]
    k = out_slot.shape[1]
    beta32 = np.float32(beta)
    wmax = max(1, np.max(counts))  # the largest node: one weight buffer per query
    for b in nb.prange(logenv.shape[0]):
        w = np.empty(wmax, np.float32)
        w_of = -1
        lenv = log_total(logenv[b])
        cdf = np.empty(K, np.float64)
        acc = 0.0
        for j in range(K):
            if logenv[b, j] > NEG_INF:
                acc += math.exp(logenv[b, j] - lenv)
            cdf[j] = acc
        key = keys[b]
        got = 0
        # proposals, unopened proposals, unopened acceptances (an array: numba's parfor
        # pass took scalar counters updated in this inner loop for reductions)
        cnt = np.zeros(3, np.int64)
        ctr = np.uint64(0)
        while got < k and cnt[0] < cap:
            j = search_cdf(cdf, uniform01(key + ctr) * acc)
            u2 = uniform01(key + ctr + np.uint64(1))
            u3 = uniform01(key + ctr + np.uint64(2))
            ctr += np.uint64(3)
            cnt[0] += 1
            p = pair_of[b, j]
            if p >= 0:
                if w_of != p:
                    chunk_weights(scores, off[p], off[p] + size[p], pmax[p], beta32, w)
                    w_of = p
                i = pick_in_pair(w, size[p], u2 * psum[p])
                out_slot[b, got] = node_slots[node_ptr[j] + i]
                out_w[b, got] = beta * np.float64(scores[off[p] + i])
                got += 1
            else:
                i = min(int(u2 * counts[j]), counts[j] - 1)
                slot = node_slots[node_ptr[j] + i]
                s = beta * np.float64(dot32(q[b], vecs[slot]))
                cnt[1] += 1
                if u3 < math.exp(s - lup[b, j]):
                    out_slot[b, got] = slot
                    out_w[b, got] = s
                    got += 1
                    cnt[2] += 1
        out_cnt[b, 0] = cnt[0] if got == k else -1
        out_cnt[b, 1] = cnt[1]
        out_cnt[b, 2] = cnt[2]
