"""Shared benchmark plumbing: arguments, timing, machine facts and the JSON line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def base_parser(description: str, datasets=("clustered", "code")) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--n", type=int, default=100_000, help="number of targets (code/minilm: 0 = all items)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dataset", choices=list(datasets), default="clustered")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only the JSON result line")
    return p


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Best wall time of `repeat` calls, and the last result."""
    best, out = np.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of `truth` found in the same row of `found`."""
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.sum(hits) / truth.size)


def recall_ties_aside(
    x: np.ndarray, queries: np.ndarray, found: np.ndarray, truth_scores: np.ndarray, tol: float = 1e-5
) -> float:
    """Fraction of returned ids whose exact (float64) score reaches the true k-th score.

    Duplicate targets (common in real corpora) tie: either id is a correct answer, so
    plain id recall can be < 1 for an exact search."""
    ok = 0
    for b in range(found.shape[0]):
        s = x[found[b]].astype(np.float64) @ queries[b].astype(np.float64)
        ok += int((s >= float(truth_scores[b, -1]) - tol * max(1.0, abs(float(truth_scores[b, -1])))).sum())
    return ok / found.size


def machine() -> dict:
    import numba
    import torch

    # the load average says how shared the machine was (2 cores, several users here)
    return dict(
        cpus=os.cpu_count(),
        loadavg=[round(v, 2) for v in os.getloadavg()],
        numba_threads=numba.get_num_threads(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        numpy=np.__version__,
        numba=numba.__version__,
        torch=torch.__version__,
    )


def emit(result: dict, quiet: bool) -> None:
    """Human-readable summary unless quiet; the JSON object is always the last stdout line."""
    if not quiet:
        print(json.dumps(result, indent=2), file=sys.stderr)
    print(json.dumps(result))


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)
