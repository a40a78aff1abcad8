"""A tiny, deterministic Python source tree for the code-search tests (no I/O beyond tmp)."""

from __future__ import annotations

import numpy as np

SPECIAL = '''
def short_doc(a):
    """Two words."""
    b = a + 1
    return b


def copy_one(a):
    """Return the matching value."""
    b = a * 2
    return b


def copy_two(a):
    """Return   the MATCHING
    value."""
    b = a * 3
    return b


def unique_doc(a):
    """Parse the configuration file and return its sections."""
    sections = a.split("[")
    return sections
'''


def write_corpus(root, n_modules: int = 60, per_module: int = 4, seed: int = 0) -> None:
    """pkg/m{i}.py with `per_module` functions each, whose docstrings share words with
    their code (so a model can learn), plus pkg/special.py with the dedup cases."""
    rng = np.random.default_rng(seed)
    words = [
        f"{a}{b}"
        for a in ("get", "set", "load", "parse", "scale", "merge", "split", "sort")
        for b in ("value", "frame", "token", "matrix", "path", "queue", "graph", "table")
    ]
    pkg = root / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "special.py").write_text(SPECIAL)
    for i in range(n_modules):
        funcs = []
        for j in range(per_module):
            w = rng.choice(words, 4, replace=False)
            funcs.append(
                f"def {w[0]}_{w[1]}_{i}_{j}({w[2]}, {w[3]}):\n"
                f'    """Compute the {w[0]} {w[1]} of {w[2]} and {w[3]}."""\n'
                f"    out = {w[2]}.{w[0]}({w[3]})\n"
                f"    return out + {i * per_module + j}\n"
            )
        (pkg / f"m{i}.py").write_text("\n\n".join(funcs))


# TrainConfig settings that train the tiny corpus in a fraction of a second per step
FAST = dict(
    batch_size=16,
    k=4,
    dim=16,
    eval_every=0,
    eval_queries=20,
    n_landmarks=20,
    cache_size=64,
    stale_refresh_every=2,
    max_drift_error=None,
)


def tiny_codesearch_data(root):
    """CodeSearchData over the tiny corpus written under `root` (features cached there)."""
    from treeidx.codesearch import CodeSearchData

    write_corpus(root / "src")
    return CodeSearchData.load(roots=[str(root / "src")], cache_dir=str(root / "cache"), n_buckets=1 << 12)
