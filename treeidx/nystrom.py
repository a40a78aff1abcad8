"""NystromDrift: predict the current encoder's target vectors from a few re-encoded landmarks.

Model (docs/drift.md). Stale vectors G (encoded at the last full refresh),
landmarks L ⊂ Y, their fresh vectors G'_L. With a kernel k on stale vectors,
K = k(G_L, G_L) (float64) and k_L(y) = k(G_L, g(y)):

    residual=False:  g'(y) ≈ G'_Lᵀ K⁺ k_L(y)                  (plain Nyström)
    residual=True:   g'(y) ≈ g(y) + (G'_L − G_L)ᵀ K⁺ k_L(y)   (default)

The residual form regresses the *change*: directions the landmarks do not span, and
targets far from every landmark (RBF), keep their stale vector instead of collapsing
to 0. When the landmarks span the space and the drift is linear, both are exact.

Either way the prediction is linear in a fixed per-target feature φ(y) and a
per-refresh matrix W (p × d):  <q, g'(y)> = <W q, φ(y)>,  g'(y) = Wᵀ φ(y).

* kernel="linear": φ(y) = g(y) (d-dim; the tree is built on the stale vectors and
  never depends on the landmarks), W = [I +] G_Lᵀ K⁺ (G'_L [− G_L]) — a ridge
  least-squares regression of the fresh landmarks on the stale ones.
* kernel="rbf" / "cosine": φ_k(y) = (Λ + ρ)^{-1/2} Uᵀ k_L(y) (r-dim, K = U Λ Uᵀ),
  W_k = (Λ + ρ)^{-1/2} Uᵀ (G'_L [− G_L]); residual: φ = [g; φ_k], W = [I; W_k].

Numerics: K's eigendecomposition (for the linear kernel, the SVD of G_L, whose squared
singular values are K's eigenvalues — no squaring of the condition number) in float64;
eigenvalues below `eig_floor` × the largest are dropped (a truncated pseudo-inverse, so
rank-deficient landmark sets are harmless); the ridge ρ = ridge · trace(K)/m is
relative, hence scale-free. `fit` costs O(m·p·d): no pass over the targets.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ._progress import progress_bar
from ._validate import as_ids, as_vectors, check_positive_int
from .drift import DriftFit, DriftReport, RowLookup, drift_error

__all__ = [
    "NystromDrift",
    "DriftFit",
    "DriftReport",
    "DriftError",
    "drift_error",
    "kcenter",
    "leverage_sample",
    "choose_landmarks",
]

Kernel = Literal["linear", "rbf", "cosine"]
_CHUNK_ELEMS = 1 << 22  # rows per chunk so that chunk × m float64 stays ~32 MB


DriftError = DriftReport  # the old name of DriftReport, kept for existing code


class NystromDrift:
    """Nyström drift model over stale target vectors (see the module docstring).

    A query-side `DriftModel` (treeidx/drift.py): predictions are Wᵀ φ(y) with φ fixed,
    so a fit changes W only and never touches a tree built over φ.

    stale_vectors: (N, d) stale target vectors; ids: N unique ints (default 0..N-1).
    n_landmarks: m, the number of landmarks (optional when `landmarks` is an id array).
    kernel: "linear" (d-dim features), "rbf" or "cosine" (m-dim or rank-dim features).
    landmarks: "kcenter" (greedy farthest point on the stale vectors, seeded first
        point; O(N·m·d)), "uniform", "leverage" (sampled without replacement in
        proportion to the stale vectors' ridge leverage scores; O(N·d²)), or an array
        of landmark ids.
    ridge: relative ridge (× trace(K)/m) added to the kept eigenvalues.
    eig_floor: eigenvalues below eig_floor × λ_max are dropped.
    residual: predict the change g' − g (default) or g' itself (plain Nyström).
    bandwidth: RBF σ in k = exp(−‖a − b‖²/(2σ²)); default sqrt(median squared
        landmark distance / 2).
    max_rank: keep at most this many eigenpairs (caps the feature dimension).
    """

    query_side = True

    def __init__(
        self,
        stale_vectors,
        *,
        n_landmarks: int | None = None,
        kernel: Kernel = "linear",
        landmarks="kcenter",
        ids=None,
        ridge: float = 1e-6,
        eig_floor: float = 1e-10,
        residual: bool = True,
        bandwidth: float | None = None,
        max_rank: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ):
        if kernel not in ("linear", "rbf", "cosine"):
            raise ValueError(f"kernel: expected 'linear', 'rbf' or 'cosine', got {kernel!r}")
        if not (np.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge: expected a finite number >= 0, got {ridge!r}")
        if not (np.isfinite(eig_floor) and 0 <= eig_floor < 1):
            raise ValueError(f"eig_floor: expected a number in [0, 1), got {eig_floor!r}")
        if max_rank is not None and (not isinstance(max_rank, (int, np.integer)) or max_rank < 1):
            raise ValueError(f"max_rank: expected a positive integer or None, got {max_rank!r}")
        g = as_vectors(stale_vectors, None, "stale_vectors")
        n, d = g.shape
        self._ids = np.arange(n, dtype=np.int64) if ids is None else as_ids(ids, n)
        self._rows_of = RowLookup(self._ids)  # id -> row, by binary search
        self._G = g
        self.kernel: str = kernel
        self.residual = bool(residual)
        self.ridge, self.eig_floor, self.max_rank, self.seed = float(ridge), float(eig_floor), max_rank, int(seed)
        rows = self._choose_landmarks(landmarks, n_landmarks, progress)
        self.landmark_ids: np.ndarray = self._ids[rows].copy()
        self._GL = g[rows].astype(np.float64)
        m = rows.shape[0]
        if kernel == "linear" and not residual and m < d:
            raise ValueError(
                f"kernel='linear' with residual=False needs n_landmarks >= dim ({d}), got {m}: "
                "predictions would lose every component outside the landmarks' span "
                "(use residual=True, the default, or more landmarks)"
            )
        self._gamma = 0.0
        if kernel == "rbf":
            if bandwidth is None:
                d2 = _sqdist(self._GL, self._GL)[np.triu_indices(m, 1)]
                med = float(np.median(d2)) if d2.size else 1.0
                bandwidth = float(np.sqrt(max(med, 1e-30) / 2))
            if not (np.isfinite(bandwidth) and bandwidth > 0):
                raise ValueError(f"bandwidth: expected a finite positive number, got {bandwidth!r}")
            self._gamma = 1.0 / (2.0 * float(bandwidth) ** 2)
        self.bandwidth = bandwidth
        self._decompose()
        self.W: np.ndarray = np.empty(0)
        self.fit(self._GL)  # no drift yet: fresh == stale

    # ------------------------------------------------------------- landmarks
    def _choose_landmarks(self, landmarks, n_landmarks, progress: bool) -> np.ndarray:
        if isinstance(landmarks, str):
            return choose_landmarks(
                self._G, landmarks, n_landmarks, seed=self.seed, ridge=self.ridge, progress=progress
            )
        lid = np.atleast_1d(np.asarray(landmarks))
        if lid.ndim != 1 or lid.size == 0 or not np.issubdtype(lid.dtype, np.integer):
            raise ValueError("landmarks: an id array must be a non-empty 1-d array of integer ids")
        uniq, counts = np.unique(lid, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"landmarks: duplicated id(s) {uniq[counts > 1][:5].tolist()}")
        if n_landmarks is not None and n_landmarks != lid.size:
            raise ValueError(f"n_landmarks={n_landmarks} but {lid.size} landmark ids were given")
        return self._rows_of(lid.astype(np.int64), "landmarks")

    # ------------------------------------------------------------- model
    def _kernel_rows(self, y: np.ndarray) -> np.ndarray:
        """k(y, G_L) as an (n, m) float64 array."""
        y = y.astype(np.float64)
        if self.kernel == "rbf":
            return np.exp(-self._gamma * _sqdist(y, self._GL))
        if self.kernel == "cosine":
            return _unit(y) @ _unit(self._GL).T
        return y @ self._GL.T

    def _decompose(self) -> None:
        """Eigen-clip K (or take G_L's SVD) once; `fit` is then one matrix product."""
        m = self._GL.shape[0]
        if self.kernel == "linear":
            u, s, vt = np.linalg.svd(self._GL, full_matrices=False)
            lam = s**2  # = K's eigenvalues
        else:
            lam, u = np.linalg.eigh(self._kernel_rows(self._GL))
            lam, u = lam[::-1], u[:, ::-1]
        lam_max = float(lam.max()) if lam.size else 0.0
        if not lam_max > 0:
            raise ValueError("the landmarks' kernel matrix is zero (all landmark vectors zero?)")
        keep = np.flatnonzero(lam > self.eig_floor * lam_max)
        if self.max_rank is not None:
            keep = keep[: self.max_rank]
        rho = self.ridge * float(lam.sum()) / m  # trace(K)/m: scale-free ridge
        self.rank = int(keep.size)
        if self.kernel == "linear":
            s_k = s[keep]
            # W = [I +] V diag(s/(s²+ρ)) Uᵀ (G'_L [− G_L])  ==  [I +] G_Lᵀ (K + ρ)⁺ (...)
            self._F = (vt[keep].T * (s_k / (s_k**2 + rho))) @ u[:, keep].T  # (d, m)
            self._P = None
        else:
            scale = 1.0 / np.sqrt(lam[keep] + rho)
            self._P = (u[:, keep] * scale).T  # (r, m): φ_k(y) = P k_L(y)
            self._F = self._P
        self._rho = rho

    @property
    def dim(self) -> int:
        """Dimension p of the features φ (the tree's dimension)."""
        d = self._G.shape[1]
        if self.kernel == "linear":
            return d
        return self.rank + (d if self.residual else 0)

    @property
    def n_landmarks(self) -> int:
        return int(self.landmark_ids.shape[0])

    def features_of(self, vectors) -> np.ndarray:
        """φ of arbitrary stale-space vectors, (n, p) float32 (computed in chunks)."""
        y = as_vectors(vectors, self._G.shape[1], "vectors", allow_empty=True)
        if self.kernel == "linear":
            return y.copy()
        out = np.empty((y.shape[0], self.dim), np.float32)
        step = max(1, _CHUNK_ELEMS // max(self.n_landmarks, 1))
        for a in range(0, y.shape[0], step):
            phi_k = self._kernel_rows(y[a : a + step]) @ self._P.T
            out[a : a + step] = np.hstack([y[a : a + step], phi_k]) if self.residual else phi_k
        return out

    def features(self, ids=None) -> np.ndarray:
        """φ(y) of the stale targets (all, in construction order, or of `ids`)."""
        return self.features_of(self._G if ids is None else self.stale(ids))

    def stale(self, ids) -> np.ndarray:
        """The stale vectors of `ids` (KeyError for unknown ids)."""
        return self._G[self._rows_of(as_ids(ids, None))]

    @property
    def ids(self) -> np.ndarray:
        return self._ids.copy()

    # ------------------------------------------------------------- per refresh
    def fit(
        self,
        fresh_vectors=None,
        ids=None,
        *,
        holdout_ids=None,
        holdout_vectors=None,
        fresh_landmark_vectors=None,
    ) -> DriftFit:
        """Set W from the landmarks' fresh vectors.

        fresh_vectors: one row per landmark, in `landmark_ids` order when ids is None,
        else in the order of `ids`, which must be a permutation of `landmark_ids`.
        (`fresh_landmark_vectors=` is the old keyword name of fresh_vectors.)
        Cost O(m·p·d). Optional holdout: extra re-encoded targets (ids in this model
        and their fresh vectors) to estimate the prediction error on all targets.
        """
        if fresh_landmark_vectors is not None:
            if fresh_vectors is not None:
                raise TypeError("fit: give fresh_vectors or fresh_landmark_vectors (its old name), not both")
            fresh_vectors = fresh_landmark_vectors
        if fresh_vectors is None:
            raise ValueError("fit: NystromDrift needs the landmarks' fresh vectors (one row per landmark_ids entry)")
        m, d = self._GL.shape
        fresh = np.asarray(fresh_vectors.detach().cpu().numpy() if hasattr(fresh_vectors, "detach") else fresh_vectors)
        if fresh.ndim != 2 or fresh.shape[0] != m:
            raise ValueError(
                f"fresh_landmark_vectors: expected {m} rows (one per landmark, in landmark_ids "
                f"order), got shape {fresh.shape}"
            )
        fresh = as_vectors(fresh, d, "fresh_landmark_vectors").astype(np.float64)
        if ids is not None:
            fresh = fresh[self._landmark_order(ids)]
        target = fresh - self._GL if self.residual else fresh
        wk = self._F @ target  # (d or r, d)
        if self.kernel == "linear":
            W = np.eye(d) + wk if self.residual else wk
        else:
            W = np.vstack([np.eye(d), wk]) if self.residual else wk
        pred = self.features_of(self._GL).astype(np.float64) @ W
        res = float(np.sqrt(((pred - fresh) ** 2).sum() / max(((fresh) ** 2).sum(), 1e-300)))
        hold = None
        old_w, self.W = self.W, W
        if holdout_ids is not None or holdout_vectors is not None:
            try:
                if holdout_ids is None or holdout_vectors is None:
                    raise ValueError("holdout: give both holdout_ids and holdout_vectors")
                hold = self.evaluate(holdout_ids, holdout_vectors)
            except (KeyError, ValueError):
                self.W = old_w  # a bad hold-out leaves the model as it was
                raise
        self.last_fit = DriftFit(landmark_residual=res, holdout=hold, rank=self.rank)
        return self.last_fit

    def _landmark_order(self, ids) -> np.ndarray:
        """Positions in `ids` of landmark_ids[0], landmark_ids[1], ... (ValueError unless
        `ids` is a permutation of landmark_ids)."""
        ids_arr = as_ids(ids, None)
        lm = self.landmark_ids
        if ids_arr.size != lm.size or not np.array_equal(np.sort(ids_arr), np.sort(lm)):
            missing = np.setdiff1d(lm, ids_arr)[:5].tolist()
            extra = np.setdiff1d(ids_arr, lm)[:5].tolist()
            raise ValueError(
                f"fit: ids must be a permutation of the {lm.size} landmark_ids, got {ids_arr.size} ids "
                f"(missing e.g. {missing}, not landmarks e.g. {extra})"
            )
        order = np.argsort(ids_arr, kind="stable")
        return order[np.searchsorted(ids_arr[order], lm)]

    def observe(self, fresh_vectors, ids) -> None:
        """Fresh vectors of targets encoded anyway: validated, then ignored (a no-op).

        The Nyström map is refitted from the landmarks alone (`fit`), so extra pairs
        are not used; the method exists so that `DynamicIndex` can hand every model
        its free training pairs. Ids need not be in the model (added targets)."""
        ids_arr = as_ids(ids, None)
        fresh = as_vectors(fresh_vectors, self._G.shape[1], "fresh_vectors", allow_empty=True)
        if fresh.shape[0] != ids_arr.shape[0]:
            raise ValueError(f"observe: {ids_arr.shape[0]} ids but {fresh.shape[0]} vectors")

    def transform_queries(self, queries) -> np.ndarray:
        """W q for each query: (B, p) float32, to score against φ (product in float64)."""
        q = as_vectors(queries, self._G.shape[1], "queries")
        return (q.astype(np.float64) @ self.W.T).astype(np.float32)

    def predict_from_features(self, phi) -> np.ndarray:
        """Wᵀ φ: the predicted current vectors of targets with features `phi`, float32."""
        phi = as_vectors(phi, self.dim, "features", allow_empty=True)
        return (phi.astype(np.float64) @ self.W).astype(np.float32)

    def predict(self, ids) -> np.ndarray:
        """Predicted current vectors of stale targets `ids`, (n, d) float32."""
        return self.predict_from_features(self.features(ids))

    def evaluate(self, ids, fresh_vectors) -> DriftReport:
        """Prediction error of `ids` against their known fresh vectors (and the stale baseline)."""
        ids_arr = as_ids(ids, None)
        fresh = as_vectors(fresh_vectors, self._G.shape[1], "fresh_vectors").astype(np.float64)
        if fresh.shape[0] != ids_arr.shape[0]:
            raise ValueError(f"evaluate: {ids_arr.shape[0]} ids but {fresh.shape[0]} vectors")
        return drift_error(self.predict(ids_arr), self.stale(ids_arr), fresh)

    def __repr__(self) -> str:
        return (
            f"NystromDrift(n={self._G.shape[0]}, dim={self._G.shape[1]}, kernel={self.kernel!r}, "
            f"n_landmarks={self.n_landmarks}, rank={self.rank}, feature_dim={self.dim}, "
            f"residual={self.residual})"
        )

    # ------------------------------------------------------------- persistence
    def state(self) -> dict[str, np.ndarray]:
        """Arrays that restore this model exactly (see `from_state`)."""
        cfg = np.array(
            [
                self.ridge,
                self.eig_floor,
                self._gamma,
                float(self.residual),
                -1.0 if self.max_rank is None else float(self.max_rank),
                float(self.seed),
            ]
        )
        return dict(
            stale=self._G,
            ids=self._ids,
            landmark_ids=self.landmark_ids,
            W=self.W,
            cfg=cfg,
            F=self._F,
            kernel=np.frombuffer(self.kernel.encode(), np.uint8).copy(),
        )

    @classmethod
    def from_state(cls, st: dict[str, np.ndarray]) -> NystromDrift:
        ridge, eig_floor, gamma, residual, max_rank, seed = (float(v) for v in st["cfg"])
        kernel = bytes(st["kernel"]).decode()
        bw = float(np.sqrt(1.0 / (2.0 * gamma))) if kernel == "rbf" else None
        self = cls(
            st["stale"],
            ids=st["ids"],
            landmarks=st["landmark_ids"],
            kernel=kernel,
            ridge=ridge,
            eig_floor=eig_floor,
            residual=bool(residual),
            bandwidth=bw,
            max_rank=None if max_rank < 0 else int(max_rank),
            seed=int(seed),
        )
        if st["W"].shape != self.W.shape or st["F"].shape != self._F.shape:
            raise ValueError(
                f"drift state: W/F have shapes {st['W'].shape}/{st['F'].shape}, the model "
                f"needs {self.W.shape}/{self._F.shape}"
            )
        # restore the saved decomposition, not a recomputed one: eigenvector signs may
        # differ across machines, and the tree's features were computed with the saved one
        self._gamma = gamma
        self._F = np.asarray(st["F"], np.float64).copy()
        self._P = None if kernel == "linear" else self._F
        self.W = np.asarray(st["W"], np.float64).copy()
        return self


# ----------------------------------------------------------------- helpers
def kcenter(x: np.ndarray, m: int, seed: int = 0, progress: bool = False) -> np.ndarray:
    """Greedy farthest-point (k-center) rows of x: a seeded random first point, then
    repeatedly the point farthest from those chosen. O(N·m·d), memory O(N) + a chunk.

    Distances are computed as ‖x − c‖² (not via the dot-product identity) so that
    duplicates are at exactly 0 and are never chosen twice.
    """
    n = x.shape[0]
    if m > n:
        raise ValueError(f"n_landmarks={m} is larger than the {n} targets")
    rng = np.random.default_rng(seed)
    chosen = np.empty(m, np.int64)
    chosen[0] = int(rng.integers(n))
    d2 = np.full(n, np.inf, np.float32)
    step = max(1, (1 << 22) // max(x.shape[1], 1))
    bar = progress_bar(progress, total=m, desc="k-center landmarks")
    for j in range(m):
        if j:
            i = int(np.argmax(d2))
            if not d2[i] > 0:
                raise ValueError(f"only {j} distinct stale vectors: cannot choose {m} distinct landmarks")
            chosen[j] = i
        c = x[chosen[j]]
        for a in range(0, n, step):
            diff = x[a : a + step] - c
            np.minimum(d2[a : a + step], np.einsum("ij,ij->i", diff, diff), out=d2[a : a + step])
        bar.update(1)
    bar.close()
    return chosen


def choose_landmarks(
    x: np.ndarray, kind: str, n_landmarks: int, *, seed: int = 0, ridge: float = 1e-6, progress: bool = False
) -> np.ndarray:
    """Rows of the stale vectors x to use as landmarks: "kcenter" (`kcenter`), "uniform"
    (sorted, seeded) or "leverage" (`leverage_sample` with this relative ridge)."""
    if kind not in ("kcenter", "uniform", "leverage"):
        raise ValueError(f"landmarks: expected 'kcenter', 'uniform', 'leverage' or an id array, got {kind!r}")
    check_positive_int(n_landmarks, "n_landmarks")
    n = x.shape[0]
    if n_landmarks > n:
        raise ValueError(f"n_landmarks={n_landmarks} is larger than the {n} targets")
    if kind == "uniform":
        return np.sort(np.random.default_rng(seed).choice(n, int(n_landmarks), replace=False))
    if kind == "leverage":
        return leverage_sample(x, int(n_landmarks), ridge, seed)
    return kcenter(x, int(n_landmarks), seed, progress)


def leverage_scores(x: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """Ridge leverage score of each row of x: x_i (XᵀX + ρI)⁻¹ x_iᵀ, ρ = ridge · trace(XᵀX)/d.

    How much each row pins down the linear fit; rows in rare directions score high.
    O(N·d²) time in row chunks, float64 sums.
    """
    n, d = x.shape
    step = max(1, (1 << 22) // max(d, 1))
    gram = np.zeros((d, d))
    for a in range(0, n, step):
        c = x[a : a + step].astype(np.float64)
        gram += c.T @ c
    rho = max(ridge * float(np.trace(gram)) / max(d, 1), 1e-300)
    inv = np.linalg.inv(gram + rho * np.eye(d))
    out = np.empty(n)
    for a in range(0, n, step):
        c = x[a : a + step].astype(np.float64)
        out[a : a + step] = np.einsum("ij,ij->i", c @ inv, c)
    return out


def leverage_sample(x: np.ndarray, m: int, ridge: float = 1e-6, seed: int = 0) -> np.ndarray:
    """m distinct rows of x, sampled without replacement with probability in proportion
    to their ridge leverage scores (seeded; sorted)."""
    n = x.shape[0]
    if m > n:
        raise ValueError(f"n_landmarks={m} is larger than the {n} targets")
    p = np.maximum(leverage_scores(x, ridge), 0.0)
    positive = int((p > 0).sum())
    if positive < m:
        raise ValueError(f"only {positive} targets have a non-zero leverage score: cannot choose {m} landmarks")
    return np.sort(np.random.default_rng(seed).choice(n, m, replace=False, p=p / p.sum()))


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a**2).sum(1)[:, None] - 2.0 * a @ b.T + (b**2).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)
