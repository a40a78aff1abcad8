"""Regression tests for the reliability issue: each reproduction now gives the right
answer or a clear error naming the argument, and a refused call leaves the index as it was
(check() passes, search results identical)."""

from __future__ import annotations

import os
import re
import stat

import numpy as np
import pytest
import torch

import treeidx.tree as tree_mod
from treeidx import IndexFileError, InvariantError, SoftmaxSampler, TreeIndex
from treeidx._validate import STORE_LIMIT
from treeidx.dynamic import DynamicIndex, RefreshPolicy
from treeidx.torch import TreeNegativeSampler

from ._oracles import assert_sampling_exact, assert_search_exact


def data(n=1000, d=8, seed=0, nq=20):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    q = (rng.standard_normal((nq, d)) / np.sqrt(d)).astype(np.float32)
    return x, q, rng


def snapshot(index: TreeIndex):
    return [a.copy() for a in index._A] + [index._keys.copy(), index._key_slot.copy()]


def assert_same_content(index: TreeIndex, ids, x, q) -> None:
    """The index holds exactly (ids, x), passes check(), and searches like brute force."""
    index.check()
    order = np.argsort(ids)
    ids, x = np.asarray(ids)[order], x[order]
    np.testing.assert_array_equal(index.ids, ids)
    np.testing.assert_array_equal(index.vectors(ids), x)
    assert_search_exact(index.search, x, ids, q, min(5, ids.size), [[]] * q.shape[0])


def live_node(index: TreeIndex, internal: bool) -> int:
    A = index._A
    v = np.flatnonzero((A.parent[: index._n_nodes] >= 0) & ((A.leaf_start[: index._n_nodes] < 0) == internal))
    return int(v[v != 0][0])


# ------------------------------------------------------------------ defect 0: id map order


def test_insert_of_unsorted_new_ids_keeps_the_id_map_sorted():
    x, q, rng = data()
    idx = TreeIndex.build(x, seed=0)
    new_x = rng.standard_normal((100, 8)).astype(np.float32)
    new_ids = rng.permutation(np.arange(5000, 5100))
    idx.insert(new_x, new_ids)
    assert_same_content(idx, np.r_[np.arange(1000), new_ids], np.r_[x, new_x], q)
    idx.insert(new_x[:7] * 2, [-3, 10**15, -(10**15), 4999, 1000, -1, 2**62])  # into every gap
    idx.check()


# ------------------------------------------------------------------ defect 1: retired slots


@pytest.mark.parametrize("dense_fallback", [None, 1e-12])
def test_exact_sampling_after_subtree_rebuilds(dense_fallback):
    """rebuild(node) retires slots whose old ids and vectors stay in the array: neither
    path may draw them (the dense pass once did: excluded ids came back, log Z doubled)."""
    x, q, _ = data(n=3000)
    idx = TreeIndex.build(x, seed=0)
    idx.rebuild(live_node(idx, internal=True))
    idx.rebuild(live_node(idx, internal=False))
    assert idx._free_slots().size > 0  # retired slots exist, with their old contents
    rows = [np.arange(2000)] * 4
    sampler = SoftmaxSampler(idx, temperature=0.05, dense_fallback=dense_fallback)
    r = sampler.sample(q, 64, exclude=[np.arange(2000)] * 20, seed=3)
    assert (r.ids >= 2000).all()
    assert_sampling_exact(sampler.sample, x, np.arange(3000), q[:4], 20.0, rows, 5, dense=dense_fallback is not None)


def test_dynamic_index_partial_rebuild_keeps_exact_sampling():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1500, 6)) / np.sqrt(6)).astype(np.float32)
    di = DynamicIndex.build(
        x, n_landmarks=30, temperature=0.2, seed=1, policy=RefreshPolicy(max_moved_fraction=0.05, radius_growth=1.0)
    )
    moved = np.argsort(((x - x[0]) ** 2).sum(axis=1))[:80]  # one neighbourhood: few subtrees grow
    di.reencode(x[moved] + 0.2 * rng.standard_normal((80, 6)).astype(np.float32), moved)
    assert any(e["action"] == "partial tree rebuild" for e in di.log), di.log
    assert di.tree._free_slots().size > 0
    q = rng.standard_normal((4, 6)).astype(np.float32)
    ids = di.ids
    rows = [ids[:1000]] * 4
    for fallback in (None, 1e-12, 0.05):
        di.sampler.dense_fallback = fallback
        r = di.sample(q, 1024, exclude=rows, seed=7)
        assert not np.isin(r.ids, ids[:1000]).any()
    di.sampler.dense_fallback = 1e-12
    assert_sampling_exact(
        lambda _q, k, exclude, seed: di.sample(q, k, exclude=exclude, seed=seed),
        di.tree.vectors(ids),
        ids,
        di.drift.transform_queries(q),
        5.0,
        rows,
        3,
        dense=True,
    )


@pytest.mark.parametrize("dense_fallback", [None, 1e-12])
def test_negative_ids_are_drawn(dense_fallback):
    t = TreeIndex.build(np.ones((2, 1), np.float32), ids=[-1, 1])
    r = SoftmaxSampler(t, temperature=1, dense_fallback=dense_fallback).sample(
        np.ones((1, 1), np.float32), 2000, seed=0
    )
    assert set(np.unique(r.ids).tolist()) == {-1, 1}
    assert r.log_z[0, 0] <= 1 + np.log(2) <= r.log_z[0, 1]


def test_check_rejects_a_freed_slot_that_looks_live():
    x, _, _ = data(n=300)
    idx = TreeIndex.build(x, seed=0, leaf_size=4)
    idx.rebuild(live_node(idx, internal=False))
    idx.check()
    s = int(idx._free_slots()[0])
    idx._A.slot_leaf[s] = 1
    with pytest.raises(InvariantError, match="freed slot"):
        idx.check()


# ------------------------------------------------------------------ defect 2: trailing empty rows


def test_search_with_trailing_empty_exclusion_rows():
    x, q, _ = data()
    idx = TreeIndex.build(x, seed=0)
    ids = np.arange(1000)
    for rows in ([[5], []], [[], [5]], [[5], [], []], [[], []], [None, [5, 6]]):
        rows = [r if r is not None else [] for r in rows]
        assert_search_exact(idx.search, x, ids, q[: len(rows)], 3, rows)
    di = DynamicIndex.build(x, n_landmarks=20, seed=0)
    wq = di.drift.transform_queries(q[:2])
    assert_search_exact(
        lambda _q, k, exclude: di.search(q[:2], k, exclude=exclude), di.tree.vectors(ids), ids, wq, 3, [[5], []]
    )


# ------------------------------------------------------------------ defect 3: tv_bound


def test_tv_bound_is_zero_on_rows_answered_densely():
    x, q, _ = data(n=3000)
    idx = TreeIndex.build(x, seed=0)
    r = SoftmaxSampler(idx, temperature=1.0, dense_fallback=1e-12).sample(q, 16, seed=1)
    assert (r.frontier_size == 0).all()
    np.testing.assert_array_equal(r.tv_bound, 0.0)


# ------------------------------------------------------------------ defect 4: approx, few allowed


@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_few_allowed_ids_sample_and_none_allowed_is_a_value_error(mode):
    x, q, _ = data(n=3000, d=16)
    idx = TreeIndex.build(x, seed=0)
    allowed = np.array([3, 700, 1501, 2999, 42, 1000, 2000, 5, 6, 7])
    ex = np.setdiff1d(np.arange(3000), allowed)
    for temperature in (0.05, 1.0):
        s = SoftmaxSampler(idx, temperature=temperature, mode=mode, dense_fallback=None)
        r = s.sample(q[:4], 64, exclude=[ex] * 4, seed=0)
        assert np.isin(r.ids, allowed).all()
        # the excluded targets are opened, not drawn and rejected over and over
        assert (r.proposals <= 4 * 64).all(), r.proposals
    with pytest.raises(ValueError, match="every target in the index is excluded"):
        SoftmaxSampler(idx, temperature=1.0, mode=mode).sample(q[:2], 4, exclude=[[], np.arange(3000)])


def test_approx_mode_log_q_stays_the_proposal_with_heavy_exclusions():
    """Forced opening of excluded targets changes the proposal, not its bookkeeping:
    exp(log_q) over the support still sums to 1."""
    x, q, _ = data(n=800, d=6)
    idx = TreeIndex.build(x, seed=0, leaf_size=8)
    ex = np.arange(0, 800, 2)[:390]
    r = SoftmaxSampler(idx, temperature=0.3, mode="approx", budget=30).sample(q[:2], 50_000, exclude=[ex, ex], seed=2)
    for b in range(2):
        assert not np.isin(r.ids[b], ex).any()
        qprob = np.zeros(800)
        qprob[r.ids[b]] = np.exp(r.log_q[b])
        assert abs(qprob.sum() - 1.0) < 0.01


# ------------------------------------------------------------------ defect 5: writes during prefetch


@pytest.mark.parametrize("write", ["remove", "insert", "update", "rebuild", "compact"])
@pytest.mark.parametrize("prefetch", [True, False])
def test_writing_while_a_prefetch_is_pending_raises(write, prefetch):
    x, q, rng = data(n=2000)
    idx = TreeIndex.build(x, seed=0)
    s = TreeNegativeSampler(idx, k=8, temperature=0.1, prefetch=prefetch)
    qt = torch.from_numpy(q)
    s.submit(qt)
    {
        "remove": lambda: idx.remove(np.arange(100)),
        "insert": lambda: idx.insert(x[:3], [10**9, 10**9 + 1, -5]),
        "update": lambda: idx.update(x[3:5], [1, 2]),
        "rebuild": lambda: idx.rebuild(),
        "compact": lambda: idx.compact(),
    }[write]()
    with pytest.raises(RuntimeError, match="index was modified"):
        s.result()
    assert not s.pending
    s.submit(qt)  # usable again; no write this time
    neg = s.result()
    assert np.isin(neg.ids.numpy(), idx.ids).all()
    s.close()


def test_writing_to_a_dynamic_index_while_a_prefetch_is_pending_raises():
    x, q, rng = data(n=600)
    di = DynamicIndex.build(x, n_landmarks=20, seed=0)
    s = TreeNegativeSampler(di, k=4, temperature=1.0)
    s.submit(torch.from_numpy(q))
    di.refresh_landmarks(x[di.landmark_ids] * 1.1)
    with pytest.raises(RuntimeError, match="index was modified"):
        s.result()
    s.submit(torch.from_numpy(q))
    di.tree.remove([int(di.ids[0])])  # a write to the tree behind the DynamicIndex's back
    with pytest.raises(RuntimeError, match="index was modified"):
        s.result()
    s.close()


def test_version_counts_writes_only():
    x, q, _ = data(n=300)
    idx = TreeIndex.build(x)
    v = idx.version
    idx.search(q, 3)
    SoftmaxSampler(idx, temperature=1.0).sample(q, 3, seed=0)
    with pytest.raises(KeyError):
        idx.remove([10**9])
    assert idx.version == v
    idx.remove([1])
    assert idx.version > v


# ------------------------------------------------------------------ defect 6: failed writes


class _FailingGrowth:
    """Replaces tree._grown (the helper that grows each array): the first `ok` calls
    grow, later ones raise MemoryError."""

    def __init__(self, ok: int):
        self.ok, self.calls = ok, 0
        self.real = tree_mod._grown

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.calls > self.ok:
            raise MemoryError("injected: cannot grow the arrays")
        return self.real(*args, **kw)


@pytest.mark.parametrize("op", ["insert", "update"])
def test_allocation_failure_while_growing_changes_nothing(monkeypatch, op):
    """Growth failing at every point of a write that grows the arrays several times:
    in the reservation made before anything changes (then not a byte changes), and in
    the middle of the batch (then the rows placed so far are undone). Either way the
    ids, vectors and search results are the same, check() passes, and the index stays
    writable."""
    x, q, rng = data(n=1000, d=4)
    ids = rng.permutation(np.arange(-500, 500)) * 7
    base = TreeIndex.build(x, ids, seed=0, leaf_size=2, fanout=2)  # tiny leaves: many splits
    new_x = (3 * rng.standard_normal((1500, 4))).astype(np.float32)
    new_ids = rng.permutation(np.arange(10**6, 10**6 + 1500))
    upd_ids = rng.permutation(ids)
    upd_x = (3 * rng.standard_normal((1000, 4))).astype(np.float32)

    def write(index):
        if op == "insert":
            index.insert(new_x, new_ids)
        else:
            index.update(upd_x, upd_ids)

    # count the growth calls of a successful write, and those of its first reservation
    probe = _FailingGrowth(10**9)
    monkeypatch.setattr(tree_mod, "_grown", probe)
    per_reserve = []
    real_reserve = TreeIndex._reserve

    def counting_reserve(self, **kw):
        before = probe.calls
        real_reserve(self, **kw)
        per_reserve.append(probe.calls - before)

    monkeypatch.setattr(TreeIndex, "_reserve", counting_reserve)
    write(_copy(base))
    monkeypatch.setattr(TreeIndex, "_reserve", real_reserve)
    first = per_reserve[0]
    assert first > 0 and probe.calls > first, "the write must grow the arrays before and during the batch"
    for ok in sorted({0, first - 1, first, (first + probe.calls) // 2, probe.calls - 1}):
        idx = _copy(base)
        before = snapshot(idx)
        monkeypatch.setattr(tree_mod, "_grown", _FailingGrowth(ok))
        with pytest.raises(MemoryError, match="injected"):
            write(idx)
        monkeypatch.setattr(tree_mod, "_grown", probe.real)
        assert_same_content(idx, ids, x, q)
        if ok < first:  # failed before anything changed
            for a, b in zip(before, snapshot(idx)):
                np.testing.assert_array_equal(a, b)
        idx.insert(new_x[:5], new_ids[:5])  # still writable
        idx.check()


def _copy(index: TreeIndex) -> TreeIndex:
    out = TreeIndex(
        _arrays=type(index._A)(*(a.copy() for a in index._A)),
        _keys=index._keys.copy(),
        _key_slot=index._key_slot.copy(),
        _n_slots=index._n_slots,
        _n_nodes=index._n_nodes,
        _dead_slots=index._dead_slots,
        _shape=index._shape,
        _seed=index._seed,
    )
    return out


def test_failed_compaction_leaves_a_finished_write_in_place(monkeypatch):
    x, q, rng = data(n=3000, d=4)
    idx = TreeIndex.build(x, seed=0)
    monkeypatch.setattr(TreeIndex, "compact", lambda self: (_ for _ in ()).throw(MemoryError("injected")))
    idx.remove(np.arange(2500))  # enough dead slots to trigger compaction, which fails
    assert_same_content(idx, np.arange(2500, 3000), x[2500:], q)


# ------------------------------------------------------------------ defects 7, 8: files


@pytest.mark.parametrize("n", [10, 3000])  # 3000: removal compacts the arrays to length 0
def test_an_emptied_index_saves_and_loads(tmp_path, n):
    x, q, _ = data(n=n, d=4)
    idx = TreeIndex.build(x, seed=0)
    idx.remove(np.arange(n))
    idx.save(tmp_path / "empty.tidx")
    back = TreeIndex.load(tmp_path / "empty.tidx")
    back.check()
    assert len(back) == 0
    back.insert(x[:5], [-1, -2, 3, 2**62, 7])
    assert_same_content(back, [-1, -2, 3, 2**62, 7], x[:5], q)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_respect_the_umask(tmp_path, umask):
    x, _, _ = data(n=50, d=4)
    old = os.umask(umask)
    try:
        TreeIndex.build(x).save(tmp_path / "a.tidx")
        DynamicIndex.build(x, n_landmarks=5).save(tmp_path / "b.npz")
    finally:
        os.umask(old)
    for name in ("a.tidx", "b.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tidx", "b.npz"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_an_interrupted_save_leaves_no_temporary_file(tmp_path, monkeypatch, error):
    import treeidx.io as tio

    x, _, _ = data(n=50, d=4)
    idx = TreeIndex.build(x)
    real = tio._bytes_of
    calls = []

    def failing(a):
        calls.append(1)
        if len(calls) > 5:
            raise error
        return real(a)

    monkeypatch.setattr(tio, "_bytes_of", failing)
    with pytest.raises(type(error)):
        idx.save(tmp_path / "a.tidx")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ defect 9: ids outside int64


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.array([2**64 - 1, 5], np.uint64), "does not fit in int64"),
        ([2**64 - 1, 5], "beyond 2\\*\\*53"),  # a Python list of it becomes float64
        (np.array([1e20, 5.0]), "beyond 2\\*\\*53"),
        (np.array([1.5, 5.0]), "non-integral"),
        (np.array([np.nan, 5.0]), "non-integral"),
        ([2**70, 5], "does not fit in int64"),
        (np.array([True, False]), "dtype bool"),
    ],
)
def test_ids_that_would_change_value_are_refused(bad, match):
    x, q, _ = data(n=300)
    with pytest.raises(ValueError, match=match):
        TreeIndex.build(x[:2], ids=bad)
    idx = TreeIndex.build(x, seed=0)
    before = snapshot(idx)
    for call in (
        lambda: idx.insert(x[:2], bad),
        lambda: idx.remove(bad),
        lambda: idx.update(x[:2], bad),
        lambda: idx.vectors(bad),
        lambda: idx.search(q[:1], 3, exclude=[bad]),
        lambda: SoftmaxSampler(idx, temperature=1).sample(q[:1], 3, exclude=[bad]),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    for a, b in zip(before, snapshot(idx)):
        np.testing.assert_array_equal(a, b)
    assert 2**64 - 1 not in idx and 1.5 not in idx and 5 in idx


def test_integral_float_ids_within_2_53_are_still_accepted():
    x, _, _ = data(n=3, d=4)
    idx = TreeIndex.build(x, ids=np.array([-2.0, 7.0, 2.0**52]))
    np.testing.assert_array_equal(idx.ids, [-2, 7, 2**52])


# ------------------------------------------------------------------ defect 10: huge values


def test_huge_queries_and_vectors_give_a_clear_value_error():
    x, q, _ = data(n=300)
    idx = TreeIndex.build(x, seed=0)
    before = snapshot(idx)
    huge = np.full((1, 8), 1e20, np.float32)
    for mode in ("exact", "approx"):
        for fallback in (None, 0.05):
            with pytest.raises(ValueError, match="queries: row 0 .* float32 rounding"):
                SoftmaxSampler(idx, temperature=1, mode=mode, dense_fallback=fallback).sample(huge, 4, seed=0)
    with pytest.raises(ValueError, match="queries: row 0 .* overflow float32"):
        idx.search(np.full((1, 8), 1e38, np.float32), 3)
    with pytest.raises(ValueError, match="temperature"):  # the same query at a huge 1/temperature
        SoftmaxSampler(idx, temperature=1e-30).sample(q[:1], 4, seed=0)
    for call in (
        lambda: idx.insert(np.full((1, 8), 1e38, np.float32), [10**6]),
        lambda: idx.update(np.full((1, 8), 1e38, np.float32), [0]),
        lambda: TreeIndex.build(np.full((2, 8), 1e38, np.float32)),
    ):
        with pytest.raises(ValueError, match="norm .* <= " + re.escape(f"{STORE_LIMIT:.3g}")):
            call()
    for a, b in zip(before, snapshot(idx)):
        np.testing.assert_array_equal(a, b)
    # large but representable scales still work, exactly
    big = (q[:2] * 1e4).astype(np.float32)
    assert_sampling_exact(
        SoftmaxSampler(idx, temperature=1e3, dense_fallback=None).sample,
        x,
        np.arange(300),
        big,
        1e-3,
        [[], [1, 2]],
        0,
        dense=False,
    )


# ------------------------------------------------------------------ defect 11: arguments


def test_bf16_tensors_are_widened():
    x, q, _ = data(n=300)
    xb, qb = torch.from_numpy(x).bfloat16(), torch.from_numpy(q).bfloat16()
    x16, q16 = xb.float().numpy(), qb.float().numpy()
    idx = TreeIndex.build(xb, seed=0)
    np.testing.assert_array_equal(idx.vectors(np.arange(300)), x16)
    ref = TreeIndex.build(x16, seed=0)
    for a, b in zip(idx.search(qb, 5), ref.search(q16, 5)):
        np.testing.assert_array_equal(a, b)
    s = SoftmaxSampler(idx, temperature=0.5).sample(qb, 8, seed=1)
    np.testing.assert_array_equal(s.ids, SoftmaxSampler(ref, temperature=0.5).sample(q16, 8, seed=1).ids)
    idx.insert(xb[:2], [1000, 1001])
    idx.update(xb[2:3], [1000])
    idx.check()


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (
            lambda ix, q: SoftmaxSampler(ix, temperature=1).sample(q, 2, seed=-1),
            ValueError,
            "seed: .*\\[0, 2\\*\\*63\\)",
        ),
        (lambda ix, q: SoftmaxSampler(ix, temperature=1).sample(q, 2, seed=2**63), ValueError, "seed"),
        (lambda ix, q: SoftmaxSampler(ix, temperature=1).sample(q, 2, seed=2**64), ValueError, "seed"),
        (
            lambda ix, q: SoftmaxSampler(ix, temperature=1).sample(q, 2, seed=1.9),
            TypeError,
            "seed: expected an integer",
        ),
        (lambda ix, q: SoftmaxSampler(ix, temperature=1).sample(q, 2, seed=True), TypeError, "seed"),
        (lambda ix, q: TreeIndex.build(q, seed=-1), ValueError, "seed"),
        (lambda ix, q: TreeIndex.build(q, seed=0.5), TypeError, "seed"),
        (lambda ix, q: ix.search(q[:2], 2, exclude=np.zeros((2, 2, 2), int)), ValueError, "exclude: expected a 2-d"),
        (
            lambda ix, q: ix.search(q[:2], 2, exclude=[np.zeros((2, 2), int), []]),
            ValueError,
            "exclude\\[0\\]: expected a 1-d",
        ),
        (lambda ix, q: ix.search(q[:1], 2, exclude=5), TypeError, "exclude: expected None"),
        (lambda ix, q: ix.search(q[:1], 2, exclude=np.int64(5)), TypeError, "exclude"),
        (lambda ix, q: SoftmaxSampler(ix, temperature=1).sample(q[:1], 2, exclude=5), TypeError, "exclude"),
        (lambda ix, q: ix.search(q[:1], 2, exclude=[[1.5]]), ValueError, "exclude\\[0\\]: .*non-integral"),
        (lambda ix, q: SoftmaxSampler(ix, temperature=1, tolerance="a"), ValueError, "tolerance: expected a finite"),
        (lambda ix, q: SoftmaxSampler(ix, temperature=1, tolerance=-1), ValueError, "tolerance"),
        (lambda ix, q: SoftmaxSampler(ix, temperature=1, budget=True), ValueError, "budget"),
        (lambda ix, q: SoftmaxSampler(ix, temperature=1, budget=2.0), ValueError, "budget"),
        (lambda ix, q: SoftmaxSampler(ix, temperature=1, draw_cost="x"), ValueError, "draw_cost"),
        (lambda ix, q: SoftmaxSampler(ix, temperature=1, dense_fallback="x"), ValueError, "dense_fallback"),
        (lambda ix, q: SoftmaxSampler(ix, temperature=True), ValueError, "temperature"),
        (lambda ix, q: SoftmaxSampler(ix, temperature="1"), ValueError, "temperature"),
        (lambda ix, q: ix.rebuild(1.7), TypeError, "node: expected an integer"),
        (lambda ix, q: ix.rebuild(True), TypeError, "node"),
        (lambda ix, q: ix.rebuild(-3), ValueError, "not a live node"),
    ],
)
def test_bad_arguments_are_refused_and_change_nothing(call, exc, match):
    x, q, _ = data(n=500)
    idx = TreeIndex.build(x, seed=1)
    before = snapshot(idx)
    results = idx.search(q, 5)
    with pytest.raises(exc, match=match):
        call(idx, q)
    for a, b in zip(before, snapshot(idx)):
        np.testing.assert_array_equal(a, b)
    idx.check()
    for a, b in zip(results, idx.search(q, 5)):
        np.testing.assert_array_equal(a, b)


def test_exclusion_forms_that_remain_accepted():
    """One id per query as a (B,) integer array or tensor, rows as sets, tensors or None."""
    x, q, _ = data(n=500)
    idx = TreeIndex.build(x, seed=1)
    ids = np.arange(500)
    want = [[3], [4], [5]]
    assert_search_exact(idx.search, x, ids, q[:3], 4, want)
    for ex in (
        np.array([3, 4, 5]),
        torch.tensor([3, 4, 5]),
        [{3}, {4}, {5}],
        [3, 4, 5],
        [torch.tensor([3]), np.array([4]), (5,)],
        np.array([[3], [4], [5]]),
    ):
        np.testing.assert_array_equal(idx.search(q[:3], 4, exclude=ex)[1], idx.search(q[:3], 4, exclude=want)[1])
    np.testing.assert_array_equal(
        idx.search(q[:2], 4, exclude=[None, [1]])[1], idx.search(q[:2], 4, exclude=[[], [1]])[1]
    )


def test_load_refuses_nothing_it_wrote_after_subtree_rebuilds_and_compaction(tmp_path):
    """Retired nodes own no slot range: a compacted index with retired nodes loads."""
    x, q, _ = data(n=400, d=3)
    idx = TreeIndex.build(x, seed=0, leaf_size=3, fanout=3)
    idx.rebuild(live_node(idx, internal=True))
    idx.compact()
    idx.save(tmp_path / "a.tidx")
    back = TreeIndex.load(tmp_path / "a.tidx")
    assert_same_content(back, np.arange(400), x, q)


def test_check_handles_the_extreme_int64_ids():
    x, q, _ = data(n=3, d=2)
    ids = [np.iinfo(np.int64).min, np.iinfo(np.int64).max, 2**62]
    idx = TreeIndex.build(x, ids)
    idx.check()  # the keys' differences overflow int64; their order does not
    assert_same_content(idx, ids, x, q)


def test_a_corrupted_file_still_fails_cleanly(tmp_path):
    x, _, _ = data(n=300, d=4)
    TreeIndex.build(x).save(tmp_path / "a.tidx")
    raw = bytearray((tmp_path / "a.tidx").read_bytes())
    raw[len(raw) // 3] ^= 0x10
    (tmp_path / "a.tidx").write_bytes(bytes(raw))
    with pytest.raises(IndexFileError):
        TreeIndex.load(tmp_path / "a.tidx")
