"""DynamicIndex: softmax sampling over targets whose encoder drifts, without re-encoding them all.

It owns a drift model (`DriftModel`, treeidx/drift.py; `drift="nystrom"` by default, or
`"corrector"`, or a model instance), a `TreeIndex` over the model's features φ(y), and a
`SoftmaxSampler` on that tree.

* Query-side models (`NystromDrift`: φ fixed, predictions Wᵀ φ): drift enters on the
  query side. `sample(q)` samples the tree with W q, so <W q, φ(y)> = <q, Wᵀ φ(y)> and
  the tree is untouched when `refresh_landmarks` / `refit` changes W.
* Target-side models (`CorrectorDrift`): φ(y) is the predicted vector itself. Queries
  pass unchanged; `refit` trains the model and then moves every target not re-encoded
  since the last full refresh to its new prediction (`TreeIndex.update`, in chunks;
  this counts as moved for the refresh policy). Every `reencode` hands the model its
  (stale, fresh) pairs (`observe`) — free training data.

Re-encoded and added targets (design choice, docs/drift.md). With a target-side model
the tree simply takes the fresh vector. With a query-side one, a target whose current
vector v is known exactly gets a new feature vector, the ridge back-projection of v
from its old one (for an added target: from φ(v) read as a stale vector):

    φ_new = argmin ‖Wᵀ φ − v‖² + λ ‖φ − φ_old‖²
          = φ_old + W (WᵀW + λI)⁻¹ (v − Wᵀ φ_old),    λ = backproject_ridge · σ_max(W)²

It is updated in place in the tree (`TreeIndex.update`), so it is sampled like every
other target: no side set, no mixing of two partition functions. In directions W
determines well (σ_i² ≫ λ) Wᵀ φ_new = v up to a relative λ/(σ_i² + λ); in poorly
determined ones φ stays near φ_old instead of blowing up (‖φ_new − φ_old‖ ≤
‖v − Wᵀ φ_old‖ / (2√λ)). backproject_ridge=0 is the exact least-norm change
(pinv(Wᵀ)), which amplifies residuals by 1/σ_min. The worst relative error of Wᵀ φ_new
against v is kept in `last_backprojection_error`. At the next refresh W changes and
the target's score becomes <q, W_newᵀ φ_new>: the drift model's propagation of its
fresh vector (with the linear kernel φ_new is nearly the stale-space vector that the
map sends to v, i.e. its replaced stale vector).

What the sampler is exact for: the softmax over the vectors `predict(ids)` = Wᵀ φ(y) —
the model's predictions, and the (back-projected) fresh vectors of targets re-encoded
or added since the last refresh (for a target-side model: since the last full refresh).
It is not exact with respect to the true current encoder; the gap is the drift model's
error, estimated from every `reencode` batch (predicted vs fresh before
the update) and from optional hold-out targets at `refresh_landmarks`.

Refresh policy (`RefreshPolicy`): after `max_moved_fraction` of the targets were moved
or added since the last tree rebuild, rebuild the tree (subtrees of the top level whose
radius grew by `radius_growth`, or all of it); when the running drift error exceeds
`max_drift_error`, set `needs_full_refresh` (the caller re-encodes everything and calls
`full_refresh`). Every decision is appended to `log` and sent to the `treeidx.dynamic`
logger.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._validate import as_ids, as_vectors, check_number, vectors_then_ids
from .corrector import CorrectorDrift
from .drift import DriftFit, DriftModel, DriftReport, drift_error
from .io import IndexFileError, atomic_write, crc32
from .nystrom import NystromDrift
from .sampling import SampleResult, SoftmaxSampler
from .tree import TreeIndex, check_shape_options

logger = logging.getLogger("treeidx.dynamic")
FORMAT_VERSION = 2  # 2: the drift model's kind and options in the config (1: Nyström only)
_READABLE_VERSIONS = (1, 2)
_MODELS = {"nystrom": NystromDrift, "corrector": CorrectorDrift}
_CORRECTOR_KEYS = (
    "hidden",
    "normalize",
    "ridge",
    "lr",
    "steps_per_fit",
    "batch_size",
    "buffer_size",
    "weight_decay",
    "seed",
)
_MOVE_CHUNK_ELEMS = 1 << 22  # float32 elements per chunk when moving targets after a refit
BACKPROJECT_RIDGE = 1e-3  # default relative ridge of the back-projection (× σ_max(W)²)
_MODEL_KEYS = ("kernel", "landmarks", "ridge", "eig_floor", "residual", "bandwidth", "max_rank")
_SAMPLER_KEYS = ("temperature", "mode", "tolerance", "budget")


@dataclass(frozen=True)
class RefreshPolicy:
    """When DynamicIndex rebuilds its tree or asks for a full re-encode.

    max_moved_fraction: rebuild once this share of the targets was re-encoded or added
        since the last rebuild (each move widens radii along its path; bounds stay true
        but loosen, so sampling slows).
    rebuild: "partial" (top-level subtrees whose radius grew by `radius_growth`; all of
        the tree if more than half of them did) or "full".
    max_drift_error: relative RMS prediction error (running mean, weight `drift_ema`)
        above which `needs_full_refresh` is set; None: never.
    """

    max_moved_fraction: float = 0.1
    rebuild: str = "partial"
    radius_growth: float = 1.25
    max_drift_error: float | None = None
    drift_ema: float = 0.3

    def __post_init__(self):
        if self.rebuild not in ("partial", "full"):
            raise ValueError(f"rebuild: expected 'partial' or 'full', got {self.rebuild!r}")
        if not self.max_moved_fraction > 0:
            raise ValueError(f"max_moved_fraction: expected > 0, got {self.max_moved_fraction!r}")
        if not self.radius_growth >= 1:
            raise ValueError(f"radius_growth: expected >= 1, got {self.radius_growth!r}")
        if not 0 < self.drift_ema <= 1:
            raise ValueError(f"drift_ema: expected in (0, 1], got {self.drift_ema!r}")


class DynamicIndex:
    """Drift-aware softmax sampling: a drift model + a TreeIndex over its features.

    Build with `DynamicIndex.build(vectors, ids, n_landmarks=...)` (Nyström, default) or
    `DynamicIndex.build(vectors, ids, drift="corrector")`. Per training step: refit the
    model (`refresh_landmarks(fresh vectors of landmark_ids)` for Nyström, or
    `refit(...)` for either; every step or every few), `sample(queries, k,
    exclude=...)`, then `reencode(fresh, ids)` with the targets the step encoded anyway.
    Not thread-safe for writes (as TreeIndex).
    """

    def __init__(self, *, _drift: DriftModel, _tree: TreeIndex, _config: dict, _policy: RefreshPolicy):
        self.drift = _drift
        self.tree = _tree
        self._config = dict(_config)
        self._config.setdefault("backproject_ridge", BACKPROJECT_RIDGE)  # files written before it existed
        self._config.setdefault("drift", "nystrom")
        self._config.setdefault("corrector_options", None)
        # encoder dimension d: what Wᵀ φ returns
        self._dim = _encoder_dim(_drift)
        self.policy = _policy
        self.sampler = SoftmaxSampler(_tree, **{k: _config[k] for k in _SAMPLER_KEYS})
        self.log: list[dict[str, Any]] = []
        self.epoch = 0  # landmark refreshes since the last full refresh
        self.needs_full_refresh = False
        self.drift_estimate: float | None = None  # running relative RMS prediction error
        self._moved = 0
        self._fresh_epoch: dict[int, int] = {}  # id -> epoch its fresh vector was set at
        self._top_radius: dict[int, float] = {}
        self._version = 0  # this object's own writes; see `version`
        self._record_top_radii(reset=True)
        self._update_backprojection()

    @classmethod
    def build(
        cls,
        vectors,
        ids=None,
        *,
        n_landmarks: int | None = None,
        kernel: str = "linear",
        landmarks="kcenter",
        ridge: float = 1e-6,
        eig_floor: float = 1e-10,
        residual: bool = True,
        bandwidth: float | None = None,
        max_rank: int | None = None,
        temperature: float = 1.0,
        mode: str = "exact",
        tolerance: float = 0.05,
        budget: int | None = None,
        policy: RefreshPolicy | None = None,
        backproject_ridge: float = BACKPROJECT_RIDGE,
        drift: str | DriftModel = "nystrom",
        corrector_options: dict | None = None,
        seed: int = 0,
        progress: bool = False,
        **tree_shape: Any,
    ) -> DynamicIndex:
        """Build from the targets' current (to-be-stale) vectors. Model options as in
        NystromDrift; sampler options as in SoftmaxSampler; tree shape as in TreeIndex.build.

        backproject_ridge: relative ridge of the write-back of re-encoded and added
            targets (λ = backproject_ridge · σ_max(W)²; module docstring, docs/drift.md).
            0 gives the exact least-norm change, which can blow up when W is
            ill-conditioned; larger values keep φ near its old value at a small bias.
            (Query-side models only: a target-side model's tree takes fresh vectors as is.)
        drift: "nystrom" (NystromDrift with the model options above), "corrector"
            (CorrectorDrift with `corrector_options`: hidden, normalize, ridge, lr,
            steps_per_fit, batch_size, buffer_size, weight_decay, seed), or a DriftModel
            instance over exactly the ids given (its features are what the tree holds;
            `full_refresh` rebuilds a NystromDrift or CorrectorDrift instance with its
            options, and refuses other classes).
        """
        backproject_ridge = check_number(backproject_ridge, "backproject_ridge")
        model, kind, options = _resolve_drift(drift, corrector_options, vectors, ids)
        config = dict(
            drift=kind,
            corrector_options=options,
            n_landmarks=n_landmarks,
            kernel=kernel,
            landmarks=landmarks,
            ridge=ridge,
            eig_floor=eig_floor,
            residual=residual,
            bandwidth=bandwidth,
            max_rank=max_rank,
            temperature=temperature,
            mode=mode,
            tolerance=tolerance,
            budget=budget,
            backproject_ridge=float(backproject_ridge),
            seed=seed,
            tree_shape=check_shape_options(tree_shape),
        )
        if isinstance(model, NystromDrift):  # full_refresh rebuilds it with its own options
            config.update(_nystrom_options(model))
        drift, tree = cls._make(vectors, ids, config, seed, progress, model)
        out = cls(_drift=drift, _tree=tree, _config=config, _policy=policy or RefreshPolicy())
        out._note(
            "build", "built", n=len(tree), feature_dim=drift.dim, rank=getattr(drift, "rank", drift.dim), drift=kind
        )
        return out

    @staticmethod
    def _make(
        vectors, ids, config: dict, seed: int, progress: bool, model: DriftModel | None = None
    ) -> tuple[DriftModel, TreeIndex]:
        drift = _new_model(vectors, ids, config, seed, progress) if model is None else model
        tree = TreeIndex.build(drift.features(), drift.ids, seed=seed, progress=progress, **config["tree_shape"])
        return drift, tree

    # ------------------------------------------------------------- accessors
    def __len__(self) -> int:
        return len(self.tree)

    @property
    def ids(self) -> np.ndarray:
        return self.tree.ids

    @property
    def dim(self) -> int:
        """Encoder dimension d (queries and vectors)."""
        return self._dim

    @property
    def landmark_ids(self) -> np.ndarray:
        """Ids whose fresh vectors `refresh_landmarks` expects, in this order (empty for
        a model without landmarks, e.g. the corrector). A landmark removed from the index
        stays in the model: keep supplying its fresh vector."""
        lm = getattr(self.drift, "landmark_ids", None)
        return np.empty(0, np.int64) if lm is None else np.array(lm, np.int64)

    @property
    def fresh_ids(self) -> np.ndarray:
        """Ids re-encoded or added since the last full refresh."""
        return np.array(sorted(self._fresh_epoch), np.int64)

    @property
    def version(self) -> tuple[int, int, int]:
        """An opaque value (compare with ==) that changes with every write: refresh,
        reencode, add, remove, rebuild, full refresh, and direct writes to `tree`.
        `TreeNegativeSampler` uses it to refuse results computed across a write."""
        return (self._version, id(self.tree), self.tree.version)

    def predict(self, ids) -> np.ndarray:
        """The vectors the sampler is exact for, (n, d) float32: Wᵀ φ(y) for a query-side
        model; the vectors the tree holds (predictions, fresh vectors) for a target-side one."""
        return self.drift.predict_from_features(self.tree.vectors(ids))

    def __repr__(self) -> str:
        return (
            f"DynamicIndex(n={len(self)}, dim={self.dim}, epoch={self.epoch}, fresh={len(self._fresh_epoch)}, "
            f"drift={self.drift!r})"
        )

    # ------------------------------------------------------------- per step
    def refresh_landmarks(self, fresh_landmark_vectors, *, holdout_ids=None, holdout_vectors=None) -> DriftFit:
        """Refit W from the landmarks' fresh vectors (rows in `landmark_ids` order).

        Cost O(m·p·d); the tree is not touched. Hold-out targets (ids in the index and
        their fresh vectors) give an estimate of the prediction error, which feeds the
        policy; they are not re-encoded into the index (call `reencode` for that).
        Only for models with landmarks (Nyström); `refit` works with every model.
        """
        if not (self.drift.query_side and hasattr(self.drift, "landmark_ids")):
            raise TypeError(
                f"refresh_landmarks: the {self._config['drift']} drift model has no landmarks; "
                "use refit(fresh_vectors, ids) (or refit() to train on the pairs reencode() observed)"
            )
        fit = self.drift.fit(fresh_landmark_vectors)
        return self._after_fit(fit, holdout_ids, holdout_vectors, "refresh_landmarks", "refit W")

    def refit(self, fresh_vectors=None, ids=None, *, holdout_ids=None, holdout_vectors=None) -> DriftFit:
        """Refit the drift model, then bring the tree in line with it.

        Nyström: fresh_vectors are the landmarks' (ids None: `landmark_ids` order, else a
        permutation of them) — the same as `refresh_landmarks`; the tree is not touched.
        Corrector: the given (fresh, ids) pairs, if any, join its replay buffer (which
        `reencode` fills anyway), it trains, and every target not re-encoded or added
        since the last full refresh moves to its new prediction (`TreeIndex.update` in
        chunks, O(N·d·h) + N tree moves; counted as moved, so the policy rebuilds).
        Hold-out targets as in `refresh_landmarks`.
        """
        fit = self.drift.fit(fresh_vectors, ids)
        if not self.drift.query_side:
            self._version += 1
            self._move_to_predictions()
        return self._after_fit(fit, holdout_ids, holdout_vectors, "refit", "refit the drift model")

    def _after_fit(self, fit: DriftFit, holdout_ids, holdout_vectors, event: str, action: str) -> DriftFit:
        self._version += 1
        self.epoch += 1
        self._update_backprojection()
        if holdout_ids is not None or holdout_vectors is not None:
            if holdout_ids is None or holdout_vectors is None:
                raise ValueError("holdout: give both holdout_ids and holdout_vectors")
            fit = replace(
                fit,
                holdout=self._error(
                    as_ids(holdout_ids, None), as_vectors(holdout_vectors, self.dim, "holdout_vectors")
                ),
            )
            self._track(fit.holdout)
        self._note(
            event,
            action,
            landmark_residual=fit.landmark_residual,
            holdout=None if fit.holdout is None else fit.holdout.predicted,
        )
        self._apply_policy()
        return fit

    def _move_to_predictions(self) -> None:
        """Target-side model: targets not fresh since the last full refresh take their new predictions."""
        ids = self.tree.ids
        ids = ids[np.isin(ids, self.drift.ids) & ~np.isin(ids, self.fresh_ids)]
        step = max(1, _MOVE_CHUNK_ELEMS // max(self.tree.dim, 1))
        for a in range(0, ids.size, step):
            chunk = ids[a : a + step]
            self.tree.update(self.drift.features(chunk), chunk)
        self._moved += int(ids.size)
        self._note("refit", "moved targets to their new predictions", n=int(ids.size))

    def sample(self, queries, k: int, *, exclude=None, seed: int | None = None) -> SampleResult:
        """Softmax samples over the predicted vectors for encoder-space queries
        (SoftmaxSampler.sample on W q; exact mode is exact w.r.t. `predict`)."""
        return self.sampler.sample(self.drift.transform_queries(queries), k, exclude=exclude, seed=seed)

    def search(self, queries, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by inner product with the predicted vectors."""
        return self.tree.search(self.drift.transform_queries(queries), k, exclude=exclude)

    def reencode(self, fresh_vectors, ids) -> DriftReport:
        """Targets re-encoded anyway: from now on they score with their fresh vectors.

        Returns the prediction error of these targets before the update (a free,
        hard-negative-weighted estimate of the drift error; it feeds the policy).
        Arguments in the order of `build` (the old (ids, vectors) order still works,
        with a DeprecationWarning).
        """
        fresh_vectors, ids = vectors_then_ids(fresh_vectors, ids, "reencode")
        ids_arr = as_ids(ids, None)
        fresh = as_vectors(fresh_vectors, self.dim, "fresh_vectors")
        if fresh.shape[0] != ids_arr.shape[0]:
            raise ValueError(f"reencode: {ids_arr.shape[0]} ids but {fresh.shape[0]} vectors")
        phi_old = self.tree.vectors(ids_arr)  # KeyError before anything changes
        err = self._error(ids_arr, fresh, phi_old)
        known = np.isin(ids_arr, self.drift.ids)  # added targets have no stale vector
        if known.any():
            self.drift.observe(fresh[known], ids_arr[known])  # free training pairs
        self._version += 1
        self.tree.update(self._backproject(phi_old, fresh, "reencode"), ids_arr)
        self._mark_fresh(ids_arr)
        self._track(err)
        self._note(
            "reencode", "updated in place", n=int(ids_arr.size), predicted_error=err.predicted, stale_error=err.stale
        )
        self._apply_policy()
        return err

    def add(self, vectors, ids) -> None:
        """Add targets with their current vectors (new ids), in the order of `build`
        (the old (ids, vectors) order still works, with a DeprecationWarning)."""
        vectors, ids = vectors_then_ids(vectors, ids, "add")
        ids_arr = as_ids(ids, None)
        x = as_vectors(vectors, self.dim, "vectors")
        if x.shape[0] != ids_arr.shape[0]:
            raise ValueError(f"add: {ids_arr.shape[0]} ids but {x.shape[0]} vectors")
        phi0 = self.drift.features_of(x) if self.drift.query_side else x  # target-side: x is stored as is
        phi = self._backproject(phi0, x, "add")
        self._version += 1
        self.tree.insert(phi, ids_arr)  # raises on present ids before changing anything
        self._mark_fresh(ids_arr)
        self._note("add", "inserted", n=int(ids_arr.size))
        self._apply_policy()

    def remove(self, ids) -> None:
        """Remove targets (KeyError if any is unknown; nothing changes then)."""
        ids_arr = as_ids(ids, None)
        self.tree.remove(ids_arr)
        self._version += 1
        for i in ids_arr.tolist():
            self._fresh_epoch.pop(i, None)
        lm = int(np.isin(ids_arr, self.landmark_ids).sum())
        self._note("remove", "removed", n=int(ids_arr.size), landmarks_removed=lm)

    def full_refresh(self, vectors, ids=None, *, progress: bool = False) -> None:
        """Start over from freshly encoded vectors of all targets: new stale base, a new
        drift model of the same kind and options (new landmarks), new features and tree;
        clears `needs_full_refresh`."""
        cfg = self._config
        self.drift, self.tree = self._make(vectors, ids, cfg, cfg["seed"], progress)
        self._dim = _encoder_dim(self.drift)
        self._version += 1
        self.sampler = SoftmaxSampler(self.tree, **{k: cfg[k] for k in _SAMPLER_KEYS})
        self.epoch, self._moved, self.needs_full_refresh, self.drift_estimate = 0, 0, False, None
        self._fresh_epoch.clear()
        self._record_top_radii(reset=True)
        self._update_backprojection()
        self._note("full_refresh", "rebuilt from fresh vectors", n=len(self.tree))

    def rebuild(self, partial: bool = False) -> None:
        """Rebuild the tree over the current features (all, or the grown top-level subtrees)."""
        self._version += 1
        if not partial:
            self.tree.rebuild()
            self._record_top_radii(reset=True)
            self._moved = 0
            self._note("rebuild", "full tree rebuild")
            return
        view = self.tree.view()
        nodes, radius = view.top_nodes, view.arrays.radius
        grown = [
            int(v)
            for v in nodes
            if int(v) in self._top_radius and radius[v] > self.policy.radius_growth * self._top_radius[int(v)]
        ]
        if 2 * len(grown) > len(nodes):
            self._note("rebuild", "partial -> full", grown=len(grown), top=int(len(nodes)))
            return self.rebuild(partial=False)
        for v in grown:
            self.tree.rebuild(v)
        self._record_top_radii(reset=False, nodes=grown)
        self._moved = 0
        self._note("rebuild", "partial tree rebuild", subtrees=len(grown), top=int(len(nodes)))

    def check(self) -> None:
        """TreeIndex invariants plus the consistency of model, tree and bookkeeping."""
        self.tree.check()
        if self.drift.W.shape != (self.tree.dim, self.dim):
            raise ValueError(f"W has shape {self.drift.W.shape}, expected {(self.tree.dim, self.dim)}")
        if self._fresh_epoch and not np.isin(self.fresh_ids, self.tree.ids).all():
            raise ValueError("a re-encoded id is no longer in the tree")

    # ------------------------------------------------------------- internals
    def _update_backprojection(self) -> None:
        # B (d × p) maps an encoder-space residual r (row) to the φ change r B:
        # ridge: B = (WᵀW + λI)⁻¹ Wᵀ, λ = backproject_ridge · σ_max(W)²; 0: pinv(Wᵀ)ᵀ
        if self.drift.query_side:
            self._bp = backprojection(self.drift.W, self._config["backproject_ridge"])
        else:
            self._bp = None  # the tree holds encoder-space vectors: nothing to project

    def _backproject(self, phi0: np.ndarray, fresh: np.ndarray, what: str) -> np.ndarray:
        if not self.drift.query_side:
            self.last_backprojection_error = 0.0
            return np.array(fresh, np.float32)
        W = self.drift.W
        f = fresh.astype(np.float64)
        phi = (phi0.astype(np.float64) + (f - phi0.astype(np.float64) @ W) @ self._bp).astype(np.float32)
        # what the tree will score: φ as stored (float32) through W
        got = phi.astype(np.float64) @ W
        rel = np.linalg.norm(got - f, axis=1) / np.maximum(np.linalg.norm(f, axis=1), 1e-30)
        worst = float(rel.max()) if rel.size else 0.0
        if worst > 1e-2:
            self._note(
                what,
                "inexact",
                worst_relative_error=worst,
                reason="W is ill-conditioned: the ridge keeps poorly determined directions near the old features",
            )
        self.last_backprojection_error = worst
        return phi

    def _error(self, ids: np.ndarray, fresh: np.ndarray, phi: np.ndarray | None = None) -> DriftReport:
        pred = self.drift.predict_from_features(self.tree.vectors(ids) if phi is None else phi)
        # stale baseline: the stale vector where the model has one, else the prediction
        known = np.isin(ids, self.drift.ids)
        stale = pred.copy()
        if known.any():
            stale[known] = self.drift.stale(ids[known])
        return drift_error(pred, stale, fresh)

    def _track(self, err: DriftReport) -> None:
        a = self.policy.drift_ema
        e = err.predicted
        self.drift_estimate = e if self.drift_estimate is None else (1 - a) * self.drift_estimate + a * e

    def _mark_fresh(self, ids: np.ndarray) -> None:
        for i in ids.tolist():
            self._fresh_epoch[i] = self.epoch
        self._moved += int(ids.size)

    def _apply_policy(self) -> None:
        p = self.policy
        if (
            p.max_drift_error is not None
            and not self.needs_full_refresh
            and self.drift_estimate is not None
            and self.drift_estimate > p.max_drift_error
        ):
            self.needs_full_refresh = True
            self._note(
                "policy", "full re-encode recommended", drift_estimate=self.drift_estimate, threshold=p.max_drift_error
            )
        if self._moved > p.max_moved_fraction * max(len(self.tree), 1):
            self._note("policy", f"{p.rebuild} rebuild", moved=self._moved, n=len(self.tree))
            self.rebuild(partial=p.rebuild == "partial")

    def _record_top_radii(self, *, reset: bool, nodes=None) -> None:
        view = self.tree.view()
        if reset:
            self._top_radius = {}
        for v in view.top_nodes.tolist() if len(view) else []:
            if reset or v not in self._top_radius or (nodes is not None and v in nodes):
                self._top_radius[v] = float(view.arrays.radius[v])

    def _note(self, event: str, action: str, **info: Any) -> None:
        entry = dict(event=event, action=action, epoch=self.epoch, **info)
        self.log.append(entry)
        logger.info("%s: %s %s", event, action, {k: v for k, v in info.items()})

    # ------------------------------------------------------------- persistence
    def save(self, path) -> None:
        """Write the whole state to one .npz file atomically (temp file + os.replace);
        the tree is embedded as a TreeIndex file, every array carries a CRC32."""
        path = Path(path)
        if self._config["drift"] not in _MODELS:
            raise TypeError(
                f"save: only the built-in drift models ({', '.join(_MODELS)}) can be saved, "
                f"not {type(self.drift).__name__}"
            )
        with tempfile.TemporaryDirectory(dir=path.parent or ".") as td:
            self.tree.save(Path(td) / "tree.tidx")
            tree_bytes = np.fromfile(Path(td) / "tree.tidx", dtype=np.uint8)
        fresh = np.array(sorted(self._fresh_epoch.items()), np.int64).reshape(-1, 2)
        top = np.array(sorted(self._top_radius.items()), np.float64).reshape(-1, 2)
        arrays = {
            "tree": tree_bytes,
            "fresh": fresh,
            "top_radius": top,
            **{f"drift_{k}": np.ascontiguousarray(v) for k, v in self.drift.state().items()},
        }
        cfg = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self._config.items()}
        meta = dict(
            format_version=FORMAT_VERSION,
            config=cfg,
            policy=asdict(self.policy),
            epoch=self.epoch,
            moved=self._moved,
            needs_full_refresh=self.needs_full_refresh,
            drift_estimate=self.drift_estimate,
            log=self.log,
            crc32={k: crc32(v) for k, v in arrays.items()},
        )
        arrays["meta"] = np.frombuffer(json.dumps(meta, default=_json_default).encode(), np.uint8)
        with atomic_write(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path) -> DynamicIndex:
        """Read a file written by `save`; verifies checksums, the tree's invariants and
        the consistency of model and tree. Raises IndexFileError when anything is off."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(bytes(arrays.pop("meta")).decode())
        except IndexFileError:
            raise
        except Exception as e:  # zip CRC, truncation, bad JSON ...
            raise IndexFileError(f"{path}: not a readable DynamicIndex file ({type(e).__name__}: {e})") from None
        if meta.get("format_version") not in _READABLE_VERSIONS:
            raise IndexFileError(
                f"{path}: format version {meta.get('format_version')}, this treeidx reads {_READABLE_VERSIONS}"
            )
        for k, c in meta["crc32"].items():
            if k not in arrays or crc32(arrays[k]) != c:
                raise IndexFileError(f"{path}: array '{k}' missing or corrupted (checksum mismatch)")
        with tempfile.TemporaryDirectory(dir=path.parent or ".") as td:
            arrays["tree"].tofile(Path(td) / "tree.tidx")
            tree = TreeIndex.load(Path(td) / "tree.tidx")
        try:
            cfg = meta["config"]
            model_cls = _MODELS[cfg.get("drift", "nystrom")]  # version 1: Nyström
            drift = model_cls.from_state({k[6:]: v for k, v in arrays.items() if k.startswith("drift_")})
            out = cls(_drift=drift, _tree=tree, _config=cfg, _policy=RefreshPolicy(**meta["policy"]))
            out.epoch, out._moved = int(meta["epoch"]), int(meta["moved"])
            out.needs_full_refresh, out.drift_estimate = bool(meta["needs_full_refresh"]), meta["drift_estimate"]
            out.log = list(meta["log"])
            out._fresh_epoch = {int(i): int(e) for i, e in arrays["fresh"]}
            out._top_radius = {int(v): float(r) for v, r in arrays["top_radius"]}
            out.check()
        except (KeyError, ValueError, TypeError) as e:
            raise IndexFileError(f"{path}: inconsistent DynamicIndex state ({e})") from None
        return out


def _resolve_drift(drift, options, vectors, ids) -> tuple[DriftModel | None, str, dict | None]:
    """(model instance or None, kind, corrector options) for `build`'s drift arguments."""
    if isinstance(drift, str):
        if drift not in _MODELS:
            raise ValueError(f"drift: expected 'nystrom', 'corrector' or a DriftModel instance, got {drift!r}")
        if options is not None and drift != "corrector":
            raise ValueError("corrector_options: only with drift='corrector'")
        opts = dict(options or {})
        unknown = sorted(set(opts) - set(_CORRECTOR_KEYS))
        if unknown:
            raise ValueError(
                f"corrector_options: unknown option(s) {unknown}; expected some of {list(_CORRECTOR_KEYS)}"
            )
        return None, drift, (opts if drift == "corrector" else None)
    if not isinstance(drift, DriftModel):
        raise TypeError(f"drift: expected 'nystrom', 'corrector' or a DriftModel instance, got {type(drift).__name__}")
    if options is not None:
        raise ValueError("corrector_options: not with a model instance (it has its own options)")
    x = as_vectors(vectors, None, "vectors")
    want = np.arange(x.shape[0], dtype=np.int64) if ids is None else as_ids(ids, x.shape[0])
    have = np.asarray(drift.ids, np.int64)
    if have.size != want.size or not np.array_equal(np.sort(have), np.sort(want)):
        raise ValueError(
            f"drift: the model covers {have.size} ids, the index {want.size}; a model instance must "
            "cover exactly the ids given to build (same set)"
        )
    if isinstance(drift, CorrectorDrift):
        return drift, "corrector", {k: getattr(drift, k) for k in _CORRECTOR_KEYS}
    return drift, "nystrom" if isinstance(drift, NystromDrift) else "custom", None


def _encoder_dim(model: DriftModel) -> int:
    """The encoder dimension d of a drift model: the width of what Wᵀ φ returns."""
    return int(model.predict_from_features(np.zeros((0, model.dim), np.float32)).shape[1])


def _nystrom_options(model: NystromDrift) -> dict:
    """The build config a NystromDrift instance stands for (new k-center landmarks at a full refresh)."""
    opts = {k: getattr(model, k) for k in ("kernel", "ridge", "eig_floor", "residual", "bandwidth", "max_rank")}
    return dict(opts, n_landmarks=model.n_landmarks, landmarks="kcenter")


def _new_model(vectors, ids, config: dict, seed: int, progress: bool) -> DriftModel:
    """A fresh drift model of the configured kind over `vectors`."""
    if config["drift"] == "corrector":
        return CorrectorDrift(vectors, ids=ids, **{"seed": seed, **(config["corrector_options"] or {})})
    if config["drift"] != "nystrom":
        raise TypeError(
            "full_refresh: a custom drift model cannot be rebuilt from vectors; "
            "build a new DynamicIndex with a new model"
        )
    lm = config["landmarks"]
    return NystromDrift(
        vectors,
        ids=ids,
        n_landmarks=config["n_landmarks"] if isinstance(lm, str) else None,
        seed=seed,
        progress=progress,
        **{k: config[k] for k in _MODEL_KEYS},
    )


def backprojection(W: np.ndarray, ridge: float) -> np.ndarray:
    """The (d × p) matrix B with φ_new = φ_old + (v − Wᵀ φ_old) B (rows), the minimiser of
    ‖Wᵀ φ − v‖² + λ ‖φ − φ_old‖² with λ = ridge · σ_max(W)²: B = (WᵀW + λI)⁻¹ Wᵀ, a d × d
    solve in float64. ridge = 0: the least-norm exact change pinv(Wᵀ)ᵀ."""
    W = np.asarray(W, np.float64)
    if ridge == 0:
        return np.linalg.pinv(W.T, rcond=1e-12).T
    lam = ridge * float(np.linalg.norm(W, 2)) ** 2
    d = W.shape[1]
    return np.linalg.solve(W.T @ W + lam * np.eye(d), W.T)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
