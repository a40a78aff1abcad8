"""A real, offline code-search corpus mined from the installed Python sources.

Used for realistic embedding vectors in benchmarks and as the demo's training set
(query = a function's docstring, target = its source with the docstring removed).
Everything here is deterministic: same installed files -> same items, same ids,
same embeddings, in any process.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import math
import os
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import get_context

import numba
import numpy as np
import scipy.sparse as sp

from .._kernels.rng import mix64
from .._progress import progress_bar
from .._threads import run_parallel

__all__ = [
    "CodeItem",
    "mine_code_corpus",
    "corpus_cache_key",
    "default_roots",
    "list_source_files",
    "code_without_docstring",
    "default_cache_dir",
    "hash_features",
    "hash_embed",
    "tokenize",
]

# Bump when the mining rules change, so old caches are not reused.
_FORMAT = 3
# Directory names never descended into: tests and test data would swamp the corpus
# with near-duplicates; nested site-packages would mine one package twice.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "__pycache__",
        "site-packages",
        "dist-packages",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "node_modules",
    }
)
# Huge generated files (tables, test matrices) cost most of the parse time and add
# nothing a code-search model should learn from.
_MAX_FILE_BYTES = 1_000_000


@dataclass(frozen=True)
class CodeItem:
    """One function or class: `code` is its source with its own docstring removed."""

    id: int
    module: str
    qualname: str
    kind: str  # 'function' | 'class'
    docstring: str
    code: str


# ----------------------------------------------------------------------------- files


def default_roots() -> list[str]:
    """The standard library and the site-packages directories of this interpreter."""
    paths = sysconfig.get_paths()
    roots: list[str] = []
    for key in ("stdlib", "purelib", "platlib"):
        p = os.path.realpath(paths[key])
        if p not in roots and os.path.isdir(p):
            roots.append(p)
    return roots


def default_cache_dir() -> str:
    """`$TREEIDX_CACHE`, else `~/.cache/treeidx`."""
    return os.environ.get("TREEIDX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "treeidx")


def list_source_files(roots: Sequence[str], max_files: int | None) -> list[tuple[str, str, int, int]]:
    """(root, relpath, size, mtime_ns) of every minable .py file, sorted per root."""
    out: list[tuple[str, str, int, int]] = []
    for root in roots:
        found: list[tuple[str, str, int, int]] = []
        for dirpath, dirnames, filenames in os.walk(root):
            # Prune in place; sorting is done on the final relpaths anyway.
            dirnames[:] = [
                d
                for d in dirnames
                if d not in _SKIP_DIRS and not d.startswith(".") and not d.endswith((".dist-info", ".egg-info"))
            ]
            for f in filenames:
                if not f.endswith(".py"):
                    continue
                full = os.path.join(dirpath, f)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                if st.st_size <= _MAX_FILE_BYTES:
                    found.append((root, os.path.relpath(full, root), st.st_size, st.st_mtime_ns))
        found.sort(key=lambda t: t[1].replace(os.sep, "/"))
        out.extend(found)
    return out[:max_files] if max_files is not None else out


def corpus_cache_key(roots: Sequence[str] | None = None, max_files: int | None = None) -> str:
    """Hash of (format, Python version, roots, every file's path/size/mtime)."""
    roots = [os.path.realpath(r) for r in (roots if roots is not None else default_roots())]
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([_FORMAT, sys.version, roots, max_files]).encode())
    for root, rel, size, mtime in list_source_files(roots, max_files):
        h.update(f"{roots.index(root)}\0{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _module_name(rel: str) -> str:
    parts = rel[:-3].replace(os.sep, "/").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


# ----------------------------------------------------------------------------- mining


def _extract(path_rel: tuple[str, str]) -> list[tuple[str, str, str, str, str]] | None:
    """Items (module, qualname, kind, docstring, code) of one file; None if unreadable."""
    root, rel = path_rel
    try:
        with open(os.path.join(root, rel), "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8") if b"coding" not in raw[:300] else _decode_declared(raw)
        tree = ast.parse(text)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return None
    # ast column offsets are UTF-8 byte offsets, so slice the UTF-8 bytes of `text`.
    src = text.encode("utf-8", "surrogatepass")
    starts = [0]
    for line in src.splitlines(keepends=True):  # bytes split only on \n, \r\n, \r, like ast
        starts.append(starts[-1] + len(line))
    module = _module_name(rel)
    items: list[tuple[str, str, str, str, str]] = []

    def off(lineno: int, col: int) -> int:
        return starts[lineno - 1] + col

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = prefix + node.name
                code = code_without_docstring(src, node, off, starts)
                doc = ast.get_docstring(node) or ""
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                items.append((module, qual, kind, doc, code))
                visit(node.body, qual + ".")
            else:
                # Definitions under if/try/with/for at any level still count.
                for field in ("body", "orelse", "finalbody", "handlers"):
                    sub = getattr(node, field, None)
                    if isinstance(sub, list):
                        visit([s for s in sub if isinstance(s, ast.AST)], prefix)

    visit(tree.body, "")
    return items


def _decode_declared(raw: bytes) -> str:
    import io
    import tokenize

    enc, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    return raw.decode(enc)


def code_without_docstring(src: bytes, node: ast.AST, off, starts: list[int]) -> str:
    """Source of `node` (from its first decorator) with its docstring statement cut out."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    lo = starts[first - 1]  # whole first line: only indentation precedes a def, usually
    hi = off(node.end_lineno, node.end_col_offset)
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        ds = body[0]
        a, b = off(ds.lineno, ds.col_offset), off(ds.end_lineno, ds.end_col_offset)
        line_lo = starts[ds.lineno - 1]
        eol = src.find(b"\n", b)
        line_hi = len(src) if eol < 0 else eol + 1
        rest = src[b:line_hi]
        if not src[line_lo:a].strip() and (not rest.strip() or rest.lstrip().startswith(b"#")):
            a, b = line_lo, min(line_hi, hi)  # the docstring has its own line(s): drop them whole
        else:
            tail = src[b:hi].lstrip(b" \t")
            if tail.startswith(b";"):  # `def f(): "doc"; return 1` -> `def f(): return 1`
                b = hi - len(tail[1:].lstrip(b" \t"))
        seg = src[lo:a] + src[b:hi]
    else:
        seg = src[lo:hi]
    text = seg.decode("utf-8", "replace")
    if not text[: node.col_offset].isspace() and node.col_offset:
        text = " " * node.col_offset + text[node.col_offset :]  # `if x: def f()...` on one line
    return textwrap.dedent(text).strip("\n")


def _cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"corpus-{key}.jsonl.gz")


def _read_cache(path: str, key: str) -> list[CodeItem] | None:
    """Items from a cache file, or None if it is missing, stale or damaged in any way."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            header = json.loads(f.readline())
            if header.get("key") != key or header.get("format") != _FORMAT:
                return None
            items = [CodeItem(i, *json.loads(line)) for i, line in enumerate(f)]
        return items if len(items) == header["n"] else None
    except Exception:  # truncated gzip, bad CRC, bad JSON, wrong arity: re-mine
        return None


def _write_cache(path: str, key: str, items: list[CodeItem]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3, mtime=0) as gz:
            gz.write((json.dumps({"key": key, "format": _FORMAT, "n": len(items)}) + "\n").encode())
            for it in items:
                gz.write((json.dumps([it.module, it.qualname, it.kind, it.docstring, it.code]) + "\n").encode())
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def mine_code_corpus(
    roots: Sequence[str] | None = None,
    *,
    cache_dir: str | None = None,
    progress: bool = False,
    max_files: int | None = None,
    workers: int | None = None,
) -> list[CodeItem]:
    """Every function and class (nested too) in the installed Python sources.

    Walks the `.py` files under `roots` (default: the standard library and
    site-packages), skipping `test`/`tests`/`idlelib`/`lib2to3`/`turtledemo` and nested
    `site-packages` directories and files over 1 MB (generated tables). Files are
    sorted by path relative to their root (roots in the given order), truncated to
    the first `max_files`, and items kept in source order. Each item's `code` is its
    source from its first decorator, dedented, with its own docstring statement
    removed (nested definitions keep theirs). Items whose code has fewer than 2
    non-empty lines are skipped (e.g. a docstring-only stub), as are exact duplicate
    codes (first kept; vendored copies are common). Files that cannot be read or
    parsed are skipped silently (their count is in `mine_code_corpus.last_skipped`).
    ids are 0..n-1 in the final order.

    The result is cached as gzip'd JSON lines in `cache_dir` (default
    `$TREEIDX_CACHE` or `~/.cache/treeidx`), keyed by `corpus_cache_key`; a
    damaged cache file is ignored and rewritten.
    """
    roots = [os.path.realpath(r) for r in (roots if roots is not None else default_roots())]
    cache_dir = cache_dir or default_cache_dir()
    key = corpus_cache_key(roots, max_files)
    path = _cache_path(cache_dir, key)
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    items = _mine(roots, max_files, progress, workers)
    _write_cache(path, key, items)
    return items


mine_code_corpus.last_skipped = 0  # type: ignore[attr-defined]


def _mine(roots: list[str], max_files: int | None, progress: bool, workers: int | None) -> list[CodeItem]:
    files = [(root, rel) for root, rel, _, _ in list_source_files(roots, max_files)]
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    results: Iterator[list | None]
    pool = None
    if workers > 1 and len(files) > 50:
        # imap keeps file order, so the output is independent of scheduling; ASTs are
        # dropped inside the worker, so only the extracted strings travel and stay.
        pool = get_context("spawn" if sys.platform == "win32" else "fork").Pool(workers)
        results = pool.imap(_extract, files, chunksize=16)
    else:
        results = map(_extract, files)
    bar = progress_bar(progress, total=len(files), desc="mining", unit="file")
    items: list[CodeItem] = []
    seen: set[bytes] = set()
    skipped = 0
    try:
        for res in results:
            bar.update(1)
            if res is None:
                skipped += 1
                continue
            for module, qual, kind, doc, code in res:
                if sum(1 for ln in code.splitlines() if ln.strip()) < 2:
                    continue
                h = hashlib.blake2b(code.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                if h in seen:
                    continue
                seen.add(h)
                items.append(CodeItem(len(items), module, qual, kind, doc, code))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    mine_code_corpus.last_skipped = skipped  # type: ignore[attr-defined]
    return items


# ----------------------------------------------------------------------------- embedding

_U = numba.uint64
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
# Distinct salts per feature family, so e.g. the token "get" and the sub-token "get"
# are separate features (identifiers and their parts carry different signal).
_NS_TOK, _NS_TOK2, _NS_SUB, _NS_SUB2 = (np.uint64(x) for x in (0x1111, 0x2222, 0x3333, 0x4444))


@numba.njit(inline="always")
def _is_word(c):
    # ASCII letters, digits, '_' and every non-ASCII UTF-8 byte (unicode identifiers).
    return (c >= 48 and c <= 57) or (c >= 65 and c <= 90) or (c >= 97 and c <= 122) or c == 95 or c >= 128


@numba.njit(inline="always")
def _cls(c):
    # 0 = separator '_', 1 = lower/other, 2 = upper, 3 = digit
    if c == 95:
        return 0
    if c >= 65 and c <= 90:
        return 2
    if c >= 48 and c <= 57:
        return 3
    return 1


@numba.njit(cache=True, inline="always")
def _fnv_lower(buf, lo, hi, salt):
    """FNV-1a hash of buf[lo:hi] with ASCII letters lowercased."""
    h = _FNV_OFFSET ^ salt
    for k in range(lo, hi):
        c = buf[k]
        if c >= 65 and c <= 90:
            c += 32
        h = (h ^ _U(c)) * _FNV_PRIME
    return h


@numba.njit(cache=True)
def _doc_features(buf, lo, hi, seed, n_buckets):
    """Sorted unique buckets and counts of one document's hashed n-gram features."""
    feats = np.empty(4 * (hi - lo) + 4, np.uint64)
    nf = 0
    salt = mix64(_U(seed) + _U(0x9E3779B97F4A7C15))
    prev_tok = _U(0)
    has_tok = False
    prev_sub = _U(0)
    has_sub = False
    i = lo
    while i < hi:
        if not _is_word(buf[i]):
            i += 1
            continue
        j = i
        while j < hi and _is_word(buf[j]):
            j += 1
        # whole token [i, j), lowercased
        h = _fnv_lower(buf, i, j, salt)
        feats[nf] = mix64(h ^ _NS_TOK)
        nf += 1
        if has_tok:
            feats[nf] = mix64(prev_tok * _U(31) + h + _NS_TOK2)
            nf += 1
        prev_tok = h
        has_tok = True
        # sub-tokens: split on '_', lower->Upper, Upper->Upper+lower, letter<->digit
        k = i
        while k < j:
            if buf[k] == 95:
                k += 1
                continue
            m = k + 1
            while m < j:
                a = _cls(buf[m - 1])
                b = _cls(buf[m])
                if b == 0:
                    break
                if (a == 1 and b == 2) or (a == 3) != (b == 3):
                    break
                if a == 2 and b == 2 and m + 1 < j and _cls(buf[m + 1]) == 1:
                    break
                m += 1
            hs = _fnv_lower(buf, k, m, salt)
            feats[nf] = mix64(hs ^ _NS_SUB)
            nf += 1
            if has_sub:
                feats[nf] = mix64(prev_sub * _U(31) + hs + _NS_SUB2)
                nf += 1
            prev_sub = hs
            has_sub = True
            k = m
        i = j
    b = np.sort(feats[:nf] % _U(n_buckets)).astype(np.int64)
    # run-length encode the sorted buckets
    nu = 0
    for t in range(nf):
        if t == 0 or b[t] != b[t - 1]:
            nu += 1
    idx = np.empty(nu, np.int64)
    cnt = np.zeros(nu, np.int64)
    u = -1
    for t in range(nf):
        if t == 0 or b[t] != b[t - 1]:
            u += 1
            idx[u] = b[t]
        cnt[u] += 1
    return idx, cnt


@numba.njit(inline="always")
def _project_add(out_row, bucket, w, seed, dim):
    # Row `bucket` of the implicit projection R: dim random signs, 64 per mixed hash.
    base = mix64(_U(bucket) * _U(0xD6E8FEB86659FD93) + mix64(_U(seed) ^ _U(0xA5A5A5A5)))
    for blk in range((dim + 63) // 64):
        bits = mix64(base + _U(blk) * _U(0x9E3779B97F4A7C15))
        for t in range(min(64, dim - 64 * blk)):
            out_row[64 * blk + t] += w * (np.float32(((bits >> _U(t)) & _U(1)) * _U(2)) - np.float32(1.0))


@numba.njit(parallel=True, cache=True)
def _embed_batch(buf, offs, seed, n_buckets, dim, out, empty):
    for r in numba.prange(offs.shape[0] - 1):
        idx, cnt = _doc_features(buf, offs[r], offs[r + 1], seed, n_buckets)
        empty[r] = idx.shape[0] == 0
        for t in range(idx.shape[0]):
            _project_add(out[r], idx[t], np.float32(1.0 + math.log(cnt[t])), seed, dim)


@numba.njit(cache=True)
def _projection_rows(buckets, seed, dim):
    """Explicit rows of the implicit projection (for tests and documentation)."""
    out = np.zeros((buckets.shape[0], dim), np.float32)
    for r in range(buckets.shape[0]):
        _project_add(out[r], buckets[r], np.float32(1.0), seed, dim)
    return out


def _encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    enc = [t.encode("utf-8", "surrogatepass") for t in texts]
    offs = np.zeros(len(enc) + 1, np.int64)
    np.cumsum([len(e) for e in enc], out=offs[1:])
    return np.frombuffer(b"".join(enc), np.uint8), offs


def tokenize(text: str) -> tuple[list[str], list[str]]:
    """(tokens, sub-tokens) as `hash_embed` sees them; a readable reference, not fast."""
    import re

    toks = [t.lower() for t in re.findall(r"[A-Za-z0-9_\x80-\U0010ffff]+", text)]
    subs: list[str] = []
    for t in re.findall(r"[A-Za-z0-9_\x80-\U0010ffff]+", text):
        subs += [s.lower() for s in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z\x80-\U0010ffff]+|[0-9]+", t)]
    return toks, subs


def hash_features(texts: Sequence[str], *, seed: int = 0, n_buckets: int = 2**20) -> sp.csr_matrix:
    """Sparse (n, n_buckets) float32 CSR of 1+log(tf) over hashed token features.

    Features: unigrams and bigrams of lowercased identifier tokens (runs of
    letters/digits/'_'/non-ASCII) and of their sub-tokens (split at '_', camelCase,
    and letter/digit boundaries), hashed with a seeded FNV-1a/splitmix64 hash that is
    stable across processes and platforms (never Python's salted `hash`).
    """
    buf, offs = _encode(texts)
    indptr = [0]
    ind: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for r in range(len(texts)):
        idx, cnt = _doc_features(buf, offs[r], offs[r + 1], seed, n_buckets)
        ind.append(idx)
        val.append((1.0 + np.log(cnt)).astype(np.float32))
        indptr.append(indptr[-1] + len(idx))
    return sp.csr_matrix(
        (
            np.concatenate(val + [np.zeros(0, np.float32)]),
            np.concatenate(ind + [np.zeros(0, np.int64)]),
            np.asarray(indptr),
        ),
        shape=(len(texts), n_buckets),
    )


def hash_embed(
    texts: Sequence[str], dim: int, *, seed: int = 0, n_buckets: int = 2**20, batch: int = 4096
) -> np.ndarray:
    """Deterministic unit-norm float32 embeddings (n, dim) of texts, no model needed.

    Equals `normalize(hash_features(texts) @ R)`, where R (n_buckets x dim) is a
    seeded random ±1 matrix that is never stored: each used row is regenerated from a
    hash of its bucket, 64 signs per hash, so memory is O(batch) at any dim. Rows with
    no tokens get a unit vector drawn from (seed, text). Same inputs -> same bytes in
    every process.
    """
    n = len(texts)
    out = np.zeros((n, dim), np.float32)
    for s in range(0, n, batch):
        chunk = texts[s : s + batch]
        buf, offs = _encode(chunk)
        empty = np.zeros(len(chunk), np.bool_)
        run_parallel(_embed_batch, buf, offs, seed, n_buckets, dim, out[s : s + len(chunk)], empty)
        for r in np.flatnonzero(empty):
            # Derive from the text, not the row, so an input's vector never depends on
            # its position or on the batch size.
            key = hashlib.blake2b(
                chunk[r].encode("utf-8", "surrogatepass"),
                digest_size=8,
                key=int(seed).to_bytes(8, "little", signed=True),
            ).digest()
            out[s + r] = np.random.default_rng(int.from_bytes(key, "little")).standard_normal(dim)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out
