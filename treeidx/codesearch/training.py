"""Train a code-search dual encoder where only the source of the negatives changes.

`train(data, strategy, config)` trains a `DualEncoder` on a `CodeSearchData`'s train
split with the sampled-softmax loss (`treeidx.torch.sampled_softmax_loss`) and
negatives from one of STRATEGIES, each a thin adapter around the library's samplers:

    inbatch        the other rows' positives only (InBatch)
    uniform        k uniform ids per query, log Q corrected (UniformSampler)
    stale-topk     ANCE: top-k under target vectors re-encoded every
                   `stale_refresh_every` steps (StaleTopK)
    cache          softmax over a FIFO cache refreshed with each step's freshly encoded
                   positives and negatives (NegativeCache)
    treeidx        exact (or approx) softmax samples from a DynamicIndex built on the
                   initial target vectors: its Nyström drift model is refitted on the
                   re-encoded landmarks every `landmark_refresh_every` steps, and the
                   targets each step encoded anyway are written back (`reencode`)
    treeidx-fresh  the same sampler over ALL targets re-encoded every step (a TreeIndex
                   rebuilt each step): treeidx without the drift model's error
    oracle         exact softmax over all targets re-encoded every step (BruteForceSampler)

and from one of two hard-batch sources, which choose which pairs share a batch (the
in-batch negatives) instead of random batches:

    gcbs           GlobalContrastiveBatchSampler: the train pairs' (query ⊕ positive)
                   embeddings re-encoded once per epoch, top-k graph, reverse
                   Cuthill-McKee, cut into batches
    tree-batches   TreeBatchSampler over a TreeIndex of the train positives' vectors,
                   kept current by writing back the positives every step encodes anyway

alone (in-batch negatives only) or combined with a negatives strategy as
"<batches>+<negatives>", e.g. "gcbs+treeidx" or "tree-batches+treeidx" (whose tree
batches group the pairs by the leaves of the treeidx DynamicIndex itself: no index of
its own).

Everything else is identical across strategies for a given seed: the initial model,
the sequence of training batches, the optimiser, the loss (sampled negatives with the
log Q correction, plus in-batch negatives unless turned off), and the evaluation.

Costs are reported apart: `reencode_s` = target-tower forward passes done only for the
sampler (landmarks, full re-encodes, the cache's initial fill); `sampling_s` = the
sampler itself and its upkeep (drawing, index builds and updates, drift fits, cache
updates); the B·(k+1) targets every sampled strategy encodes for the loss are part
of `rest_s`, like the forward/backward pass and the optimiser step. For the hard-batch
sources: encoding the pairs for GCBS is `reencode_s`, its graph and reordering (and the
tree batches' index upkeep and grouping) `sampling_s`.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .._progress import progress_bar
from .._validate import check_nonnegative_int, check_positive, check_positive_int
from ..dynamic import DynamicIndex, RefreshPolicy
from ..sampling import SampleResult, SoftmaxSampler
from ..torch import (
    BruteForceSampler,
    GlobalContrastiveBatchSampler,
    InBatch,
    NegativeCache,
    Negatives,
    StaleTopK,
    TreeBatchSampler,
    TreeNegativeSampler,
    UniformSampler,
    sampled_softmax_loss,
)
from ..tree import TreeIndex
from .data import CodeSearchData
from .encoder import DualEncoder, make_optimizer

__all__ = [
    "BATCH_SOURCES",
    "STRATEGIES",
    "TrainConfig",
    "TrainResult",
    "eval_rows",
    "evaluate",
    "parse_strategy",
    "query_ranks",
    "train",
]

STRATEGIES = (
    "inbatch",
    "uniform",
    "stale-topk",
    "cache",
    "treeidx",
    "treeidx-fresh",
    "oracle",
    "gcbs",
    "tree-batches",
    "gcbs+treeidx",
    "tree-batches+treeidx",
    "full",
)
BATCH_SOURCES = ("gcbs", "tree-batches")
CORRECTIONS = ("logq", "none", "fresh")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on besides the data and the strategy.

    steps (optimiser steps in all), warmup_steps (the first steps use in-batch negatives
    only, whatever the strategy; its sampler is then set up on the warmed-up encoder,
    as hard-negative mining usually starts from a trained model), batch_size (queries
    per step), k (sampled negatives per query; ignored by "inbatch"), temperature
    (logits = cosine / temperature), lr (`treeidx.codesearch.encoder.make_optimizer`), seed (model
    init, batches, samplers).
    in_batch_negatives: add the other rows' positives as negatives (always on for
    "inbatch").
    eval_every: validation recall@10 every this many steps (0: only at the end) on a
    fixed seeded subset of `eval_queries` validation queries; eval_every_s: also (or
    instead, with eval_every=0) every this many seconds of training time, so slow and
    fast strategies get comparable curves. test_queries: the final
    test evaluation's size (None: the whole test split). time_limit_s: stop once the
    training time (evaluation excluded) exceeds it.
    Model: dim, bag_dim (None: no projection), shared (one tower for both sides: it
    learned faster here than two towers, docs/training.md), init_std.
    stale-topk: stale_refresh_every. cache: cache_size (the ring's slots; its initial
    fill is min(cache_size, N) random targets, and a ring larger than the writes of the
    run never evicts, so it keeps every target live). treeidx: n_landmarks (None: 1% of the targets, at least dim),
    landmark_refresh_every; write_back (`reencode` the targets each step encoded
    anyway); the two full-refresh triggers (re-encode everything, `full_refresh`):
    max_drift_error (the DynamicIndex's running drift estimate above it; None: never;
    without it the drift model's error on the written-back targets grew to 3-400x the
    vectors' norm in from-scratch training, docs/training.md) and full_refresh_every
    (steps; None: never). treeidx, treeidx-fresh:
    sampler_mode "exact" | "approx".
    gcbs, tree-batches (`treeidx.torch.batching`): batch_refresh_every (regroup the
    pairs not yet seen this epoch every this many steps; None: once per epoch, the
    paper's schedule), batch_mix (share of each batch drawn at random). gcbs:
    gcbs_neighbors (top-k of the similarity graph), gcbs_similarity ("concat" | "cross").
    Negatives (issue 14, docs/training.md "Why the cache beat the oracle"):
    correction: the loss's treatment of the sampled negatives: "logq" (logit − log(k·Q),
    consistent), "none" (raw logits), "fresh" (an experiment: Q replaced by the model's
    exact softmax over all targets re-encoded every step, whatever drew the ids).
    proposal_temperature: every softmax sampler's (cache, oracle, treeidx) temperature
    (None: `temperature`); treeidx_proposal_temperature overrides it for treeidx and
    treeidx-fresh only (`TreeNegativeSampler(proposal_temperature=)`).
    false_negative_margin: treeidx, treeidx-fresh and oracle never draw a target scoring
    within this cosine of the positive (exact: excluded and renormalised).
    near_duplicate_cosine: the cosine above which the false-negative statistics count a
    sampled negative as a near-duplicate of the positive.
    support_size: oracle only (an experiment on the cache's recency window): each step
    the oracle samples from the softmax over a fresh uniform subset of this many targets
    (the positive excluded), with the exact log Q of that subset (None: all targets).
    Refused with correction="fresh" or a false_negative_margin, which it would not apply.
    """

    steps: int = 1000
    warmup_steps: int = 0
    batch_size: int = 128
    k: int = 32
    temperature: float = 0.05
    lr: float = 3e-3
    seed: int = 0
    in_batch_negatives: bool = True
    eval_every: int = 100
    eval_every_s: float | None = None
    eval_queries: int = 1000
    test_queries: int | None = None
    time_limit_s: float | None = None
    dim: int = 64
    bag_dim: int | None = None
    shared: bool = True
    init_std: float = 0.01
    stale_refresh_every: int = 100
    cache_size: int = 65536
    n_landmarks: int | None = None
    landmark_refresh_every: int = 1
    write_back: bool = True
    max_drift_error: float | None = 0.5
    full_refresh_every: int | None = None
    sampler_mode: str = "exact"
    batch_refresh_every: int | None = None
    batch_mix: float = 0.0
    gcbs_neighbors: int = 10
    gcbs_similarity: str = "concat"
    correction: str = "logq"
    proposal_temperature: float | None = None
    false_negative_margin: float | None = None
    near_duplicate_cosine: float = 0.95
    treeidx_proposal_temperature: float | None = None
    support_size: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "k",
            "eval_queries",
            "dim",
            "stale_refresh_every",
            "cache_size",
            "landmark_refresh_every",
            "gcbs_neighbors",
        ):
            check_positive_int(getattr(self, name), name)
        for name in ("bag_dim", "n_landmarks", "test_queries", "full_refresh_every", "batch_refresh_every"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), name)
        check_positive(self.temperature, "temperature")
        check_positive(self.lr, "lr")
        check_positive(self.init_std, "init_std")
        check_nonnegative_int(self.seed)
        check_nonnegative_int(self.eval_every, "eval_every")
        check_nonnegative_int(self.warmup_steps, "warmup_steps")
        for name in ("time_limit_s", "max_drift_error", "eval_every_s"):
            if getattr(self, name) is not None:
                check_positive(getattr(self, name), name)
        if self.sampler_mode not in ("exact", "approx"):
            raise ValueError(f"sampler_mode: expected 'exact' or 'approx', got {self.sampler_mode!r}")
        if self.gcbs_similarity not in ("concat", "cross"):
            raise ValueError(f"gcbs_similarity: expected 'concat' or 'cross', got {self.gcbs_similarity!r}")
        if (
            isinstance(self.batch_mix, bool)
            or not isinstance(self.batch_mix, (int, float))
            or not 0.0 <= self.batch_mix <= 1.0
        ):
            raise ValueError(f"batch_mix: expected a number in [0, 1], got {self.batch_mix!r}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction: expected one of {CORRECTIONS}, got {self.correction!r}")
        if self.proposal_temperature is not None:
            check_positive(self.proposal_temperature, "proposal_temperature")
        if self.false_negative_margin is not None and not (0.0 <= self.false_negative_margin <= 2.0):
            raise ValueError(
                f"false_negative_margin: expected a cosine margin in [0, 2], got {self.false_negative_margin!r}"
            )
        if self.treeidx_proposal_temperature is not None:
            check_positive(self.treeidx_proposal_temperature, "treeidx_proposal_temperature")
        if self.support_size is not None:
            check_positive_int(self.support_size, "support_size")
            # the subset draw replaces the oracle's own sampler: these options would not apply
            if self.correction == "fresh":
                raise ValueError("support_size: correction='fresh' does not apply to a subset softmax; use 'logq'")
            if self.false_negative_margin is not None:
                raise ValueError("support_size: the false-negative filter does not apply to a subset softmax")
        if not -1.0 <= self.near_duplicate_cosine <= 1.0:
            raise ValueError(f"near_duplicate_cosine: expected a cosine in [-1, 1], got {self.near_duplicate_cosine!r}")

    @property
    def sampler_temperature(self) -> float:
        """The proposal's temperature: proposal_temperature, else the loss's."""
        return self.proposal_temperature if self.proposal_temperature is not None else self.temperature

    @property
    def treeidx_temperature(self) -> float:
        """The treeidx strategies' proposal temperature: treeidx_proposal_temperature,
        else sampler_temperature."""
        t = self.treeidx_proposal_temperature
        return t if t is not None else self.sampler_temperature

    def model_kwargs(self) -> dict[str, Any]:
        """The DualEncoder arguments this config trains."""
        return dict(dim=self.dim, bag_dim=self.bag_dim, shared=self.shared, init_std=self.init_std, seed=self.seed)


@dataclass
class TrainResult:
    """What `train` returns.

    test: final metrics (`evaluate` on the test split). history: (step, train_seconds,
    val recall@10) rows, train_seconds excluding evaluation and callbacks. losses:
    the training loss of every step. train_s / wall_s: training time / total time.
    time_split: sampling_s, reencode_s, rest_s (module docstring). targets_encoded_per_step:
    target encodings done only for the sampler (setup included), per step after the
    warm-up.
    sampler_mib: host memory of the sampler's data structures (estimated from their
    arrays); peak_rss_mib: the process's peak resident memory so far.
    sampler_stats: strategy-specific figures (treeidx: full refreshes, the drift
    model's relative prediction error on the written-back targets; hard batches: epochs,
    regroups, GCBS's last graph).
    inbatch_negative_cos: the mean cosine of query i with positive j != i of its batch
    over the steps after the warm-up (how hard the in-batch negatives were; None when
    the warm-up never ended).
    """

    strategy: str
    config: TrainConfig
    model: DualEncoder
    test: dict[str, float]
    history: list[tuple[int, float, float]]
    losses: list[float]
    steps: int
    train_s: float
    wall_s: float
    time_split: dict[str, float]
    targets_encoded_per_step: float
    sampler_mib: float
    peak_rss_mib: float
    sampler_stats: dict[str, Any]
    inbatch_negative_cos: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no model, no per-step losses)."""
        return dict(
            strategy=self.strategy,
            config=asdict(self.config),
            test=self.test,
            history=[[st, round(t, 3), r] for st, t, r in self.history],
            steps=self.steps,
            train_s=round(self.train_s, 3),
            wall_s=round(self.wall_s, 3),
            steps_per_s=round(self.steps / max(self.train_s, 1e-9), 3),
            time_split={k: round(v, 3) for k, v in self.time_split.items()},
            targets_encoded_per_step=round(self.targets_encoded_per_step, 1),
            sampler_mib=round(self.sampler_mib, 1),
            peak_rss_mib=round(self.peak_rss_mib, 1),
            sampler_stats=self.sampler_stats,
            inbatch_negative_cos=self.inbatch_negative_cos,
            final_loss=self.losses[-1] if self.losses else None,
        )


# ---------------------------------------------------------------------------- evaluation


def evaluate(
    model: DualEncoder,
    data: CodeSearchData,
    split: str = "test",
    max_queries: int | None = None,
    *,
    seed: int = 0,
    chunk: int = 256,
) -> dict[str, float]:
    """recall@1, recall@10 and MRR of `split`'s queries against ALL targets, exactly.

    Every target is encoded; the rank of a query's positive is 1 + the number of
    targets scoring strictly higher (ties resolved in the positive's favour).
    max_queries: a seeded random subset of the split (the same for the same seed).
    """
    rows = eval_rows(data, split, max_queries, seed)
    if model.n_targets != data.n_targets:
        raise ValueError(f"model encodes {model.n_targets} targets, data has {data.n_targets}")
    ranks = query_ranks(model, rows, data.query_target[rows], chunk=chunk)
    n = max(rows.size, 1)
    return {
        "recall@1": float((ranks <= 1).sum() / n),
        "recall@10": float((ranks <= 10).sum() / n),
        "mrr": float((1.0 / ranks).sum() / n),
        "n_queries": int(rows.size),
    }


def eval_rows(data: CodeSearchData, split: str, max_queries: int | None, seed: int = 0) -> np.ndarray:
    """The query rows `evaluate` scores: all of the split, or a seeded subset."""
    rows = data.split(split)
    if max_queries is not None and check_positive_int(max_queries, "max_queries") < rows.size:
        rows = np.sort(
            np.random.default_rng([check_nonnegative_int(seed), 0xE7A1]).choice(rows, max_queries, replace=False)
        )
    return rows


@torch.no_grad()
def query_ranks(model: DualEncoder, rows: np.ndarray, positives: np.ndarray, *, chunk: int = 256) -> np.ndarray:
    """(len(rows),) int64 rank of each query's positive among all targets (1 = top)."""
    targets = model.encode_all_targets()
    queries = model.encode_all_queries(rows)
    pos = torch.from_numpy(np.asarray(positives, np.int64))
    out = torch.empty(len(rows), dtype=torch.int64)
    for lo in range(0, len(rows), check_positive_int(chunk, "chunk")):
        s = queries[lo : lo + chunk] @ targets.T
        p = s.gather(1, pos[lo : lo + chunk, None])
        out[lo : lo + chunk] = 1 + (s > p).sum(1)
    return out.numpy()


# ---------------------------------------------------------------------------- strategies


class _Clock:
    """Accumulates seconds per category."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {"sampling_s": 0.0, "reencode_s": 0.0}

    def timed(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            self.s[what] += time.perf_counter() - t


class _Strategy:
    """Adapter around one sampler: `setup`, `negatives` per step (k per query from
    `self.sampler`), `observe` the step's freshly encoded targets."""

    def __init__(self, model: DualEncoder, cfg: TrainConfig, clock: _Clock) -> None:
        self.model, self.cfg, self.clock = model, cfg, clock
        self.k = cfg.k
        self.sampler: Any = None
        self.targets_encoded = 0  # target encodings for the sampler only
        self.n = model.n_targets
        self.ready = False  # set up (not before the warm-up ends)

    def encode_all(self) -> torch.Tensor:
        """All targets under the current encoder, counted and timed as re-encoding."""
        self.targets_encoded += self.n
        return self.clock.timed("reencode_s", self.model.encode_all_targets)

    def encode(self, ids: np.ndarray) -> torch.Tensor:
        self.targets_encoded += len(ids)
        with torch.no_grad():
            return self.clock.timed("reencode_s", self.model.encode_targets, ids)

    def setup(self) -> None:
        """Build the sampler from the current encoder (called once, before its first step)."""

    def observe(self, ids: torch.Tensor, vectors: torch.Tensor) -> None:
        """The targets this step encoded for its loss (unique ids, detached vectors)."""

    def host_bytes(self) -> int:
        """Host memory of the sampler's data structures (after setup)."""
        return 0

    def stats(self) -> dict[str, Any]:
        """Strategy-specific figures for the result (JSON-serialisable)."""
        return self.false_negative_stats()

    # false negatives: how often a sampled negative is the positive's twin
    dup_group: np.ndarray | None = None  # target id -> exact-duplicate group (set by train)
    _fn: dict[str, float] | None = None

    def track(
        self, pos: torch.Tensor, neg_ids: torch.Tensor, pos_vecs: torch.Tensor, neg_vecs: torch.Tensor, q: torch.Tensor
    ) -> None:
        """Count the step's sampled negatives that are exact duplicates of the row's
        positive (same feature row, another id), near-duplicates (cosine with the
        positive's vector above cfg.near_duplicate_cosine; the vectors are unit-norm), or
        score above the positive for the row's query."""
        if neg_ids.numel() == 0:
            return
        with torch.no_grad():
            other = neg_ids != pos[:, None]
            cos = torch.einsum("bd,bkd->bk", pos_vecs, neg_vecs)
            above = torch.einsum("bd,bkd->bk", q, neg_vecs) > (q * pos_vecs).sum(-1, keepdim=True)
            fn = self._fn or dict(draws=0.0, exact_dup=0.0, near_dup=0.0, above_pos=0.0, cos_sum=0.0)
            fn["draws"] += float(other.sum())
            fn["near_dup"] += float((other & (cos > self.cfg.near_duplicate_cosine)).sum())
            fn["above_pos"] += float((other & above).sum())
            fn["cos_sum"] += float(cos[other].sum())
            if self.dup_group is not None:
                g = torch.from_numpy(self.dup_group)
                fn["exact_dup"] += float((other & (g[neg_ids] == g[pos][:, None])).sum())
            self._fn = fn

    def false_negative_stats(self) -> dict[str, Any]:
        fn = self._fn
        if not fn or not fn["draws"]:
            return {}
        n = fn["draws"]
        return dict(
            neg_exact_dup_rate=fn["exact_dup"] / n,
            neg_near_dup_rate=fn["near_dup"] / n,
            neg_above_pos_rate=fn["above_pos"] / n,
            neg_mean_cos_to_pos=fn["cos_sum"] / n,
        )

    def negatives(self, step: int, q: torch.Tensor, pos: torch.Tensor) -> Negatives:
        # samplers that re-encode inside sample() (stale-topk, oracle) go through
        # encode_all, whose time is booked as re-encoding: take it out of sampling
        before = self.clock.s["reencode_s"]
        t = time.perf_counter()
        neg = self.sampler.sample(q, pos)
        self.clock.s["sampling_s"] += time.perf_counter() - t - (self.clock.s["reencode_s"] - before)
        if self.cfg.correction == "fresh" and self.k:
            neg = Negatives(neg.ids, self.fresh_log_q(q, pos, neg.ids), neg.result)
        return neg

    def fresh_log_q(self, q: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """correction="fresh": log P(y | q) of the model's own softmax over every target
        but the positive, from all targets re-encoded now, whatever drew the ids (an
        experiment: the proposal's samples, the exact current weights)."""
        v = self.encode_all()
        with torch.no_grad():
            s = (q @ v.T) / self.cfg.temperature
            s[torch.arange(len(pos)), pos] = -float("inf")
            return torch.log_softmax(s, 1).gather(1, ids).to(torch.float32)


class _InBatch(_Strategy):
    """k = 0 sampled negatives: the loss's in-batch columns are all there is."""

    def __init__(self, model: DualEncoder, cfg: TrainConfig, clock: _Clock) -> None:
        super().__init__(model, cfg, clock)
        self.k = 0

    def setup(self) -> None:
        self.sampler = InBatch()


class _Uniform(_Strategy):
    def setup(self) -> None:
        self.sampler = UniformSampler(self.n, k=self.k, seed=self.cfg.seed)

    def host_bytes(self) -> int:
        return self.n * 8


class _StaleTopK(_Strategy):
    def setup(self) -> None:
        self.sampler = StaleTopK(
            self.encode_all, np.arange(self.n), k=self.k, refresh_every=self.cfg.stale_refresh_every, backend="brute"
        )

    def host_bytes(self) -> int:
        return self.n * self.model.dim * 4  # the stale vectors (brute-force backend)


class _Cache(_Strategy):
    def setup(self) -> None:
        size = min(self.cfg.cache_size, self.n)
        # a seeded random initial fill: ids are grouped by module, a prefix would not be
        ids = np.sort(np.random.default_rng([self.cfg.seed, 0xCAC4E]).choice(self.n, size, replace=False))
        self.sampler = NegativeCache(
            self.encode(ids),
            ids,
            k=self.k,
            temperature=self.cfg.sampler_temperature,
            cache_size=self.cfg.cache_size,
            seed=self.cfg.seed,
        )

    def observe(self, ids: torch.Tensor, vectors: torch.Tensor) -> None:
        self.clock.timed("sampling_s", self.sampler.update, vectors, ids)

    def host_bytes(self) -> int:
        return self.sampler.cache_size * (self.model.dim * 4 + 9)


class _Oracle(_Strategy):
    def setup(self) -> None:
        self.sampler = BruteForceSampler(
            self.encode_all,
            np.arange(self.n),
            k=self.k,
            temperature=self.cfg.sampler_temperature,
            seed=self.cfg.seed,
            false_negative_margin=self.cfg.false_negative_margin,
        )

    def host_bytes(self) -> int:
        return self.n * self.model.dim * 4

    def negatives(self, step: int, q: torch.Tensor, pos: torch.Tensor) -> Negatives:
        if self.cfg.support_size is None or self.cfg.support_size >= self.n:
            return super().negatives(step, q, pos)
        v = self.encode_all()  # booked as re-encoding, like the full oracle's
        return self.clock.timed("sampling_s", self._subset_negatives, step, q, pos, v)

    def _subset_negatives(self, step: int, q: torch.Tensor, pos: torch.Tensor, v: torch.Tensor) -> Negatives:
        """Exact softmax samples over a fresh uniform subset of support_size targets (the
        positive excluded), log Q over that subset: the objective becomes a random-subset
        softmax, as the cache's recency window makes it."""
        rng = np.random.default_rng([self.cfg.seed, step, 0x5B5E7])
        subset = torch.from_numpy(np.sort(rng.choice(self.n, self.cfg.support_size, replace=False)))
        with torch.no_grad():
            s = (q @ v[subset].T) / self.cfg.sampler_temperature
            s[subset[None, :] == pos[:, None]] = -float("inf")
            logp = torch.log_softmax(s.double(), 1)
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            draw = torch.multinomial(logp.exp(), self.k, replacement=True, generator=gen)
        return Negatives(subset[draw], logp.gather(1, draw).to(torch.float32))


class _TreeIdx(_Strategy):
    """DynamicIndex on the initial vectors; landmarks refitted, batch targets written back."""

    def __init__(self, model: DualEncoder, cfg: TrainConfig, clock: _Clock) -> None:
        super().__init__(model, cfg, clock)
        self.full_refreshes = 0
        self.drift: list[float] = []  # relative prediction error of each written-back batch

    def setup(self) -> None:
        cfg = self.cfg
        vectors = self.encode_all().numpy()
        m = cfg.n_landmarks or max(cfg.dim, round(0.01 * self.n))
        # uniform landmarks: the linear drift model is a regression of fresh on stale
        # vectors, for which a random sample is representative; k-center would cost
        # O(N·m·d) (~20 s here) for no gain in that fit
        self.index = self.clock.timed(
            "sampling_s",
            DynamicIndex.build,
            vectors,
            n_landmarks=min(m, self.n),
            landmarks="uniform",
            temperature=cfg.temperature,
            mode=cfg.sampler_mode,
            policy=RefreshPolicy(max_drift_error=cfg.max_drift_error),
            seed=cfg.seed,
        )
        # the index samples at the loss's T; the sampler scales the queries to draw at T'
        self.sampler = TreeNegativeSampler(
            self.index,
            k=self.k,
            temperature=cfg.temperature,
            proposal_temperature=cfg.treeidx_temperature,
            mode=cfg.sampler_mode,
            prefetch=False,
            seed=cfg.seed,
            rank=0,
            false_negative_margin=cfg.false_negative_margin,
        )

    def negatives(self, step: int, q: torch.Tensor, pos: torch.Tensor) -> Negatives:
        cfg = self.cfg
        if step > 0 and (
            self.index.needs_full_refresh or (cfg.full_refresh_every and step % cfg.full_refresh_every == 0)
        ):
            vectors = self.encode_all().numpy()
            self.clock.timed("sampling_s", self.index.full_refresh, vectors)
            self.full_refreshes += 1
        elif step > 0 and step % cfg.landmark_refresh_every == 0:
            fresh = self.encode(self.index.landmark_ids)
            self.clock.timed("sampling_s", self.index.refresh_landmarks, fresh.numpy())
        return super().negatives(step, q, pos)

    def observe(self, ids: torch.Tensor, vectors: torch.Tensor) -> None:
        if self.cfg.write_back:
            err = self.clock.timed("sampling_s", self.index.reencode, vectors.numpy(), ids.numpy())
            self.drift.append(err.predicted)

    def stats(self) -> dict[str, Any]:
        d = np.asarray(self.drift)
        return dict(
            **super().stats(),
            full_refreshes=self.full_refreshes,
            drift_error_median=float(np.median(d)) if d.size else None,
            drift_error_max=float(d.max()) if d.size else None,
        )

    def host_bytes(self) -> int:  # tree + the drift model's stale vectors and landmarks
        d = self.model.dim
        return int(self.index.tree.nbytes + self.n * d * 4 + len(self.index.landmark_ids) * d * 16)


class _Swappable:
    """A HostSampler whose SoftmaxSampler is replaced every step (treeidx-fresh)."""

    def __init__(self) -> None:
        self.current: SoftmaxSampler | None = None

    def sample(self, queries: np.ndarray, k: int, *, exclude: Any = None, seed: int | None = None) -> SampleResult:
        assert self.current is not None
        return self.current.sample(queries, k, exclude=exclude, seed=seed)

    @property
    def index(self) -> TreeIndex:  # the false-negative filter searches it
        assert self.current is not None
        return self.current.index


class _TreeIdxFresh(_Strategy):
    """A TreeIndex over all targets re-encoded and rebuilt every step: exact w.r.t. fresh vectors."""

    def setup(self) -> None:
        self.host = _Swappable()
        self.sampler = TreeNegativeSampler(
            self.host,
            k=self.k,
            temperature=self.cfg.temperature,
            proposal_temperature=self.cfg.treeidx_temperature,
            mode=self.cfg.sampler_mode,
            prefetch=False,
            seed=self.cfg.seed,
            rank=0,
            false_negative_margin=self.cfg.false_negative_margin,
        )

    def negatives(self, step: int, q: torch.Tensor, pos: torch.Tensor) -> Negatives:
        vectors = self.encode_all().numpy()
        tree = self.clock.timed("sampling_s", TreeIndex.build, vectors, seed=self.cfg.seed)
        self.host.current = SoftmaxSampler(tree, temperature=self.cfg.temperature, mode=self.cfg.sampler_mode)
        return super().negatives(step, q, pos)

    def host_bytes(self) -> int:
        return int(self.host.current.index.nbytes) if self.host.current is not None else 0


class _Full(_InBatch):
    """The reference objective: cross-entropy over ALL targets, encoded with gradients
    every step (what the oracle's sampled loss estimates; affordable at ~50k targets)."""

    full = True


_ADAPTERS: dict[str, type[_Strategy]] = {
    "inbatch": _InBatch,
    "uniform": _Uniform,
    "stale-topk": _StaleTopK,
    "cache": _Cache,
    "treeidx": _TreeIdx,
    "treeidx-fresh": _TreeIdxFresh,
    "oracle": _Oracle,
    "full": _Full,
}


_FILTERED = ("treeidx", "treeidx-fresh", "oracle")  # strategies with the false-negative filter


def duplicate_groups(data: CodeSearchData) -> np.ndarray:
    """(n_targets,) int64: targets with identical feature rows (duplicate code text, up
    to the feature hashing) share a group id, the smallest of their ids."""
    tf = data.target_features
    keys = [hash((tf.indices[a:b].tobytes(), tf.data[a:b].tobytes())) for a, b in zip(tf.indptr[:-1], tf.indptr[1:])]
    first: dict[int, int] = {}
    return np.fromiter((first.setdefault(h, i) for i, h in enumerate(keys)), np.int64, len(keys))


def _full_step(
    model: DualEncoder, opt: Any, data: CodeSearchData, rows: np.ndarray, cfg: TrainConfig
) -> tuple[float, float]:
    """One step of the full-softmax loss over every target (strategy "full"); returns
    the loss and the in-batch negatives' mean cosine, as `_step` does."""
    pos = torch.from_numpy(data.query_target[rows])
    q = model.encode_queries(rows)
    t = model.encode_targets(np.arange(model.n_targets))
    loss = torch.nn.functional.cross_entropy(q @ t.T / cfg.temperature, pos)
    with torch.no_grad():
        B = len(rows)
        cos = q @ t[pos].T
        inbatch_cos = float((cos.sum() - cos.diagonal().sum()) / max(B * (B - 1), 1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach()), inbatch_cos


# ---------------------------------------------------------------------------- batch sources


def parse_strategy(strategy: str) -> tuple[str | None, str]:
    """(batch source or None for random batches, negatives strategy) of a strategy name:
    "gcbs" -> ("gcbs", "inbatch"), "tree-batches+treeidx" -> ("tree-batches", "treeidx")."""
    if not isinstance(strategy, str):
        raise ValueError(f"strategy: expected a string, got {strategy!r}")
    head, plus, tail = strategy.partition("+")
    source, negatives = (head, tail) if plus else ((head, "inbatch") if head in BATCH_SOURCES else (None, head))
    if (source is not None and source not in BATCH_SOURCES) or negatives not in _ADAPTERS:
        raise ValueError(
            f"strategy: expected one of {STRATEGIES}, or '<batches>+<negatives>' with batches in "
            f"{BATCH_SOURCES} and negatives in {tuple(_ADAPTERS)}; got {strategy!r}"
        )
    return source, negatives


class _HardBatches:
    """Batches of train query rows from a GCBS or tree batch sampler, epoch after epoch,
    set up (like the negatives' sampler) when the warm-up ends."""

    def __init__(
        self, kind: str, model: DualEncoder, cfg: TrainConfig, clock: _Clock, rows: np.ndarray, positives: np.ndarray
    ) -> None:
        self.kind, self.model, self.cfg, self.clock = kind, model, cfg, clock
        self.rows, self.positives = rows, positives
        self.sampler: GlobalContrastiveBatchSampler | TreeBatchSampler | None = None
        self.own_ids: np.ndarray | None = None  # ids of the tree batches' own index (sorted)
        self.targets_encoded = 0
        self.queries_encoded = 0
        self.epochs = 0

    def setup(self, negatives: _Strategy) -> None:
        cfg = self.cfg
        common = dict(refresh_every=cfg.batch_refresh_every, mix=cfg.batch_mix, seed=cfg.seed)
        if self.kind == "gcbs":
            self.sampler = GlobalContrastiveBatchSampler(
                self.encode_pairs,
                cfg.batch_size,
                n_neighbors=cfg.gcbs_neighbors,
                similarity=cfg.gcbs_similarity,
                **common,
            )
        else:
            # combined with treeidx, the negatives' DynamicIndex (kept current by its
            # write-back) groups the batches too; otherwise an index of the positives
            index = getattr(negatives, "index", None)
            if index is None:
                self.own_ids = np.unique(self.positives)
                vectors = self.encode_targets(self.own_ids)
                index = self.clock.timed("sampling_s", TreeIndex.build, vectors, self.own_ids, seed=cfg.seed)
            self.sampler = TreeBatchSampler(index, cfg.batch_size, keys=self.positives, **common)
        self._it = self._endless()

    def _endless(self):
        while True:
            self.epochs += 1
            for b in self.sampler:
                yield self.rows[np.asarray(b, np.int64)]

    def next(self) -> np.ndarray:
        before = self.clock.s["reencode_s"]  # GCBS re-encodes inside: booked as re-encoding
        t = time.perf_counter()
        rows = next(self._it)
        self.clock.s["sampling_s"] += time.perf_counter() - t - (self.clock.s["reencode_s"] - before)
        return rows

    def encode_targets(self, ids: np.ndarray, chunk: int = 32768) -> np.ndarray:
        self.targets_encoded += len(ids)
        with torch.no_grad():
            return self.clock.timed(
                "reencode_s",
                lambda: torch.cat(
                    [self.model.encode_targets(ids[lo : lo + chunk]) for lo in range(0, len(ids), chunk)]
                ).numpy(),
            )

    def encode_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """GCBS's embeddings: every train pair's query and positive under the current encoder."""
        self.queries_encoded += len(self.rows)
        q = self.clock.timed("reencode_s", self.model.encode_all_queries, self.rows).numpy()
        return q, self.encode_targets(self.positives)

    def observe(self, ids: torch.Tensor, vectors: torch.Tensor) -> None:
        """Write the step's freshly encoded positives back into the tree batches' own index."""
        if self.own_ids is None:
            return
        ids_np = ids.numpy()
        keep = np.isin(ids_np, self.own_ids)
        if keep.any():
            self.clock.timed("sampling_s", self.sampler.index.update, vectors.numpy()[keep], ids_np[keep])

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(
            batch_source=self.kind,
            batch_epochs=self.epochs,
            batch_regroups=self.sampler.regroups if self.sampler else 0,
        )
        if self.kind == "gcbs" and self.sampler is not None:
            out.update(queries_encoded_for_batches=self.queries_encoded, gcbs_last_graph=self.sampler.last_graph)
        return out

    def host_bytes(self) -> int:
        if self.sampler is None:
            return 0
        if self.kind == "gcbs":  # the pair embeddings it holds
            return 2 * len(self.rows) * self.model.dim * 4
        return int(self.sampler.index.nbytes) if self.own_ids is not None else 0


# ---------------------------------------------------------------------------- training


def _batches(rows: np.ndarray, batch_size: int, seed: int):
    """Endless batches of query rows: seeded shuffled epochs, concatenated."""
    rng = np.random.default_rng([seed, 0xBA7C4])
    buf = np.empty(0, np.int64)
    while True:
        while buf.size < batch_size:
            buf = np.concatenate([buf, rng.permutation(rows)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def _step(
    model: DualEncoder,
    opt: Any,
    strategy: _Strategy,
    data: CodeSearchData,
    rows: np.ndarray,
    step: int,
    cfg: TrainConfig,
    batches: _HardBatches | None = None,
) -> tuple[float, float]:
    """One optimisation step; returns the loss and the mean cosine of the in-batch
    negatives (query i against positive j != i: how hard the batch is)."""
    pos = torch.from_numpy(data.query_target[rows])
    q = model.encode_queries(rows)
    neg = strategy.negatives(step, q.detach(), pos)
    if getattr(strategy, "full", False):
        return _full_step(model, opt, data, rows, cfg)
    B = len(rows)
    # encode each distinct target once: softmax negatives repeat within and across rows
    ids, inverse = torch.unique(torch.cat([pos, neg.ids.reshape(-1)]), return_inverse=True)
    vecs = model.encode_targets(ids)
    t = vecs[inverse]
    loss = sampled_softmax_loss(
        q,
        t[:B],
        t[B:].view(B, strategy.k, t.shape[1]),
        log_q=None if cfg.correction == "none" else neg.log_q,
        temperature=cfg.temperature,
        in_batch_negatives=cfg.in_batch_negatives or strategy.k == 0,
        pos_ids=pos,
        neg_ids=neg.ids,
    )
    with torch.no_grad():
        cos = q @ t[:B].T
        inbatch_cos = float((cos.sum() - cos.diagonal().sum()) / max(B * (B - 1), 1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    strategy.observe(ids, vecs.detach())
    strategy.track(pos, neg.ids, t[:B].detach(), t[B:].detach().view(B, strategy.k, t.shape[1]), q.detach())
    if batches is not None:
        batches.observe(ids, vecs.detach())
    return float(loss.detach()), inbatch_cos


def train(
    data: CodeSearchData,
    strategy: str,
    config: TrainConfig | None = None,
    *,
    progress: bool = False,
    callback: Callable[[int, DualEncoder], None] | None = None,
) -> TrainResult:
    """Train a DualEncoder on `data`'s train split with negatives from `strategy`.

    Deterministic under config.seed: the same seed gives the same initial model and the
    same batches for every strategy (and the same run, bit for bit, on the same
    machine and thread count). callback(step, model) is called with step = 0 before
    training and after every optimiser step (e.g. to save checkpoints every n steps);
    its time, like evaluation's, is excluded from the training time. progress: a tqdm
    bar with the latest loss and validation recall@10, counting training seconds
    against config.time_limit_s when that is set, else steps against config.steps.
    """
    cfg = config or TrainConfig()
    source, negatives = parse_strategy(strategy)
    train_rows = data.train
    if train_rows.size == 0:
        raise ValueError("data has no training queries")
    if negatives == "inbatch" and not cfg.in_batch_negatives:
        raise ValueError(f"strategy {strategy!r} needs in_batch_negatives=True (it has no other negatives)")
    if negatives == "full" and source is not None:
        raise ValueError("strategy 'full' trains on random batches only")
    if cfg.false_negative_margin is not None and negatives not in _FILTERED:
        raise ValueError(f"false_negative_margin: supported by {_FILTERED}, not {strategy!r}")
    if negatives != "inbatch" and cfg.k >= data.n_targets:
        raise ValueError(f"k={cfg.k} needs more than k targets, data has {data.n_targets}")
    wall0 = time.perf_counter()
    model = DualEncoder(data.query_features, data.target_features, **cfg.model_kwargs())
    opt = make_optimizer(model, cfg.lr)
    clock = _Clock()
    adapter = _ADAPTERS[negatives](model, cfg, clock)
    hard = (
        None if source is None else _HardBatches(source, model, cfg, clock, train_rows, data.query_target[train_rows])
    )
    adapter.dup_group = duplicate_groups(data)
    val_rows = eval_rows(data, "val", cfg.eval_queries, cfg.seed) if data.split("val").size else None
    history: list[tuple[int, float, float]] = []
    losses: list[float] = []
    inbatch_cos: list[float] = []
    train_s = 0.0

    def validate(step: int) -> None:
        if val_rows is not None:
            r = query_ranks(model, val_rows, data.query_target[val_rows])
            history.append((step, train_s, float((r <= 10).mean())))

    if callback is not None:
        callback(0, model)
    warm = _InBatch(model, cfg, clock)
    warm.setup()
    batches = _batches(train_rows, cfg.batch_size, cfg.seed)
    # a time-limited run shows training seconds against its limit (a step total of 10^9
    # would show an ETA of years); a step-limited one shows steps
    by_time = cfg.time_limit_s is not None
    bar = progress_bar(
        progress,
        total=round(cfg.time_limit_s) if by_time else cfg.steps,
        desc=f"train {strategy}",
        unit="s" if by_time else "step",
    )
    shown = 0
    step = 0
    while step < cfg.steps and (cfg.time_limit_s is None or train_s < cfg.time_limit_s):
        t = time.perf_counter()
        if step == cfg.warmup_steps:
            adapter.setup()
            adapter.ready = True
            if hard is not None:
                hard.setup(adapter)
        active = adapter if adapter.ready else warm
        rows = hard.next() if hard is not None and adapter.ready else next(batches)
        loss, cos = _step(model, opt, active, data, rows, step - cfg.warmup_steps, cfg, hard if adapter.ready else None)
        losses.append(loss)
        if adapter.ready:
            inbatch_cos.append(cos)
        train_s += time.perf_counter() - t
        step += 1
        if by_time:  # whole training seconds so far, capped at the limit
            now = min(int(train_s), round(cfg.time_limit_s))
            bar.update(now - shown)
            shown = now
        else:
            bar.update(1)
        due_s = cfg.eval_every_s is not None and train_s >= (len(history) + 1) * cfg.eval_every_s
        if (cfg.eval_every and step % cfg.eval_every == 0) or due_s:
            validate(step)
            bar.set_postfix_str(
                (f"step {step} " if by_time else "")
                + (f"loss {losses[-1]:.3f} val r@10 {history[-1][2]:.3f}" if history else "")
            )
        if callback is not None:
            callback(step, model)
    bar.close()
    if not history or history[-1][0] != step:
        validate(step)
    test = evaluate(model, data, "test", cfg.test_queries, seed=cfg.seed) if data.split("test").size else {}
    rest = train_s - clock.s["sampling_s"] - clock.s["reencode_s"]
    return TrainResult(
        strategy=strategy,
        config=cfg,
        model=model,
        test=test,
        history=history,
        losses=losses,
        steps=step,
        train_s=train_s,
        wall_s=time.perf_counter() - wall0,
        time_split={**clock.s, "rest_s": rest},
        targets_encoded_per_step=(adapter.targets_encoded + (hard.targets_encoded if hard else 0))
        / max(step - cfg.warmup_steps, 1),
        sampler_mib=(adapter.host_bytes() + (hard.host_bytes() if hard else 0)) / 2**20 if adapter.ready else 0.0,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        sampler_stats={**adapter.stats(), **(hard.stats() if hard else {})} if adapter.ready else {},
        inbatch_negative_cos=float(np.mean(inbatch_cos)) if inbatch_cos else None,
    )
