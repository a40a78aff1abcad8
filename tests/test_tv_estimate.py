"""Approx mode's `tv_estimate` against the measured TV, and `target_tv`.

The measured TV of a query's proposal Q to the softmax P (over its allowed ids) is
E_{y~Q}[(1 - P(y)/Q(y))_+] over 200,000 of approx mode's own draws: `log_q` is Q's exact
log-probability and P is brute force, so it is unbiased with standard error
<= 0.5 / sqrt(200,000) ~ 0.0011. The cut, hence Q, does not depend on the seed; only the
estimate's extra draws do, so repeating a query under many keys gives the estimate's
bias and spread against one fixed truth.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

from treeidx import SoftmaxSampler, TreeIndex

from .test_sampling import beta_for_perplexity, clustered

TRUTH_DRAWS = 200_000
REPEATS = 50  # independent estimates per query (one key each)
# the documented reading of tv_estimate (docs/sampling.md): biased upward, never more
# than ~0.01 below the true TV on average, and a spread (one standard deviation over
# seeds) of at most ~0.02 at the default 256 draws on these data
MAX_UNDER = 0.01
MAX_OVER = 0.03
MAX_SPREAD = 0.02


def isotropic(n, dim, seed):
    """Gaussian targets and queries, not normalised: no cluster structure to exploit."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)).astype(np.float32), rng.standard_normal((4, dim)).astype(np.float32)


def log_softmax(x, q, beta, exclude):
    s = beta * (q.astype(np.float64) @ x.T.astype(np.float64))
    for b, ex in enumerate(exclude):
        s[b, list(ex)] = -np.inf
    return s - logsumexp(s, axis=1, keepdims=True)


def measured_tv(sampler, x, q, beta, exclude):
    """(B,) the importance-sampling TV of each query's proposal, from its own draws."""
    r = sampler.sample(q, TRUTH_DRAWS, exclude=exclude, seed=12345)
    lp = log_softmax(x, q, beta, exclude)
    with np.errstate(over="ignore"):
        ratio = np.exp(np.take_along_axis(lp, r.ids, 1) - r.log_q)
    return np.maximum(0.0, 1.0 - ratio).mean(axis=1), r.tv_bound


CASES = {  # name: (data, target perplexity, budget, exclude)
    "clustered-ppl100": (lambda: clustered(3000, 16, seed=4), 100, 200, False),
    "clustered-peaked-ppl3": (lambda: clustered(3000, 16, seed=6), 3, 100, False),
    "isotropic-flat-ppl1000": (lambda: isotropic(2000, 8, seed=7), 1000, 300, False),
    "unnormalised-excluded-ppl30": (lambda: clustered(2500, 12, seed=8, unit=False), 30, 120, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tv_estimate_tracks_the_measured_tv(case):
    data, ppl, budget, with_exclude = CASES[case]
    x, q = data()
    beta = beta_for_perplexity(x, q, ppl)
    index = TreeIndex.build(x, seed=1, leaf_size=16)
    sampler = SoftmaxSampler(index, temperature=1 / beta, mode="approx", budget=budget)
    exclude = [set()] * q.shape[0]
    if with_exclude:  # each query's most likely target and a random one
        top = np.argmax(q @ x.T, axis=1)
        exclude = [{int(t), int(7 * b + 3)} for b, t in enumerate(top)]
    truth, bound = measured_tv(sampler, x, q, beta, exclude)
    assert (truth > 0.005).any(), "the case should leave a visible TV"
    reps = np.repeat(np.arange(q.shape[0]), REPEATS)
    r = sampler.sample(q[reps], 2, exclude=[exclude[b] for b in reps], seed=3)
    est = r.tv_estimate.reshape(q.shape[0], REPEATS)
    assert ((0.0 <= est) & (est <= bound[:, None] + 1e-12)).all()
    bias = est.mean(axis=1) - truth
    spread = est.std(axis=1, ddof=1)
    msg = f"truth {truth.round(4)}, mean estimate {est.mean(axis=1).round(4)}, spread {spread.round(4)}"
    # the truth's own standard error (<= 0.0011) and the mean's (spread / sqrt(50)) are
    # well inside these margins
    assert (bias >= -MAX_UNDER).all(), "tv_estimate under the measured TV: " + msg
    assert (bias <= MAX_OVER).all(), "tv_estimate far over the measured TV: " + msg
    assert (spread <= MAX_SPREAD).all(), "tv_estimate spread wider than documented: " + msg


def test_the_estimate_costs_its_draws_and_leaves_the_samples_alone():
    x, q = clustered(2000, 8, seed=2)
    index = TreeIndex.build(x, seed=1, leaf_size=16)
    kw = dict(temperature=0.1, mode="approx", budget=100)
    a = SoftmaxSampler(index, **kw).sample(q, 64, seed=9)
    b = SoftmaxSampler(index, tv_draws=0, **kw).sample(q, 64, seed=9)
    c = SoftmaxSampler(index, tv_draws=32, **kw).sample(q, 64, seed=9)
    np.testing.assert_array_equal(a.ids, b.ids)  # its own random stream
    np.testing.assert_array_equal(a.log_q, b.log_q)
    assert np.isnan(b.tv_estimate).all()
    unopened = a.tv_estimate > 0  # queries with something left to estimate
    assert unopened.any()
    np.testing.assert_array_equal(a.inner_products[unopened] - b.inner_products[unopened], 256)
    np.testing.assert_array_equal(c.inner_products[unopened] - b.inner_products[unopened], 32)


def test_exact_mode_and_the_dense_pass_report_zero():
    x, q = clustered(2000, 8, seed=3)
    index = TreeIndex.build(x, seed=1, leaf_size=16)
    for fallback in (None, 1e-9):  # the tree, then every query dense
        r = SoftmaxSampler(index, temperature=0.1, dense_fallback=fallback).sample(q, 16, seed=0)
        np.testing.assert_array_equal(r.tv_estimate, 0.0)


@given(
    seed=st.integers(0, 10_000),
    beta=st.sampled_from([0.5, 5.0, 50.0]),
    unit=st.booleans(),
    budget=st.integers(10, 400),
)
@settings(max_examples=25, deadline=None)
def test_tv_estimate_invariants(seed, beta, unit, budget):
    """In [0, tv_bound]; exactly 0 on a fully opened cut; the same under a seed whatever
    the thread count."""
    x, q = clustered(400, 6, seed=seed, unit=unit)
    index = TreeIndex.build(x, seed=seed, leaf_size=8)
    s = SoftmaxSampler(index, temperature=1 / beta, mode="approx", budget=budget)
    r = s.sample(q, 8, exclude=[{seed % 400}, set(), set(), {1, 2}], seed=seed)
    assert ((0.0 <= r.tv_estimate) & (r.tv_estimate <= r.tv_bound)).all()
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        again = s.sample(q, 8, exclude=[{seed % 400}, set(), set(), {1, 2}], seed=seed)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(r.tv_estimate, again.tv_estimate)
    full = SoftmaxSampler(index, temperature=1 / beta, mode="approx", budget=10**9, tolerance=0.0)
    np.testing.assert_array_equal(full.sample(q, 8, seed=seed).tv_estimate, 0.0)


def test_target_tv_grows_the_budget_of_the_queries_that_need_it():
    x, q0 = clustered(4000, 16, seed=5)
    rng = np.random.default_rng(0)
    q = np.vstack([q0, x[rng.integers(0, x.shape[0], 12)] + 0.05 * rng.standard_normal((12, 16))]).astype(np.float32)
    beta = beta_for_perplexity(x, q0, 200)
    index = TreeIndex.build(x, seed=1, leaf_size=16)
    kw = dict(temperature=1 / beta, mode="approx", budget=64)
    plain = SoftmaxSampler(index, **kw).sample(q, 32, seed=4)
    target = 0.12
    kept = plain.tv_estimate <= target
    assert kept.any() and not kept.all(), "the case should need a larger budget for some queries only"
    s = SoftmaxSampler(index, target_tv=target, max_budget=4 * 4 * 4 * 64, **kw)
    r = s.sample(q, 32, seed=4)
    assert (r.tv_estimate <= target).all()
    # the queries already below the target are not redone: the same samples and work
    np.testing.assert_array_equal(r.ids[kept], plain.ids[kept])
    np.testing.assert_array_equal(r.inner_products[kept], plain.inner_products[kept])
    redone = ~kept
    assert (r.inner_products[redone] > plain.inner_products[redone] + 64).all()
    # and a redone query's samples are those of its final budget
    b = int(np.flatnonzero(redone)[0])
    finals = [SoftmaxSampler(index, **{**kw, "budget": 64 * 4**i}).sample(q, 32, seed=4) for i in (1, 2, 3)]
    assert any(np.array_equal(f.ids[b], r.ids[b]) for f in finals)
    # the measured TV meets the target (up to the estimate's spread)
    truth, _ = measured_tv(s, x, q, beta, [set()] * q.shape[0])
    assert (truth <= target + MAX_SPREAD).all(), truth
    again = s.sample(q, 32, seed=4)
    np.testing.assert_array_equal(again.ids, r.ids)


def test_target_tv_stops_at_the_cap():
    x, q = isotropic(2000, 8, seed=1)
    index = TreeIndex.build(x, seed=1, leaf_size=16)
    kw = dict(temperature=0.05, mode="approx", budget=32)
    r = SoftmaxSampler(index, target_tv=1e-6, max_budget=128, **kw).sample(q, 8, seed=0)
    plain = SoftmaxSampler(index, **{**kw, "budget": 128}).sample(q, 8, seed=0)
    over = r.tv_estimate > 1e-6
    assert over.any()
    np.testing.assert_array_equal(r.ids[over], plain.ids[over])


def test_target_tv_errors():
    x, _ = clustered(200, 4, seed=1)
    index = TreeIndex.build(x)
    with pytest.raises(ValueError, match="approx mode only"):
        SoftmaxSampler(index, temperature=1.0, target_tv=0.1)
    for bad in (0.0, 1.0, -0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="target_tv"):
            SoftmaxSampler(index, temperature=1.0, mode="approx", target_tv=bad)
    with pytest.raises(ValueError, match="max_budget"):
        SoftmaxSampler(index, temperature=1.0, mode="approx", max_budget=100)
    with pytest.raises(ValueError, match="max_budget"):
        SoftmaxSampler(index, temperature=1.0, mode="approx", target_tv=0.1, max_budget=0)
    with pytest.raises(ValueError, match="tv_draws"):
        SoftmaxSampler(index, temperature=1.0, mode="approx", tv_draws=-1)
    with pytest.raises(ValueError, match="tv_draws"):
        SoftmaxSampler(index, temperature=1.0, mode="approx", target_tv=0.1, tv_draws=0)


def test_sample_bench_reports_the_estimate_and_a_target_tv_row(capsys):
    from bench.sample import main

    args = "--dataset clustered --n 3000 --dim 16 --queries 16 --tv-queries 2 --tv-draws 2000"
    args += " --perplexities 100 --budgets 0.02 --no-kmeans-peer --precisions= --target-tv 0.1 --json"
    res = main(args.split())
    capsys.readouterr()
    run = res["runs"][0]
    for entry in (run["treeidx_approx"], run["treeidx_approx_target_tv"], run["approx_curve"][0]):
        assert 0 <= entry["tv_estimate"] <= 1 and abs(entry["tv_estimate_gap_max"]) <= 1
        assert isinstance(entry["tv_estimate_within_003"], bool)
    row = run["treeidx_approx_target_tv"]
    assert row["target_tv"] == 0.1 and 0 <= row["tv_is"] <= 1 and row["speedup_vs_brute"] > 0
    assert row["tv_estimate_all_max"] <= 0.1 or row["inner_product_share_max"] >= 0.25
