"""Tests for treeidx.codesearch.corpus: mining rules, the cache, and hash_embed determinism."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from treeidx.codesearch import corpus
from treeidx.codesearch.corpus import hash_embed, hash_features, mine_code_corpus

SRC = textwrap.dedent('''
    import os

    class Outer:
        """Outer doc."""
        x = 1

        @property
        def method(self):
            """Method doc
            spans lines."""
            # keep me
            return self.x

        class Inner:
            def deep(self, a):
                \'\'\'deep doc\'\'\'; return a
                pass

    def tiny():
        """Only a docstring: nothing left once it is removed."""

    def short(): return 1

    try:
        def dup(a, b):
            return a + b
    except ImportError:
        def dup(a, b):
            return a + b
''')


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "src"
    (root / "pkg" / "tests").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text(SRC)
    (root / "pkg" / "tests" / "test_x.py").write_text("def test_a():\n    x = 1\n    assert x\n")
    (root / "pkg" / "broken.py").write_text("def f(:\n")
    (root / "pkg" / "copy.py").write_text(
        "def dup(a, b):\n    return a + b\n\ndef other(c):\n    c += 1\n    return c\n"
    )
    return str(root), str(tmp_path / "cache")


def test_items_docstrings_nesting_dedup(tree):
    root, cache = tree
    items = mine_code_corpus([root], cache_dir=cache)
    by = {(it.module, it.qualname): it for it in items}
    assert [it.id for it in items] == list(range(len(items)))
    assert ("pkg", "Outer.method") in by and ("pkg", "Outer.Inner.deep") in by
    assert by[("pkg", "Outer")].kind == "class" and by[("pkg", "Outer.method")].kind == "function"
    m = by[("pkg", "Outer.method")]
    assert m.docstring == "Method doc\nspans lines."
    assert "Method doc" not in m.code and "spans lines" not in m.code
    assert m.code == "@property\ndef method(self):\n    # keep me\n    return self.x"
    assert by[("pkg", "Outer.Inner.deep")].code == "def deep(self, a):\n    return a\n    pass"
    assert "Outer doc" not in by[("pkg", "Outer")].code and "x = 1" in by[("pkg", "Outer")].code
    assert ("pkg", "tiny") not in by  # < 2 non-empty lines once the docstring is gone
    assert ("pkg", "short") not in by
    # dup: defined twice in pkg and once in pkg.copy; only the first survives
    assert sum(it.qualname == "dup" for it in items) == 1 and ("pkg", "dup") in by
    assert ("pkg.copy", "other") in by
    assert not any("test_a" in it.qualname for it in items)  # tests/ dirs skipped
    assert mine_code_corpus.last_skipped == 1  # broken.py


def test_cache_reused_and_corruption_remined(tree, monkeypatch):
    root, cache = tree
    first = mine_code_corpus([root], cache_dir=cache)
    (path,) = [os.path.join(cache, f) for f in os.listdir(cache)]
    calls = []
    real = corpus._mine
    monkeypatch.setattr(corpus, "_mine", lambda *a: calls.append(1) or real(*a))
    assert mine_code_corpus([root], cache_dir=cache) == first and calls == []
    # truncated gzip -> detected, re-mined, rewritten
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    assert mine_code_corpus([root], cache_dir=cache) == first and calls == [1]
    # valid gzip with garbage inside
    with gzip.open(path, "wt") as f:
        f.write('{"key": "x"}\nnot json\n')
    assert mine_code_corpus([root], cache_dir=cache) == first and calls == [1, 1]
    assert mine_code_corpus([root], cache_dir=cache) == first and calls == [1, 1]
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]


def test_env_cache_dir_and_max_files(tree, monkeypatch, tmp_path):
    root, _ = tree
    monkeypatch.setenv("TREEIDX_CACHE", str(tmp_path / "envcache"))
    items = mine_code_corpus([root], max_files=1)
    assert os.listdir(tmp_path / "envcache")
    assert {it.module for it in items} <= {"pkg"}  # sorted: pkg/__init__.py first


def test_real_stdlib_subset(tmp_path):
    items = mine_code_corpus(max_files=40, cache_dir=str(tmp_path))
    assert len(items) > 100 and all(it.code.strip() for it in items)
    assert len({it.code for it in items}) == len(items)


TEXTS = [
    "def getHTTPServer(port_number):\n    return HTTPServer(port_number)",
    "Return the server bound to a port.",
    "",
    "x",
    "ünïcode naïve_ident",
    "a b a b a b",
]


def test_hash_embed_basic_and_deterministic():
    e = hash_embed(TEXTS, 48)
    assert e.shape == (6, 48) and e.dtype == np.float32 and e.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert np.array_equal(e, hash_embed(TEXTS, 48))
    assert np.array_equal(e, hash_embed(TEXTS, 48, batch=2))  # batch-independent
    assert np.array_equal(e[2], hash_embed([""], 48)[0])  # empty row: from text, not position
    assert not np.allclose(e, hash_embed(TEXTS, 48, seed=1))
    assert hash_embed(["getValue"], 32) @ hash_embed(["get_value"], 32).T > 0.3  # shared sub-tokens


def test_hash_embed_is_projection_of_features():
    nb = 1 << 12
    x = hash_features(TEXTS, n_buckets=nb)
    assert x.shape == (6, nb) and x[2].nnz == 0
    r = corpus._projection_rows(np.arange(nb, dtype=np.int64), 0, 40)
    y = np.asarray(x @ r)
    y[2] = 1
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    e = hash_embed(TEXTS, 40, n_buckets=nb)
    np.testing.assert_allclose(np.delete(e, 2, 0), np.delete(y, 2, 0), atol=1e-5)


def test_tokenize_reference():
    toks, subs = corpus.tokenize("getHTTPServer2 foo_bar")
    assert toks == ["gethttpserver2", "foo_bar"]
    assert subs == ["get", "http", "server", "2", "foo", "bar"]


def test_hash_embed_stable_across_processes():
    code = (
        "import sys; from treeidx.codesearch.corpus import hash_embed; "
        f"sys.stdout.write(hash_embed({TEXTS!r}, 16, seed=3).tobytes().hex())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": s},
        ).stdout
        for s in ("1", "2")
    }
    assert len(outs) == 1
    assert bytes.fromhex(outs.pop()) == hash_embed(TEXTS, 16, seed=3).tobytes()
