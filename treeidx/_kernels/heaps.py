"""Growable arrays and the heaps of the search and the sampler.

Kernels keep their work arrays small and grow them on demand (doubling), so a
query that needs a deep frontier pays for it and the others do not.
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, inline="always")
def grow_f(a, n):
    """a, or a copy with room for index n (capacity at least doubled)."""
    if n < a.shape[0]:
        return a
    b = np.empty(max(2 * a.shape[0] + 16, n + 1), a.dtype)
    b[: a.shape[0]] = a
    return b


@nb.njit(cache=True, inline="always")
def heap_sift_down(keys, vals, size, i, k, v):
    """Place (k, v) at position i of a max-heap of `size` entries, moving it down."""
    while True:
        c = 2 * i + 1
        if c >= size:
            break
        if c + 1 < size and keys[c + 1] > keys[c]:
            c += 1
        if keys[c] <= k:
            break
        keys[i] = keys[c]
        vals[i] = vals[c]
        i = c
    keys[i] = k
    vals[i] = v


@nb.njit(cache=True)
def heap_pop(keys, vals, size):
    """Remove the max of a max-heap; returns (key, val, new size)."""
    top_k, top_v = keys[0], vals[0]
    size -= 1
    if size > 0:
        heap_sift_down(keys, vals, size, 0, keys[size], vals[size])
    return top_k, top_v, size


@nb.njit(cache=True)
def heapify(keys, vals, size):
    """Floyd's O(n) construction of a max-heap in place."""
    for i in range(size // 2 - 1, -1, -1):
        heap_sift_down(keys, vals, size, i, keys[i], vals[i])


@nb.njit(cache=True, inline="always")
def topk_push(scores, ids, filled, score, idv):
    """Add to a size-`filled` min-heap (scores, ids) that still has room; sift up."""
    i = filled
    while i > 0:
        p = (i - 1) >> 1
        if scores[p] <= score:
            break
        scores[i] = scores[p]
        ids[i] = ids[p]
        i = p
    scores[i] = score
    ids[i] = idv


@nb.njit(cache=True, inline="always")
def topk_replace_min(scores, ids, k, score, idv):
    """Replace the minimum of a size-k min-heap (scores, ids) and sift down."""
    i = 0
    while True:
        c = 2 * i + 1
        if c >= k:
            break
        if c + 1 < k and scores[c + 1] < scores[c]:
            c += 1
        if scores[c] >= score:
            break
        scores[i] = scores[c]
        ids[i] = ids[c]
        i = c
    scores[i] = score
    ids[i] = idv
