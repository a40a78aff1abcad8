"""Input checks shared by the public API: clear messages, nothing mutated on failure."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import numpy as np

from ._kernels.bounds import dot_error

INT64_MIN, INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)
FLOAT_EXACT_INT = 2**53  # floats above this in magnitude are not all integers: not taken as ids
# |<q, y>| <= ||q|| ||y||; a float32 dot product's partial sums exceed that by at most a
# factor 1 + d * 2^-24, so below half of float32's largest value no score can overflow
SCORE_LIMIT = float(np.finfo(np.float32).max) / 2
STORE_LIMIT = float(np.finfo(np.float32).max) / 4
# float32 rounding of one score, times beta, in nats: beyond this the rounding alone
# decides the softmax (and the sampler's float64 weights would underflow against it)
MAX_ROUNDING_NATS = 64.0


def _host(x):
    """numpy view of a torch tensor (detached, on the CPU; bf16 and other dtypes numpy
    lacks are widened to float32), anything else unchanged."""
    if hasattr(x, "detach"):  # torch tensors: leave autograd and the device behind
        t = x.detach().cpu()
        try:
            return t.numpy()
        except TypeError:  # e.g. bfloat16
            if t.is_floating_point():
                return t.float().numpy()
            raise ValueError(f"unsupported tensor dtype {t.dtype}") from None
    return x


def as_vectors(x, dim: int | None, what: str = "vectors", allow_empty: bool = False) -> np.ndarray:
    """A C-contiguous float32 (n, dim) copy-or-view of x, finite, of the right width."""
    x = _host(x)
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{what}: cannot convert to a float32 array ({e})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
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
        raise ValueError(
            f"{what}: {bad.size} row(s) contain NaN or inf (first at row {bad[0]}); "
            "all entries must be finite (also after conversion to float32)"
        )
    return arr


def to_int64(arr: np.ndarray, what: str) -> np.ndarray:
    """An integer-valued array as int64, refusing anything that would change a value:
    integers outside int64, non-integral floats, floats beyond 2**53 (not exact
    integers), booleans and non-numeric dtypes."""
    if arr.size == 0:
        return np.empty(arr.shape, np.int64)
    if arr.dtype == object:  # e.g. Python ints beyond 64 bits
        vals = arr.ravel().tolist()
        odd = [v for v in vals if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_))]
        if odd:
            raise ValueError(f"{what}: expected integer ids, got {type(odd[0]).__name__}")
        bad = [v for v in vals if not INT64_MIN <= int(v) <= INT64_MAX]
        if bad:
            raise ValueError(f"{what}: id {bad[0]} does not fit in int64 (ids must lie in [-2**63, 2**63))")
        return np.array([int(v) for v in vals], np.int64).reshape(arr.shape)
    kind = arr.dtype.kind
    if kind == "u":
        if int(arr.max()) > INT64_MAX:
            raise ValueError(f"{what}: id {int(arr.max())} does not fit in int64 (ids must lie in [-2**63, 2**63))")
        return arr.astype(np.int64)
    if kind == "i":
        return arr.astype(np.int64, copy=False)
    if kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise ValueError(f"{what}: expected integer ids, got the non-integral value {arr[bad].ravel()[0]!r}")
        big = np.abs(arr) > FLOAT_EXACT_INT
        if big.any():
            raise ValueError(
                f"{what}: float id {arr[big].ravel()[0]!r} is beyond 2**53, where floats "
                "are not exact integers (pass ids as an integer array)"
            )
        return arr.astype(np.int64)
    raise ValueError(f"{what}: expected integer ids, got dtype {arr.dtype}")


def as_ids(ids, n: int | None, what: str = "ids", unique: bool = True) -> np.ndarray:
    """A 1-d int64 array of ids (unique ones when `unique`; of length n when given)."""
    arr = _host(ids)
    try:
        arr = np.asarray(arr)
    except (OverflowError, ValueError, TypeError):
        arr = np.asarray(arr, dtype=object)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-d array of integer ids, got shape {arr.shape}")
    arr = to_int64(arr, what)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{what}: expected {n} ids (one per vector), got {arr.shape[0]}")
    if unique and arr.size > 1:
        s = np.sort(arr)
        dup = s[1:][s[1:] == s[:-1]]
        if dup.size:
            raise ValueError(f"{what}: duplicate id(s) {np.unique(dup)[:5].tolist()} (ids must be unique)")
    return np.ascontiguousarray(arr)


_EXCLUDE_FORMS = (
    "None, one id set per query (a sequence of iterables of ids, or a 2-d array), "
    "or a 1-d integer array holding one id per query"
)


def _looks_like_ids(x) -> bool:
    """A 0-d or 1-d integer array-like (torch tensors are inspected without a copy)."""
    if hasattr(x, "is_floating_point") and hasattr(x, "dim"):
        return x.dim() <= 1 and not x.is_floating_point() and not x.is_complex()
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    return a.ndim <= 1 and np.issubdtype(a.dtype, np.integer)


def vectors_then_ids(first, second, where: str) -> tuple:
    """(vectors, ids) from arguments in that order, as `build` and `insert` take them.

    The old (ids, vectors) order of `update`, `add` and `reencode` is recognised (integer
    ids first, floating vectors second), still served, and warned about.
    """
    if _looks_like_ids(first) and not _looks_like_ids(second):
        warnings.warn(
            f"{where}(ids, vectors) is deprecated: pass (vectors, ids), the order of build and insert",
            DeprecationWarning,
            stacklevel=3,
        )
        return second, first
    return first, second


def as_exclude(exclude, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query id sets as CSR (ptr, sorted ids). None -> no exclusions.

    Accepted: None; a sequence of n_queries id sets (iterables of ids, None for none); a
    2-d array (one row per query); a 1-d integer array of n_queries ids (one per query).
    A scalar is refused (TypeError): with one query, write [[id]] or [id].
    """
    ptr = np.zeros(n_queries + 1, np.int64)
    if exclude is None:
        return ptr, np.empty(0, np.int64)
    exclude = _host(exclude)
    if isinstance(exclude, (numbers.Number, np.generic, str, bytes)):
        raise TypeError(f"exclude: expected {_EXCLUDE_FORMS}; got {type(exclude).__name__}")
    if isinstance(exclude, np.ndarray):
        if exclude.ndim == 0:
            raise TypeError(f"exclude: expected {_EXCLUDE_FORMS}; got a 0-d array")
        if exclude.ndim > 2:
            raise ValueError(f"exclude: expected a 2-d array (one row of ids per query), got shape {exclude.shape}")
        if exclude.ndim == 1 and exclude.shape[0] == n_queries and exclude.dtype != object:
            rows: Sequence = [r for r in to_int64(exclude, "exclude")[:, None]]  # one id per query
        else:
            rows = list(exclude)
    else:
        try:
            rows = list(exclude)
        except TypeError:
            raise TypeError(f"exclude: expected {_EXCLUDE_FORMS}; got {type(exclude).__name__}") from None
    if len(rows) != n_queries:
        raise ValueError(f"exclude: expected one id set per query ({n_queries}), got {len(rows)}")
    parts = []
    for b, r in enumerate(rows):
        if r is None:
            a = np.empty(0, np.int64)
        else:
            r = _host(r)
            try:
                a = np.asarray(list(r) if isinstance(r, (set, frozenset)) else r)
            except (OverflowError, ValueError, TypeError):
                a = np.asarray(list(r), dtype=object)
            if a.ndim == 0:
                a = a[None]
            if a.ndim != 1:
                raise ValueError(f"exclude[{b}]: expected a 1-d set of ids, got shape {a.shape}")
            a = np.unique(to_int64(a, f"exclude[{b}]"))
        parts.append(a)
        ptr[b + 1] = ptr[b] + a.size
    return ptr, (np.concatenate(parts) if parts else np.empty(0, np.int64))


def check_bool(x, what: str) -> bool:
    """True or False (numpy booleans too), else a TypeError."""
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{what}: expected True or False, got {x!r}")
    return bool(x)


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


def check_number(x, what: str, *, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite real number >= minimum (> minimum when strict); bools and strings refused."""
    kind = f"a finite number {'>' if strict else '>='} {minimum:g}"
    if isinstance(x, (bool, np.bool_, str, bytes)) or not hasattr(x, "__float__"):
        raise ValueError(f"{what}: expected {kind}, got {x!r}")
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected {kind}, got {x!r}") from None
    if not math.isfinite(v) or v < minimum or (strict and v == minimum):
        raise ValueError(f"{what}: expected {kind}, got {x!r}")
    return v


def check_positive(x, what: str) -> float:
    """A finite number > 0 (temperatures, inverse temperatures)."""
    if isinstance(x, (bool, np.bool_, str, bytes)) or not hasattr(x, "__float__"):
        raise ValueError(f"{what}: expected a finite positive number, got {x!r}")
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


def check_integer(x, what: str) -> int:
    """A Python or numpy integer (bool and integral floats refused: 1.7 is not a node)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{what}: expected an integer, got {type(x).__name__} {x!r}")
    return int(x)


def check_seed(seed, what: str = "seed") -> int:
    """A seed: an integer in [0, 2**63) (TypeError for non-integers, ValueError outside)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{what}: expected an integer in [0, 2**63), got {type(seed).__name__} {seed!r}")
    if not 0 <= int(seed) <= INT64_MAX:
        raise ValueError(f"{what}: expected an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def check_storable(x: np.ndarray, what: str = "vectors") -> None:
    """Refuse vectors too long for the tree: node radii and norm bounds are kept as
    float32 values (rounded outward) and reach twice the largest norm."""
    if x.size == 0:
        return
    n = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    b = int(np.argmax(n))
    if n[b] > STORE_LIMIT:
        raise ValueError(
            f"{what}: row {b} has norm {n[b]:.3g}; stored vectors need norm <= "
            f"{STORE_LIMIT:.3g} (their bounds are kept in float32)"
        )


def check_score_range(q: np.ndarray, nu_max: float, what: str = "queries", beta: float | None = None) -> None:
    """Refuse queries whose inner products with the stored targets (norms <= nu_max) could
    overflow float32, or, when beta is given, whose float32 rounding error alone could
    move a softmax weight by more than MAX_ROUNDING_NATS."""
    if q.shape[0] == 0 or not nu_max > 0:
        return
    qn = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
    b = int(np.argmax(qn))
    if qn[b] * nu_max > SCORE_LIMIT:
        raise ValueError(
            f"{what}: row {b} has norm {qn[b]:.3g}; with stored vectors of norm up to "
            f"{nu_max:.3g} its inner products can overflow float32 (||q|| * max ||y|| "
            f"must stay below {SCORE_LIMIT:.3g})"
        )
    if beta is not None:
        nats = beta * dot_error(q.shape[1], float(qn[b]), float(nu_max))
        if not nats <= MAX_ROUNDING_NATS:
            raise ValueError(
                f"{what}: row {b} has norm {qn[b]:.3g}; with stored vectors of norm up to "
                f"{nu_max:.3g} and 1/temperature = {beta:.3g}, float32 rounding of a score "
                f"can move its log-weight by {nats:.3g} (limit {MAX_ROUNDING_NATS:g}): the "
                "float32 scores cannot resolve the softmax; scale the vectors down or "
                "raise the temperature"
            )
