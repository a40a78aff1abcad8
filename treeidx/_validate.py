"""Input checks shared by the public API: clear messages, nothing mutated on failure."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def as_vectors(x, dim: int | None, what: str = "vectors", allow_empty: bool = False) -> np.ndarray:
    """A C-contiguous float32 (n, dim) copy-or-view of x, finite, of the right width."""
    if hasattr(x, "detach"):  # torch tensors: leave autograd and the device behind
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{what}: cannot convert to a float32 array ({e})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating)
                                   or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what}: expected a real-valued numeric array, got dtype {arr.dtype}")
    if arr.ndim == 1 and dim is not None and arr.shape[0] == dim:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected a 2-d array (n, dim), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what}: expected dimension {dim}, got {arr.shape[1]}")
    if arr.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{what}: empty input (0 rows)")
    if arr.shape[1] == 0:
        raise ValueError(f"{what}: dimension must be >= 1")
    with np.errstate(over="ignore"):  # overflow to inf is reported just below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        raise ValueError(f"{what}: {bad.size} row(s) contain NaN or inf (first at row {bad[0]}); "
                         "all entries must be finite (also after conversion to float32)")
    return arr


def as_ids(ids, n: int | None, what: str = "ids") -> np.ndarray:
    """A 1-d int64 array of unique ids (of length n when given)."""
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-d array of integer ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{what}: expected integer ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{what}: expected {n} ids (one per vector), got {arr.shape[0]}")
    if arr.size > 1:
        s = np.sort(arr)
        dup = s[1:][s[1:] == s[:-1]]
        if dup.size:
            raise ValueError(f"{what}: duplicate id(s) {np.unique(dup)[:5].tolist()} (ids must be unique)")
    return np.ascontiguousarray(arr)


def as_exclude(exclude, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query id sets as CSR (ptr, sorted ids). None -> no exclusions."""
    ptr = np.zeros(n_queries + 1, np.int64)
    if exclude is None:
        return ptr, np.empty(0, np.int64)
    if hasattr(exclude, "detach"):
        exclude = exclude.detach().cpu().numpy()
    if isinstance(exclude, np.ndarray) and exclude.ndim == 2:
        rows: Sequence[Iterable[int]] = list(exclude)
    elif isinstance(exclude, np.ndarray) and exclude.ndim == 1 and n_queries == exclude.shape[0] \
            and np.issubdtype(exclude.dtype, np.integer):
        rows = [[int(v)] for v in exclude]  # one id per query (a positive)
    else:
        rows = list(exclude)
    if len(rows) != n_queries:
        raise ValueError(f"exclude: expected one id set per query ({n_queries}), got {len(rows)}")
    parts = []
    for b, r in enumerate(rows):
        if r is None:
            a = np.empty(0, np.int64)
        else:
            if hasattr(r, "detach"):
                r = r.detach().cpu().numpy()
            a = np.asarray(list(r) if isinstance(r, (set, frozenset)) else r)
            if a.ndim == 0:
                a = a[None]
            if a.size and not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"exclude[{b}]: expected integer ids, got dtype {a.dtype}")
            a = np.unique(a.astype(np.int64))
        parts.append(a)
        ptr[b + 1] = ptr[b] + a.size
    return ptr, (np.concatenate(parts) if parts else np.empty(0, np.int64))


def check_int(x, what: str, *, minimum: int) -> int:
    """An integer >= minimum (numpy integers too; bool rejected)."""
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{what}: expected {expected}, got {x!r}")
    return int(x)


def check_positive_int(x, what: str) -> int:
    """An integer >= 1: sizes, counts, steps."""
    return check_int(x, what, minimum=1)


def check_k(k, what: str = "k") -> int:
    """The number of results or samples per query."""
    return check_positive_int(k, what)


def check_positive(x, what: str) -> float:
    """A finite number > 0 (temperatures, inverse temperatures)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a finite positive number, got {x!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{what}: expected a finite positive number, got {x!r}")
    return v


def check_nonnegative_int(x, what: str = "seed") -> int:
    """An integer >= 0 (seeds, counts that may be 0); bool rejected."""
    return check_int(x, what, minimum=0)
