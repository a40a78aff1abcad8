"""Nyström drift on real encoder drift: predicted vs fresh target vectors during training.

    python -m bench.drift --json
    python -m bench.drift --encoder minilm --json   # all-MiniLM-L6-v2 fine-tuned (bench/drift_minilm.py)

Trains the code-search dual encoder (`treeidx.codesearch.encoder`, `treeidx.codesearch.training`) on the
`code` corpus for --steps steps and, at each checkpoint, encodes every target and the
held-out (validation) queries with the current towers. The index is built at the
--base checkpoint (its vectors are the stale ones); every later checkpoint is a
landmark refresh: re-encode the m landmarks, `NystromDrift.fit`, predict every
target's current vector. For each m in --landmarks, each kernel and each landmark
choice, and for the stale vectors (no correction), all in one run on the same
checkpoints, it reports:

  rel_score_error  sqrt(Σ e² / Σ c²) over held-out queries × ALL targets, e = predicted −
                   fresh score, c = fresh score, both centred per query (a per-query shift
                   does not change the softmax)
  tv_mean          mean over queries of the total-variation distance between the softmax
                   at the training temperature under predicted and under fresh vectors
  holdout          NystromDrift's own estimate (relative RMS vector error on 512 targets
                   re-encoded for the purpose), against the stale vectors'

and the seconds of one landmark refresh (encode m targets + fit) against a full
re-encode (encode all N targets + rebuild the tree over them).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from bench._common import emit, log, machine
from treeidx import NystromDrift, TreeIndex
from treeidx.codesearch import CodeSearchData
from treeidx.codesearch.training import TrainConfig, eval_rows, train
from treeidx.nystrom import kcenter

DEFAULT_LANDMARKS = "64,256,1024,4096"
HOLDOUT = 512


def softmax_gap(
    queries: np.ndarray, approx: np.ndarray, fresh: np.ndarray, beta: float, chunk: int = 32
) -> dict[str, float]:
    """rel_score_error, tv_mean, tv_median of `approx` vs `fresh` target vectors (see
    the module docstring), over all targets, a chunk of queries at a time in float64."""
    q = np.asarray(queries, np.float32)
    approx, fresh = np.asarray(approx, np.float32), np.asarray(fresh, np.float32)
    num = den = 0.0
    tvs = []
    for lo in range(0, q.shape[0], chunk):
        # float32 products (error ~1e-7 on unit vectors, far below any drift), summed in float64
        sf = (q[lo : lo + chunk] @ fresh.T).astype(np.float64)
        sa = (q[lo : lo + chunk] @ approx.T).astype(np.float64)
        e = sa - sf
        e -= e.mean(1, keepdims=True)
        c = sf - sf.mean(1, keepdims=True)
        num += float(np.sum(e * e))
        den += float(np.sum(c * c))
        tvs.append(0.5 * np.abs(_softmax(beta * sa) - _softmax(beta * sf)).sum(1))
    tv = np.concatenate(tvs)
    return dict(rel_score_error=float(np.sqrt(num / den)), tv_mean=float(tv.mean()), tv_median=float(np.median(tv)))


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(1, keepdims=True)
    return s


def record_checkpoints(
    data: CodeSearchData,
    cfg: TrainConfig,
    strategy: str,
    steps: list[int],
    query_rows: np.ndarray,
    landmark_sizes: list[int],
    quiet: bool,
):
    """Train once; at each checkpoint keep every target's and the held-out queries'
    vectors. At the last one, time a landmark re-encode (each m) and a full re-encode."""
    snaps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    timing: dict = {}
    last = max(steps)

    def callback(step: int, model) -> None:
        if step not in steps:
            return
        t = time.perf_counter()
        targets = model.encode_all_targets().numpy()
        timing["encode_all_s"] = time.perf_counter() - t
        snaps[step] = (targets, model.encode_all_queries(query_rows).numpy())
        log(f"checkpoint {step}", quiet)
        if step == last:
            rng = np.random.default_rng(0)
            for m in landmark_sizes:
                ids = np.sort(rng.choice(data.n_targets, m, replace=False))
                t = time.perf_counter()
                with torch.no_grad():
                    model.encode_targets(ids)
                timing[f"encode_landmarks_s@{m}"] = time.perf_counter() - t

    result = train(data, strategy, replace(cfg, steps=last), progress=not quiet, callback=callback)
    t = time.perf_counter()
    TreeIndex.build(snaps[last][0])
    timing["tree_build_s"] = time.perf_counter() - t
    return snaps, timing, result


def main(argv=None) -> dict:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--encoder", choices=("code", "minilm"), default="code")
    known, rest = pre.parse_known_args(argv)
    if known.encoder == "minilm":  # a fine-tuned transformer's drift (bench/drift_minilm.py)
        from bench import drift_minilm

        return drift_minilm.main(rest)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--encoder",
        choices=("code", "minilm"),
        default="code",
        help="code: the demo's towers; minilm: bench.drift_minilm",
    )
    p.add_argument("--strategy", default="treeidx", help="negatives the encoder is trained with")
    p.add_argument(
        "--checkpoints",
        default="200,500,1000,1500,2000",
        help="steps; the first is where the index (stale vectors) is built",
    )
    p.add_argument("--landmarks", default=DEFAULT_LANDMARKS, help="m values (plus 1%% of the targets)")
    p.add_argument("--kernels", default="linear,rbf,cosine")
    p.add_argument("--choices", default="kcenter,uniform")
    p.add_argument("--max-rank", type=int, default=256, help="rbf/cosine feature cap (the tree's extra dimensions)")
    p.add_argument("--queries", type=int, default=500, help="held-out (validation) queries")
    p.add_argument("--max-targets", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only the JSON result line")
    a = p.parse_args(argv)
    quiet = a.json
    data = CodeSearchData.load(progress=not quiet)
    if a.max_targets:
        data = data.subset(a.max_targets)
    n = data.n_targets
    steps = sorted(int(s) for s in a.checkpoints.split(","))
    sizes = sorted({int(m) for m in a.landmarks.split(",")} | {max(64, n // 100)})
    sizes = [m for m in sizes if m < n // 2]
    cfg = replace(TrainConfig(), seed=a.seed, eval_every=0, test_queries=1000)
    beta = 1.0 / cfg.temperature
    rows = eval_rows(data, "val", a.queries, a.seed)
    snaps, timing, trained = record_checkpoints(data, cfg, a.strategy, steps, rows, sizes, quiet)
    stale = snaps[steps[0]][0]
    later = steps[1:]
    rng = np.random.default_rng(a.seed)
    stale_rows = [dict(step=s, **softmax_gap(snaps[s][1], stale, snaps[s][0], beta)) for s in later]
    configs = []
    for m in sizes:
        for choice in a.choices.split(","):
            t = time.perf_counter()
            lm = kcenter(stale, m, a.seed) if choice == "kcenter" else np.sort(rng.choice(n, m, replace=False))
            choose_s = time.perf_counter() - t
            others = np.setdiff1d(np.arange(n), lm)
            holdout = np.sort(rng.choice(others, HOLDOUT, replace=False))
            for kernel in a.kernels.split(","):
                t = time.perf_counter()
                model = NystromDrift(
                    stale,
                    n_landmarks=m,
                    kernel=kernel,
                    landmarks=lm,
                    max_rank=None if kernel == "linear" else a.max_rank,
                    seed=a.seed,
                )
                phi = model.features()
                setup_s = time.perf_counter() - t
                per_step = []
                for s in later:
                    fresh, queries = snaps[s]
                    t = time.perf_counter()
                    fit = model.fit(fresh[lm], holdout_ids=holdout, holdout_vectors=fresh[holdout])
                    fit_s = time.perf_counter() - t
                    gap = softmax_gap(queries, model.predict_from_features(phi), fresh, beta)
                    per_step.append(
                        dict(
                            step=s,
                            fit_s=fit_s,
                            holdout_predicted=fit.holdout.predicted,
                            holdout_stale=fit.holdout.stale,
                            **gap,
                        )
                    )
                configs.append(
                    dict(
                        m=m,
                        landmarks=choice,
                        kernel=kernel,
                        feature_dim=model.dim,
                        choose_s=choose_s,
                        setup_s=setup_s,
                        checkpoints=per_step,
                    )
                )
                log(
                    f"m={m} {choice} {kernel}: "
                    + ", ".join(f"{r['step']}: err {r['rel_score_error']:.3f} tv {r['tv_mean']:.3f}" for r in per_step)
                    + "  | stale: "
                    + ", ".join(f"err {r['rel_score_error']:.3f} tv {r['tv_mean']:.3f}" for r in stale_rows),
                    quiet,
                )
    full_s = timing["encode_all_s"] + timing["tree_build_s"]
    for c in configs:
        fit_s = float(np.mean([r["fit_s"] for r in c["checkpoints"]]))
        c["refresh_s"] = timing[f"encode_landmarks_s@{c['m']}"] + fit_s
        c["refresh_cost_vs_full"] = c["refresh_s"] / full_s
        c["ratios_vs_stale"] = [
            dict(
                step=r["step"],
                score_error=r["rel_score_error"] / st["rel_score_error"],
                tv=r["tv_mean"] / st["tv_mean"],
            )
            for r, st in zip(c["checkpoints"], stale_rows)
        ]
        c["worst_ratio"] = max(max(x["score_error"], x["tv"]) for x in c["ratios_vs_stale"])
    best = min(configs, key=lambda c: (c["worst_ratio"], c["refresh_s"]))
    res = dict(
        benchmark="drift",
        data=data.describe(),
        strategy=a.strategy,
        config=asdict(cfg),
        checkpoints=steps,
        index_built_at=steps[0],
        temperature=cfg.temperature,
        held_out_queries=int(rows.size),
        train_test=trained.test,
        stale=stale_rows,
        full_reencode_s=dict(encode_all_s=timing["encode_all_s"], tree_build_s=timing["tree_build_s"], total_s=full_s),
        best=dict(
            m=best["m"],
            landmarks=best["landmarks"],
            kernel=best["kernel"],
            worst_ratio_vs_stale=best["worst_ratio"],
            refresh_cost_vs_full=best["refresh_cost_vs_full"],
        ),
        configs=configs,
        machine=machine(),
    )
    emit(res, quiet)
    return res


if __name__ == "__main__":
    main()
