"""Softmax sampling: treeidx exact and approx vs the fastest exact brute-force sampler.

    python -m bench.sample --n 4000000 --dim 64 --dataset clustered --k 64 --json
    python -m bench.sample --dataset static --n 1000000 --perplexities 1000 --no-kmeans-peer --json

For each target perplexity (default 10, 100, 1000) the temperature is found by
bisection on the exact softmax of a few queries. Then, in the same process on the
same data: per-query milliseconds of brute force (numpy sgemm into a reused
buffer + an exact float64 sampling pass, treeidx.brute) and of treeidx exact and
approx; draws per accepted sample; inner products as a share of brute force's;
total-variation distance of each sampler's empirical distribution to the exact
softmax on a few queries, beside the sampling-noise floor (brute force's own
empirical TV at the same number of draws); for approx mode the mean of P/Q over
its own samples (1 for a correct log q), `tv_is` (an unbiased, noise-floor-free TV
estimate from its own draws, see `tv_importance`), beside approx mode's own `tv_estimate` (mean over
the same queries; `tv_estimate_gap_max`: its largest per-query distance to `tv_is`), and a
TV-versus-budget curve. `--target-tv 0.1` adds a row for approx mode with that
`target_tv` (the budget grows per query until its estimate is below it).

Beside the exact fp32 brute force, every run also times the reduced-precision brute-force
samplers a user would try first (`BruteForce(precision="bf16" | "int8")`: a full scan
whose softmax over bf16 / int8 scores is a proposal with exact log q, not the exact
softmax) and reports their exact TV to the softmax (`tv_to_exact`, mean over the
`--tv-queries` queries); treeidx's speed-ups are given against each
(`speedup_vs_brute` is against fp32, `speedup_vs_bf16` / `speedup_vs_int8` against those).

Beside each curve point, the simple k-means list proposal of the issue
(bench.kmeans_peer) at the same mean inner products per query, with its exact TV;
and that peer at the issue's reference work levels N/26, N/8, N/4
(`kmeans_peer_reference`). `--no-kmeans-peer` skips it. `--max-items M` (minilm)
uses the first M corpus items only (a cached prefix; the whole corpus takes hours
to encode).
"""

from __future__ import annotations

import time

import numpy as np
from scipy.special import logsumexp

from bench._common import base_parser, emit, log, machine, timed
from bench.datasets import STATIC_DIM, load, static_meta
from bench.kmeans_peer import KMeansListProposal, peer_tv
from treeidx import SoftmaxSampler, TreeIndex
from treeidx.brute import BruteForce, native_bf16
from treeidx.sampling import index_codes


def perplexity(scores: np.ndarray, beta: float) -> np.ndarray:
    """exp(entropy) of softmax(beta * scores) per row (float64)."""
    z = beta * scores
    lz = logsumexp(z, axis=1, keepdims=True)
    p = np.exp(z - lz)
    return np.exp(-(p * (z - lz)).sum(axis=1))


def beta_for(scores: np.ndarray, target: float) -> float:
    lo, hi = 1e-3, 1e5
    for _ in range(50):
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if np.median(perplexity(scores, mid)) > target else (lo, mid)
    return float(np.sqrt(lo * hi))


# The reference work levels for the k-means peer: N / ratio inner products.
PEER_WORK_RATIOS = (26, 8, 4)


def empirical_tv(ids: np.ndarray, p: np.ndarray) -> float:
    u, c = np.unique(ids, return_counts=True)
    emp = c / ids.size
    return float(0.5 * (np.abs(emp - p[u]).sum() + (p.sum() - p[u].sum())))


def exact_scores(queries: np.ndarray, x: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """float64 <q, x> for every query and target, (B, N).

    Targets are cast to float64 a chunk at a time: one float64 copy of x (2 GB at
    1M x 256) is avoided, and the casts are shared by all queries."""
    q64 = queries.astype(np.float64)
    z = np.empty((q64.shape[0], x.shape[0]), np.float64)
    for lo in range(0, x.shape[0], chunk):
        z[:, lo : lo + chunk] = q64 @ x[lo : lo + chunk].astype(np.float64).T
    return z


def probe_scores_of(queries: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Scores of the first 16 queries against every target, from which a run's
    temperatures are found (`beta_for`); exact (float64) up to 2M targets, the float32
    product above (the float64 product would not fit memory)."""
    probe = queries[: min(16, queries.shape[0])]
    return exact_scores(probe, x) if x.shape[0] <= 2_000_000 else (probe @ x.T).astype(np.float64)


def exact_log_softmax(queries: np.ndarray, x: np.ndarray, beta: float, chunk: int = 65536) -> list[np.ndarray]:
    """Exact float64 log-softmax of beta <q, x> over all targets, one (N,) row per query."""
    z = exact_scores(queries, x, chunk)
    z *= beta
    z -= logsumexp(z, axis=1, keepdims=True)
    return list(z)


def tv_importance_per_query(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """(B,) the per-query terms of `tv_importance`."""
    with np.errstate(over="ignore"):
        return np.maximum(0.0, 1.0 - np.exp(log_p - log_q)).mean(axis=1)


def estimate_quality(lp: np.ndarray, r) -> dict:
    """approx mode's own `tv_estimate` on the TV queries beside their measured `tv_is`."""
    gap = r.tv_estimate - tv_importance_per_query(lp, r.log_q)
    return dict(
        tv_estimate=float(r.tv_estimate.mean()),
        tv_estimate_gap_max=float(gap[np.argmax(np.abs(gap))]),
        tv_estimate_within_003=bool((gap >= -0.03).all() and (gap <= 0.03).all()),
    )


def tv_importance(log_p: np.ndarray, log_q: np.ndarray) -> tuple[float, float]:
    """Unbiased TV(P, Q) estimate from draws y ~ Q: mean of max(0, 1 - P(y)/Q(y)).

    TV = sum_y max(0, Q(y) - P(y)) = E_Q[max(0, 1 - P/Q)]. Each term lies in [0, 1],
    so the standard error is <= 0.5 / sqrt(draws), with no noise floor (unlike the
    empirical-histogram TV). `log_p`, `log_q`: (B, draws) at the drawn ids. Returns
    (mean over the B queries, its standard error)."""
    with np.errstate(over="ignore"):  # P/Q overflowing to inf just clips to 0
        t = np.maximum(0.0, 1.0 - np.exp(log_p - log_q))
    est = t.mean(axis=1)
    se = t.std(axis=1, ddof=1) / np.sqrt(t.shape[1]) if t.shape[1] > 1 else np.full(len(est), 0.5)
    return float(est.mean()), float(np.sqrt((se**2).sum()) / len(est))


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0], datasets=("clustered", "code", "minilm", "static"))
    p.set_defaults(queries=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--perplexities", default="10,100,1000")
    p.add_argument(
        "--temperature",
        type=float,
        action="append",
        help="also run at this temperature (e.g. 0.05 on minilm); repeatable",
    )
    p.add_argument("--tv-queries", type=int, default=4)
    p.add_argument(
        "--tv-draws", type=int, default=200_000, help="draws per TV query for the measured TVs (tv_measured, tv_is)"
    )
    p.add_argument(
        "--budgets",
        default="0.001,0.003,0.01,0.03",
        help="approx-mode budgets as fractions of N for the TV-vs-speed curve",
    )
    p.add_argument(
        "--batched-budgets",
        default="0.01,0.03,0.1",
        help="approx mode with batched=True: budgets as fractions of N for its TV-vs-speed curve ('' for none)",
    )
    p.add_argument(
        "--no-kmeans-peer", action="store_true", help="skip the k-means list proposal (bench.kmeans_peer) at equal work"
    )
    p.add_argument(
        "--max-items", type=int, default=None, help="minilm only: use the first M corpus items (its own cache)"
    )
    p.add_argument(
        "--max-seq-length",
        type=int,
        default=256,
        help="minilm only: the encoder's truncation in word pieces (128 halves the whole-corpus encode; its own cache)",
    )
    p.add_argument(
        "--precisions",
        default="bf16,int8",
        help="reduced-precision brute-force samplers timed beside fp32 ('' for none)",
    )
    p.add_argument(
        "--lowp-tv-queries",
        type=int,
        default=32,
        help="queries over which the reduced-precision samplers' exact TV is averaged",
    )
    p.add_argument(
        "--target-tv",
        type=float,
        default=None,
        help="also time approx mode with this target_tv (SoftmaxSampler's target_tv)",
    )
    a = p.parse_args(argv)
    quiet = a.json
    dim = {"minilm": 384, "static": STATIC_DIM}.get(a.dataset, a.dim)
    n_arg = None if (a.dataset != "clustered" and a.n <= 0) else a.n
    x, queries = load(
        a.dataset, n_arg, dim, n_queries=a.queries, seed=a.seed, max_items=a.max_items, max_seq_length=a.max_seq_length
    )
    n = x.shape[0]
    log(f"data: {a.dataset} {x.shape}, {queries.shape[0]} queries", quiet)
    meta = static_meta() if a.dataset == "static" else None
    res: dict = dict(
        benchmark="sample",
        dataset=a.dataset,
        n=n,
        dim=dim,
        k=a.k,
        queries=int(queries.shape[0]),
        max_items=a.max_items,
        **({"max_seq_length": a.max_seq_length} if a.dataset == "minilm" else {}),
        tv_queries=int(min(a.tv_queries, queries.shape[0])),
        tv_draws=a.tv_draws,
        machine=machine(),
        **({"dataset_meta": meta} if meta else {}),
    )
    t = time.perf_counter()
    warm = TreeIndex.build(x[:3000])
    SoftmaxSampler(warm, temperature=0.1).sample(queries[:4], 4, seed=0)
    SoftmaxSampler(warm, temperature=0.1, mode="approx").sample(queries[:4], 4, seed=0)
    SoftmaxSampler(warm, temperature=0.1, mode="approx", batched=True).sample(queries[:4], 4, seed=0)
    SoftmaxSampler(warm, temperature=0.1, batched=True, plan="tree").sample(queries[:4], 4, seed=0)
    res["compile_s"] = time.perf_counter() - t
    build_s, index = timed(lambda: TreeIndex.build(x, seed=a.seed))
    res["build_s"] = build_s
    if native_bf16():
        # exact mode's dense pass proposes from bf16 codes of the index (built once per
        # index version, here outside the timed calls): one pass over the vectors
        res["dense_codes_build_s"], codes = timed(lambda: index_codes(index))
        res["dense_codes_bytes_per_target"] = codes.nbytes / len(index)
    peer = None
    if not a.no_kmeans_peer:
        # Built once per dataset: its lists do not depend on the temperature.
        res["kmeans_peer_build_s"], peer = timed(lambda: KMeansListProposal(x, seed=a.seed))
        res["kmeans_peer_lists"] = peer.n_lists
    brute = BruteForce(x)
    probe_scores = probe_scores_of(queries, x)
    settings = [("perplexity", float(t_)) for t_ in a.perplexities.split(",") if t_]
    settings += [("temperature", t_) for t_ in (a.temperature or [])]
    res["runs"] = []
    for kind, value in settings:
        beta = beta_for(probe_scores, value) if kind == "perplexity" else 1.0 / value
        ppl = float(np.median(perplexity(probe_scores, beta)))
        log(f"{kind} {value}: beta {beta:.3g}, median perplexity {ppl:.1f}", quiet)
        res["runs"].append(run_one(a, x, queries, index, brute, peer, beta, ppl, kind, value, quiet))
    emit(res, quiet)
    return res


def run_one(a, x, queries, index, brute, peer, beta, ppl, kind, value, quiet) -> dict:
    n, nq, k = x.shape[0], queries.shape[0], a.k
    out: dict = dict(temperature=1.0 / beta, median_perplexity=ppl, **{f"target_{kind}": value})
    brute.sample(queries[:8], k, temperature=1.0 / beta, seed=0)
    bf_s, _ = timed(lambda: brute.sample(queries, k, temperature=1.0 / beta, seed=1), repeat=2)
    out["brute_force"] = dict(ms_per_query=1e3 * bf_s / nq)
    tvq = queries[: a.tv_queries]
    lowp_s = {}
    exact_s = {"fp32": bf_s}  # the exact brute-force samplers
    for prec in [p_ for p_ in a.precisions.split(",") if p_]:
        # One reduced-precision copy at a time: each holds its own vectors and buffer.
        lowp = BruteForce(x, precision=prec)
        lowp.sample(queries[:8], k, temperature=1.0 / beta, seed=0)
        lowp_s[prec], _ = timed(lambda lp=lowp: lp.sample(queries, k, temperature=1.0 / beta, seed=1), repeat=2)
        tv = lowp.tv_to_exact(queries[: a.lowp_tv_queries], temperature=1.0 / beta)
        out[f"brute_force_{prec}"] = dict(
            ms_per_query=1e3 * lowp_s[prec] / nq,
            speedup_vs_brute=bf_s / lowp_s[prec],
            tv_to_exact=float(tv.mean()),
            tv_to_exact_max=float(tv.max()),
        )
        if prec == "bf16":
            # the certified exact sampler on the same codes: bf16 proposal, float32 rejection
            lowp.sample_certified(queries[:8], k, temperature=1.0 / beta, seed=0)
            cs, cr = timed(lambda lp=lowp: lp.sample_certified(queries, k, temperature=1.0 / beta, seed=1), repeat=2)
            exact_s["bf16_exact"] = cs
            out["brute_force_bf16_exact"] = dict(
                ms_per_query=1e3 * cs / nq,
                speedup_vs_brute=bf_s / cs,
                speedup_vs_bf16=lowp_s[prec] / cs,
                acceptance_rate=float(k * nq / cr.proposals.sum()),
                eps_median=float(np.median(cr.eps)),
                bytes_per_target=int(x.shape[1] * (4 + 2)),
                memory_vs_fp32_vector=1.5,
            )
            log(
                f"  brute force bf16 certified exact: {1e3 * cs / nq:.3f} ms/q ({bf_s / cs:.2f}x fp32), "
                f"acceptance {out['brute_force_bf16_exact']['acceptance_rate']:.3f}",
                quiet,
            )
        log(
            f"  brute force {prec}: {1e3 * lowp_s[prec] / nq:.3f} ms/q ({bf_s / lowp_s[prec]:.2f}x fp32), "
            f"TV to the softmax {tv.mean():.4f} (max {tv.max():.4f})",
            quiet,
        )
        del lowp
    log(f"  brute force fp32: {1e3 * bf_s / nq:.3f} ms/q", quiet)

    def ratios(s: float) -> dict:
        return dict(
            speedup_vs_brute=bf_s / s,
            **{f"speedup_vs_{p_}": v / s for p_, v in lowp_s.items()},
            **({"speedup_vs_bf16_exact": exact_s["bf16_exact"] / s} if "bf16_exact" in exact_s else {}),
            speedup_vs_best_exact_brute=min(exact_s.values()) / s,
        )

    samplers = {
        "exact": SoftmaxSampler(index, temperature=1.0 / beta, mode="exact"),
        "exact_batched": SoftmaxSampler(index, temperature=1.0 / beta, mode="exact", batched=True),
        "approx": SoftmaxSampler(index, temperature=1.0 / beta, mode="approx"),
    }
    if a.target_tv is not None:
        samplers["approx_target_tv"] = SoftmaxSampler(
            index, temperature=1.0 / beta, mode="approx", target_tv=a.target_tv
        )
        samplers["approx_batched_target_tv"] = SoftmaxSampler(
            index, temperature=1.0 / beta, mode="approx", target_tv=a.target_tv, batched=True
        )
    exact_lp = exact_log_softmax(tvq, x, beta)
    exact_p = [np.exp(lp) for lp in exact_lp]
    # sampling-noise floor: brute force's own empirical TV at the same number of draws
    bf_ids = brute.sample(tvq, a.tv_draws, temperature=1.0 / beta, seed=2)[0]
    out["tv_noise_floor"] = float(np.mean([empirical_tv(bf_ids[i], exact_p[i]) for i in range(tvq.shape[0])]))
    for name, sampler in samplers.items():
        sampler.sample(queries[:8], k, seed=0)
        s, r = timed(lambda: sampler.sample(queries, k, seed=1), repeat=2)
        entry = dict(
            ms_per_query=1e3 * s / nq,
            **ratios(s),
            draws_per_sample=float(r.draws_per_sample.mean()),
            inner_product_share=float(r.inner_products.mean() / n),
            nodes_opened=float(r.nodes_opened.mean()),
            tv_bound_median=float(np.median(r.tv_bound)),
        )
        if name.startswith("exact"):
            entry["dense_query_share"] = float((r.frontier_size == 0).mean())
            entry["predicted_work_share_median"] = float(np.median(sampler.predicted_work(queries, k)) / n)
        big = sampler.sample(tvq, a.tv_draws, seed=3)
        entry["tv_measured"] = float(np.mean([empirical_tv(big.ids[i], exact_p[i]) for i in range(tvq.shape[0])]))
        lp = np.stack([exact_lp[i][big.ids[i]] for i in range(tvq.shape[0])])
        entry["mean_p_over_q"] = float(np.mean(np.exp(lp - big.log_q)))
        if name.startswith("approx"):
            entry["tv_is"], entry["tv_is_se"] = tv_importance(lp, big.log_q)
            entry.update(estimate_quality(lp, big))
        if name.endswith("target_tv"):
            share = r.inner_products / n
            entry.update(
                target_tv=a.target_tv,
                inner_product_share_p90=float(np.quantile(share, 0.9)),
                inner_product_share_max=float(share.max()),
                tv_estimate_all_mean=float(r.tv_estimate.mean()),
                tv_estimate_all_max=float(r.tv_estimate.max()),
            )
        out[f"treeidx_{name}"] = entry
        log(
            f"  {name}: {entry['ms_per_query']:.3f} ms/q ({entry['speedup_vs_brute']:.1f}x), "
            f"TV {entry['tv_measured']:.3f} (floor {out['tv_noise_floor']:.3f}"
            + (f", IS {entry['tv_is']:.3f}, estimate {entry['tv_estimate']:.3f}" if "tv_is" in entry else "")
            + "), "
            f"ip share {entry['inner_product_share']:.4f}",
            quiet,
        )

    def curve(fracs: str, batched: bool) -> list[dict]:
        points = []
        for frac in [float(f) for f in fracs.split(",") if f]:
            budget = max(64, int(frac * n))
            sampler = SoftmaxSampler(index, temperature=1.0 / beta, mode="approx", budget=budget, batched=batched)
            s, r = timed(lambda: sampler.sample(queries, k, seed=1), repeat=2 if batched else 1)
            big = sampler.sample(tvq, a.tv_draws, seed=3)
            lp = np.stack([exact_lp[i][big.ids[i]] for i in range(tvq.shape[0])])
            tv_is, tv_is_se = tv_importance(lp, big.log_q)
            point = dict(
                budget=budget,
                ms_per_query=1e3 * s / nq,
                **ratios(s),
                inner_product_share=float(r.inner_products.mean() / n),
                tv_measured=float(np.mean([empirical_tv(big.ids[i], exact_p[i]) for i in range(tvq.shape[0])])),
                tv_is=tv_is,
                tv_is_se=tv_is_se,
                tv_bound_median=float(np.median(r.tv_bound)),
                **estimate_quality(lp, big),
            )
            if peer is not None:
                # Equal work: the peer may spend what treeidx approx spent per query on average.
                point["kmeans_peer"] = peer_tv(peer, tvq, exact_lp, beta, r.inner_products.mean())
            points.append(point)
            log(
                f"  approx{' batched' if batched else ''} budget {budget}: {point['ms_per_query']:.3f} ms/q "
                f"({point['speedup_vs_brute']:.1f}x), ip share {point['inner_product_share']:.4f}, "
                f"TV {point['tv_measured']:.3f} (IS {tv_is:.3f}, estimate {point['tv_estimate']:.3f})"
                + (
                    f", k-means peer TV {point['kmeans_peer']['tv_exact']:.3f} at share "
                    f"{point['kmeans_peer']['inner_product_share']:.4f}"
                    if peer is not None
                    else ""
                ),
                quiet,
            )
        return points

    out["approx_curve"] = curve(a.budgets, batched=False)
    out["batched_curve"] = curve(a.batched_budgets, batched=True)
    if peer is not None:
        out["kmeans_peer_reference"] = [
            dict(work_ratio=ratio, **peer_tv(peer, tvq, exact_lp, beta, n / ratio)) for ratio in PEER_WORK_RATIOS
        ]
    return out


if __name__ == "__main__":
    main()
