"""TreeIndex: a cover-tree-style hierarchy over target vectors in flat arrays.

Layout (`TreeArrays`, _kernels/arrays.py): node 0 is the root; its children are a wide
k-means top level (~2 sqrt N clusters, as in IVF); below them, recursive k-means
splits down to leaf buckets. Every node stores a center, a radius that bounds
the distance from the center to every target below it, the range of target
norms below it, and the count of targets below it. Leaves own contiguous slot
ranges of the vector array. These are the quantities the certified bounds of
`_kernels/bounds.py` (and the softmax sampler) rely on; `check()` verifies them.
Code built on the structure reads it through `view()` (a read-only `TreeView`).

Concurrency: any number of threads may call the read methods (`search`,
`vectors`, sampling) at once. Writes (`insert`, `remove`, `update`, `rebuild`)
are exclusive: do not run them while another thread reads or writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _build
from ._csr import concat_ranges, permute_rows, slice_rows
from ._kernels import mutate as _mutate
from ._kernels.arrays import SLOT_FIELDS, Csr, TreeArrays
from ._kernels.bounds import top_level_bounds
from ._kernels.build import pad_up
from ._kernels.search import (
    GROUP_CHUNKS,
    Group,
    PartialTopK,
    TopK,
    merge_topk,
    search_batch,
    search_best_cluster,
    search_groups,
)
from ._progress import stage_reporter
from ._threads import run_parallel
from ._validate import (
    as_exclude,
    as_ids,
    as_vectors,
    check_int,
    check_integer,
    check_k,
    check_score_range,
    check_seed,
    check_storable,
    vectors_then_ids,
)
from ._version import __version__
from .cluster import assign_nearest, kmeans
from .io import IndexFileError, read_index_file, write_index_file

_DEFAULT_SHAPE = dict(leaf_size=32, fanout=4, top_fanout=None, kmeans_iters=6)
_SEED_MASK = 2**63 - 1  # derived seeds (seed + counter) stay in the kernels' int64 range


@dataclass(frozen=True)
class SearchWork:
    """Per-query work of one `TreeIndex.search` call (B,) each: tree nodes visited and
    target inner products computed (a brute-force search computes N per query)."""

    nodes_visited: np.ndarray
    inner_products: np.ndarray


def check_shape_options(opts: dict) -> dict:
    """The tree shape options of `TreeIndex.build` with defaults filled in; ValueError
    naming the option when one is unknown or out of range."""
    unknown = set(opts) - set(_DEFAULT_SHAPE)
    if unknown:
        raise ValueError(f"unknown shape option(s) {sorted(unknown)}; expected {sorted(_DEFAULT_SHAPE)}")
    shape = {**_DEFAULT_SHAPE, **opts}
    for name in ("leaf_size", "fanout", "kmeans_iters"):
        check_int(shape[name], name, minimum=2 if name == "fanout" else 1)
    if shape["top_fanout"] is not None and (
        not isinstance(shape["top_fanout"], (int, np.integer)) or shape["top_fanout"] < 1
    ):
        raise ValueError(f"top_fanout: expected a positive integer or None, got {shape['top_fanout']!r}")
    return shape


class InvariantError(RuntimeError):
    """A tree invariant does not hold (raised by `TreeIndex.check`)."""


class TreeIndex:
    """Exact maximum-inner-product index over float32 target vectors with int64 ids.

    Build with `TreeIndex.build(vectors, ids)`. Shape options (keyword arguments
    of `build`): `leaf_size` (max targets per leaf at build, default 32; leaves
    may grow to 2x before they split), `fanout` (k-means split width below the
    top level, default 4), `top_fanout` (number of top-level clusters, default
    ~2 sqrt N; with 64 or more they are grouped under ~sqrt(top_fanout) region
    nodes), `kmeans_iters` (default 6).
    """

    # ------------------------------------------------------------------ build
    def __init__(
        self,
        *,
        _arrays: TreeArrays,
        _keys: np.ndarray,
        _key_slot: np.ndarray,
        _n_slots: int,
        _n_nodes: int,
        _dead_slots: int,
        _shape: dict,
        _seed: int,
    ):
        self._A = _arrays
        self._keys = _keys
        self._key_slot = _key_slot
        self._n_slots = _n_slots
        self._n_nodes = _n_nodes
        self._dead_slots = _dead_slots
        self._shape = dict(_shape)
        self._seed = int(_seed)
        self._mutations = 0  # varies the split seeds of successive inserts
        self._version = 0  # see `version`
        self._top: dict | None = None  # see _top_level()

    @classmethod
    def build(cls, vectors, ids=None, *, seed: int = 0, progress: bool = False, **shape_options: Any) -> TreeIndex:
        """Build an index over `vectors` (N x d, converted to float32).

        ids: N unique integers in int64's range (default 0..N-1); integral floats up to
        2**53 are accepted, anything that would change a value is refused (ValueError).
        seed: an integer in [0, 2**63); the build is deterministic given it.
        progress: print build stages to stderr (a tqdm bar when tqdm is installed).
        """
        shape = check_shape_options(shape_options)
        seed = check_seed(seed)
        x = as_vectors(vectors, None, "vectors")
        check_storable(x)
        ids_arr = np.arange(x.shape[0], dtype=np.int64) if ids is None else as_ids(ids, x.shape[0])
        return cls._from_data(x, ids_arr, shape, seed, progress)

    @classmethod
    def _from_data(cls, x: np.ndarray, ids: np.ndarray, shape: dict, seed: int, progress: bool) -> TreeIndex:
        say = stage_reporter(progress, "build")
        t = _build.build_arrays(
            x,
            leaf_size=shape["leaf_size"],
            fanout=shape["fanout"],
            top_fanout=shape["top_fanout"],
            kmeans_iters=shape["kmeans_iters"],
            seed=seed,
            progress=say,
        )
        say(None)
        n = x.shape[0]
        slot_leaf = np.full(n, -1, np.int32)
        leaves = np.flatnonzero(t["leaf_start"] >= 0)
        slot_leaf[concat_ranges(t["leaf_start"][leaves], t["leaf_size"][leaves])] = np.repeat(
            leaves, t["leaf_size"][leaves]
        ).astype(np.int32)
        slot_id = ids[t["perm"]]
        order = np.argsort(slot_id, kind="stable")
        A = TreeArrays(
            vecs=t["vecs"],
            slot_id=slot_id,
            slot_leaf=slot_leaf,
            center=t["center"],
            csq=t["csq"],
            radius=t["radius"],
            nu_min=t["nu_min"],
            nu_max=t["nu_max"],
            sqsum=t["sqsum"],
            count=t["count"].astype(np.int64),
            parent=t["parent"],
            first_child=t["first_child"],
            next_sibling=t["next_sibling"],
            leaf_start=t["leaf_start"].astype(np.int64),
            leaf_size=t["leaf_size"].astype(np.int64),
            leaf_cap=t["leaf_cap"].astype(np.int64),
            node_lo=t["lo"].astype(np.int64),
        )
        return cls(
            _arrays=A,
            _keys=slot_id[order].copy(),
            _key_slot=order.astype(np.int64),
            _n_slots=n,
            _n_nodes=t["center"].shape[0],
            _dead_slots=0,
            _shape=shape,
            _seed=seed,
        )

    # --------------------------------------------------------------- accessors
    def __len__(self) -> int:
        return int(self._keys.shape[0])

    @property
    def dim(self) -> int:
        """Dimension of the target vectors."""
        return int(self._A.vecs.shape[1])

    @property
    def ids(self) -> np.ndarray:
        """All stored ids, sorted ascending (a copy)."""
        return self._keys.copy()

    @property
    def max_leaf(self) -> int:
        return 2 * self._shape["leaf_size"]

    def __contains__(self, idv: int) -> bool:
        try:
            key = as_ids(idv, 1)[0]
        except (ValueError, TypeError):
            return False  # not an id at all (out of int64, non-integral, ...)
        i = np.searchsorted(self._keys, key)
        return bool(i < self._keys.shape[0] and self._keys[i] == key)

    def vectors(self, ids) -> np.ndarray:
        """The stored float32 vectors of `ids` (KeyError for unknown ids)."""
        slots = self._slots_of(as_ids(ids, None, unique=False))
        return self._A.vecs[slots].copy()

    def _slots_of(self, ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self._keys, ids)
        pos_c = np.minimum(pos, max(self._keys.shape[0] - 1, 0))
        found = (
            (pos < self._keys.shape[0]) & (self._keys[pos_c] == ids) if self._keys.size else np.zeros(ids.shape, bool)
        )
        if not found.all():
            missing = ids[~found]
            raise KeyError(f"{missing.size} unknown id(s), e.g. {missing[:5].tolist()}")
        return self._key_slot[pos_c]

    def __repr__(self) -> str:
        return (
            f"TreeIndex(n={len(self)}, dim={self.dim}, nodes={self._live_nodes()}, "
            f"leaf_size={self._shape['leaf_size']}, fanout={self._shape['fanout']}, "
            f"root_children={self._top_count()})"
        )

    def _live_nodes(self) -> int:
        return int(np.count_nonzero(self._A.parent[: self._n_nodes] != _mutate.DEAD))

    def _top_count(self) -> int:
        c, n = self._A.first_child[0], 0
        while c >= 0:
            n += 1
            c = self._A.next_sibling[c]
        return n

    def stats(self) -> dict:
        """Shape figures: depth, fan-out, leaf sizes, radii by level, memory."""
        A, m = self._A, self._n_nodes
        live = np.flatnonzero(A.parent[:m] != _mutate.DEAD)
        depth = _depths(A.parent[:m], live)
        leaves = live[A.leaf_start[live] >= 0]
        internal = live[A.leaf_start[live] < 0]
        nchild = np.bincount(A.parent[live[1:]], minlength=m)[internal] if live.size > 1 else np.zeros(0)
        levels = []
        for lvl in range(int(depth[live].max()) + 1 if live.size else 0):
            at = live[depth[live] == lvl]
            r = A.radius[at]
            levels.append(dict(level=lvl, nodes=int(at.size), radius_mean=float(r.mean()), radius_max=float(r.max())))
        return dict(
            n=len(self),
            dim=self.dim,
            nodes=int(live.size),
            leaves=int(leaves.size),
            depth=int(depth[leaves].max()) if leaves.size else 0,
            mean_leaf_depth=float(depth[leaves].mean()) if leaves.size else 0.0,
            root_children=self._top_count(),
            clusters=int(self._top_level(expand=True)[0].shape[0]),
            fanout_mean=float(nchild.mean()) if nchild.size else 0.0,
            fanout_max=int(nchild.max()) if nchild.size else 0,
            leaf_size_mean=float(A.leaf_size[leaves].mean()) if leaves.size else 0.0,
            leaf_size_max=int(A.leaf_size[leaves].max()) if leaves.size else 0,
            dead_slots=int(self._dead_slots),
            radii_by_level=levels,
            bytes=self.nbytes,
            bytes_per_target=self.nbytes / max(len(self), 1),
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the index arrays (vectors included)."""
        return int(sum(a.nbytes for a in self._A) + self._keys.nbytes + self._key_slot.nbytes)

    # ------------------------------------------------------------------ search
    def search(self, queries, k: int, exclude=None, *, return_work: bool = False):
        """Exact top-k by inner product.

        queries: (B, d) or (d,) array-like (numpy or torch; bf16 is widened). exclude:
        None, or one id set per query (a sequence of B iterables, a (B, m) array, or a (B,)
        integer array of one id each); unknown ids are ignored; a scalar raises TypeError.
        Returns (scores (B, k) float32, descending; ids (B, k) int64), and with
        return_work=True a third item, `SearchWork`: per-query nodes visited and inner
        products computed.
        ValueError when a query's norm times the largest stored norm could overflow float32,
        and when k exceeds a query's allowed targets: an exact search has k answers or the
        call is wrong (FAISS pads with id -1 instead, which then flows unnoticed into id
        lookups and training batches).
        """
        q = as_vectors(queries, self.dim, "queries")
        k = check_k(k)
        ptr, ex = as_exclude(exclude, q.shape[0])
        self._check_k_fits(k, ptr, ex)
        check_score_range(q, float(self._A.nu_max[0]), "queries")
        top_nodes, top_centers, top_region = self._top_level(expand=True)
        top_dots = q @ top_centers.T  # one BLAS product scores the wide cluster level
        # Queries of one region read the same leaves: run them back to back so
        # those leaves are still in cache (results are put back in input order).
        order = locality_order(top_dots, top_region)
        q, top_dots = q[order], top_dots[order]
        ptr, ex = permute_rows(ptr, ex, order)
        scores = np.empty((q.shape[0], k), np.float32)
        out_ids = np.empty((q.shape[0], k), np.int64)
        visited = np.empty(q.shape[0], np.int64)
        dots = np.empty(q.shape[0], np.int64)
        A = self._A
        if q.shape[0] >= GROUP_MIN_QUERIES and k <= GROUP_MAX_K and top_nodes.shape[0] > 1:
            for lo in range(0, q.shape[0], GROUP_BLOCK):
                hi = min(lo + GROUP_BLOCK, q.shape[0])
                self._search_grouped(
                    q[lo:hi],
                    k,
                    top_nodes,
                    top_dots[lo:hi],
                    *slice_rows(ptr, ex, lo, hi),
                    scores[lo:hi],
                    out_ids[lo:hi],
                    visited[lo:hi],
                    dots[lo:hi],
                )
        else:
            run_parallel(search_batch, A, q, k, top_nodes, top_dots, Csr(ptr, ex), TopK(scores, out_ids, visited, dots))
        inv = np.empty_like(order)
        inv[order] = np.arange(order.shape[0])
        if return_work:
            return scores[inv], out_ids[inv], SearchWork(visited[inv], dots[inv])
        return scores[inv], out_ids[inv]

    def _search_grouped(self, q, k, top_nodes, top_dots, ptr, ex, scores, out_ids, visited, dots) -> None:
        """Exact top-k for a block of queries, sharing leaf reads between them (_search.py)."""
        A, B = self._A, q.shape[0]
        lo_b = np.empty(top_dots.shape, np.float64)
        up_b = np.empty(top_dots.shape, np.float64)
        run_parallel(top_level_bounds, A, q, top_dots, top_nodes, lo_b, up_b)
        # the nearest centers: most likely to hold the top-k
        m = min(GROUP_FIRST_CLUSTERS, top_nodes.shape[0])
        best = (
            np.argpartition(-top_dots, m - 1, axis=1)[:, :m]
            if m < top_nodes.shape[0]
            else np.broadcast_to(np.arange(m), (B, m))
        )
        best = np.ascontiguousarray(best, dtype=np.int64)
        a_scores = np.empty((B, k), np.float32)
        a_ids = np.empty((B, k), np.int64)
        excl = Csr(ptr, ex)
        run_parallel(
            search_best_cluster, A, q, k, best, top_nodes, top_dots, excl, TopK(a_scores, a_ids, visited, dots)
        )
        # every other cluster, for the queries whose bound there beats their k-th score so far
        kth = np.ascontiguousarray(a_scores[:, k - 1])
        need = up_b > kth[:, None]
        need[np.arange(B)[:, None], best] = False
        cl, qs = np.nonzero(need.T)  # cluster-major: each cluster's queries are contiguous
        cand_ptr = np.zeros(top_nodes.shape[0] + 1, np.int64)
        np.cumsum(np.bincount(cl, minlength=top_nodes.shape[0]), out=cand_ptr[1:])
        qnorm = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
        parts = PartialTopK(
            scores=np.full((GROUP_CHUNKS, B, k), -np.inf, np.float32),
            ids=np.full((GROUP_CHUNKS, B, k), -1, np.int64),
            fill=np.zeros((GROUP_CHUNKS, B), np.int64),
            visited=np.zeros((GROUP_CHUNKS, B), np.int64),
            dots=np.zeros((GROUP_CHUNKS, B), np.int64),
        )
        run_parallel(
            search_groups, A, Group(q, qnorm, kth), k, top_nodes, Csr(cand_ptr, qs.astype(np.int64)), excl, parts
        )
        run_parallel(merge_topk, TopK(a_scores, a_ids, visited, dots), parts, scores, out_ids)
        visited += parts.visited.sum(axis=0)
        dots += parts.dots.sum(axis=0)

    def _top_level(self, expand: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The root's children (expand=False; the sampler opens these per query), or the
        level below them (expand=True: every internal child replaced by its children;
        search scores these globally, since the root's children are coarse regions),
        with a contiguous copy of their centers and a coarse label per node for ordering
        queries by locality (k-means of the centers). Cached until a write."""
        top = self._top  # one read: a write may reset the cache meanwhile
        if top is None:
            top = self._top = {}
        if expand not in top:
            nodes = _children(self._A, 0)
            if expand:
                nodes = [c for v in nodes for c in (_children(self._A, v) or [v])]
            nodes = np.array(nodes, dtype=np.int64)
            centers = np.ascontiguousarray(self._A.center[nodes])
            n_regions = max(1, nodes.shape[0] // 32)
            region = kmeans(centers, n_regions, self._seed)[1] if nodes.size else nodes
            top[expand] = (nodes, centers, region)
        return top[expand]

    def _check_k_fits(self, k: int, ptr: np.ndarray, ex: np.ndarray) -> None:
        n = len(self)
        if n == 0:
            raise ValueError("the index is empty")
        present = np.isin(ex, self._keys)
        # excluded ids present, per query: differences of a running count (empty rows
        # anywhere, trailing ones included, count 0)
        running = np.concatenate(([0], np.cumsum(present, dtype=np.int64)))
        per_query = running[ptr[1:]] - running[ptr[:-1]]
        allowed = n - per_query
        if (k > allowed).any():
            b = int(np.argmax(k > allowed))
            raise ValueError(
                f"k={k} is larger than the {int(allowed[b])} targets available to "
                f"query {b} (index size {n}, {int(per_query[b])} excluded)"
            )

    # ------------------------------------------------------------------ writes
    # Every write either completes or leaves the index as it was (same ids, vectors and
    # search results; `check()` passes): inputs are validated and the first capacity
    # reserved before anything changes, and a failure while the arrays grow in the middle
    # of a batch (MemoryError) undoes the rows placed so far.

    @property
    def version(self) -> int:
        """A counter that every write (insert, remove, update, rebuild, compact) increases.
        A reader that runs in the background compares it before and after to detect a
        write it raced with (`treeidx.torch.TreeNegativeSampler` does)."""
        return self._version

    def _begin_write(self) -> None:
        self._version += 1
        self._top = None

    def insert(self, vectors, ids) -> None:
        """Add targets. ids must be new and unique; nothing changes if any input is bad
        or the arrays cannot grow (MemoryError)."""
        x = as_vectors(vectors, self.dim, "vectors")
        check_storable(x)
        ids_arr = as_ids(ids, x.shape[0])
        present = np.isin(ids_arr, self._keys)
        if present.any():
            raise ValueError(
                f"{int(present.sum())} id(s) already in the index, e.g. "
                f"{ids_arr[present][:5].tolist()}; use update() to move them"
            )
        self._reserve_rows(x.shape[0])
        # the id map stays sorted only if the new ids go in ascending order: ids that
        # share an insertion position keep the order they are given in
        new = np.sort(ids_arr)
        pos = np.searchsorted(self._keys, new)
        keys, key_slot = np.insert(self._keys, pos, new), np.insert(self._key_slot, pos, -1)
        self._begin_write()
        self._keys, self._key_slot = keys, key_slot
        self._place_rows(x, ids_arr, None)

    def update(self, vectors, ids) -> None:
        """Move existing targets (`ids`) to new `vectors`; the tree is repaired locally.

        Each target is removed from its leaf and re-inserted along the path of
        nearest centers, widening radii on the way, so every bound stays true.
        Unknown ids raise KeyError; on any failure nothing changes. The arguments come
        in the order of `build` and `insert`; the old (ids, vectors) order still works
        with a DeprecationWarning.
        """
        vectors, ids = vectors_then_ids(vectors, ids, "update")
        ids_arr = as_ids(ids, None)
        x = as_vectors(vectors, self.dim, "vectors")
        check_storable(x)
        if x.shape[0] != ids_arr.shape[0]:
            raise ValueError(f"update: {ids_arr.shape[0]} ids but {x.shape[0]} vectors")
        old = self._A.vecs[self._slots_of(ids_arr)]  # KeyError before anything changes
        self._reserve_rows(x.shape[0])
        self._begin_write()
        self._place_rows(x, ids_arr, old)

    def _reserve_rows(self, rows: int) -> None:
        """Capacity for the next insert_batch call over `rows` remaining rows."""
        self._reserve(
            slots=self._n_slots + 2 * self.max_leaf + 2 + rows,
            nodes=self._n_nodes + self._shape["fanout"] + 2 + rows // 8,
        )

    def _place_rows(self, x: np.ndarray, ids: np.ndarray, old: np.ndarray | None) -> None:
        """Place rows whose ids are keys already: new targets (old None), or moved ones
        (old: their current vectors; each is removed just before its new row goes in).
        The arrays grow between kernel calls; if growing fails, the rows placed so far
        are undone and the error re-raised."""
        shp = self._shape
        self._mutations += 1
        top_nodes, top_centers, _ = self._top_level()
        # the nearest top-level cluster of every row in one BLAS pass (the kernel would
        # otherwise compare each row with all ~2 sqrt N top-level centers one by one)
        top_choice = top_nodes[assign_nearest(x, top_centers)] if top_nodes.size else np.full(x.shape[0], -1, np.int64)
        self._top = None
        done = 0
        try:
            while done < x.shape[0]:
                self._reserve_rows(x.shape[0] - done)
                done, self._n_slots, self._n_nodes, self._dead_slots = _mutate.insert_batch(
                    self._A,
                    self._keys,
                    self._key_slot,
                    _mutate.NewRows(x, ids, top_choice),
                    done,
                    0,
                    self._n_slots,
                    self._n_nodes,
                    self._dead_slots,
                    _mutate.LeafShape(shp["fanout"], self.max_leaf, (self._seed + self._mutations) & _SEED_MASK),
                    old is not None,
                )
        except BaseException:
            self._undo_rows(ids, old, done)
            raise
        self._maybe_compact()

    def _undo_rows(self, ids: np.ndarray, old: np.ndarray | None, done: int) -> None:
        """Undo the first `done` rows of an interrupted _place_rows (allocation-free kernels)."""
        A = self._A
        if old is None:  # new ids: remove those placed, drop every new key
            self._dead_slots = _mutate.remove_batch(A, self._keys, self._key_slot, ids[:done], 0, self._dead_slots)
            keep = self._key_slot >= 0
            self._keys, self._key_slot = self._keys[keep], self._key_slot[keep]
        else:  # moved ids: rows not reached still hold their old vectors
            _mutate.restore_vectors(A, self._keys, self._key_slot, ids[:done], old[:done])
        self._top = None
        _mutate.contiguous_ranges(A, 0, self._n_nodes)

    def remove(self, ids) -> None:
        """Remove targets by id (KeyError if any is unknown; nothing changes then)."""
        ids_arr = as_ids(ids, None)
        if ids_arr.size == 0:
            raise ValueError("remove: empty input (0 ids)")
        self._slots_of(ids_arr)  # raises KeyError before anything changes
        keep = np.ones(self._keys.shape[0], bool)
        keep[np.searchsorted(self._keys, ids_arr)] = False
        keys = self._keys[keep]
        key_slot = np.empty(keys.shape[0], np.int64)  # allocated before anything changes
        self._begin_write()
        self._dead_slots = _mutate.remove_batch(self._A, self._keys, self._key_slot, ids_arr, 0, self._dead_slots)
        np.compress(keep, self._key_slot, out=key_slot)
        self._keys, self._key_slot = keys, key_slot
        self._maybe_compact()

    def rebuild(self, node: int | None = None, *, progress: bool = False) -> None:
        """Rebuild the whole tree (node=None or 0), or the subtree below `node`.

        A subtree rebuild re-clusters the targets below `node` from scratch and
        tightens that node's radius; nodes elsewhere keep their indices. `node` must
        be an integer naming a live node (TypeError / ValueError otherwise).
        """
        if node is not None:
            node = check_integer(node, "node")
        if node is None or node == 0:
            if len(self) == 0:
                raise ValueError("cannot rebuild an empty index")
            slots = self._key_slot
            fresh = TreeIndex._from_data(self._A.vecs[slots], self._keys.copy(), self._shape, self._seed, progress)
            version, mutations = self._version, self._mutations
            self.__dict__.update(fresh.__dict__)
            self._version, self._mutations = version + 1, mutations
            return
        if not (0 < node < self._n_nodes) or self._A.parent[node] == _mutate.DEAD:
            raise ValueError(f"rebuild: node {node} is not a live node of this index")
        self._rebuild_subtree(node)

    def _rebuild_subtree(self, v: int) -> None:
        A = self._A
        out = np.empty(int(A.count[v]), np.int64)
        n = _mutate.subtree_slots(A, v, out)
        slots = out[:n]
        x, ids = A.vecs[slots].copy(), A.slot_id[slots].copy()
        sub = _build.build_arrays(
            x,
            leaf_size=self._shape["leaf_size"],
            fanout=self._shape["fanout"],
            top_fanout=self._shape["fanout"],
            kmeans_iters=self._shape["kmeans_iters"],
            seed=(self._seed + v) & _SEED_MASK,
        )
        m = sub["center"].shape[0]
        self._reserve(slots=self._n_slots + n, nodes=self._n_nodes + m)
        A = self._A
        # everything derived from the new subtree is computed before the tree changes
        old, stack = [], _children(A, v)
        while stack:
            u = stack.pop()
            old.append(u)
            stack.extend(_children(A, u))
        base, sbase = self._n_nodes - 1, self._n_slots
        new = np.arange(1, m)
        tgt = base + new
        par = sub["parent"][new]
        leaf_start = np.where(sub["leaf_start"][new] >= 0, sub["leaf_start"][new] + sbase, -1)
        fc, ns = sub["first_child"][new], sub["next_sibling"][new]
        new_ids = ids[sub["perm"]]
        is_leaf = sub["leaf_start"][new] >= 0
        leaves, leaf_sizes = tgt[is_leaf], sub["leaf_size"][new][is_leaf]
        owned = concat_ranges(leaf_start[is_leaf], leaf_sizes)
        owner = np.repeat(leaves, leaf_sizes).astype(A.slot_leaf.dtype)
        key_pos = np.searchsorted(self._keys, new_ids)
        # tighten v's own radius about its (unchanged) center
        r = pad_up(float(np.sqrt(((sub["vecs"].astype(np.float64) - A.center[v]) ** 2).sum(axis=1)).max()))
        self._begin_write()
        # retire the old nodes below v and their slots
        for u in old:
            if A.leaf_start[u] >= 0:
                A.slot_leaf[A.leaf_start[u] : A.leaf_start[u] + A.leaf_cap[u]] = -1
                self._dead_slots += int(A.leaf_cap[u])
            # a dead node owns no slots (compaction would leave its range dangling)
            A.parent[u], A.leaf_start[u], A.leaf_size[u], A.leaf_cap[u] = _mutate.DEAD, -1, 0, 0
        if A.leaf_start[v] >= 0:
            A.slot_leaf[A.leaf_start[v] : A.leaf_start[v] + A.leaf_cap[v]] = -1
            self._dead_slots += int(A.leaf_cap[v])
        # graft: sub-root (index 0) is v itself; its descendants get fresh indices
        for name in ("center", "csq", "radius", "nu_min", "nu_max", "sqsum", "count"):
            getattr(A, name)[tgt] = sub[name][new]
        A.parent[tgt] = np.where(par == 0, v, par + base)
        A.leaf_start[tgt] = leaf_start
        A.leaf_size[tgt] = sub["leaf_size"][new]
        A.leaf_cap[tgt] = sub["leaf_cap"][new]
        A.first_child[tgt] = np.where(fc >= 0, fc + base, -1)
        A.next_sibling[tgt] = np.where(ns >= 0, ns + base, -1)
        A.first_child[v] = sub["first_child"][0] + base if sub["first_child"][0] >= 0 else -1
        A.leaf_start[v], A.leaf_size[v], A.leaf_cap[v] = -1, 0, 0
        sl = slice(sbase, sbase + n)
        A.vecs[sl] = sub["vecs"]
        A.slot_id[sl] = new_ids
        A.slot_leaf[owned] = owner
        self._key_slot[key_pos] = np.arange(sbase, sbase + n)
        A.radius[v] = r
        self._n_nodes += m - 1
        self._n_slots += n
        self._maybe_compact()

    # -------------------------------------------------------------- capacity
    def _reserve(self, *, slots: int, nodes: int) -> None:
        A = self._A
        grow = {}
        if slots > A.vecs.shape[0]:
            cap = max(slots, int(A.vecs.shape[0] * 1.125) + 1024)  # gentle: vectors dominate memory
            grow.update(
                vecs=_grown(A.vecs, cap), slot_id=_grown(A.slot_id, cap), slot_leaf=_grown(A.slot_leaf, cap, fill=-1)
            )
        if nodes > A.center.shape[0]:
            cap = max(nodes, int(A.center.shape[0] * 1.5) + 16)
            for name in (
                "center",
                "csq",
                "radius",
                "nu_min",
                "nu_max",
                "sqsum",
                "count",
                "parent",
                "first_child",
                "next_sibling",
                "leaf_start",
                "leaf_size",
                "leaf_cap",
                "node_lo",
            ):
                grow[name] = _grown(getattr(A, name), cap)
        if grow:  # all arrays grown, or (on an error above) none
            self._A = A._replace(**grow)

    def _free_slots(self) -> np.ndarray:
        """Slots below n_slots that hold no target: the one definition of a free slot."""
        return np.flatnonzero(self._A.slot_leaf[: self._n_slots] < 0)

    def _maybe_compact(self) -> None:
        """After every write: reclaim slots left behind by moved/split/emptied leaves when
        they pile up, and recompute which subtrees are contiguous (O(nodes))."""
        self._top = None
        if self._dead_slots > max(1024, self._n_slots // 2):
            try:
                self.compact()
                return
            except MemoryError:  # compaction only saves memory; the write itself is done
                pass
        _mutate.contiguous_ranges(self._A, 0, self._n_nodes)

    def compact(self) -> None:
        """Move every leaf's targets into one dense slot array (depth-first order)."""
        A = self._A
        out = np.empty(len(self), np.int64)
        n = _mutate.subtree_slots(A, 0, out)
        gather = out[:n]  # depth-first: each leaf's used slots are consecutive here
        # the new arrays first: an allocation failure leaves the index as it was
        slot_leaf = A.slot_leaf[gather]
        leaves = slot_leaf[np.r_[True, slot_leaf[1:] != slot_leaf[:-1]]] if n else slot_leaf
        new_start = np.zeros(leaves.shape[0], np.int64)
        np.cumsum(A.leaf_size[leaves][:-1], out=new_start[1:])
        vecs = A.vecs[gather]
        slot_id = A.slot_id[gather]
        key_slot = np.empty(len(self), np.int64)
        key_slot[np.searchsorted(self._keys, slot_id)] = np.arange(slot_id.shape[0])
        self._begin_write()
        A.leaf_start[leaves] = new_start
        A.leaf_cap[leaves] = A.leaf_size[leaves]
        self._A = A._replace(vecs=vecs, slot_id=slot_id, slot_leaf=slot_leaf)
        self._key_slot = key_slot
        self._n_slots = slot_id.shape[0]
        self._dead_slots = 0
        _mutate.contiguous_ranges(self._A, 0, self._n_nodes)

    # ------------------------------------------------------------------ check
    def check(self) -> None:
        """Verify every invariant; raise InvariantError with a precise message if one fails.

        Checked: parent/child links form a tree rooted at node 0; every count is the
        sum of its children's counts (a leaf's is its size); no non-root node is
        empty; leaves hold at most 2 * leaf_size targets in slots they alone own;
        every stored id is in exactly one slot and maps back to it; ||c||^2 is exact;
        and for every target and every ancestor v: ||y - c_v|| <= radius_v,
        nu_min_v <= ||y|| <= nu_max_v (computed in float64), and the target lies in
        v's slot range when v is marked contiguous (uniform sampling relies on it).
        """
        if (self._keys[1:] <= self._keys[:-1]).any():  # not np.diff: it overflows on extreme ids
            raise InvariantError("id keys are not strictly increasing (an id is stored twice)")
        code, v, s, got, bound = _mutate.check_kernel(
            self._A, self._keys, self._key_slot, 0, self._n_nodes, self._n_slots, self.max_leaf
        )
        if code != _mutate.OK:
            raise InvariantError(_CHECK_MESSAGES[code].format(v=v, s=s, got=got, bound=bound))

    # ------------------------------------------------------------------ io
    def save(self, path) -> None:
        """Write the index to `path` atomically (see treeidx.io for the format)."""
        A = self._A
        arrays = {name: a[: self._n_slots if name in SLOT_FIELDS else self._n_nodes] for name, a in zip(A._fields, A)}
        arrays["keys"] = self._keys
        arrays["key_slot"] = self._key_slot
        meta = dict(
            treeidx_version=__version__,
            shape=self._shape,
            seed=self._seed,
            n_slots=self._n_slots,
            n_nodes=self._n_nodes,
            dead_slots=self._dead_slots,
        )
        write_index_file(path, arrays, meta)

    @classmethod
    def load(cls, path) -> TreeIndex:
        """Read an index written by `save`; verifies checksums and invariants
        (IndexFileError, naming what is wrong, if anything is)."""
        arrays, meta = read_index_file(path, TreeArrays._fields + ("keys", "key_slot"))
        keys, key_slot = arrays.pop("keys"), arrays.pop("key_slot")
        try:
            index = cls(
                _arrays=TreeArrays(**arrays),
                _keys=keys,
                _key_slot=key_slot,
                _n_slots=int(meta["n_slots"]),
                _n_nodes=int(meta["n_nodes"]),
                _dead_slots=int(meta["dead_slots"]),
                _shape=check_shape_options(meta["shape"]),
                _seed=int(meta["seed"]),
            )
            if arrays["vecs"].shape[0] != index._n_slots or arrays["center"].shape[0] != index._n_nodes:
                raise IndexFileError(f"{path}: array lengths disagree with the header counters")
            _check_pointer_ranges(index)  # the kernels below trust these: never index out of bounds
            index.check()
        except (InvariantError, KeyError, TypeError, IndexError) as e:
            raise IndexFileError(f"{path}: inconsistent index ({e})") from None
        return index

    # ------------------------------------------------------------------ view
    def view(self) -> TreeView:
        """A read-only view of the tree (arrays, top level, id map), for code built on
        the index's structure such as the sampler. See TreeView."""
        A, n, m = self._A, self._n_slots, self._n_nodes
        arrays = TreeArrays(*(_read_only(a[:n] if f in SLOT_FIELDS else a[:m]) for f, a in zip(A._fields, A)))
        nodes, centers, region = self._top_level()
        return TreeView(arrays, *(_read_only(a) for a in (nodes, centers, region, self._keys, self._key_slot)))


@dataclass(frozen=True)
class TreeView:
    """A read-only look at a TreeIndex, valid until the index is next written to.

    Every array is a view of the index's own (no copy) with `writeable=False`.

    arrays:      the tree's TreeArrays (node statistics, links, slots; see
                 treeidx/_kernels/arrays.py), trimmed to the used slots and nodes
    top_nodes:   the root's children, int64 (the sampler's initial cut)
    top_centers: their centers, one contiguous (K, d) float32 block
    top_region:  a coarse label per top node, to order queries by locality
    keys:        the stored ids, sorted ascending
    key_slot:    key_slot[i] is the slot holding keys[i]
    """

    arrays: TreeArrays
    top_nodes: np.ndarray
    top_centers: np.ndarray
    top_region: np.ndarray
    keys: np.ndarray
    key_slot: np.ndarray

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def n_slots(self) -> int:
        """Slots in use or retired (the slot arrays' length); live ones have slot_leaf >= 0."""
        return int(self.arrays.vecs.shape[0])

    @property
    def dim(self) -> int:
        return int(self.arrays.vecs.shape[1])


_CHECK_MESSAGES = {
    _mutate.E_CYCLE: "node {v}: child {s} is reached twice (cycle or shared child)",
    _mutate.E_PARENT: "node {v}: parent pointer is {got:.0f}, but it is listed under node {bound:.0f}",
    _mutate.E_COUNT: "node {v}: count is {got:.0f} but its children/slots hold {bound:.0f}",
    _mutate.E_LEAF_CHILDREN: "leaf {v} has children",
    _mutate.E_LEAF_SIZE: "leaf {v}: size {got:.0f} / capacity {bound:.0f} violates size <= capacity <= 2*leaf_size",
    _mutate.E_SLOT_OWNER: "leaf {v}: slot {s} is owned by {got:.0f}, expected {bound:.0f}",
    _mutate.E_KEY: "id map: key #{bound:.0f} (id {got:.0f}) does not map to a live slot holding it (slot {s})",
    _mutate.E_RADIUS: "node {v}: target in slot {s} is at distance {got!r} from the center, beyond radius {bound!r}",
    _mutate.E_NORM: "node {v}: target in slot {s} has norm {got!r} outside the node's norm range (bound {bound!r})",
    _mutate.E_CSQ: "node {v}: stored ||c||^2 = {got!r} but the center gives {bound!r}",
    _mutate.E_EMPTY: "node {v} is empty but still linked into the tree",
    _mutate.E_SLOT_SHARED: "leaf {v}: slot {s} is out of range or owned by two leaves",
    _mutate.E_INTERNAL_NO_CHILD: "internal node {v} has no children and is not a leaf",
    _mutate.E_STRAY: "slot {s} lies in no leaf's range but is marked as owned by node {got:.0f} "
    "(a freed slot that still looks live)",
    _mutate.E_RANGE: (
        "node {v}: marked contiguous from slot {got:.0f} ({bound:.0f} targets) but slot {s} below it lies outside"
    ),
}


# The grouped search pays off once several queries share leaves; its partial heaps cost
# GROUP_CHUNKS * block * k entries, so it is used for small k and run in query blocks.
GROUP_MIN_QUERIES = 16
GROUP_MAX_K = 128
GROUP_BLOCK = 1024
GROUP_FIRST_CLUSTERS = 3  # searched per query first, for its threshold


def locality_order(top_dots: np.ndarray, top_region: np.ndarray) -> np.ndarray:
    """Query order grouping queries by the region, then the cluster, they score best in."""
    if top_dots.shape[1] == 0:
        return np.arange(top_dots.shape[0])
    best = top_dots.argmax(axis=1)
    return np.lexsort((best, top_region[best]))


def _children(A: TreeArrays, v: int) -> list[int]:
    out, c = [], A.first_child[v]
    while c >= 0:
        out.append(int(c))
        c = A.next_sibling[c]
    return out


def _depths(parent: np.ndarray, live: np.ndarray) -> np.ndarray:
    depth = np.full(parent.shape[0], -1, np.int64)
    depth[0] = 0
    todo = live[live != 0]
    while todo.size:  # resolve nodes whose parent depth is known, level by level
        p = parent[todo]
        ready = depth[p] >= 0
        depth[todo[ready]] = depth[p[ready]] + 1
        todo = todo[~ready]
    return depth


def _read_only(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


def _check_pointer_ranges(index: TreeIndex) -> None:
    """Every link and slot range of a loaded index points inside its arrays."""
    A, m, n = index._A, index._n_nodes, index._n_slots
    for name in ("parent", "first_child", "next_sibling"):
        a = getattr(A, name)
        if a.size and (a.min() < -2 or a.max() >= m):
            raise InvariantError(f"{name} points outside the {m} nodes")
    ls, cap = A.leaf_start, A.leaf_cap
    leaf = (ls >= 0) & (A.parent != _mutate.DEAD)  # unlinked nodes are never read
    if (ls < -1).any() or (ls[leaf] + cap[leaf] > n).any() or (A.leaf_size > cap).any():
        raise InvariantError("leaf slot ranges point outside the slot arrays")
    if A.slot_leaf.size and (A.slot_leaf.min() < -1 or A.slot_leaf.max() >= m):
        raise InvariantError("slot owners point outside the nodes")
    if index._key_slot.size and (index._key_slot.min() < 0 or index._key_slot.max() >= n):
        raise InvariantError("id map points outside the slot arrays")
    if m < 1 or A.vecs.ndim != 2 or A.center.shape[1:] != A.vecs.shape[1:]:
        raise InvariantError("array shapes are inconsistent")


def _grown(a: np.ndarray, cap: int, fill=0) -> np.ndarray:
    out = np.full((cap,) + a.shape[1:], fill, a.dtype)
    out[: a.shape[0]] = a
    return out
