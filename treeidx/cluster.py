"""k-means with BLAS: the top level of the tree, and a yardstick for benchmarks.

`kmeans` clusters a sample and then assigns every row; `assign_nearest` is the
assignment alone (one matrix product per chunk of rows).
"""

from __future__ import annotations

import numpy as np

__all__ = ["kmeans", "assign_nearest"]


def kmeans(
    x: np.ndarray, k: int, seed: int, iters: int = 8, sample_per_center: int = 40
) -> tuple[np.ndarray, np.ndarray]:
    """k centers by k-means on a sample of x (BLAS), then the nearest center of every row.

    Returns (centers (k, d) float32, labels (N,) int64). Deterministic given `seed`; a
    sample of `sample_per_center` rows per center keeps it fast for large x, and empty
    clusters are reseeded on random sample rows.
    """
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
