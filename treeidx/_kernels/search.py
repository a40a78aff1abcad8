"""Exact maximum-inner-product search: best-first branch and bound over the tree.

Nodes are expanded in order of their certified upper bound on <q, y>; the search
stops when the best remaining bound cannot beat the current k-th score, so the
result is exact (ties aside).
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

from .bounds import dot32, node_bounds
from .heaps import grow_f, topk_push, topk_replace_min


@nb.njit(cache=True, inline="always")
def is_excluded(excl_ptr, excl_ids, b, idv):
    lo, hi = excl_ptr[b], excl_ptr[b + 1]
    if lo == hi:
        return False
    j = lo + np.searchsorted(excl_ids[lo:hi], idv)
    return j < hi and excl_ids[j] == idv


@nb.njit(cache=True, nogil=True)
def _search_one(q, b, k, top_nodes, top_row, vecs, slot_id, center, csq, radius, nu_min, nu_max,
                first_child, next_sibling, leaf_start, leaf_size, excl_ptr, excl_ids,
                out_scores, out_ids, out_visited, out_dots):
    """One query of search_batch. A separate function so that growing its work arrays
    is invisible to the parallel loop's array analysis (which rejects rebinding)."""
    dim = q.shape[0]
    ntop = top_nodes.shape[0]
    qn = 0.0
    for t in range(dim):
        qn += float(q[t]) * float(q[t])
    qnorm = math.sqrt(qn)
    ts = np.full(k, -np.inf, np.float32)
    ti = np.full(k, -1, np.int64)
    filled = 0
    tb = np.empty(ntop, np.float64)
    for j in range(ntop):
        c = top_nodes[j]
        lo, tb[j] = node_bounds(top_row[j], qnorm, csq[c], radius[c], nu_min[c], nu_max[c], dim)
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
                        if is_excluded(excl_ptr, excl_ids, b, idv):
                            continue
                        if filled < k:
                            topk_push(ts, ti, filled, sc, idv)
                            filled += 1
                        else:
                            topk_replace_min(ts, ti, k, sc, idv)
                continue
            nc = 0
            c = first_child[v]
            while c >= 0:
                dots += 1
                a = dot32(q, center[c])
                lo, up = node_bounds(a, qnorm, csq[c], radius[c], nu_min[c], nu_max[c], dim)
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
    order = np.argsort(-ts[:filled])
    for j in range(filled):
        out_scores[b, j] = ts[order[j]]
        out_ids[b, j] = ti[order[j]]
    for j in range(filled, k):
        out_scores[b, j] = -np.inf
        out_ids[b, j] = -1
    out_visited[b] = visited
    out_dots[b] = dots


@nb.njit(cache=True, parallel=True, nogil=True)
def search_batch(queries, k, top_nodes, top_dots, vecs, slot_id, center, csq, radius, nu_min, nu_max,
                 first_child, next_sibling, leaf_start, leaf_size, excl_ptr, excl_ids,
                 out_scores, out_ids, out_visited, out_dots):
    """Exact top-k by inner product for each query row (parallel over queries).

    The root's children (the wide top level) arrive pre-scored by one BLAS product,
    top_dots[b, j] = <q_b, center[top_nodes[j]]>; they are walked lazily in order of
    their bounds, and below each a depth-first descent visits children in bound order.
    """
    for b in nb.prange(queries.shape[0]):
        _search_one(queries[b], b, k, top_nodes, top_dots[b], vecs, slot_id, center, csq, radius,
                    nu_min, nu_max, first_child, next_sibling, leaf_start, leaf_size, excl_ptr,
                    excl_ids, out_scores, out_ids, out_visited, out_dots)


# ------------------------------------------------------------------ batched search
# A batch of queries reads the same leaves: per query, best-first search streams ~3% of
# all vectors from memory, the same ones for queries of one region. The batched path
# (1) searches each query's few nearest top-level clusters alone, which nearly always
# hold its top-k, giving a threshold t_b; (2) walks every other cluster once for the group of
# queries whose bound there beats t_b, computing each node's and leaf's inner products
# for the whole group while its vectors are in cache. Pruning is per query and uses
# only valid lower bounds of its final k-th score, so the result stays exact.

GROUP_CHUNKS = 8  # independent partial top-k heaps; fixed, so results never depend on threads


@nb.njit(cache=True, inline="always")
def _threshold(hs, hfill, t, b, k, t_a):
    """A lower bound of query b's final k-th score: phase A's, or chunk t's heap."""
    if hfill[t, b] == k and hs[t, b, 0] > t_a:
        return hs[t, b, 0]
    return t_a


@nb.njit(cache=True, nogil=True)
def _walk_cluster(root, group, queries, qnorm, t_a, k, t, vecs, slot_id, center, csq, radius,
                  nu_min, nu_max, first_child, next_sibling, leaf_start, leaf_size, excl_ptr,
                  excl_ids, hs, hi, hfill, visited, dots):
    """Depth-first walk of one cluster for a group of queries, each pruned on its own bound.

    The active queries of the node on top of the stack are abuf[lo:lo + n]; children's
    lists are written above it, so popping an entry frees everything above its list."""
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
        if s0 >= 0:
            m = leaf_size[v]
            for i in range(lo, lo + n):
                b = abuf[i]
                visited[t, b] += 1
                dots[t, b] += m
                q = queries[b]
                thr = _threshold(hs, hfill, t, b, k, t_a[b])
                for s in range(s0, s0 + m):
                    sc = dot32(q, vecs[s])
                    if sc > thr:
                        idv = slot_id[s]
                        if is_excluded(excl_ptr, excl_ids, b, idv):
                            continue
                        if hfill[t, b] < k:
                            topk_push(hs[t, b], hi[t, b], hfill[t, b], sc, idv)
                            hfill[t, b] += 1
                        else:
                            topk_replace_min(hs[t, b], hi[t, b], k, sc, idv)
                        thr = _threshold(hs, hfill, t, b, k, t_a[b])
            continue
        for i in range(lo, lo + n):
            visited[t, abuf[i]] += 1
        c = first_child[v]
        while c >= 0:
            abuf = grow_f(abuf, top + n)
            nc = 0
            for i in range(lo, lo + n):
                b = abuf[i]
                dots[t, b] += 1
                a = dot32(queries[b], center[c])
                up = node_bounds(a, qnorm[b], csq[c], radius[c], nu_min[c], nu_max[c], dim)[1]
                thr = _threshold(hs, hfill, t, b, k, t_a[b])
                if up > thr:
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
def search_groups(queries, qnorm, t_a, k, top_nodes, cand_ptr, cand_q, vecs, slot_id, center, csq,
                  radius, nu_min, nu_max, first_child, next_sibling, leaf_start, leaf_size,
                  excl_ptr, excl_ids, hs, hi, hfill, visited, dots):
    """Phase (2): cluster j is walked for queries cand_q[cand_ptr[j]:cand_ptr[j + 1]].

    Clusters are dealt to GROUP_CHUNKS chunks (j mod chunks), each with its own partial
    top-k heaps hs/hi/hfill[t] and counters, so the parallel loop writes no shared state."""
    n_chunks = hs.shape[0]
    for t in nb.prange(n_chunks):
        for j in range(t, top_nodes.shape[0], n_chunks):
            if cand_ptr[j + 1] > cand_ptr[j]:
                _walk_cluster(top_nodes[j], cand_q[cand_ptr[j]:cand_ptr[j + 1]], queries, qnorm, t_a,
                              k, t, vecs, slot_id, center, csq, radius, nu_min, nu_max, first_child,
                              next_sibling, leaf_start, leaf_size, excl_ptr, excl_ids, hs, hi, hfill,
                              visited, dots)


@nb.njit(cache=True, parallel=True, nogil=True)
def search_best_cluster(queries, k, best, top_nodes, top_dots, vecs, slot_id, center, csq, radius,
                        nu_min, nu_max, first_child, next_sibling, leaf_start, leaf_size, excl_ptr,
                        excl_ids, out_scores, out_ids, out_visited, out_dots):
    """Phase (1): exact top-k of each query within its first clusters best[b] only."""
    for b in nb.prange(queries.shape[0]):
        sel = best[b]
        nodes = np.empty(sel.shape[0], np.int64)
        row = np.empty(sel.shape[0], np.float32)
        for i in range(sel.shape[0]):
            nodes[i] = top_nodes[sel[i]]
            row[i] = top_dots[b, sel[i]]
        _search_one(queries[b], b, k, nodes, row, vecs, slot_id, center,
                    csq, radius, nu_min, nu_max, first_child, next_sibling, leaf_start, leaf_size,
                    excl_ptr, excl_ids, out_scores, out_ids, out_visited, out_dots)


@nb.njit(cache=True, parallel=True, nogil=True)
def merge_topk(a_scores, a_ids, hs, hi, hfill, out_scores, out_ids):
    """Top-k (descending) of phase (1)'s rows and every chunk's partial heap, per query."""
    k = a_scores.shape[1]
    n_chunks = hs.shape[0]
    for b in nb.prange(a_scores.shape[0]):
        m = k * (n_chunks + 1)
        sc = np.full(m, -np.inf, np.float32)
        ids = np.full(m, -1, np.int64)
        sc[:k] = a_scores[b]
        ids[:k] = a_ids[b]
        p = k
        for t in range(n_chunks):
            for i in range(hfill[t, b]):
                sc[p] = hs[t, b, i]
                ids[p] = hi[t, b, i]
                p += 1
        order = np.argsort(-sc[:p], kind="mergesort")
        for j in range(k):
            out_scores[b, j] = sc[order[j]]
            out_ids[b, j] = ids[order[j]]
