"""CorrectorDrift: a small network from stale to current target vectors, trained online.

After Monath et al. (2024), "A fresh take on stale embeddings": instead of re-encoding
all targets, learn a corrector g ↦ g' on the (stale, fresh) pairs of the targets the
training loop encodes anyway (positives and sampled negatives) — no extra encoder
cost. Model (d = encoder dimension, h = hidden width):

    pred(g) = g + g A + relu(g W1 + b1) W2 + b2        (then ‖·‖ = 1 if normalize)

* A (d × d) is the linear corrector: at every `fit` it is solved in closed form, the
  ridge regression toward the identity on the replay buffer (G stale, F fresh rows),
      A = (GᵀG + λI)⁻¹ Gᵀ(F − G − M(G)),   λ = ridge · trace(GᵀG)/d,
  where M(G) = relu(G W1 + b1) W2 + b2 is the network's current output (0 before the
  first training step, since W2 and b2 start at 0 — so an untrained corrector predicts
  exactly the ridge map). A is then frozen for the Adam steps: block-coordinate
  descent, exact for A, Adam for the network. Freezing it keeps the linear part the
  regularised optimum (the network cannot trade it away on a small buffer) and makes
  `steps_per_fit=0` a plain ridge corrector.
* The network (W1, b1, W2, b2) is trained by `steps_per_fit` Adam steps per `fit` on
  the mean squared error over minibatches of the buffer, and stays warm across fits.
  Minibatches come from a seeded Generator whose state is part of `state()`, and the
  arithmetic is plain float64 numpy (as in NystromDrift), so the same seed and the
  same calls give identical predictions. Nothing is ever held for the whole buffer in
  float64: the closed form and the diagnostics accumulate over chunks of a few MB.
* The replay buffer holds one (stale, fresh) pair per target id: the most recent
  `buffer_size` observations, a re-observed id replacing its older pair.

`normalize=True` L2-normalises predictions: sentence encoders (e.g. all-MiniLM-L6-v2
with its Normalize module) output unit vectors, and so should the corrected ones. The
network is trained on the unnormalised output against the (unit) fresh vectors.

The model is target-side (`query_side = False`): its features are its predictions
(φ = pred, p = d, W = I), so `DynamicIndex` keeps the predictions in its tree and moves
them after each refit. Cost: a fit is O(B·d² + steps · batch · d · h); predicting N
targets is O(N·d·(d + h)), done in chunks of a few MB (1M × 384 fits in memory).
"""

from __future__ import annotations

import json

import numpy as np

from ._validate import as_ids, as_vectors, check_int, check_number, check_positive_int, check_seed
from .drift import DriftFit, DriftReport, RowLookup, drift_error

__all__ = ["CorrectorDrift"]

_CHUNK_ELEMS = 1 << 19  # float64 elements per prediction chunk (4 MB)
_ADAM_B1, _ADAM_B2, _ADAM_EPS = 0.9, 0.999, 1e-8
_PARAMS = ("W1", "b1", "W2", "b2")  # trained by Adam; A is solved in closed form


class CorrectorDrift:
    """Online-trained corrector network over stale target vectors (module docstring).

    stale_vectors: (N, d) stale target vectors; ids: N unique ints (default 0..N-1).
    hidden: width h of the hidden layer. normalize: L2-normalise predictions.
    ridge: relative ridge of the linear part (× trace(GᵀG)/d). lr, weight_decay: Adam
        step size and decoupled weight decay (on W1, W2). steps_per_fit: Adam steps per
        `fit` (0: the ridge map alone). batch_size: minibatch rows. buffer_size: pairs
        kept (the most recent, one per id). seed: initialisation and minibatches.
    """

    query_side = False

    def __init__(
        self,
        stale_vectors,
        *,
        ids=None,
        hidden: int = 256,
        normalize: bool = False,
        ridge: float = 1e-2,
        lr: float = 1e-3,
        steps_per_fit: int = 200,
        batch_size: int = 256,
        buffer_size: int = 65536,
        weight_decay: float = 0.0,
        seed: int = 0,
    ):
        self.hidden = check_positive_int(hidden, "hidden")
        self.normalize = bool(normalize)
        self.ridge = check_number(ridge, "ridge")
        self.lr = check_number(lr, "lr", strict=True)
        self.steps_per_fit = check_int(steps_per_fit, "steps_per_fit", minimum=0)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.buffer_size = check_positive_int(buffer_size, "buffer_size")
        self.weight_decay = check_number(weight_decay, "weight_decay")
        self.seed = check_seed(seed)
        g = as_vectors(stale_vectors, None, "stale_vectors")
        n, d = g.shape
        self._G = g
        self._ids = np.arange(n, dtype=np.int64) if ids is None else as_ids(ids, n)
        self._rows_of = RowLookup(self._ids)  # id -> row, by binary search
        self._rng = np.random.default_rng(self.seed)
        rms = float(np.sqrt(np.mean(np.einsum("ij,ij->i", g, g, dtype=np.float64))))
        h = self.hidden
        self.params: dict[str, np.ndarray] = {
            "A": np.zeros((d, d)),
            "W1": self._rng.standard_normal((d, h)) * (np.sqrt(2.0) / max(rms, 1e-30)),
            "b1": np.zeros(h),
            "W2": np.zeros((h, d)),
            "b2": np.zeros(d),
        }
        self._adam = {f"{k}_{s}": np.zeros_like(self.params[k]) for k in _PARAMS for s in ("m", "v")}
        self._t = 0  # Adam steps taken
        cap = min(self.buffer_size, n)
        self._slot_of_row = np.full(n, -1, np.int64)  # target row -> buffer slot
        self._buf_row = np.full(cap, -1, np.int64)  # slot -> target row (-1: free)
        self._buf_fresh = np.zeros((cap, d), np.float32)
        self._buf_stamp = np.zeros(cap, np.int64)  # observation counter at the pair's arrival
        self._clock = 0
        self.last_fit: DriftFit | None = None

    # ------------------------------------------------------------- accessors
    @property
    def ids(self) -> np.ndarray:
        return self._ids.copy()

    @property
    def dim(self) -> int:
        """Feature dimension p = d (the features are the predicted vectors)."""
        return int(self._G.shape[1])

    @property
    def W(self) -> np.ndarray:
        """The query-side map, the identity (d × d): predictions are the features."""
        return np.eye(self.dim)

    @property
    def buffer_ids(self) -> np.ndarray:
        """Ids with a pair in the replay buffer, oldest observation first."""
        return self.buffer()[0]

    def buffer(self) -> tuple[np.ndarray, np.ndarray]:
        """The replay buffer, oldest observation first: (ids, fresh vectors) (copies)."""
        used = np.flatnonzero(self._buf_row >= 0)
        used = used[np.argsort(self._buf_stamp[used], kind="stable")]
        return self._ids[self._buf_row[used]], self._buf_fresh[used].copy()

    def stale(self, ids) -> np.ndarray:
        """The stale vectors of `ids` (KeyError for unknown ids)."""
        return self._G[self._rows_of(as_ids(ids, None))]

    # ------------------------------------------------------------- prediction
    def _forward(self, g: np.ndarray) -> np.ndarray:
        """Unnormalised prediction of float64 rows g."""
        p = self.params
        hid = np.maximum(g @ p["W1"] + p["b1"], 0.0)
        return g + g @ p["A"] + hid @ p["W2"] + p["b2"]

    def features_of(self, vectors) -> np.ndarray:
        """Predictions for arbitrary stale-space vectors, (n, d) float32, in chunks."""
        y = as_vectors(vectors, self.dim, "vectors", allow_empty=True)
        out = np.empty(y.shape, np.float32)
        step = max(1, _CHUNK_ELEMS // (self.hidden + self.dim))
        for a in range(0, y.shape[0], step):
            pred = self._forward(y[a : a + step].astype(np.float64))
            if self.normalize:
                pred /= np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-30)
            out[a : a + step] = pred
        return out

    def features(self, ids=None) -> np.ndarray:
        """φ = the predicted vectors of the targets (all, in `ids` order, or of `ids`)."""
        return self.features_of(self._G if ids is None else self.stale(ids))

    def predict(self, ids) -> np.ndarray:
        """Predicted current vectors of stale targets `ids`, (n, d) float32."""
        return self.features(as_ids(ids, None))

    def predict_from_features(self, phi) -> np.ndarray:
        """The identity (validated, float32): the features are the predictions."""
        return as_vectors(phi, self.dim, "features", allow_empty=True).copy()

    def transform_queries(self, queries) -> np.ndarray:
        """The identity (validated, float32): drift is applied on the target side."""
        return as_vectors(queries, self.dim, "queries").copy()

    def evaluate(self, ids, fresh_vectors) -> DriftReport:
        """Prediction error of `ids` against their known fresh vectors (and the stale baseline)."""
        ids_arr = as_ids(ids, None)
        fresh = as_vectors(fresh_vectors, self.dim, "fresh_vectors")
        if fresh.shape[0] != ids_arr.shape[0]:
            raise ValueError(f"evaluate: {ids_arr.shape[0]} ids but {fresh.shape[0]} vectors")
        return drift_error(self.predict(ids_arr), self.stale(ids_arr), fresh)

    # ------------------------------------------------------------- training data
    def _pairs(self, fresh_vectors, ids, where: str) -> tuple[np.ndarray, np.ndarray]:
        """Validated (target rows, fresh vectors); raises before anything changes."""
        if ids is None:
            ids_arr = self._ids
        else:
            ids_arr = as_ids(ids, None)
        fresh = as_vectors(fresh_vectors, self.dim, "fresh_vectors")
        if fresh.shape[0] != ids_arr.shape[0]:
            raise ValueError(
                f"{where}: {ids_arr.shape[0]} ids{' (all targets: ids=None)' if ids is None else ''} "
                f"but {fresh.shape[0]} fresh vectors"
            )
        return self._rows_of(ids_arr), fresh

    def observe(self, fresh_vectors, ids) -> None:
        """Add (stale, fresh) pairs of targets `ids` to the replay buffer (no training).

        KeyError for ids not in the model, ValueError for bad vectors or duplicate ids;
        nothing changes then. A re-observed id replaces its older pair; when the buffer
        is full the oldest pairs are dropped (only the last `buffer_size` of one call
        are kept if it alone exceeds the buffer).
        """
        if ids is None:
            raise ValueError("observe: ids are required (the targets the fresh vectors belong to)")
        rows, fresh = self._pairs(fresh_vectors, ids, "observe")
        self._store(rows, fresh)

    def _store(self, rows: np.ndarray, fresh: np.ndarray) -> None:
        cap = self._buf_row.size
        rows, fresh = rows[-cap:], fresh[-cap:]
        slots = self._slot_of_row[rows]
        new = slots < 0
        n_free = int((self._buf_row < 0).sum())
        need = int(new.sum()) - n_free
        if need > 0:  # evict the oldest pairs not re-observed by this call
            used = np.flatnonzero(self._buf_row >= 0)
            cand = np.setdiff1d(used, slots[~new], assume_unique=True)
            old = cand[np.argsort(self._buf_stamp[cand], kind="stable")[:need]]
            self._slot_of_row[self._buf_row[old]] = -1
            self._buf_row[old] = -1
        free = np.flatnonzero(self._buf_row < 0)[: int(new.sum())]
        slots = slots.copy()
        slots[new] = free
        self._buf_row[slots] = rows
        self._slot_of_row[rows] = slots
        self._buf_fresh[slots] = fresh
        self._buf_stamp[slots] = self._clock + np.arange(rows.size)
        self._clock += int(rows.size)

    def _used(self) -> tuple[np.ndarray, np.ndarray]:
        """(target rows, buffer slots) of the stored pairs, in slot order (deterministic)."""
        used = np.flatnonzero(self._buf_row >= 0)
        return self._buf_row[used], used

    def _chunks(self, rows: np.ndarray, slots: np.ndarray):
        """(stale, fresh) float64 chunks of the buffer, a few MB each (never all of it)."""
        step = max(1, _CHUNK_ELEMS // (self.hidden + self.dim))
        for a in range(0, rows.size, step):
            yield (
                self._G[rows[a : a + step]].astype(np.float64),
                self._buf_fresh[slots[a : a + step]].astype(np.float64),
            )

    # ------------------------------------------------------------- training
    def fit(self, fresh_vectors=None, ids=None, *, holdout_ids=None, holdout_vectors=None) -> DriftFit:
        """Observe the given pairs (if any; ids=None: one row per target, in `ids`
        order), re-solve A, then take `steps_per_fit` Adam steps on the buffer.

        ValueError when the buffer is still empty. Optional holdout: extra re-encoded
        targets (ids in this model and their fresh vectors) to estimate the error on
        all targets. landmark_residual is the relative RMS error on the buffer.
        """
        if (holdout_ids is None) != (holdout_vectors is None):
            raise ValueError("holdout: give both holdout_ids and holdout_vectors")
        if holdout_ids is not None:  # validate before changing anything
            self._pairs(holdout_vectors, holdout_ids, "fit holdout")
        if fresh_vectors is None and ids is not None:
            raise ValueError("fit: ids given without fresh_vectors")
        pairs = None if fresh_vectors is None else self._pairs(fresh_vectors, ids, "fit")
        if pairs is None and not (self._buf_row >= 0).any():
            raise ValueError(
                "fit: the replay buffer is empty; pass fresh_vectors and ids, or observe() (stale, fresh) pairs first"
            )
        if pairs is not None:
            self._store(*pairs)
        rows, slots = self._used()
        self._solve_linear(rows, slots)
        for _ in range(self.steps_per_fit):
            batch = self._rng.integers(0, rows.size, min(self.batch_size, rows.size))
            g = self._G[rows[batch]].astype(np.float64)
            self._adam_step(g, self._buf_fresh[slots[batch]].astype(np.float64))
        err = den = 0.0
        for g, f in self._chunks(rows, slots):
            err += float(((self.features_of(g) - f) ** 2).sum())
            den += float((f**2).sum())
        hold = None if holdout_ids is None else self.evaluate(holdout_ids, holdout_vectors)
        self.last_fit = DriftFit(landmark_residual=float(np.sqrt(err / max(den, 1e-300))), holdout=hold, rank=self.dim)
        return self.last_fit

    def _solve_linear(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """A = (GᵀG + λI)⁻¹ Gᵀ(F − G − M(G)), λ = ridge · trace(GᵀG)/d (float64, accumulated in chunks)."""
        p = self.params
        d = self.dim
        gram, rhs = np.zeros((d, d)), np.zeros((d, d))
        for g, f in self._chunks(rows, slots):
            gram += g.T @ g
            rhs += g.T @ (f - g - (np.maximum(g @ p["W1"] + p["b1"], 0.0) @ p["W2"] + p["b2"]))
        lam = self.ridge * float(np.trace(gram)) / d
        p["A"] = np.linalg.lstsq(gram + lam * np.eye(d), rhs, rcond=None)[0]

    def _adam_step(self, g: np.ndarray, f: np.ndarray) -> None:
        """One Adam step of the network on the minibatch MSE (mean over rows of ‖·‖²)."""
        p = self.params
        z = g @ p["W1"] + p["b1"]
        hid = np.maximum(z, 0.0)
        err = g + g @ p["A"] + hid @ p["W2"] + p["b2"] - f
        d_out = (2.0 / g.shape[0]) * err
        d_z = (d_out @ p["W2"].T) * (z > 0)
        grads = {"W2": hid.T @ d_out, "b2": d_out.sum(0), "W1": g.T @ d_z, "b1": d_z.sum(0)}
        self._t += 1
        c1, c2 = 1.0 - _ADAM_B1**self._t, 1.0 - _ADAM_B2**self._t
        for k in _PARAMS:
            m, v = self._adam[f"{k}_m"], self._adam[f"{k}_v"]
            m *= _ADAM_B1
            m += (1.0 - _ADAM_B1) * grads[k]
            v *= _ADAM_B2
            v += (1.0 - _ADAM_B2) * grads[k] ** 2
            if self.weight_decay and k in ("W1", "W2"):
                p[k] *= 1.0 - self.lr * self.weight_decay
            p[k] -= self.lr * (m / c1) / (np.sqrt(v / c2) + _ADAM_EPS)

    def __repr__(self) -> str:
        return (
            f"CorrectorDrift(n={self._G.shape[0]}, dim={self.dim}, hidden={self.hidden}, "
            f"normalize={self.normalize}, buffer={int((self._buf_row >= 0).sum())}/{self._buf_row.size}, "
            f"adam_steps={self._t})"
        )

    # ------------------------------------------------------------- persistence
    def state(self) -> dict[str, np.ndarray]:
        """Arrays that restore this model exactly: parameters, Adam moments, the replay
        buffer and the minibatch generator (a loaded model keeps training the same way)."""
        cfg = dict(
            hidden=self.hidden,
            normalize=self.normalize,
            ridge=self.ridge,
            lr=self.lr,
            steps_per_fit=self.steps_per_fit,
            batch_size=self.batch_size,
            buffer_size=self.buffer_size,
            weight_decay=self.weight_decay,
            seed=self.seed,
            adam_t=self._t,
            clock=self._clock,
            rng=self._rng.bit_generator.state,
        )
        return dict(
            kind=np.frombuffer(b"corrector", np.uint8).copy(),
            cfg=np.frombuffer(json.dumps(cfg).encode(), np.uint8).copy(),
            stale=self._G,
            ids=self._ids,
            buf_row=self._buf_row,
            buf_fresh=self._buf_fresh,
            buf_stamp=self._buf_stamp,
            **{f"p_{k}": v for k, v in self.params.items()},
            **{f"adam_{k}": v for k, v in self._adam.items()},
        )

    @classmethod
    def from_state(cls, st: dict[str, np.ndarray]) -> CorrectorDrift:
        """The model `state()` was taken from (ValueError if the arrays do not fit together)."""
        cfg = json.loads(bytes(np.asarray(st["cfg"], np.uint8)).decode())
        keys = ("hidden", "normalize", "ridge", "lr", "steps_per_fit", "batch_size", "buffer_size", "weight_decay")
        self = cls(st["stale"], ids=st["ids"], seed=int(cfg["seed"]), **{k: cfg[k] for k in keys})
        for k, v in self.params.items():
            if st[f"p_{k}"].shape != v.shape:
                raise ValueError(f"corrector state: parameter {k} has shape {st[f'p_{k}'].shape}, expected {v.shape}")
            self.params[k] = np.asarray(st[f"p_{k}"], np.float64).copy()
        for k in self._adam:
            self._adam[k] = np.asarray(st[f"adam_{k}"], np.float64).copy()
        if st["buf_row"].shape != self._buf_row.shape:
            got = st["buf_row"].shape[0]
            raise ValueError(f"corrector state: buffer of {got} slots, expected {self._buf_row.size}")
        self._buf_row = np.asarray(st["buf_row"], np.int64).copy()
        self._buf_fresh = np.asarray(st["buf_fresh"], np.float32).copy()
        self._buf_stamp = np.asarray(st["buf_stamp"], np.int64).copy()
        used = np.flatnonzero(self._buf_row >= 0)
        if used.size and (self._buf_row[used].max() >= self._G.shape[0]):
            raise ValueError("corrector state: a buffer slot points past the stale targets")
        self._slot_of_row[:] = -1
        self._slot_of_row[self._buf_row[used]] = used
        self._t, self._clock = int(cfg["adam_t"]), int(cfg["clock"])
        self._rng.bit_generator.state = cfg["rng"]
        return self
