"""The drift-model interface `DynamicIndex` works with, and the records every model returns.

A drift model predicts each target's *current* vector from its stale one (encoded at
the last full refresh), so that targets need not be re-encoded while the encoder
trains. Two models implement `DriftModel`:

* `NystromDrift` (nystrom.py), query-side: predictions are Wᵀ φ(y) with per-target
  features φ fixed at construction and a per-fit matrix W (p × d). The tree is built
  over φ once; a fit changes W only, and queries are sampled as W q.
* `CorrectorDrift` (corrector.py), target-side: a small network g ↦ g' trained on
  (stale, fresh) pairs. Its features *are* the predicted vectors (p = d, W = I), so
  the tree holds the predictions and moves when the model is refitted.

`DynamicIndex.build(..., drift="nystrom" | "corrector" | model)` takes either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class DriftReport:
    """Prediction error on targets whose fresh vectors are known (relative RMS:
    sqrt(Σ‖pred − fresh‖² / Σ‖fresh‖²)), against doing nothing (stale vectors).
    A measurement, not an exception (it was called DriftError, still an alias)."""

    predicted: float
    stale: float
    n: int


@dataclass(frozen=True)
class DriftFit:
    """Diagnostics of one drift-model `fit`.

    landmark_residual: relative RMS error of the prediction on the pairs the model was
        fitted to (Nyström: the landmarks, ≈ 0 when it interpolates them; corrector:
        its replay buffer after training). A poor fit shows here first.
    holdout: DriftReport on extra re-encoded targets, when given (None otherwise):
        the estimate of the error on all targets.
    rank: Nyström: eigenpairs of K kept after clipping; corrector: d.
    """

    landmark_residual: float
    holdout: DriftReport | None
    rank: int


class RowLookup:
    """Rows of a fixed array of unique ids (unsorted, sparse, negative, huge: any int64),
    found by binary search over a sorted copy; both drift models map ids to rows with it."""

    def __init__(self, ids: np.ndarray):
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]

    def __call__(self, ids: np.ndarray, what: str = "ids") -> np.ndarray:
        """Rows of `ids` (int64 array); KeyError naming the first unknown ones."""
        pos = np.minimum(np.searchsorted(self._sorted, ids), self._sorted.size - 1)
        bad = self._sorted[pos] != ids
        if bad.any():
            raise KeyError(f"{what}: {int(bad.sum())} id(s) not among the stale targets, e.g. {ids[bad][:5].tolist()}")
        return self._order[pos]


def drift_error(pred: np.ndarray, stale: np.ndarray, fresh: np.ndarray) -> DriftReport:
    """Relative RMS error of predicted and of stale vectors against fresh ones."""
    fresh = np.asarray(fresh, np.float64)
    den = max(float((fresh**2).sum()), 1e-300)
    err = lambda a: float(np.sqrt(((np.asarray(a, np.float64) - fresh) ** 2).sum() / den))  # noqa: E731
    return DriftReport(predicted=err(pred), stale=err(stale), n=int(fresh.shape[0]))


@runtime_checkable
class DriftModel(Protocol):
    """What `DynamicIndex` needs from a drift model.

    Predictions are always Wᵀ φ(y) for some per-target feature φ(y) (p-dim) — for a
    target-side model trivially, with φ = the prediction and W = I.

    query_side: True when φ is fixed and only W changes at a fit (`NystromDrift`): a
        fit never touches the tree, which is built over φ once, and queries are
        sampled as `transform_queries(q)` = W q. False (`CorrectorDrift`): φ(y) is the
        predicted vector itself, `transform_queries` is the identity, and after a fit
        the tree's targets must be moved to their new predictions (`DynamicIndex.refit`).
    """

    query_side: bool

    @property
    def W(self) -> np.ndarray:
        """The query-side map (p × d): predictions are Wᵀ φ. The identity for a
        target-side model. `DynamicIndex` back-projects fresh vectors through it."""
        ...

    @property
    def ids(self) -> np.ndarray:
        """The targets the model knows (int64, construction order; a copy)."""
        ...

    @property
    def dim(self) -> int:
        """Dimension p of the features φ (the tree's dimension)."""
        ...

    def features(self, ids=None) -> np.ndarray:
        """φ(y) of the model's targets (all, in `ids` order, or of `ids`): (n, p) float32."""
        ...

    def features_of(self, vectors) -> np.ndarray:
        """φ of arbitrary stale-space vectors (targets the model has no stale vector for)."""
        ...

    def stale(self, ids) -> np.ndarray:
        """The stale vectors of `ids`, (n, d) float32 (KeyError for unknown ids)."""
        ...

    def transform_queries(self, queries) -> np.ndarray:
        """What the tree scores for encoder-space queries: W q, (B, p) float32."""
        ...

    def predict_from_features(self, phi) -> np.ndarray:
        """Wᵀ φ: the predicted current vectors of targets with features `phi`, (n, d) float32."""
        ...

    def predict(self, ids) -> np.ndarray:
        """Predicted current vectors of the model's targets `ids`, (n, d) float32."""
        ...

    def fit(self, fresh_vectors=None, ids=None, *, holdout_ids=None, holdout_vectors=None) -> DriftFit:
        """Refit from fresh vectors of `ids` (each model documents which ids it needs and
        what None means); optional hold-out targets estimate the error on all targets."""
        ...

    def observe(self, fresh_vectors, ids) -> None:
        """Fresh vectors the training loop computed anyway (free training pairs). A
        model that cannot use them validates and ignores them."""
        ...

    def evaluate(self, ids, fresh_vectors) -> DriftReport:
        """Prediction error of `ids` against their known fresh vectors (and the stale baseline)."""
        ...

    def state(self) -> dict[str, np.ndarray]:
        """Named arrays that restore the model exactly (`from_state`)."""
        ...

    @classmethod
    def from_state(cls, st: dict[str, np.ndarray]) -> DriftModel:
        """The model `state()` was taken from, predicting identically."""
        ...
