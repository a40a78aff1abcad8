"""Counter-based random numbers: the same stream whatever the number of threads.

A draw is a hash of (key, counter) rather than the next state of a generator, so a
kernel can give every query, node or sample its own stream by its index alone.
"""

from __future__ import annotations

import numba as nb
import numpy as np

U64 = nb.uint64


@nb.njit(cache=True, inline="always")
def mix64(z: np.uint64) -> np.uint64:
    """splitmix64's finaliser: a fixed bijective 64-bit mixer, the same in every process."""
    z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
    return z ^ (z >> U64(31))


@nb.njit(cache=True, inline="always")
def splitmix64(x: np.uint64) -> np.uint64:
    """The splitmix64 output for state x: a hash of x good enough to drive sampling."""
    return mix64(x + U64(0x9E3779B97F4A7C15))


@nb.njit(cache=True, inline="always")
def uniform01(state: np.uint64) -> float:
    """Uniform in [0, 1) from the top 53 bits of a hashed counter."""
    return float(splitmix64(state) >> U64(11)) * (1.0 / 9007199254740992.0)
