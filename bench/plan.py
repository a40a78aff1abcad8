"""Exact mode's plan checked: the work it predicts against the work the tree does, and
what each choice costs, against the fp32 brute-force sampler in the same process.

    python -m bench.plan --n 4000000 --dim 64 --perplexities 10,100,1000 --json

For each target perplexity (temperature found as in bench.sample), the library's
`SoftmaxSampler.compare_plans`: per-query milliseconds of exact mode with plan="tree"
(every query through the tree; the dense_fallback give-up still applies), plan="dense"
(every query through the dense pass) and plan="auto" (the default: the plan chooses per
query), beside BruteForce.sample. For plan="tree" the inner products each query really spent
(`tree_work`), and how many queries gave up; beside it the plan's prediction
(`SoftmaxSampler.predicted_work`) and the share of queries plan="auto" sends dense.
`prediction_over_work` is prediction / real work over the queries that did not give up
(median and 10th / 90th percentiles), and `log_correlation` the correlation of their
logarithms: a plan can only choose well where both are near 1. `best_plan` names the
faster of tree and dense; `auto_vs_best` is how far the default is from it.
"""

from __future__ import annotations

import numpy as np

from bench._common import base_parser, emit, log, machine, timed
from bench.datasets import STATIC_DIM, load
from bench.sample import beta_for, perplexity, probe_scores_of
from treeidx import SoftmaxSampler, TreeIndex
from treeidx.brute import BruteForce


def spread(v: np.ndarray) -> dict:
    """Median and 10th / 90th percentiles (None for no values)."""
    if v.size == 0:
        return dict(median=None, p10=None, p90=None)
    p10, med, p90 = np.percentile(v, [10, 50, 90])
    return dict(median=float(med), p10=float(p10), p90=float(p90))


def run_one(index, brute, queries, beta: float, k: int, quiet: bool) -> dict:
    nq = queries.shape[0]
    brute.sample(queries[:8], k, temperature=1.0 / beta, seed=0)
    bf_s, _ = timed(lambda: brute.sample(queries, k, temperature=1.0 / beta, seed=1), repeat=2)
    out: dict = dict(temperature=1.0 / beta, brute_force_ms_per_query=1e3 * bf_s / nq)
    c = SoftmaxSampler(index, temperature=1.0 / beta).compare_plans(queries, k, seed=1, repeats=2)
    ms = c.ms_per_query
    for plan in ("tree", "dense", "auto"):
        out[f"{plan}_ms_per_query"] = ms[plan]
        out[f"{plan}_speedup_vs_brute"] = 1e3 * bf_s / nq / ms[plan]
    kept = ~c.tree_gave_up
    work = c.tree_work[kept].astype(np.float64)
    ratio = c.predicted_work[kept] / np.maximum(work, 1.0)
    out.update(
        tree_work=spread(work),
        tree_work_share_of_n=spread(work / len(index)),
        tree_gave_up_share=float(1.0 - kept.mean()),
        predicted_work=spread(c.predicted_work),
        prediction_over_work=spread(ratio),
        log_correlation=float(np.corrcoef(np.log(c.predicted_work[kept]), np.log(np.maximum(work, 1.0)))[0, 1])
        if kept.sum() > 2
        else None,
        auto_planned_dense_share=c.auto_dense_share,
        # per inner product only when no query gave up (a give-up's time is mostly its dense pass)
        tree_ns_per_inner_product=1e6 * ms["tree"] / max(float(c.tree_work.mean()), 1.0) if kept.all() else None,
        dense_ns_per_target=1e6 * ms["dense"] / len(index),
    )
    out["best_plan"] = c.best_plan
    out["auto_vs_best"] = ms[out["best_plan"]] / ms["auto"]
    log(
        f"  brute {out['brute_force_ms_per_query']:.2f} ms/q; tree {ms['tree']:.2f} (work median "
        f"{out['tree_work']['median']}, gave up {out['tree_gave_up_share']:.2f}), dense {ms['dense']:.2f}, "
        f"auto {ms['auto']:.2f} ({out['auto_planned_dense_share']:.2f} dense); predicted/work "
        f"{out['prediction_over_work']['median']}",
        quiet,
    )
    return out


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0], datasets=("clustered", "code", "minilm", "static"))
    p.set_defaults(queries=128)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--perplexities", default="10,100,1000")
    a = p.parse_args(argv)
    quiet = a.json
    dim = {"minilm": 384, "static": STATIC_DIM}.get(a.dataset, a.dim)
    n_arg = None if (a.dataset != "clustered" and a.n <= 0) else a.n
    x, queries = load(a.dataset, n_arg, dim, n_queries=a.queries, seed=a.seed)
    log(f"data: {a.dataset} {x.shape}, {queries.shape[0]} queries", quiet)
    res: dict = dict(benchmark="plan", dataset=a.dataset, n=x.shape[0], dim=dim, k=a.k, queries=queries.shape[0])
    res["machine"] = machine()
    res["build_s"], index = timed(lambda: TreeIndex.build(x, seed=a.seed))
    brute = BruteForce(x)
    probe_scores = probe_scores_of(queries, x)
    res["runs"] = []
    for target in [float(t) for t in a.perplexities.split(",") if t]:
        beta = beta_for(probe_scores, target)
        ppl = float(np.median(perplexity(probe_scores, beta)))
        log(f"perplexity {target}: beta {beta:.3g}, median perplexity {ppl:.1f}", quiet)
        run = dict(target_perplexity=target, median_perplexity=ppl)
        run.update(run_one(index, brute, queries, beta, a.k, quiet))
        res["runs"].append(run)
    emit(res, quiet)
    return res


if __name__ == "__main__":
    main()
