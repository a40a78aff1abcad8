"""Local repairs of the tree: insert, remove, subtree collection and the invariant check.

All kernels work on the flat arrays of one `TreeArrays` (arrays.py). Centers stay
fixed after build; an insert widens radii and norm ranges along its path so they
remain true bounds, a remove leaves them as (looser) true bounds. Leaves own a
contiguous slot range with spare capacity; a full leaf moves to a larger range
at the end of the slot arrays, and a leaf at the maximum size splits in two or
more by k-means. Empty nodes are unlinked.

The id -> slot map is a sorted key array with a parallel slot array; keys are
added/removed by the caller, the kernels keep the slots current.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba as nb
import numpy as np

from .arrays import DEAD, TreeArrays  # noqa: F401  (the record every kernel here takes)
from .bounds import FAST
from .build import kmeans_split, pad_down, pad_up, subset_statistics
from .rng import U64, splitmix64


@nb.njit(cache=True, inline="always")
def key_index(keys, idv):
    return np.searchsorted(keys, idv)


@nb.njit(cache=True)
def exact_node_stats(A, v, slots):
    """Set node v's center/radius/norms/count from the given target slots exactly."""
    A.csq[v], A.radius[v], A.nu_min[v], A.nu_max[v], A.sqsum[v] = subset_statistics(A.vecs, slots, A.center[v])
    A.count[v] = slots.shape[0]


@nb.njit(cache=True, inline="always")
def widen(A, v, y, ynorm):
    """Count y into node v and widen v's bounds so they still hold."""
    d2 = 0.0
    for t in range(y.shape[0]):
        diff = float(y[t]) - float(A.center[v, t])
        d2 += diff * diff
    A.count[v] += 1
    A.sqsum[v] += d2
    r = pad_up(math.sqrt(d2))
    if r > A.radius[v]:
        A.radius[v] = r
    if pad_up(ynorm) > A.nu_max[v]:
        A.nu_max[v] = pad_up(ynorm)
    if pad_down(ynorm) < A.nu_min[v]:
        A.nu_min[v] = pad_down(ynorm)


@nb.njit(cache=True, inline="always")
def new_node(A, n_nodes, parent):
    v = n_nodes
    A.parent[v] = parent
    A.first_child[v] = -1
    A.next_sibling[v] = A.first_child[parent] if parent >= 0 else -1
    if parent >= 0:
        A.first_child[parent] = v
    A.leaf_start[v] = -1
    A.leaf_size[v] = 0
    A.leaf_cap[v] = 0
    A.count[v] = 0
    A.sqsum[v] = 0.0
    A.radius[v] = 0.0
    A.nu_min[v] = np.inf
    A.nu_max[v] = 0.0
    return v


@nb.njit(cache=True, fastmath=FAST)
def nearest_child(A, v, y):
    best, bc = np.inf, -1
    c = A.first_child[v]
    while c >= 0:
        s = 0.0
        for t in range(y.shape[0]):
            diff = float(y[t]) - float(A.center[c, t])
            s += diff * diff
        if s < best:
            best, bc = s, c
        c = A.next_sibling[c]
    return bc


@nb.njit(cache=True)
def place_slot(A, keys, key_slot, s, y, idv, leaf):
    A.vecs[s, :] = y
    A.slot_id[s] = idv
    A.slot_leaf[s] = leaf
    key_slot[key_index(keys, idv)] = s


@nb.njit(cache=True)
def split_leaf(A, keys, key_slot, v, y, idv, n_slots, n_nodes, fanout, max_leaf, seed):
    """Leaf v is full: k-means split of its targets plus y into new child leaves."""
    size = A.leaf_size[v]
    d = A.vecs.shape[1]
    m = size + 1
    pts = np.empty((m, d), np.float32)
    pid = np.empty(m, np.int64)
    s0 = A.leaf_start[v]
    for i in range(size):
        pts[i] = A.vecs[s0 + i]
        pid[i] = A.slot_id[s0 + i]
        A.slot_id[s0 + i] = -1
        A.slot_leaf[s0 + i] = -1
    pts[size] = y
    pid[size] = idv
    dead = A.leaf_cap[v]
    perm = np.arange(m)
    labels = np.empty(m, np.int64)
    centers = np.empty((fanout, d), np.float32)
    key = splitmix64(U64(seed) ^ U64(v * 0x9E3779B9 + n_slots))
    bounds = kmeans_split(pts, perm, 0, m, fanout, 6, key, labels, centers)
    A.leaf_start[v] = -1
    A.leaf_size[v] = 0
    A.leaf_cap[v] = 0
    for g in range(bounds.shape[0] - 1):
        c = new_node(A, n_nodes, v)
        n_nodes += 1
        gs = bounds[g + 1] - bounds[g]
        cap = min(max_leaf, gs + gs // 2 + 1)
        A.leaf_start[c] = n_slots
        A.leaf_size[c] = gs
        A.leaf_cap[c] = cap
        for i in range(gs):
            j = perm[bounds[g] + i]
            place_slot(A, keys, key_slot, n_slots + i, pts[j], pid[j], c)
        for i in range(gs, cap):
            A.slot_id[n_slots + i] = -1
            A.slot_leaf[n_slots + i] = -1
        exact_node_stats(A, c, np.arange(n_slots, n_slots + gs))
        n_slots += cap
    return n_slots, n_nodes, dead


@nb.njit(cache=True)
def grow_leaf(A, keys, key_slot, v, n_slots, max_leaf):
    """Move leaf v to a larger slot range at the end; returns (n_slots, freed slots)."""
    s0, size, cap = A.leaf_start[v], A.leaf_size[v], A.leaf_cap[v]
    new_cap = min(max_leaf, max(2 * cap, size + 2))
    for i in range(size):
        A.vecs[n_slots + i] = A.vecs[s0 + i]
        A.slot_id[n_slots + i] = A.slot_id[s0 + i]
        A.slot_leaf[n_slots + i] = v
        key_slot[key_index(keys, A.slot_id[s0 + i])] = n_slots + i
        A.slot_id[s0 + i] = -1
        A.slot_leaf[s0 + i] = -1
    for i in range(size, new_cap):
        A.slot_id[n_slots + i] = -1
        A.slot_leaf[n_slots + i] = -1
    A.leaf_start[v] = n_slots
    A.leaf_cap[v] = new_cap
    return n_slots + new_cap, cap


class NewRows(NamedTuple):
    """Rows to insert: vectors, ids, and each row's nearest child of the root (chosen
    by the caller with one BLAS product for the whole batch), or -1 to choose here."""

    vecs: np.ndarray
    ids: np.ndarray
    nearest_top: np.ndarray


class LeafShape(NamedTuple):
    """How a full leaf splits: k-means into `fanout` children of at most `max_leaf`
    targets, seeded by `seed`."""

    fanout: int
    max_leaf: int
    seed: int


@nb.njit(cache=True, nogil=True)
def insert_batch(A, keys, key_slot, rows, start, root, n_slots, n_nodes, dead_slots, shape, replace):
    """Insert rows start.. of `rows` (NewRows) until done or capacity runs short.

    replace: each id is stored already; it is removed just before its row goes in (an
    update), so rows not reached yet keep their old vectors.

    Returns (next row, n_slots, n_nodes, dead_slots). The caller guarantees the
    keys already hold every new id, and grows the arrays when asked to resume.
    """
    vecs, ids, top_choice = rows.vecs, rows.ids, rows.nearest_top
    fanout, max_leaf, seed = shape.fanout, shape.max_leaf, shape.seed
    slot_room = A.vecs.shape[0]
    node_room = A.center.shape[0]
    old = np.empty(vecs.shape[1], np.float32)
    i = start
    while i < vecs.shape[0]:
        if n_slots + 2 * max_leaf + 2 > slot_room or n_nodes + fanout + 2 > node_room:
            break
        y = vecs[i]
        idv = ids[i]
        if replace:
            dead_slots += remove_one(A, keys, key_slot, idv, root, old)
        yn = 0.0
        for t in range(y.shape[0]):
            yn += float(y[t]) ** 2
        yn = math.sqrt(yn)
        v = root
        widen(A, v, y, yn)
        if A.first_child[v] < 0:  # empty tree: start a fresh leaf under the root
            c = new_node(A, n_nodes, v)
            n_nodes += 1
            A.leaf_start[c] = n_slots
            A.leaf_cap[c] = min(max_leaf, 4)
            for s in range(n_slots, n_slots + A.leaf_cap[c]):
                A.slot_id[s] = -1
                A.slot_leaf[s] = -1
            n_slots += A.leaf_cap[c]
            A.center[c, :] = y
            A.csq[c] = yn * yn
        first = True
        while A.leaf_start[v] < 0:
            # the batch's choice, unless a removal in this batch has unlinked that node
            pick = first and top_choice[i] >= 0 and A.parent[top_choice[i]] == v
            v = top_choice[i] if pick else nearest_child(A, v, y)
            first = False
            widen(A, v, y, yn)
        if A.leaf_size[v] < A.leaf_cap[v]:
            place_slot(A, keys, key_slot, A.leaf_start[v] + A.leaf_size[v], y, idv, v)
            A.leaf_size[v] += 1
        elif A.leaf_cap[v] < max_leaf:
            n_slots, freed = grow_leaf(A, keys, key_slot, v, n_slots, max_leaf)
            dead_slots += freed
            place_slot(A, keys, key_slot, A.leaf_start[v] + A.leaf_size[v], y, idv, v)
            A.leaf_size[v] += 1
        else:
            n_slots, n_nodes, freed = split_leaf(A, keys, key_slot, v, y, idv, n_slots, n_nodes, fanout, max_leaf, seed)
            dead_slots += freed
        i += 1
    return i, n_slots, n_nodes, dead_slots


@nb.njit(cache=True)
def unlink(A, v):
    p = A.parent[v]
    c = A.first_child[p]
    if c == v:
        A.first_child[p] = A.next_sibling[v]
    else:
        while A.next_sibling[c] != v:
            c = A.next_sibling[c]
        A.next_sibling[c] = A.next_sibling[v]
    A.parent[v] = DEAD
    A.next_sibling[v] = -1


@nb.njit(cache=True, fastmath=FAST)
def remove_one(A, keys, key_slot, idv, root, y):
    """Remove id idv (present); its key_slot entry becomes -1. y: scratch of length d.
    Returns the slots freed by leaves that emptied."""
    d = A.vecs.shape[1]
    freed = 0
    ki = key_index(keys, idv)
    s = key_slot[ki]
    key_slot[ki] = -1
    v = A.slot_leaf[s]
    y[:] = A.vecs[s]
    last = A.leaf_start[v] + A.leaf_size[v] - 1
    if s != last:  # keep the leaf's used slots contiguous
        A.vecs[s] = A.vecs[last]
        A.slot_id[s] = A.slot_id[last]
        key_slot[key_index(keys, A.slot_id[s])] = s
    A.slot_id[last] = -1
    A.slot_leaf[last] = -1
    A.leaf_size[v] -= 1
    u = v
    while u >= 0:
        d2 = 0.0
        for t in range(d):
            diff = float(y[t]) - float(A.center[u, t])
            d2 += diff * diff
        A.count[u] -= 1
        A.sqsum[u] = max(A.sqsum[u] - d2, 0.0)
        u = A.parent[u]
    u = v
    while u != root and A.count[u] == 0:  # drop emptied nodes
        p = A.parent[u]
        if A.leaf_start[u] >= 0:
            freed += A.leaf_cap[u]
            A.leaf_start[u] = -1
            A.leaf_cap[u] = 0
        unlink(A, u)
        u = p
    return freed


@nb.njit(cache=True, nogil=True)
def remove_batch(A, keys, key_slot, ids, root, dead_slots):
    """Remove ids (all present, unique). Their key_slot entries become -1."""
    y = np.empty(A.vecs.shape[1], np.float32)
    for idv in ids:
        dead_slots += remove_one(A, keys, key_slot, idv, root, y)
    return dead_slots


@nb.njit(cache=True)
def restore_vectors(A, keys, key_slot, ids, vecs):
    """Put vecs[i] back as the vector of ids[i] in whatever slot holds it now, widening
    the bounds of the slot's ancestors to cover it (undoes an interrupted update without
    allocating: the tree keeps its shape, every bound stays true)."""
    d = A.vecs.shape[1]
    for i in range(ids.shape[0]):
        s = key_slot[key_index(keys, ids[i])]
        yn = 0.0
        for t in range(d):
            yn += float(vecs[i, t]) ** 2
        yn = math.sqrt(yn)
        u = A.slot_leaf[s]
        while u >= 0:
            d_new, d_old = 0.0, 0.0
            for t in range(d):
                a = float(A.vecs[s, t]) - float(A.center[u, t])
                b = float(vecs[i, t]) - float(A.center[u, t])
                d_new += a * a
                d_old += b * b
            A.sqsum[u] = max(A.sqsum[u] - d_new, 0.0) + d_old
            r = pad_up(math.sqrt(d_old))
            if r > A.radius[u]:
                A.radius[u] = r
            if pad_up(yn) > A.nu_max[u]:
                A.nu_max[u] = pad_up(yn)
            if pad_down(yn) < A.nu_min[u]:
                A.nu_min[u] = pad_down(yn)
            u = A.parent[u]
        A.vecs[s, :] = vecs[i]


@nb.njit(cache=True)
def subtree_slots(A, v, out):
    """Write the used slots under node v into out (DFS order); returns how many."""
    n = 0
    stack = np.empty(64, np.int64)
    stack[0] = v
    sp = 1
    while sp > 0:
        sp -= 1
        u = stack[sp]
        if A.leaf_start[u] >= 0:
            for s in range(A.leaf_start[u], A.leaf_start[u] + A.leaf_size[u]):
                out[n] = s
                n += 1
        # push children in reverse so they come out in list order
        c = A.first_child[u]
        m = 0
        while c >= 0:
            m += 1
            c = A.next_sibling[c]
        if sp + m > stack.shape[0]:
            bigger = np.empty(2 * (sp + m), np.int64)
            bigger[:sp] = stack[:sp]
            stack = bigger
        c = A.first_child[u]
        j = sp + m - 1
        while c >= 0:
            stack[j] = c
            j -= 1
            c = A.next_sibling[c]
        sp += m
    return n


@nb.njit(cache=True)
def contiguous_ranges(A, root, n_nodes):
    """Recompute node_lo: a subtree is contiguous when its children's ranges tile one
    range in list order (a leaf always is). Children come after parents in a
    breadth-first order, so one reverse pass over that order settles every node."""
    order = np.empty(n_nodes, np.int64)
    order[0] = root
    head, tail = 0, 1
    while head < tail:
        v = order[head]
        head += 1
        c = A.first_child[v]
        while c >= 0:
            order[tail] = c
            tail += 1
            c = A.next_sibling[c]
    for i in range(tail - 1, -1, -1):
        v = order[i]
        if A.leaf_start[v] >= 0:
            A.node_lo[v] = A.leaf_start[v]
            continue
        c = A.first_child[v]
        lo = A.node_lo[c] if c >= 0 else -1
        nxt = lo
        ok = c >= 0 and lo >= 0
        while ok and c >= 0:
            if A.node_lo[c] != nxt:
                ok = False
            nxt = A.node_lo[c] + A.count[c]
            c = A.next_sibling[c]
        A.node_lo[v] = lo if ok else -1


# error codes of check_kernel, formatted by tree.TreeIndex.check
(
    OK,
    E_CYCLE,
    E_PARENT,
    E_COUNT,
    E_LEAF_CHILDREN,
    E_LEAF_SIZE,
    E_SLOT_OWNER,
    E_UNUSED,
    E_KEY,
    E_RADIUS,
    E_NORM,
    E_CSQ,
    E_EMPTY,
    E_SLOT_SHARED,
    E_INTERNAL_NO_CHILD,
    E_RANGE,
    E_STRAY,
) = range(17)


@nb.njit(cache=True)
def check_kernel(A, keys, key_slot, root, n_nodes, n_slots, max_leaf):
    """Verify every invariant. Returns (code, node, slot, got, bound); code 0 = ok."""
    d = A.vecs.shape[1]
    seen = np.zeros(n_nodes, np.bool_)
    slot_seen = np.zeros(n_slots, np.bool_)
    order = np.empty(n_nodes, np.int64)
    order[0] = root
    seen[root] = True
    head, tail = 0, 1
    while head < tail:  # BFS: links, counts, leaf slot ranges
        v = order[head]
        head += 1
        total = 0
        c = A.first_child[v]
        while c >= 0:
            if c >= n_nodes or seen[c]:
                return E_CYCLE, v, c, 0.0, 0.0
            if A.parent[c] != v:
                return E_PARENT, c, v, float(A.parent[c]), float(v)
            seen[c] = True
            order[tail] = c
            tail += 1
            total += A.count[c]
            c = A.next_sibling[c]
        if A.leaf_start[v] >= 0:
            if A.first_child[v] >= 0:
                return E_LEAF_CHILDREN, v, -1, 0.0, 0.0
            if A.leaf_size[v] > A.leaf_cap[v] or A.leaf_cap[v] > max_leaf:
                return E_LEAF_SIZE, v, -1, float(A.leaf_size[v]), float(A.leaf_cap[v])
            total = A.leaf_size[v]
            for s in range(A.leaf_start[v], A.leaf_start[v] + A.leaf_cap[v]):
                if s >= n_slots or slot_seen[s]:
                    return E_SLOT_SHARED, v, s, 0.0, 0.0
                slot_seen[s] = True
                used = s < A.leaf_start[v] + A.leaf_size[v]
                if A.slot_leaf[s] != (v if used else -1):  # slot_leaf -1 marks a free slot
                    return E_SLOT_OWNER, v, s, float(A.slot_leaf[s]), float(v if used else -1)
        elif v != root and A.first_child[v] < 0:
            return E_INTERNAL_NO_CHILD, v, -1, 0.0, 0.0
        if A.count[v] != total:
            return E_COUNT, v, -1, float(A.count[v]), float(total)
        if v != root and A.count[v] == 0:
            return E_EMPTY, v, -1, 0.0, 0.0
        cs = 0.0
        for t in range(d):
            cs += float(A.center[v, t]) ** 2
        if abs(cs - A.csq[v]) > 1e-9 * max(cs, 1e-30) + 1e-300:
            return E_CSQ, v, -1, A.csq[v], cs
    # a slot no live leaf reserves is free: the dense sampler and search read liveness
    # from slot_leaf alone
    for s in range(n_slots):
        if not slot_seen[s] and A.slot_leaf[s] != -1:
            return E_STRAY, -1, s, float(A.slot_leaf[s]), -1.0
    # every used slot's id maps back to it; keys count equals the root count
    if keys.shape[0] != A.count[root]:
        return E_KEY, root, -1, float(keys.shape[0]), float(A.count[root])
    for i in range(keys.shape[0]):
        s = key_slot[i]
        if s < 0 or s >= n_slots or A.slot_id[s] != keys[i] or A.slot_leaf[s] < 0 or not seen[A.slot_leaf[s]]:
            return E_KEY, -1, s, float(keys[i]), float(i)
    # radii and norm ranges bound every target of every ancestor (exact, float64)
    for v in range(n_nodes):
        if not seen[v] or A.leaf_start[v] < 0:
            continue
        for s in range(A.leaf_start[v], A.leaf_start[v] + A.leaf_size[v]):
            n2 = 0.0
            for t in range(d):
                n2 += float(A.vecs[s, t]) ** 2
            yn = math.sqrt(n2)
            u = v
            while u >= 0:
                d2 = 0.0
                for t in range(d):
                    diff = float(A.vecs[s, t]) - float(A.center[u, t])
                    d2 += diff * diff
                if math.sqrt(d2) > A.radius[u]:
                    return E_RADIUS, u, s, math.sqrt(d2), A.radius[u]
                if A.node_lo[u] >= 0 and not (A.node_lo[u] <= s < A.node_lo[u] + A.count[u]):
                    return E_RANGE, u, s, float(A.node_lo[u]), float(A.count[u])
                if yn > A.nu_max[u] or yn < A.nu_min[u]:
                    return E_NORM, u, s, yn, A.nu_max[u] if yn > A.nu_max[u] else A.nu_min[u]
                u = A.parent[u]
    return OK, -1, -1, 0.0, 0.0
