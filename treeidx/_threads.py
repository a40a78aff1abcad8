"""Launching numba parallel kernels without side effects on the caller's threads.

Two things to get right:

* numba's `omp` and `tbb` threading layers accept parallel kernels launched from
  several Python threads at once; the fallback `workqueue` layer aborts the process
  instead. We serialise launches only when that fallback is the active layer.
* The `omp` layer sets the calling thread's OpenMP thread count to numba's own at
  every launch. PyTorch's CPU build reads the same OpenMP setting, so a training
  loop that chose `torch.set_num_threads(1)` (say, to leave a core to treeidx) would
  silently find torch back on every core after the first index build or sample,
  competing with the sampler. We put torch's count back after each launch.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numba

_launch_lock = threading.Lock()
_layer: str | None = None


def _active_layer() -> str:
    global _layer
    if _layer is None:
        try:
            _layer = numba.threading_layer()
        except ValueError:  # no parallel kernel has run yet
            return "unknown"
    return _layer


@contextmanager
def _keep_torch_threads() -> Iterator[None]:
    """Put torch's intra-op thread count back as it was when the block started."""
    torch = sys.modules.get("torch")  # only if the caller uses torch; never imported here
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if before is not None and torch.get_num_threads() != before:
            torch.set_num_threads(before)


def run_parallel(kernel: Callable[..., Any], *args: Any) -> Any:
    """Call a parallel numba kernel; serialised when the layer is not thread-safe, and
    leaving torch's intra-op thread count as the caller had it."""
    with _keep_torch_threads():
        if _active_layer() in ("omp", "tbb"):
            return kernel(*args)
        with _launch_lock:
            return kernel(*args)


@contextmanager
def numba_threads(n: int | None) -> Iterator[None]:
    """Run the block with n numba threads in this thread (None: leave it), then put
    back numba's count and torch's (querying numba's pool resets OpenMP's count too)."""
    if n is None:
        yield
        return
    with _keep_torch_threads():
        before = numba.get_num_threads()  # per calling thread
        numba.set_num_threads(n)
        try:
            yield
        finally:
            numba.set_num_threads(before)
