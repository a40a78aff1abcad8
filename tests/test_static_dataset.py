"""The `static` benchmark dataset (bench.static_text units, bench.datasets.static) and
bench.sample's reduced-precision brute-force columns. The real model2vec distillation
is not run here (minutes); a hash-seeded fake encoder stands in for it."""

from __future__ import annotations

import json
import textwrap
import zlib

import numpy as np
import pytest

from bench import datasets
from bench.static_text import KINDS, file_units

SRC = textwrap.dedent('''
    """Module docstring: first paragraph about parsing things.

    Second paragraph, which explains the module in more words.
    """
    import os  # noqa

    # Compute the total of the given values carefully.
    def total(values):
        """Sum the values.

        Returns zero for an empty sequence of values.
        """
        result = sum(values)  # sum is exact for integers here
        return result

    class Box:
        """A box that holds things."""
        def open(self, force=False):
            if force:
                return self.contents_of_the_box
            return None
    # ---
''')


def test_file_units_kinds_and_filters(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(SRC)
    units = file_units(str(f))
    by_kind = {k: [t for kk, t in units if KINDS[kk] == k] for k in KINDS}
    assert "Module docstring: first paragraph about parsing things." in by_kind["doc"]
    assert "Second paragraph, which explains the module in more words." in by_kind["doc"]
    assert "Returns zero for an empty sequence of values." in by_kind["doc"]
    assert "Compute the total of the given values carefully." in by_kind["comment"]
    assert "sum is exact for integers here" in by_kind["comment"]
    assert not any("noqa" in t or "---" in t for t in by_kind["comment"])  # tool markup, rules
    assert "result = sum(values)" in by_kind["line"]  # its trailing comment stripped
    assert "return self.contents_of_the_box" in by_kind["line"]
    assert "return None" not in by_kind["line"]  # too short to mean anything
    assert not any("Module docstring" in t for t in by_kind["line"])  # docstrings are not lines
    assert any(t.startswith("def total(values): result = sum(values)") for t in by_kind["code"])
    assert all("\n" not in t and "\t" not in t for _, t in units)
    assert file_units(str(tmp_path / "missing.py")) is None


class FakeModel:
    """model2vec's encode(): a hash-seeded Gaussian per text (zero for 'ZEROVEC')."""

    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.encoded = 0
        self.fail_after = fail_after

    def encode(self, texts, **kw):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("stopped")
        self.calls += 1
        self.encoded += len(texts)
        out = np.stack(
            [np.random.default_rng(zlib.crc32(t.encode())).standard_normal(datasets.STATIC_DIM) for t in texts]
        )
        out[[("ZEROVEC" in t) for t in texts]] = 0
        return out


def _corpus(root):
    root.mkdir()
    lines = [f"# comment number {i} about the widget and its gadget" for i in range(1500)]
    lines += [
        f"value_{i} = compute_something({i}, 'ZEROVEC')" if i == 7 else f"value_{i} = compute_something({i})"
        for i in range(300)
    ]
    (root / "big.py").write_text("\n".join(lines) + "\n")
    (root / "m.py").write_text(SRC)
    return dict(roots=[str(root)], max_files=None)


def test_static_build_cache_holdout_and_resume(tmp_path, monkeypatch):
    kw = _corpus(tmp_path / "src")
    kinds, texts, meta = datasets.static_units(cache_dir=str(tmp_path / "c"), **kw)
    assert meta["per_kind"]["comment"] >= 1500 and len(texts) == meta["n"]
    hold = [datasets.static_holdout(k, t) for k, t in zip(kinds, texts)]
    assert 0 < sum(hold) < 0.05 * len(texts)
    assert all(KINDS[k] in ("doc", "comment") for k, h in zip(kinds, hold) if h)

    monkeypatch.setattr(datasets, "_STATIC_CHUNK", 256)
    ref_model = FakeModel()
    x, q = datasets.static(n_queries=5, seed=1, cache_dir=str(tmp_path / "ref"), model=ref_model, **kw)
    n_targets = len(texts) - sum(hold)
    assert x.shape == (n_targets - 1, 256) and q.shape == (5, 256)  # the ZEROVEC row dropped
    assert x.dtype == q.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    held = {t for t, h in zip(texts, hold) if h}
    enc_q = FakeModel().encode(sorted(held))
    enc_q /= np.linalg.norm(enc_q, axis=1, keepdims=True)
    # every query is a held-out text, and no target is
    assert np.abs(q.astype(np.float64) @ enc_q.T).max(axis=1).min() > 1 - 1e-5
    assert np.abs(x[:2000].astype(np.float64) @ q.T).max() < 0.9
    meta_files = list((tmp_path / "ref").glob("static-*-meta.json"))
    assert json.loads(meta_files[0].read_text())["zero_rows_dropped"] == 1

    # cached: neither mined nor encoded again
    monkeypatch.setattr("bench.static_text.mine_units", lambda *a, **k: pytest.fail("re-mined"))
    x2, q2 = datasets.static(n_queries=5, seed=1, cache_dir=str(tmp_path / "ref"), model=FakeModel(fail_after=0), **kw)
    assert np.array_equal(x, x2) and np.array_equal(q, q2)

    # an interrupted build resumes from its saved shards and gives the same bytes
    cache = str(tmp_path / "resume")
    monkeypatch.undo()
    monkeypatch.setattr(datasets, "_STATIC_CHUNK", 256)
    with pytest.raises(KeyboardInterrupt):
        datasets.static(n_queries=5, seed=1, cache_dir=cache, model=FakeModel(fail_after=4), **kw)
    again = FakeModel()
    x3, q3 = datasets.static(n_queries=5, seed=1, cache_dir=cache, model=again, **kw)
    assert again.encoded == n_targets - 3 * 256  # queries done, 3 shards kept
    assert np.array_equal(x, x3) and np.array_equal(q, q3)
    assert not list((tmp_path / "resume").glob("*.part*"))  # shards removed once assembled


def test_load_static_dim_and_subset(monkeypatch):
    x = np.eye(300, 256, dtype=np.float32)
    monkeypatch.setattr(datasets, "static", lambda **kw: (x, x[:4]))
    t, q = datasets.load("static", 100, None, n_queries=4)
    assert t.shape == (100, 256) and q.shape == (4, 256) and t.flags.c_contiguous
    assert datasets.load("static", None, 256)[0].shape == (300, 256)
    with pytest.raises(ValueError, match="256-d"):
        datasets.load("static", 100, 64)


def test_sample_bench_reduced_precision_columns(monkeypatch, capsys):
    from bench.sample import main

    rng = np.random.default_rng(0)

    def unit(a):
        return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)

    monkeypatch.setattr(
        datasets,
        "static",
        lambda **kw: (unit(rng.standard_normal((2000, 256))), unit(rng.standard_normal((kw["n_queries"], 256)))),
    )
    res = main(
        [
            "--dataset",
            "static",
            "--n",
            "0",
            "--queries",
            "8",
            "--tv-queries",
            "1",
            "--tv-draws",
            "1000",
            "--perplexities",
            "100",
            "--budgets",
            "0.1",
            "--no-kmeans-peer",
            "--lowp-tv-queries",
            "3",
            "--json",
        ]
    )
    capsys.readouterr()
    assert res["dim"] == 256 and res["n"] == 2000
    run = res["runs"][0]
    for prec in ("bf16", "int8"):
        e = run[f"brute_force_{prec}"]
        assert e["ms_per_query"] > 0 and 0 < e["tv_to_exact"] <= e["tv_to_exact_max"] < 0.2
        assert run["treeidx_exact"][f"speedup_vs_{prec}"] > 0
        assert run["approx_curve"][0][f"speedup_vs_{prec}"] > 0
