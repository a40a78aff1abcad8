import numpy as np
import pytest

from bench.drift import softmax_gap


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def test_softmax_gap_ignores_per_query_shifts_and_measures_real_error():
    rng = np.random.default_rng(0)
    fresh = _unit(rng.standard_normal((500, 8)))
    q = _unit(rng.standard_normal((40, 8)))
    same = softmax_gap(q, fresh, fresh, beta=20.0)
    assert same["rel_score_error"] == 0 and same["tv_mean"] == 0
    # a common offset v shifts every score of a query by <q, v>: the softmax is unchanged
    shifted = softmax_gap(q, fresh + rng.standard_normal(8).astype(np.float32), fresh, beta=20.0)
    assert shifted["rel_score_error"] < 1e-5 and shifted["tv_mean"] < 1e-5
    # noise: the error grows with the noise, and TV matches a direct computation
    errs = []
    for scale in (0.05, 0.2):
        noisy = fresh + scale * rng.standard_normal(fresh.shape).astype(np.float32)
        g = softmax_gap(q, noisy, fresh, beta=20.0, chunk=7)
        errs.append(g["rel_score_error"])
        sa, sf = 20.0 * (q.astype(np.float64) @ noisy.T), 20.0 * (q.astype(np.float64) @ fresh.T)
        pa = np.exp(sa - sa.max(1, keepdims=True))
        pa /= pa.sum(1, keepdims=True)
        pf = np.exp(sf - sf.max(1, keepdims=True))
        pf /= pf.sum(1, keepdims=True)
        assert g["tv_mean"] == pytest.approx(0.5 * np.abs(pa - pf).sum(1).mean(), rel=1e-4)
    assert 0 < errs[0] < errs[1]


def _fake_recording(folder, n=400, d=16, n_queries=30, checkpoints=(0, 50, 100), seed=0):
    """What bench.minilm_drift_record writes, for a planted drift that is a rotation (linear,
    and it keeps unit vectors unit): no transformer involved."""
    import json
    import os

    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    ids = np.sort(rng.choice(10 * n, n, replace=False))  # sparse item ids, as the corpus gives
    stale = _unit(rng.standard_normal((n, d)))
    pos = rng.choice(n, n_queries, replace=False)
    timings = {}
    prev = 0
    for c in checkpoints:
        rot, r = np.linalg.qr(np.eye(d) + (c / 100) * rng.standard_normal((d, d)))
        rot *= np.sign(np.diag(r))  # continuous in c: the identity at c = 0
        fresh = _unit(stale @ rot.astype(np.float32))
        queries = _unit(fresh[pos] + 0.3 * rng.standard_normal((n_queries, d)).astype(np.float32))
        np.save(os.path.join(folder, f"ckpt{c:05d}-targets.npy"), fresh)
        np.save(os.path.join(folder, f"ckpt{c:05d}-queries.npy"), queries)
        timings[f"encode_{c}_s"] = 10.0
        if c:
            steps = rng.choice(ids, (c - prev, 4))
            row = np.searchsorted(ids, steps)
            np.savez(
                os.path.join(folder, f"steps{prev:05d}-{c:05d}.npz"),
                ids=steps,
                vectors=fresh[row] + 0.01 * rng.standard_normal(fresh[row].shape).astype(np.float32),
                first_step=prev,
            )
        prev = c
    meta = dict(target_ids=ids.tolist(), eval_ids=ids[pos].tolist(), timings=timings)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return stale


def test_drift_minilm_evaluates_a_recording(tmp_path):
    from bench import drift_minilm
    from bench.minilm_drift_record import RecordConfig, cache_folder

    _fake_recording(cache_folder(RecordConfig(), str(tmp_path)))
    res = drift_minilm.main(
        ["--available", "--cache-dir", str(tmp_path), "--corrector-steps", "5", "--hidden", "8", "--json"]
    )
    assert res["checkpoints"] == [0, 50, 100]
    configs = res["configs"]
    worst = [max(c["worst_score_error_ratio"], c["worst_tv_ratio"]) for c in configs]
    assert worst == sorted(worst)
    # a linear drift is recovered by a linear model with at least d landmarks ...
    lin = [c for c in configs if c["method"] == "nystrom" and c["kernel"] == "linear" and c["ridge"] < 1e-3]
    lin = [c for c in lin if c["m"] >= 16]
    assert lin and max(c["worst_score_error_ratio"] for c in lin) < 0.05
    # ... and by the fit on every target (the ceiling), which nothing cheaper can beat by much
    ceiling = min(w for c, w in zip(configs, worst) if c["method"] == "ceiling")
    assert ceiling < 0.1 and ceiling <= min(worst) + 0.05
    assert res["best_affordable"]["method"] != "ceiling" and res["best_affordable"]["m"] <= 1000
    stale = [r for r in res["rows"] if r["method"] == "stale"]
    fresh = [r for r in res["rows"] if r["method"] == "fresh"]
    assert all(r["rel_score_error"] > 0 for r in stale) and all(r["rel_score_error"] == 0 for r in fresh)
    assert all(0 <= c["encoder_share"] <= 1 for c in configs)
