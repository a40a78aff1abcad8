"""TreeNegativeSampler: softmax negatives for a training step from a tree index.

It turns query embeddings (any device, any float dtype) into `Negatives` (target ids
and the log-probability of each under the proposal) by sampling a tree index on the
host CPU, optionally for the next batch on a background thread while the accelerator
works on the current one.
"""

from __future__ import annotations

import concurrent.futures
import math
from typing import Any, Protocol

import numba
import numpy as np
import torch

from .._threads import numba_threads
from .._validate import check_bool
from ..sampling import SampleResult, SoftmaxSampler
from ..tree import TreeIndex
from ._common import (
    Negatives,
    check_k,
    check_margin,
    check_positives,
    check_queries,
    check_temperature,
    default_rank,
    host_queries,
    log_q_dtype,
)

__all__ = ["TreeNegativeSampler", "HostSampler", "within_margin"]


class HostSampler(Protocol):
    """What TreeNegativeSampler needs from an index other than a TreeIndex."""

    def sample(self, queries: np.ndarray, k: int, *, exclude: Any = None, seed: int | None = None) -> SampleResult: ...


def index_version(sampler: Any) -> Any:
    """The `version` of the index a host sampler reads (its own, or its `.index`'s), or
    None when it exposes none. It changes with every write to the index."""
    for obj in (sampler, getattr(sampler, "index", None)):
        v = getattr(obj, "version", None)
        if v is not None:
            return v
    return None


def _check_version(sampler: Any, version: Any) -> None:
    if version is not None and index_version(sampler) != version:
        raise RuntimeError(
            "the index was modified (insert/remove/update/rebuild/compact or a "
            "DynamicIndex write) while a submitted batch was pending; its negatives "
            "could hold removed or stale ids and were discarded. Collect result() "
            "before writing to the index."
        )


class TreeNegativeSampler:
    """Softmax negatives P(y|q) ∝ exp(<q, y> / temperature) from a tree index.

    index: a TreeIndex (wrapped in a SoftmaxSampler with temperature, mode, tolerance,
        budget), or any object with `sample(queries, k, *, exclude=, seed=)` returning a
        SampleResult (e.g. a SoftmaxSampler or a dynamic index); that object's own
        temperature/mode are used, and must equal these when it exposes them. A
        `treeidx.distributed.ShardedSampler` works too (negatives over every rank's
        shard): its calls are collective, so every rank must call `sample`/`submit` in
        the same order (a DDP loop does); false_negative_margin is not supported with it.
    k: negatives per query. exclude_positives: never return a row's own positive, so
        log_q is over the targets other than the positive (see sampled_softmax_loss).
    seed, rank: call number c draws with a seed derived from (seed, rank, c), so a run is
        reproducible and distributed ranks (rank=None: torch.distributed's rank when
        initialised, else 0) draw independent streams.

    Call counter: every `sample` and every `submit` takes the next call number when it
    is made (after its inputs are checked). `sample(q, pos)` with the very tensor
    objects of a pending `submit(q, pos)` returns that prefetched result (the one the
    synchronous call would have returned: same call number); with other tensors while
    a submit is pending it raises. So "submit(q_next) ... sample(q_next)" and plain
    "sample(q)" every step give identical negatives.

    Prefetch: `submit` copies the queries to host memory before it returns (later
    in-place changes to them do not matter) and samples on one background thread
    (numba releases the GIL). Do not mutate the index while a submit is pending:
    `result()` raises RuntimeError when the index's `version` changed since `submit`
    (its negatives could hold removed or stale ids), and the background job does not
    start on an index that changed already.

    proposal_temperature: draw from exp(<q, y> / proposal_temperature) instead of the
        index's own `temperature` (None: the same). The queries are scaled by
        temperature / proposal_temperature before the index samples, so log_q is the
        exact log-probability under the proposal actually drawn from, whatever loss
        temperature the caller trains with (docs/training.md: a flatter proposal than
        the loss's softmax trained the code-search model better).
    false_negative_margin: never return a target y (of a row with a positive) whose
        index score <q, v_y> is within this margin of the positive's own <q, v_pos>, i.e.
        y with <q, v_y> >= <q, v_pos> - margin (raw inner products, cosines for unit
        vectors; near-duplicates and unlabelled positives, the RocketQA / NV-Retriever
        idea). Done exactly: those targets are found by exact top-k search on the same
        index (doubling k until the threshold is passed) and excluded, so the draws come
        from the proposal renormalised over the remaining targets and log_q is exact for
        that. v_pos is the index's own vector of the positive (`DynamicIndex.predict` for a
        dynamic index, `TreeIndex.vectors` otherwise), so the positive must be in the
        index and the index must support `search`. None: no filter. `Negatives.excluded`
        then holds the number of targets each row excluded beside its positive.
    batched: with a TreeIndex, sample each call's queries together, whole clusters scored
        as dense blocks (`SoftmaxSampler(batched=True)`): on real embeddings at training
        temperatures, the approx mode that pays (docs/sampling.md, "Batched mode").
    threads: numba threads the sampling may use (None: numba's setting for the calling
        thread, by default every core). On a CPU-only machine, leave the training step
        its cores: e.g. torch.set_num_threads(cores - 1) and threads=1 with prefetch.
        The calling thread's own numba setting is restored after a synchronous call.
    """

    def __init__(
        self,
        index: TreeIndex | HostSampler,
        *,
        k: int,
        temperature: float,
        mode: str = "exact",
        exclude_positives: bool = True,
        prefetch: bool = True,
        seed: int = 0,
        rank: int | None = None,
        tolerance: float = 0.05,
        budget: int | None = None,
        threads: int | None = None,
        proposal_temperature: float | None = None,
        false_negative_margin: float | None = None,
        batched: bool = False,
    ) -> None:
        self.k = check_k(k)
        self.temperature = check_temperature(temperature)
        self.proposal_temperature = (
            self.temperature if proposal_temperature is None else check_temperature(proposal_temperature)
        )
        false_negative_margin = check_margin(false_negative_margin)
        if false_negative_margin is not None:
            if not exclude_positives:
                raise ValueError(
                    "false_negative_margin needs exclude_positives=True (the margin is "
                    "measured from the positive, which is excluded first)"
                )
        self.false_negative_margin = false_negative_margin
        if mode not in ("exact", "approx"):
            raise ValueError(f"mode: expected 'exact' or 'approx', got {mode!r}")
        self.mode = mode
        self.tolerance = tolerance
        self.budget = budget
        self.batched = check_bool(batched, "batched")
        if isinstance(index, TreeIndex):
            self._owns_sampler = True
            self.sampler: HostSampler = SoftmaxSampler(
                index, temperature=self.temperature, mode=mode, tolerance=tolerance, budget=budget, batched=batched
            )
        elif callable(getattr(index, "sample", None)):
            if false_negative_margin is not None and getattr(index, "collective", False):
                raise ValueError(
                    "false_negative_margin is not supported with a collective sampler "
                    "(treeidx.distributed.ShardedSampler): the positives' vectors live on other ranks"
                )
            self._owns_sampler = False
            self.sampler = index
            self._check_foreign(self.temperature, mode)
        else:
            raise TypeError(
                "index: expected a TreeIndex or an object with "
                f"sample(queries, k, *, exclude, seed), got {type(index).__name__}"
            )
        self.exclude_positives = bool(exclude_positives)
        self.prefetch = bool(prefetch)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        self.seed = int(seed)
        self.rank = default_rank() if rank is None else int(rank)
        if self.rank < 0:
            raise ValueError(f"rank: expected an integer >= 0, got {rank!r}")
        if threads is not None and (
            isinstance(threads, bool)
            or not isinstance(threads, (int, np.integer))
            or not 1 <= threads <= numba.config.NUMBA_NUM_THREADS
        ):
            raise ValueError(
                f"threads: expected None or an integer in [1, {numba.config.NUMBA_NUM_THREADS}], got {threads!r}"
            )
        self.threads = None if threads is None else int(threads)
        self.calls = 0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # (queries, positives, future, sampler, index version at submit)
        self._pending: tuple[torch.Tensor, torch.Tensor | None, concurrent.futures.Future, Any, Any] | None = None

    def _check_foreign(self, temperature: float, mode: str) -> None:
        """A ready-made sampler's own settings must agree with ours (they are the real ones)."""
        t = getattr(self.sampler, "temperature", None)
        if t is not None and not math.isclose(float(t), temperature, rel_tol=1e-12):
            raise ValueError(f"temperature={temperature} but the given sampler uses {t}")
        m = getattr(self.sampler, "mode", None)
        if m is not None and m != mode:
            raise ValueError(f"mode={mode!r} but the given sampler uses {m!r}")

    def __repr__(self) -> str:
        return (
            f"TreeNegativeSampler(k={self.k}, temperature={self.temperature}, "
            f"proposal_temperature={self.proposal_temperature}, "
            f"false_negative_margin={self.false_negative_margin}, mode={self.mode!r}, "
            f"seed={self.seed}, rank={self.rank}, calls={self.calls}, sampler={self.sampler!r})"
        )

    # -- seeds --------------------------------------------------------------------------

    def call_seed(self, call: int) -> int:
        """The sampler seed of call number `call` (a 63-bit hash of seed, rank, call)."""
        w = np.random.SeedSequence([self.seed, self.rank, int(call)]).generate_state(2, np.uint32)
        return ((int(w[0]) << 32) | int(w[1])) & (2**63 - 1)

    # -- sampling -----------------------------------------------------------------------

    def _prepare(self, query_emb: Any, positive_ids: Any):
        q = check_queries(query_emb, getattr(getattr(self.sampler, "index", None), "dim", None))
        pos = check_positives(positive_ids, q.shape[0])
        q_host = host_queries(q)
        ex = pos.cpu().numpy() if (pos is not None and self.exclude_positives) else None
        return q, q_host, ex

    def _job(self, query_emb: Any, positive_ids: Any) -> tuple:
        """Check inputs, snapshot the queries to host, take the next call number.

        Everything the sampling needs is captured here, so a background run does not
        read attributes the caller may change meanwhile.
        """
        q, q_host, ex = self._prepare(query_emb, positive_ids)
        seed = self.call_seed(self.calls)
        self.calls += 1
        return (
            self.sampler,
            q_host,
            self.k,
            ex,
            seed,
            q.device,
            log_q_dtype(q),
            self.threads,
            self.temperature / self.proposal_temperature,
            self.false_negative_margin,
            index_version(self.sampler),
        )

    @staticmethod
    def _run(
        sampler: HostSampler,
        q_host: np.ndarray,
        k: int,
        ex: np.ndarray | None,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        threads: int | None,
        scale: float = 1.0,
        margin: float | None = None,
        version: Any = None,
    ) -> Negatives:
        _check_version(sampler, version)
        with numba_threads(threads):
            return TreeNegativeSampler._draw(sampler, q_host, k, ex, seed, device, dtype, scale, margin)

    @staticmethod
    def _draw(
        sampler: HostSampler,
        q_host: np.ndarray,
        k: int,
        ex: np.ndarray | None,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        scale: float = 1.0,
        margin: float | None = None,
    ) -> Negatives:
        if q_host.shape[0] == 0 and not getattr(sampler, "collective", False):
            z = np.empty((0, k))
            return Negatives(
                torch.from_numpy(z.astype(np.int64)).to(device), torch.from_numpy(z).to(device=device, dtype=dtype)
            )
        excluded = None
        exclude: Any = ex
        if margin is not None and ex is not None:
            near = within_margin(sampler, q_host, ex, margin)
            excluded = torch.tensor([a.size for a in near], dtype=torch.int64, device=device)
            exclude = [np.append(a, p) for a, p in zip(near, ex)]
        # sampling at temperature T' from an index at T = sampling at T with queries q·T/T'
        qs = q_host if scale == 1.0 else (q_host * np.float32(scale))
        res = sampler.sample(qs, k, exclude=exclude, seed=seed)
        return Negatives(
            ids=torch.from_numpy(np.ascontiguousarray(res.ids, np.int64)).to(device),
            log_q=torch.from_numpy(np.ascontiguousarray(res.log_q)).to(device=device, dtype=dtype),
            result=res,
            excluded=excluded,
        )

    def sample(self, query_emb: torch.Tensor, positive_ids: torch.Tensor | None = None) -> Negatives:
        """k negatives per query (with replacement), on the queries' device.

        query_emb: (B, d) floating tensor (any device; detached; fp16/bf16 widened).
        positive_ids: (B,) integer tensor or None; excluded when exclude_positives.
        """
        if self._pending is not None:
            pq, pp = self._pending[:2]
            if query_emb is pq and positive_ids is pp:
                return self.result()
            raise RuntimeError(
                "a submitted batch is pending for other tensors: call result() "
                "first (or pass the submitted tensors to sample())"
            )
        return self._run(*self._job(query_emb, positive_ids))

    def submit(self, query_emb: torch.Tensor, positive_ids: torch.Tensor | None = None) -> None:
        """Start sampling for these queries in the background; collect with result()."""
        if self._pending is not None:
            raise RuntimeError("submit() called twice without result(): collect the pending batch first")
        args = self._job(query_emb, positive_ids)
        fut: concurrent.futures.Future
        if self.prefetch:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="treeidx-prefetch")
            fut = self._pool.submit(self._run, *args)
        else:  # same semantics, computed now
            fut = concurrent.futures.Future()
            try:
                fut.set_result(self._run(*args))
            except BaseException as e:  # surfaced by result(), as with the background path
                fut.set_exception(e)
        self._pending = (query_emb, positive_ids, fut, args[0], args[-1])

    def result(self) -> Negatives:
        """The Negatives of the pending submit (waits for it); re-raises its error."""
        if self._pending is None:
            raise RuntimeError("result() called without a pending submit()")
        _, _, fut, sampler, version = self._pending
        self._pending = None
        try:
            negatives = fut.result()
        except Exception:
            # a write during the job can also break the job itself: the write is the cause
            _check_version(sampler, version)
            raise
        _check_version(sampler, version)
        return negatives

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def close(self) -> None:
        """Wait for any pending batch (dropping it) and stop the worker thread.

        The sampler stays usable: a later submit() starts a new worker.
        """
        self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> TreeNegativeSampler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- checkpointing ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """seed, rank, call counter, k, temperature, mode, proposal_temperature,
        false_negative_margin (not the index)."""
        return {
            "seed": self.seed,
            "rank": self.rank,
            "calls": self.calls,
            "k": self.k,
            "temperature": self.temperature,
            "mode": self.mode,
            "proposal_temperature": self.proposal_temperature,
            "false_negative_margin": self.false_negative_margin,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore seed, call counter, k, temperature, mode and the proposal options.

        The rank is kept as this process's own: a checkpoint written by rank 0 and
        loaded on every rank must still give each rank its own stream.
        """
        if self._pending is not None:
            raise RuntimeError("load_state_dict() with a pending submit(): call result() first")
        missing = {"seed", "calls", "k", "temperature", "mode"} - set(state)
        if missing:
            raise KeyError(f"state_dict: missing key(s) {sorted(missing)}")
        k = check_k(state["k"])
        t = check_temperature(state["temperature"])
        mode = state["mode"]
        if mode not in ("exact", "approx"):
            raise ValueError(f"mode: expected 'exact' or 'approx', got {mode!r}")
        calls = int(state["calls"])
        if calls < 0:
            raise ValueError(f"calls: expected an integer >= 0, got {calls}")
        if self._owns_sampler:
            if (t, mode) != (self.temperature, self.mode):
                self.sampler = SoftmaxSampler(
                    self.sampler.index,
                    temperature=t,
                    mode=mode,
                    tolerance=self.tolerance,
                    budget=self.budget,
                    batched=self.batched,
                )
        else:
            self._check_foreign(t, mode)
        self.k, self.temperature, self.mode = k, t, mode
        self.seed, self.calls = int(state["seed"]), calls
        # checkpoints from before these options keep the sampler's own settings
        if "proposal_temperature" in state:
            self.proposal_temperature = check_temperature(state["proposal_temperature"])
        if "false_negative_margin" in state:
            m = state["false_negative_margin"]
            self.false_negative_margin = None if m is None else float(m)


def _host_index_vectors(sampler: Any, ids: np.ndarray) -> np.ndarray:
    """The vectors `sampler` samples against for `ids` (what its scores are made of)."""
    if callable(getattr(sampler, "predict", None)):  # DynamicIndex: W^T phi(stale)
        return np.asarray(sampler.predict(ids), np.float32)
    index = sampler if isinstance(sampler, TreeIndex) else getattr(sampler, "index", None)
    if isinstance(index, TreeIndex):
        return index.vectors(ids)
    raise TypeError(
        "false_negative_margin needs a TreeIndex, SoftmaxSampler or DynamicIndex (or an object "
        f"with predict(ids) and search(queries, k, exclude=)), got {type(sampler).__name__}"
    )


def _host_search(sampler: Any, q: np.ndarray, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if callable(getattr(sampler, "search", None)):
        return sampler.search(q, k, exclude=exclude)
    index = getattr(sampler, "index", None)
    if isinstance(index, TreeIndex):
        return index.search(q, k, exclude=exclude)
    raise TypeError(f"false_negative_margin needs an index with search(), got {type(sampler).__name__}")


def within_margin(
    sampler: Any, queries: np.ndarray, positives: np.ndarray, margin: float, *, first_k: int = 16
) -> list[np.ndarray]:
    """Per query, the ids (other than its positive) whose score under `sampler`'s index
    is >= the positive's score - margin, found exactly by top-k search with k doubled
    for the queries whose k-th score still reaches the threshold."""
    q = np.asarray(queries, np.float32)
    pos = np.asarray(positives, np.int64)
    vp = _host_index_vectors(sampler, pos)
    # the search's own float32 scores decide membership: the set is then exactly the one
    # the draws are renormalised without, whatever the rounding at the boundary
    thr = (np.einsum("bd,bd->b", q, vp) - np.float32(margin)).astype(np.float32)
    n = len(sampler) if hasattr(sampler, "__len__") else len(sampler.index)
    out: list[np.ndarray] = [np.empty(0, np.int64)] * q.shape[0]
    rows = np.arange(q.shape[0])
    k = min(first_k, n - 1)
    while rows.size and k > 0:
        scores, ids = _host_search(sampler, q[rows], k, pos[rows])
        done = np.ones(rows.size, bool)
        for j, r in enumerate(rows):
            hit = scores[j] >= thr[r]
            out[r] = ids[j][hit & (ids[j] >= 0)].astype(np.int64)
            done[j] = not hit[-1] or k >= n - 1
        rows = rows[~done]
        k = min(2 * k, n - 1)
    return out
