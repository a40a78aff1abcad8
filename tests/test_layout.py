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
    code = ("import sys; sys.modules.update(torch=None, scipy=None)\n"
            "import numpy as np, treeidx\n"
            "from treeidx.brute import BruteForce\n"
            "x = np.random.default_rng(0).normal(size=(300, 4)).astype('f4')\n"
            "idx = treeidx.TreeIndex.build(x)\n"
            "s, i = idx.search(x[:3], 5)\n"
            "assert (i == BruteForce(x).search(x[:3], 5)[1]).all()\n"
            "r = treeidx.SoftmaxSampler(idx, temperature=1.0).sample(x[:2], 4, seed=0)\n"
            "print(r.ids.shape, 'torch' in sys.modules and sys.modules['torch'] is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 4) False"


@pytest.mark.parametrize("old,new,name", [
    ("treeidx.baselines", "treeidx.torch", "NegativeCache"),
    ("treeidx.encoder", "treeidx.codesearch.encoder", "DualEncoder"),
    ("treeidx.training", "treeidx.codesearch.training", "train"),
    ("treeidx.corpus", "treeidx.codesearch.corpus", "mine_code_corpus"),
])
def test_moved_modules_keep_working_with_a_deprecation_warning(old, new, name):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)
