"""The pinned code-search corpus: the same targets on every machine.

`mine_code_corpus()` mines whatever is installed, so two machines (or one machine
before and after a `pip install`) trained on different targets: 215,814 in one venv,
154,157 on a fresh machine, 199,129 then 203,452 in a third within one hour. The pinned
corpus is a fixed list of modules, shipped as a manifest (`corpus_manifest.json.gz`
next to this file): the standard library of the Python version in the manifest and
the packages of PINNED_PACKAGES, at the versions in the manifest, each module listed
with its number of items and a BLAKE2b hash of those items (qualified name, kind,
docstring, code). `pin(items)` keeps exactly the items of the listed modules whose
mined items hash the same here, in manifest order, renumbered 0..n-1; a module that
is missing or differs (another version) is dropped whole and counted in the report,
so a machine either trains on the manifest's targets or says by how much it does not.

Regenerate (after changing PINNED_PACKAGES, or to move to new versions, which changes
every figure measured on the corpus): `python -m treeidx.codesearch.pinned --write`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .corpus import CodeItem

__all__ = ["PINNED_PACKAGES", "MANIFEST_PATH", "PinReport", "load_manifest", "make_manifest", "pin", "manifest_digest"]

# treeidx's own dependencies (numpy, numba, llvmlite) and extras (scipy, torch): a
# machine that runs the code-search training has them, unlike whatever else a venv holds
PINNED_PACKAGES = ("numpy", "scipy", "numba", "llvmlite", "torch")
MANIFEST_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus_manifest.json.gz")
_FORMAT = 1


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def in_scope(module: str, packages: Sequence[str] = PINNED_PACKAGES) -> bool:
    """A module of the standard library (by top-level name) or of a pinned package."""
    t = _top(module)
    return t in packages or t in sys.stdlib_module_names


def _module_hash(items: Sequence[CodeItem]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for it in items:
        for part in (it.qualname, it.kind, it.docstring, it.code):
            b = part.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def _by_module(items: Sequence[CodeItem]) -> dict[str, list[CodeItem]]:
    out: dict[str, list[CodeItem]] = {}
    for it in items:
        out.setdefault(it.module, []).append(it)
    return out


def make_manifest(items: Sequence[CodeItem], packages: Sequence[str] = PINNED_PACKAGES) -> dict[str, Any]:
    """The manifest of the in-scope modules of `items` (mined here, now)."""
    versions = {}
    for p in packages:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    mods = _by_module([it for it in items if in_scope(it.module, packages)])
    return dict(
        format=_FORMAT,
        python=platform.python_version(),
        packages=versions,
        n_items=sum(len(v) for v in mods.values()),
        modules=[[m, len(v), _module_hash(v)] for m, v in sorted(mods.items())],
    )


def load_manifest(path: str = MANIFEST_PATH) -> dict[str, Any]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        man = json.load(f)
    if man.get("format") != _FORMAT:
        raise ValueError(f"{path}: manifest format {man.get('format')!r}, expected {_FORMAT}")
    return man


def manifest_digest(manifest: dict[str, Any]) -> str:
    """A short hash of the manifest (part of the featurised cache's key)."""
    return hashlib.blake2b(json.dumps(manifest, sort_keys=True).encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class PinReport:
    """How much of the manifest this machine has.

    items / modules: kept here; manifest_items / manifest_modules: listed;
    missing_modules: listed but not installed; changed_modules: installed with other
    contents (another version); python / packages: the manifest's versions.
    """

    items: int
    modules: int
    manifest_items: int
    manifest_modules: int
    missing_modules: int
    changed_modules: int
    python: str
    packages: dict[str, str | None]

    @property
    def coverage(self) -> float:
        """Share of the manifest's items present, identical, here."""
        return self.items / max(self.manifest_items, 1)

    def as_dict(self) -> dict[str, Any]:
        return dict(
            items=self.items,
            modules=self.modules,
            manifest_items=self.manifest_items,
            manifest_modules=self.manifest_modules,
            missing_modules=self.missing_modules,
            changed_modules=self.changed_modules,
            coverage=round(self.coverage, 6),
            python=self.python,
            packages=self.packages,
        )

    def describe(self) -> str:
        base = (
            f"pinned corpus: {self.items:,} of the manifest's {self.manifest_items:,} items "
            f"({100 * self.coverage:.1f}%)"
        )
        if self.items == self.manifest_items:
            return base + " - the same targets as every machine with the manifest's versions"
        return (
            base + f"; {self.missing_modules} module(s) missing, {self.changed_modules} changed - install "
            f"Python {self.python} and {', '.join(f'{p}=={v}' for p, v in self.packages.items() if v)} "
            "for the manifest's exact targets"
        )


def pin(items: Sequence[CodeItem], manifest: dict[str, Any] | None = None) -> tuple[list[CodeItem], PinReport]:
    """The items of the manifest's modules found here unchanged, ids renumbered 0..n-1
    in manifest order (modules sorted by name, items in mined order within each)."""
    man = manifest if manifest is not None else load_manifest()
    mods = _by_module(items)
    out: list[CodeItem] = []
    n_mod = missing = changed = 0
    for module, n, digest in man["modules"]:
        got = mods.get(module)
        if got is None:
            missing += 1
            continue
        if len(got) != n or _module_hash(got) != digest:
            changed += 1
            continue
        n_mod += 1
        base = len(out)
        out.extend([replace(it, id=base + j) for j, it in enumerate(got)])
    rep = PinReport(
        items=len(out),
        modules=n_mod,
        manifest_items=int(man["n_items"]),
        manifest_modules=len(man["modules"]),
        missing_modules=missing,
        changed_modules=changed,
        python=man["python"],
        packages=dict(man["packages"]),
    )
    return out, rep


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write or check the pinned corpus manifest")
    p.add_argument("--write", action="store_true", help=f"(re)write {MANIFEST_PATH} from this machine")
    a = p.parse_args(argv)
    from .corpus import mine_code_corpus

    items = mine_code_corpus(progress=True)
    if a.write:
        man = make_manifest(items)
        with gzip.open(MANIFEST_PATH, "wt", encoding="utf-8", compresslevel=9) as f:
            json.dump(man, f, separators=(",", ":"))
        print(f"wrote {MANIFEST_PATH}: {man['n_items']:,} items in {len(man['modules']):,} modules")
    print(pin(items)[1].describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
