"""NystromDrift: exactness on linear drift, gains on nonlinear drift, numerics, errors."""

from __future__ import annotations

import numpy as np
import pytest

from treeidx.drift import DriftModel
from treeidx.nystrom import NystromDrift, kcenter, leverage_sample, leverage_scores


def data(n=1500, d=8, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, d)).astype(np.float32)
    return g, rng


def linear_drift(g, rng, scale=0.3):
    m = np.eye(g.shape[1]) + scale * rng.standard_normal((g.shape[1], g.shape[1]))
    return g.astype(np.float64) @ m.T


def nonlinear_drift(g, rng):
    d = g.shape[1]
    b = rng.standard_normal((d, d)) / np.sqrt(d)
    return linear_drift(g, rng, 0.2) + 0.4 * np.tanh(2 * g.astype(np.float64) @ b)


def fresh_of(model: NystromDrift, fresh_all: np.ndarray) -> np.ndarray:
    return fresh_all[model.landmark_ids]  # ids are row numbers in these tests


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("landmarks", ["kcenter", "uniform", "ids"])
@pytest.mark.parametrize("ridge", [0.0, 1e-9])
def test_linear_drift_with_spanning_landmarks_is_exact(residual, landmarks, ridge):
    g, rng = data()
    fresh = linear_drift(g, rng)
    lm = rng.choice(g.shape[0], 20, replace=False) if landmarks == "ids" else landmarks
    model = NystromDrift(
        g,
        n_landmarks=None if landmarks == "ids" else 20,
        landmarks=lm,
        kernel="linear",
        residual=residual,
        ridge=ridge,
        seed=3,
    )
    assert model.dim == g.shape[1] and model.rank == g.shape[1]
    fit = model.fit(fresh_of(model, fresh), holdout_ids=np.arange(100), holdout_vectors=fresh[:100])
    assert fit.landmark_residual < 1e-6 and fit.holdout.predicted < 1e-6 < fit.holdout.stale
    ids = np.arange(g.shape[0])
    pred = model.predict(ids)
    np.testing.assert_allclose(pred, fresh, rtol=1e-5, atol=1e-5 * np.abs(fresh).max())
    np.testing.assert_array_equal(model.features(), g)  # φ = stale vector: the tree never changes
    q = rng.standard_normal((5, g.shape[1])).astype(np.float32)
    # <W q, φ(y)> = <q, predicted y>
    lhs = model.transform_queries(q).astype(np.float64) @ model.features().T.astype(np.float64)
    np.testing.assert_allclose(lhs, q.astype(np.float64) @ pred.T.astype(np.float64), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", ["linear", "rbf", "cosine"])
def test_nonlinear_drift_predictions_beat_stale(kernel):
    g, rng = data(n=3000, d=6, seed=1)
    fresh = nonlinear_drift(g, rng)
    model = NystromDrift(g, n_landmarks=200, kernel=kernel, seed=0)
    fit = model.fit(fresh_of(model, fresh), holdout_ids=np.arange(3000), holdout_vectors=fresh)
    assert fit.holdout.predicted < 0.6 * fit.holdout.stale
    if kernel == "rbf":  # the kernel that can follow a nonlinear map beats the linear fit
        lin = NystromDrift(g, n_landmarks=200, kernel="linear", seed=0)
        assert (
            fit.holdout.predicted
            < lin.fit(fresh_of(lin, fresh), holdout_ids=np.arange(3000), holdout_vectors=fresh).holdout.predicted
        )
    # features and W stay consistent: <W q, φ> = <q, Wᵀ φ>
    q = rng.standard_normal((3, g.shape[1])).astype(np.float32)
    phi = model.features(np.arange(50)).astype(np.float64)
    np.testing.assert_allclose(
        model.transform_queries(q).astype(np.float64) @ phi.T,
        q.astype(np.float64) @ model.predict(np.arange(50)).T.astype(np.float64),
        rtol=1e-4,
        atol=1e-4,
    )


def test_no_drift_predicts_stale():
    g, _ = data(n=500)
    for kernel in ("linear", "rbf", "cosine"):
        model = NystromDrift(g, n_landmarks=40, kernel=kernel)  # fitted with fresh == stale at construction
        np.testing.assert_allclose(model.predict(np.arange(500)), g, atol=1e-5)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_duplicate_and_degenerate_landmarks_are_stable(kernel):
    """Repeated landmark vectors and a rank-deficient set: eigen-clipping keeps it finite."""
    g, rng = data(n=400, d=6)
    g[:50] = g[0]  # 50 identical vectors
    g[50:100, 3:] = 0  # a flat patch
    fresh = linear_drift(g, rng)
    model = NystromDrift(g, landmarks=np.arange(0, 100, 2), kernel=kernel, ridge=0.0)
    model.fit(fresh[np.arange(0, 100, 2)])
    pred = model.predict(np.arange(400))
    assert np.isfinite(pred).all() and np.isfinite(model.W).all()
    assert model.rank < 50


def test_scale_invariance():
    g, rng = data(n=600)
    fresh = nonlinear_drift(g, rng)
    errs = []
    for s in (1e-3, 1.0, 1e3):
        model = NystromDrift(g * s, n_landmarks=60, kernel="rbf", seed=2)
        errs.append(
            model.fit(
                fresh_of(model, fresh) * s, holdout_ids=np.arange(600), holdout_vectors=fresh * s
            ).holdout.predicted
        )
    np.testing.assert_allclose(errs, errs[1], rtol=1e-3)


def test_kcenter_distinct_deterministic_and_covering():
    g, _ = data(n=2000, d=3)
    a, b = kcenter(g, 64, seed=5), kcenter(g, 64, seed=5)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 64

    def cover(idx):
        d2 = ((g[:, None, :] - g[idx][None]) ** 2).sum(-1).min(1)
        return float(np.sqrt(d2.max()))

    uni = np.random.default_rng(5).choice(2000, 64, replace=False)
    assert cover(a) < cover(uni)
    dup = np.repeat(g[:3], 10, axis=0)
    with pytest.raises(ValueError, match="only 3 distinct"):
        kcenter(dup, 4)


def test_leverage_landmarks_find_the_rare_directions():
    # 990 targets in a 2-d plane, 10 more each along its own extra axis: each of those
    # alone pins a direction of the linear fit (leverage ~1), the plane's rows share ~2.
    rng = np.random.default_rng(3)
    d = 12
    x = np.zeros((1000, d), np.float32)
    x[:990, :2] = rng.standard_normal((990, 2))
    rare = np.arange(990, 1000)
    x[rare, 2 + np.arange(10)] = 1.0 + rng.random(10)
    scores = leverage_scores(x)
    assert scores.sum() == pytest.approx(d, rel=1e-3)  # trace of the hat matrix
    assert scores[rare].min() > 0.99 and scores[:990].max() < 0.05
    chosen = leverage_sample(x, 10, seed=0)
    assert np.unique(chosen).size == 10 and np.array_equal(chosen, leverage_sample(x, 10, seed=0))
    # ~10/12 of the mass is on the rare rows; uniform choice would find 0.1 of them
    assert np.isin(chosen, rare).sum() >= 7
    model = NystromDrift(x, n_landmarks=10, landmarks="leverage", seed=0)
    assert np.array_equal(np.sort(model.landmark_ids), chosen)
    with pytest.raises(ValueError, match="leverage"):
        NystromDrift(x, n_landmarks=10, landmarks="levrage")


def test_errors():
    g, _ = data(n=100, d=8)
    with pytest.raises(ValueError, match="larger than the 100"):
        NystromDrift(g, n_landmarks=101)
    with pytest.raises(ValueError, match="positive integer"):
        NystromDrift(g, n_landmarks=0)
    with pytest.raises(ValueError, match="duplicated"):
        NystromDrift(g, landmarks=np.array([1, 2, 2]))
    with pytest.raises(KeyError, match="not among"):
        NystromDrift(g, landmarks=np.array([1, 1000]))
    with pytest.raises(ValueError, match="needs n_landmarks >= dim"):
        NystromDrift(g, n_landmarks=4, kernel="linear", residual=False)
    with pytest.raises(ValueError, match="kernel"):
        NystromDrift(g, n_landmarks=4, kernel="poly")
    with pytest.raises(ValueError, match="only 1 distinct"):
        NystromDrift(np.ones((10, 3)), n_landmarks=2)
    model = NystromDrift(g, n_landmarks=10, kernel="rbf")
    with pytest.raises(ValueError, match="expected 10 rows"):
        model.fit(g[:9])
    with pytest.raises(ValueError, match="NaN"):
        model.fit(np.full((10, 8), np.nan))
    with pytest.raises(KeyError):
        model.predict([1000])


def test_state_round_trip():
    g, rng = data(n=300)
    fresh = nonlinear_drift(g, rng)
    model = NystromDrift(g, n_landmarks=30, kernel="rbf", ids=np.arange(300) * 2 + 1)
    model.fit(fresh[(model.landmark_ids - 1) // 2])
    back = NystromDrift.from_state(model.state())
    ids = np.arange(300) * 2 + 1
    np.testing.assert_array_equal(back.predict(ids), model.predict(ids))
    np.testing.assert_array_equal(back.features(), model.features())


def test_fit_takes_landmark_ids_in_any_order_and_observe_is_a_no_op():
    g, rng = data(n=300, d=5)
    fresh = linear_drift(g, rng)
    a = NystromDrift(g, n_landmarks=12, kernel="rbf", seed=1)
    b = NystromDrift(g, n_landmarks=12, kernel="rbf", seed=1)
    assert a.query_side and isinstance(a, DriftModel)
    perm = rng.permutation(12)
    a.fit(fresh_of(a, fresh))  # positional: rows in landmark_ids order
    b.fit(fresh_of(b, fresh)[perm], b.landmark_ids[perm])
    np.testing.assert_array_equal(a.W, b.W)
    b.fit(fresh_landmark_vectors=fresh_of(b, fresh))  # the old keyword name
    np.testing.assert_array_equal(a.W, b.W)
    w = a.W.copy()
    a.observe(fresh[:7], np.arange(7))
    a.observe(fresh[:2], [10**9, -1])  # ids outside the model are fine (added targets)
    np.testing.assert_array_equal(a.W, w)
    with pytest.raises(ValueError, match="expected dimension 5"):
        a.observe(fresh[:2, :3], [0, 1])
    with pytest.raises(ValueError, match="permutation of the 12 landmark_ids"):
        a.fit(fresh_of(a, fresh), np.r_[a.landmark_ids[:11], 10**6])
    with pytest.raises(KeyError):  # a bad hold-out changes nothing
        a.fit(fresh_of(a, fresh) * 2, holdout_ids=[10**9], holdout_vectors=fresh[:1])
    np.testing.assert_array_equal(a.W, w)
    with pytest.raises(TypeError, match="not both"):
        a.fit(fresh_of(a, fresh), fresh_landmark_vectors=fresh_of(a, fresh))
