"""An index sharded over local processes (treeidx.distributed, gloo) vs one index and brute force.

    python -m bench.shard --n 4000000 --world-sizes 1,2,4 --json

Clustered 64-d data (bench.datasets.clustered), the temperature of a median perplexity
of `--perplexity` (bisection, as bench.sample). For each world size W, W local processes
(torch.multiprocessing spawn, a gloo group) each build the shard of the ids
`shard_of(ids, W) == rank` and run `ShardedSampler.sample` in exact and approx mode, every
rank with its share of the `--queries` queries. Reported per world size: queries per
second over the whole world (the slowest rank's wall time), payload bytes every rank sent
per query (all exchanges counted, each receiver once: `ShardedSampler.bytes_sent`), the
collective calls per sample call, each rank's peak RSS and build time; compile time (the
first, warm-up call) apart. In the parent process, on the same data and queries: exact
brute force (treeidx.brute, numpy sgemm + float64 sampling) and one `SoftmaxSampler`
over the whole index, so figures are ratios.

The ranks share this machine's cores: W processes on C cores run at most C at a time, so
throughput here measures the overhead of sharding, not the speed-up of W machines
(bench/README.md has the cost model for many machines).
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import tempfile
import time

import numpy as np

from bench._common import base_parser, emit, log, machine, timed
from bench.datasets import clustered
from bench.sample import beta_for
from treeidx import SoftmaxSampler, TreeIndex
from treeidx.brute import BruteForce


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from
    the parent a spawned rank was forked from)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _read_rows(path: str, keep) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a saved (n, d) float32 array whose index passes `keep`, read in
    chunks by file reads (a memory map would count the whole file in this rank's RSS)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = header(f)
        n, d = shape
        parts, ids = [], []
        step = 65536
        for lo in range(0, n, step):
            m = min(step, n - lo)
            chunk = np.fromfile(f, np.float32, m * d).reshape(m, d)
            sel = np.flatnonzero(keep(np.arange(lo, lo + m, dtype=np.int64)))
            parts.append(chunk[sel])
            ids.append(sel + lo)
    return np.ascontiguousarray(np.concatenate(parts)), np.concatenate(ids)


def _rank_main(rank: int, world: int, cfg: dict) -> None:
    """One rank: build its shard, time the sharded sampler, write its figures."""
    import torch
    import torch.distributed as dist

    from treeidx.distributed import ShardedSampler, shard_of

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=cfg["init"], rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800)
    )
    try:
        xs, own = _read_rows(cfg["x"], lambda ids: shard_of(ids, world) == rank)
        t0 = time.perf_counter()
        index = TreeIndex.build(xs, own, seed=0)
        build_s = time.perf_counter() - t0
        del xs
        queries = np.load(cfg["q"])
        mine = queries[rank::world]
        out: dict = {"rank": rank, "targets": int(own.size), "build_s": build_s, "index_mb": index.nbytes / 2**20}
        for mode in ("exact", "approx"):
            s = ShardedSampler(index, temperature=cfg["temperature"], mode=mode, timeout=1800)
            t0 = time.perf_counter()
            s.sample(mine[:2], 4, seed=0)  # compiles (or loads) the kernels
            compile_s = time.perf_counter() - t0
            best = np.inf
            b0, m0 = s.bytes_sent, s.messages
            for rep in range(cfg["repeat"]):
                dist.barrier()
                t0 = time.perf_counter()
                r = s.sample(mine, cfg["k"], seed=1 + rep)
                elapsed = time.perf_counter() - t0
                best = min(best, elapsed)
            out[mode] = {
                "seconds": best,
                "compile_s": compile_s,
                "bytes_sent": (s.bytes_sent - b0) / cfg["repeat"],
                "collectives_per_call": (s.messages - m0) / cfg["repeat"],
                "inner_products_per_query": float(r.inner_products.mean()) if len(r.ids) else 0.0,
                "tv_bound_median": float(np.median(r.tv_bound)) if len(r.ids) else 0.0,
            }
        out["peak_rss_mb"] = _peak_rss_mb()
        with open(os.path.join(cfg["dir"], f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def run_world(world: int, cfg: dict) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(dir=cfg["tmp"]) as d:
        cfg = dict(cfg, dir=d, init=f"file://{d}/rendezvous")
        mp.start_processes(_rank_main, args=(world, cfg), nprocs=world, start_method="spawn")
        ranks = [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(world)]
    res: dict = {"world_size": world, "ranks": ranks}
    nq = cfg["queries"]
    for mode in ("exact", "approx"):
        wall = max(r[mode]["seconds"] for r in ranks)
        res[mode] = {
            "queries_per_s": nq / wall,
            "wall_s": wall,
            "bytes_per_query": sum(r[mode]["bytes_sent"] for r in ranks) / nq,
            "collectives_per_call": ranks[0][mode]["collectives_per_call"],
            "compile_s": max(r[mode]["compile_s"] for r in ranks),
        }
    res["peak_rss_mb_per_rank"] = [r["peak_rss_mb"] for r in ranks]
    res["index_mb_per_rank"] = [r["index_mb"] for r in ranks]
    res["build_s_per_rank"] = [r["build_s"] for r in ranks]
    return res


def main(argv=None) -> None:
    p = base_parser(__doc__.splitlines()[0], datasets=("clustered",))
    p.set_defaults(n=4_000_000, queries=256)
    p.add_argument("--world-sizes", default="1,2,4")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--perplexity", type=float, default=100.0)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args(argv)
    x, queries = clustered(a.n, a.dim, n_queries=a.queries, seed=a.seed)
    beta = _beta(x, queries, a.perplexity)
    result: dict = {
        "benchmark": "shard",
        "dataset": "clustered",
        "n": a.n,
        "dim": a.dim,
        "k": a.k,
        "queries": a.queries,
        "temperature": 1.0 / beta,
        "target_perplexity": a.perplexity,
        "machine": machine(),
    }
    # the yardsticks, in this process on the same data
    brute = BruteForce(x)
    temperature = 1.0 / beta
    brute.sample(queries[:4], a.k, temperature=temperature, seed=0)
    bf_s = timed(lambda: brute.sample(queries, a.k, temperature=temperature, seed=1), 2)[0]
    result["brute_force_queries_per_s"] = a.queries / bf_s
    brute = None  # its buffers go before the index is built
    t0 = time.perf_counter()
    index = TreeIndex.build(x, seed=0)
    result["single_build_s"] = time.perf_counter() - t0
    for mode in ("exact", "approx"):
        single = SoftmaxSampler(index, temperature=1.0 / beta, mode=mode)
        single.sample(queries[:2], 4, seed=0)
        secs = timed(lambda: single.sample(queries, a.k, seed=1), a.repeat)[0]  # noqa: B023
        single = None  # it holds the index
        result[f"single_index_{mode}_queries_per_s"] = a.queries / secs
        log(f"single index {mode}: {a.queries / secs:.1f} queries/s", a.json)
    del index
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "x.npy"), x)
        np.save(os.path.join(tmp, "q.npy"), queries)
        del x
        cfg = dict(
            x=os.path.join(tmp, "x.npy"),
            q=os.path.join(tmp, "q.npy"),
            tmp=tmp,
            temperature=1.0 / beta,
            k=a.k,
            queries=a.queries,
            repeat=a.repeat,
        )
        result["worlds"] = []
        for w in (int(v) for v in a.world_sizes.split(",")):
            res = run_world(w, cfg)
            for mode in ("exact", "approx"):
                res[mode]["vs_brute_force"] = res[mode]["queries_per_s"] / result["brute_force_queries_per_s"]
                res[mode]["vs_single_index"] = res[mode]["queries_per_s"] / result[f"single_index_{mode}_queries_per_s"]
            log(
                f"world {w}: exact {res['exact']['queries_per_s']:.1f} q/s, approx "
                f"{res['approx']['queries_per_s']:.1f} q/s, {res['exact']['bytes_per_query']:.0f} B/query (exact)",
                a.json,
            )
            result["worlds"].append(res)
    result["parent_peak_rss_mb"] = _peak_rss_mb()
    emit(result, a.json)


def _beta(x: np.ndarray, queries: np.ndarray, perplexity: float) -> float:
    """The inverse temperature of the target median perplexity on a few queries (exact)."""
    scores = queries[:16] @ x.T
    return beta_for(scores.astype(np.float64), perplexity)


if __name__ == "__main__":
    main()
