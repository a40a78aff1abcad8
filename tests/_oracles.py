"""Brute-force oracles shared by the reliability tests: exact search and exact softmax
sampling checked against float64 computations on the stored float32 vectors.

The goodness-of-fit test is exact, not asymptotic: each id whose expected count is at
least 5 is one cell, the others are pooled into one more; a cell's count is exactly
Binomial(draws, p) under the null, and the test rejects when some cell's two-sided
binomial p-value is below ALPHA / (number of cells). By the union bound a correct sampler
fails one check with probability at most ALPHA.
"""

from __future__ import annotations

import numpy as np
from scipy.special import bdtr, bdtrc, logsumexp

ALPHA = 1e-9
DRAWS = 4000  # per query: cells with p >= 2% are tested at about +-50% of their mass


def binomial_gof_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Bonferroni-adjusted p-value of the exact per-cell binomial test (see module doc)."""
    n = int(counts.sum())
    big = probs * n >= 5
    c = np.append(counts[big], counts[~big].sum()).astype(np.int64)
    p = np.append(probs[big], probs[~big].sum())
    keep = p > 0
    if (c[~keep] > 0).any():
        return 0.0  # draws where the softmax has no mass
    c, p = c[keep], np.minimum(p[keep], 1.0)
    lower = bdtr(c, n, p)  # P(X <= c)
    upper = bdtrc(c - 1, n, p)  # P(X >= c); 1 for c = 0
    pv = np.minimum(1.0, 2.0 * np.minimum(lower, upper))
    return float(min(1.0, pv.min() * c.size))


def excluded_mask(ids: np.ndarray, rows: list) -> np.ndarray:
    """(len(rows), len(ids)) bool: ids[j] is excluded for query b (ids sorted)."""
    mask = np.zeros((len(rows), ids.size), bool)
    for b, r in enumerate(rows):
        r = np.asarray(r, np.int64)
        pos = np.minimum(np.searchsorted(ids, r), ids.size - 1)
        mask[b, pos[ids[pos] == r]] = True
    return mask


def assert_search_exact(search, x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int, rows: list):
    """search(q, k, exclude=rows) returns the brute-force top-k (ties aside): the same
    scores, and every returned id is live, allowed, distinct and really has its score."""
    got_s, got_i = search(q, k, exclude=rows)
    s = q.astype(np.float64) @ x.T.astype(np.float64)
    ex = excluded_mask(ids, rows)
    s[ex] = -np.inf
    ref_s = -np.sort(-s, axis=1)[:, :k]
    scale = 1e-4 * (1.0 + np.abs(ref_s).max())
    np.testing.assert_allclose(got_s, ref_s, rtol=1e-4, atol=scale)
    pos = np.minimum(np.searchsorted(ids, got_i), ids.size - 1)
    assert (ids[pos] == got_i).all(), "search returned an id that is not live"
    assert not np.take_along_axis(ex, pos, 1).any(), "search returned an excluded id"
    np.testing.assert_allclose(np.take_along_axis(s, pos, 1), got_s, rtol=1e-4, atol=scale)
    assert (np.diff(np.sort(pos, axis=1), axis=1) > 0).all(), "search returned an id twice"


def assert_sampling_exact(
    sample, x: np.ndarray, ids: np.ndarray, q: np.ndarray, beta: float, rows: list, seed: int, dense: bool
) -> None:
    """sample(q, draws, exclude=rows, seed=) on one exact path against the brute-force softmax."""
    path = "dense" if dense else "tree"
    r = sample(q, DRAWS, exclude=rows, seed=seed)
    s = beta * (q.astype(np.float64) @ x.T.astype(np.float64))
    s[excluded_mask(ids, rows)] = -np.inf
    logz = logsumexp(s, axis=1)
    if dense:
        assert (r.frontier_size == 0).all(), "the dense pass was not taken"
    else:
        assert (r.frontier_size > 0).all(), "a query went dense with dense_fallback=None"
    np.testing.assert_array_equal(r.tv_bound, 0.0, err_msg=f"{path} path: tv_bound of exact draws")
    slack = 1e-12 * (1.0 + np.abs(logz))
    assert ((r.log_z[:, 0] - slack <= logz) & (logz <= r.log_z[:, 1] + slack)).all(), (
        f"{path} path: log Z {logz} outside the certified interval {r.log_z}"
    )
    assert np.isfinite(r.log_q).all()
    pos = np.minimum(np.searchsorted(ids, r.ids), ids.size - 1)
    live = ids[pos] == r.ids
    assert live.all(), f"{path} path: dead id(s) drawn: {np.unique(r.ids[~live])[:5].tolist()}"
    drawn_excluded = np.take_along_axis(s, pos, 1) == -np.inf
    assert not drawn_excluded.any(), (
        f"{path} path: excluded id(s) drawn: {np.unique(r.ids[drawn_excluded])[:5].tolist()}"
    )
    for b in range(q.shape[0]):
        allowed = np.isfinite(s[b])
        counts = np.bincount(pos[b], minlength=ids.size)[allowed]
        pv = binomial_gof_pvalue(counts, np.exp(s[b, allowed] - logz[b]))
        assert pv >= ALPHA, f"query {b} ({path} path): draws do not follow the softmax (p = {pv:.2e})"
