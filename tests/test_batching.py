"""Tests for treeidx.torch.batching: GCBS and tree batches as torch batch samplers."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from treeidx import DynamicIndex, TreeIndex
from treeidx.torch import GlobalContrastiveBatchSampler, TreeBatchSampler
from treeidx.torch.batching import leaf_order

N_CLUSTERS, PER, DIM = 12, 40, 8  # 480 pairs


def planted(seed: int = 0, n_clusters: int = N_CLUSTERS, per: int = PER):
    """(queries, positives, labels): pairs in tight, well separated clusters, rows shuffled."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, DIM)) * 3
    labels = rng.permutation(np.repeat(np.arange(n_clusters), per))
    q = (centers[labels] + 0.3 * rng.normal(size=(labels.size, DIM))).astype(np.float32)
    p = (centers[labels] + 0.3 * rng.normal(size=(labels.size, DIM))).astype(np.float32)
    return q, p, labels


def gcbs(q, p, batch_size=32, **kw):
    return GlobalContrastiveBatchSampler((q, p), batch_size, **kw)


def tree_batches(q, p, batch_size=32, **kw):
    return TreeBatchSampler.from_embeddings(np.hstack([q, p]), batch_size, leaf_size=8, **kw)


SAMPLERS = {"gcbs": gcbs, "tree": tree_batches}


def mean_inbatch_similarity(batches, q, p) -> float:
    """Mean <q_i, p_j> over i != j in the same batch."""
    vals = []
    for b in batches:
        s = q[b] @ p[b].T
        vals.append((s.sum() - np.trace(s)) / (len(b) * (len(b) - 1)))
    return float(np.mean(vals))


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("opts", [dict(), dict(mix=0.3), dict(refresh_every=3), dict(mix=1.0, refresh_every=5)])
def test_every_pair_once_per_epoch_in_full_batches(data, kind, opts):
    q, p, _ = data
    n, B = len(q), 36  # 480 = 13 * 36 + 12
    s = SAMPLERS[kind](q, p, B, **opts)
    for _ in range(2):  # two epochs
        batches = list(s)
        assert len(batches) == len(s) == n // B + 1
        assert [len(b) for b in batches] == [B] * (n // B) + [n % B]  # the short one comes last
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert all(isinstance(i, int) for i in batches[0])
    dropped = SAMPLERS[kind](q, p, B, drop_last=True, **opts)
    batches = list(dropped)
    assert len(batches) == len(dropped) == n // B and all(len(b) == B for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat) == n - n % B


@pytest.mark.parametrize("kind", SAMPLERS)
def test_exact_multiple_and_tiny_inputs(data, kind):
    q, p, _ = data
    s = SAMPLERS[kind](q, p, 40)
    assert [len(b) for b in s] == [40] * 12
    one = SAMPLERS[kind](q[:1], p[:1], 4)
    assert list(one) == [[0]] and len(one) == 1
    assert list(SAMPLERS[kind](q[:1], p[:1], 4, drop_last=True)) == []
    two = SAMPLERS[kind](q[:3], p[:3], 8)
    assert sorted(list(two)[0]) == [0, 1, 2]


@pytest.mark.parametrize("kind", SAMPLERS)
def test_same_seed_same_batches_and_epochs_differ(data, kind):
    q, p, _ = data
    a, b = SAMPLERS[kind](q, p, seed=4), SAMPLERS[kind](q, p, seed=4)
    ea = [list(a), list(a)]
    assert ea == [list(b), list(b)]
    assert ea[0] != ea[1]  # a new batch order (and, for trees, new boundaries) every epoch
    a.set_epoch(1)
    assert list(a) == ea[1] and a.epoch == 2
    other = SAMPLERS[kind](q, p, seed=5)
    assert list(other) != ea[0]


@pytest.mark.parametrize("kind", SAMPLERS)
def test_planted_clusters_give_harder_batches_than_random(data, kind):
    q, p, labels = data
    rng = np.random.default_rng(0)
    random_batches = np.split(rng.permutation(len(q)), len(q) // 40)
    base = mean_inbatch_similarity(random_batches, q, p)
    base_purity = np.mean([np.mean(labels[b][:, None] == labels[b][None, :]) for b in random_batches])
    batches = list(SAMPLERS[kind](q, p, 40))
    sim = mean_inbatch_similarity(batches, q, p)
    purity = np.mean([np.mean(labels[b][:, None] == labels[b][None, :]) for b in batches])
    # clusters are as large as a batch: an ordering that keeps them together scores near
    # the within-cluster similarity, random batches near the global mean
    assert sim > base + 0.5 * (mean_inbatch_similarity([np.flatnonzero(labels == 0)], q, p) - base)
    assert purity > 0.6 > 5 * base_purity
    # mixing moves it back towards random, monotonically in expectation
    mixed = mean_inbatch_similarity(list(SAMPLERS[kind](q, p, 40, mix=0.5)), q, p)
    full_mix = mean_inbatch_similarity(list(SAMPLERS[kind](q, p, 40, mix=1.0)), q, p)
    assert sim > mixed > full_mix and abs(full_mix - base) < 0.5 * (mixed - base)


@pytest.mark.parametrize("kind", SAMPLERS)
def test_dataloader_batch_sampler(data, kind):
    q, p, _ = data
    s = SAMPLERS[kind](q, p, 50, seed=2)
    expected = list(SAMPLERS[kind](q, p, 50, seed=2))
    loader = DataLoader(TensorDataset(torch.from_numpy(q), torch.from_numpy(p), torch.arange(len(q))), batch_sampler=s)
    assert len(loader) == len(expected)
    for (bq, bp, idx), b in zip(loader, expected):
        assert idx.tolist() == b
        assert torch.equal(bq, torch.from_numpy(q[b])) and torch.equal(bp, torch.from_numpy(p[b]))


def test_gcbs_refresh_changes_the_order_deterministically(data):
    q, p, labels = data
    new_q, new_p, new_labels = planted(seed=9)  # another clustering of the same 480 pairs
    a, b = gcbs(q, p, 40, seed=1), gcbs(q, p, 40, seed=1)
    old = list(gcbs(q, p, 40, seed=1))
    a.refresh(new_q, new_p)
    b.refresh(torch.from_numpy(new_q), torch.from_numpy(new_p))  # tensors are accepted too
    after = list(a)
    assert after == list(b) and after != old
    purity = np.mean([np.mean(new_labels[x][:, None] == new_labels[x][None, :]) for x in after])
    assert purity > 0.8  # grouped by the new embeddings
    with pytest.raises(ValueError, match="expected 480 pairs"):
        a.refresh(q[:10], p[:10])


def test_gcbs_callable_is_called_every_epoch_and_every_refresh(data):
    q, p, _ = data
    calls = []

    def encode():
        calls.append(1)
        return (q, p) if len(calls) % 2 else (p, q)

    s = GlobalContrastiveBatchSampler(encode, 40)
    assert len(calls) == 1  # read once for N; the first epoch uses it
    list(s)
    assert len(calls) == 1
    list(s)
    assert len(calls) == 2 and s.regroups == 2
    r = GlobalContrastiveBatchSampler(encode, 40, refresh_every=4)
    calls.clear()
    batches = list(r)  # 12 batches: regrouped after 4 and 8
    assert r.regroups == 3 and len(calls) == 2
    assert sorted(i for b in batches for i in b) == list(range(len(q)))


def test_gcbs_graph(data):
    q, p, _ = data
    s = gcbs(q, p, n_neighbors=5)
    g = s.graph()
    assert g.shape == (len(q), len(q)) and (g != g.T).nnz == 0 and g.diagonal().sum() == 0
    assert (np.diff(g.indptr) >= 5).all()  # each pair's 5 neighbours, symmetrised
    z = np.hstack([q, p])
    s_ = z @ z.T
    np.fill_diagonal(s_, -np.inf)
    top = np.argsort(-s_, axis=1)[:, :5]
    assert all(g[i, j] for i in range(0, len(q), 17) for j in top[i])
    tree = gcbs(q, p, n_neighbors=5, backend="tree").graph()
    assert (tree != g).nnz == 0  # both exact
    cross = gcbs(q, p, n_neighbors=5, similarity="cross").graph()
    c = q @ p.T + p @ q.T
    np.fill_diagonal(c, -np.inf)
    assert all(cross[i, j] for i in range(0, len(q), 17) for j in np.argsort(-c[i])[:5])
    sparse = gcbs(q, p, n_neighbors=5, quantile=0.99).graph()
    assert 0 < sparse.nnz < g.nnz and (sparse.multiply(g) != sparse).nnz == 0  # a subgraph
    list(s)
    assert s.last_graph["pairs"] == len(q) and s.last_graph["edges"] == g.nnz // 2
    assert s.last_graph["components"] >= 1


def test_tree_batches_follow_index_updates(data):
    q, p, labels = data
    z = np.hstack([q, p])
    s = TreeBatchSampler.from_embeddings(z, 40, seed=3)
    moved = np.flatnonzero(labels == 0)
    target = np.flatnonzero(labels == 1)
    before = list(s)
    together = lambda bs: np.mean(
        [
            np.isin(target, b).any() and np.isin(moved, b).sum()  # noqa: E731
            for b in bs
        ]
    )
    # write back: cluster 0's pairs now look like cluster 1's
    s.index.update(z[target[: moved.size]] + 0.01, moved)
    after = list(s)
    assert together(after) > together(before)
    same_cluster = [b for b in after if np.isin(moved, b).sum() >= 10]
    assert same_cluster and all(np.isin(target, b).sum() >= 10 for b in same_cluster)


def test_tree_batches_with_keys_and_a_dynamic_index():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(300, 6)).astype(np.float32)
    ids = np.arange(1000, 1300)
    idx = DynamicIndex.build(vecs, ids, n_landmarks=20, seed=0)
    keys = np.concatenate([ids[:1], rng.choice(ids, 249)])  # repeats allowed: pairs sharing a positive
    s = TreeBatchSampler(idx, 32, keys=keys, seed=0)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(250)) and len(s) == 8
    # pairs sharing a key are adjacent in the order, so mostly in one batch
    where = {}
    for bi, b in enumerate(batches):
        for i in b:
            where.setdefault(int(keys[i]), set()).add(bi)
    assert np.mean([len(v) == 1 for v in where.values()]) > 0.8
    old_tree = idx.tree
    idx.full_refresh(rng.normal(size=(300, 6)).astype(np.float32), ids)
    assert idx.tree is not old_tree and s._tree() is idx.tree  # the rebuilt tree is read
    assert sorted(i for b in s for i in b) == list(range(250))
    idx.remove(ids[:1])
    with pytest.raises(ValueError, match="no longer in the index"):
        list(s)


def test_leaf_order_is_every_id_once_and_local(data):
    q, p, labels = data
    tree = TreeIndex.build(np.hstack([q, p]), np.arange(len(q)) * 3, seed=0, leaf_size=8)
    for rng in (None, np.random.default_rng(1)):
        order = leaf_order(tree, rng)
        assert sorted(order.tolist()) == (np.arange(len(q)) * 3).tolist()
        # consecutive ids mostly from one planted cluster
        lab = labels[order // 3]
        assert np.mean(lab[1:] == lab[:-1]) > 0.9


def test_bad_arguments(data):
    q, p, _ = data
    for bad, match in [
        (dict(batch_size=0), "batch_size"),
        (dict(mix=1.5), "mix"),
        (dict(mix=True), "mix"),
        (dict(refresh_every=0), "refresh_every"),
        (dict(drop_last=1), "drop_last"),
        (dict(seed=-1), "seed"),
        (dict(n_neighbors=0), "n_neighbors"),
        (dict(similarity="cosine"), "similarity"),
        (dict(quantile=1.0), "quantile"),
        (dict(backend="faiss"), "backend"),
    ]:
        kw = {"batch_size": 8, **bad}
        with pytest.raises(ValueError, match=match):
            GlobalContrastiveBatchSampler((q, p), **kw)
    with pytest.raises(ValueError, match="positive_emb has 10 rows|query_emb has 480 rows"):
        GlobalContrastiveBatchSampler((q, p[:10]), 8)
    with pytest.raises(ValueError, match="embeddings: expected"):
        GlobalContrastiveBatchSampler(q, 8)
    with pytest.raises(ValueError, match="query_emb"):
        GlobalContrastiveBatchSampler((q[:, :, None], p), 8)
    tree = TreeIndex.build(q, seed=0)
    with pytest.raises(TypeError, match="index"):
        TreeBatchSampler(q, 8)
    with pytest.raises(KeyError, match="unknown id"):
        TreeBatchSampler(tree, 8, keys=[0, 1, 10**6])
    with pytest.raises(ValueError, match="keys"):
        TreeBatchSampler(tree, 8, keys=[0.5, 1.0])
    with pytest.raises(ValueError, match="mix"):
        TreeBatchSampler(tree, 8, mix=-0.1)


def test_scipy_is_imported_only_when_gcbs_orders(data, monkeypatch):
    import importlib

    import treeidx.torch.batching as batching

    for name in [m for m in sys.modules if m == "scipy" or m.startswith("scipy.")]:
        monkeypatch.setitem(sys.modules, name, None)  # any scipy import now fails
    monkeypatch.delitem(sys.modules, "treeidx.torch.batching")
    fresh = importlib.import_module("treeidx.torch.batching")  # the module body runs without scipy
    monkeypatch.setitem(sys.modules, "treeidx.torch.batching", batching)
    q, p, _ = data
    s = fresh.TreeBatchSampler.from_embeddings(np.hstack([q, p]), 32)
    assert sorted(i for b in s for i in b) == list(range(len(q)))
    g = fresh.GlobalContrastiveBatchSampler((q, p), 32)  # constructing needs no scipy either
    with pytest.raises(ImportError):
        list(g)


def test_training_md_example_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    i = text.index("<!-- batch-samplers -->")
    block = re.compile(r"```python\n(.*?)```", re.S).search(text, i).group(1)
    scope: dict = {}
    exec(compile(block.replace("N, d, B = 2000, 16, 64", "N, d, B = 300, 8, 32"), "training.md", "exec"), scope)
    assert scope["gcbs"].epoch == 2 and scope["tree"].epoch == 1
