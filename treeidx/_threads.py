"""Safe concurrent launches of numba parallel kernels.

numba's `omp` and `tbb` threading layers accept parallel kernels launched from
several Python threads at once; the fallback `workqueue` layer aborts the process
instead. We serialise launches only when that fallback is the active layer.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

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


def run_parallel(kernel: Callable[..., Any], *args: Any) -> Any:
    """Call a parallel numba kernel; serialised when the layer is not thread-safe."""
    if _active_layer() in ("omp", "tbb"):
        return kernel(*args)
    with _launch_lock:
        return kernel(*args)
