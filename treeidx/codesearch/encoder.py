"""A dual encoder over hashed sparse features that trains in minutes on a CPU.

Each tower is a bag of hashed features: `nn.EmbeddingBag(n_buckets, ·, mode="sum")`
weighted by the CSR values (1 + log tf), optionally followed by a Linear projection,
L2-normalised, so scores <q, t> are cosines (the loss divides them by a temperature).
A full re-encode of the 216k code targets takes ~0.3 s on 2 CPU cores, which is what
makes per-step re-encodes (the oracle baseline) affordable at all.

Dense or sparse gradients: a training step with k = 32 sampled negatives encodes
~4,000 targets, whose features touch ~70% of a 2^18-row table, so sparse gradients
save nothing: on 2 cores SparseAdam's step over them costs ~180-240 ms
against ~12 ms for a dense fused Adam over the whole table (plus ~25 ms more
backward). Hence `sparse=False` by default; `sparse=True` (SparseAdam) remains for
tiny batches over huge tables.

The encoder keeps references to the dataset's two CSR matrices (never copied, never in
`state_dict`), so every encode call takes row indices: query rows, target ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Union

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validate import check_nonnegative_int, check_positive, check_positive_int

__all__ = ["BagTower", "DualEncoder", "SparseDenseOptimizer", "bag_inputs", "make_optimizer"]

Rows = Union[np.ndarray, torch.Tensor, range, slice]


def _row_index(rows: Rows, n: int) -> np.ndarray | slice:
    """Rows as a numpy int64 array (or a slice), bounds-checked against n rows."""
    if isinstance(rows, slice):
        return rows
    if isinstance(rows, range):
        return slice(rows.start, rows.stop, rows.step) if rows.step > 0 else np.asarray(rows, np.int64)
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu().numpy()
    r = np.asarray(rows)
    if r.ndim != 1 or (r.size and not np.issubdtype(r.dtype, np.integer)):
        raise ValueError(f"rows: expected a 1-d integer array, got {r.dtype} {r.shape}")
    if r.size and (r.min() < 0 or r.max() >= n):
        raise ValueError(f"rows: expected indices in [0, {n}), got range [{r.min()}, {r.max()}]")
    return r.astype(np.int64, copy=False)


def bag_inputs(features: sp.csr_matrix, rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input, offsets, per_sample_weights) of CSR rows for `nn.EmbeddingBag`.

    Vectorised: scipy's row gather in C, no Python loop over rows. A row with no
    features is an empty bag (a zero vector from a sum bag).
    """
    sub = features[_row_index(rows, features.shape[0])]
    return (
        torch.from_numpy(sub.indices.astype(np.int64)),
        torch.from_numpy(sub.indptr[:-1].astype(np.int64)),
        torch.from_numpy(np.ascontiguousarray(sub.data, np.float32)),
    )


class BagTower(nn.Module):
    """Weighted sum of hashed-feature embeddings [→ Linear] → L2 normalise.

    n_buckets: feature space size (columns of the CSR input). dim: output dimension.
    bag_dim: with a projection, the embedding width (None: no projection; the bag is
    `dim` wide). init_std: the embedding entries' N(0, init_std²) initialisation (the
    output is normalised, so only the scale relative to the learning rate matters).
    sparse: sparse embedding gradients (module docstring). generator: a seeded
    torch.Generator for the initialisation.
    """

    def __init__(
        self,
        n_buckets: int,
        dim: int = 64,
        *,
        bag_dim: int | None = None,
        init_std: float = 0.01,
        sparse: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        n_buckets, dim = check_positive_int(n_buckets, "n_buckets"), check_positive_int(dim, "dim")
        width = dim if bag_dim is None else check_positive_int(bag_dim, "bag_dim")
        self.bag = nn.EmbeddingBag(n_buckets, width, mode="sum", sparse=bool(sparse))
        self.proj = None if bag_dim is None else nn.Linear(width, dim, bias=False)
        with torch.no_grad():
            self.bag.weight.normal_(0.0, check_positive(init_std, "init_std"), generator=generator)
            if self.proj is not None:  # near-orthogonal start: the bag's geometry survives
                self.proj.weight.normal_(0.0, width**-0.5, generator=generator)

    @property
    def dim(self) -> int:
        return int(self.bag.embedding_dim if self.proj is None else self.proj.out_features)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor) -> torch.Tensor:
        """(n_bags, dim) unit vectors (zero for an empty bag); EmbeddingBag's arguments."""
        h = self.bag(input, offsets, per_sample_weights=per_sample_weights)
        if self.proj is not None:
            h = self.proj(h)
        return F.normalize(h, dim=-1)

    def encode(self, features: sp.csr_matrix, rows: Rows) -> torch.Tensor:
        """The (len(rows), dim) encodings of CSR rows (with autograd, if enabled)."""
        return self(*bag_inputs(features, rows))


class DualEncoder(nn.Module):
    """A query tower and a target tower over a dataset's CSR features.

    query_features, target_features: (n, n_buckets) CSR matrices (e.g. a
    `CodeSearchData`'s); held by reference, not in `state_dict`.
    shared: one tower for both sides (Siamese). Otherwise two towers with the SAME
    initial weights (`same_init=True`, default) — at step 0 a query and a code snippet
    that share tokens already score high, a head start the hashed features give for
    free — or independent ones. Other arguments as in `BagTower`; seed makes the
    initialisation deterministic.

    `hparams` rebuilds the same architecture: `DualEncoder(qf, tf, **enc.hparams)`,
    then `load_state_dict`.
    """

    def __init__(
        self,
        query_features: sp.csr_matrix,
        target_features: sp.csr_matrix,
        *,
        dim: int = 64,
        bag_dim: int | None = None,
        shared: bool = False,
        same_init: bool = True,
        init_std: float = 0.01,
        sparse: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, m in (("query_features", query_features), ("target_features", target_features)):
            if not sp.issparse(m) or m.format != "csr" or m.ndim != 2:
                raise TypeError(f"{name}: expected a scipy CSR matrix, got {type(m).__name__}")
        if query_features.shape[1] != target_features.shape[1]:
            raise ValueError(
                f"query_features has {query_features.shape[1]} columns, "
                f"target_features {target_features.shape[1]}: one hash space expected"
            )
        self.query_features = query_features
        self.target_features = target_features
        self.hparams: dict[str, Any] = dict(
            dim=dim,
            bag_dim=bag_dim,
            shared=bool(shared),
            same_init=bool(same_init),
            init_std=init_std,
            sparse=bool(sparse),
            seed=check_nonnegative_int(seed),
        )
        n_buckets = int(target_features.shape[1])
        g = torch.Generator().manual_seed(int(seed))
        tower = dict(bag_dim=bag_dim, init_std=init_std, sparse=sparse, generator=g)
        self.query_tower = BagTower(n_buckets, dim, **tower)
        if shared:
            self.target_tower = self.query_tower
        else:
            self.target_tower = BagTower(n_buckets, dim, **tower)
            if same_init:
                self.target_tower.load_state_dict(self.query_tower.state_dict())

    @property
    def dim(self) -> int:
        return self.query_tower.dim

    @property
    def n_targets(self) -> int:
        return int(self.target_features.shape[0])

    def encode_queries(self, rows: Rows) -> torch.Tensor:
        """(len(rows), dim) unit query vectors of query rows (with grad when enabled)."""
        return self.query_tower.encode(self.query_features, rows)

    def encode_targets(self, ids: Rows) -> torch.Tensor:
        """(len(ids), dim) unit target vectors of target ids (with grad when enabled)."""
        return self.target_tower.encode(self.target_features, ids)

    @torch.no_grad()
    def encode_all_targets(self, batch_size: int = 32768) -> torch.Tensor:
        """All (n_targets, dim) target vectors, float32, no grad, in chunks of batch_size."""
        return self._encode_all(self.target_tower, self.target_features, batch_size)

    @torch.no_grad()
    def encode_all_queries(self, rows: Rows | None = None, batch_size: int = 32768) -> torch.Tensor:
        """Query vectors of `rows` (default: all), no grad, chunked."""
        qf = (
            self.query_features if rows is None else self.query_features[_row_index(rows, self.query_features.shape[0])]
        )
        return self._encode_all(self.query_tower, qf, batch_size)

    @staticmethod
    def _encode_all(tower: BagTower, features: sp.csr_matrix, batch_size: int) -> torch.Tensor:
        batch_size = check_positive_int(batch_size, "batch_size")
        n = features.shape[0]
        out = torch.empty((n, tower.dim), dtype=torch.float32)
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            out[lo:hi] = tower.encode(features, slice(lo, hi))
        return out


# ---------------------------------------------------------------------------- optimizer


class SparseDenseOptimizer:
    """SparseAdam on sparse-gradient embedding tables, Adam on every other parameter.

    torch's Adam rejects sparse gradients and SparseAdam dense ones; this is one
    `zero_grad` / `step` / `state_dict` / `load_state_dict` over both. The dense Adam
    is the fused kernel where torch has it (CPU: torch >= 2.4), ~5x faster here.
    """

    def __init__(self, model: nn.Module, lr: float) -> None:
        lr = check_positive(lr, "lr")
        sparse_ids = {
            id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
        }
        params = list(model.parameters())  # deduplicated: a shared tower counts once
        sparse = [p for p in params if id(p) in sparse_ids]
        dense = [p for p in params if id(p) not in sparse_ids]
        self.optimizers: list[torch.optim.Optimizer] = []
        if sparse:
            self.optimizers.append(torch.optim.SparseAdam(sparse, lr=lr))
        if dense:
            self.optimizers.append(_adam(dense, lr))
        if not self.optimizers:
            raise ValueError("model has no parameters to optimise")

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"state_dict has {len(states)} optimizers, expected {len(self.optimizers)}")
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)


def _adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this torch/device
        return torch.optim.Adam(params, lr=lr)


def make_optimizer(model: nn.Module, lr: float) -> SparseDenseOptimizer:
    """SparseAdam for sparse embeddings + Adam for the rest, behind one interface."""
    return SparseDenseOptimizer(model, lr)
