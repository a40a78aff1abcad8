"""Certified bounds on <q, y> over the targets y below a tree node.

A node stores its center c, ||c||^2, a radius R >= max ||y - c|| and the range
[nu_min, nu_max] of ||y|| over its targets. `node_bounds` returns the tighter, on each
side, of the Cauchy-Schwarz bound and the norm + triangle-inequality bound (the
spherical-cap bound for unit vectors); docs/sampling.md derives both. The float32
<q, c> is first widened by a rigorous rounding margin (`dot_error`): a bound must
never be violated by rounding.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

# Unit roundoff of float32; gamma_n = n u / (1 - n u) bounds a length-n dot product error.
F32_EPS = float(np.finfo(np.float32).eps) / 2.0


@nb.njit(cache=True, inline="always")
def dot_error(dim: int, qnorm: float, cnorm: float) -> float:
    """Upper bound on |fl32(<q, c>) - <q, c>| for a float32 sequential dot product."""
    nu = (dim + 2) * F32_EPS
    return 2.0 * nu / (1.0 - nu) * qnorm * cnorm + 1e-30


@nb.njit(cache=True, inline="always")
def node_bounds(
    dot: float, qnorm: float, csq: float, radius: float, nu_min: float, nu_max: float, dim: int
) -> tuple[float, float]:
    """Lower and upper bound of <q, y> over every target y below the node.

    dot   -- <q, c> as computed in float32
    qnorm -- ||q|| (float64)
    csq   -- ||c||^2 (float64)
    """
    cnorm = math.sqrt(csq)
    err = dot_error(dim, qnorm, cnorm)
    a_hi = dot + err
    a_lo = dot - err
    # Cauchy-Schwarz, and the trivial |<q, y>| <= ||q|| nu_max.
    upper = min(a_hi + qnorm * radius, qnorm * nu_max)
    lower = max(a_lo - qnorm * radius, -qnorm * nu_max)
    if qnorm > 0.0 and nu_max > 0.0:
        t = nu_max / qnorm
        # ||t q - c||^2 = nu_max^2 - 2 t <q, c> + ||c||^2, taken at its smallest
        # (upper bound) and largest (lower bound) over the rounding interval of dot.
        d2_small = nu_max * nu_max - 2.0 * t * a_hi + csq
        d2_large = nu_max * nu_max - 2.0 * t * a_lo + csq
        d_small = math.sqrt(max(d2_small, 0.0))
        d_large = math.sqrt(max(d2_large, 0.0))
        near = max(d_small - radius, 0.0)
        far = d_large + radius
        up2 = (2.0 * nu_max * nu_max - near * near) / (2.0 * t)
        lo2 = (nu_max * nu_max + nu_min * nu_min - far * far) / (2.0 * t)
        # The algebra above is in float64 on float64 inputs: pad by a relative
        # margin far above its rounding error.
        pad = 1e-12 * (nu_max * nu_max + far * far) / t
        upper = min(upper, up2 + pad)
        lower = max(lower, lo2 - pad)
    return lower, upper


# reassoc lets LLVM vectorise the reduction; the gamma_n error bound above holds
# for any summation order, and contract (FMA) only makes it more accurate. Use it
# only in such reductions: in running sums with cancellation (the sampler's
# frontier totals) reassociation silently destroys precision.
FAST = {"reassoc", "contract"}


# Not IR-inlined on purpose: numba would compile the body with the caller's
# (strict) flags; LLVM still inlines it and keeps these fast-math flags.
@nb.njit(cache=True, fastmath=FAST)
def dot32(a: np.ndarray, b: np.ndarray) -> float:
    """float32 dot product of two 1-d float32 arrays (vectorised by LLVM)."""
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@nb.njit(cache=True, inline="always")
def squared_norm(q) -> float:
    """||q||^2 of a float32 vector, summed in float64."""
    s = 0.0
    for t in range(q.shape[0]):
        s += float(q[t]) * float(q[t])
    return s


@nb.njit(cache=True, inline="always")
def node_bounds_of(T, v: int, dot: float, qnorm: float) -> tuple[float, float]:
    """node_bounds of tree node v (T: TreeArrays) for a query with <q, c_v> = dot."""
    return node_bounds(dot, qnorm, T.csq[v], T.radius[v], T.nu_min[v], T.nu_max[v], T.center.shape[1])


@nb.njit(cache=True, parallel=True, nogil=True)
def top_level_bounds(T, queries, top_dots, top_nodes, out_lo, out_up):
    """Certified bounds of <q, y> below each top-level node, for every query."""
    for b in nb.prange(queries.shape[0]):
        qnorm = math.sqrt(squared_norm(queries[b]))
        for j in range(top_nodes.shape[0]):
            out_lo[b, j], out_up[b, j] = node_bounds_of(T, top_nodes[j], top_dots[b, j], qnorm)


@nb.njit(cache=True, parallel=True, nogil=True)
def level_bounds(T, queries, centers, nodes, out_dots, out_lo, out_up):
    """For every query: <q, c> (float32) of each node in `nodes` (centers: their
    centers, contiguous) and the certified bounds of <q, y> below it; one launch."""
    for b in nb.prange(queries.shape[0]):
        qnorm = math.sqrt(squared_norm(queries[b]))
        for j in range(nodes.shape[0]):
            a = dot32(queries[b], centers[j])
            out_dots[b, j] = a
            out_lo[b, j], out_up[b, j] = node_bounds_of(T, nodes[j], a, qnorm)
