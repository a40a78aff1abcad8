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
