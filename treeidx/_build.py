"""Bulk construction of the tree: a wide k-means top level, then recursive k-means splits.

The top level is what an IVF index gets right: many (~2 sqrt N) clusters whose
centers are scored for a whole query batch with one BLAS product. Each top-level
cluster is then split recursively (`fanout`-way k-means) down to leaf buckets of at
most `leaf_size` targets. Points are permuted into depth-first order so every
node's targets are one contiguous slice at build time.

Randomness comes from a counter-based hash (splitmix64) keyed by (seed, node), so
the result is identical whatever the number of threads.
"""
from __future__ import annotations

import math
from typing import Callable

import numba as nb
import numpy as np

from ._kernels.bounds import FAST
from ._threads import run_parallel

U64 = nb.uint64


@nb.njit(cache=True, inline="always")
def splitmix64(x: np.uint64) -> np.uint64:
    x = x + U64(0x9E3779B97F4A7C15)
    z = x
    z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
    return z ^ (z >> U64(31))


@nb.njit(cache=True, inline="always")
def uniform01(state: np.uint64) -> float:
    """Uniform in [0, 1) from the top 53 bits of a hashed counter."""
    return float(splitmix64(state) >> U64(11)) * (1.0 / 9007199254740992.0)


def auto_top_fanout(n: int, leaf_size: int) -> int:
    """Number of top-level clusters: ~2 sqrt(N), never more than N / leaf_size."""
    return int(max(1, min(round(2.0 * math.sqrt(n)), n // max(leaf_size, 1))))


def kmeans_top(x: np.ndarray, k: int, seed: int, iters: int = 8,
               sample_per_center: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """k-means on a sample (BLAS), then assign every row. Returns (centers, labels)."""
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    if k <= 1:
        return x.mean(axis=0, keepdims=True).astype(np.float32), np.zeros(n, np.int64)
    m = min(n, sample_per_center * k)
    sample = x[np.sort(rng.choice(n, m, replace=False))] if m < n else x
    centers = sample[rng.choice(m, k, replace=False)].copy()
    for _ in range(iters):
        labels = assign_nearest(sample, centers)
        sums = np.zeros((k, x.shape[1]), np.float64)
        np.add.at(sums, labels, sample)
        counts = np.bincount(labels, minlength=k)
        empty = counts == 0
        centers = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        if empty.any():  # reseed empty clusters on random sample points
            centers[empty] = sample[rng.choice(m, int(empty.sum()), replace=False)]
    return centers, assign_nearest(x, centers)


def assign_nearest(x: np.ndarray, centers: np.ndarray, chunk: int = 32768) -> np.ndarray:
    """Index of the nearest center (Euclidean) for each row, in chunks via BLAS."""
    half_sq = 0.5 * np.einsum("ij,ij->i", centers, centers, dtype=np.float64).astype(np.float32)
    out = np.empty(x.shape[0], np.int64)
    buf = np.empty((min(chunk, x.shape[0]), centers.shape[0]), np.float32)
    for lo in range(0, x.shape[0], chunk):
        hi = min(lo + chunk, x.shape[0])
        b = buf[: hi - lo]
        np.matmul(x[lo:hi], centers.T, out=b)
        b -= half_sq  # argmax <x,c> - |c|^2/2 == argmin |x - c|^2
        out[lo:hi] = b.argmax(axis=1)
    return out


@nb.njit(cache=True, fastmath=FAST)
def _kmeans_split(x, perm, lo, hi, fanout, iters, key, labels, centers):
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
def partition_clusters(x, perm, cluster_bounds, leaf_size, fanout, iters, seed,
                       node_lo, node_hi, node_parent, node_count_out):
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
            bounds = _kmeans_split(x, perm, lo, hi, f, iters, key, labels, centers)
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
        csq[v], radius[v], nu_min[v], nu_max[v], sqsum[v] = subset_statistics(
            vecs, np.arange(lo[v], hi[v]), center[v])


@nb.njit(cache=True, inline="always")
def pad_up(x: float) -> float:
    """x rounded outward to a float32-representable value, with a relative pad."""
    return float(np.float32(x * (1.0 + 4e-7) + 1e-30)) * (1.0 + 1.2e-7)


@nb.njit(cache=True, inline="always")
def pad_down(x: float) -> float:
    return max(float(np.float32(x * (1.0 - 4e-7))) * (1.0 - 1.2e-7), 0.0)


def build_arrays(x: np.ndarray, *, leaf_size: int, fanout: int, top_fanout: int | None,
                 kmeans_iters: int, seed: int, progress: Callable[[str], None] | None = None):
    """Build the tree over x (N x d float32, finite). Returns a dict of flat arrays.

    Node 0 is the root. Below it, when there are many top-level clusters, ~sqrt(K)
    regions (a k-means of the cluster centers) group them, so a query can open only
    the regions near it rather than all K clusters; then the clusters, each split
    recursively. Leaves own the contiguous slot range [leaf_start, leaf_start +
    leaf_size) of the permuted vectors, and every subtree owns one contiguous range.
    """
    n, d = x.shape
    say = progress or (lambda msg: None)
    k0 = top_fanout if top_fanout is not None else auto_top_fanout(n, leaf_size)
    k0 = int(max(1, min(k0, n)))
    say(f"top level: k-means with {k0} clusters")
    centers, labels = kmeans_top(x, k0, seed)
    sizes = np.bincount(labels, minlength=k0)
    keep = np.flatnonzero(sizes > 0)
    region = group_clusters(centers[keep], seed)
    # clusters ordered by region, so every region's targets are one contiguous range
    order = keep[np.argsort(region, kind="stable")]
    rank = np.empty(k0, np.int64)
    rank[order] = np.arange(order.shape[0])
    region = np.sort(region, kind="stable")
    perm = np.argsort(rank[labels], kind="stable").astype(np.int64)
    sizes = sizes[order]
    cluster_bounds = np.zeros(sizes.shape[0] + 1, np.int64)
    np.cumsum(sizes, out=cluster_bounds[1:])
    say(f"splitting {sizes.shape[0]} clusters into leaves of <= {leaf_size}")
    node_lo = np.empty(2 * n, np.int64)
    node_hi = np.empty(2 * n, np.int64)
    node_par = np.empty(2 * n, np.int64)
    counts = np.zeros(sizes.shape[0], np.int64)
    run_parallel(partition_clusters, x, perm, cluster_bounds, leaf_size, fanout, kmeans_iters, seed,
                 node_lo, node_hi, node_par, counts)
    # gather each cluster's node block into one global numbering after the root
    offsets = np.zeros(counts.shape[0] + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    rows = np.concatenate([np.arange(2 * cluster_bounds[c], 2 * cluster_bounds[c] + counts[c])
                           for c in range(counts.shape[0])]) if counts.shape[0] else np.empty(0, np.int64)
    block_of_row = np.repeat(np.arange(counts.shape[0]), counts)
    n_regions = int(region.max()) + 1 if region.size and region.max() >= 0 else 0
    first = 1 + n_regions  # root, then the regions, then the clusters' blocks
    m = int(offsets[-1]) + first
    lo = np.empty(m, np.int64)
    hi = np.empty(m, np.int64)
    parent = np.empty(m, np.int64)
    lo[0], hi[0], parent[0] = 0, n, -1
    if n_regions:
        lo[1:first] = cluster_bounds[:-1][np.searchsorted(region, np.arange(n_regions))]
        hi[1:first] = cluster_bounds[1:][np.searchsorted(region, np.arange(n_regions), side="right") - 1]
        parent[1:first] = 0
    lo[first:], hi[first:] = node_lo[rows], node_hi[rows]
    local_par = node_par[rows]
    cluster_parent = (1 + region) if n_regions else np.zeros(counts.shape[0], np.int64)
    parent[first:] = np.where(local_par < 0, cluster_parent[block_of_row],
                              local_par + offsets[block_of_row] + first)
    del node_lo, node_hi, node_par
    lo, hi, parent = breadth_first(lo, hi, parent)
    vecs = x[perm]
    say(f"node statistics for {m} nodes")
    center = np.empty((m, d), np.float32)
    csq = np.empty(m, np.float64)
    radius = np.empty(m, np.float64)
    nu_min = np.empty(m, np.float64)
    nu_max = np.empty(m, np.float64)
    sqsum = np.empty(m, np.float64)
    run_parallel(node_statistics, vecs, lo, hi, center, csq, radius, nu_min, nu_max, sqsum)
    first_child, next_sibling = link_children(parent)
    is_leaf = first_child < 0
    is_leaf[0] = False
    leaf_start = np.where(is_leaf, lo, -1)
    leaf_size_arr = np.where(is_leaf, hi - lo, 0)
    return dict(vecs=vecs, perm=perm, lo=lo, center=center, csq=csq, radius=radius, nu_min=nu_min,
                nu_max=nu_max, sqsum=sqsum, count=(hi - lo), parent=parent,
                first_child=first_child, next_sibling=next_sibling, leaf_start=leaf_start,
                leaf_size=leaf_size_arr, leaf_cap=leaf_size_arr.copy())


def group_clusters(centers: np.ndarray, seed: int, min_clusters: int = 64) -> np.ndarray:
    """Region label of each top-level cluster: a k-means of their centers into
    ~sqrt(K) groups, or -1 for all when there are too few clusters to group."""
    k = centers.shape[0]
    if k < min_clusters:
        return np.full(k, -1, np.int64)
    _, labels = kmeans_top(centers, int(round(math.sqrt(k))), seed + 1)
    # relabel densely in order of first appearance (k-means may leave a region empty)
    _, dense = np.unique(labels, return_inverse=True)
    return dense.astype(np.int64)


def breadth_first(lo: np.ndarray, hi: np.ndarray, parent: np.ndarray):
    """Renumber nodes level by level so that siblings are adjacent in memory.

    Expanding a node then reads its children's centers from one contiguous block
    instead of one cache miss each (preorder numbering scatters them).
    Requires parent[v] < v (true of the preorder the builder produces).
    """
    m = parent.shape[0]
    depth = np.zeros(m, np.int64)
    _depth_from_parents(parent, depth)
    new_of_old = np.empty(m, np.int64)
    new_of_old[0] = 0
    order_parts = [np.array([0])]
    next_id = 1
    for d in range(1, int(depth.max()) + 1 if m > 1 else 1):
        level = np.flatnonzero(depth == d)
        level = level[np.argsort(new_of_old[parent[level]], kind="stable")]
        new_of_old[level] = np.arange(next_id, next_id + level.shape[0])
        next_id += level.shape[0]
        order_parts.append(level)
    order = np.concatenate(order_parts)
    new_parent = np.where(parent[order] >= 0, new_of_old[np.maximum(parent[order], 0)], -1)
    return lo[order], hi[order], new_parent


@nb.njit(cache=True)
def _depth_from_parents(parent, depth):
    for v in range(1, parent.shape[0]):
        depth[v] = depth[parent[v]] + 1


def link_children(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """first_child / next_sibling lists from parent pointers, children in index order."""
    m = parent.shape[0]
    first_child = np.full(m, -1, np.int64)
    next_sibling = np.full(m, -1, np.int64)
    _link(parent, first_child, next_sibling)
    return first_child, next_sibling


@nb.njit(cache=True)
def _link(parent, first_child, next_sibling):
    for v in range(parent.shape[0] - 1, -1, -1):  # reverse: prepend keeps index order
        p = parent[v]
        if p >= 0:
            next_sibling[v] = first_child[p]
            first_child[p] = v
