"""Exact top-k maximum-inner-product search: treeidx vs brute force vs FAISS, same data, same process.

    python -m bench.search --n 1000000 --dim 64 --dataset clustered --json

Prints one JSON object (the last line of stdout): build seconds (numba compile
time separately), bytes per target, remove/insert throughput, per-query search
milliseconds and recall against brute force for treeidx, brute force (numpy
sgemm into a reused buffer + torch.topk), faiss IndexFlatIP (exact) and, for
context, faiss IVF (approximate, nlist = 4 sqrt N, nprobe 8).
"""

from __future__ import annotations

import math
import time

import numpy as np

from bench._common import base_parser, emit, log, machine, recall, recall_ties_aside, timed
from bench.datasets import load
from treeidx import TreeIndex
from treeidx.brute import BruteForce


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--leaf-size", type=int, default=32)
    p.add_argument("--no-faiss", action="store_true")
    a = p.parse_args(argv)
    q_ = a.json
    x, queries = load(
        a.dataset, None if (a.dataset == "code" and a.n <= 0) else a.n, a.dim, n_queries=a.queries, seed=a.seed
    )
    n = x.shape[0]
    log(f"data: {a.dataset} {x.shape}, {queries.shape[0]} queries", q_)
    res: dict = dict(
        benchmark="search", dataset=a.dataset, n=n, dim=a.dim, k=a.k, queries=int(queries.shape[0]), machine=machine()
    )

    # numba compiles on first use (or loads its cache): time that apart
    t = time.perf_counter()
    warm = TreeIndex.build(x[:2000], leaf_size=a.leaf_size)
    warm.search(queries[:4], min(a.k, 10))
    warm.remove(np.arange(10))
    warm.insert(x[:10], np.arange(10))
    compile_s = time.perf_counter() - t
    log("building treeidx ...", q_)
    build_s, index = timed(lambda: TreeIndex.build(x, leaf_size=a.leaf_size, seed=a.seed))
    st = index.stats()
    bytes_built = index.nbytes / n
    n_edit = max(1, min(10_000, n // 100))
    edit_ids = np.random.default_rng(a.seed).choice(n, n_edit, replace=False)
    remove_s, _ = timed(lambda: index.remove(edit_ids))
    insert_s, _ = timed(lambda: index.insert(x[edit_ids], edit_ids))
    bytes_per_target = index.nbytes / n
    log(f"treeidx built in {build_s:.1f}s ({st['nodes']} nodes, depth {st['depth']})", q_)

    brute = BruteForce(x)
    brute.search(queries[:256], a.k)  # warm the buffer and BLAS
    bf_s, (truth_s, truth) = timed(lambda: brute.search(queries, a.k), repeat=2)
    index.search(queries[:64], a.k)
    tx_s, (_, tx_ids) = timed(lambda: index.search(queries, a.k), repeat=2)
    nq = queries.shape[0]
    res["treeidx"] = dict(
        build_s=build_s,
        compile_s=compile_s,
        bytes_per_target=bytes_built,
        bytes_ratio_to_float32_vectors=bytes_built / (4 * a.dim),
        bytes_per_target_after_edits=bytes_per_target,
        remove_per_s=n_edit / remove_s,
        insert_per_s=n_edit / insert_s,
        edited=n_edit,
        search_ms_per_query=1e3 * tx_s / nq,
        recall=recall(tx_ids, truth),
        recall_ties_aside=recall_ties_aside(x, queries, tx_ids, truth_s),
        nodes_visited_median=float(np.median(index.search(queries, a.k, return_work=True)[2].nodes_visited)),
        nodes=st["nodes"],
        leaves=st["leaves"],
        depth=st["depth"],
        root_children=st["root_children"],
        clusters=st["clusters"],
    )
    res["brute_force"] = dict(search_ms_per_query=1e3 * bf_s / nq, recall=1.0)
    if not a.no_faiss:
        res.update(faiss_peers(x, queries, a.k, truth, a.seed, q_))
    res["speedup_vs_brute"] = res["brute_force"]["search_ms_per_query"] / res["treeidx"]["search_ms_per_query"]
    emit(res, q_)
    return res


def faiss_peers(x, queries, k, truth, seed, quiet) -> dict:
    try:
        import faiss
    except ImportError:
        return dict(faiss_flat="not installed (pip install faiss-cpu)")
    nq = queries.shape[0]
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    flat.search(queries[:64], k)
    fl_s, (_, fl_ids) = timed(lambda: flat.search(queries, k), repeat=2)
    out = dict(faiss_flat=dict(search_ms_per_query=1e3 * fl_s / nq, recall=recall(fl_ids, truth)))
    flat.reset()  # free its copy of the vectors before the IVF peer
    nlist = int(min(4 * math.sqrt(x.shape[0]), x.shape[0] // 39))
    if nlist >= 16:
        log(f"faiss IVF{nlist} ...", quiet)
        quant = faiss.IndexFlatIP(x.shape[1])
        ivf = faiss.IndexIVFFlat(quant, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = x[rng.choice(x.shape[0], min(x.shape[0], 64 * nlist), replace=False)]
        t = time.perf_counter()
        ivf.train(train)
        ivf.add(x)
        build = time.perf_counter() - t
        ivf.nprobe = 8
        iv_s, (_, iv_ids) = timed(lambda: ivf.search(queries, k), repeat=2)
        out["faiss_ivf_approx"] = dict(
            nlist=nlist, nprobe=8, build_s=build, search_ms_per_query=1e3 * iv_s / nq, recall=recall(iv_ids, truth)
        )
    return out


if __name__ == "__main__":
    main()
