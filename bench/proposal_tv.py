"""Where batched approx mode's TV comes from: its proposal taken apart, part by part.

    python -m bench.proposal_tv --dataset static --n 1000000 --perplexity 1000 --json

Batched approx mode (SoftmaxSampler(batched=True)) opens the top-level clusters with the
largest estimated mass until `budget`, takes the exact softmax inside them, and spreads
each other cluster's *estimated* mass *uniformly* over its targets. Its TV to the softmax
has two sources: the cluster masses and the shape inside each unopened cluster. This
benchmark computes the exact TV (no sampling noise: every target scored) of the proposal
with either source replaced by the truth, and with the shape (and mass) taken from cheap
per-target scores, <q, c> + <U'q, U'(y - c)> with U the top r principal directions of the
residuals y - c (a rank-r code of each target):

* `batched`: the sampler's proposal as it is (clusters opened by estimated mass per
  target); `batched_opened_by_mass`: opened by estimated mass alone (the order before);
  `batched_opened_by_true_mass_per_target`: opened in the order of the true masses;
* `true_mass_uniform`: the true mass of every unopened cluster, spread uniformly;
* `estimated_mass_true_shape`: the estimated mass, spread as the softmax spreads it;
* `estimated_mass_rank_r` / `true_mass_rank_r`: the shape from the rank-r scores;
* `rank_r`: mass and shape from the rank-r scores (every unopened target scored by them).

It says how much a better cluster estimate could gain (not much, on real text), and that
the shape inside the clusters needs a score per target: no per-cluster statistic fixes it.
Means over queries; per-query rows in the JSON.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.special import logsumexp

from bench._common import base_parser, emit, log, machine
from bench.datasets import STATIC_DIM, load
from bench.sample import beta_for, exact_scores
from treeidx import TreeIndex
from treeidx.blocks import cluster_log_masses, level_of, opening_order


def residual_basis(x: np.ndarray, centers: np.ndarray, rank: int, seed: int, sample: int = 100_000) -> np.ndarray:
    """(rank, d): the top principal directions of the residuals x - center (a sample)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(x.shape[0], min(sample, x.shape[0]), replace=False)
    _, _, vt = np.linalg.svd(x[rows] - centers[rows], full_matrices=False)
    return vt[:rank]


def proposal_tv(p: np.ndarray, opened: np.ndarray, cluster_mass: np.ndarray, shape: np.ndarray) -> float:
    """Exact TV between p and the proposal: p (rescaled) on the opened targets, each other
    target its cluster's mass times its within-cluster shape."""
    q = np.where(opened, p, cluster_mass * shape)
    q = q / q.sum()
    return float(0.5 * np.abs(q - p).sum())


def one_query(q, x, centers, cluster, counts, w, order, beta, shares, codes) -> dict:
    """TV of every proposal variant for one query (see the module docstring); order: the
    sampler's opening order of the clusters; codes: rank -> (per-target rank-r residual
    codes, the basis)."""
    s = beta * (x @ q).astype(np.float64)  # float32 products: their rounding is far below any TV here
    lz = logsumexp(s)
    p = np.exp(s - lz)
    true_mass = np.bincount(cluster, weights=p, minlength=counts.size)
    est_mass = np.exp(w - lz)
    uniform = 1.0 / counts[cluster]
    true_shape = p / np.maximum(true_mass[cluster], np.finfo(float).tiny)
    center_score = beta * (centers @ q).astype(np.float64)
    shapes, masses = {}, {}
    for r, (z, basis) in codes.items():
        st = center_score[cluster] + beta * (z @ (basis @ q)).astype(np.float64)
        e = np.exp(st - lz)
        mass = np.bincount(cluster, weights=e, minlength=counts.size)
        shapes[r], masses[r] = e / np.maximum(mass[cluster], np.finfo(float).tiny), mass
    log_n = np.log(counts)

    def opened_in(rank: np.ndarray, share: float) -> np.ndarray:
        """Targets of the clusters opened in the order rank until they hold share * N."""
        m = int(np.searchsorted(np.cumsum(counts[rank]), share * x.shape[0])) + 1
        opened = np.zeros(counts.size, bool)
        opened[rank[:m]] = True
        return opened[cluster]

    def opened_by(key: np.ndarray, share: float) -> np.ndarray:
        return opened_in(np.argsort(-key, kind="stable"), share)

    out: dict = {}
    for share in shares:
        o = opened_in(order, share)
        true_order = opened_by(np.log(np.maximum(true_mass, np.finfo(float).tiny)) - log_n, share)
        row = {
            "batched": proposal_tv(p, o, est_mass[cluster], uniform),
            "batched_opened_by_mass": proposal_tv(p, opened_by(w, share), est_mass[cluster], uniform),
            "batched_opened_by_true_mass_per_target": proposal_tv(p, true_order, est_mass[cluster], uniform),
            "true_mass_uniform": proposal_tv(p, o, true_mass[cluster], uniform),
            "estimated_mass_true_shape": proposal_tv(p, o, est_mass[cluster], true_shape),
        }
        for r in codes:
            row[f"estimated_mass_rank_{r}"] = proposal_tv(p, o, est_mass[cluster], shapes[r])
            row[f"true_mass_rank_{r}"] = proposal_tv(p, o, true_mass[cluster], shapes[r])
            row[f"rank_{r}"] = proposal_tv(p, o, masses[r][cluster], shapes[r])
        out[str(share)] = row
    return out


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0], datasets=("clustered", "code", "minilm", "static"))
    p.set_defaults(queries=16, dataset="static", n=1_000_000)
    p.add_argument("--perplexity", type=float, default=1000.0, help="median perplexity the temperature is set to")
    p.add_argument("--shares", default="0.03,0.1", help="opened share of N, as in batched approx mode's budget")
    p.add_argument("--ranks", default="16,32,64", help="ranks of the residual codes")
    a = p.parse_args(argv)
    quiet = a.json
    dim = {"minilm": 384, "static": STATIC_DIM}.get(a.dataset, a.dim)
    x, queries = load(a.dataset, a.n if a.n > 0 else None, dim, n_queries=max(a.queries, 256), seed=a.seed)
    queries = queries[: a.queries]
    t = time.perf_counter()
    index = TreeIndex.build(x, seed=a.seed)
    log(f"built {x.shape} in {time.perf_counter() - t:.0f} s", quiet)
    # the index's own top-level clusters, in its slot order
    level = level_of(index)
    view = index.view()
    slots = level.slots
    cluster = level.slot_node[slots]
    xs = np.ascontiguousarray(view.arrays.vecs[slots])  # float32, in the clusters' order
    centers = level.centers
    counts = level.counts.astype(np.float64)
    # the temperature as bench.sample sets it: median perplexity over the first 16 queries
    beta = beta_for(exact_scores(queries[:16], x), a.perplexity)
    codes = {}
    for r in (int(v) for v in a.ranks.split(",") if v):
        basis = residual_basis(xs, centers[cluster], r, a.seed)
        codes[r] = (np.ascontiguousarray((xs - centers[cluster]) @ basis.T, np.float32), basis.astype(np.float32))
    shares = [float(v) for v in a.shares.split(",") if v]
    w, _, _ = cluster_log_masses(level, view.arrays, queries, beta)
    order = opening_order(level, w)
    rows = []
    for b in range(queries.shape[0]):
        rows.append(one_query(queries[b], xs, centers, cluster, counts, w[b], order[b], beta, shares, codes))
        log(f"query {b}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1][str(shares[-1])].items()), quiet)
    mean = {sh: {k: float(np.mean([r[sh][k] for r in rows])) for k in rows[0][sh]} for sh in rows[0]}
    res = dict(
        benchmark="proposal_tv",
        dataset=a.dataset,
        n=int(x.shape[0]),
        dim=int(x.shape[1]),
        queries=int(queries.shape[0]),
        perplexity=a.perplexity,
        temperature=1.0 / beta,
        clusters=int(level.nodes.size),
        mean_tv=mean,
        per_query=rows,
        machine=machine(),
    )
    emit(res, quiet)
    return res


if __name__ == "__main__":
    main()
