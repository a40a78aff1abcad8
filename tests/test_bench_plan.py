"""bench.plan at toy size: the figures it reports agree with each other and with the
plan's own rule."""

from __future__ import annotations

import numpy as np

from bench import plan
from bench.datasets import load
from treeidx import SoftmaxSampler, TreeIndex
from treeidx.sampling import PLAN_RATIO


def test_plan_benchmark_reports_consistent_figures():
    n, nq = 3000, 16
    res = plan.main(["--n", str(n), "--queries", str(nq), "--perplexities", "10,1000", "--k", "8", "--json"])
    assert res["n"] == n and len(res["runs"]) == 2
    x, queries = load("clustered", n, 64, n_queries=nq, seed=0)
    index = TreeIndex.build(x, seed=0)
    for run in res["runs"]:
        for p in ("tree", "dense", "auto"):
            ratio = run["brute_force_ms_per_query"] / run[f"{p}_ms_per_query"]
            assert np.isclose(run[f"{p}_speedup_vs_brute"], ratio)
        assert run["best_plan"] in ("tree", "dense")
        best = min(run["tree_ms_per_query"], run["dense_ms_per_query"])
        assert np.isclose(run["auto_vs_best"], best / run["auto_ms_per_query"])
        assert 0.0 <= run["tree_gave_up_share"] <= 1.0
        # the share planned dense is the plan's rule applied to its own prediction
        s = SoftmaxSampler(index, temperature=run["temperature"])
        predicted = s.predicted_work(queries, 8)
        assert run["auto_planned_dense_share"] == np.mean(predicted > PLAN_RATIO * n)
        assert np.isclose(run["predicted_work"]["median"], np.median(predicted))
        w = run["tree_work"]
        if w["median"] is not None:
            assert w["p10"] <= w["median"] <= w["p90"]
            assert np.isclose(run["tree_work_share_of_n"]["median"], w["median"] / n)
