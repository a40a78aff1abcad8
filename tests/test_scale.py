"""Opt-in (`pytest -m slow`): exactness at realistic sizes, where the grouped search runs
several query blocks over thousands of clusters and the sampler's bounds are stressed."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import treeidx.tree as tree_mod
from bench.datasets import load
from treeidx import SoftmaxSampler, TreeIndex
from treeidx.brute import BruteForce

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clustered():
    x, q = load("clustered", 300_000, 32, n_queries=2500, seed=7)
    return x, q, TreeIndex.build(x, seed=7)


def test_grouped_search_is_exact_at_scale(clustered):
    x, q, index = clustered
    assert q.shape[0] > tree_mod.GROUP_BLOCK  # several blocks
    truth_s, truth_i = BruteForce(x).search(q, 20)
    got_s, got_i = index.search(q, 20)
    np.testing.assert_allclose(got_s, truth_s, rtol=0, atol=2e-6)
    exclude = [truth_i[b, :5] for b in range(q.shape[0])]  # the five best are off limits
    got_s, got_i = index.search(q, 10, exclude=exclude)
    np.testing.assert_allclose(got_s, truth_s[:, 5:15], rtol=0, atol=2e-6)
    assert not any(np.isin(got_i[b], exclude[b]).any() for b in range(q.shape[0]))


@pytest.mark.parametrize("perplexity_beta", [5.0, 40.0])
def test_exact_sampler_matches_softmax_at_scale(clustered, perplexity_beta):
    """Chi-square of exact-mode draws against the softmax over all 300k targets, pooled
    into the 50 heaviest targets plus the rest (expected counts >= 5)."""
    x, q, index = clustered
    beta = perplexity_beta
    sampler = SoftmaxSampler(index, temperature=1.0 / beta, mode="exact")
    for b in range(3):
        z = beta * (x.astype(np.float64) @ q[b].astype(np.float64))
        p = np.exp(z - z.max())
        p /= p.sum()
        draws = sampler.sample(q[b : b + 1], 40_000, seed=100 + b).ids[0]
        top = np.argsort(-p)[:50]
        counts = np.array([(draws == t).sum() for t in top] + [0])
        counts[-1] = draws.size - counts[:-1].sum()
        expected = np.append(p[top], 1.0 - p[top].sum()) * draws.size
        keep = expected >= 5
        obs = np.append(counts[keep], counts[~keep].sum())
        exp = np.append(expected[keep], expected[~keep].sum())
        if exp[-1] < 5:
            obs, exp = obs[:-1], exp[:-1]
        assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-4
