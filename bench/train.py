"""Training benchmark: the same dual encoder, batches and steps; only the negatives change.

    python -m bench.train --json

For each seed and each strategy of `treeidx.codesearch.training.STRATEGIES` (in-batch, uniform,
stale top-k, negative cache, treeidx exact + Nyström drift, treeidx over all targets
re-encoded every step, the brute-force oracle; and the hard-batch sources gcbs and
tree-batches, alone with in-batch negatives or as "<batches>+<negatives>", e.g.
gcbs+treeidx) it trains the code-search dual encoder
for --steps steps and reports test recall@1/@10 and MRR (test queries from modules never
seen in training, ranked exactly against all targets), wall time, the share of the
training time spent sampling and re-encoding targets for the sampler, the targets the
sampler alone encodes per step (beside the B·(k+1) every sampled strategy encodes for
the loss), seconds per step (training time / steps, so equal-time comparisons can be
derived), the mean cosine of the in-batch negatives, the sampler's host memory and the
process's peak RSS. Then mean ± standard
deviation over the seeds, and a plot of validation recall@10 against training time.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace
from types import SimpleNamespace

import numpy as np

from bench._common import emit, log, machine
from treeidx.codesearch import CodeSearchData
from treeidx.codesearch.demo import demo_config, format_table, plot_histories
from treeidx.codesearch.training import CORRECTIONS, STRATEGIES, train

METRICS = ("recall@1", "recall@10", "mrr")


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of each figure of one strategy."""

    def stat(values):
        v = np.asarray(values, np.float64)
        return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if v.size > 1 else 0.0)

    out = {m: stat([r["test"][m] for r in runs]) for m in METRICS}
    out["train_s"] = stat([r["train_s"] for r in runs])
    out["s_per_step"] = stat([r["train_s"] / max(r["steps"], 1) for r in runs])
    cos = [r["inbatch_negative_cos"] for r in runs if r.get("inbatch_negative_cos") is not None]
    out["inbatch_negative_cos"] = stat(cos) if cos else None
    out["sampling_share"] = stat([r["time_split"]["sampling_s"] / r["train_s"] for r in runs])
    out["reencode_share"] = stat([r["time_split"]["reencode_s"] / r["train_s"] for r in runs])
    out["targets_encoded_per_step"] = stat([r["targets_encoded_per_step"] for r in runs])
    out["sampler_mib"] = stat([r["sampler_mib"] for r in runs])
    return out


def _run_key(strategy: str, cfg) -> str:
    return json.dumps([strategy, asdict(cfg)], sort_keys=True)


def _read_runs(path: str | None, data: dict) -> dict[str, dict]:
    """Finished runs of --runs-file on the same data, by key (a damaged last line is skipped)."""
    out: dict[str, dict] = {}
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("data") == data:
                    out[rec["key"]] = rec["run"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = demo_config()
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch_size)
    p.add_argument("--k", type=int, default=d.k)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument(
        "--eval-every-s",
        type=float,
        default=d.eval_every_s,
        help="also validate every this many training seconds (0: never; on a contended machine a "
        "time-based schedule validates nearly every step)",
    )
    p.add_argument("--stale-refresh", type=int, default=d.stale_refresh_every)
    p.add_argument(
        "--warmup",
        type=int,
        default=d.warmup_steps,
        help="in-batch steps first, the same for every strategy (part of --steps)",
    )
    p.add_argument(
        "--batch-mix", type=float, default=d.batch_mix, help="hard batches: share of each batch drawn at random"
    )
    p.add_argument(
        "--batch-refresh",
        type=int,
        default=None,
        help="hard batches: regroup every this many steps (default: once per epoch)",
    )
    p.add_argument("--gcbs-neighbors", type=int, default=d.gcbs_neighbors)
    p.add_argument("--gcbs-similarity", default=d.gcbs_similarity, choices=("concat", "cross"))
    p.add_argument(
        "--max-targets",
        type=int,
        default=None,
        help="a subset of the targets (every query's positive kept); default all",
    )
    # the issue-14 experiments: what makes one source of negatives train better than another
    p.add_argument(
        "--correction",
        choices=CORRECTIONS,
        default=d.correction,
        help="logq: logit - log(k Q) (default); none: raw logits; fresh: the model's exact "
        "log-softmax over all fresh targets, whatever drew the negatives",
    )
    p.add_argument(
        "--proposal-temperature",
        type=float,
        default=d.proposal_temperature,
        help="the samplers' softmax temperature (default: the loss's --temperature)",
    )
    p.add_argument(
        "--no-in-batch",
        action="store_true",
        help="no in-batch negatives beside the sampled ones (inbatch itself keeps them)",
    )
    p.add_argument(
        "--fn-margin",
        type=float,
        default=d.false_negative_margin,
        help="false-negative filter: never sample a target within this cosine of the positive",
    )
    p.add_argument("--cache-size", type=int, default=d.cache_size)
    p.add_argument(
        "--landmark-refresh",
        type=int,
        default=d.landmark_refresh_every,
        help="treeidx: refit the drift model every this many steps",
    )
    p.add_argument(
        "--max-drift-error",
        type=float,
        default=d.max_drift_error,
        help="treeidx: full re-encode when the drift estimate passes this (0: never)",
    )
    p.add_argument("--no-write-back", action="store_true", help="treeidx: do not write back the step's targets")
    p.add_argument("--treeidx-proposal-temperature", type=float, default=d.treeidx_proposal_temperature)
    p.add_argument(
        "--support-size",
        type=int,
        default=d.support_size,
        help="oracle: sample from the softmax over a fresh random subset of this many targets per step",
    )
    p.add_argument(
        "--runs-file",
        default=None,
        help="append each finished run (JSON line) here and skip runs already in it: "
        "a crashed or interrupted benchmark resumes where it stopped",
    )
    p.add_argument(
        "--corpus",
        choices=("pinned", "installed"),
        default="pinned",
        help="pinned: the shipped manifest's modules (treeidx.codesearch.pinned), the same targets "
        "on every machine; installed: everything installed here, where the issue-14 "
        "experiments ran (default: %(default)s)",
    )
    p.add_argument("--plot", default="bench/results/train.png")
    p.add_argument("--json", action="store_true", help="print only the JSON result line")
    a = p.parse_args(argv)
    quiet = a.json
    strategies = [s for s in a.strategies.split(",") if s]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    data = CodeSearchData.load(progress=not quiet, corpus=a.corpus)
    if a.max_targets:
        data = data.subset(a.max_targets)
    log(f"data: {data.describe()}", quiet)
    base = replace(
        d,
        steps=a.steps,
        batch_size=a.batch,
        k=a.k,
        temperature=a.temperature,
        eval_every=a.eval_every,
        stale_refresh_every=a.stale_refresh,
        warmup_steps=a.warmup,
        eval_every_s=a.eval_every_s or None,
        batch_mix=a.batch_mix,
        batch_refresh_every=a.batch_refresh,
        gcbs_neighbors=a.gcbs_neighbors,
        gcbs_similarity=a.gcbs_similarity,
        correction=a.correction,
        proposal_temperature=a.proposal_temperature,
        in_batch_negatives=not a.no_in_batch,
        false_negative_margin=a.fn_margin,
        cache_size=a.cache_size,
        landmark_refresh_every=a.landmark_refresh,
        max_drift_error=a.max_drift_error or None,
        write_back=not a.no_write_back,
        treeidx_proposal_temperature=a.treeidx_proposal_temperature,
        support_size=a.support_size,
    )
    runs: dict[str, list[dict]] = {s: [] for s in strategies}
    first_seed = {}
    done = _read_runs(a.runs_file, data.describe())
    for seed in seeds:
        for s in strategies:
            cfg = replace(base, seed=seed, in_batch_negatives=base.in_batch_negatives or s == "inbatch")
            key = _run_key(s, cfg)
            if key in done:
                r = done[key]
                log(f"seed {seed} {s}: from {a.runs_file}", quiet)
            else:
                res = train(data, s, cfg, progress=not quiet)
                r = res.to_dict()
                if a.runs_file:
                    with open(a.runs_file, "a") as f:
                        f.write(json.dumps(dict(key=key, data=data.describe(), run=r)) + "\n")
            runs[s].append(r)
            if seed == seeds[0]:
                first_seed[s] = SimpleNamespace(**r)  # what format_table / plot_histories read
            log(
                f"seed {seed} {s}: {r['test']}  {r['train_s']:.0f}s ({r['train_s'] / max(r['steps'], 1):.3f} s/step)",
                quiet,
            )
    if first_seed and a.plot:
        os.makedirs(os.path.dirname(a.plot) or ".", exist_ok=True)
        plot_histories(first_seed, a.plot, title=f"code search, {data.n_targets:,} targets, seed {seeds[0]}")
    log(format_table(first_seed), quiet)
    res = dict(
        benchmark="train",
        data=data.describe(),
        config=asdict(base),
        seeds=seeds,
        loss_encodes_per_step=dict(sampled=base.batch_size * (base.k + 1), inbatch=base.batch_size),
        summary={s: summarise(v) for s, v in runs.items()},
        runs=runs,
        plot=a.plot,
        machine=machine(),
    )
    emit(res, quiet)
    return res


if __name__ == "__main__":
    main()
