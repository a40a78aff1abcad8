"""`treeidx demo`: train a code-search dual encoder with treeidx negatives and with
in-batch negatives, side by side, and show what the negatives change.

Everything is local and deterministic: the corpus is the pinned one (the standard
library and treeidx's dependencies at the versions of a shipped manifest,
`treeidx.codesearch.pinned`, mined from the installed sources), the encoder is a hashed bag of n-grams
(`treeidx.codesearch.encoder`), the loop is `treeidx.codesearch.training.train`. Writes `results.json` and
a plot of validation recall@10 against training time and against steps into the
output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

DEFAULT_STRATEGIES = ("treeidx", "inbatch")


def demo_config():
    """The demo's training settings (also bench.train's): one shared tower, lr 3e-3,
    500 in-batch warm-up steps before the sampler is built on the warmed-up encoder
    (from-scratch vectors drift too fast for any index), and a full re-encode whenever
    the index's drift estimate passes 0.5 (docs/training.md: the runs that chose them)."""
    from .training import TrainConfig

    return TrainConfig(shared=True, lr=3e-3, warmup_steps=500, max_drift_error=0.5, eval_every=0, eval_every_s=15.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .training import STRATEGIES

    d = demo_config()
    p.add_argument(
        "--strategies",
        default=",".join(DEFAULT_STRATEGIES),
        help=f"comma-separated, from {', '.join(STRATEGIES)}, or '<batches>+<negatives>' with "
        "batches gcbs or tree-batches (default: %(default)s)",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=3.0,
        help="training time per strategy, evaluation excluded (default: %(default)s)",
    )
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps instead of --minutes")
    p.add_argument("--k", type=int, default=d.k, help="negatives per query (default: %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch_size, help="queries per step (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="(default: %(default)s)")
    p.add_argument(
        "--mode",
        choices=("exact", "approx"),
        default=d.sampler_mode,
        help="treeidx sampler mode (default: %(default)s)",
    )
    p.add_argument(
        "--batch-mix",
        type=float,
        default=d.batch_mix,
        help="gcbs / tree-batches: share of each batch drawn at random (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-targets", type=int, default=None, help="use a subset of the targets (every query's positive kept)"
    )
    p.add_argument(
        "--corpus",
        choices=("pinned", "installed"),
        default="pinned",
        help="pinned: the shipped manifest's modules, the same targets on every machine "
        "(treeidx.codesearch.pinned); installed: everything installed (default: %(default)s)",
    )
    p.add_argument("--out", default="treeidx-demo", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from .data import CodeSearchData
    from .training import train

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    progress = not args.no_progress
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    print("1/3  the corpus: docstring -> function, mined from the installed Python sources", flush=True)
    data = CodeSearchData.load(progress=progress, corpus=args.corpus)
    if args.max_targets:
        data = data.subset(args.max_targets)
    print("     " + data.corpus_report(), flush=True)
    print("     " + _describe(data.describe()), flush=True)
    base = replace(
        demo_config(),
        k=args.k,
        batch_size=args.batch,
        temperature=args.temperature,
        sampler_mode=args.mode,
        seed=args.seed,
        batch_mix=args.batch_mix,
    )
    if args.steps is not None:
        base = replace(base, steps=args.steps, time_limit_s=None)
    else:
        base = replace(base, steps=10**9, time_limit_s=60.0 * args.minutes)
    results = {}
    for i, name in enumerate(strategies):
        print(f"2/3  training with {name} negatives ({i + 1}/{len(strategies)})", flush=True)
        results[name] = train(data, name, base, progress=progress)
    print("3/3  test queries (modules never seen in training), ranked against all targets", flush=True)
    print(format_table(results))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({n: r.to_dict() for n, r in results.items()}, f, indent=2)
    png = os.path.join(args.out, "recall.png")
    if plot_histories(results, png, title=f"code search, {data.n_targets:,} targets"):
        print(f"plot: {png}")
    print(f"results: {os.path.join(args.out, 'results.json')}  (total {time.perf_counter() - t0:.0f} s)")
    return 0


def _describe(d: dict) -> str:
    return ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in d.items())


def format_table(results: dict) -> str:
    """One row per strategy: test recall@1, recall@10, MRR, steps, training seconds (in
    all and per step), sampling seconds."""
    rows = [("strategy", "recall@1", "recall@10", "MRR", "steps", "train s", "s/step", "sampling s")]
    for name, r in results.items():
        m = r.test
        rows.append(
            (
                name,
                f"{m['recall@1']:.3f}",
                f"{m['recall@10']:.3f}",
                f"{m['mrr']:.3f}",
                f"{r.steps}",
                f"{r.train_s:.0f}",
                f"{r.train_s / max(r.steps, 1):.3f}",
                f"{r.time_split['sampling_s']:.0f}",
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    )


def plot_histories(results: dict, path: str, *, title: str = "") -> bool:
    """Validation recall@10 against training seconds (left) and against steps (right),
    one line per strategy: equal time is the user's budget, equal steps separates what
    the negatives teach from what they cost. False (with a message) when matplotlib is
    missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, (ax, ax_steps) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120, sharey=True)
    for name, r in results.items():
        steps = [h[0] for h in r.history]
        secs = [h[1] for h in r.history]
        rec = [h[2] for h in r.history]
        ax.plot(secs, rec, marker="o", markersize=3, label=name)
        ax_steps.plot(steps, rec, marker="o", markersize=3, label=name)
    ax.set_xlabel("training time (s, evaluation excluded)")
    ax_steps.set_xlabel("optimiser steps")
    ax.set_ylabel("validation recall@10")
    for a in (ax, ax_steps):
        a.grid(alpha=0.3)
    ax_steps.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
