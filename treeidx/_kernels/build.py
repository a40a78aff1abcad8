"""Kernels of the bulk build: k-means splits, node statistics, parent/child links.

Randomness comes from a counter-based hash keyed by (seed, node), so the tree is
identical whatever the number of threads.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .bounds import FAST
from .rng import U64, splitmix64, uniform01


@nb.njit(cache=True, fastmath=FAST)
def kmeans_split(x, perm, lo, hi, fanout, iters, key, labels, centers):
    """Split perm[lo:hi] into <= fanout groups by k-means; reorder perm in place.

    Returns the group boundaries (array of length g+1, offsets from lo). Falls back
    to an even split when k-means finds a single group (duplicates), so every
    group is strictly smaller than the parent.
    """
    m = hi - lo
    d = x.shape[1]
    f = min(fanout, m)
    # init: distinct random members (hash-seeded partial Fisher-Yates over positions)
    picks = np.arange(m)
    for j in range(f):
        r = j + int(uniform01(key + U64(j)) * (m - j))
        picks[j], picks[r] = picks[r], picks[j]
        centers[j, :] = x[perm[lo + picks[j]]]
    sums = np.zeros((f, d), np.float64)
    counts = np.zeros(f, np.int64)
    for it in range(iters):
        sums[:] = 0.0
        counts[:] = 0
        for i in range(m):
            row = x[perm[lo + i]]
            best, bj = np.inf, 0
            for j in range(f):
                s = np.float32(0.0)
                for t in range(d):
                    diff = row[t] - centers[j, t]
                    s += diff * diff
                if s < best:
                    best, bj = s, j
            labels[i] = bj
            counts[bj] += 1
            for t in range(d):
                sums[bj, t] += row[t]
        if it + 1 < iters:
            for j in range(f):
                if counts[j] > 0:
                    for t in range(d):
                        centers[j, t] = sums[j, t] / counts[j]
    ngroups = 0
    for j in range(f):
        if counts[j] > 0:
            ngroups += 1
    bounds = np.zeros(max(ngroups, 2) + 1, np.int64)
    if ngroups < 2:  # all points (nearly) identical: split evenly
        g = min(f, m) if f >= 2 else 2
        bounds = np.zeros(g + 1, np.int64)
        for j in range(g + 1):
            bounds[j] = (j * m) // g
        return bounds
    # counting sort of perm[lo:hi] by label, dropping empty groups
    gid = np.full(f, -1, np.int64)
    g = 0
    for j in range(f):
        if counts[j] > 0:
            gid[j] = g
            bounds[g + 1] = bounds[g] + counts[j]
            g += 1
    cursor = bounds[:-1].copy()
    tmp = perm[lo:hi].copy()
    for i in range(m):
        gg = gid[labels[i]]
        perm[lo + cursor[gg]] = tmp[i]
        cursor[gg] += 1
    return bounds


@nb.njit(cache=True, parallel=True)
def partition_clusters(
    x, perm, cluster_bounds, leaf_size, fanout, iters, seed, node_lo, node_hi, node_parent, node_count_out
):
    """Recursively split each top-level cluster (in parallel); record nodes in preorder.

    Cluster c covers perm[cluster_bounds[c]:cluster_bounds[c+1]]; its nodes are
    written to rows [2*cluster_bounds[c], 2*cluster_bounds[c+1]) of node_lo,
    node_hi (global slot ranges) and node_parent (index local to the cluster,
    -1 for the cluster root). node_count_out[c] receives the number of nodes.
    """
    nclusters = cluster_bounds.shape[0] - 1
    d = x.shape[1]
    for c in nb.prange(nclusters):
        base = 2 * cluster_bounds[c]
        clo, chi = cluster_bounds[c], cluster_bounds[c + 1]
        m = chi - clo
        labels = np.empty(m, np.int64)
        centers = np.empty((fanout, d), np.float32)
        stack_lo = np.empty(2 * m + 2, np.int64)
        stack_hi = np.empty(2 * m + 2, np.int64)
        stack_par = np.empty(2 * m + 2, np.int64)
        sp = 0
        stack_lo[0], stack_hi[0], stack_par[0] = clo, chi, -1
        sp = 1
        nn = 0
        while sp > 0:
            sp -= 1
            lo, hi, par = stack_lo[sp], stack_hi[sp], stack_par[sp]
            me = nn
            node_lo[base + me], node_hi[base + me], node_parent[base + me] = lo, hi, par
            nn += 1
            if hi - lo <= leaf_size:
                continue
            key = splitmix64(U64(seed) * U64(0x100000001B3) + U64(lo))
            # no wider than needed, so leaves stay near leaf_size instead of tiny
            f = min(fanout, max(2, (hi - lo + leaf_size - 1) // leaf_size))
            bounds = kmeans_split(x, perm, lo, hi, f, iters, key, labels, centers)
            # push children in reverse so they pop (and get numbered) in order
            for j in range(bounds.shape[0] - 2, -1, -1):
                stack_lo[sp] = lo + bounds[j]
                stack_hi[sp] = lo + bounds[j + 1]
                stack_par[sp] = me
                sp += 1
        node_count_out[c] = nn


@nb.njit(cache=True, fastmath=FAST)
def subset_statistics(vecs, slots, center_row):
    """Statistics of the targets vecs[slots]: writes their mean (as float32) into
    center_row and returns (||c||^2, radius, nu_min, nu_max, sum ||y - c||^2).

    Computed in float64; the radius and the norm range are rounded outward to float32
    with a relative pad, so they remain true bounds.
    """
    d = vecs.shape[1]
    acc = np.zeros(d, np.float64)
    for s in slots:
        for t in range(d):
            acc[t] += vecs[s, t]
    m = max(slots.shape[0], 1)
    cs = 0.0
    for t in range(d):
        center_row[t] = np.float32(acc[t] / m)
        cs += float(center_row[t]) * float(center_row[t])
    rmax, s2, nmin, nmax = 0.0, 0.0, np.inf, 0.0
    for s in slots:
        dist2, norm2 = 0.0, 0.0
        for t in range(d):
            diff = float(vecs[s, t]) - float(center_row[t])
            dist2 += diff * diff
            norm2 += float(vecs[s, t]) * float(vecs[s, t])
        s2 += dist2
        rmax = max(rmax, dist2)
        nmin = min(nmin, norm2)
        nmax = max(nmax, norm2)
    nu_min = pad_down(math.sqrt(nmin)) if slots.shape[0] else 0.0
    return cs, pad_up(math.sqrt(rmax)), nu_min, pad_up(math.sqrt(nmax)), s2


@nb.njit(cache=True, parallel=True)
def node_statistics(vecs, lo, hi, center, csq, radius, nu_min, nu_max, sqsum):
    """subset_statistics of every node's slot range [lo, hi), in parallel."""
    for v in nb.prange(lo.shape[0]):
        csq[v], radius[v], nu_min[v], nu_max[v], sqsum[v] = subset_statistics(vecs, np.arange(lo[v], hi[v]), center[v])


@nb.njit(cache=True, inline="always")
def pad_up(x: float) -> float:
    """x rounded outward to a float32-representable value, with a relative pad."""
    return float(np.float32(x * (1.0 + 4e-7) + 1e-30)) * (1.0 + 1.2e-7)


@nb.njit(cache=True, inline="always")
def pad_down(x: float) -> float:
    return max(float(np.float32(x * (1.0 - 4e-7))) * (1.0 - 1.2e-7), 0.0)


@nb.njit(cache=True)
def depth_from_parents(parent, depth):
    for v in range(1, parent.shape[0]):
        depth[v] = depth[parent[v]] + 1


@nb.njit(cache=True)
def link_siblings(parent, first_child, next_sibling):
    for v in range(parent.shape[0] - 1, -1, -1):  # reverse: prepend keeps index order
        p = parent[v]
        if p >= 0:
            next_sibling[v] = first_child[p]
            first_child[p] = v
