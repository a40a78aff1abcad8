"""Real text units for the `static` benchmark dataset (bench.datasets.static).

Every `.py` file of the installed Python sources (the same files as the code corpus,
`treeidx.codesearch.corpus`) is cut into short real texts, each one unit:

* ``code``    every function and class (nested too): its source without its docstring;
* ``doc``     every paragraph of every module, class and function docstring;
* ``comment`` every comment line (``# ...``);
* ``line``    every logical line of code (a statement, or a ``def``/``class``/``if`` header).

Whitespace is collapsed to single spaces and each unit keeps its first 256 words (the
static model averages token vectors, so longer texts add little), then units are
deduplicated across all files and kinds (first occurrence kept: vendored copies and
boilerplate lines are everywhere). Units too short to say anything are dropped (see
`_keep`). Files are visited in the code corpus's sorted order, so the unit list is a
deterministic function of the installed files.
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import re
import sys
import tokenize
from collections.abc import Iterator, Sequence
from multiprocessing import get_context

KINDS = ("code", "doc", "comment", "line")
_K_CODE, _K_DOC, _K_COMMENT, _K_LINE = range(4)
_MAX_WORDS = 256
_PARA = re.compile(r"\n\s*\n")
# Comments that are markup for tools, not text.
_TOOL_COMMENT = re.compile(
    r"^(noqa|type:|pragma|pylint:|fmt:|isort:|mypy:|pyright:|ruff:|-\*-|!|flake8)", re.IGNORECASE
)


def _norm(text: str) -> str:
    out = " ".join(text.split()[:_MAX_WORDS])
    try:
        out.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (from odd escapes): no tokenizer takes them
        out = out.encode("utf-8", "replace").decode("utf-8")
    return out


def _letters(text: str) -> int:
    return sum(c.isalpha() for c in text)


def _keep(kind: int, text: str) -> bool:
    """Drop units too short to carry meaning (a lone `return`, `# ---`, `else:`)."""
    if kind == _K_LINE:
        return len(text) >= 12 and _letters(text) >= 6
    if kind in (_K_DOC, _K_COMMENT):
        return text.count(" ") >= 2 and _letters(text) >= 10
    return True


def _decode(raw: bytes) -> str:
    if b"coding" not in raw[:300]:
        return raw.decode("utf-8")
    enc, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    return raw.decode(enc)


def file_units(path: str) -> list[tuple[int, str]] | None:
    """(kind, text) units of one source file in source order; None if unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = _decode(raw)
        tree = ast.parse(text)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return None
    from treeidx.codesearch.corpus import code_without_docstring

    src = text.encode("utf-8", "surrogatepass")
    starts = [0]
    for line in src.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def off(lineno: int, col: int) -> int:
        return starts[lineno - 1] + col

    out: list[tuple[int, str]] = []

    def docs(node) -> None:
        d = ast.get_docstring(node)
        if d:
            out.extend((_K_DOC, _norm(p)) for p in _PARA.split(d))

    def visit(body: list) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                try:
                    out.append((_K_CODE, _norm(code_without_docstring(src, node, off, starts))))
                except (IndexError, ValueError):
                    pass
                docs(node)
                visit(node.body)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    sub = getattr(node, field, None)
                    if isinstance(sub, list):
                        visit([s for s in sub if isinstance(s, ast.AST)])

    docs(tree)
    visit(tree.body)
    out.extend(_token_units(text))
    return [(k, t) for k, t in out if t and _keep(k, t)]


def _token_units(text: str) -> Iterator[tuple[int, str]]:
    """Comment lines and logical lines of code (docstring-only statements skipped)."""
    lines = text.splitlines(keepends=True)
    start = None  # (row, col) of the logical line's first token
    only_string = True
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            tt = tok.type
            if tt == tokenize.COMMENT:
                c = tok.string.lstrip("#").strip()
                if c and not _TOOL_COMMENT.match(c):
                    yield _K_COMMENT, _norm(c)
                continue
            if tt in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER):
                continue
            if tt == tokenize.NEWLINE:
                if start is not None and not only_string:
                    (r0, c0), (r1, c1) = start, tok.start
                    seg = (
                        lines[r0 - 1][c0:] + "".join(lines[r0 : r1 - 1]) + lines[r1 - 1][:c1]
                        if r1 > r0
                        else lines[r0 - 1][c0:c1]
                    )
                    yield _K_LINE, _norm(_strip_comments(seg))
                start, only_string = None, True
                continue
            if start is None:
                start = tok.start
            if tt != tokenize.STRING:
                only_string = False
    except (tokenize.TokenError, IndentationError, SyntaxError, IndexError):
        return


def _strip_comments(seg: str) -> str:
    """A multi-line statement's trailing comments go (they are comment units already)."""
    if "#" not in seg:
        return seg
    try:
        toks = [t for t in tokenize.generate_tokens(io.StringIO(seg).readline) if t.type == tokenize.COMMENT]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return seg
    if not toks:
        return seg
    rows = seg.splitlines()
    for t in reversed(toks):
        r, c = t.start
        rows[r - 1] = rows[r - 1][:c]
    return "\n".join(rows)


def unit_hash(text: str) -> int:
    """A stable 64-bit hash of a unit's text (the query hold-out draw uses it)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _units_of(path: str) -> list[tuple[int, str]] | None:
    return file_units(path)


def mine_units(
    roots: Sequence[str] | None = None,
    *,
    max_files: int | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[list[int], list[str], int]:
    """(kinds, texts, files skipped) of every unit of every minable file, deduplicated.

    `roots`/`max_files` as in `treeidx.codesearch.corpus.mine_code_corpus` (default: the
    standard library and site-packages of this interpreter).
    """
    from treeidx.codesearch.corpus import default_roots, list_source_files

    roots = [os.path.realpath(r) for r in (roots if roots is not None else default_roots())]
    files = [os.path.join(root, rel) for root, rel, _, _ in list_source_files(roots, max_files)]
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    pool = None
    if workers > 1 and len(files) > 50:
        # imap keeps file order: the output does not depend on scheduling
        pool = get_context("spawn" if sys.platform == "win32" else "fork").Pool(workers)
        results = pool.imap(_units_of, files, chunksize=8)
    else:
        results = map(_units_of, files)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=len(files), desc="static units", unit="file")
    kinds: list[int] = []
    texts: list[str] = []
    seen: set[str] = set()
    skipped = 0
    try:
        for res in results:
            if res is None:
                skipped += 1
                continue
            for k, t in res:
                if t not in seen:
                    seen.add(t)
                    kinds.append(k)
                    texts.append(t)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return kinds, texts, skipped
