"""Per-query lists in CSR form (ptr, values): row b is values[ptr[b]:ptr[b + 1]].

Exclusions travel this way from the public API (`_validate.as_exclude`) to the
kernels; search and sampler reorder and slice them along with their query batches.
"""

from __future__ import annotations

import numpy as np


def permute_rows(ptr: np.ndarray, vals: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a CSR taken in the given order."""
    if vals.size == 0:
        return np.zeros(order.shape[0] + 1, np.int64), vals
    lens = np.diff(ptr)[order]
    new_ptr = np.zeros(order.shape[0] + 1, np.int64)
    np.cumsum(lens, out=new_ptr[1:])
    return new_ptr, vals[concat_ranges(ptr[:-1][order], lens)]


def slice_rows(ptr: np.ndarray, vals: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows lo..hi of a CSR, re-based."""
    return ptr[lo : hi + 1] - ptr[lo], vals[ptr[lo] : ptr[hi]]


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for each (s, l)."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, np.int64)
    offs = np.repeat(np.asarray(starts, np.int64) - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return offs + np.arange(total, dtype=np.int64)
