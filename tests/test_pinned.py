"""treeidx.codesearch.pinned: the manifest pins the corpus's targets."""

from __future__ import annotations

from dataclasses import replace

import pytest

from treeidx.codesearch import CodeSearchData
from treeidx.codesearch.corpus import CodeItem
from treeidx.codesearch.pinned import PINNED_PACKAGES, in_scope, load_manifest, make_manifest, pin


def items():
    rows = [
        ("json.decoder", "f", "def f(): pass"),
        ("json.decoder", "g", "def g(): return 1"),
        ("numpy.linalg", "solve", "def solve(a, b): ..."),
        ("sklearn.base", "clone", "def clone(x): ..."),
        ("os", "walk", "def walk(top): ..."),
        ("torch.nn", "Linear", "class Linear: ..."),
    ]
    return [
        CodeItem(id=i, module=m, qualname=q, kind="function", docstring=f"Doc of {q}.", code=c)
        for i, (m, q, c) in enumerate(rows)
    ]


def test_manifest_scope_and_exact_pinning():
    its = items()
    man = make_manifest(its)
    assert [m for m, _, _ in man["modules"]] == ["json.decoder", "numpy.linalg", "os", "torch.nn"]
    assert man["n_items"] == 5 and not in_scope("sklearn.base") and in_scope("numpy.linalg")
    assert set(man["packages"]) == set(PINNED_PACKAGES)
    kept, rep = pin(its, man)
    assert [(it.module, it.qualname) for it in kept] == [
        ("json.decoder", "f"),
        ("json.decoder", "g"),
        ("numpy.linalg", "solve"),
        ("os", "walk"),
        ("torch.nn", "Linear"),
    ]
    assert [it.id for it in kept] == list(range(5)) and rep.coverage == 1.0
    # another machine: numpy's module changed (another version), torch missing, extra modules installed
    other = [
        replace(it, code=it.code + " # v2") if it.module == "numpy.linalg" else it
        for it in its
        if it.module != "torch.nn"
    ]
    other.append(CodeItem(id=99, module="os", qualname="extra", kind="function", docstring="", code="x"))
    kept2, rep2 = pin(other, man)
    assert [(it.module, it.qualname) for it in kept2] == [("json.decoder", "f"), ("json.decoder", "g")]
    assert (rep2.items, rep2.missing_modules, rep2.changed_modules) == (2, 1, 2)  # os has an extra item
    assert rep2.coverage == pytest.approx(2 / 5) and "40.0%" in rep2.describe()
    # the order of the mined items does not matter across modules, only within one
    kept3, _ = pin(list(reversed(its[2:])) + its[:2], man)
    assert [(it.module, it.qualname) for it in kept3] == [(it.module, it.qualname) for it in kept]


def test_shipped_manifest_is_well_formed():
    man = load_manifest()
    assert man["n_items"] == sum(n for _, n, _ in man["modules"]) > 50_000
    names = [m for m, _, _ in man["modules"]]
    assert names == sorted(set(names)) and all(in_scope(m) for m in names)
    assert set(man["packages"]) == set(PINNED_PACKAGES) and man["python"].count(".") == 2


def test_pinned_needs_default_roots(tmp_path):
    with pytest.raises(ValueError, match="pinned"):
        CodeSearchData.load(roots=[str(tmp_path)], corpus="pinned")
    with pytest.raises(ValueError, match="corpus"):
        CodeSearchData.load(roots=[str(tmp_path)], corpus="everything")
