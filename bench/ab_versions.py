"""Same-process A/B of two treeidx versions: build, search and sampling at 1M, interleaved.

    python -m bench.ab_versions --before 939b1ad --n 1000000 --rounds 5 --json

The `--before` revision's `treeidx/` is exported with `git archive` into a temporary
folder and imported as `treeidx_before` (its modules import each other relatively); the
checkout's `treeidx` is "after". Both build an index over the same clustered data (64-d),
then each round times, in alternating order, exact search (k = 10, 1000 queries) and
exact and approx sampling (k = 64, 256 queries) at perplexities 10 and 100, and exact
sampling with plan="tree" (`exact_tree_*`: every query through the tree; the "before"
revision must know `plan`). Wall and process CPU time are both reported: on a busy
machine CPU time is the steadier ratio.
`identical` says whether both versions returned the same ids.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench._common import base_parser, emit, log, machine
from bench.datasets import clustered
from bench.sample import beta_for, exact_scores


def import_revision(rev: str, folder: str):
    """The package `treeidx` at git revision `rev`, imported as `treeidx_before`."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
    archive = subprocess.run(
        ["git", "-C", root.stdout.strip(), "archive", rev, "treeidx"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "x", "-C", folder], input=archive, check=True)
    shutil.move(os.path.join(folder, "treeidx"), os.path.join(folder, "treeidx_before"))
    sys.path.insert(0, folder)
    return importlib.import_module("treeidx_before")


def clock(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def same_ids(op: str, a, b) -> bool:
    return bool(np.array_equal(a[1], b[1])) if op.startswith("search") else bool(np.array_equal(a.ids, b.ids))


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0], datasets=("clustered",))
    p.add_argument("--before", required=True, help="git revision to compare against (e.g. a commit hash)")
    p.add_argument("--rounds", type=int, default=5)
    p.set_defaults(n=1_000_000)
    a = p.parse_args(argv)
    import treeidx as after

    with tempfile.TemporaryDirectory() as tmp:
        before = import_revision(a.before, tmp)
        x, q = clustered(a.n, a.dim, n_queries=1000, seed=a.seed)
        qs = q[:256]
        versions = {"before": before, "after": after}
        for m in versions.values():  # numba compiles (or loads its cache) outside the timings
            w = m.TreeIndex.build(x[:3000])
            w.search(q, 10)  # a full batch: the grouped search path compiles too
            for mode in ("exact", "approx"):
                m.SoftmaxSampler(w, temperature=0.1, mode=mode).sample(q[:4], 4, seed=0)
        res: dict = dict(benchmark="ab_versions", before=a.before, n=a.n, dim=a.dim, rounds=a.rounds, machine=machine())
        index, build = {}, {}
        for name, m in versions.items():
            wall, cpu, index[name] = clock(lambda m=m: m.TreeIndex.build(x, seed=a.seed))
            build[name] = (wall, cpu)
        res["build"] = {"wall_after_over_before": build["after"][0] / build["before"][0]}
        res["build"]["cpu_after_over_before"] = build["after"][1] / build["before"][1]
        probe = exact_scores(q[:16], x)
        ops = {"search_k10": lambda m, i: i.search(q, 10)}
        for ppl in (10, 100):
            t = 1.0 / beta_for(probe, ppl)
            for mode in ("exact", "approx"):
                ops[f"{mode}_ppl{ppl}"] = lambda m, i, t=t, mode=mode: m.SoftmaxSampler(
                    i, temperature=t, mode=mode
                ).sample(qs, 64, seed=1)
            # every query through the tree: the default plan may send them all dense
            ops[f"exact_tree_ppl{ppl}"] = lambda m, i, t=t: m.SoftmaxSampler(i, temperature=t, plan="tree").sample(
                qs, 64, seed=1
            )
        times = {op: {"before": [], "after": []} for op in ops}
        identical = dict.fromkeys(ops, True)
        for r in range(a.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for op, fn in ops.items():
                outs = {}
                for name in order:
                    wall, cpu, outs[name] = clock(lambda name=name: fn(versions[name], index[name]))
                    times[op][name].append((wall, cpu))
                identical[op] &= same_ids(op, outs["before"], outs["after"])
            log(f"round {r + 1}/{a.rounds} done", a.json)
    res["ops"] = {}
    for op, d in times.items():
        b, f = np.array(d["before"]), np.array(d["after"])
        res["ops"][op] = dict(
            before_wall_s=float(np.median(b[:, 0])),
            wall_after_over_before=float(np.median(f[:, 0]) / np.median(b[:, 0])),
            cpu_after_over_before=float(np.median(f[:, 1]) / np.median(b[:, 1])),
            identical=identical[op],
        )
    emit(res, a.json)
    return res


if __name__ == "__main__":
    main()
