"""Stateful properties: after every edit, search is exact and exact sampling is exact.

Two hypothesis state machines drive random edit sequences: one over `TreeIndex`
(build / insert / remove / update / rebuild(node) / rebuild() / compact / save+load),
one over `DynamicIndex` (add / reencode, i.e. write-back of fresh vectors / remove /
landmark refresh / partial and full rebuilds, policy-triggered too / save+load). Ids are
negative, sparse and huge (near +-2**62, and the int64 extremes), removed ids come back,
and every batch lists its ids in random order.

After every step: `check()`; the stored ids and vectors equal the model's; search equals
brute force with per-query exclusions (empty rows among them, also trailing ones), query
by query and on the grouped batch path; and exact sampling, both on the tree (rejection,
`dense_fallback=None`) and on the dense pass (`dense_fallback` tiny), follows the
brute-force softmax over the live allowed ids: excluded and dead ids never come back,
`tv_bound` is 0, the brute-force log Z lies inside `log_z`, and the draws pass a
goodness-of-fit test.

The goodness-of-fit test (tests/_oracles.py) is an exact per-cell binomial test with a
Bonferroni correction: a correct sampler fails one check with probability at most ALPHA =
1e-9. The default run makes ~10^4 such checks and the slow run ~5 * 10^5, so a false
alarm anywhere stays below 0.1%.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from treeidx import SoftmaxSampler, TreeIndex
from treeidx._kernels.arrays import DEAD
from treeidx.dynamic import DynamicIndex, RefreshPolicy
from treeidx.tree import GROUP_MIN_QUERIES

from ._oracles import assert_sampling_exact, assert_search_exact, excluded_mask

TINY_FALLBACK = 1e-12  # every query's tree work reaches it at once: the dense pass answers
SHAPE = dict(leaf_size=3, fanout=3)  # tiny leaves: edits grow, split and empty them often
INT64 = np.iinfo(np.int64)


# ---------------------------------------------------------------------------- ids


def fresh_ids(rng: np.random.Generator, n: int, live: set, dead: list) -> np.ndarray:
    """n distinct ids not in `live`, in random order: small (often negative, -1 among
    them), near +-2**62, anywhere in int64 (its extremes included), or ids removed earlier."""
    out: list[int] = []
    taken = set(live)
    while len(out) < n:
        kind = rng.integers(0, 6)
        if kind == 0:
            v = int(rng.integers(-40, 40))
        elif kind == 1:
            v = 2**62 + int(rng.integers(-50, 50))
        elif kind == 2:
            v = -(2**62) + int(rng.integers(-50, 50))
        elif kind == 3:
            v = int(rng.integers(INT64.min, INT64.max, endpoint=True))
        elif kind == 4:
            v = int(rng.choice([INT64.min, INT64.max, INT64.min + 1, INT64.max - 1, -1, 0]))
        else:
            v = int(rng.choice(dead)) if dead else int(rng.integers(-(10**15), 10**15))
        if v not in taken:
            taken.add(v)
            out.append(v)
    return np.array(out, np.int64)


def exclusion_rows(rng: np.random.Generator, live: np.ndarray, dead: list, nq: int, keep_one: bool) -> list:
    """Per query: none, or a random share of the live ids (in random order) plus dead and
    unknown ids. The last rows are often empty: trailing empty rows are the edge case of
    the per-query exclusion lists (CSR). keep_one: leave at least one live id allowed."""
    rows = []
    trailing = int(rng.integers(0, nq))
    for b in range(nq):
        if b >= nq - trailing or rng.random() < 0.25:
            rows.append([])
            continue
        m = int(rng.integers(0, live.size + 1))
        if keep_one:
            m = min(m, live.size - 1)
        ex = rng.choice(live, m, replace=False).tolist()
        if dead:
            ex += rng.choice(dead, min(len(dead), 3), replace=False).tolist()
        ex.append(int(rng.integers(INT64.min, INT64.max)))  # unknown: ignored
        rng.shuffle(ex)
        rows.append(ex)
    return rows


def allowed_k(live: np.ndarray, rows: list) -> int:
    return int(live.size - excluded_mask(live, rows).sum(axis=1).max())


# ---------------------------------------------------------------------------- TreeIndex


class _Machine(RuleBasedStateMachine):
    """Common set-up: a scratch folder, and one numba thread (results do not depend on
    the thread count; on tiny inputs, waking a pool costs more than the work)."""

    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="treeidx-stateful-"))
        self.dead: list[int] = []
        self._threads = numba.get_num_threads()
        numba.set_num_threads(1)

    def teardown(self):
        numba.set_num_threads(self._threads)
        shutil.rmtree(self.tmp, ignore_errors=True)


class TreeIndexMachine(_Machine):
    """Random edit sequences on a TreeIndex against a dict model {id: vector}."""

    def __init__(self):
        super().__init__()
        self.model: dict[int, np.ndarray] = {}

    @initialize(
        n=st.integers(1, 120),
        dim=st.integers(1, 8),
        seed=st.integers(0, 2**32),
        clustered=st.booleans(),
        temperature=st.sampled_from([0.3, 1.0, 3.0]),
        build_seed=st.one_of(st.integers(0, 1000), st.just(2**63 - 1)),
    )
    def build(self, n, dim, seed, clustered, temperature, build_seed):
        self.rng = np.random.default_rng(seed)
        self.dim, self.clustered, self.beta = dim, clustered, 1.0 / temperature
        self.centers = self.rng.standard_normal((3, dim))
        x = self.points(n)
        ids = fresh_ids(self.rng, n, set(), [])
        self.index = TreeIndex.build(x, ids, seed=build_seed, **SHAPE)
        self.model = dict(zip(ids.tolist(), x))

    def points(self, n: int) -> np.ndarray:
        x = self.rng.standard_normal((n, self.dim))
        if self.clustered:  # tight clusters, some exact duplicates
            x = self.centers[self.rng.integers(0, 3, n)] + 0.1 * x
            x[: n // 4] = x[0]
        return (x / np.sqrt(self.dim)).astype(np.float32)

    def live(self) -> np.ndarray:
        return np.array(sorted(self.model), np.int64)

    @rule(n=st.integers(1, 40))
    def insert(self, n):
        ids = fresh_ids(self.rng, n, set(self.model), self.dead)
        x = self.points(n)
        self.index.insert(x, ids)
        self.model.update(zip(ids.tolist(), x))
        self.dead = [i for i in self.dead if i not in self.model]

    @precondition(lambda self: len(self.model) > 0)
    @rule(frac=st.floats(0.0, 1.0))
    def remove(self, frac):
        live = self.live()
        gone = self.rng.choice(live, max(1, int(round(frac * live.size))), replace=False)
        self.index.remove(gone)
        for i in gone.tolist():
            del self.model[i]
        self.dead.extend(gone.tolist())

    @precondition(lambda self: len(self.model) > 0)
    @rule(frac=st.floats(0.0, 1.0), scale=st.sampled_from([0.0, 0.1, 1.0, 3.0]))
    def update(self, frac, scale):
        live = self.live()
        moved = self.rng.choice(live, max(1, int(round(frac * live.size))), replace=False)
        x = np.stack([self.model[i] for i in moved.tolist()])
        x = (x + scale * self.rng.standard_normal(x.shape) / np.sqrt(self.dim)).astype(np.float32)
        self.index.update(x, moved)
        self.model.update(zip(moved.tolist(), x))

    @precondition(lambda self: len(self.model) > 0)
    @rule(pick=st.integers(0, 10**6))
    def rebuild_node(self, pick):
        A = self.index.view().arrays  # trimmed to the nodes in use
        nodes = np.flatnonzero(A.parent != DEAD)
        nodes = nodes[nodes != 0]
        if nodes.size:
            node = int(nodes[pick % nodes.size])
            event("rebuild(node): a leaf" if A.leaf_start[node] >= 0 else "rebuild(node): internal")
            self.index.rebuild(node)

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def rebuild_all(self):
        self.index.rebuild()

    @rule()
    def compact(self):
        self.index.compact()

    @rule()
    def save_and_load(self):
        path = self.tmp / "index.tidx"
        self.index.save(path)
        self.index = TreeIndex.load(path)
        assert not list(self.tmp.glob("*.tmp")), "temporary file left behind"

    @invariant()
    def search_and_sampling_are_exact(self):
        if not hasattr(self, "index"):
            return
        index = self.index
        index.check()
        live = self.live()
        np.testing.assert_array_equal(index.ids, live)
        if live.size == 0:
            with pytest.raises(ValueError, match="empty"):
                index.search(np.zeros((1, self.dim), np.float32), 1)
            return
        x = np.stack([self.model[i] for i in live.tolist()])
        np.testing.assert_array_equal(index.vectors(live), x)
        event(f"live ids: {'<=10' if live.size <= 10 else '<=100' if live.size <= 100 else '>100'}")
        # search, query by query and on the grouped batch path
        for nq in (3, GROUP_MIN_QUERIES + 1):
            q = self.points(nq) * self.rng.choice([1.0, 3.0])
            rows = exclusion_rows(self.rng, live, self.dead, nq, keep_one=True)
            k = int(self.rng.integers(1, allowed_k(live, rows) + 1))
            assert_search_exact(index.search, x, live, q, k, rows)
        # exact sampling, tree and dense paths
        q = self.points(2)
        rows = exclusion_rows(self.rng, live, self.dead, 2, keep_one=True)
        seed = int(self.rng.integers(0, 2**63))
        for dense in (False, True):
            sampler = SoftmaxSampler(
                index, temperature=1.0 / self.beta, dense_fallback=TINY_FALLBACK if dense else None
            )
            assert_sampling_exact(sampler.sample, x, live, q, self.beta, rows, seed, dense)


TestTreeIndexMachine = TreeIndexMachine.TestCase
TestTreeIndexMachine.settings = settings(
    max_examples=200, stateful_step_count=6, deadline=None, suppress_health_check=list(HealthCheck)
)


# ---------------------------------------------------------------------------- DynamicIndex


class Encoder:
    """A drifting synthetic encoder: step t maps a base point x to M_t x + c_t tanh(B x)."""

    def __init__(self, d: int, rng: np.random.Generator):
        self.rng, self.d = rng, d
        self.m = np.eye(d)
        self.b = rng.standard_normal((d, d)) / np.sqrt(d)
        self.c = 0.0

    def step(self, size: float) -> None:
        self.m = self.m + size * self.rng.standard_normal((self.d, self.d)) / np.sqrt(self.d)
        self.c += size

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return (x @ self.m.T + self.c * np.tanh(x @ self.b)).astype(np.float32)


class DynamicIndexMachine(_Machine):
    """Random add / reencode / remove / refresh / rebuild / save+load on a DynamicIndex.
    The policy rebuilds the grown top-level subtrees (partial rebuilds) after few moves."""

    @initialize(
        n=st.integers(20, 120),
        dim=st.integers(2, 6),
        seed=st.integers(0, 2**32),
        kernel=st.sampled_from(["linear", "rbf"]),
        temperature=st.sampled_from([0.5, 2.0]),
        moved=st.sampled_from([0.05, 0.2]),
    )
    def build(self, n, dim, seed, kernel, temperature, moved):
        self.rng = np.random.default_rng(seed)
        self.dim, self.beta = dim, 1.0 / temperature
        self.enc = Encoder(dim, self.rng)
        ids = fresh_ids(self.rng, n, set(), [])
        self.base = dict(zip(ids.tolist(), self.points(n)))  # removed landmarks keep theirs
        policy = RefreshPolicy(max_moved_fraction=moved, rebuild="partial", radius_growth=1.0)
        self.di = DynamicIndex.build(
            self.enc(np.stack(list(self.base.values()))),
            ids,
            n_landmarks=min(12, n),
            kernel=kernel,
            temperature=temperature,
            policy=policy,
            seed=seed % 1000,
            **SHAPE,
        )
        self.live_ids = set(ids.tolist())

    def points(self, n: int) -> np.ndarray:
        return (self.rng.standard_normal((n, self.dim)) / np.sqrt(self.dim)).astype(np.float32)

    def pick(self, frac: float) -> np.ndarray:
        live = np.array(sorted(self.live_ids), np.int64)
        return self.rng.choice(live, max(1, int(round(frac * live.size))), replace=False)

    def note_rebuilds(self, before: int) -> None:
        for e in self.di.log[before:]:
            if e["event"] == "rebuild":
                event(f"DynamicIndex: {e['action']}")

    @rule(size=st.sampled_from([0.0, 0.1, 0.4]))
    def refresh(self, size):
        self.enc.step(size)
        fresh = self.enc(np.stack([self.base[i] for i in self.di.landmark_ids.tolist()]))
        before = len(self.di.log)
        self.di.refresh_landmarks(fresh)
        self.note_rebuilds(before)

    @rule(frac=st.floats(0.0, 0.6))
    def reencode(self, frac):
        ids = self.pick(frac)
        before = len(self.di.log)
        self.di.reencode(self.enc(np.stack([self.base[i] for i in ids.tolist()])), ids)
        self.note_rebuilds(before)

    @rule(n=st.integers(1, 25))
    def add(self, n):
        ids = fresh_ids(self.rng, n, self.live_ids, self.dead)
        x = self.points(n)
        before = len(self.di.log)
        self.di.add(self.enc(x), ids)
        self.note_rebuilds(before)
        for i, v in zip(ids.tolist(), x):
            if i not in self.di.drift.landmark_ids:  # a landmark's base stays what the model saw
                self.base[i] = v
        self.live_ids.update(ids.tolist())
        self.dead = [i for i in self.dead if i not in self.live_ids]

    @precondition(lambda self: len(self.live_ids) > 5)
    @rule(frac=st.floats(0.0, 0.5))
    def remove(self, frac):
        ids = self.pick(frac)
        ids = ids[: len(self.live_ids) - 3]
        self.di.remove(ids)
        self.live_ids.difference_update(ids.tolist())
        self.dead.extend(ids.tolist())

    @rule(partial=st.booleans())
    def rebuild(self, partial):
        before = len(self.di.log)
        self.di.rebuild(partial=partial)
        self.note_rebuilds(before)

    @rule()
    def save_and_load(self):
        path = self.tmp / "dynamic.npz"
        self.di.save(path)
        self.di = DynamicIndex.load(path)

    @invariant()
    def search_and_sampling_are_exact(self):
        if not hasattr(self, "di"):
            return
        di = self.di
        di.check()
        live = np.array(sorted(self.live_ids), np.int64)
        np.testing.assert_array_equal(di.ids, live)
        # what the tree holds and scores: features phi and transformed queries W q
        phi = di.tree.vectors(live)
        for nq in (3, GROUP_MIN_QUERIES + 1):
            q = self.enc(self.points(nq))
            rows = exclusion_rows(self.rng, live, self.dead, nq, keep_one=True)
            k = int(self.rng.integers(1, allowed_k(live, rows) + 1))
            _assert_dynamic_search(di, phi, live, q, k, rows)
        q = self.enc(self.points(2))
        rows = exclusion_rows(self.rng, live, self.dead, 2, keep_one=True)
        seed = int(self.rng.integers(0, 2**63))
        wq = di.drift.transform_queries(q)
        for dense in (False, True):
            di.sampler.dense_fallback = TINY_FALLBACK if dense else None
            assert_sampling_exact(
                lambda _q, k, exclude, seed: di.sample(q, k, exclude=exclude, seed=seed),
                phi,
                live,
                wq,
                self.beta,
                rows,
                seed,
                dense,
            )


def _assert_dynamic_search(di, phi, live, q, k, rows):
    """DynamicIndex.search(q) is the tree's exact top-k of W q over the features."""
    wq = di.drift.transform_queries(q)
    assert_search_exact(lambda _q, k, exclude: di.search(q, k, exclude=exclude), phi, live, wq, k, rows)


TestDynamicIndexMachine = DynamicIndexMachine.TestCase
TestDynamicIndexMachine.settings = settings(
    max_examples=200, stateful_step_count=6, deadline=None, suppress_health_check=list(HealthCheck)
)


# ---------------------------------------------------------------------------- slow: 10k sequences

_SLOW = settings(max_examples=5000, stateful_step_count=10, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.slow
class TestTreeIndexMachineSlow(TreeIndexMachine.TestCase):
    """5,000 op sequences of up to 10 steps (10,000 with the DynamicIndex one; opt-in:
    pytest -m slow --hypothesis-show-statistics reports the count)."""

    settings = _SLOW


@pytest.mark.slow
class TestDynamicIndexMachineSlow(DynamicIndexMachine.TestCase):
    """5,000 op sequences of up to 10 steps."""

    settings = _SLOW
