"""Tests for bench.kmeans_peer (the issue's k-means list proposal) and the TV fields of
bench.sample (tv_is, kmeans_peer)."""

import json

import numpy as np
import pytest
from scipy.special import logsumexp

from bench.kmeans_peer import KMeansListProposal, exact_tv, peer_tv
from bench.sample import exact_log_softmax, tv_importance

BETA = 8.0


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = _unit(rng.standard_normal((2000, 12)))
    q = _unit(rng.standard_normal((3, 12)))
    return x, q, KMeansListProposal(x, seed=0)


def _log_p(x, q):
    z = BETA * (x.astype(np.float64) @ q.astype(np.float64))
    return z - logsumexp(z)


def test_default_lists_and_proposal_normalised(data):
    x, q, peer = data
    assert peer.n_lists == round(np.sqrt(len(x)))
    assert peer.counts.sum() == len(x)
    for budget in (0, 200, 600, 5000):
        log_q, _ = peer.proposal(q[0], BETA, budget)
        assert log_q.shape == (len(x),) and log_q.dtype == np.float64
        assert np.exp(logsumexp(log_q)) == pytest.approx(1.0, abs=1e-12)


def test_full_budget_is_the_exact_softmax(data):
    x, q, peer = data
    for qi in q:
        log_q, work = peer.proposal(qi, BETA, len(x) + peer.n_lists)
        assert work == len(x) + peer.n_lists
        assert exact_tv(_log_p(x, qi), log_q) <= 1e-9


def test_work_within_budget_except_the_first_list(data):
    x, q, peer = data
    for budget in (0, 10, peer.n_lists, 150, 400, 1000, 1999, 3000):
        for qi in q:
            _, work = peer.proposal(qi, BETA, budget)
            first = peer.n_lists + peer.counts[peer.ranked_lists(qi, BETA)[0][0]]
            # over budget only when the minimum (centroids + the top list) already is
            assert work <= budget or work == first > budget


def test_one_list_at_zero_budget_all_lists_at_full_budget(data):
    x, q, peer = data
    lp = _log_p(x, q[1])
    log_q, work = peer.proposal(q[1], BETA, 0)
    top = peer.ranked_lists(q[1], BETA)[0][0]
    assert work == peer.n_lists + peer.counts[top]
    # within the evaluated list Q is proportional to the exact softmax
    d = (log_q - lp)[peer.labels == top]
    assert np.ptp(d) <= 1e-9
    tvs = [exact_tv(lp, peer.proposal(q[1], BETA, b)[0]) for b in (0, 400, 1000, 3000)]
    assert tvs[0] > 0.05 and tvs[-1] <= 1e-9


def test_tv_importance_agrees_with_exact_tv(data):
    x, q, peer = data
    lp = _log_p(x, q[2])
    log_q, _ = peer.proposal(q[2], BETA, 300)
    tv = exact_tv(lp, log_q)
    assert 0.02 < tv < 0.98  # a non-trivial proposal, so the check has teeth
    draws = np.random.default_rng(123).choice(len(x), size=20_000, p=np.exp(log_q) / np.exp(log_q).sum())
    est, se = tv_importance(lp[draws][None], log_q[draws][None])
    assert 0 < se <= 0.5 / np.sqrt(20_000 - 1)  # terms in [0, 1]: std <= 1/2 (ddof=1)
    assert abs(est - tv) <= 5 * se


def test_peer_tv_and_exact_log_softmax(data):
    x, q, peer = data
    lps = exact_log_softmax(q, x, BETA, chunk=300)
    for qi, lp in zip(q, lps):
        np.testing.assert_allclose(lp, _log_p(x, qi), atol=1e-12)
    full = peer_tv(peer, q, lps, BETA, len(x) + peer.n_lists)
    assert full["tv_exact"] <= 1e-9 and full["inner_product_share"] == pytest.approx(1 + peer.n_lists / len(x))
    part = peer_tv(peer, q, lps, BETA, len(x) / 8)
    assert part["tv_exact"] > full["tv_exact"] and part["inner_product_share"] <= 1 / 8


def test_max_items_only_for_minilm():
    from bench.datasets import load

    with pytest.raises(ValueError, match="max_items"):
        load("clustered", 100, 8, max_items=50)


def test_sample_bench_smoke(capsys):
    from bench.sample import main

    res = main(
        [
            "--dataset",
            "clustered",
            "--n",
            "3000",
            "--dim",
            "16",
            "--queries",
            "16",
            "--tv-queries",
            "2",
            "--tv-draws",
            "2000",
            "--perplexities",
            "10",
            "--budgets",
            "0.05",
            "--json",
        ]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(res))
    assert res["max_items"] is None and res["kmeans_peer_lists"] == round(np.sqrt(3000))
    run = res["runs"][0]
    assert 0 <= run["treeidx_approx"]["tv_is"] <= 1
    (point,) = run["approx_curve"]
    assert 0 <= point["tv_is"] <= 1 and 0 <= point["kmeans_peer"]["tv_exact"] <= 1
    assert point["kmeans_peer"]["inner_product_share"] > 0
    assert [r["work_ratio"] for r in run["kmeans_peer_reference"]] == [26, 8, 4]


def test_peer_flags_unequal_work(data):
    x, q, peer = data
    lps = exact_log_softmax(q, x, BETA)
    assert peer_tv(peer, q, lps, BETA, len(x))["within_budget"]
    assert not peer_tv(peer, q, lps, BETA, 0)["within_budget"]  # one list is the minimum


def test_sample_bench_max_items_reaches_minilm(monkeypatch, capsys):
    """--max-items and --max-seq-length go through load() to minilm(...) (faked: no encoding)."""
    from bench import datasets
    from bench.sample import main

    seen = {}

    def fake_minilm(*, n_queries, seed, max_items, max_seq_length=256, progress=False):
        seen["max_items"], seen["max_seq_length"] = max_items, max_seq_length
        rng = np.random.default_rng(1)
        return _unit(rng.standard_normal((max_items, 384))), _unit(rng.standard_normal((n_queries, 384)))

    monkeypatch.setattr(datasets, "minilm", fake_minilm)
    res = main(
        [
            "--dataset",
            "minilm",
            "--max-items",
            "800",
            "--max-seq-length",
            "128",
            "--n",
            "0",
            "--queries",
            "8",
            "--tv-queries",
            "1",
            "--tv-draws",
            "1000",
            "--perplexities",
            "10",
            "--budgets",
            "0.2",
            "--no-kmeans-peer",
            "--json",
        ]
    )
    assert seen["max_items"] == 800 and res["max_items"] == 800 and res["n"] == 800
    assert seen["max_seq_length"] == 128 and res["max_seq_length"] == 128
    assert "kmeans_peer" not in res["runs"][0]["approx_curve"][0]
    assert "kmeans_peer_reference" not in res["runs"][0]
