"""Tests of the exact brute-force oracles (treeidx.brute)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from treeidx.brute import BruteForce


def _data(n: int = 3000, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _chi2_pvalue(counts: np.ndarray, p: np.ndarray, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit, pooling bins with small expected counts into one."""
    n = counts.sum()
    e = n * p
    small = e < min_expected
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(e[~small], e[small].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    exp *= obs.sum() / exp.sum()  # guard float rounding in the totals
    return float(stats.chisquare(obs, exp).pvalue)


@pytest.fixture(scope="module")
def bf() -> BruteForce:
    ids = np.arange(3000, dtype=np.int64) * 7 + 3  # non-trivial ids
    return BruteForce(_data(), ids, batch_size=5)  # small batches: exercise batching


def test_search_matches_argsort(bf: BruteForce) -> None:
    q = _data(11, seed=1)
    s, i = bf.search(q, 10)
    ref = q @ bf.vectors.T
    order = np.argsort(-ref, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(s, np.take_along_axis(ref, order, axis=1), rtol=1e-5, atol=1e-6)
    assert (i == bf.ids[order]).mean() > 0.99  # ties aside
    assert np.all(np.diff(s, axis=1) <= 0) and s.dtype == np.float32 and i.dtype == np.int64


def test_search_with_exclusions(bf: BruteForce) -> None:
    q = _data(6, seed=2)
    top, ids = bf.search(q, 5)
    exclude = [set(ids[b, :3].tolist()) | {-1, 10**12} for b in range(6)]  # unknown ids ignored
    s, i = bf.search(q, 5, exclude=exclude)
    for b in range(6):
        assert not set(i[b].tolist()) & exclude[b]
        ref = q[b] @ bf.vectors.T
        ref[np.isin(bf.ids, list(exclude[b]))] = -np.inf
        np.testing.assert_allclose(s[b], np.sort(ref)[::-1][:5], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(i[:, :2], ids[:, 3:5])


def test_log_partition_exact(bf: BruteForce) -> None:
    q = _data(7, seed=3)

    # the weights are float32 exponentials: relative error < (|x| + 4) 2^-23 for x >= -87
    # (brute.py), so log Z is off by at most that at the largest |x| that matters
    def bound(s, beta):
        return (min(beta * float(np.ptp(s)), 87.0) + 4.0) * 2.0**-23

    for beta in (0.5, 20.0, 1000.0):
        s = (q @ bf.vectors.T).astype(np.float64)
        ref = logsumexp(beta * s, axis=1)
        got = bf.log_partition(q, beta)
        for b in range(q.shape[0]):
            assert abs(got[b] - ref[b]) <= bound(s[b], beta), (beta, b, got[b] - ref[b])
    ex = [bf.ids[:100]] * 7
    s = (q @ bf.vectors.T).astype(np.float64)[:, 100:]
    got = bf.log_partition(q, 3.0, exclude=ex)
    np.testing.assert_allclose(got, logsumexp(3.0 * s, axis=1), rtol=0, atol=bound(s, 3.0))


def test_sample_distribution_chi2(bf: BruteForce) -> None:
    q = _data(1, seed=4)
    beta, k = 8.0, 200_000
    ids, logp, logz = bf.sample(q, k, beta, seed=123)
    p = bf.probabilities(q[0], beta)
    rows = np.searchsorted(bf.ids, ids[0])  # ids are sorted here
    counts = np.bincount(rows, minlength=len(bf))
    assert _chi2_pvalue(counts, p) > 1e-3
    # the same test rejects a deliberately wrong distribution (beta * 1.1)
    assert _chi2_pvalue(counts, bf.probabilities(q[0], beta * 1.1)) < 1e-6
    # log Z from float32 weights: off by < (87 + 4) 2^-23 at most (brute.py)
    np.testing.assert_allclose(logp[0], np.log(p[rows]), rtol=0, atol=91 * 2.0**-23)
    assert logz.shape == (1,) and logp.dtype == np.float64


def test_sample_with_exclusions_and_tiny_weights() -> None:
    # one dominant row followed by many tiny ones: a float32 prefix sum would drop the tail
    n = 20_000
    x = np.zeros((n, 2), np.float32)
    x[:, 0] = -1.0
    x[0, 0] = 1.0
    bf = BruteForce(x)
    q = np.array([[1.0, 0.0]], np.float32)
    beta = 0.5 * np.log(n) * 1.2  # dominant row weight e^{2 beta} ~ n^1.2 x each tail row
    p = bf.probabilities(q[0], beta)
    ids, _, _ = bf.sample(q, 50_000, beta, seed=0)
    tail = (ids[0] != 0).mean()
    se = np.sqrt(p[1:].sum() * (1 - p[1:].sum()) / 50_000)
    assert abs(tail - p[1:].sum()) < 5 * se
    ids, logp, _ = bf.sample(q, 1000, beta, exclude=[[0]], seed=1)
    assert not np.any(ids == 0)
    np.testing.assert_allclose(logp, -np.log(n - 1), atol=1e-9)


def test_high_beta_large_norms_finite() -> None:
    x = _data(2000, seed=5) * 30.0
    bf = BruteForce(x, batch_size=3)
    q = _data(4, seed=6) * 30.0
    ids, logp, logz = bf.sample(q, 64, 1000.0, seed=0)
    assert np.isfinite(logp).all() and np.isfinite(logz).all() and np.all(logp <= 1e-12)
    ref = logsumexp(1000.0 * (q @ bf.vectors.T).astype(np.float64), axis=1)
    # |s| ~ 900: batched sgemm and q @ X.T round scores differently (1 float32 ulp * beta)
    np.testing.assert_allclose(logz, ref, rtol=3e-7)
    p = bf.probabilities(q[0], 1000.0)
    assert np.isfinite(p).all() and abs(p.sum() - 1) < 1e-12


def test_determinism(bf: BruteForce) -> None:
    q = _data(13, seed=7)
    a = bf.sample(q, 32, 10.0, seed=99)
    b = bf.sample(q, 32, 10.0, seed=99)
    c = BruteForce(bf.vectors, bf.ids, batch_size=64).sample(q, 32, 10.0, seed=99)
    for x, y, z in zip(a, b, c):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)  # independent of batch_size
    assert not np.array_equal(a[0], bf.sample(q, 32, 10.0, seed=100)[0])


def test_errors(bf: BruteForce) -> None:
    q = _data(2, seed=8)
    with pytest.raises(ValueError):
        bf.search(q[:, :4], 3)  # wrong dim
    with pytest.raises(ValueError):
        bf.search(np.full((1, 8), np.nan, np.float32), 3)
    with pytest.raises(ValueError):
        bf.search(q, 0)
    with pytest.raises(ValueError):
        bf.search(q, len(bf) + 1)
    with pytest.raises(ValueError):
        bf.search(q, len(bf), exclude=[[bf.ids[0]], []])
    for beta in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError):
            bf.sample(q, 3, beta)
    with pytest.raises(ValueError):
        bf.sample(q, 3, 1.0, exclude=[bf.ids, []])  # everything excluded
    with pytest.raises(ValueError):
        bf.sample(q, 3, 1.0, exclude=[[1]])  # wrong number of exclusion sets
    with pytest.raises(ValueError):
        BruteForce(np.zeros((3, 2, 2), np.float32))
    with pytest.raises(ValueError):
        BruteForce(np.array([[np.inf, 0.0]], np.float32))
    with pytest.raises(ValueError):
        bf.probabilities(q, 1.0)  # two queries


def test_the_default_batch_keeps_the_score_buffer_near_a_gigabyte():
    from treeidx.brute import BUFFER_BYTES, MAX_BATCH, default_batch_size

    assert default_batch_size(1000) == MAX_BATCH
    for n in (1_000_000, 4_000_000, 10_000_000, 300_000_000):
        rows = default_batch_size(n)
        assert rows >= 1 and (rows == 1 or rows * n * 4 <= BUFFER_BYTES)
        assert rows == MAX_BATCH or (rows + 1) * n * 4 > BUFFER_BYTES
    assert BruteForce(_data()).batch_size == default_batch_size(len(_data()))
    with pytest.raises(ValueError, match="batch_size"):
        BruteForce(_data(), batch_size=0)
