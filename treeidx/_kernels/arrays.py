"""The records the kernels share: the tree's flat arrays, and per-query lists.

Every kernel that reads or writes the tree takes one `TreeArrays` whole (numba
passes a NamedTuple of arrays as cheaply as the arrays themselves), so a new
per-node statistic is one field here rather than one more argument in every
kernel and call site.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

DEAD = -2  # parent value of an unlinked node


class TreeArrays(NamedTuple):
    """The tree: slots (one target each) and nodes, in flat arrays.

    Node 0 is the root. Arrays are allocated with spare capacity; only the first
    n_slots slots and n_nodes nodes (held by TreeIndex) are meaningful.
    """

    vecs: np.ndarray  # (slot capacity, d) float32
    slot_id: np.ndarray  # (slot capacity,) int64 id stored in the slot (meaningless in a
    # free slot: ids may be negative, so no id value can mark one)
    slot_leaf: np.ndarray  # (slot capacity,) owning leaf; -1 marks a free slot. This alone
    # says whether a slot is live (check() verifies it for every slot)
    center: np.ndarray  # (node capacity, d) float32
    csq: np.ndarray  # ||center||^2, float64
    radius: np.ndarray  # >= max ||y - center|| over the subtree, float64
    nu_min: np.ndarray  # <= min ||y||
    nu_max: np.ndarray  # >= max ||y||
    sqsum: np.ndarray  # sum ||y - center||^2 (an estimate's input, not a bound)
    count: np.ndarray  # targets in the subtree, int64
    parent: np.ndarray  # int64, -1 root, DEAD unlinked
    first_child: np.ndarray  # int64, -1 none
    next_sibling: np.ndarray  # int64, -1 none
    leaf_start: np.ndarray  # int64, first slot of a leaf, -1 for internal nodes
    leaf_size: np.ndarray  # int64, used slots of a leaf
    leaf_cap: np.ndarray  # int64, reserved slots of a leaf
    node_lo: np.ndarray  # int64: the subtree's targets fill slots [node_lo, node_lo + count),
    # or -1 when they are not contiguous (see mutate.contiguous_ranges)


SLOT_FIELDS = ("vecs", "slot_id", "slot_leaf")  # indexed by slot; every other field by node


class Csr(NamedTuple):
    """One list per query: row b is values[ptr[b]:ptr[b + 1]] (excluded ids or slots)."""

    ptr: np.ndarray
    values: np.ndarray
