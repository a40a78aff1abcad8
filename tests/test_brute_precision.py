"""Reduced-precision brute force (treeidx.brute.BruteForce(precision=...)) and the torch
layer's BruteForceSampler(precision=...): the draws follow the distribution whose log q
is returned, which is close to (but not) the exact softmax."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from scipy import stats

from treeidx.brute import BruteForce, bf16_to_f32, quantize_int8

LOWP = ("bf16", "int8")


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _chi2_pvalue(counts: np.ndarray, p: np.ndarray, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit, pooling bins with small expected counts into one."""
    e = counts.sum() * p
    small = e < min_expected
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(e[~small], e[small].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    exp *= obs.sum() / exp.sum()
    return float(stats.chisquare(obs, exp).pvalue)


def test_fp32_is_the_default_and_unchanged() -> None:
    x, q = _unit(3000, 16, 0), _unit(6, 16, 1)
    a, b = BruteForce(x, batch_size=4), BruteForce(x, batch_size=4, precision="fp32")
    assert a.precision == "fp32"
    for u, v in zip(a.sample(q, 32, 8.0, seed=5), b.sample(q, 32, 8.0, seed=5)):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a.tv_to_exact(q, 8.0), np.zeros(6))
    # the exact log-softmax of the float32 scores, as before
    s = (q.astype(np.float64) @ x.T.astype(np.float64)) * 8.0
    np.testing.assert_allclose(a.log_partition(q, 8.0), np.log(np.exp(s).sum(1)), rtol=1e-6)


@pytest.mark.parametrize("precision", LOWP)
def test_log_q_is_that_of_the_distribution_sampled(precision: str) -> None:
    # beta = 30 on 2,000 16-d vectors (perplexity ~26): Q differs from P by TV ~0.015,
    # which 200k draws resolve; the chi-square must accept Q and reject P.
    x, q = _unit(2000, 16, 0), _unit(1, 16, 1)
    beta = 30.0
    bf = BruteForce(x, batch_size=3, precision=precision)
    ids, logq, logz = bf.sample(q, 200_000, beta, seed=3)
    Q = bf.probabilities(q, beta)
    P = BruteForce(x).probabilities(q, beta)
    # the sampler's weights are float32 exponentials: log Q is exact to (87 + 4) 2^-23
    np.testing.assert_allclose(logq[0], np.log(Q[ids[0]]), atol=91 * 2.0**-23)
    np.testing.assert_allclose(logz, bf.log_partition(q, beta), rtol=0, atol=1e-12)
    counts = np.bincount(ids[0], minlength=len(x))
    assert _chi2_pvalue(counts, Q) > 1e-3
    assert _chi2_pvalue(counts, P) < 1e-6
    tv = float(bf.tv_to_exact(q, beta)[0])
    assert tv == pytest.approx(0.5 * np.abs(P - Q).sum(), abs=1e-5)
    assert 1e-4 < tv < 0.05


@pytest.mark.parametrize("precision,limit", [("bf16", 0.02), ("int8", 0.03)])
def test_tv_to_exact_small_on_random_data(precision: str, limit: float) -> None:
    x, q = _unit(20_000, 64, 2), _unit(8, 64, 3)
    bf = BruteForce(x, precision=precision)
    for beta in (5.0, 20.0):
        tv = bf.tv_to_exact(q, beta, block=3)
        assert tv.shape == (8,) and np.all(tv > 0) and np.all(tv < limit), (beta, tv)


@pytest.mark.parametrize("precision", LOWP)
def test_exclusions_determinism_and_batches(precision: str) -> None:
    x, q = _unit(1500, 16, 4), _unit(7, 16, 5)
    ex = [[0, 1, 2]] * 7
    bf = BruteForce(x, np.arange(1500) + 10, batch_size=3, precision=precision)
    ids, logq, logz = bf.sample(q, 500, 20.0, exclude=[[10, 11, 12]] * 7, seed=9)
    assert not np.isin(ids, [10, 11, 12]).any()
    again = bf.sample(q, 500, 20.0, exclude=[[10, 11, 12]] * 7, seed=9)
    for u, v in zip((ids, logq, logz), again):
        np.testing.assert_array_equal(u, v)
    assert np.all(logq <= 0) and np.isfinite(logz).all()
    p = bf.probabilities(q[2:3], 20.0, exclude=[10, 11, 12])
    assert p[:3].sum() == 0 and p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(logq[2], np.log(p[ids[2] - 10]), atol=1e-9)
    if precision == "int8":
        # integer products are exact and queries are coded one by one: batch-independent
        other = BruteForce(x, np.arange(1500) + 10, batch_size=64, precision=precision)
        for u, v in zip((ids, logq, logz), other.sample(q, 500, 20.0, exclude=[[10, 11, 12]] * 7, seed=9)):
            np.testing.assert_array_equal(u, v)
    del ex


def test_search_stays_fp32() -> None:
    x, q = _unit(2000, 16, 6), _unit(5, 16, 7)
    ref = BruteForce(x).search(q, 10)
    for precision in LOWP:
        got = BruteForce(x, precision=precision).search(q, 10)
        np.testing.assert_array_equal(got[1], ref[1])


def test_quantize_int8() -> None:
    x = np.vstack([_unit(100, 24, 8) * 3.0, np.zeros((1, 24), np.float32)])
    codes, scale = quantize_int8(x, block=7)
    assert codes.dtype == np.int8 and scale.dtype == np.float32
    assert np.abs(codes).max() == 127 and codes.min() >= -127
    assert scale[-1] == 1.0 and not codes[-1].any()
    err = np.abs(codes * scale[:, None] - x)
    assert np.all(err <= 0.5 * scale[:, None] * (1 + 1e-6))
    bits = np.array([0x3F80, 0xBF80, 0x0000, 0xFF80], np.uint16)
    np.testing.assert_array_equal(bf16_to_f32(bits), [1.0, -1.0, 0.0, -np.inf])


def test_bad_precision_values() -> None:
    x = _unit(50, 4, 0)
    for bad in ("fp16", "FP32", "", None, 16, b"bf16"):
        with pytest.raises(ValueError, match="precision: expected one of 'fp32', 'bf16', 'int8'"):
            BruteForce(x, precision=bad)


def test_reduced_precision_without_torch_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    x = _unit(50, 4, 0)
    for precision in LOWP:
        with pytest.raises(ImportError, match=r"needs torch.*treeidx\[torch\]"):
            BruteForce(x, precision=precision)
    BruteForce(x).sample(x[:2], 3, 1.0, seed=0)  # fp32 needs no torch


# --------------------------------------------------------------------- torch layer

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("precision", LOWP)
def test_torch_sampler_precision(precision: str) -> None:
    from treeidx.torch import BruteForceSampler

    x, q = _unit(2000, 16, 0), _unit(1, 16, 1)
    T = 1 / 30
    s = BruteForceSampler(torch.from_numpy(x), k=50_000, temperature=T, chunk_size=500, seed=1, precision=precision)
    neg = s.sample(torch.from_numpy(q).double())  # float64 queries: float64 log q
    ids, logq = neg.ids[0].numpy(), neg.log_q[0].numpy()
    # log q is constant per id and sums to 1 over the ids it covers (the same Q)
    Q = np.zeros(len(x))
    Q[ids] = np.exp(logq)
    assert Q.sum() <= 1 + 1e-9
    bq = BruteForce(x, precision=precision).probabilities(q, 1 / T)
    assert np.abs(Q[ids] - bq[ids]).max() / bq[ids].max() < 1e-3  # same recipe as BruteForce
    counts = np.bincount(ids, minlength=len(x))
    assert _chi2_pvalue(counts, bq) > 1e-3
    tv = float(s.tv_to_exact(torch.from_numpy(q))[0])
    assert tv == pytest.approx(float(BruteForce(x, precision=precision).tv_to_exact(q, 1 / T)[0]), abs=2e-3)
    assert 0 < tv < 0.05
    with pytest.raises(ValueError, match="precision"):
        BruteForceSampler(torch.from_numpy(x), k=4, temperature=T, precision="fp8")


def test_torch_sampler_fp32_unchanged_and_positives() -> None:
    from treeidx.torch import BruteForceSampler

    x, q = torch.from_numpy(_unit(500, 8, 3)), torch.from_numpy(_unit(4, 8, 4))
    pos = torch.tensor([0, 1, 2, 3])
    a = BruteForceSampler(x, k=50, temperature=0.1, chunk_size=64, seed=2).sample(q, pos)
    b = BruteForceSampler(x, k=50, temperature=0.1, chunk_size=64, seed=2, precision="fp32").sample(q, pos)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.log_q, b.log_q)
    for precision in LOWP:
        s = BruteForceSampler(x, k=400, temperature=0.05, chunk_size=64, seed=2, precision=precision)
        n = s.sample(q, pos)
        assert not (n.ids == pos[:, None]).any()  # positives excluded at every precision
        assert s.tv_to_exact(q, pos).shape == (4,)
