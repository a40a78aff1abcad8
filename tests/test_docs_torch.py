"""docs/torch.md's training loop, and each baseline variant of it, run as written.

The main loop is the python block after `<!-- main-loop -->`; a baseline block (after
`<!-- baseline: NAME -->`) lists replacement lines tagged `# [tag]`: every main-loop
line with that tag is dropped and the baseline's lines for it go where the first one
was (`# [tag] deleted` drops them). The constants lines are shrunk to N = 3000, 3 steps,
refresh every 2 steps (so the index update runs too), batch 32, k = 8, dim 16.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "torch.md"
TAG = re.compile(r"#\s*\[(\w+)\]")
BASELINES = ("uniform", "inbatch", "stale_topk", "negcache", "brute")


def _block(text: str, marker: str) -> str:
    i = text.index(marker)
    m = re.compile(r"```python\n(.*?)```", re.S).search(text, i)
    assert m is not None, marker
    return m.group(1)


def _tag(line: str) -> str | None:
    m = TAG.search(line)
    return m.group(1) if m else None


def _apply(main: str, patch: str) -> str:
    repl: dict[str, list[str]] = {}
    for line in patch.splitlines():
        tag = _tag(line)
        if tag is None:
            continue
        repl.setdefault(tag, [])
        if not line.lstrip().startswith("#"):
            repl[tag].append(line)
    out, placed = [], set()
    for line in main.splitlines():
        tag = _tag(line)
        if tag in repl:
            if tag not in placed:
                out.extend(repl[tag])
                placed.add(tag)
            continue
        out.append(line)
    assert placed == set(repl), f"tags not in the main loop: {set(repl) - placed}"
    return "\n".join(out) + "\n"


def _shrink(code: str) -> str:
    code, n = re.subn(r"^N, STEPS, REFRESH = .*$", "N, STEPS, REFRESH = 3_000, 3, 2", code, count=1, flags=re.M)
    assert n == 1, "constants line not found"
    code, n = re.subn(r"^V, D, B, K, T = .*$", "V, D, B, K, T = 2**12, 16, 32, 8, 0.05", code, count=1, flags=re.M)
    assert n == 1, "model constants line not found"
    return code


def _run(code: str) -> dict:
    ns: dict = {"__name__": "docs_torch"}
    exec(compile(code, str(DOC), "exec"), ns)
    return ns


def test_main_loop_runs():
    text = DOC.read_text()
    ns = _run(_shrink(_block(text, "<!-- main-loop -->")))
    assert ns["step"] == 2 and ns["loss"].isfinite()
    assert not ns["sampler"].pending  # closed
    assert len(ns["index"]) == ns["N"]


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_loop_runs(name):
    text = DOC.read_text()
    main = _block(text, "<!-- main-loop -->")
    code = _apply(main, _block(text, f"<!-- baseline: {name} -->"))
    assert "submit" not in code and "index.update" not in code
    code = (
        "from treeidx.torch import (UniformSampler, InBatch, StaleTopK, NegativeCache,\n"
        "                               BruteForceSampler)\n" + _shrink(code)
    )
    ns = _run(code)
    assert ns["step"] == 2 and ns["loss"].isfinite()
