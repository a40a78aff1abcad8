"""The package's shape: what `import treeidx` loads, and names that moved still work."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest


def test_the_core_works_without_torch_or_scipy():
    # None in sys.modules makes any import of them raise ImportError, as if not installed
    # (numba itself imports scipy when it is there, so absence is what can be tested).
    code = (
        "import sys; sys.modules.update(torch=None, scipy=None)\n"
        "import numpy as np, treeidx\n"
        "from treeidx.brute import BruteForce\n"
        "x = np.random.default_rng(0).normal(size=(300, 4)).astype('f4')\n"
        "idx = treeidx.TreeIndex.build(x)\n"
        "s, i = idx.search(x[:3], 5)\n"
        "assert (i == BruteForce(x).search(x[:3], 5)[1]).all()\n"
        "r = treeidx.SoftmaxSampler(idx, temperature=1.0).sample(x[:2], 4, seed=0)\n"
        "b = treeidx.SoftmaxSampler(idx, temperature=1.0, mode='approx', batched=True).sample(x[:2], 4, seed=0)\n"
        "assert b.ids.shape == (2, 4)  # the block products fall back to numpy's\n"
        "print(r.ids.shape, 'torch' in sys.modules and sys.modules['torch'] is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 4) False"


@pytest.mark.parametrize(
    "old,new,name",
    [
        ("treeidx.baselines", "treeidx.torch", "NegativeCache"),
        ("treeidx.encoder", "treeidx.codesearch.encoder", "DualEncoder"),
        ("treeidx.training", "treeidx.codesearch.training", "train"),
        ("treeidx.corpus", "treeidx.codesearch.corpus", "mine_code_corpus"),
    ],
)
def test_moved_modules_keep_working_with_a_deprecation_warning(old, new, name):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)


def test_writes_take_vectors_then_ids_and_the_old_order_still_works():
    import numpy as np

    from treeidx import DynamicIndex, TreeIndex

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4)).astype(np.float32)
    ids = rng.permutation(np.arange(-100, 100)) * 3
    a, b = TreeIndex.build(x, ids, seed=1), TreeIndex.build(x, ids, seed=1)
    moved, y = ids[:7], rng.standard_normal((7, 4)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a.update(y, moved)
    with pytest.warns(DeprecationWarning, match=r"update\(ids, vectors\) is deprecated"):
        b.update(moved, y)
    np.testing.assert_array_equal(a.vectors(moved), y)
    np.testing.assert_array_equal(b.vectors(moved), y)
    assert (a.search(x[:5], 3)[1] == b.search(x[:5], 3)[1]).all()

    # backproject_ridge=0: the exact write-back, so predict() shows which vector went where
    di = DynamicIndex.build(x, ids, n_landmarks=20, seed=0, backproject_ridge=0.0)
    new = np.array([10**12, -(10**12)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        di.add(y[:2], new)
        di.reencode(y[2:4], moved[:2])
    with pytest.warns(DeprecationWarning, match=r"reencode\(ids, vectors\)"):
        di.reencode(moved[2:4], y[4:6])
    np.testing.assert_allclose(di.predict(np.r_[new, moved[:4]]), np.r_[y[:2], y[2:4], y[4:6]], rtol=1e-4, atol=1e-4)


def test_brute_force_takes_temperature_like_every_other_sampler():
    import numpy as np

    from treeidx.brute import BruteForce

    x = np.random.default_rng(1).standard_normal((300, 5)).astype(np.float32)
    bf = BruteForce(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = bf.sample(x[:3], 7, temperature=0.25, exclude=[[0], [], [1, 2]], seed=4)
        lz = bf.log_partition(x[:3], temperature=0.25)
        p = bf.probabilities(x[0], temperature=0.25)
    with pytest.warns(DeprecationWarning, match="temperature=1/beta"):
        old = bf.sample(x[:3], 7, 4.0, [[0], [], [1, 2]], 4)
    for a, b in zip(new, old):
        np.testing.assert_array_equal(a, b)
    with pytest.warns(DeprecationWarning):
        np.testing.assert_array_equal(lz, bf.log_partition(x[:3], 4.0))
    s = x[0].astype(np.float64) @ x.T.astype(np.float64) * 4.0
    np.testing.assert_allclose(p, np.exp(s - s.max()) / np.exp(s - s.max()).sum(), rtol=1e-5)
    with pytest.raises(TypeError, match="not both"):
        bf.sample(x[:1], 2, 4.0, temperature=0.25)
    with pytest.raises(TypeError, match="missing temperature"):
        bf.sample(x[:1], 2)
