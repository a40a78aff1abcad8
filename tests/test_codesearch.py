"""Tests for treeidx.codesearch: query rules, the module split, features, cache, subsets."""

from __future__ import annotations

import os

import numpy as np
import pytest

from treeidx import codesearch
from treeidx.codesearch import SPLITS, CodeSearchData, module_split
from treeidx.codesearch.corpus import hash_features, mine_code_corpus

from ._codesearch_corpus import write_corpus

NB = 1 << 12


@pytest.fixture()
def src(tmp_path):
    write_corpus(tmp_path / "src")
    return dict(roots=[str(tmp_path / "src")], cache_dir=str(tmp_path / "cache"))


def _load(src, **kw):
    return CodeSearchData.load(**src, n_buckets=NB, **kw)


def _eq(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and (a != b).nnz == 0


def _same(a: CodeSearchData, b: CodeSearchData) -> bool:
    return (
        _eq(a.target_features, b.target_features)
        and _eq(a.query_features, b.query_features)
        and np.array_equal(a.query_target, b.query_target)
        and np.array_equal(a.query_split, b.query_split)
        and np.array_equal(a.target_module, b.target_module)
        and a.modules == b.modules
        and a.target_names == b.target_names
        and a.query_summaries == b.query_summaries
    )


def test_targets_queries_and_dedup_rules(src):
    data = _load(src)
    items = mine_code_corpus(src["roots"], cache_dir=src["cache_dir"])
    assert data.n_targets == len(items)  # every item is a target
    by_name = {f"{it.module}.{it.qualname}": it.id for it in items}
    assert [data.target_name(i) for i in range(data.n_targets)] == list(by_name)
    queried = set(data.query_target.tolist())
    assert by_name["pkg.special.unique_doc"] in queried
    assert by_name["pkg.special.short_doc"] not in queried  # 2 words < 3
    # same text up to case and whitespace: ambiguous, every copy dropped
    assert by_name["pkg.special.copy_one"] not in queried and by_name["pkg.special.copy_two"] not in queried
    assert data.n_queries == 60 * 4 + 1
    # one query per positive, positives valid, rows sorted by positive
    assert np.all(np.diff(data.query_target) > 0) and data.query_target.max() < data.n_targets
    assert (
        data.query_summaries[int(np.flatnonzero(data.query_target == by_name["pkg.special.unique_doc"])[0])]
        == "Parse the configuration file and return its sections."
    )


def test_features_are_the_hashed_texts(src):
    data = _load(src, max_target_chars=50)
    items = mine_code_corpus(src["roots"], cache_dir=src["cache_dir"])
    ref_t = hash_features([it.code[:50] for it in items], n_buckets=NB)
    ref_q = hash_features([items[i].docstring.strip() for i in data.query_target], n_buckets=NB)
    assert data.target_features.shape == (len(items), NB) and data.target_features.dtype == np.float32
    assert _eq(data.target_features, ref_t) and _eq(data.query_features, ref_q)


def test_split_by_module_and_stable(src):
    data = _load(src)
    mods = [{data.modules[data.target_module[t]] for t in data.query_target[data.split(s)]} for s in SPLITS]
    assert not (mods[0] & mods[1]) and not (mods[0] & mods[2]) and not (mods[1] & mods[2])
    assert all(len(m) for m in mods) and sum(data.split(s).size for s in SPLITS) == data.n_queries
    for s, ms in zip(SPLITS, mods):
        assert {module_split(m) for m in ms} == {SPLITS.index(s)}
    assert np.array_equal(data.train, data.split("train")) and np.array_equal(data.test, data.split("test"))
    # a stable hash, not Python's salted one: pinned values
    assert [module_split(m) for m in ("json", "numpy.linalg", "pkg.m2", "pkg.m0")] == [0, 1, 1, 0]
    d = data.describe()
    assert (d["n_train"], d["n_val"], d["n_test"]) == tuple(data.split(s).size for s in SPLITS)
    with pytest.raises(ValueError, match="split"):
        data.split("dev")


def test_cache_reused_deterministic_and_damage_rebuilt(src, monkeypatch, tmp_path):
    first = _load(src)
    (path,) = [os.path.join(src["cache_dir"], f) for f in os.listdir(src["cache_dir"]) if f.startswith("codesearch")]
    fresh = _load({**src, "cache_dir": str(tmp_path / "other")})
    assert _same(first, fresh)
    calls = []
    real = CodeSearchData.from_items.__func__
    monkeypatch.setattr(
        CodeSearchData, "from_items", classmethod(lambda cls, *a, **k: calls.append(1) or real(cls, *a, **k))
    )
    assert _same(_load(src), first) and calls == []
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    assert _same(_load(src), first) and calls == [1]
    assert _same(_load(src), first) and calls == [1]  # rewritten whole
    assert not _same(_load(src, max_query_chars=10), first) and calls == [1, 1]  # settings are in the key
    assert not [f for f in os.listdir(src["cache_dir"]) if f.endswith(".tmp")]


@pytest.mark.parametrize("max_targets", [100, 242])
def test_subset_keeps_positives_and_renumbers(src, max_targets):
    full = _load(src)
    sub = _load(src, max_targets=max_targets)
    assert sub.n_targets == max_targets
    old = np.array([full.target_names.index(n) for n in sub.target_names])  # names are unique here
    assert np.all(np.diff(old) > 0)  # original order kept
    assert _eq(sub.target_features, full.target_features[old])
    rows = [int(np.flatnonzero(full.query_target == old[t])[0]) for t in sub.query_target]
    assert _eq(sub.query_features, full.query_features[rows])
    assert np.array_equal(sub.query_split, full.query_split[rows])
    if max_targets >= full.n_queries:  # every query kept, plus the first other targets
        assert sub.n_queries == full.n_queries
    else:
        assert sub.n_queries == max_targets
    assert _same(sub, full.subset(max_targets)) and full.subset(10**6) is full
    with pytest.raises(ValueError, match="max_targets"):
        full.subset(0)


def test_bad_arguments(src):
    with pytest.raises(ValueError, match="n_buckets"):
        CodeSearchData.load(**src, n_buckets=0)
    with pytest.raises(ValueError, match="seed"):
        CodeSearchData.load(**src, seed=-1)
    with pytest.raises(ValueError, match="empty"):
        CodeSearchData.from_items([])
    assert codesearch.SPLITS == ("train", "val", "test")
