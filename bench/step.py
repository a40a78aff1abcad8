"""Wall time of one two-tower training step on CPU with each negative sampler.

    python -m bench.step --json                      # N = 1M, batch 256, k = 64

The model: token-bag towers, `nn.EmbeddingBag(2**18, 128, mode="mean", sparse=True)`
-> `Linear(128, dim)` -> L2-normalise, one per side, fixed temperature, SGD on the
(sparse) embedding gradients and Adam on the linear layers (a dense Adam step over two
2^18 x 128 tables, or SparseAdam, costs several times the rest of the step on CPU and
would hide the sampler's cost).

The data (synthetic, deterministic from --seed): target y has 16 hashed token ids, 8
from the vocabulary of its topic (N/500 topics of 64 tokens each) and 8 of its own; a
query for positive y is 6 of y's tokens plus 2 random ones. Positives are uniform.
Before anything is timed the model is trained --pretrain steps with in-batch negatives
(so the index is built from a model that has learned something, as it would be mid
training), then all N targets are encoded in chunks (`encode_all_s`: the full
re-encode StaleTopK pays every refresh and BruteForceSampler every step) and a
TreeIndex is built over them (`build_s`).

One training step = encode the batch's queries, get negatives from the sampler under
test, encode positives + negatives (B * (k + 1) bags) with the target tower,
`sampled_softmax_loss(log_q=...)`, backward, optimizer step. Every sampler run starts
from the same model state and sees the same batches.

sampling_ms is what the step spends for the sampler, blocking: the sample() call
itself; with prefetch, the wait in result() plus the next batch's no-grad query
encode and submit() (see below); the cache update for NegativeCache; the amortised
refresh for StaleTopK (re-encode + rebuild every --refresh steps) and the per-step
full re-encode for BruteForceSampler (measured once as encode_all_s; the sampling
itself runs on the vectors encoded once, since re-encoding 1M targets every step
would take the whole run). rest_ms = step_ms - sampling_ms.

Cores: by default the step's torch work gets all cores but one and the tree sampler's
numba kernels one thread (`--torch-threads`, `--sampler-threads`). That models the
loop treeidx is for: the encoder runs on an accelerator, the sampler on host cores the
step does not use. Every sampler runs under the same setting, so the references
(in-batch, uniform) are measured with the same torch threads. `--torch-threads 0
--sampler-threads 0` lets both use every core (they then compete for them).

Prefetch: a real loop has the next batch from its data loader, so right after step
t's negatives are known, step t+1's queries are encoded with torch.no_grad by the
current query tower (parameters before step t's update: one step stale for the
proposal only; log_q is the exact log-probability under the proposal actually used,
and the loss uses the fresh queries with gradients) and submitted; the sampling runs
on treeidx's worker thread while this thread does step t's forward/backward.
"""

from __future__ import annotations

import copy
import os
import resource
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench._common import base_parser, emit, log, machine
from bench.sample import exact_log_softmax, tv_importance
from treeidx import SoftmaxSampler, TreeIndex
from treeidx.torch import (
    BruteForceSampler,
    InBatch,
    NegativeCache,
    StaleTopK,
    TreeNegativeSampler,
    UniformSampler,
    sampled_softmax_loss,
)

VOCAB = 1 << 18
EMB = 128
TOKENS = 16  # per target
TOPIC_TOKENS = 8  # of them from the topic vocabulary
TOPIC_VOCAB = 64
Q_KEEP, Q_NOISE = 6, 2

ALL_SAMPLERS = (
    "inbatch",
    "uniform",
    "stale_topk",
    "negcache",
    "brute",
    "tree_approx_prefetch",
    "tree_approx_noprefetch",
    "tree_exact_prefetch",
    "tree_exact_noprefetch",
    "tree_approx_batched_prefetch",
)


# ------------------------------------------------------------------------------- data


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over uint64."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def target_tokens(n: int, seed: int) -> torch.Tensor:
    """(n, 16) int64 token ids: 8 from the target's topic vocabulary, 8 its own."""
    n_topics = max(1, n // 500)
    y = np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x100000001)
    topic = _mix(y) % np.uint64(n_topics)
    j = np.arange(TOKENS, dtype=np.uint64)
    h = _mix(y[:, None] * np.uint64(97) + j[None, :] + np.uint64(1))
    word = h % np.uint64(TOPIC_VOCAB)  # which of the topic's words
    topic_tok = _mix(topic[:, None] * np.uint64(TOPIC_VOCAB) + word + np.uint64(7 << 40))
    tok = np.where(j[None, :] < TOPIC_TOKENS, topic_tok, h >> np.uint64(8)) % np.uint64(VOCAB)
    return torch.from_numpy(tok.astype(np.int64))


def make_batch(tokens: torch.Tensor, batch: int, seed: int, step: int):
    """Positives (B,) and their queries' tokens (B, 8) for one step (deterministic)."""
    rng = np.random.default_rng([seed, step, 0x5EED])
    n = tokens.shape[0]
    pos = rng.integers(0, n, batch)
    keep = np.argsort(rng.random((batch, TOKENS)), axis=1)[:, :Q_KEEP]
    q = np.concatenate([np.take_along_axis(tokens[pos].numpy(), keep, 1), rng.integers(0, VOCAB, (batch, Q_NOISE))], 1)
    return torch.from_numpy(q), torch.from_numpy(pos)


# ------------------------------------------------------------------------------ model


class Tower(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.emb = nn.EmbeddingBag(VOCAB, EMB, mode="mean", sparse=True)
        self.proj = nn.Linear(EMB, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.emb(tokens)), dim=-1)


class TwoTower(nn.Module):
    def __init__(self, dim: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.query = Tower(dim)
        self.target = Tower(dim)


def optimizers(model: TwoTower, lr: float, emb_lr: float = 200.0):
    sparse = [model.query.emb.weight, model.target.emb.weight]
    dense = [p for n, p in model.named_parameters() if ".emb." not in n]
    # sparse SGD on the tables (SparseAdam costs ~4x the whole backward here), Adam on the rest
    # (a mean bag's rows get 1/16 of the gradient: the tables need a large SGD step)
    return [torch.optim.SGD(sparse, lr=emb_lr), torch.optim.Adam(dense, lr=lr)]


@torch.no_grad()
def encode_all(tower: Tower, tokens: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    out = torch.empty((tokens.shape[0], tower.proj.out_features))
    for lo in range(0, tokens.shape[0], chunk):
        out[lo : lo + chunk] = tower(tokens[lo : lo + chunk])
    return out


def _cpu_seconds() -> float:
    """CPU seconds used by this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def tensor_bytes(*ts) -> int:
    return int(sum(t.numel() * t.element_size() for t in ts))


# ------------------------------------------------------------------------------ run


def run_sampler(name, model0, tokens, vectors, index, a, warm, max_timed, quiet):
    """Train `warm` + timed steps with one sampler; returns per-step timings and memory."""
    model = copy.deepcopy(model0)
    opts = optimizers(model, a.lr, a.emb_lr)
    n = tokens.shape[0]
    T = a.temperature
    prefetch = name.endswith("_prefetch")
    info: dict = {}
    extra_ms = 0.0  # amortised cost not paid inside the timed steps (added to sampling)
    on_targets = None  # NegativeCache: enqueue the step's encoded targets
    in_batch = name in ("inbatch", "stale_topk")
    if name == "inbatch":
        sampler, memory, device_mem = InBatch(), 0, 0
    elif name == "uniform":
        sampler = UniformSampler(n, k=a.k, seed=a.seed)
        memory, device_mem = sampler.ids.nbytes, 0
    elif name == "stale_topk":
        refresh_s: list = []

        def encode_targets():
            return encode_all(model.target, tokens)

        sampler = StaleTopK(encode_targets, np.arange(n), k=a.k, refresh_every=a.refresh)
        orig = sampler.refresh

        def timed_refresh():
            t = time.perf_counter()
            orig()
            refresh_s.append(time.perf_counter() - t)

        sampler.refresh = timed_refresh
        memory = device_mem = None  # after the first refresh
    elif name == "negcache":
        c = min(a.cache, n)
        sampler = NegativeCache(vectors[:c], np.arange(c), k=a.k, temperature=T, cache_size=c, seed=a.seed)
        memory = sampler.nbytes
        device_mem = memory  # it lives wherever the training runs

        def on_targets(ids, vecs):
            sampler.update(vecs, ids)
    elif name == "brute":
        sampler = BruteForceSampler(vectors, k=a.k, temperature=T, seed=a.seed)
        memory = tensor_bytes(vectors) + sampler.ids.numel() * 8
        device_mem = memory
        extra_ms = info["reencode_ms_per_step"] = a.encode_all_s * 1e3
    else:
        mode = name.split("_")[1]
        batched = "_batched" in name
        budget = a.batched_budget if batched and a.batched_budget is not None else a.budget
        inner = SoftmaxSampler(index, temperature=T, mode=mode, budget=budget, batched=batched)
        sampler = TreeNegativeSampler(
            inner, k=a.k, temperature=T, mode=mode, prefetch=True, seed=a.seed, threads=a.sampler_threads or None
        )
        memory, device_mem = index.nbytes, 0
        info["budget"] = inner._budget()
        extra_ms = info["refresh_ms_per_step"] = (a.encode_all_s + a.build_s) * 1e3 / a.refresh

    steps, rows = warm + max_timed, []
    batches = [make_batch(tokens, a.batch, a.seed + 1, s) for s in range(steps + 1)]
    if prefetch:
        with torch.no_grad():
            sampler.submit(model.query(batches[0][0]), batches[0][1])
    ips, tvs = [], []
    t_run = time.perf_counter()
    cpu_run = _cpu_seconds()
    for s in range(steps):
        qtok, pos = batches[s]
        t0 = time.perf_counter()
        if prefetch:
            negs = sampler.result()
            nq, npos = batches[s + 1]
            with torch.no_grad():
                sampler.submit(model.query(nq), npos)
            t_samp = time.perf_counter() - t0
            q = model.query(qtok)
        else:
            q = model.query(qtok)
            t1 = time.perf_counter()
            negs = sampler.sample(q.detach(), pos)
            t_samp = time.perf_counter() - t1
        k = negs.ids.shape[1]
        ids = torch.cat([pos[:, None], negs.ids], 1)  # (B, k + 1)
        tv = model.target(tokens[ids.reshape(-1)]).view(ids.shape[0], k + 1, -1)
        loss = sampled_softmax_loss(
            q,
            tv[:, 0],
            tv[:, 1:] if k else None,
            log_q=negs.log_q if k else None,
            temperature=T,
            in_batch_negatives=in_batch,
            pos_ids=pos,
            neg_ids=negs.ids if k else None,
        )
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        if on_targets is not None:
            t2 = time.perf_counter()
            on_targets(ids.reshape(-1), tv.detach().reshape(-1, tv.shape[-1]))
            t_samp += time.perf_counter() - t2
        t_step = time.perf_counter() - t0
        rows.append((t_step, t_samp, float(loss.detach())))
        if negs.result is not None:
            ips.append(float(negs.result.inner_products.mean()))
            tvs.append(float(negs.result.tv_bound.mean()))
        if s == 0 and rows[0][0] > a.sampler_budget_s / 8:
            warm = 1  # a very slow sampler: one warm-up step is enough
        if s == warm - 1:
            # slow samplers: fewer timed steps, so the whole run stays within minutes
            per = max(r[0] for r in rows[1:] or rows)
            steps = warm + max(a.min_steps, min(max_timed, int(a.sampler_budget_s / max(per, 1e-3))))
        if s + 1 >= steps:
            break
    if prefetch:
        sampler.close()
    if name == "stale_topk":
        memory = sampler.nbytes
        device_mem = 0
        info["backend"] = sampler.backend
        info["refresh_s"] = refresh_s[0]
        extra_ms = info["refresh_ms_per_step"] = refresh_s[0] * 1e3 / a.refresh
    timed = np.array(rows[warm:])
    step_ms = float(np.median(timed[:, 0]) * 1e3) + extra_ms
    samp_ms = float(np.median(timed[:, 1]) * 1e3) + extra_ms
    out = dict(
        step_ms=step_ms,
        sampling_ms=samp_ms,
        rest_ms=step_ms - samp_ms,
        step_ms_mean=float(timed[:, 0].mean() * 1e3) + extra_ms,
        timed_steps=int(timed.shape[0]),
        warmup_steps=warm,
        memory_bytes=int(memory),
        device_bytes_on_accelerator=int(device_mem),
        final_loss=float(timed[-1, 2]),
        wall_s=time.perf_counter() - t_run,
        cores_busy=(_cpu_seconds() - cpu_run) / (time.perf_counter() - t_run),
        torch_threads=torch.get_num_threads(),
        **info,
    )
    if ips:
        out["inner_products_per_query"] = float(np.mean(ips))
        out["tv_bound_mean"] = float(np.mean(tvs))
    log(
        f"{name:24s} step {step_ms:8.1f} ms  sampling {samp_ms:8.1f} ms  "
        f"({out['timed_steps']} timed, {out['wall_s']:.1f} s)",
        quiet,
    )
    return out


def approx_quality(
    model, tokens, vectors, index, a, n_queries: int = 8, draws: int = 20000, batched: bool = False
) -> dict:
    """How far approx mode's proposal is from the exact softmax for this model's queries.

    TV(P, Q) = E_{y~Q}[max(0, 1 - P(y)/Q(y))]: approx mode returns the exact log Q of
    each draw, and P comes from one exact pass over all targets, so this estimate is
    unbiased (standard error <= 0.5 / sqrt(draws)) with no histogram noise floor.
    """
    qtok, _ = make_batch(tokens, n_queries, a.seed + 2, 0)
    with torch.no_grad():
        q = model.query(qtok).numpy()
    log_p = np.stack(exact_log_softmax(q, vectors.numpy(), 1.0 / a.temperature))
    budget = a.batched_budget if batched and a.batched_budget is not None else a.budget
    sampler = SoftmaxSampler(index, temperature=a.temperature, mode="approx", budget=budget, batched=batched)
    r = sampler.sample(q, draws, seed=a.seed)
    tv_is, tv_is_se = tv_importance(np.take_along_axis(log_p, r.ids, 1), r.log_q)
    perplexity = np.exp(-(np.exp(log_p) * log_p).sum(axis=1))
    return dict(
        queries=n_queries,
        draws=draws,
        tv_is=tv_is,
        tv_is_se=tv_is_se,
        tv_bound_mean=float(r.tv_bound.mean()),
        median_perplexity=float(np.median(perplexity)),
        perplexity_share_of_n=float(np.median(perplexity) / vectors.shape[0]),
    )


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0], datasets=("tokens",))
    p.set_defaults(n=1_000_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per sampler (at most)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-steps", type=int, default=2, help="timed steps for the slow samplers")
    p.add_argument(
        "--sampler-budget-s",
        type=float,
        default=25.0,
        help="cap on one sampler's timed wall time (slow ones get fewer steps)",
    )
    p.add_argument("--samplers", default=",".join(ALL_SAMPLERS))
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument(
        "--mode",
        choices=("exact", "approx"),
        default="approx",
        help="the tree mode the 10%% target is checked on (both are reported)",
    )
    p.add_argument("--budget", type=int, default=None, help="tree approx budget (default: treeidx's)")
    p.add_argument(
        "--batched-budget",
        type=int,
        default=None,
        help="tree_approx_batched's budget (default: --budget, else treeidx's)",
    )
    p.add_argument(
        "--refresh",
        type=int,
        default=100,
        help="StaleTopK refresh period; tree samplers are charged a re-encode + rebuild every this many steps too",
    )
    p.add_argument("--cache", type=int, default=65536, help="NegativeCache size")
    p.add_argument("--pretrain", type=int, default=300, help="in-batch steps before timing")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam, linear layers")
    p.add_argument("--emb-lr", type=float, default=200.0, help="SGD, embedding tables")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=-1,
        help="torch threads for the step (-1: all cores but one; 0: torch's default)",
    )
    p.add_argument(
        "--sampler-threads", type=int, default=1, help="numba threads of the tree sampler (0: numba's default)"
    )
    a = p.parse_args(argv)
    quiet = a.json
    samplers = [s for s in a.samplers.split(",") if s]
    bad = set(samplers) - set(ALL_SAMPLERS)
    if bad:
        p.error(f"unknown sampler(s) {sorted(bad)}; choose from {ALL_SAMPLERS}")
    # machine() asks numba for its thread count, which starts numba's OpenMP pool and
    # with it resets this thread's OpenMP (hence torch's) count: read it first.
    host = machine()
    if a.torch_threads < 0:
        a.torch_threads = max(1, (os.cpu_count() or 2) - 1)
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    res: dict = dict(
        benchmark="step",
        n=a.n,
        dim=a.dim,
        batch=a.batch,
        k=a.k,
        temperature=a.temperature,
        mode=a.mode,
        refresh_every=a.refresh,
        cache_size=a.cache,
        pretrain_steps=a.pretrain,
        model=f"2 x EmbeddingBag({VOCAB}, {EMB}, mean, sparse) -> Linear({EMB}, {a.dim}) "
        "-> L2 norm (no bias); sparse SGD (tables) + Adam (linear)",
        torch_threads=torch.get_num_threads(),
        sampler_threads=a.sampler_threads or None,
        machine=host,
    )
    t = time.perf_counter()
    tokens = target_tokens(a.n, a.seed)
    res["data_s"] = time.perf_counter() - t
    model = TwoTower(a.dim, a.seed)
    opts = optimizers(model, a.lr, a.emb_lr)
    t = time.perf_counter()
    for s in range(a.pretrain):
        qtok, pos = make_batch(tokens, a.batch, a.seed, s)
        q, tv = model.query(qtok), model.target(tokens[pos])
        loss = sampled_softmax_loss(q, tv, None, temperature=a.temperature, pos_ids=pos)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
    res["pretrain_s"], res["pretrain_loss"] = time.perf_counter() - t, float(loss.detach()) if a.pretrain else None
    log(f"pretrain {a.pretrain} steps: {res['pretrain_s']:.1f} s", quiet)
    encode_all(model.target, tokens[:4096])
    t = time.perf_counter()
    vectors = encode_all(model.target, tokens)
    a.encode_all_s = res["encode_all_s"] = time.perf_counter() - t
    log(f"encode all {a.n}: {a.encode_all_s:.2f} s", quiet)
    index = None
    if any(s.startswith("tree") for s in samplers):
        vx = vectors.numpy()
        warm_idx = TreeIndex.build(vx[:3000])  # compile the kernels outside the timings
        for m in ("exact", "approx"):
            SoftmaxSampler(warm_idx, temperature=a.temperature, mode=m).sample(vx[:4], 4, seed=0)
            SoftmaxSampler(warm_idx, temperature=a.temperature, mode=m, batched=True).sample(vx[:4], 4, seed=0)
        t = time.perf_counter()
        index = TreeIndex.build(vx, seed=a.seed)
        a.build_s = res["build_s"] = time.perf_counter() - t
        res["index_bytes"] = index.nbytes
        log(f"tree build: {a.build_s:.1f} s, {index.nbytes / 2**20:.0f} MiB", quiet)
        res["approx_quality"] = approx_quality(model, tokens, vectors, index, a)
        if any("_batched" in name for name in samplers):
            res["approx_batched_quality"] = approx_quality(model, tokens, vectors, index, a, batched=True)
        log(
            f"approx mode: TV to the exact softmax {res['approx_quality']['tv_is']:.3f} "
            f"(certified bound {res['approx_quality']['tv_bound_mean']:.3f})",
            quiet,
        )
    per: dict = {}
    for name in samplers:
        per[name] = run_sampler(name, model, tokens, vectors, index, a, a.warmup, a.steps, quiet)
    # Two references: in-batch (no sampled negatives at all: a different, much cheaper
    # step) and uniform (the same step, B*(k+1) targets encoded, negatives ~free): what a
    # sampler "adds to the step" is its step time over uniform's.
    for ref in ("inbatch", "uniform"):
        if ref not in per:
            continue
        base = per[ref]["step_ms"]
        for v in per.values():
            v[f"added_vs_{ref}_pct"] = 100.0 * (v["step_ms"] - base) / base
            v[f"added_vs_{ref}_excl_refresh_pct"] = (
                100.0 * (v["step_ms"] - v.get("refresh_ms_per_step", 0.0) - base) / base
            )
    pf, npf = per.get(f"tree_{a.mode}_prefetch"), per.get(f"tree_{a.mode}_noprefetch")
    if "uniform" in per and pf is not None:
        res["target"] = dict(
            sampler=f"tree_{a.mode}_prefetch",
            reference="uniform (same step, free negatives)",
            max_added_pct=10.0,
            added_pct=pf["added_vs_uniform_excl_refresh_pct"],
            met=bool(pf["added_vs_uniform_excl_refresh_pct"] <= 10.0),
            added_pct_incl_refresh=pf["added_vs_uniform_pct"],
            added_pct_without_prefetch=None if npf is None else npf["added_vs_uniform_excl_refresh_pct"],
        )
    res["samplers"] = per
    res["notes"] = (
        "medians over timed steps; sampling_ms = blocking time spent for the sampler "
        "incl. amortised refresh (stale_topk, tree: re-encode + rebuild every "
        "refresh_every steps) or per-step full re-encode (brute, measured once, not "
        "run every step); memory_bytes = host bytes the sampler holds; "
        "device_bytes_on_accelerator = what it would hold on a GPU (tree: none)"
    )
    emit(res, quiet)
    return res


if __name__ == "__main__":
    main()
