"""The package's architecture, checked from its source with `ast` (nothing is imported).

* no import cycle among treeidx modules, counting imports inside functions;
* no module imports another module's private name (`from .x import _y`); importing a
  private *module* for its public names (`from . import _validate`) is fine;
* treeidx/_kernels/ imports nothing from treeidx outside itself, no kernel there takes
  more than 12 parameters, no function there is longer than 150 lines, and no `prange`
  body writes through a record's field (numba drops those stores);
* bench/ uses treeidx's public API only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "treeidx"
MAX_KERNEL_PARAMS = 12
MAX_KERNEL_LINES = 150


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(importer: str, level: int, target: str | None) -> str:
    """Absolute name of `from <level dots><target> import ...` inside module importer."""
    if level == 0:
        return target or ""
    base = importer.split(".")
    if not is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(name: str):
    """(imported module, imported name or None, line) of every import in a module,
    at any depth (function-level imports included)."""
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            mod = resolve(name, node.level, node.module)
            for alias in node.names:
                yield mod, alias.name, node.lineno


def internal_edges(name: str):
    """Modules of treeidx that module `name` imports (a submodule named in a
    `from package import sub` counts as the submodule, not the package)."""
    for mod, item, line in imports(name):
        if item is not None and f"{mod}.{item}" in MODULES:
            yield f"{mod}.{item}", line
        elif mod in MODULES:
            yield mod, line


def test_no_import_cycle():
    graph = {m: sorted({t for t, _ in internal_edges(m) if t != m}) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_no_private_name_crosses_a_module():
    bad = []
    for m in MODULES:
        for mod, item, line in imports(m):
            if not mod.startswith("treeidx") or item is None or not item.startswith("_"):
                continue
            if f"{mod}.{item}" in MODULES or (item.startswith("__") and item.endswith("__")):
                continue  # a (private) module, or a dunder such as __all__
            bad.append(f"{MODULES[m].relative_to(ROOT)}:{line}: from {mod} import {item}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


KERNELS = {m: p for m, p in MODULES.items() if m.startswith("treeidx._kernels")}


def test_kernels_import_nothing_outside_kernels():
    bad = [
        f"{KERNELS[m].relative_to(ROOT)}:{line}: {t}"
        for m in KERNELS
        for t, line in internal_edges(m)
        if not t.startswith("treeidx._kernels")
    ]
    assert not bad, "treeidx/_kernels must be self-contained:\n" + "\n".join(bad)


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def is_numba(fn: ast.FunctionDef) -> bool:
    return any(
        "nb." in ast.unparse(d) or "numba" in ast.unparse(d) or "njit" in ast.unparse(d) for d in fn.decorator_list
    )


def test_kernels_are_small():
    too_many, too_long = [], []
    for m, p in KERNELS.items():
        for fn in functions(p):
            where = f"{p.relative_to(ROOT)}:{fn.lineno} {fn.name}"
            n_params = len(fn.args.args) + len(fn.args.posonlyargs) + len(fn.args.kwonlyargs)
            if is_numba(fn) and n_params > MAX_KERNEL_PARAMS:
                too_many.append(f"{where}: {n_params} parameters")
            if fn.end_lineno - fn.lineno + 1 > MAX_KERNEL_LINES:
                too_long.append(f"{where}: {fn.end_lineno - fn.lineno + 1} lines")
    assert not too_many, "kernels with more than 12 parameters:\n" + "\n".join(too_many)
    assert not too_long, "functions over 150 lines in _kernels:\n" + "\n".join(too_long)


def test_prange_bodies_do_not_write_through_record_fields():
    bad = []
    for m, p in KERNELS.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if not (isinstance(node, ast.For) and "prange" in ast.unparse(node.iter)):
                continue
            for sub in ast.walk(node):
                targets = (
                    sub.targets
                    if isinstance(sub, ast.Assign)
                    else [sub.target]
                    if isinstance(sub, ast.AugAssign)
                    else []
                )
                for t in targets:
                    for el in t.elts if isinstance(t, ast.Tuple) else [t]:
                        if isinstance(el, ast.Subscript) and isinstance(el.value, ast.Attribute):
                            bad.append(f"{p.relative_to(ROOT)}:{el.lineno}: {ast.unparse(el)}")
    assert not bad, "prange body writes through a record field (numba drops it):\n" + "\n".join(bad)


def test_bench_uses_public_api_only():
    bad = []
    for p in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                if n.startswith("treeidx") and any(part.startswith("_") for part in n.split(".")):
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: {n}")
    assert not bad, "bench imports private treeidx names:\n" + "\n".join(bad)


def test_the_checks_see_the_package():
    # guards against a path mistake that would make every test above vacuous
    assert "treeidx.tree" in MODULES and "treeidx._kernels.sample" in KERNELS
    assert any(t == "treeidx._kernels.search" for t, _ in internal_edges("treeidx.tree"))
