"""CorrectorDrift: learns a planted nonlinear drift, equals the ridge map untrained,
determinism, state round trip, the replay buffer's invariant, input errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treeidx.corrector import CorrectorDrift
from treeidx.drift import DriftModel


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted(n=3000, d=16, seed=0):
    """Unit stale vectors and fresh = normalise(g + 0.3 tanh(g M)): a smooth nonlinear drift."""
    rng = np.random.default_rng(seed)
    g = unit(rng.standard_normal((n, d)))
    m = 2.0 * rng.standard_normal((d, d))
    return g.astype(np.float32), unit(g + 0.3 * np.tanh(g @ m)).astype(np.float32), rng


@pytest.mark.parametrize("normalize", [False, True])
def test_learns_a_planted_nonlinear_drift_better_than_the_ridge_map(normalize):
    g, f, _ = planted()
    train, hold = np.arange(2000), np.arange(2000, 3000)
    kw = dict(hidden=64, normalize=normalize, seed=1)
    ridge_only = CorrectorDrift(g, steps_per_fit=0, **kw).fit(
        f[train], train, holdout_ids=hold, holdout_vectors=f[hold]
    )
    model = CorrectorDrift(g, steps_per_fit=3000, lr=1e-2, **kw)
    fit = model.fit(f[train], train, holdout_ids=hold, holdout_vectors=f[hold])
    # held-out targets: the network beats the linear corrector, which beats stale vectors
    assert fit.holdout.predicted < 0.75 * ridge_only.holdout.predicted
    assert ridge_only.holdout.predicted < 0.6 * fit.holdout.stale
    assert fit.rank == 16 and fit.landmark_residual < ridge_only.landmark_residual
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(model.predict(hold), axis=1), 1.0, rtol=1e-5)


def test_untrained_corrector_is_exactly_the_ridge_map():
    g, f, _ = planted(n=500, d=8)
    ids = np.arange(0, 500, 2)
    model = CorrectorDrift(g, hidden=16, ridge=0.05, steps_per_fit=0)
    model.fit(f[ids], ids)
    G, F = g[ids].astype(np.float64), f[ids].astype(np.float64)
    gram = G.T @ G
    a = np.linalg.solve(gram + 0.05 * np.trace(gram) / 8 * np.eye(8), G.T @ (F - G))
    want = g.astype(np.float64) @ (np.eye(8) + a)
    np.testing.assert_allclose(model.predict(np.arange(500)), want, rtol=1e-5, atol=1e-6)
    assert isinstance(model, DriftModel) and not model.query_side
    np.testing.assert_array_equal(model.features(), model.predict(np.arange(500)))
    q = g[:3] * 2
    np.testing.assert_array_equal(model.transform_queries(q), q)
    np.testing.assert_array_equal(model.predict_from_features(q), q)


def run(model, f, rng_seed):
    rng = np.random.default_rng(rng_seed)
    for _ in range(3):
        ids = rng.choice(f.shape[0], 300, replace=False)
        model.observe(f[ids], ids)
        model.fit()
    return model


def test_same_seed_same_predictions_and_state_round_trip():
    g, f, _ = planted(n=800, d=8)
    kw = dict(hidden=16, steps_per_fit=50, batch_size=64, buffer_size=500, lr=3e-3)
    a = run(CorrectorDrift(g, seed=3, **kw), f, 0)
    b = run(CorrectorDrift(g, seed=3, **kw), f, 0)
    c = run(CorrectorDrift(g, seed=4, **kw), f, 0)
    ids = np.arange(800)
    np.testing.assert_array_equal(a.predict(ids), b.predict(ids))
    assert not np.array_equal(a.predict(ids), c.predict(ids))
    back = CorrectorDrift.from_state({k: v.copy() for k, v in a.state().items()})
    np.testing.assert_array_equal(back.predict(ids), a.predict(ids))
    np.testing.assert_array_equal(back.buffer_ids, a.buffer_ids)
    # the loaded model keeps training exactly as the original (buffer, Adam, generator)
    run(a, f, 9), run(back, f, 9)
    np.testing.assert_array_equal(back.predict(ids), a.predict(ids))


def test_bad_input_raises_and_changes_nothing():
    g, f, _ = planted(n=200, d=8)
    model = CorrectorDrift(g, ids=np.arange(200) + 1000, hidden=8, steps_per_fit=5)
    with pytest.raises(ValueError, match="replay buffer is empty"):
        model.fit()
    model.observe(f[:10], np.arange(10) + 1000)
    before, pred = model.buffer_ids, model.predict(np.arange(1000, 1200))
    bad = f[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        model.observe(bad, [1000, 1001, 1002])
    with pytest.raises(ValueError, match="expected dimension 8"):
        model.observe(f[:2, :4], [1000, 1001])
    with pytest.raises(KeyError, match="not among the stale targets"):
        model.observe(f[:2], [1000, 5])
    with pytest.raises(ValueError, match="duplicate"):
        model.observe(f[:2], [1000, 1000])
    with pytest.raises(ValueError, match="2 ids but 3"):
        model.fit(f[:3], [1000, 1001])
    with pytest.raises(KeyError):
        model.fit(f[:2], [1000, 1001], holdout_ids=[7], holdout_vectors=f[:1])
    np.testing.assert_array_equal(model.buffer_ids, before)
    np.testing.assert_array_equal(model.predict(np.arange(1000, 1200)), pred)
    for kw in (dict(hidden=0), dict(lr=0.0), dict(ridge=-1.0), dict(steps_per_fit=-1), dict(buffer_size=0)):
        with pytest.raises(ValueError):
            CorrectorDrift(g, **kw)


@settings(max_examples=60, deadline=None)
@given(
    calls=st.lists(st.lists(st.integers(0, 29), min_size=1, max_size=12, unique=True), min_size=1, max_size=8),
    buffer_size=st.integers(1, 20),
)
def test_the_buffer_keeps_the_latest_pair_of_the_most_recent_ids(calls, buffer_size):
    g, f, rng = planted(n=30, d=4)
    model = CorrectorDrift(g, hidden=4, buffer_size=buffer_size)
    latest: dict[int, np.ndarray] = {}  # reference: insertion order = recency
    for ids in calls:
        fresh = rng.standard_normal((len(ids), 4)).astype(np.float32)
        model.observe(fresh, ids)
        for i, v in zip(ids, fresh):
            latest.pop(i, None)
            latest[i] = v
    want = list(latest)[-buffer_size:]
    assert model.buffer_ids.tolist() == want  # one pair per id, oldest first, most recent kept
    ids, stored = model.buffer()
    assert ids.tolist() == want
    np.testing.assert_array_equal(stored, np.stack([latest[i] for i in want]))
