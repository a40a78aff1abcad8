"""DynamicIndex: invariants under edit sequences, exact sampling w.r.t. predictions, policy, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from scipy import stats
from scipy.special import logsumexp

from treeidx import IndexFileError
from treeidx.corrector import CorrectorDrift
from treeidx.dynamic import DynamicIndex, RefreshPolicy
from treeidx.nystrom import NystromDrift

from ._oracles import assert_sampling_exact

P_MIN = 1e-4


class Encoder:
    """A drifting synthetic encoder: step t maps a base point x to M_t x + c_t tanh(B x)."""

    def __init__(self, d: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.d, self.t = d, 0
        self.m = np.eye(d)
        self.b = self.rng.standard_normal((d, d)) / np.sqrt(d)
        self.c = 0.0

    def step(self, size: float = 0.1) -> None:
        self.t += 1
        self.m = self.m + size * self.rng.standard_normal((self.d, self.d)) / np.sqrt(self.d)
        self.c += size

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return (x @ self.m.T + self.c * np.tanh(x @ self.b)).astype(np.float32)


def setup(n=600, d=5, kernel="rbf", seed=0, **kw):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d)).astype(np.float32)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    enc = Encoder(d, seed)
    di = DynamicIndex.build(
        enc(base), ids, n_landmarks=min(40, n), kernel=kernel, seed=seed, leaf_size=8, fanout=3, **kw
    )
    return di, dict(zip(ids.tolist(), base)), enc, rng


def ridge_gap(di, residual: np.ndarray) -> np.ndarray:
    """Per-row bound on ‖Wᵀ φ_new − v‖ of the ridge write-back: Wᵀ φ_new − v =
    −λ (WᵀW + λI)⁻¹ r, so its norm is at most ‖r‖ λ / (σ_min² + λ); plus float32
    storage of φ (its rounding through W)."""
    W = di.drift.W
    s = np.linalg.svd(W, compute_uv=False)
    lam = di._config["backproject_ridge"] * s[0] ** 2
    shrink = lam / (s[-1] ** 2 + lam) if lam > 0 else 0.0
    return np.linalg.norm(residual, axis=1) * shrink


def landmark_fresh(di, base, enc):
    return enc(np.stack([base[i] for i in di.landmark_ids.tolist()]))


class DynamicEdits(RuleBasedStateMachine):
    """Random refresh / reencode / add / remove sequences; after each, the tree holds its
    invariants, holds exactly the live ids, and predict() equals the model's definition."""

    @initialize(
        n=st.integers(30, 150),
        kernel=st.sampled_from(["linear", "rbf", "cosine"]),
        seed=st.integers(0, 2**16),
        rebuild=st.sampled_from(["partial", "full"]),
        ridge=st.sampled_from([0.0, 1e-3]),
        drift=st.sampled_from(["nystrom", "corrector"]),
    )
    def build(self, n, kernel, seed, rebuild, ridge, drift):
        policy = RefreshPolicy(max_moved_fraction=0.3, rebuild=rebuild, radius_growth=1.0)
        opts = dict(corrector_options=dict(hidden=8, steps_per_fit=20)) if drift == "corrector" else {}
        self.di, self.base, self.enc, self.rng = setup(
            n=n, d=4, kernel=kernel, seed=seed, policy=policy, backproject_ridge=ridge, drift=drift, **opts
        )
        self.known: dict[int, np.ndarray] = {}  # ids with a fresh vector set at the current W
        self.gap: dict[int, float] = {}  # their ridge bound on ‖predict − fresh‖
        self.next_id = 10**6
        self.live = set(self.base)

    def some(self, k):
        ids = self.di.ids
        return self.rng.choice(ids, min(k, ids.size), replace=False)

    @rule(size=st.sampled_from([0.0, 0.05, 0.3]))
    def refresh(self, size):
        self.enc.step(size)
        if self.di.drift.query_side:
            self.di.refresh_landmarks(landmark_fresh(self.di, self.base, self.enc))
        else:  # the corrector trains on the pairs reencode() observed, if any
            if self.di.drift.buffer_ids.size == 0:
                return
            self.di.refit()
        self.known.clear()  # W changed: earlier fresh vectors are now propagated, not exact

    @rule(k=st.integers(1, 25))
    def reencode(self, k):
        ids = self.some(k)
        fresh = self.enc(np.stack([self.base[i] for i in ids.tolist()]))
        gap = ridge_gap(self.di, fresh - self.di.predict(ids))
        self.di.reencode(fresh, ids)
        self.known.update(zip(ids.tolist(), fresh))
        self.gap.update(zip(ids.tolist(), gap))

    @rule(k=st.integers(1, 10))
    def add(self, k):
        ids = np.arange(self.next_id, self.next_id + k)
        self.next_id += k
        x = self.rng.standard_normal((k, 4)).astype(np.float32)
        self.base.update(zip(ids.tolist(), x))
        self.live.update(ids.tolist())
        fresh = self.enc(x)
        gap = ridge_gap(self.di, fresh - self.di.drift.predict_from_features(self.di.drift.features_of(fresh)))
        self.di.add(fresh, ids)
        self.known.update(zip(ids.tolist(), fresh))
        self.gap.update(zip(ids.tolist(), gap))

    @rule(k=st.integers(1, 10))
    def remove(self, k):
        if len(self.di) <= k + 5:
            return
        ids = self.some(k)
        self.di.remove(ids)
        for i in ids.tolist():
            self.known.pop(i, None)
            self.live.discard(i)  # base keeps it: a removed landmark still needs fresh vectors

    @invariant()
    def consistent(self):
        if not hasattr(self, "di"):
            return
        self.di.check()
        assert sorted(self.live) == self.di.ids.tolist()
        if self.known:
            ids = np.array(list(self.known))
            want = np.stack(list(self.known.values()))
            gap = np.linalg.norm(self.di.predict(ids) - want, axis=1)
            bound = np.array([self.gap[i] for i in ids.tolist()]) + 1e-4 * (1 + np.abs(want).max())
            assert (gap <= bound).all(), f"write-back off by {gap.max()}, bound {bound[np.argmax(gap - bound)]}"
        untouched = np.setdiff1d(self.di.ids, self.di.fresh_ids)
        if untouched.size:  # never re-encoded: the model's prediction from the stale vector
            np.testing.assert_allclose(
                self.di.predict(untouched), self.di.drift.predict(untouched), rtol=1e-5, atol=1e-5
            )


DynamicEdits.TestCase.settings = settings(
    max_examples=25, stateful_step_count=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestDynamicEdits = DynamicEdits.TestCase


def chi2_pvalue(counts, probs):
    """Chi-square goodness of fit; bins with expected count < 5 are pooled into one."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp_ = np.append(expected[big], expected[~big].sum())
    keep = exp_ > 0
    if (obs[~keep] > 0).any():
        return 0.0
    return float(stats.chisquare(obs[keep], exp_[keep] * obs[keep].sum() / exp_[keep].sum()).pvalue)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_sampling_is_exact_wrt_predicted_vectors(kernel):
    di, base, enc, rng = setup(n=1500, d=6, kernel=kernel, seed=4, temperature=0.25)
    enc.step(0.3)
    di.refresh_landmarks(landmark_fresh(di, base, enc))
    enc.step(0.1)  # the re-encoded ones below are fresher than the landmark fit
    re = di.ids[:100]
    di.reencode(enc(np.stack([base[i] for i in re.tolist()])), re)
    di.add(enc(rng.standard_normal((2, 6))), np.array([-1, -2]))
    di.remove(di.ids[-50:])
    ids = di.ids
    pred = di.predict(ids).astype(np.float64)
    q = enc(rng.standard_normal((3, 6)))
    exclude = [{int(ids[0])}, set(), {int(ids[5]), int(ids[6])}]
    r = di.sample(q, 40_000, exclude=exclude, seed=11)
    for b in range(q.shape[0]):
        s = q[b].astype(np.float64) @ pred.T / 0.25
        s[np.isin(ids, list(exclude[b]))] = -np.inf
        p = np.exp(s - logsumexp(s))
        counts = np.bincount(np.searchsorted(ids, r.ids[b]), minlength=ids.size).astype(float)
        assert chi2_pvalue(counts, p) > P_MIN, f"query {b}: not the softmax over the predicted vectors"
        assert r.log_z[b, 0] - 1e-6 <= logsumexp(s) <= r.log_z[b, 1] + 1e-6
    # negative control: the same test rejects the softmax over the stale vectors
    stale = pred.copy()
    untouched = np.isin(ids, di.drift.ids) & ~np.isin(ids, di.fresh_ids)
    stale[untouched] = di.drift.stale(ids[untouched])
    s = q[0].astype(np.float64) @ stale.T / 0.25
    s[np.isin(ids, list(exclude[0]))] = -np.inf
    counts = np.bincount(np.searchsorted(ids, r.ids[0]), minlength=ids.size).astype(float)
    assert chi2_pvalue(counts, np.exp(s - logsumexp(s))) < 1e-6


@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_reencode_makes_scores_exact_and_reports_error(ridge):
    di, base, enc, rng = setup(kernel="rbf", seed=2, backproject_ridge=ridge)
    enc.step(0.5)
    di.refresh_landmarks(landmark_fresh(di, base, enc))
    ids = di.ids[:30]
    fresh = enc(np.stack([base[i] for i in ids.tolist()]))
    bound = ridge_gap(di, fresh - di.predict(ids))
    err = di.reencode(fresh, ids)
    assert 0 < err.predicted < err.stale and err.n == 30
    if ridge == 0:  # the exact least-norm change
        np.testing.assert_allclose(di.predict(ids), fresh, atol=1e-5)
        assert di.last_backprojection_error < 1e-5
    else:  # off by at most the ridge's shrinkage of the residual
        gap = np.linalg.norm(di.predict(ids).astype(np.float64) - fresh, axis=1)
        assert (gap <= bound + 1e-5).all() and bound.max() > 0
    s, top = di.search(fresh[:3], 1)  # each fresh vector's best match is itself (scores near exact)
    assert np.isin(top[:, 0], di.ids).all()


def planted_w_index(singular_values: np.ndarray, ridge: float, seed: int = 0):
    """A linear-kernel DynamicIndex whose fitted W is U diag(s) Vᵀ (landmarks span the
    space and the drift is linear, so the fit reproduces the planted map)."""
    rng = np.random.default_rng(seed)
    d = singular_values.size
    x = rng.standard_normal((400, d)).astype(np.float32)
    di = DynamicIndex.build(x, n_landmarks=40, kernel="linear", seed=seed, backproject_ridge=ridge, leaf_size=8)
    u, _ = np.linalg.qr(rng.standard_normal((d, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    w = u @ np.diag(singular_values) @ v.T  # fresh = stale @ w
    di.refresh_landmarks(x[di.landmark_ids].astype(np.float64) @ w)
    return di, x, w, rng


def test_ridge_backprojection_is_near_exact_on_a_well_conditioned_w():
    di, x, w, rng = planted_w_index(np.linspace(0.8, 1.2, 6), ridge=1e-3)
    np.testing.assert_allclose(di.drift.W, w, atol=1e-4)
    ids = di.ids[:50]
    fresh = (x[ids].astype(np.float64) @ w + 0.3 * rng.standard_normal((50, 6))).astype(np.float32)
    di.reencode(fresh, ids)
    rel = np.linalg.norm(di.predict(ids) - fresh, axis=1) / np.linalg.norm(fresh, axis=1)
    assert rel.max() < 2e-3  # shrinkage λ/(σ²+λ) ≤ 1e-3·1.44/0.64 of a residual smaller than v


def test_ridge_backprojection_stays_bounded_on_an_ill_conditioned_w():
    s = np.logspace(-6, 0, 6)
    di, x, w, rng = planted_w_index(s, ridge=1e-3)
    W = di.drift.W
    ids = di.ids[:50]
    phi_old = di.tree.vectors(ids).astype(np.float64)
    fresh = (phi_old @ W + 0.3 * rng.standard_normal((50, 6))).astype(np.float32)
    r = fresh - phi_old @ W
    lam = 1e-3 * np.linalg.norm(W, 2) ** 2
    # ‖Δφ‖ = ‖U diag(σ/(σ²+λ)) Vᵀ r‖ ≤ ‖r‖ max σ/(σ²+λ) ≤ ‖r‖ / (2√λ); + float32 storage
    bound = np.linalg.norm(r, axis=1) / (2 * np.sqrt(lam)) + 1e-6 * (1 + np.linalg.norm(phi_old, axis=1))
    di.reencode(fresh, ids)
    step = np.linalg.norm(di.tree.vectors(ids) - phi_old, axis=1)
    assert (step <= bound).all()
    # the exact least-norm change (pinv, the old write-back) breaks the same bound
    pinv_step = np.linalg.norm(r @ np.linalg.pinv(W.T, rcond=1e-12).T, axis=1)
    assert (pinv_step > bound).all()
    di.check()


def test_policy_rebuilds_and_flags_full_refresh():
    policy = RefreshPolicy(max_moved_fraction=0.05, rebuild="partial", max_drift_error=0.01)
    di, base, enc, rng = setup(n=400, kernel="linear", seed=3, policy=policy)
    enc.step(0.5)
    fit = di.refresh_landmarks(
        landmark_fresh(di, base, enc),
        holdout_ids=di.ids[:50],
        holdout_vectors=enc(np.stack([base[i] for i in di.ids[:50].tolist()])),
    )
    assert fit.holdout.predicted < fit.holdout.stale
    assert di.needs_full_refresh
    assert any(e["action"] == "full re-encode recommended" for e in di.log)
    ids = di.ids[:40]
    di.reencode(enc(np.stack([base[i] for i in ids.tolist()])), ids)
    assert any(e["event"] == "rebuild" for e in di.log)
    di.check()
    all_ids = di.ids
    di.full_refresh(enc(np.stack([base[i] for i in all_ids.tolist()])), all_ids)
    assert not di.needs_full_refresh and di.epoch == 0 and di.fresh_ids.size == 0
    np.testing.assert_allclose(di.predict(all_ids), enc(np.stack([base[i] for i in all_ids.tolist()])), atol=1e-5)


def test_save_load_round_trip_and_corruption(tmp_path):
    di, base, enc, rng = setup(kernel="rbf", seed=5)
    enc.step(0.3)
    di.refresh_landmarks(landmark_fresh(di, base, enc))
    di.reencode(enc(np.stack([base[i] for i in di.ids[:10].tolist()])), di.ids[:10])
    path = tmp_path / "di.npz"
    di.save(path)
    back = DynamicIndex.load(path)
    q = enc(rng.standard_normal((2, 5)))
    np.testing.assert_array_equal(back.sample(q, 50, seed=1).ids, di.sample(q, 50, seed=1).ids)
    np.testing.assert_array_equal(back.fresh_ids, di.fresh_ids)
    assert back.epoch == di.epoch and back.log == di.log
    # the loaded model keeps working: same refresh, same predictions
    fresh = landmark_fresh(di, base, enc)
    di.refresh_landmarks(fresh), back.refresh_landmarks(fresh)
    np.testing.assert_allclose(back.predict(di.ids), di.predict(di.ids))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError):
        DynamicIndex.load(bad)
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(IndexFileError):
        DynamicIndex.load(bad)


def test_errors_change_nothing():
    di, base, enc, rng = setup(n=100, seed=6)
    before = di.predict(di.ids)
    with pytest.raises(KeyError):
        di.reencode(np.zeros((1, 5)), [10**9])
    with pytest.raises(ValueError, match="already in the index"):
        di.add(np.zeros((1, 5)), di.ids[:1])
    with pytest.raises(ValueError, match="expected dimension 5"):
        di.reencode(np.zeros((1, 4)), di.ids[:1])
    with pytest.raises(ValueError, match="expected 40 rows"):
        di.refresh_landmarks(np.zeros((3, 5)))
    np.testing.assert_array_equal(di.predict(di.ids), before)
    di.check()


# ---------------------------------------------------------------------------- drift="corrector"

CORRECTOR = dict(hidden=16, steps_per_fit=100, lr=1e-2, batch_size=64)


def corrector_setup(n=800, d=5, seed=0, **kw):
    return setup(n=n, d=d, seed=seed, drift="corrector", corrector_options=CORRECTOR, **kw)


def encode(enc, base, ids):
    return enc(np.stack([base[i] for i in np.asarray(ids).tolist()]))


def test_corrector_index_samples_exactly_from_its_predictions_after_refit():
    di, base, enc, rng = corrector_setup(seed=7, temperature=0.25)
    assert isinstance(di.drift, CorrectorDrift) and di.landmark_ids.size == 0
    enc.step(0.4)
    seen = di.ids[:300]
    di.reencode(encode(enc, base, seen), seen)  # the loop's pairs train the corrector for free
    fit = di.refit(holdout_ids=di.ids[300:400], holdout_vectors=encode(enc, base, di.ids[300:400]))
    assert fit.holdout.predicted < fit.holdout.stale
    assert any(e["action"] == "moved targets to their new predictions" for e in di.log)
    enc.step(0.1)
    re = di.ids[:40]  # written back after the refit: the tree takes the fresh vectors as they are
    fresh = encode(enc, base, re)
    di.reencode(fresh, re)
    np.testing.assert_array_equal(di.predict(re), fresh)
    untouched = np.setdiff1d(di.ids, di.fresh_ids)
    np.testing.assert_array_equal(di.predict(untouched), di.drift.predict(untouched))
    di.check()
    ids = di.ids
    q = enc(rng.standard_normal((3, 5)))
    rows = [ids[:1], [], ids[5:7]]
    di.sampler.dense_fallback = None
    assert_sampling_exact(
        lambda _q, k, exclude, seed: di.sample(q, k, exclude=exclude, seed=seed),
        di.predict(ids),
        ids,
        q,
        4.0,
        rows,
        3,
        dense=False,
    )


def test_refit_moves_only_targets_not_fresh_and_counts_them_as_moved():
    policy = RefreshPolicy(max_moved_fraction=0.5)
    di, base, enc, rng = corrector_setup(n=300, policy=policy)
    enc.step(0.3)
    added = np.array([-5, -6])
    di.add(enc(rng.standard_normal((2, 5))), added)
    fresh_before = di.predict(added)
    ids = di.ids[2:52]  # the added (negative) ids sort first
    di.reencode(encode(enc, base, ids), ids)
    kept = di.predict(ids)
    di.refit()
    np.testing.assert_array_equal(di.predict(ids), kept)
    np.testing.assert_array_equal(di.predict(added), fresh_before)
    assert any(e["action"] == "partial rebuild" or e["event"] == "rebuild" for e in di.log)
    with pytest.raises(TypeError, match="no landmarks"):
        di.refresh_landmarks(np.zeros((3, 5)))


def test_switching_the_drift_model_is_one_argument_and_instances_must_cover_the_ids():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    ids = np.arange(300) * 3
    for drift in (
        "nystrom",
        "corrector",
        CorrectorDrift(x, ids=ids, hidden=8),
        NystromDrift(x, ids=ids, n_landmarks=12),
    ):
        di = DynamicIndex.build(x, ids, n_landmarks=12, drift=drift, seed=0)
        di.reencode(x[:5] * 1.1, ids[:5])
        di.refit(x[np.searchsorted(ids, di.landmark_ids)] * 1.2 if di.drift.query_side else None)
        assert di.sample(x[:2], 5, seed=0).ids.shape == (2, 5)
    with pytest.raises(ValueError, match="cover exactly the ids"):
        DynamicIndex.build(x, ids, drift=CorrectorDrift(x[:299], ids=ids[:299]))
    with pytest.raises(ValueError, match="only with drift='corrector'"):
        DynamicIndex.build(x, ids, n_landmarks=12, corrector_options=dict(hidden=8))
    with pytest.raises(ValueError, match="unknown option"):
        DynamicIndex.build(x, ids, drift="corrector", corrector_options=dict(width=8))
    with pytest.raises(ValueError, match="drift: expected"):
        DynamicIndex.build(x, ids, drift="mlp")


def test_corrector_index_save_load_and_full_refresh_keep_the_model(tmp_path):
    di, base, enc, rng = corrector_setup(n=400, seed=3)
    enc.step(0.3)
    di.reencode(encode(enc, base, di.ids[:100]), di.ids[:100])
    di.refit()
    di.save(tmp_path / "c.npz")
    back = DynamicIndex.load(tmp_path / "c.npz")
    assert isinstance(back.drift, CorrectorDrift) and back.log == di.log
    q = enc(rng.standard_normal((2, 5)))
    np.testing.assert_array_equal(back.sample(q, 50, seed=1).ids, di.sample(q, 50, seed=1).ids)
    # the loaded model keeps training exactly as the original (buffer, Adam state, generator)
    more = di.ids[100:150]
    for x in (di, back):
        x.reencode(encode(enc, base, more), more)
        x.refit()
    np.testing.assert_array_equal(back.predict(back.ids), di.predict(di.ids))
    all_ids = di.ids
    di.full_refresh(encode(enc, base, all_ids), all_ids)
    assert isinstance(di.drift, CorrectorDrift) and di.drift.hidden == CORRECTOR["hidden"]
    np.testing.assert_array_equal(di.predict(all_ids), encode(enc, base, all_ids))  # untrained: identity


def test_a_version_1_file_still_loads(tmp_path):
    di, base, enc, rng = setup(n=200, kernel="linear", seed=8)
    di.save(tmp_path / "v2.npz")
    with np.load(tmp_path / "v2.npz") as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta["format_version"] = 1  # what version 1 wrote: no drift kind, no back-projection ridge
    for k in ("drift", "corrector_options", "backproject_ridge"):
        del meta["config"][k]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "v1.npz", **arrays)
    back = DynamicIndex.load(tmp_path / "v1.npz")
    assert isinstance(back.drift, NystromDrift)
    np.testing.assert_array_equal(back.predict(back.ids), di.predict(di.ids))
