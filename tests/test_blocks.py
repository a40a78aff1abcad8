"""Batched approx mode (SoftmaxSampler(mode="approx", batched=True), treeidx/blocks.py).

The proposal is checked against what it claims: draws follow the returned log_q
(goodness of fit on the drawn ids), log_q is the exact softmax once every cluster is
opened, the log Z interval holds the true log Z, excluded ids never come back, the
TV estimate is conservative against the TV measured from the proposal's own draws,
and results do not depend on the thread count. Data come as users send them:
unsorted sparse negative ids, edits before the call, excluded ids.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.special import logsumexp

from treeidx import SoftmaxSampler, TreeIndex, blocks

from .test_sampling import beta_for_perplexity, chi2_pvalue, clustered

P_MIN = 1e-4  # goodness-of-fit threshold: a correct sampler fails one case in 10^4


def sparse_ids(n, seed):
    rng = np.random.default_rng(seed)
    return rng.choice(np.arange(-(10**12), 10**12, 7919), size=n, replace=False)


def log_softmax(x, ids, q, beta, exclude=None):
    """(B, n) exact log-probabilities in the order of `ids`."""
    s = beta * (q.astype(np.float64) @ x.T.astype(np.float64))
    if exclude is not None:
        pos = {int(v): i for i, v in enumerate(ids)}
        for b, ex in enumerate(exclude):
            s[b, [pos[int(v)] for v in ex]] = -np.inf
    return s - logsumexp(s, axis=1, keepdims=True)


def fit_pvalue(counts, probs, min_expected=20.0):
    """Chi-square fit of draw counts to claimed probabilities, on the ids drawn. Ids whose
    expected count is at least `min_expected` are bins of their own (each is drawn with
    probability 1 - e^-20, so listing only drawn ids selects nothing); every other id,
    drawn or not, is one pooled bin holding the remaining draws and mass."""
    n = counts.sum()
    big = probs * n >= min_expected
    obs = np.append(counts[big], n - counts[big].sum())
    exp = np.append(probs[big] * n, n * (1.0 - probs[big].sum()))
    if exp[-1] < min_expected:  # nothing left to pool
        obs, exp = obs[:-1], exp[:-1] * n / exp[:-1].sum()
    return float(stats.chi2.sf(((obs - exp) ** 2 / exp).sum(), len(obs) - 1))


def positions(ids, drawn):
    order = np.argsort(ids)
    return order[np.searchsorted(ids[order], drawn)]


def edited(seed=0, n=3000, dim=16):
    """An index that has seen removals, updates and inserts after the build, so some
    clusters' targets are no longer one contiguous slot range."""
    x, q = clustered(n, dim, seed=seed)
    ids = sparse_ids(n, seed)
    index = TreeIndex.build(x[: n - 400], ids[: n - 400], seed=1, leaf_size=16)
    index.remove(ids[100:300][::-1])
    rng = np.random.default_rng(seed)
    moved = rng.permutation(np.arange(300, 900))[:200]
    x[moved] = clustered(200, dim, seed=seed + 1)[0]
    index.update(x[moved], ids[moved])
    index.insert(x[n - 400 :], ids[n - 400 :])
    keep = np.ones(n, bool)
    keep[100:300] = False
    return index, x[keep], ids[keep], q


def index_of(where, seed, n=3000, dim=16):
    """(index, vectors, ids, queries): freshly built over sparse ids, or `edited`."""
    if where == "edited":
        return edited(seed=seed)
    x, q = clustered(n, dim, seed=seed)
    ids = sparse_ids(n, seed)
    return TreeIndex.build(x, ids, seed=1, leaf_size=16), x, ids, q


@pytest.mark.parametrize("where", ["built", "edited"])
def test_draws_follow_the_returned_log_q(where):
    index, x, ids, q = index_of(where, 2 if where == "built" else 3, n=3000, dim=16)
    beta = beta_for_perplexity(x, q, 100)
    exclude = [{int(ids[b * 11])} for b in range(q.shape[0])]
    sampler = SoftmaxSampler(index, temperature=1 / beta, mode="approx", batched=True, budget=400)
    r = sampler.sample(q, 100_000, exclude=exclude, seed=5)
    lp = log_softmax(x, ids, q, beta, exclude)
    for b in range(q.shape[0]):
        assert int(ids[b * 11]) not in set(r.ids[b].tolist())
        uniq, first, counts = np.unique(r.ids[b], return_index=True, return_counts=True)
        lq = r.log_q[b, first]
        # one id, one log-probability
        np.testing.assert_allclose(
            r.log_q[b], lq[np.searchsorted(uniq, r.ids[b])], rtol=0, atol=1e-9, err_msg="log_q differs for one id"
        )
        q_seen = np.exp(lq)
        assert q_seen.sum() <= 1 + 1e-9
        p = fit_pvalue(counts, q_seen)
        assert p > P_MIN, f"query {b}: draws do not follow log_q (p = {p:.2e})"
        assert (lp[b, positions(ids, uniq)] > -np.inf).all()
        # E_q[P/Q] = 1 for the exact log Q of any proposal covering the softmax's support
        ratio = np.exp(lp[b, positions(ids, r.ids[b])] - r.log_q[b])
        se = ratio.std(ddof=1) / np.sqrt(ratio.size)
        assert abs(ratio.mean() - 1.0) < 5 * se + 1e-3, f"query {b}: mean P/Q {ratio.mean():.4f} +- {se:.4f}"
    assert (r.tv_estimate <= r.tv_bound + 1e-12).all()


@pytest.mark.parametrize("products", ["torch", "numpy"])
@pytest.mark.parametrize("where", ["built", "edited"])
def test_a_budget_over_n_is_the_exact_softmax(where, products, monkeypatch):
    if products == "numpy":  # as without torch installed
        monkeypatch.setattr(blocks, "_torch", lambda: None)
    else:
        pytest.importorskip("torch")
    index, x, ids, q = index_of(where, 4 if where == "built" else 5, n=2000, dim=8)
    beta = beta_for_perplexity(x, q, 30)
    exclude = [{int(ids[3 * b + 1]), int(ids[-b - 1])} for b in range(q.shape[0])]
    sampler = SoftmaxSampler(index, temperature=1 / beta, mode="approx", batched=True, budget=10 * len(index))
    r = sampler.sample(q, 50_000, exclude=exclude, seed=1)
    lp = log_softmax(x, ids, q, beta, exclude)
    true_lz = logsumexp(beta * (q.astype(np.float64) @ x.T.astype(np.float64)), axis=1)
    for b in range(q.shape[0]):
        pos = positions(ids, r.ids[b])
        np.testing.assert_allclose(r.log_q[b], lp[b, pos], atol=2e-4)
        counts = np.bincount(pos, minlength=len(ids))
        assert chi2_pvalue(counts, np.exp(lp[b])) > P_MIN
    np.testing.assert_array_equal(r.tv_estimate, 0.0)
    assert (r.tv_bound < 1e-3).all()
    # the interval is of the allowed ids' mass: below the total over every id
    allowed_lz = logsumexp(
        beta * (q.astype(np.float64) @ x.T.astype(np.float64)) + np.where(np.isinf(lp), -np.inf, 0), axis=1
    )
    assert (r.log_z[:, 0] <= allowed_lz + 1e-9).all() and (allowed_lz <= r.log_z[:, 1] + 1e-9).all()
    assert (allowed_lz <= true_lz).all()


def test_the_log_z_interval_holds_at_small_budgets():
    x, q = clustered(4000, 16, seed=6, unit=False)
    index = TreeIndex.build(x, seed=1, leaf_size=16)
    for ppl in (3, 300):
        beta = beta_for_perplexity(x, q, ppl)
        for budget in (50, 500, 2000):
            r = SoftmaxSampler(index, temperature=1 / beta, mode="approx", batched=True, budget=budget).sample(
                q, 8, seed=0
            )
            lz = logsumexp(beta * (q.astype(np.float64) @ x.T.astype(np.float64)), axis=1)
            assert (r.log_z[:, 0] <= lz).all() and (lz <= r.log_z[:, 1]).all()
            assert ((0 <= r.tv_estimate) & (r.tv_estimate <= r.tv_bound + 1e-12)).all()


def test_tv_estimate_is_conservative():
    """Mean over 40 independent estimates at most 0.01 below the TV measured from 200k
    draws (the documented reading: biased upward)."""
    x, q = clustered(3000, 16, seed=7)
    index = TreeIndex.build(x, seed=1, leaf_size=16)
    beta = beta_for_perplexity(x, q, 100)
    sampler = SoftmaxSampler(index, temperature=1 / beta, mode="approx", batched=True, budget=300)
    big = sampler.sample(q, 200_000, seed=11)
    lp = log_softmax(x, np.arange(3000), q, beta)
    truth = np.maximum(0.0, 1.0 - np.exp(np.take_along_axis(lp, big.ids, 1) - big.log_q)).mean(axis=1)
    assert (truth > 0.01).any(), "the case should leave a visible TV"
    reps = np.repeat(np.arange(q.shape[0]), 40)
    est = sampler.sample(q[reps], 2, seed=3).tv_estimate.reshape(q.shape[0], 40)
    assert (est.mean(axis=1) >= truth - 0.01).all(), f"truth {truth}, estimates {est.mean(axis=1)}"


def test_same_seed_same_samples_whatever_the_thread_count():
    x, q = clustered(3000, 16, seed=8)
    q = np.repeat(q, 8, axis=0) + 0.01 * np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    index = TreeIndex.build(x, seed=1, leaf_size=16)
    sampler = SoftmaxSampler(index, temperature=0.1, mode="approx", batched=True, budget=300)
    torch = blocks._torch()  # the block products' threads count too, when torch does them
    before, before_torch = numba.get_num_threads(), torch.get_num_threads() if torch else None
    try:
        numba.set_num_threads(1)
        if torch:
            torch.set_num_threads(1)
        a = sampler.sample(q, 32, seed=4)
        numba.set_num_threads(max(2, before))
        if torch:
            torch.set_num_threads(2)
        b = sampler.sample(q, 32, seed=4)
    finally:
        numba.set_num_threads(before)
        if torch:
            torch.set_num_threads(before_torch)
    for f in ("ids", "log_q", "log_z", "tv_estimate", "tv_bound", "inner_products"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    c = sampler.sample(q, 32, seed=5)
    assert not np.array_equal(a.ids, c.ids)


def test_target_tv_grows_the_budget_until_the_estimate_meets_it():
    x, q = clustered(4000, 16, seed=9)
    index = TreeIndex.build(x, seed=1, leaf_size=16)
    beta = beta_for_perplexity(x, q, 300)
    base = SoftmaxSampler(index, temperature=1 / beta, mode="approx", batched=True, budget=200)
    r0 = base.sample(q, 16, seed=2)
    assert (r0.tv_estimate > 0.05).any()
    t = SoftmaxSampler(
        index, temperature=1 / beta, mode="approx", batched=True, budget=200, target_tv=0.05, max_budget=len(index)
    )
    r = t.sample(q, 16, seed=2)
    assert (r.tv_estimate <= 0.05).all()
    assert (r.inner_products >= r0.inner_products).all()
    assert (r.inner_products[r0.tv_estimate > 0.05] > r0.inner_products[r0.tv_estimate > 0.05]).all()


def test_batched_is_typed():
    x, _ = clustered(500, 8, seed=1)
    index = TreeIndex.build(x)
    with pytest.raises(TypeError, match="batched"):
        SoftmaxSampler(index, temperature=0.1, mode="approx", batched="yes")
    with pytest.raises(ValueError, match="block_size"):
        SoftmaxSampler(index, temperature=0.1, mode="approx", batched=True, block_size=0)


@pytest.mark.parametrize("where", ["built", "edited"])
@pytest.mark.parametrize("ppl", [3, 300])
def test_exact_batched_draws_the_softmax(where, ppl):
    """plan="tree" keeps every query on the block envelope (no dense pass): the draws fit
    the exact softmax over the allowed ids, and log_q is it up to the log Z estimate,
    which lies in the certified interval."""
    index, x, ids, q = index_of(where, 12 if where == "built" else 13, n=3000, dim=16)
    beta = beta_for_perplexity(x, q, ppl)
    reps = 400
    qq = np.repeat(q, reps, axis=0)
    exclude = [{int(ids[5 * b + 2])} for b in range(q.shape[0])]
    sampler = SoftmaxSampler(index, temperature=1 / beta, batched=True, plan="tree")
    r = sampler.sample(qq, 128, exclude=[exclude[b] for b in np.repeat(np.arange(q.shape[0]), reps)], seed=7)
    assert (r.frontier_size > 0).all(), "plan='tree' should keep every query on the blocks"
    lp = log_softmax(x, ids, q, beta, exclude)
    true_lz = logsumexp(np.where(np.isinf(lp), -np.inf, beta * (q.astype(np.float64) @ x.T.astype(np.float64))), axis=1)
    for b in range(q.shape[0]):
        rows = slice(b * reps, (b + 1) * reps)
        pos = positions(ids, r.ids[rows].ravel())
        assert chi2_pvalue(np.bincount(pos, minlength=len(ids)), np.exp(lp[b])) > P_MIN
        lo, up = r.log_z[rows, 0], r.log_z[rows, 1]
        assert (lo <= true_lz[b] + 1e-9).all() and (true_lz[b] <= up + 1e-9).all()
        # log_q = beta<q,y> - log Z^ with log Z^ inside the interval
        err = r.log_q[rows] - lp[b, pos].reshape(reps, -1)
        assert (np.abs(err) <= (up - lo)[:, None] + 1e-6).all()
    np.testing.assert_array_equal(r.tv_bound, 0.0)
    np.testing.assert_array_equal(r.tv_estimate, 0.0)
    assert (r.draws_per_sample >= 1).all()


def test_exact_batched_plans_dense_and_matches_the_frontier_there():
    x, q = clustered(3000, 16, seed=14)
    index = TreeIndex.build(x, seed=1, leaf_size=16)
    beta = beta_for_perplexity(x, q, 1000)
    dense = SoftmaxSampler(index, temperature=1 / beta, batched=True, plan="dense").sample(q, 64, seed=3)
    assert (dense.frontier_size == 0).all()
    ref = SoftmaxSampler(index, temperature=1 / beta, plan="dense").sample(q, 64, seed=3)
    np.testing.assert_array_equal(dense.ids, ref.ids)  # the same dense pass, the same streams
    # dense_fallback=None: never the dense pass, whatever the plan would predict
    kept = SoftmaxSampler(index, temperature=1 / beta, batched=True, dense_fallback=None).sample(q, 64, seed=3)
    assert (kept.frontier_size > 0).all()


def test_bad_input_is_refused_as_in_the_frontier_mode():
    x, q = clustered(500, 8, seed=1)
    index = TreeIndex.build(x)
    s = SoftmaxSampler(index, temperature=0.1, mode="approx", batched=True)
    with pytest.raises(ValueError):
        s.sample(q[:, :4], 4)
    with pytest.raises(ValueError):
        s.sample(np.full_like(q, np.nan), 4)
    with pytest.raises(ValueError, match="excluded"):
        SoftmaxSampler(TreeIndex.build(x[:3], [5, -2, 9]), temperature=0.1, mode="approx", batched=True).sample(
            q[:1], 2, exclude=[[9, 5, -2]]
        )
    empty = TreeIndex.build(x[:2], [1, 2])
    empty.remove([1, 2])
    with pytest.raises(ValueError, match="empty"):
        SoftmaxSampler(empty, temperature=0.1, mode="approx", batched=True).sample(q, 2)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 400),
    beta=st.sampled_from([0.5, 5.0, 50.0]),
    budget=st.integers(1, 500),
    k=st.integers(1, 40),
    n_ex=st.integers(0, 3),
)
def test_invariants(seed, n, beta, budget, k, n_ex):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    ids = sparse_ids(n, seed)
    q = rng.standard_normal((5, 6)).astype(np.float32)
    index = TreeIndex.build(x, ids, seed=seed, leaf_size=4)
    exclude = [set(rng.choice(ids, size=min(n_ex, n - 1), replace=False).tolist()) for _ in range(5)]
    r = SoftmaxSampler(index, temperature=1 / beta, mode="approx", batched=True, budget=budget).sample(
        q, k, exclude=exclude, seed=seed
    )
    stored = set(ids.tolist())
    for b in range(5):
        got = set(r.ids[b].tolist())
        assert got <= stored and not (got & exclude[b])
    assert (r.log_q <= 1e-12).all() and np.isfinite(r.log_q).all()
    assert (r.log_z[:, 0] <= r.log_z[:, 1]).all()
    lz = logsumexp(beta * (q.astype(np.float64) @ x.T.astype(np.float64)), axis=1)
    assert (r.log_z[:, 0] <= lz + 1e-9).all()  # the allowed mass is at most the total
    assert ((0 <= r.tv_estimate) & (r.tv_estimate <= r.tv_bound + 1e-12)).all()
    assert (r.nodes_opened >= 1).all()
