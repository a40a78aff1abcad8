"""TreeIndex: invariants under random edit sequences, exact search, persistence, bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from treeidx import IndexFileError, InvariantError, TreeIndex
from treeidx.tree import GROUP_MIN_QUERIES

SMALL = dict(leaf_size=4, fanout=3)  # tiny leaves so edits split, grow and empty them often


def brute_topk(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int, exclude=None):
    s = q.astype(np.float64) @ x.T.astype(np.float64)
    if exclude is not None:
        for b, ex in enumerate(exclude):
            s[b, np.isin(ids, np.atleast_1d(list(ex) if isinstance(ex, set) else ex))] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), ids[order]


def assert_search_exact(index: TreeIndex, x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int, exclude=None) -> None:
    """Same top-k as brute force, ties aside: scores agree, ids agree where scores are distinct."""
    got_s, got_i = index.search(q, k, exclude=exclude)
    ref_s, ref_i = brute_topk(x, ids, q, k, exclude)
    np.testing.assert_allclose(got_s, ref_s, rtol=1e-4, atol=1e-4)
    exact = dict(zip(ids.tolist(), (q.astype(np.float64) @ x.T.astype(np.float64)).T))
    for b in range(q.shape[0]):  # every returned id really has the returned score
        np.testing.assert_allclose([exact[i][b] for i in got_i[b]], got_s[b], rtol=1e-4, atol=1e-4)
        assert len(set(got_i[b].tolist())) == k
        if exclude is not None:
            assert not set(got_i[b].tolist()) & set(
                np.atleast_1d(list(exclude[b]) if isinstance(exclude[b], set) else exclude[b]).tolist()
            )


class TreeEdits(RuleBasedStateMachine):
    """Random sequences of build/insert/remove/update/rebuild against a dict model."""

    def __init__(self):
        super().__init__()
        self.model: dict[int, np.ndarray] = {}
        self.next_id = 0

    @initialize(n=st.integers(1, 120), dim=st.integers(1, 6), seed=st.integers(0, 2**16), clustered=st.booleans())
    def build(self, n, dim, seed, clustered):
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        self.clustered = clustered
        x = self.points(n)
        ids = self.rng.permutation(10 * n)[:n] - 5 * n  # arbitrary, negative ones too
        self.index = TreeIndex.build(x, ids, seed=seed, **SMALL)
        self.model = dict(zip(ids.tolist(), x))
        self.next_id = 10 * n

    def points(self, n):
        x = self.rng.standard_normal((n, self.dim)).astype(np.float32)
        if self.clustered:  # a few tight clusters and exact duplicates
            centers = 5 * self.rng.standard_normal((3, self.dim))
            x = (centers[self.rng.integers(0, 3, n)] + 0.1 * x).astype(np.float32)
            x[: n // 4] = x[0]
        return x

    @rule(n=st.integers(1, 40))
    def insert(self, n):
        x = self.points(n)
        ids = np.arange(self.next_id, self.next_id + n)
        self.next_id += n
        self.index.insert(x, ids)
        self.model.update(zip(ids.tolist(), x))

    @precondition(lambda self: len(self.model) > 0)
    @rule(frac=st.floats(0.0, 1.0))
    def remove(self, frac):
        keys = np.array(sorted(self.model))
        gone = self.rng.choice(keys, max(1, int(frac * len(keys))), replace=False)
        self.index.remove(gone)
        for i in gone.tolist():
            del self.model[i]

    @precondition(lambda self: len(self.model) > 0)
    @rule(frac=st.floats(0.0, 1.0), scale=st.floats(0.0, 3.0))
    def update(self, frac, scale):
        keys = np.array(sorted(self.model))
        moved = self.rng.choice(keys, max(1, int(frac * len(keys))), replace=False)
        x = np.stack([self.model[i] for i in moved.tolist()])
        x = (x + scale * self.rng.standard_normal(x.shape)).astype(np.float32)
        self.index.update(x, moved)
        self.model.update(zip(moved.tolist(), x))

    @precondition(lambda self: len(self.model) > 0)
    @rule(whole=st.booleans(), pick=st.integers(0, 10**6))
    def rebuild(self, whole, pick):
        if whole:
            self.index.rebuild()
            return
        A = self.index._A
        live = np.flatnonzero(A.parent[: self.index._n_nodes] >= 0)
        self.index.rebuild(int(live[pick % live.size]))

    @invariant()
    def invariants_hold_and_search_is_exact(self):
        self.index.check()
        assert len(self.index) == len(self.model)
        assert sorted(self.model) == self.index.ids.tolist()
        if not self.model:
            return
        ids = np.array(sorted(self.model))
        x = np.stack([self.model[i] for i in ids.tolist()])
        np.testing.assert_array_equal(self.index.vectors(ids), x)
        k = int(min(len(ids), 1 + self.rng.integers(0, 6)))
        for nq in (3, GROUP_MIN_QUERIES + 5):  # query by query, and the grouped batch path
            q = self.rng.standard_normal((nq, self.dim)).astype(np.float32)
            assert_search_exact(self.index, x, ids, q, k)


TestTreeEdits = TreeEdits.TestCase
TestTreeEdits.settings = settings(
    max_examples=40, stateful_step_count=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((20, 12))
    x = centers[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 12))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = centers[rng.integers(0, 20, 40)] + 0.3 * rng.standard_normal((40, 12))
    return x.astype(np.float32), q.astype(np.float32)


def test_search_exact_with_exclusions(data):
    x, q = data
    ids = np.arange(x.shape[0]) * 7 + 3
    index = TreeIndex.build(x, ids, seed=3)
    _, top = brute_topk(x, ids, q, 5)
    exclude = [set(top[b, :3].tolist()) | {-1, 10**12} for b in range(q.shape[0])]  # unknown ids ignored
    assert_search_exact(index, x, ids, q, 10, exclude)
    assert_search_exact(index, x, ids, q, 10, ids[np.arange(q.shape[0])])  # one id per query


def test_wide_nodes_search_and_sample_exactly():
    """Regions with more than 64 clusters (work arrays must grow inside the kernels)."""
    from treeidx import SoftmaxSampler

    rng = np.random.default_rng(8)
    x = rng.standard_normal((6000, 5)).astype(np.float32)
    q = rng.standard_normal((6, 5)).astype(np.float32)
    index = TreeIndex.build(x, leaf_size=2, top_fanout=5000)
    index.check()
    assert max(len(_kids(index, int(r))) for r in _kids(index, 0)) > 64
    assert_search_exact(index, x, np.arange(6000), q, 7)
    q_many = rng.standard_normal((3 * GROUP_MIN_QUERIES, 5)).astype(np.float32)  # grouped path
    assert_search_exact(index, x, np.arange(6000), q_many, 7)
    r = SoftmaxSampler(index, temperature=0.5).sample(q, 8, seed=1)
    assert r.ids.shape == (6, 8)


def _kids(index, v):
    out, c = [], index._A.first_child[v]
    while c >= 0:
        out.append(c)
        c = index._A.next_sibling[c]
    return out


def test_grouped_batch_search_equals_query_by_query(data):
    """A batch large enough for the grouped path returns exactly what each query alone
    returns (same float32 kernels), in every block of a multi-block batch."""
    import treeidx.tree as tree_mod

    x, q = data
    index = TreeIndex.build(x, seed=2)
    q = np.concatenate([q, -q, q[::-1] * 0.5])  # 120 queries
    assert q.shape[0] >= tree_mod.GROUP_MIN_QUERIES
    one = [index.search(q[b : b + 1], 10) for b in range(q.shape[0])]
    for block in (tree_mod.GROUP_BLOCK, 32):  # one block, then several
        old = tree_mod.GROUP_BLOCK
        tree_mod.GROUP_BLOCK = block
        try:
            s, i = index.search(q, 10)
        finally:
            tree_mod.GROUP_BLOCK = old
        np.testing.assert_array_equal(s, np.concatenate([o[0] for o in one]))
        np.testing.assert_array_equal(i, np.concatenate([o[1] for o in one]))


def test_search_prunes_on_clustered_data(data):
    """The bounds must actually prune: far fewer leaves opened than exist."""
    x, q = data
    index = TreeIndex.build(x, seed=0)
    _, _, work = index.search(q, 10, return_work=True)
    assert np.median(work.nodes_visited) < 0.5 * index.stats()["nodes"]
    assert (work.inner_products < len(index)).all() and (work.inner_products >= 10).all()
    assert not hasattr(index, "last_search_visited")  # reads leave the index untouched


def test_build_is_deterministic_under_seed(data):
    x, _ = data
    a, b = TreeIndex.build(x, seed=5), TreeIndex.build(x, seed=5)
    for name in a._A._fields:
        np.testing.assert_array_equal(getattr(a._A, name), getattr(b._A, name))


def test_queries_from_several_threads(data):
    x, q = data
    index = TreeIndex.build(x)
    expect = index.search(q, 10)[1]
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(index.search(q, 10)[1])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(results) == 20
    for r in results:
        np.testing.assert_array_equal(r, expect)


def test_save_load_round_trip(tmp_path, data):
    x, q = data
    index = TreeIndex.build(x, np.arange(x.shape[0]) + 100, seed=2)
    index.insert(x[:50] * 0.5, np.arange(50))
    index.remove(np.arange(100, 140))
    path = tmp_path / "index.tix"
    index.save(path)
    loaded = TreeIndex.load(path)
    loaded.check()
    for name in index._A._fields:
        n = index._n_slots if name in ("vecs", "slot_id", "slot_leaf") else index._n_nodes
        np.testing.assert_array_equal(getattr(loaded._A, name), getattr(index._A, name)[:n])
    np.testing.assert_array_equal(loaded.ids, index.ids)
    for got, want in zip(loaded.search(q, 10), index.search(q, 10)):
        np.testing.assert_array_equal(got, want)
    loaded.insert(x[:3], [10**9, 10**9 + 1, 10**9 + 2])  # a loaded index stays editable
    loaded.check()
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


@pytest.mark.parametrize(
    "damage", ["truncate_header", "truncate_data", "flip_data", "flip_header", "bad_magic", "empty"]
)
def test_corrupt_file_raises_clear_error(tmp_path, data, damage):
    x, _ = data
    path = tmp_path / "index.tix"
    TreeIndex.build(x[:500]).save(path)
    raw = bytearray(path.read_bytes())
    if damage == "truncate_header":
        raw = raw[:30]
    elif damage == "truncate_data":
        raw = raw[: len(raw) - 1000]
    elif damage == "flip_data":
        raw[len(raw) // 2] ^= 0xFF
    elif damage == "flip_header":
        raw[40] ^= 0x01
    elif damage == "bad_magic":
        raw[:8] = b"NOTTREE!"
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError):
        TreeIndex.load(path)


def test_failed_save_keeps_previous_file(tmp_path, data, monkeypatch):
    x, _ = data
    path = tmp_path / "index.tix"
    TreeIndex.build(x[:100]).save(path)
    before = path.read_bytes()
    import treeidx.io as tio

    monkeypatch.setattr(tio, "crc32", lambda buf: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        TreeIndex.build(x[:200]).save(path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp"))


def test_check_detects_broken_radius_and_count(data):
    x, _ = data
    index = TreeIndex.build(x[:300])
    leaf = int(np.flatnonzero(index._A.leaf_start[: index._n_nodes] >= 0)[0])
    index._A.radius[leaf] *= 0.5
    with pytest.raises(InvariantError, match="beyond radius"):
        index.check()
    index._A.radius[leaf] *= 2.0
    index.check()
    index._A.count[leaf] += 1
    with pytest.raises(InvariantError, match="count"):
        index.check()
    index._A.count[leaf] -= 1
    top = int(index._A.first_child[0])
    assert index._A.node_lo[top] >= 0  # freshly built: every subtree is one slot range
    index._A.node_lo[top] += 1
    with pytest.raises(InvariantError, match="contiguous"):
        index.check()


def _snapshot(index: TreeIndex):
    return [a.copy() for a in index._A] + [index._keys.copy(), index._key_slot.copy()]


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda ix, x: ix.insert(x[:2] * np.nan, [900, 901]), ValueError, "NaN"),
        (lambda ix, x: ix.insert(np.full((2, 12), np.inf), [900, 901]), ValueError, "inf"),
        (lambda ix, x: ix.insert(x[:2, :5], [900, 901]), ValueError, "dimension 12"),
        (lambda ix, x: ix.insert(np.array([["a"] * 12] * 2), [900, 901]), ValueError, "dtype"),
        (lambda ix, x: ix.insert(x[:0], []), ValueError, "empty"),
        (lambda ix, x: ix.insert(x[:2], [900, 900]), ValueError, "duplicate"),
        (lambda ix, x: ix.insert(x[:2], [900]), ValueError, "expected 2 ids"),
        (lambda ix, x: ix.insert(x[:2], [5, 900]), ValueError, "already in the index"),
        (lambda ix, x: ix.remove([5, 10**9]), KeyError, "unknown"),
        (lambda ix, x: ix.remove([5, 5]), ValueError, "duplicate"),
        (lambda ix, x: ix.remove([]), ValueError, "empty"),
        (lambda ix, x: ix.update(x[:2], [5, 10**9]), KeyError, "unknown"),
        (lambda ix, x: ix.update(x[:3], [5, 6]), ValueError, "2 ids but 3"),
        (lambda ix, x: ix.update(x[:2] * np.inf, [5, 6]), ValueError, "inf"),
        (lambda ix, x: ix.search(x[:2], 0), ValueError, "positive"),
        (lambda ix, x: ix.search(x[:2], 501), ValueError, "larger than"),
        (lambda ix, x: ix.search(x[:1], 500, exclude=[[1]]), ValueError, "larger than"),
        (lambda ix, x: ix.search(x[:2, :3], 3), ValueError, "dimension"),
        (lambda ix, x: ix.search(x[:2], 3, exclude=[[1]]), ValueError, "one id set per query"),
        (lambda ix, x: ix.vectors([10**9]), KeyError, "unknown"),
        (lambda ix, x: ix.rebuild(10**6), ValueError, "not a live node"),
    ],
)
def test_bad_input_raises_and_changes_nothing(data, call, exc, match):
    x, _ = data
    index = TreeIndex.build(x[:500], seed=1)
    before = _snapshot(index)
    with pytest.raises(exc, match=match):
        call(index, x)
    for a, b in zip(before, _snapshot(index)):
        np.testing.assert_array_equal(a, b)
    index.check()


def test_build_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        TreeIndex.build(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        TreeIndex.build(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="duplicate"):
        TreeIndex.build(np.zeros((3, 2)), ids=[1, 2, 1])
    with pytest.raises(ValueError, match="unknown shape option"):
        TreeIndex.build(np.zeros((3, 2)), leafsize=3)
    with pytest.raises(ValueError, match="2-d"):
        TreeIndex.build(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="inf"):  # finite float64 that overflows float32
        TreeIndex.build(np.array([[1e39, 0.0]]))


def test_empty_after_removing_everything_then_reusable(data):
    x, q = data
    index = TreeIndex.build(x[:50])
    index.remove(np.arange(50))
    index.check()
    assert len(index) == 0
    with pytest.raises(ValueError, match="empty"):
        index.search(q, 1)
    index.insert(x[:10], np.arange(10))
    index.check()
    assert_search_exact(index, x[:10], np.arange(10), q, 3)


@given(scale=st.sampled_from([1e-20, 1e-3, 1.0, 1e3, 1e15]), seed=st.integers(0, 1000))
@settings(max_examples=15, deadline=None)
def test_extreme_scales_keep_search_exact(scale, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((200, 5)) * scale).astype(np.float32)
    q = rng.standard_normal((4, 5)).astype(np.float32)
    index = TreeIndex.build(x, seed=seed, leaf_size=8)
    index.check()
    got_s, got_i = index.search(q, 5)
    ref_s, _ = brute_topk(x, np.arange(200), q, 5)
    np.testing.assert_allclose(got_s, ref_s, rtol=1e-4, atol=1e-30 + 1e-4 * np.abs(ref_s).max())


def test_repr_and_stats(data):
    x, _ = data
    index = TreeIndex.build(x)
    assert "TreeIndex(n=3000, dim=12" in repr(index)
    st_ = index.stats()
    assert st_["n"] == 3000 and st_["leaf_size_max"] <= 32 and st_["depth"] >= 2
    assert sum(lv["nodes"] for lv in st_["radii_by_level"]) == st_["nodes"]
    assert st_["bytes_per_target"] < 1.5 * 12 * 4 + 64
