"""Bulk construction of the tree: a wide k-means top level, then recursive k-means splits.

The top level is what an IVF index gets right: many (~2 sqrt N) clusters whose
centers are scored for a whole query batch with one BLAS product. Each top-level
cluster is then split recursively (`fanout`-way k-means) down to leaf buckets of at
most `leaf_size` targets. Points are permuted into depth-first order so every
node's targets are one contiguous slice at build time.

The numba kernels (k-means splits, node statistics) live in _kernels/build.py;
this module is the Python driver: BLAS k-means of the top level, the node
numbering, and the kernel launches.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ._kernels.build import depth_from_parents, link_siblings, node_statistics, partition_clusters
from ._threads import run_parallel
from .cluster import kmeans


def auto_top_fanout(n: int, leaf_size: int) -> int:
    """Number of top-level clusters: ~2 sqrt(N), never more than N / leaf_size."""
    return int(max(1, min(round(2.0 * math.sqrt(n)), n // max(leaf_size, 1))))


def build_arrays(
    x: np.ndarray,
    *,
    leaf_size: int,
    fanout: int,
    top_fanout: int | None,
    kmeans_iters: int,
    seed: int,
    progress: Callable[[str], None] | None = None,
):
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
    centers, labels = kmeans(x, k0, seed)
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
    run_parallel(
        partition_clusters,
        x,
        perm,
        cluster_bounds,
        leaf_size,
        fanout,
        kmeans_iters,
        seed,
        node_lo,
        node_hi,
        node_par,
        counts,
    )
    # gather each cluster's node block into one global numbering after the root
    offsets = np.zeros(counts.shape[0] + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    rows = (
        np.concatenate(
            [np.arange(2 * cluster_bounds[c], 2 * cluster_bounds[c] + counts[c]) for c in range(counts.shape[0])]
        )
        if counts.shape[0]
        else np.empty(0, np.int64)
    )
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
    parent[first:] = np.where(local_par < 0, cluster_parent[block_of_row], local_par + offsets[block_of_row] + first)
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
    return dict(
        vecs=vecs,
        perm=perm,
        lo=lo,
        center=center,
        csq=csq,
        radius=radius,
        nu_min=nu_min,
        nu_max=nu_max,
        sqsum=sqsum,
        count=(hi - lo),
        parent=parent,
        first_child=first_child,
        next_sibling=next_sibling,
        leaf_start=leaf_start,
        leaf_size=leaf_size_arr,
        leaf_cap=leaf_size_arr.copy(),
    )


def group_clusters(centers: np.ndarray, seed: int, min_clusters: int = 64) -> np.ndarray:
    """Region label of each top-level cluster: a k-means of their centers into
    ~sqrt(K) groups, or -1 for all when there are too few clusters to group."""
    k = centers.shape[0]
    if k < min_clusters:
        return np.full(k, -1, np.int64)
    _, labels = kmeans(centers, int(round(math.sqrt(k))), seed + 1)
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
    depth_from_parents(parent, depth)
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


def link_children(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """first_child / next_sibling lists from parent pointers, children in index order."""
    m = parent.shape[0]
    first_child = np.full(m, -1, np.int64)
    next_sibling = np.full(m, -1, np.int64)
    link_siblings(parent, first_child, next_sibling)
    return first_child, next_sibling
