"""Time the brute-force yardsticks (and the variants we tried) in ms/query.

    python -m bench.brute_yardstick --n 1000000 --dim 64 --json

The last line printed is one JSON object with ms/query per variant.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from treeidx.brute import BruteForce


def clustered_unit(n: int, dim: int, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors around random unit cluster centres (clustered-ish, cheap to make)."""
    c = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float32)
    step = 1 << 20
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        x[lo:hi] = c[rng.integers(0, n_clusters, hi - lo)] + 0.35 * rng.standard_normal(
            (hi - lo, dim), dtype=np.float32
        ) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed(fn, reps: int) -> float:
    fn()  # warm-up (numba compile, buffer allocation, page faults)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--beta", type=float, default=20.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    X = clustered_unit(a.n, a.dim, 2000, rng)
    Q = X[rng.integers(0, a.n, a.queries)] + 0.1 * rng.standard_normal((a.queries, a.dim), dtype=np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    bf = BruteForce(X, batch_size=a.queries)
    buf = bf._buffer(a.queries)
    B = a.queries
    res: dict[str, float] = {}

    def ms(name: str, fn) -> None:
        res[name] = round(1e3 * timed(fn, a.reps) / B, 4)
        print(f"{name:40s} {res[name]:8.3f} ms/query", flush=True)

    # --- matmul alone
    ms("matmul_numpy", lambda: np.matmul(Q, bf.vectors.T, out=buf))
    Xt, Qt = torch.from_numpy(bf.vectors), torch.from_numpy(Q)
    tb = torch.from_numpy(buf)
    ms("matmul_torch", lambda: torch.matmul(Qt, Xt.T, out=tb))

    # --- sampling, k=64
    def torch_recipe() -> None:
        # the usual torch recipe; not exact: float32 prefix sum inside torch.multinomial
        np.matmul(Q, bf.vectors.T, out=buf)
        tb.mul_(a.beta)
        tb.sub_(tb.max(dim=1, keepdim=True).values)
        tb.clamp_(min=-87.0)
        tb.exp_()
        torch.multinomial(tb, 64, replacement=True, generator=torch.Generator().manual_seed(0))

    # ours first: torch's OpenMP workers spin after a torch op and slow a numba kernel right after
    ms("sample_k64 (numba fused pass)", lambda: bf.sample(Q, 64, temperature=1.0 / a.beta, seed=0))
    ms("sample_torch_clamp_multinomial (inexact)", torch_recipe)
    ms("log_partition", lambda: bf.log_partition(Q, a.beta))
    # --- search, k=10
    np.matmul(Q, bf.vectors.T, out=buf)
    ms("topk_only_argpartition", lambda: np.argpartition(buf, -10, axis=1)[:, -10:])
    ms("topk_only_torch_topk", lambda: torch.topk(tb, 10, dim=1))
    ms("search_k10 (kept: numpy matmul + torch.topk)", lambda: bf.search(Q, 10))

    p = bf.probabilities(Q[0], a.beta)
    res["perplexity_q0"] = round(float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())), 1)
    res.update(n=a.n, dim=a.dim, queries=B, beta=a.beta, threads=torch.get_num_threads())
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
