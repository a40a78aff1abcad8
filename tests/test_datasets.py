"""Tests for bench.datasets."""
from __future__ import annotations

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
    monkeypatch.setattr("treeidx.corpus.mine_code_corpus", lambda *a, **k: pytest.fail("re-mined"))
    t2, q2 = datasets.code(24, n_queries=2, seed=0, **kw)
    assert np.array_equal(t, t2) and np.array_equal(q, q2)


def test_load_dispatch():
    x, q = datasets.load("clustered", 500, 16, n_queries=10)
    assert x.shape == (500, 16) and q.shape == (10, 16)
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.load("nope", 10, 16)
    with pytest.raises(ValueError, match="n is required"):
        datasets.load("clustered", None, 16)
