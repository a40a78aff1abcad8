"""An index sharded over torch.distributed, with exact global softmax sampling.

Each rank holds one shard: a `TreeIndex` or `DynamicIndex` over the ids it owns (the
shards' ids are disjoint). `ShardedSampler` makes every call collective: each rank
passes its own queries and gets results for them over the union of all shards.

Exact mode (docs/distributed.md has the argument). The queries of all ranks are
gathered; every shard refines its cut for every query and reports its envelope mass
U_s (`SoftmaxSampler.trials`): one trial against shard s's cut is accepted with
probability exactly Z_s / U_s, and an accepted id follows shard s's softmax. A trial
sent to shard s with probability U_s / sum_t U_t is therefore accepted with probability
Z / sum_t U_t whatever s is, and an accepted id follows the softmax over the union. All
ranks draw the same multinomial split of m trials per query over the shards (a shared
seed); each shard runs its share; a query short of k accepted ids gets another round;
the owner of a query keeps k of its accepted ids chosen uniformly at random (a choice
independent of their values), so they are k independent draws from the softmax of one
index over the union.

Approx mode: each shard's proposal is drawn from in proportion to its estimated mass
w_s, so log q(y) = log w_s - log sum_t w_t + log q_s(y) is the exact log-probability of
the mixture (the shards' ids are disjoint).

Transport: torch.distributed collectives (all_gather, all_to_all, all_reduce) on a gloo
group of the sampler's own, with a timeout. Before each exchange the ranks agree (one
small all_reduce) on whether any of them failed, so an error on one rank (bad input,
an exception in its shard) is raised on every rank, naming it, instead of leaving the
others waiting.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .. import _validate
from ..dynamic import DynamicIndex
from ..sampling import SampleResult, SoftmaxSampler, Trials
from ..tree import TreeIndex

__all__ = ["ShardedSampler", "shard_of", "ShardError"]

_MAX_ROUNDS = 64
_OPTIONS = ("tolerance", "budget", "draw_cost", "chunk_size", "dense_fallback")


class ShardError(RuntimeError):
    """Another rank failed during a collective call (its own error says why)."""


def shard_of(ids, world_size: int) -> np.ndarray:
    """The rank that owns each id: a fixed 64-bit hash of the id modulo world_size.

    The same on every machine and run, and balanced whatever pattern the ids follow
    (consecutive ids, ids of one class in a block). Build rank r's shard from the ids
    with `shard_of(ids, world_size) == r`; `ShardedSampler.insert` sends new ids to
    the rank this returns.
    """
    a = _validate.as_ids(ids, None, unique=False).view(np.uint64)
    w = _validate.check_positive_int(world_size, "world_size")
    with np.errstate(over="ignore"):
        z = a + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(w)).astype(np.int64)


class ShardedSampler:
    """Softmax samples and exact top-k over an index sharded across torch.distributed ranks.

    index: this rank's shard, a TreeIndex or DynamicIndex over the ids this rank owns
        (`owner(ids, world_size) == rank` for every id it holds; checked).
    temperature, mode ("exact" or "approx"), **options (tolerance, budget, draw_cost,
        chunk_size, dense_fallback): as SoftmaxSampler's, applied on every shard.
    group: a torch.distributed process group of the ranks that hold the shards, or None:
        a new gloo group over all ranks (collectives on the host: the shards' data is on
        the host whatever backend the training uses, and a group of its own keeps the
        sampler's collectives apart from DDP's, also from a prefetch thread).
    timeout: seconds a collective may wait for the other ranks (for the group created
        here); then every waiting rank raises instead of hanging.
    owner: the rule that assigns ids to ranks (default `shard_of`); inserts go to the
        rank it names.

    Every method is collective: every rank of the group calls it, in the same order,
    each with its own arguments (batch sizes may differ by rank). Construction too.
    """

    collective = True  # TreeNegativeSampler: calls must be made on every rank

    def __init__(
        self,
        index: TreeIndex | DynamicIndex,
        *,
        temperature: float,
        mode: str = "exact",
        group: Any = None,
        timeout: float = 300.0,
        owner: Callable[[np.ndarray, int], np.ndarray] = shard_of,
        **options: Any,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedSampler needs torch.distributed initialised (dist.init_process_group)")
        self.timeout = _validate.check_number(timeout, "timeout", strict=True)
        if group is None:
            group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout))
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.index = index
        self.owner = owner
        self.options = dict(options)
        self.bytes_sent = 0  # payload bytes this rank sent (every exchange counted once per receiver)
        self.messages = 0  # collective calls made
        self._edits = 0
        # checked on every rank, then agreed: a bad argument on one rank fails them all
        self._sampler = self._step(lambda: self._make_sampler(temperature, mode), "ShardedSampler()")
        self.temperature = self._sampler.temperature
        self.mode = self._sampler.mode

    def _make_sampler(self, temperature: float, mode: str) -> SoftmaxSampler:
        if not isinstance(self.index, (TreeIndex, DynamicIndex)):
            raise TypeError(f"index: expected a TreeIndex or DynamicIndex, got {type(self.index).__name__}")
        unknown = sorted(set(self.options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; expected some of {list(_OPTIONS)}")
        sampler = SoftmaxSampler(self._tree(), temperature=temperature, mode=mode, **self.options)
        self._check_owned()
        return sampler

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        """Targets over all shards (collective)."""
        return int(self._all_gather(np.array([len(self.index)], np.int64)).sum())

    @property
    def dim(self) -> int:
        return int(self.index.dim)

    @property
    def version(self) -> tuple[int, Any]:
        """Changes with every collective edit (and with every write to this shard)."""
        return (self._edits, self.index.version)

    def __repr__(self) -> str:
        return (
            f"ShardedSampler(rank={self.rank}, world_size={self.world_size}, mode={self.mode!r}, "
            f"temperature={self.temperature}, shard={self.index!r})"
        )

    def _tree(self) -> TreeIndex:
        return self.index.tree if isinstance(self.index, DynamicIndex) else self.index

    def _local_sampler(self) -> SoftmaxSampler:
        tree = self._tree()
        if self._sampler.index is not tree:  # a DynamicIndex rebuilt its tree
            self._sampler = SoftmaxSampler(tree, temperature=self.temperature, mode=self.mode, **self.options)
        return self._sampler

    def _local_queries(self, q: np.ndarray) -> np.ndarray:
        """Queries in the space this shard's tree scores (a DynamicIndex's W q)."""
        if isinstance(self.index, DynamicIndex):
            return np.ascontiguousarray(self.index.drift.transform_queries(q), np.float32)
        return q

    def _check_owned(self) -> None:
        ids = self.index.ids
        if ids.size:
            own = np.asarray(self.owner(ids, self.world_size))
            bad = ids[own != self.rank]
            if bad.size:
                raise ValueError(
                    f"rank {self.rank}: {bad.size} id(s) of this shard belong to other ranks by `owner`, "
                    f"e.g. {bad[:5].tolist()} (build rank r's shard from the ids with owner(ids, world_size) == r)"
                )

    # ------------------------------------------------------------------ transport
    def _step(self, fn: Callable[[], Any], what: str) -> Any:
        """Run fn here, then agree with every rank that nobody failed (one all_reduce).

        This rank's own error is re-raised; a failure elsewhere raises ShardError here."""
        err: BaseException | None = None
        out = None
        try:
            out = fn()
        except Exception as e:  # every rank must reach the all_reduce below
            err = e
        self.messages += 1
        _agree(self.group, self.rank, self.world_size, err, what, self.timeout)
        return out

    def _collective(self, fn: Callable[[], Any], what: str) -> Any:
        self.messages += 1
        try:
            return fn()
        except RuntimeError as e:
            raise ShardError(
                f"{what}: a collective failed or timed out (timeout {self.timeout:g} s): another rank "
                f"failed, exited or did not make the same call ({e})"
            ) from e

    def _all_gather(self, arr: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
        """Every rank's `arr` concatenated in rank order (first dims may differ by rank)."""
        arr = np.ascontiguousarray(arr)
        if sizes is None:
            sizes = self._all_gather(np.array([arr.shape[0]], np.int64), np.ones(self.world_size, np.int64))
        mx = int(sizes.max()) if sizes.size else 0
        pad = np.zeros((mx,) + arr.shape[1:], arr.dtype)
        pad[: arr.shape[0]] = arr
        t = torch.from_numpy(pad)
        outs = [torch.empty_like(t) for _ in range(self.world_size)]
        self._collective(lambda: dist.all_gather(outs, t, group=self.group), "all_gather")
        self.bytes_sent += arr.nbytes * (self.world_size - 1)
        return np.concatenate([o.numpy()[: int(s)] for o, s in zip(outs, sizes)])

    def _all_reduce(self, arr: np.ndarray, op: Any) -> np.ndarray:
        """An all_reduce of a copy of arr (same shape on every rank)."""
        t = torch.from_numpy(np.array(arr, copy=True))
        self._collective(lambda: dist.all_reduce(t, op=op, group=self.group), "all_reduce")
        # a ring all_reduce sends 2 (S - 1) / S of the buffer from every rank
        self.bytes_sent += int(2 * arr.nbytes * (self.world_size - 1) / self.world_size)
        return t.numpy()

    def _global_lse(self, x: np.ndarray) -> np.ndarray:
        """log-sum-exp over the ranks of every entry of x (-inf where all are)."""
        mx = self._all_reduce(x, dist.ReduceOp.MAX)
        safe = np.where(np.isfinite(mx), mx, 0.0)
        total = self._all_reduce(np.exp(x - safe), dist.ReduceOp.SUM)
        with np.errstate(divide="ignore"):
            return np.log(total) + safe

    def _exchange(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """parts[r] goes to rank r; returns what every rank sent here, in rank order.
        Same dtype and trailing shape on every rank."""
        rows = np.array([p.shape[0] for p in parts], np.int64)
        recv_rows = torch.empty(self.world_size, dtype=torch.int64)
        self._collective(
            lambda: dist.all_to_all_single(recv_rows, torch.from_numpy(rows), group=self.group), "all_to_all"
        )
        tail = parts[0].shape[1:]
        width = int(np.prod(tail, dtype=np.int64)) * parts[0].dtype.itemsize
        send = np.concatenate([np.ascontiguousarray(p).reshape(-1).view(np.uint8) for p in parts])
        recv = torch.empty(int(recv_rows.sum()) * width, dtype=torch.uint8)
        self._collective(
            lambda: dist.all_to_all_single(
                recv,
                torch.from_numpy(send),
                output_split_sizes=(recv_rows * width).tolist(),
                input_split_sizes=(rows * width).tolist(),
                group=self.group,
            ),
            "all_to_all",
        )
        self.bytes_sent += int(send.nbytes - parts[self.rank].nbytes)
        data = recv.numpy().view(parts[0].dtype).reshape((-1,) + tail)
        return np.split(data, np.cumsum(recv_rows.numpy())[:-1])

    def _gather_queries(self, q: np.ndarray, ptr: np.ndarray, ex: np.ndarray, head: list[int]):
        """All ranks' queries, exclusions (CSR) and a few integers per rank."""
        meta = self._all_gather(np.array([[q.shape[0], ex.size, *head]], np.int64), np.ones(self.world_size, np.int64))
        Q = self._all_gather(q, meta[:, 0])
        ex_all = self._all_gather(ex, meta[:, 1])
        counts = self._all_gather(np.diff(ptr), meta[:, 0])
        ptr_all = np.concatenate(([0], np.cumsum(counts)))
        offsets = np.concatenate(([0], np.cumsum(meta[:, 0])))
        return Q, ptr_all, ex_all, offsets, meta

    @staticmethod
    def _rows(ptr: np.ndarray, ex: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
        return [ex[ptr[b] : ptr[b + 1]] for b in rows]

    def _check_input(self, queries, exclude) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = _validate.as_vectors(queries, self.dim, "queries", allow_empty=True)
        ptr, ex = _validate.as_exclude(exclude, q.shape[0])
        return q, ptr, ex

    # ------------------------------------------------------------------ sampling
    def sample(self, queries, k: int, *, exclude=None, seed: int | None = None) -> SampleResult:
        """k ids per query of this rank (with replacement) from the softmax over the union
        of all shards; collective. As SoftmaxSampler.sample: `exclude` holds global ids
        (each shard ignores those it does not hold), `seed` makes the call reproducible
        (the draws depend on every rank's seed, its queries and the shards)."""

        def check():
            q, ptr, ex = self._check_input(queries, exclude)
            kk = _validate.check_k(k)
            sd = int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else _validate.check_seed(seed)
            return q, ptr, ex, kk, sd

        q, ptr, ex, kk, sd = self._step(check, "sample: checking the inputs")
        Q, ptr_all, ex_all, offsets, meta = self._gather_queries(q, ptr, ex, [kk, sd])
        N = Q.shape[0]
        kq = np.repeat(meta[:, 2], meta[:, 0])
        owner_of = np.repeat(np.arange(self.world_size), meta[:, 0])
        k_plan = int(meta[:, 2].max())
        # the call's seed: every rank's seed and batch size (the same sequence on every rank)
        seq = np.random.SeedSequence([int(s) for s in meta[:, 3]] + [int(b) for b in meta[:, 0]])
        Qt = self._local_queries(Q) if N else Q
        excl = self._rows(ptr_all, ex_all, np.arange(N))
        work = np.zeros((N, 4), np.int64)  # nodes opened, inner products, proposals, frontier

        def local_trials(rows: np.ndarray, m: np.ndarray, key: int) -> Trials:
            t = self._local_sampler().trials(Qt[rows], m, k=k_plan, exclude=[excl[b] for b in rows], seed=key)
            work[rows] += np.stack([t.nodes_opened, t.inner_products, t.proposals, t.frontier_size], 1)
            return t

        # one pass per shard: its cut, envelope and certificate, and a first batch of trials
        # (as many as it alone would need) of which the allocation below uses a prefix
        key0 = _key(seq, 1 << 30, self.rank)
        env = self._step(lambda: local_trials(np.arange(N), np.full(N, -1, np.int64), key0), "sample: envelopes")
        # the global sums, by two all_reduces (no rank needs the other shards' terms)
        mine = np.stack([env.log_env, env.log_z[:, 0], env.log_z[:, 1]], 1)
        env_tot, glo, gup = self._global_lse(mine).T
        if N and not np.isfinite(gup).all():
            b = int(np.flatnonzero(~np.isfinite(gup))[0])
            r = int(owner_of[b])
            raise ValueError(
                f"rank {r}, query {b - offsets[r]}: every target of every shard is excluded (or the index is "
                "empty); nothing to sample"
            )
        share = np.exp(env.log_env - env_tot)  # this shard's share of the envelope (approx: of the mass)
        records, acc, trials = self._rounds(N, kq, share, env_tot - glo, seq, local_trials, env)
        if self.mode == "exact":
            with np.errstate(divide="ignore"):
                logz_hat = np.clip(env_tot + np.log(acc / np.maximum(trials, 1)), glo, gup)
            tv = np.zeros(N)
        else:
            records[:, 2] += np.log(share[records[:, 0].view(np.int64)])
            logz_hat = np.zeros(N)
            tv = self._approx_tv(share, env, glo, gup)
        return self._deliver(records, work, kq, offsets, meta, logz_hat, np.stack([glo, gup], 1), tv, seq)

    def _rounds(self, N, kq, share, log_ratio, seq, local_trials, pre: Trials):
        """Rounds of trials until every query has k accepted ids over all shards.
        Returns (this shard's accepted records (query, id, value), accepted per query,
        trials per query (all shards)).

        A round plans m trials for a query (enough for the ids it still needs at the
        certified acceptance rate L / U, with slack) and splits them over the shards by
        independent Poisson counts, m_s ~ Poisson(m U_s / U): the same in law as sending
        each of a Poisson(m) number of trials to shard s with probability U_s / U, and
        every shard draws its own count, knowing only U. Round 0 first uses a prefix of
        the trials `pre` ran before (independent of the counts) and runs more only where
        its count is larger. Approx mode: a trial is a draw, always kept (U_s: the mass
        estimate)."""
        exact = self.mode == "exact"
        acc = np.zeros(N, np.int64)
        trials = np.zeros(N, np.int64)
        recs: list[np.ndarray] = []
        active = np.arange(N)
        for rnd in range(_MAX_ROUNDS):
            if active.size == 0:
                break
            need = kq[active] - acc[active]
            ratio = np.exp(np.clip(log_ratio[active], 0.0, np.log(1e4))) if exact else 1.0
            m = np.ceil((need + 3.0 * np.sqrt(need) + 3.0) * ratio)
            rng = np.random.default_rng(np.random.SeedSequence([*seq.entropy, rnd, self.rank]))  # type: ignore[misc]
            mine = rng.poisson(m * share[active]).astype(np.int64)
            n = np.zeros(active.size, np.int64)
            if rnd == 0:  # active is every query: a prefix of the first trials
                cols = np.arange(pre.ids.shape[1])[None, :]
                if exact:
                    used = np.minimum(mine, pre.proposals)
                    keep = (cols < pre.n[:, None]) & (pre.trial < used[:, None])
                else:
                    used = np.minimum(mine, pre.n)
                    keep = cols < used[:, None]
                recs.append(_pack(active, pre.ids, pre.w, keep))
                n += keep.sum(1)
                mine = mine - used
            go = mine > 0
            key = _key(seq, rnd, self.rank)
            t = self._step(lambda: local_trials(active[go], mine[go], key), "sample: trials")  # noqa: B023
            n[go] += t.n
            recs.append(_pack(active[go], t.ids, t.w, np.arange(t.ids.shape[1])[None, :] < t.n[:, None]))
            if rnd == 0:
                mine = mine + used
            got = self._all_reduce(np.stack([n, mine], 1), dist.ReduceOp.SUM)
            acc[active] += got[:, 0]
            trials[active] += got[:, 1]
            active = active[acc[active] < kq[active]]
        else:
            raise RuntimeError(f"sampling stalled: {active.size} queries still short of k after {_MAX_ROUNDS} rounds")
        return self._records(recs), acc, trials

    def _approx_tv(self, share, env: Trials, glo, gup) -> np.ndarray:
        """Certified TV bound of the mixture: sum_s a_s TV_s + 1/2 sum_s |a_s - Z_s / Z|,
        with Z_s / Z bounded by the certificates (one all_reduce of the shards' terms)."""
        # every mass relative to the global upper bound U (no overflow): L_s, U_s, L over U
        Ls, Us, L = (np.exp(x - gup) for x in (env.log_z[:, 0], env.log_z[:, 1], glo))
        with np.errstate(invalid="ignore", divide="ignore"):
            b_lo = np.nan_to_num(Ls / (Ls + 1.0 - Us))
            b_hi = np.nan_to_num(Us / (Us + L - Ls), nan=1.0)
        dev = np.maximum(np.maximum(share - b_lo, b_hi - share), 0.0)
        term = share * env.tv_bound + 0.5 * dev
        return np.minimum(1.0, self._all_reduce(term, dist.ReduceOp.SUM))

    @staticmethod
    def _records(recs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(recs) if recs else np.empty((0, 3), np.float64)

    def _deliver(self, recs, work, kq, offsets, meta, logz_hat, log_z, tv, seq) -> SampleResult:
        """Send each query's accepted ids to its rank; there, keep k chosen at random."""
        qi = recs[:, 0].view(np.int64)
        dest = np.searchsorted(offsets, qi, side="right") - 1
        rec_parts = [recs[dest == r] for r in range(self.world_size)]
        work_parts = [work[offsets[r] : offsets[r + 1]] for r in range(self.world_size)]
        got = np.concatenate(self._exchange(rec_parts))
        lo, hi = int(offsets[self.rank]), int(offsets[self.rank + 1])
        B, k = hi - lo, int(meta[self.rank, 2])
        w = np.sum(self._exchange(work_parts), axis=0)  # (B, 4), summed over shards
        # the choice of k of each query's accepted ids ignores their values: a random key each
        u = np.random.default_rng(np.random.SeedSequence([*seq.entropy, 1 << 20, self.rank])).random(got.shape[0])  # type: ignore[misc]
        q = np.ascontiguousarray(got[:, 0]).view(np.int64)
        order = np.lexsort((u, q))
        q = q[order]
        first = np.searchsorted(q, np.arange(lo, hi))
        take = order[(first[:, None] + np.arange(k)[None, :]).reshape(-1)] if B else np.empty(0, np.int64)
        pick = got[take].reshape(B, k, 3)
        ids = np.ascontiguousarray(pick[:, :, 1]).view(np.int64)
        log_q = pick[:, :, 2] - (logz_hat[lo:hi, None] if self.mode == "exact" else 0.0)
        return SampleResult(
            ids=ids,
            log_q=log_q,
            log_z=log_z[lo:hi].copy(),
            tv_bound=tv[lo:hi].copy(),
            nodes_opened=w[:, 0],
            inner_products=w[:, 1],
            proposals=w[:, 2],
            frontier_size=w[:, 3],
        )

    def log_partition(self, queries, *, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """Certified (lower, upper) bounds of log Z(q) over the union; collective."""
        r = self.sample(queries, 1, exclude=exclude, seed=0)
        return r.log_z[:, 0].copy(), r.log_z[:, 1].copy()

    # ------------------------------------------------------------------ search
    def search(self, queries, k: int, *, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """Exact global top-k by inner product (scores (B, k) float32 descending, ids
        (B, k) int64) for this rank's queries; collective. Ties: the smaller id first.
        ValueError on every rank when k exceeds a query's allowed targets over all shards."""

        def check():
            q, ptr, ex = self._check_input(queries, exclude)
            return q, ptr, ex, _validate.check_k(k)

        q, ptr, ex, kk = self._step(check, "search: checking the inputs")
        Q, ptr_all, ex_all, offsets, meta = self._gather_queries(q, ptr, ex, [kk])
        N = Q.shape[0]
        kq = np.repeat(meta[:, 2], meta[:, 0])
        running = np.concatenate(([0], np.cumsum(np.isin(ex_all, self.index.ids), dtype=np.int64)))
        allowed = len(self.index) - (running[ptr_all[1:]] - running[ptr_all[:-1]])
        total = self._all_gather(allowed, np.full(self.world_size, N)).reshape(self.world_size, N).sum(0)
        if (kq > total).any():
            b = int(np.flatnonzero(kq > total)[0])
            r = int(np.searchsorted(offsets, b, side="right") - 1)
            raise ValueError(
                f"rank {r}, query {b - offsets[r]}: k={int(kq[b])} is larger than the {int(total[b])} "
                "targets available over all shards"
            )
        kmax = int(kq.max()) if N else 1
        scores = np.full((N, kmax), -np.inf, np.float32)
        ids = np.full((N, kmax), -1, np.int64)

        def local():
            kl = np.minimum(kq, allowed)
            for kv in np.unique(kl[kl > 0]):
                rows = np.flatnonzero(kl == kv)
                s, i = self.index.search(Q[rows], int(kv), exclude=self._rows(ptr_all, ex_all, rows))
                scores[rows, :kv], ids[rows, :kv] = s, i

        self._step(local, "search: local top-k")
        cut = [slice(int(offsets[r]), int(offsets[r + 1])) for r in range(self.world_size)]
        s_all = self._exchange([scores[c] for c in cut])
        i_all = self._exchange([ids[c] for c in cut])
        kk = int(meta[self.rank, 2])
        S, I = np.concatenate(s_all, 1), np.concatenate(i_all, 1)  # noqa: E741
        order = np.lexsort((I, -S.astype(np.float64)), axis=-1)[:, :kk]
        return np.take_along_axis(S, order, 1), np.take_along_axis(I, order, 1)

    # ------------------------------------------------------------------ edits
    def insert(self, vectors, ids) -> None:
        """Add targets (new ids) from any rank; each lands on the rank `owner` names.
        Collective; nothing changes anywhere if any rank's batch is bad."""
        self._edit("insert", vectors, ids)

    def update(self, vectors, ids) -> None:
        """Move existing targets to new vectors, on the shards that hold them (for a
        DynamicIndex shard: `reencode`). Collective; unknown ids raise KeyError."""
        self._edit("update", vectors, ids)

    def remove(self, ids) -> None:
        """Remove targets by id from the shards that hold them. Collective; unknown ids
        raise KeyError."""
        self._edit("remove", None, ids)

    def _edit(self, op: str, vectors, ids) -> None:
        def check():
            ids_arr = _validate.as_ids(ids, None)
            x = None
            if vectors is not None:
                x = _validate.as_vectors(vectors, self.dim, "vectors", allow_empty=True)
                _validate.check_storable(x)
                if x.shape[0] != ids_arr.shape[0]:
                    raise ValueError(f"{op}: {ids_arr.shape[0]} ids but {x.shape[0]} vectors")
            dest = np.asarray(self.owner(ids_arr, self.world_size), np.int64) if ids_arr.size else ids_arr
            if dest.shape != ids_arr.shape or ((dest < 0) | (dest >= self.world_size)).any():
                raise ValueError(f"owner: expected one rank in [0, {self.world_size}) per id")
            return ids_arr, x, dest

        ids_arr, x, dest = self._step(check, f"{op}: checking the inputs")
        got_ids = np.concatenate(self._exchange([ids_arr[dest == r] for r in range(self.world_size)]))
        if vectors is not None:
            got_x = np.concatenate(self._exchange([x[dest == r] for r in range(self.world_size)]))

        def validate():
            s = np.sort(got_ids)
            dup = s[1:][s[1:] == s[:-1]]
            if dup.size:
                raise ValueError(f"{op}: id(s) {np.unique(dup)[:5].tolist()} given more than once (over all ranks)")
            present = np.isin(got_ids, self.index.ids)
            if op == "insert" and present.any():
                raise ValueError(f"insert: id(s) {got_ids[present][:5].tolist()} already in the index; use update()")
            if op != "insert" and not present.all():
                raise KeyError(f"{op}: id(s) {got_ids[~present][:5].tolist()} are in no shard")

        self._step(validate, f"{op}: checking the ids on their shards")

        def apply():
            if got_ids.size == 0:
                return
            ix = self.index
            if op == "remove":
                ix.remove(got_ids)
            elif op == "insert":
                (ix.add if isinstance(ix, DynamicIndex) else ix.insert)(got_x, got_ids)
            else:
                (ix.reencode if isinstance(ix, DynamicIndex) else ix.update)(got_x, got_ids)

        self._edits += 1
        self._step(apply, f"{op}: applying (the other shards applied theirs)")

    # ------------------------------------------------------------------ files
    def save(self, path: str) -> None:
        """Each rank writes its shard to path.format(rank=..., world_size=...); collective.
        path must contain "{rank}"."""
        self._step(lambda: self.index.save(_shard_path(path, self.rank, self.world_size)), "save")

    @classmethod
    def load(
        cls,
        path: str,
        *,
        temperature: float,
        dynamic: bool = False,
        group: Any = None,
        timeout: float = 300.0,
        **kwargs,
    ) -> ShardedSampler:
        """The ShardedSampler over the shards `save` wrote (each rank reads its own);
        collective. dynamic: the shards are DynamicIndex files."""
        if group is None:
            group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=float(timeout)))
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        err: BaseException | None = None
        index: Any = None
        try:
            index = (DynamicIndex if dynamic else TreeIndex).load(_shard_path(path, rank, world))
        except Exception as e:  # every rank must reach the agreement below
            err = e
        _agree(group, rank, world, err, "load: reading the shards", timeout)
        return cls(index, temperature=temperature, group=group, timeout=timeout, **kwargs)


def _agree(group: Any, rank: int, world: int, err: BaseException | None, what: str, timeout: float) -> None:
    """One all_reduce of every rank's failure flag: this rank's own error is re-raised,
    a failure elsewhere raises ShardError here."""
    flag = torch.zeros(world, dtype=torch.int32)
    flag[rank] = int(err is not None)
    try:
        dist.all_reduce(flag, group=group)
    except RuntimeError as e:
        raise ShardError(
            f"{what}: a collective failed or timed out (timeout {timeout:g} s): another rank "
            f"failed, exited or did not make the same call ({e})"
        ) from e
    bad = np.flatnonzero(flag.numpy()).tolist()
    if err is not None:
        raise err
    if bad:
        raise ShardError(f"{what}: failed on rank(s) {bad} (their own error says why); abandoned on every rank")


def _shard_path(path: str, rank: int, world_size: int) -> str:
    p = str(path)
    if "{rank}" not in p:
        raise ValueError(f"path: expected a pattern containing '{{rank}}', got {p!r}")
    return p.format(rank=rank, world_size=world_size)


def _key(seq: np.random.SeedSequence, *words: int) -> int:
    """A 63-bit seed from the call's shared seed sequence and some words."""
    return int(np.random.SeedSequence([*seq.entropy, *words]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _pack(rows: np.ndarray, ids: np.ndarray, w: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(query, id, value) records of the kept entries of (rows x columns) arrays (query
    and id bit-cast into the float64 columns, so ids keep all 64 bits)."""
    counts = keep.sum(1)
    out = np.empty((int(counts.sum()), 3), np.float64)
    out[:, 0] = np.repeat(np.asarray(rows, np.int64), counts).view(np.float64)
    out[:, 1] = ids[keep].view(np.float64)
    out[:, 2] = w[keep]
    return out
