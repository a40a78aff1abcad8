"""Exact maximum-inner-product search: best-first branch and bound over the tree.

Nodes are expanded in order of their certified upper bound on <q, y>; the search
stops when the best remaining bound cannot beat the current k-th score, so the
result is exact (ties aside).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba as nb
import numpy as np

from .arrays import Csr, TreeArrays  # noqa: F401  (the records these kernels take)
from .bounds import dot32, node_bounds, node_bounds_of, squared_norm
from .heaps import grow_f, topk_push, topk_replace_min


class TopK(NamedTuple):
    """Per-query results: (B, k) scores, descending, and ids (-1 pads); (B,) work counters."""

    scores: np.ndarray
    ids: np.ndarray
    visited: np.ndarray  # nodes visited
    dots: np.ndarray  # inner products computed


@nb.njit(cache=True, inline="always")
def is_excluded(excl, b, idv):
    """Whether query b excludes id idv (its list is sorted)."""
    lo, hi = excl.ptr[b], excl.ptr[b + 1]
    if lo == hi:
        return False
    j = lo + np.searchsorted(excl.values[lo:hi], idv)
    return j < hi and excl.values[j] == idv


@nb.njit(cache=True, inline="always")
def offer(scores, ids, filled, k, sc, idv):
    """Offer (sc, idv) to a min-heap top-k of `filled` entries; returns the new fill."""
    if filled < k:
        topk_push(scores, ids, filled, sc, idv)
        return filled + 1
    topk_replace_min(scores, ids, k, sc, idv)
    return filled


@nb.njit(cache=True, nogil=True)
def _search_one(T, q, b, k, top_nodes, top_row, excl, out):
    """One query of search_batch. A separate function so that growing its work arrays
    is invisible to the parallel loop's array analysis (which rejects rebinding)."""
    vecs, slot_id, center = T.vecs, T.slot_id, T.center  # loops index locals (see _walk_cluster)
    leaf_start, leaf_size, first_child, next_sibling = T.leaf_start, T.leaf_size, T.first_child, T.next_sibling
    csq, radius, nu_min, nu_max = T.csq, T.radius, T.nu_min, T.nu_max
    dim = q.shape[0]
    ntop = top_nodes.shape[0]
    qnorm = math.sqrt(squared_norm(q))
    ts = np.full(k, -np.inf, np.float32)
    ti = np.full(k, -1, np.int64)
    filled = 0
    tb = np.empty(ntop, np.float64)
    for j in range(ntop):
        lo, tb[j] = node_bounds_of(T, top_nodes[j], top_row[j], qnorm)
    torder = np.argsort(-tb)
    # depth-first below each top-level cluster, children in order of their bounds
    st_node = np.empty(256, np.int64)
    st_ub = np.empty(256, np.float64)
    cb = np.empty(64, np.float64)
    cn = np.empty(64, np.int64)
    visited = 0
    dots = ntop
    for tp in range(ntop):
        if filled == k and tb[torder[tp]] <= ts[0]:
            break  # every later cluster is bounded lower still
        st_node[0] = top_nodes[torder[tp]]
        st_ub[0] = tb[torder[tp]]
        sp = 1
        while sp > 0:
            sp -= 1
            v = st_node[sp]
            if filled == k and st_ub[sp] <= ts[0]:
                continue
            visited += 1
            s0 = leaf_start[v]
            if s0 >= 0:
                dots += leaf_size[v]
                for s in range(s0, s0 + leaf_size[v]):
                    sc = dot32(q, vecs[s])
                    if filled < k or sc > ts[0]:
                        idv = slot_id[s]
                        if not is_excluded(excl, b, idv):
                            filled = offer(ts, ti, filled, k, sc, idv)
                continue
            nc = 0
            c = first_child[v]
            while c >= 0:
                dots += 1
                up = node_bounds(dot32(q, center[c]), qnorm, csq[c], radius[c], nu_min[c], nu_max[c], dim)[1]
                if filled < k or up > ts[0]:
                    cb = grow_f(cb, nc)
                    cn = grow_f(cn, nc)
                    # insertion sort, ascending: the best child ends up on top of the stack
                    i = nc
                    while i > 0 and cb[i - 1] > up:
                        cb[i] = cb[i - 1]
                        cn[i] = cn[i - 1]
                        i -= 1
                    cb[i] = up
                    cn[i] = c
                    nc += 1
                c = next_sibling[c]
            st_node = grow_f(st_node, sp + nc)
            st_ub = grow_f(st_ub, sp + nc)
            for i in range(nc):
                st_node[sp] = cn[i]
                st_ub[sp] = cb[i]
                sp += 1
    write_row(out, b, ts, ti, filled, k)
    out.visited[b] = visited
    out.dots[b] = dots


@nb.njit(cache=True, inline="always")
def write_row(out, b, ts, ti, filled, k):
    """Row b of the output: the heap's entries by descending score, -inf / -1 padded."""
    order = np.argsort(-ts[:filled])
    for j in range(filled):
        out.scores[b, j] = ts[order[j]]
        out.ids[b, j] = ti[order[j]]
    for j in range(filled, k):
        out.scores[b, j] = -np.inf
        out.ids[b, j] = -1


@nb.njit(cache=True, parallel=True, nogil=True)
def search_batch(T, queries, k, top_nodes, top_dots, excl, out):
    """Exact top-k by inner product for each query row (parallel over queries).

    The root's children (the wide top level) arrive pre-scored by one BLAS product,
    top_dots[b, j] = <q_b, center[top_nodes[j]]>; they are walked lazily in order of
    their bounds, and below each a depth-first descent visits children in bound order.
    """
    for b in nb.prange(queries.shape[0]):
        _search_one(T, queries[b], b, k, top_nodes, top_dots[b], excl, out)


# ------------------------------------------------------------------ batched search
# A batch of queries reads the same leaves: per query, best-first search streams a few
# percent of all vectors from memory, the same ones for queries of one region. The batched
# path (1) searches each query's few nearest top-level clusters alone, which nearly always
# hold its top-k, giving a threshold t_b; (2) walks every other cluster once for the group of
# queries whose bound there beats t_b, computing each node's and leaf's inner products
# for the whole group while its vectors are in cache. Pruning is per query and uses
# only valid lower bounds of its final k-th score, so the result stays exact.

GROUP_CHUNKS = 8  # independent partial top-k heaps; fixed, so results never depend on threads


class Group(NamedTuple):
    """The queries of a grouped search: rows, their norms, phase (1)'s k-th scores."""

    queries: np.ndarray  # (B, d) float32
    norms: np.ndarray  # (B,) float64
    floor: np.ndarray  # (B,) float32: a lower bound of each query's final k-th score


class PartialTopK(NamedTuple):
    """GROUP_CHUNKS partial top-k min-heaps per query, and their work counters."""

    scores: np.ndarray  # (chunks, B, k) float32
    ids: np.ndarray  # (chunks, B, k) int64
    fill: np.ndarray  # (chunks, B) entries used
    visited: np.ndarray  # (chunks, B)
    dots: np.ndarray  # (chunks, B)


@nb.njit(cache=True, inline="always")
def _threshold(hs, fill, t, b, k, floor):
    """A lower bound of query b's final k-th score: phase (1)'s, or chunk t's heap."""
    if fill[t, b] == k and hs[t, b, 0] > floor:
        return hs[t, b, 0]
    return floor


@nb.njit(cache=True, nogil=True)
def _walk_cluster(T, root, group, G, k, t, excl, P):
    """Depth-first walk of one cluster for a group of queries, each pruned on its own bound.

    The active queries of the node on top of the stack are abuf[lo:lo + n]; children's
    lists are written above it, so popping an entry frees everything above its list.
    The records are unpacked first: loops that index a record's fields ran ~25% slower
    than the same loops over local arrays (same-process benchmark of this kernel)."""
    vecs, slot_id, center = T.vecs, T.slot_id, T.center
    leaf_start, leaf_size, first_child, next_sibling = T.leaf_start, T.leaf_size, T.first_child, T.next_sibling
    csq, radius, nu_min, nu_max = T.csq, T.radius, T.nu_min, T.nu_max
    queries, qnorm, floor = G.queries, G.norms, G.floor
    hs, hi, fill, visited, dots = P.scores, P.ids, P.fill, P.visited, P.dots
    dim = queries.shape[1]
    g = group.shape[0]
    abuf = np.empty(4 * g + 64, np.int64)
    abuf[:g] = group
    st_node = np.empty(64, np.int64)
    st_lo = np.empty(64, np.int64)
    st_n = np.empty(64, np.int64)
    st_node[0], st_lo[0], st_n[0] = root, 0, g
    sp = 1
    while sp > 0:
        sp -= 1
        v, lo, n = st_node[sp], st_lo[sp], st_n[sp]
        top = lo + n
        s0 = leaf_start[v]
        if s0 >= 0:  # a leaf: every active query scans its targets
            m = leaf_size[v]
            for i in range(lo, lo + n):
                b = abuf[i]
                visited[t, b] += 1
                dots[t, b] += m
                q = queries[b]
                thr = _threshold(hs, fill, t, b, k, floor[b])
                for s in range(s0, s0 + m):
                    sc = dot32(q, vecs[s])
                    if sc > thr and not is_excluded(excl, b, slot_id[s]):
                        fill[t, b] = offer(hs[t, b], hi[t, b], fill[t, b], k, sc, slot_id[s])
                        thr = _threshold(hs, fill, t, b, k, floor[b])
            continue
        for i in range(lo, lo + n):
            visited[t, abuf[i]] += 1
        c = first_child[v]
        while c >= 0:  # each child keeps the queries whose bound there beats their threshold
            abuf = grow_f(abuf, top + n)
            nc = 0
            for i in range(lo, lo + n):
                b = abuf[i]
                dots[t, b] += 1
                up = node_bounds(dot32(queries[b], center[c]), qnorm[b], csq[c], radius[c], nu_min[c], nu_max[c], dim)[
                    1
                ]
                if up > _threshold(hs, fill, t, b, k, floor[b]):
                    abuf[top + nc] = b
                    nc += 1
            if nc > 0:
                st_node = grow_f(st_node, sp)
                st_lo = grow_f(st_lo, sp)
                st_n = grow_f(st_n, sp)
                st_node[sp], st_lo[sp], st_n[sp] = c, top, nc
                sp += 1
                top += nc
            c = next_sibling[c]


@nb.njit(cache=True, parallel=True, nogil=True)
def search_groups(T, G, k, top_nodes, cand, excl, P):
    """Phase (2): cluster j is walked for the queries cand.values[cand.ptr[j]:cand.ptr[j + 1]].

    Clusters are dealt to GROUP_CHUNKS chunks (j mod chunks), each with its own partial
    top-k heaps P[t], so the parallel loop writes no shared state."""
    n_chunks = P.scores.shape[0]
    for t in nb.prange(n_chunks):
        for j in range(t, top_nodes.shape[0], n_chunks):
            lo, hi = cand.ptr[j], cand.ptr[j + 1]
            if hi > lo:
                _walk_cluster(T, top_nodes[j], cand.values[lo:hi], G, k, t, excl, P)


@nb.njit(cache=True, parallel=True, nogil=True)
def search_best_cluster(T, queries, k, best, top_nodes, top_dots, excl, out):
    """Phase (1): exact top-k of each query within its first clusters best[b] only."""
    for b in nb.prange(queries.shape[0]):
        sel = best[b]
        nodes = np.empty(sel.shape[0], np.int64)
        row = np.empty(sel.shape[0], np.float32)
        for i in range(sel.shape[0]):
            nodes[i] = top_nodes[sel[i]]
            row[i] = top_dots[b, sel[i]]
        _search_one(T, queries[b], b, k, nodes, row, excl, out)


@nb.njit(cache=True, parallel=True, nogil=True)
def merge_topk(first, P, out_scores, out_ids):
    """Top-k (descending) of phase (1)'s rows and every chunk's partial heap, per query."""
    k = first.scores.shape[1]
    n_chunks = P.scores.shape[0]
    for b in nb.prange(first.scores.shape[0]):
        m = k * (n_chunks + 1)
        sc = np.full(m, -np.inf, np.float32)
        ids = np.full(m, -1, np.int64)
        sc[:k] = first.scores[b]
        ids[:k] = first.ids[b]
        p = k
        for t in range(n_chunks):
            for i in range(P.fill[t, b]):
                sc[p] = P.scores[t, b, i]
                ids[p] = P.ids[t, b, i]
                p += 1
        order = np.argsort(-sc[:p], kind="mergesort")
        for j in range(k):
            out_scores[b, j] = sc[order[j]]
            out_ids[b, j] = ids[order[j]]
