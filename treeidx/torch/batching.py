"""Hard batches: choose which (query, positive) pairs share a batch, so that in-batch
negatives are informative without encoding a single extra negative.

    GlobalContrastiveBatchSampler  GCBS (Sachidananda et al., ICML 2023): a sparse
                                   similarity graph over the pairs, reordered by reverse
                                   Cuthill-McKee, cut into batches, batch order shuffled
    TreeBatchSampler               the leaves of a TreeIndex / DynamicIndex in depth-first
                                   order, cut into batches: the tree's own grouping, kept
                                   current by the write-back that keeps the index current

Both are `torch.utils.data.Sampler`s of index batches (lists of pair indices 0..N-1),
usable as `DataLoader(dataset, batch_sampler=sampler)`. One pass over a sampler is one
epoch: every pair exactly once, in batches of exactly `batch_size` except one final short
batch of the N mod batch_size pairs left over, which `drop_last=True` drops (those pairs
then miss that epoch, like torch's BatchSampler). Batches depend only on the seed, the
epoch number (`set_epoch`; each pass advances it) and the embeddings / tree state they
were computed from.

`mix` (both samplers): in every full batch, round(mix * batch_size) slots chosen at
random are refilled with a random permutation of the pairs taken out of all batches'
chosen slots, i.e. that share of each batch is drawn at random from the epoch. It trades
hardness for protection against over-hard batches and false negatives (near-duplicate
pairs in one batch); mix=1 is random batching, mix=0 the pure ordering.

scipy (GCBS only) is imported when a GCBS order is first computed, not at import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from .._validate import as_vectors, check_k, check_nonnegative_int
from ..dynamic import DynamicIndex
from ..tree import TreeIndex

__all__ = ["GlobalContrastiveBatchSampler", "TreeBatchSampler"]

PairEmbeddings = tuple[Any, Any]
EmbeddingSource = PairEmbeddings | Callable[[], PairEmbeddings]

_SIMILARITIES = ("concat", "cross")


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0x6A7C4, *tags])


def _check_mix(mix: Any) -> float:
    if (
        isinstance(mix, bool)
        or not isinstance(mix, (int, float, np.floating, np.integer))
        or not 0.0 <= float(mix) <= 1.0
    ):
        raise ValueError(f"mix: expected a number in [0, 1], got {mix!r}")
    return float(mix)


class _OrderedBatchSampler(Sampler[list[int]]):
    """An order of the pairs whose neighbours are similar, cut into batches.

    Subclasses supply `_order(remaining, rng)`: a permutation of the pair indices
    `remaining` (int64) in which consecutive pairs are similar; and `_refresh()`, called
    before each (re)grouping to pick up the current embeddings or tree.
    """

    def __init__(
        self, n: int, batch_size: int, *, mix: float, refresh_every: int | None, drop_last: bool, seed: int
    ) -> None:
        super().__init__()
        self.n = int(n)
        self.batch_size = check_k(batch_size, "batch_size")
        self.mix = _check_mix(mix)
        self.refresh_every = None if refresh_every is None else check_k(refresh_every, "refresh_every")
        if not isinstance(drop_last, (bool, np.bool_)):
            raise ValueError(f"drop_last: expected a bool, got {drop_last!r}")
        self.drop_last = bool(drop_last)
        self.seed = check_nonnegative_int(seed, "seed")
        self.epoch = 0
        self.regroups = 0  # orders computed so far (epochs started + mid-epoch regroups)

    def __len__(self) -> int:
        """Batches per epoch."""
        full, short = divmod(self.n, self.batch_size)
        return full + (1 if short and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass produces (each pass then advances it by one)."""
        self.epoch = check_nonnegative_int(epoch, "epoch")

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        self.epoch += 1
        remaining = np.arange(self.n, dtype=np.int64)
        B = self.batch_size
        for round_ in range(self.n + 1):  # each round yields >= 1 full batch, or ends the epoch
            rng = _rng(self.seed, epoch, round_)
            self._refresh()
            self.regroups += 1
            order = self._order(remaining, rng) if remaining.size > 1 else remaining
            n_full = order.size // B
            full = order[: n_full * B].reshape(n_full, B)
            short = order[n_full * B :]
            full = self._mixed(full, rng)[rng.permutation(n_full)]  # GCBS: shuffle the batch order
            take = n_full if self.refresh_every is None else min(self.refresh_every, n_full)
            for b in full[:take]:
                yield b.tolist()
            if take == n_full:
                if short.size and not self.drop_last:
                    yield short.tolist()
                return
            remaining = np.concatenate([full[take:].ravel(), short])

    def _mixed(self, full: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        r = int(round(self.mix * self.batch_size))
        if r == 0 or full.shape[0] == 0:
            return full
        # r random slots per batch; their pairs are permuted among all chosen slots
        slots = np.argsort(rng.random(full.shape), axis=1)[:, :r]
        rows = np.repeat(np.arange(full.shape[0]), r)
        cols = slots.ravel()
        out = full.copy()
        out[rows, cols] = out[rows, cols][rng.permutation(rows.size)]
        return out

    def _order(self, remaining: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def _refresh(self) -> None:
        pass


class GlobalContrastiveBatchSampler(_OrderedBatchSampler):
    """Global Contrastive Batch Sampling (Sachidananda, Yang and Zhu, ICML 2023).

    GCBS bounds the gap between the global contrastive loss (every pair against every
    other) and the loss trained on batches by the similar pairs that do NOT share a
    batch, and approximates the resulting assignment problem by a bandwidth-minimising
    permutation: with similar pairs adjacent in the order, consecutive blocks of
    `batch_size` pairs hold many hard in-batch negatives. Per (re)grouping:

    1. pair embeddings z_i from the current (query_i, positive_i) embeddings;
    2. a sparse similarity graph: each pair's `n_neighbors` most similar other pairs
       (exact top-k by inner product), symmetrised; with `quantile`
       set, only the edges whose similarity also exceeds that quantile of the similarity
       over all pairs (estimated from 100,000 random pairs) are kept, the paper's
       thresholding of the similarity matrix restricted to the top-k candidates;
    3. `scipy.sparse.csgraph.reverse_cuthill_mckee` on the graph's structure;
    4. the permutation cut into consecutive batches of `batch_size`, the batch order
       shuffled (seeded); optionally `mix` (module docstring), 0 in the paper.

    The paper recomputes the permutation once per epoch from the model's current
    embeddings; so does this sampler when `embeddings` is a callable (called at the
    start of every epoch, and every `refresh_every` batches when that is set, the
    pairs not yet yielded this epoch being regrouped). With arrays, `refresh(q, p)`
    replaces them; the next (re)grouping uses them. Without new embeddings, later
    epochs have the same batches in a new order.

    embeddings: (query_emb, positive_emb), two (N, d) arrays or tensors (row i = pair
        i), or a callable returning such a tuple.
    batch_size: pairs per batch.
    n_neighbors: top-k of the sparse graph (default 10; clamped to N - 1). More
        neighbours connect the graph more and widen the RCM levels.
    similarity: "concat" (default): s_ij = <q_i, q_j> + <p_i, p_j>, the inner product of
        the concatenated pair embeddings q ⊕ p; "cross": s_ij = <q_i, p_j> + <p_i, q_j>,
        the two logits the in-batch loss scores pair i's query against pair j's positive
        with (and back), the terms of the paper's bound.
    quantile: None (default: every top-k edge) or q in (0, 1).
    backend: how the exact top-k is found: "brute" (default; blocked matrix products
        and torch.topk, O(N^2 d)) or "tree" (`TreeIndex.search` over a tree built on the
        pair embeddings). Same graph up to ties. On the code-search pairs (53k pairs,
        128-d q ⊕ p) the tree's bounds prune nothing (every search evaluated ~57k inner
        products, more than N) and "tree" took 129 s against 65 s for "brute" (2
        contended cores).
    refresh_every, drop_last, mix, seed: see above and the module docstring.

    Cost per (re)grouping: the top-k graph (above), O(N k) for RCM, and, in training,
    encoding every pair once: the paper's Õ(N^2) per epoch.
    """

    def __init__(
        self,
        embeddings: EmbeddingSource,
        batch_size: int,
        *,
        n_neighbors: int = 10,
        similarity: str = "concat",
        quantile: float | None = None,
        refresh_every: int | None = None,
        drop_last: bool = False,
        mix: float = 0.0,
        backend: str = "brute",
        seed: int = 0,
    ) -> None:
        self.n_neighbors = check_k(n_neighbors, "n_neighbors")
        if backend not in ("brute", "tree"):
            raise ValueError(f"backend: expected 'brute' or 'tree', got {backend!r}")
        self.backend = backend
        if similarity not in _SIMILARITIES:
            raise ValueError(f"similarity: expected one of {_SIMILARITIES}, got {similarity!r}")
        self.similarity = similarity
        if quantile is not None and (
            isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 < float(quantile) < 1.0
        ):
            raise ValueError(f"quantile: expected None or a number in (0, 1), got {quantile!r}")
        self.quantile = None if quantile is None else float(quantile)
        if callable(embeddings):
            self._source: Callable[[], PairEmbeddings] | None = embeddings
            q, p = self._check_pair(embeddings(), None)
        else:
            self._source = None
            q, p = self._check_pair(embeddings, None)
        self._q, self._p = q, p
        self._called_source = self._source is not None  # the first epoch uses the embeddings just read
        super().__init__(q.shape[0], batch_size, mix=mix, refresh_every=refresh_every, drop_last=drop_last, seed=seed)
        self.last_graph: dict[str, float] = {}  # edges, components, seconds of the latest grouping

    @staticmethod
    def _check_pair(pair: Any, n: int | None) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(
                f"embeddings: expected (query_emb, positive_emb), two (N, d) arrays, got {type(pair).__name__}"
            )
        q = as_vectors(pair[0], None, "query_emb")
        p = as_vectors(pair[1], None, "positive_emb")
        if q.shape[0] != p.shape[0]:
            raise ValueError(
                f"embeddings: query_emb has {q.shape[0]} rows but positive_emb {p.shape[0]} (one row per pair in both)"
            )
        if n is not None and q.shape[0] != n:
            raise ValueError(f"embeddings: expected {n} pairs (the sampler's size), got {q.shape[0]}")
        return q, p

    def refresh(self, query_emb: Any, positive_emb: Any) -> None:
        """New (N, d) embeddings of the same N pairs, used from the next (re)grouping."""
        self._q, self._p = self._check_pair((query_emb, positive_emb), self.n)

    def _refresh(self) -> None:
        if self._source is None:
            return
        if self._called_source:  # fetched at construction: not again for the first grouping
            self._called_source = False
            return
        self._q, self._p = self._check_pair(self._source(), self.n)

    def _pair_vectors(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(queries, keys) whose inner products are the pair similarities."""
        q, p = self._q[rows], self._p[rows]
        if self.similarity == "concat":
            z = np.concatenate([q, p], axis=1)
            return z, z
        return np.concatenate([q, p], axis=1), np.concatenate([p, q], axis=1)

    def graph(self, rows: np.ndarray | None = None) -> Any:
        """The symmetric sparse graph (scipy CSR, N x N over `rows`, default all pairs)
        that the next grouping reorders."""
        import scipy.sparse as sp

        rows = np.arange(self.n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        n = rows.size
        k = min(self.n_neighbors, n - 1)
        if k < 1:
            return sp.csr_matrix((n, n), dtype=np.int8)
        queries, keys = self._pair_vectors(rows)
        local = np.arange(n, dtype=np.int64)
        if self.backend == "tree":
            tree = TreeIndex.build(keys, local, seed=self.seed)
            scores, nbr = tree.search(queries, k, exclude=local)
        else:
            scores, nbr = _brute_topk(queries, keys, k)
        src = np.repeat(local, k)
        dst = nbr.ravel()
        if self.quantile is not None:
            threshold = self._threshold(queries, keys, n)
            keep = scores.ravel() > threshold
            src, dst = src[keep], dst[keep]
        a = sp.csr_matrix((np.ones(src.size, np.int8), (src, dst)), shape=(n, n))
        return ((a + a.T) > 0).astype(np.int8).tocsr()

    def _threshold(self, queries: np.ndarray, keys: np.ndarray, n: int) -> float:
        rng = _rng(self.seed, 0x9A47)
        m = min(100_000, n * (n - 1))
        i = rng.integers(0, n, m)
        j = (i + rng.integers(1, n, m)) % n  # j != i
        s = np.einsum("ij,ij->i", queries[i], keys[j])
        return float(np.quantile(s, self.quantile))

    def _order(self, remaining: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        import time

        from scipy.sparse.csgraph import connected_components, reverse_cuthill_mckee

        t = time.perf_counter()
        g = self.graph(remaining)
        perm = reverse_cuthill_mckee(g, symmetric_mode=True)
        self.last_graph = dict(
            pairs=int(remaining.size),
            edges=int(g.nnz // 2),
            components=int(connected_components(g, directed=False)[0]),
            seconds=time.perf_counter() - t,
        )
        return remaining[perm]


def _brute_topk(queries: np.ndarray, keys: np.ndarray, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products of every query row against every key row but its own."""
    q, x = torch.from_numpy(queries), torch.from_numpy(keys)
    n = q.shape[0]
    scores = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int64)
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        s = q[lo:hi] @ x.T
        s[torch.arange(hi - lo), torch.arange(lo, hi)] = -torch.inf
        top = s.topk(k, dim=1)
        scores[lo:hi], ids[lo:hi] = top.values.numpy(), top.indices.numpy()
    return scores, ids


class TreeBatchSampler(_OrderedBatchSampler):
    """Batches from a tree index's own grouping of the pairs.

    Each pair i has a key, keys[i], an id stored in `index` (a TreeIndex or a
    DynamicIndex): its own pair embedding (`from_embeddings`), or, in the main job, its
    positive target, so that the index serving treeidx negatives also groups the batches.
    Per (re)grouping, the leaves are read depth first, each node's children in a
    nearest-center chain from a random (seeded) first child of the root (`leaf_order`);
    the pairs are ordered by the position of their key in that sequence (pairs sharing a
    key in random order) and cut into batches of `batch_size`, batch order shuffled,
    `mix` (module docstring) applied. The random start moves the batch boundaries
    between epochs. Leaves (up to 2 x
    leaf_size targets, k-means cells) and their siblings are neighbourhoods of the index's
    vectors, so a batch is a few adjacent leaves' pairs: what GCBS's graph and RCM
    approximate, read off a structure that already exists and costs nothing to keep.

    The index is read at every (re)grouping: the start of each epoch, and every
    `refresh_every` batches when set (the pairs not yet yielded this epoch are regrouped).
    Keep it current as the model trains (`TreeIndex.update`, `DynamicIndex.reencode` with
    the vectors each step encoded anyway); a DynamicIndex's tree holds its drift model's
    features, so the grouping follows those. An index rebuilt by `full_refresh` is picked
    up, since the sampler holds the DynamicIndex, not its tree.

    index: TreeIndex or DynamicIndex holding every key.
    batch_size: pairs per batch.
    keys: (N,) ids of `index`, one per pair (repeats allowed); default: every id of the
        index at construction, ascending (pair i = the i-th smallest id).
    mix: share of each batch drawn at random (default 0).
    refresh_every, drop_last, seed: see the module docstring.
    """

    def __init__(
        self,
        index: TreeIndex | DynamicIndex,
        batch_size: int,
        *,
        keys: Sequence[int] | None = None,
        mix: float = 0.0,
        refresh_every: int | None = None,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        if not isinstance(index, (TreeIndex, DynamicIndex)):
            raise TypeError(f"index: expected a TreeIndex or DynamicIndex, got {type(index).__name__}")
        self.index = index
        if keys is None:
            k = index.ids
        else:
            if isinstance(keys, torch.Tensor):
                keys = keys.detach().cpu().numpy()
            k = np.asarray(keys)
            if k.ndim != 1 or (k.size and not np.issubdtype(k.dtype, np.integer)):
                raise ValueError(f"keys: expected a 1-d array of integer ids, got {k.dtype} {k.shape}")
        if k.size == 0:
            raise ValueError("keys: no pairs (empty)")
        self.keys = k.astype(np.int64)
        self._tree()._slots_of(np.unique(self.keys))  # KeyError now rather than mid-epoch
        super().__init__(
            self.keys.size, batch_size, mix=mix, refresh_every=refresh_every, drop_last=drop_last, seed=seed
        )

    @classmethod
    def from_embeddings(
        cls,
        pair_embeddings: Any,
        batch_size: int,
        *,
        leaf_size: int = 32,
        mix: float = 0.0,
        refresh_every: int | None = None,
        drop_last: bool = False,
        seed: int = 0,
    ) -> TreeBatchSampler:
        """A sampler over a new TreeIndex of (N, d) pair embeddings (ids 0..N-1, pair i =
        id i): e.g. query ⊕ positive. Update it with `sampler.index.update(vectors, ids)`."""
        z = as_vectors(pair_embeddings, None, "pair_embeddings")
        tree = TreeIndex.build(z, np.arange(z.shape[0], dtype=np.int64), seed=seed, leaf_size=leaf_size)
        return cls(tree, batch_size, mix=mix, refresh_every=refresh_every, drop_last=drop_last, seed=seed)

    def _tree(self) -> TreeIndex:
        return self.index.tree if isinstance(self.index, DynamicIndex) else self.index

    def _order(self, remaining: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        tree = self._tree()
        leaf_ids = leaf_order(tree, rng)
        sorted_ids = np.sort(leaf_ids)
        rank = np.empty(leaf_ids.size, np.int64)
        rank[np.searchsorted(sorted_ids, leaf_ids)] = np.arange(leaf_ids.size)
        keys = self.keys[remaining]
        pos = np.searchsorted(sorted_ids, keys)
        pos_c = np.minimum(pos, sorted_ids.size - 1)
        missing = sorted_ids[pos_c] != keys
        if missing.any():
            raise ValueError(
                f"keys: {int(missing.sum())} key(s) are no longer in the index, "
                f"e.g. {np.unique(keys[missing])[:5].tolist()}"
            )
        return remaining[np.lexsort((rng.random(remaining.size), rank[pos_c]))]


def leaf_order(tree: TreeIndex, rng: np.random.Generator | None = None) -> np.ndarray:
    """Every id of `tree`, leaf by leaf, depth first, each node's children visited in a
    nearest-center chain: next the unvisited child whose center is nearest the center of
    the leaf emitted last, so consecutive leaves are close across subtree boundaries too.
    The first child of the root is drawn with `rng` (None: the first stored child).

    Reads the tree's node arrays through its public read-only view: leaves own the slot
    ranges [leaf_start, leaf_start + leaf_size), children are linked by first_child /
    next_sibling.
    """
    A = tree.view().arrays
    out: list[np.ndarray] = []
    last: list[np.ndarray] = []

    def visit(v: int) -> None:
        if A.leaf_start[v] >= 0:
            s = int(A.leaf_start[v])
            out.append(A.slot_id[s : s + int(A.leaf_size[v])])
            last[:] = [A.center[v]]
            return
        children = []
        c = int(A.first_child[v])
        while c >= 0:
            children.append(c)
            c = int(A.next_sibling[c])
        todo = np.array(children, np.int64)
        while todo.size:
            if last:
                i = int(np.argmin(((A.center[todo] - last[0]) ** 2).sum(axis=1)))
            else:
                i = int(rng.integers(todo.size)) if rng is not None else 0
            visit(int(todo[i]))
            todo = np.delete(todo, i)

    visit(0)
    return np.concatenate(out) if out else np.empty(0, np.int64)
