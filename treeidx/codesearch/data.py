"""The code-search training set: docstring queries against code targets, as hashed features.

Built from `treeidx.codesearch.corpus.mine_code_corpus()` (the installed Python sources):

* Targets: EVERY corpus item (function or class); target id = item id. Text = the
  item's `code` (source without its docstring), first `max_target_chars` characters.
* Queries: an item's docstring (first `max_query_chars` characters); its positive is
  the item itself. A docstring is dropped when it is
  - too short: fewer than `min_query_words` word tokens (runs of letters, digits,
    '_' or non-ASCII, as `treeidx.codesearch.corpus.tokenize` counts them), or
  - ambiguous: its normalised text (lowercased, whitespace runs collapsed, after the
    character cap; the features are lowercased anyway) occurs on more than one item,
    e.g. inherited "Return self." or a docstring copied into many model classes.
    Every copy is dropped, since no single positive would be right.
  The dropped items stay targets.
* Splits by module: a stable hash (BLAKE2b, never Python's salted `hash`) of the
  item's full dotted module name puts each module in train (8/10 of the hash range),
  validation (1/10) or test (1/10), so test queries come from modules never trained
  on; their positives are still in the index of all targets.
* Features: `treeidx.codesearch.corpus.hash_features` (1 + log tf of hashed token and sub-token
  unigrams and bigrams, one hash space for both sides) into `n_buckets` buckets.

The featurised dataset is cached as one .npz in the corpus cache directory, keyed by
the corpus cache key and every setting above, written atomically; a missing, stale or
damaged file is rebuilt. Defaults (2^18 buckets, 2,000 code characters) keep a full
target re-encode by the `treeidx.codesearch.encoder` towers well under a second on 2 CPU cores
(docs/training.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp

from .._progress import progress_bar
from .._validate import check_nonnegative_int, check_positive_int
from ..io import atomic_write
from .corpus import CodeItem, corpus_cache_key, default_cache_dir, hash_features, mine_code_corpus

__all__ = ["CodeSearchData", "SPLITS", "module_split"]

SPLITS = ("train", "val", "test")
# Bump when a rule above changes, so old caches are not reused.
_FORMAT = 1
_WORD = re.compile(r"[A-Za-z0-9_\x80-\U0010ffff]+")
_FEATURE_CHUNK = 8192  # texts per hash_features call (progress granularity)


def module_split(module: str) -> int:
    """0 (train), 1 (val) or 2 (test) for a dotted module name; stable across processes."""
    h = int.from_bytes(hashlib.blake2b(module.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    bucket = h % 10
    return 0 if bucket < 8 else (1 if bucket == 8 else 2)


@dataclass(frozen=True)
class _Settings:
    n_buckets: int
    max_target_chars: int
    max_query_chars: int
    min_query_words: int
    seed: int

    @classmethod
    def checked(
        cls, n_buckets: Any, max_target_chars: Any, max_query_chars: Any, min_query_words: Any, seed: Any
    ) -> _Settings:
        return cls(
            check_positive_int(n_buckets, "n_buckets"),
            check_positive_int(max_target_chars, "max_target_chars"),
            check_positive_int(max_query_chars, "max_query_chars"),
            check_positive_int(min_query_words, "min_query_words"),
            check_nonnegative_int(seed),
        )

    def as_dict(self) -> dict[str, int]:
        return dict(
            n_buckets=self.n_buckets,
            max_target_chars=self.max_target_chars,
            max_query_chars=self.max_query_chars,
            min_query_words=self.min_query_words,
            seed=self.seed,
        )

    def key(self, corpus_key: str) -> str:
        blob = json.dumps(
            [
                _FORMAT,
                corpus_key,
                self.n_buckets,
                self.max_target_chars,
                self.max_query_chars,
                self.min_query_words,
                self.seed,
            ]
        )
        return hashlib.blake2b(blob.encode(), digest_size=10).hexdigest()


@dataclass
class CodeSearchData:
    """Docstring → code retrieval data as sparse hashed features (module docstring).

    target_features: (n_targets, n_buckets) float32 CSR; row = target id.
    query_features:  (n_queries, n_buckets) float32 CSR; rows sorted by positive id.
    query_target:    (n_queries,) int64: the positive target id of each query row.
    query_split:     (n_queries,) int8: 0 train, 1 val, 2 test (`train`/`val`/`test`
                     give the query rows of a split).
    target_module:   (n_targets,) int32 index into `modules` (sorted dotted names).
    target_names:    qualified name of each target within its module.
    query_summaries: the first line of each query's docstring (for display).
    settings:        the feature settings; corpus_key: the corpus cache key.
    corpus:          which corpus: {"corpus": "installed"} or {"corpus": "pinned", ...the
                     `treeidx.codesearch.pinned.PinReport` of this machine}.
    """

    target_features: sp.csr_matrix
    query_features: sp.csr_matrix
    query_target: np.ndarray
    query_split: np.ndarray
    target_module: np.ndarray
    modules: list[str]
    target_names: list[str]
    query_summaries: list[str]
    settings: dict[str, int] = field(default_factory=dict)
    corpus_key: str = ""
    corpus: dict[str, Any] = field(default_factory=dict)  # "installed", or the pinned corpus's report

    # ------------------------------------------------------------------ accessors
    @property
    def n_targets(self) -> int:
        return int(self.target_features.shape[0])

    @property
    def n_queries(self) -> int:
        return int(self.query_features.shape[0])

    @property
    def n_buckets(self) -> int:
        return int(self.target_features.shape[1])

    def split(self, name: str) -> np.ndarray:
        """The query rows (sorted) of split `name` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {name!r}")
        return np.flatnonzero(self.query_split == SPLITS.index(name))

    @property
    def train(self) -> np.ndarray:
        return self.split("train")

    @property
    def val(self) -> np.ndarray:
        return self.split("val")

    @property
    def test(self) -> np.ndarray:
        return self.split("test")

    def target_name(self, target_id: int) -> str:
        """`module.qualname` of a target."""
        return f"{self.modules[self.target_module[target_id]]}.{self.target_names[target_id]}"

    def describe(self) -> dict[str, Any]:
        """Sizes and settings, JSON-serialisable."""
        return dict(
            n_targets=self.n_targets,
            n_queries=self.n_queries,
            **{f"n_{s}": int((self.query_split == i).sum()) for i, s in enumerate(SPLITS)},
            n_modules=len(self.modules),
            n_buckets=self.n_buckets,
            target_nnz_per_row=round(self.target_features.nnz / max(self.n_targets, 1), 1),
            query_nnz_per_row=round(self.query_features.nnz / max(self.n_queries, 1), 1),
            **{k: v for k, v in self.settings.items() if k != "n_buckets"},
            **({"corpus": self.corpus["corpus"]} if self.corpus else {}),
            **({"pinned_coverage": self.corpus["coverage"]} if "coverage" in self.corpus else {}),
        )

    def __repr__(self) -> str:
        d = self.describe()
        return (
            f"CodeSearchData(n_targets={d['n_targets']}, train={d['n_train']}, val={d['n_val']}, "
            f"test={d['n_test']}, n_buckets={d['n_buckets']})"
        )

    # ------------------------------------------------------------------ subsets
    def subset(self, max_targets: int) -> CodeSearchData:
        """At most `max_targets` targets, every remaining query keeping its positive.

        If the queries' positives fit, all of them are kept plus the first other
        targets in id order; otherwise a seeded pseudo-random `max_targets` of the
        queries (all splits alike) and exactly their positives. Ids are renumbered
        0..n-1 in their original order.
        """
        max_targets = check_positive_int(max_targets, "max_targets")
        if max_targets >= self.n_targets:
            return self
        pos = np.unique(self.query_target)
        if pos.size <= max_targets:
            others = np.setdiff1d(np.arange(self.n_targets), pos, assume_unique=True)
            keep = np.union1d(pos, others[: max_targets - pos.size])
        else:
            keep = np.sort(np.random.default_rng([0x5EB, max_targets]).choice(pos, max_targets, replace=False))
        new_id = np.full(self.n_targets, -1, np.int64)
        new_id[keep] = np.arange(keep.size)
        rows = np.flatnonzero(new_id[self.query_target] >= 0)
        return replace(
            self,
            target_features=self.target_features[keep],
            query_features=self.query_features[rows],
            query_target=new_id[self.query_target[rows]],
            query_split=self.query_split[rows],
            target_module=self.target_module[keep],
            target_names=[self.target_names[i] for i in keep],
            query_summaries=[self.query_summaries[i] for i in rows],
        )

    # ------------------------------------------------------------------ building
    @classmethod
    def load(
        cls,
        *,
        roots: Sequence[str] | None = None,
        max_files: int | None = None,
        cache_dir: str | None = None,
        progress: bool = False,
        max_targets: int | None = None,
        n_buckets: int = 2**18,
        max_target_chars: int = 2000,
        max_query_chars: int = 1000,
        min_query_words: int = 3,
        seed: int = 0,
        corpus: str = "installed",
    ) -> CodeSearchData:
        """The dataset of the corpus under `roots` (default: stdlib + site-packages).

        corpus: "installed" (every module mined; depends on what is installed) or
        "pinned" (`treeidx.codesearch.pinned`: the shipped manifest's modules only, the
        same targets on every machine with its versions; this machine's coverage is in
        `.corpus` and `describe()`).

        roots / max_files restrict mining (as in `mine_code_corpus`; tests use a tiny
        tree). The featurised result is cached in `cache_dir` (default: the corpus
        cache); `progress` shows tqdm bars while mining and featurising.
        max_targets: an optional subset (see `subset`), applied after the cache.
        """
        s = _Settings.checked(n_buckets, max_target_chars, max_query_chars, min_query_words, seed)
        if corpus not in ("installed", "pinned"):
            raise ValueError(f"corpus: expected 'installed' or 'pinned', got {corpus!r}")
        if corpus == "pinned" and (roots is not None or max_files is not None):
            raise ValueError("corpus='pinned' mines the default roots; roots/max_files need corpus='installed'")
        cache_dir = cache_dir or default_cache_dir()
        corpus_key = corpus_cache_key(roots, max_files)
        if corpus == "pinned":
            from .pinned import load_manifest, manifest_digest, pin

            manifest = load_manifest()
            corpus_key += "-pinned-" + manifest_digest(manifest)
        path = os.path.join(cache_dir, f"codesearch-{s.key(corpus_key)}.npz")
        data = _read(path, corpus_key, s)
        if data is None:
            items = mine_code_corpus(roots, cache_dir=cache_dir, progress=progress, max_files=max_files)
            info: dict[str, Any] = {"corpus": corpus}
            if corpus == "pinned":
                items, report = pin(items, manifest)
                if not items:
                    raise ValueError(report.describe())
                info.update(report.as_dict())
            data = cls.from_items(items, progress=progress, **s.as_dict())
            data.corpus_key = corpus_key
            data.corpus = info
            os.makedirs(cache_dir, exist_ok=True)
            _write(path, data)
        return data if max_targets is None else data.subset(max_targets)

    def corpus_report(self) -> str:
        """One line on which corpus this is (the pinned corpus's coverage here)."""
        if self.corpus.get("corpus") == "pinned":
            from .pinned import PinReport

            return PinReport(**{k: v for k, v in self.corpus.items() if k not in ("corpus", "coverage")}).describe()
        return "installed corpus: every function and class of this interpreter's stdlib and site-packages"

    @classmethod
    def from_items(
        cls,
        items: Sequence[CodeItem],
        *,
        progress: bool = False,
        n_buckets: int = 2**18,
        max_target_chars: int = 2000,
        max_query_chars: int = 1000,
        min_query_words: int = 3,
        seed: int = 0,
    ) -> CodeSearchData:
        """Build from corpus items (ids must be 0..n-1 in order); no cache involved."""
        if [it.id for it in items] != list(range(len(items))):
            raise ValueError("items: expected ids 0..n-1 in order (as mine_code_corpus returns them)")
        if not items:
            raise ValueError("items: empty corpus")
        s = _Settings.checked(n_buckets, max_target_chars, max_query_chars, min_query_words, seed)
        qids, qtexts = _select_queries(items, s.max_query_chars, s.min_query_words)
        modules = sorted({it.module for it in items})
        mod_index = {m: i for i, m in enumerate(modules)}
        target_module = np.array([mod_index[it.module] for it in items], np.int32)
        split_of_module = np.array([module_split(m) for m in modules], np.int8)
        return cls(
            target_features=_featurise(
                [it.code[: s.max_target_chars] for it in items], s, progress, "featurise targets"
            ),
            query_features=_featurise(qtexts, s, progress, "featurise queries"),
            query_target=qids,
            query_split=split_of_module[target_module[qids]],
            target_module=target_module,
            modules=modules,
            target_names=[it.qualname for it in items],
            query_summaries=[_summary(items[i].docstring) for i in qids],
            settings=s.as_dict(),
        )


# ---------------------------------------------------------------------------- rules


def _select_queries(items: Sequence[CodeItem], max_chars: int, min_words: int) -> tuple[np.ndarray, list[str]]:
    """Ids and texts of the items whose docstring makes a usable, unambiguous query."""
    cand: list[tuple[int, str, str]] = []
    for it in items:
        text = it.docstring.strip()[:max_chars]
        if len(_WORD.findall(text)) >= min_words:
            cand.append((it.id, text, " ".join(text.lower().split())))
    count: dict[str, int] = {}
    for _, _, norm in cand:
        count[norm] = count.get(norm, 0) + 1
    kept = [(i, text) for i, text, norm in cand if count[norm] == 1]
    return np.array([i for i, _ in kept], np.int64), [t for _, t in kept]


def _summary(doc: str) -> str:
    lines = doc.strip().splitlines()
    return lines[0].strip()[:200] if lines else ""


def _featurise(texts: list[str], s: _Settings, progress: bool, desc: str) -> sp.csr_matrix:
    bar = progress_bar(progress, total=len(texts), desc=desc, unit="text")
    parts = []
    for lo in range(0, len(texts), _FEATURE_CHUNK):
        chunk = texts[lo : lo + _FEATURE_CHUNK]
        parts.append(hash_features(chunk, seed=s.seed, n_buckets=s.n_buckets))
        bar.update(len(chunk))
    bar.close()
    if not parts:
        return sp.csr_matrix((0, s.n_buckets), dtype=np.float32)
    return sp.vstack(parts, format="csr", dtype=np.float32)


# ---------------------------------------------------------------------------- cache


def _pack(strings: list[str]) -> np.ndarray:
    """Newline-joined UTF-8 bytes (none of the stored strings contains a newline)."""
    return np.frombuffer("\n".join(strings).encode("utf-8", "surrogatepass"), np.uint8)


def _unpack(a: np.ndarray, n: int) -> list[str]:
    out = bytes(a).decode("utf-8", "surrogatepass").split("\n") if n else []
    if len(out) != n:
        raise ValueError(f"expected {n} strings, got {len(out)}")
    return out


def _write(path: str, d: CodeSearchData) -> None:
    meta = dict(
        format=_FORMAT,
        corpus_key=d.corpus_key,
        settings=d.settings,
        n_targets=d.n_targets,
        n_queries=d.n_queries,
        n_modules=len(d.modules),
        corpus=d.corpus,
    )
    arrays = {
        "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
        "query_target": d.query_target,
        "query_split": d.query_split,
        "target_module": d.target_module,
        "modules": _pack(d.modules),
        "target_names": _pack(d.target_names),
        "query_summaries": _pack(d.query_summaries),
    }
    for side, m in (("t", d.target_features), ("q", d.query_features)):
        arrays.update({f"{side}_indptr": m.indptr, f"{side}_indices": m.indices, f"{side}_data": m.data})
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def _read(path: str, corpus_key: str, s: _Settings) -> CodeSearchData | None:
    """The cached dataset, or None when missing, stale or damaged in any way."""
    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        meta = json.loads(bytes(a["meta"]).decode())
        settings = s.as_dict()
        if meta["format"] != _FORMAT or meta["corpus_key"] != corpus_key or meta["settings"] != settings:
            return None
        nt, nq = int(meta["n_targets"]), int(meta["n_queries"])
        t = _csr(a, "t", nt, s.n_buckets)
        q = _csr(a, "q", nq, s.n_buckets)
        modules = _unpack(a["modules"], int(meta["n_modules"]))
        qt, qs, tm = a["query_target"], a["query_split"], a["target_module"]
        if (
            qt.shape != (nq,)
            or qs.shape != (nq,)
            or tm.shape != (nt,)
            or (nq and (qt.min() < 0 or qt.max() >= nt or qs.min() < 0 or qs.max() > 2))
            or (nt and (tm.min() < 0 or tm.max() >= len(modules)))
        ):
            return None
        return CodeSearchData(
            target_features=t,
            query_features=q,
            query_target=qt.astype(np.int64),
            query_split=qs.astype(np.int8),
            target_module=tm.astype(np.int32),
            modules=modules,
            target_names=_unpack(a["target_names"], nt),
            query_summaries=_unpack(a["query_summaries"], nq),
            settings=settings,
            corpus_key=corpus_key,
            corpus=meta.get("corpus", {}),
        )
    except Exception:  # missing, truncated zip, bad CRC, bad JSON, wrong shapes: rebuild
        return None


def _csr(a: dict[str, np.ndarray], side: str, n: int, n_buckets: int) -> sp.csr_matrix:
    indptr, indices, data = a[f"{side}_indptr"], a[f"{side}_indices"], a[f"{side}_data"]
    m = sp.csr_matrix((data, indices, indptr), shape=(n, n_buckets))
    m.check_format(full_check=True)  # every pointer and index in range, or ValueError
    return m
