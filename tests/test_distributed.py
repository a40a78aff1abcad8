"""treeidx.distributed: an index sharded over 2 and 3 local gloo processes.

Each spawned world runs many checks (a spawn costs seconds): the sharded sampler's
draws against the brute-force softmax over the union (the exact binomial goodness-of-fit
test of tests/_oracles.py), log Z inside the certified interval, search against brute
force, edits landing on the owning shard, refused bad batches, save/load, the torch
sampler on top, and a failing rank that must not leave the others waiting.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
mp = pytest.importorskip("torch.multiprocessing")

from treeidx import DynamicIndex, SoftmaxSampler, TreeIndex  # noqa: E402
from treeidx.distributed import ShardedSampler, ShardError, shard_of  # noqa: E402

from ._oracles import ALPHA, assert_sampling_exact, assert_search_exact, binomial_gof_pvalue  # noqa: E402

N, D, TEMPERATURE = 3000, 8, 0.05
TIMEOUT = 60.0


def union_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, D)) / np.sqrt(D)).astype(np.float32)
    ids = np.arange(N, dtype=np.int64) * 5 - 777  # sorted, some negative
    return x, ids


def rank_queries(rank: int, nq: int):
    rng = np.random.default_rng(100 + rank)
    return (rng.standard_normal((nq, D)) / np.sqrt(D)).astype(np.float32)


def shard(x, ids, rank, world, seed=0):
    own = shard_of(ids, world) == rank
    return TreeIndex.build(x[own], ids[own], seed=seed)


def _init(rank: int, world: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT)
    )


def _worker(rank: int, world: int, init: str, out: str, scenario: str) -> None:
    _init(rank, world, init)
    try:
        result = SCENARIOS[scenario](rank, world, out)
    except BaseException:
        with open(os.path.join(out, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def spawn(world: int, scenario: str, tmp_path, monkeypatch) -> list:
    # one numba thread per process: the ranks share this machine's cores
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    init = f"file://{tmp_path}/rendezvous"
    try:
        mp.start_processes(_worker, args=(world, init, str(tmp_path), scenario), nprocs=world, start_method="spawn")
    except Exception:
        errors = sorted(tmp_path.glob("error*.txt"))
        raise AssertionError("\n".join(p.read_text() for p in errors) or "a rank failed") from None
    return [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(world)]


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Compile (and cache) the trial kernels once here, not in every spawned rank."""
    x, ids = union_data()
    SoftmaxSampler(TreeIndex.build(x[:500], ids[:500]), temperature=1.0).trials(x[:2], 3, seed=0)
    SoftmaxSampler(TreeIndex.build(x[:500], ids[:500]), temperature=1.0, mode="approx").trials(x[:2], 3, seed=0)


# ------------------------------------------------------------------------ scenarios


def expect_failure(fn, own_error, rank: int, failing: int) -> str:
    """fn must raise own_error on the failing rank and ShardError on the others."""
    with pytest.raises(own_error if rank == failing else ShardError) as e:
        fn()
    return str(e.value)


def sampling_and_search(rank: int, world: int, out: str) -> dict:
    x, ids = union_data()
    index = shard(x, ids, rank, world, seed=rank)
    beta = 1.0 / TEMPERATURE
    q = rank_queries(rank, 1 + rank)  # batch sizes differ by rank
    # exclusions that cross shards: the best-scoring ids of the union for the first query
    best = ids[np.argsort(-(x @ q[0]))[:40]]
    rows = [best] + [[] for _ in range(q.shape[0] - 1)]

    # exact, tree path on every shard
    s = ShardedSampler(index, temperature=TEMPERATURE, dense_fallback=None, timeout=TIMEOUT)
    assert_sampling_exact(s.sample, x, ids, q, beta, rows, seed=5 + rank, dense=False)
    # exact, rank 0's shard answers by its dense pass, the others by the tree
    mixed = ShardedSampler(index, temperature=TEMPERATURE, dense_fallback=1e-12 if rank == 0 else None)
    assert_sampling_exact(mixed.sample, x, ids, q, beta, rows, seed=7, dense=False)
    # the same seeds give the same draws
    a, b = s.sample(q, 50, seed=3), s.sample(q, 50, seed=3)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.log_q, b.log_q)

    # search: the brute-force top-k over the union
    assert_search_exact(s.search, x, ids, q, 10, rows)
    assert_search_exact(s.search, x, ids, q, 1, [[]] * q.shape[0])

    # approx mode with a budget that opens every leaf: the mixture is the softmax itself
    full = ShardedSampler(index, temperature=TEMPERATURE, mode="approx", budget=10**6, tolerance=0.0)
    r = full.sample(q, 500, exclude=rows, seed=2)
    sc = beta * (q.astype(np.float64) @ x.T.astype(np.float64))
    for bq, ex in enumerate(rows):
        sc[bq, np.isin(ids, ex)] = -np.inf
    logz = np.logaddexp.reduce(sc, axis=1)
    logp = np.take_along_axis(sc, np.searchsorted(ids, r.ids), 1) - logz[:, None]
    np.testing.assert_allclose(r.log_q, logp, atol=1e-5)
    assert (r.tv_bound < 1e-2).all(), r.tv_bound  # float32 rounding pads the certificates
    # approx mode with a small budget: log_q is the mixture's own log-probability, the
    # same for every draw of an id, and the draws follow it (exact binomial test)
    small = ShardedSampler(index, temperature=TEMPERATURE, mode="approx", budget=40)
    r = small.sample(q, 4000, seed=4)
    sc = beta * (q.astype(np.float64) @ x.T.astype(np.float64))
    logz = np.logaddexp.reduce(sc, axis=1)
    for bq in range(q.shape[0]):
        seen, first, counts = np.unique(r.ids[bq], return_index=True, return_counts=True)
        lq = r.log_q[bq, first]
        np.testing.assert_allclose(r.log_q[bq], lq[np.searchsorted(seen, r.ids[bq])], rtol=0, atol=1e-9)
        probs = np.exp(lq)
        assert probs.sum() <= 1 + 1e-9
        # ids of expected count >= 5 are (almost surely) seen: one cell each, the rest pooled
        big = probs * counts.sum() >= 5
        rest_c, rest_p = counts[~big].sum() + 0, max(0.0, 1 - probs[big].sum())
        pv = binomial_gof_pvalue(np.append(counts[big], rest_c), np.append(probs[big], rest_p))
        assert pv >= ALPHA, pv
        assert r.log_z[bq, 0] <= logz[bq] + 1e-9 <= r.log_z[bq, 1] + 2e-9
    assert ((r.tv_bound >= 0) & (r.tv_bound <= 1)).all()

    # a bad batch on one rank is refused on every rank
    msg = expect_failure(lambda: s.sample(q[:, :3] if rank == world - 1 else q, 4, seed=0), ValueError, rank, world - 1)
    # every id excluded on one rank's query: a ValueError everywhere, naming it
    with pytest.raises(ValueError, match="every target"):
        s.sample(q, 2, exclude=[ids] * q.shape[0] if rank == 0 else None, seed=0)
    return {"messages": s.messages, "bytes": s.bytes_sent, "shard_error": msg}


def edits(rank: int, world: int, out: str) -> dict:
    x, ids = union_data(1)
    index = shard(x, ids, rank, world)
    s = ShardedSampler(index, temperature=TEMPERATURE, timeout=TIMEOUT, dense_fallback=None)
    rng = np.random.default_rng(0)  # the same on every rank: each knows what the others do
    removed = rng.choice(ids, 90, replace=False)
    new_ids = np.arange(30 * world) + 10**12
    new_x = (rng.standard_normal((new_ids.size, D)) / np.sqrt(D)).astype(np.float32)
    moved = rng.choice(np.setdiff1d(ids, removed), 60, replace=False)
    moved_x = (rng.standard_normal((60, D)) / np.sqrt(D)).astype(np.float32)
    mine = slice(rank, None, world)  # every rank passes its own part of each batch

    s.remove(removed[mine])
    s.insert(new_x[mine], new_ids[mine])
    s.update(moved_x[mine], moved[mine])
    # the union after the edits
    keep = ~np.isin(ids, removed)
    u_ids, u_x = np.concatenate([ids[keep], new_ids]), np.concatenate([x[keep], new_x])
    u_x[np.searchsorted(u_ids, moved)] = moved_x
    # each id lives on the shard its owner names, with its vector
    own = shard_of(u_ids, world) == rank
    np.testing.assert_array_equal(index.ids, u_ids[own])
    np.testing.assert_array_equal(index.vectors(u_ids[own]), u_x[own])
    index.check()
    q = rank_queries(rank, 2)
    assert_search_exact(s.search, u_x, u_ids, q, 5, [[], []])
    assert_sampling_exact(s.sample, u_x, u_ids, q[:1], 1.0 / TEMPERATURE, [[]], seed=11, dense=False)

    # bad batches are refused everywhere, and no shard changes
    before = (index.ids.copy(), index.version)
    # rank 0 inserts an id that exists (its owner refuses it)
    owner_of_dup = int(shard_of(u_ids[:1], world)[0])
    for fn, err, failing in [
        (
            lambda: s.insert(u_x[:1], u_ids[:1]) if rank == 0 else s.insert(np.empty((0, D), np.float32), []),
            ValueError,
            owner_of_dup,
        ),
        (lambda: s.remove([123456789] if rank == world - 1 else []), KeyError, int(shard_of([123456789], world)[0])),
        (
            lambda: s.update(new_x[: int(rank == 0)], [987654321][: int(rank == 0)]),
            KeyError,
            int(shard_of([987654321], world)[0]),
        ),
    ]:
        expect_failure(fn, err, rank, failing)
    # the same new id from two ranks: its owner sees it twice
    dup = np.array([5 * 10**12])
    expect_failure(lambda: s.insert(new_x[:1], dup), ValueError, rank, int(shard_of(dup, world)[0]))
    assert index.version == before[1]
    np.testing.assert_array_equal(index.ids, before[0])

    # save and load per shard
    path = os.path.join(out, "shard-{rank}-of-{world_size}.tidx")
    s.save(path)
    t = ShardedSampler.load(path, temperature=TEMPERATURE, timeout=TIMEOUT)
    np.testing.assert_array_equal(t.index.ids, index.ids)
    np.testing.assert_array_equal(t.search(q, 5)[1], s.search(q, 5)[1])
    # a shard holding ids its rank does not own is refused when the sampler is made
    wrong = TreeIndex.build(x[:50], ids[:50]) if rank == 0 else index
    expect_failure(lambda: ShardedSampler(wrong, temperature=TEMPERATURE, timeout=TIMEOUT), ValueError, rank, 0)
    return {"len": len(s)}


def torch_and_dynamic(rank: int, world: int, out: str) -> dict:
    from treeidx.torch import TreeNegativeSampler

    x, ids = union_data(2)
    own = shard_of(ids, world) == rank
    dyn = DynamicIndex.build(x[own], ids[own], n_landmarks=40, temperature=TEMPERATURE, seed=rank)
    s = ShardedSampler(dyn, temperature=TEMPERATURE, timeout=TIMEOUT, dense_fallback=None)
    # a dynamic shard samples its own predictions: the union of every shard's predict()
    pred = _gather_union(ids[own], dyn.predict(ids[own]), ids)
    q = rank_queries(rank, 2)
    assert_sampling_exact(s.sample, pred, ids, q, 1.0 / TEMPERATURE, [[], []], seed=rank, dense=False)
    assert_search_exact(s.search, pred, ids, q, 5, [[], []])

    # a rank with no queries still takes part (and gets empty results)
    mine = q[:0] if rank == 1 else q
    r = s.sample(mine, 4, seed=0)
    assert r.ids.shape == (mine.shape[0], 4) and r.log_z.shape == (mine.shape[0], 2)
    sc, top = s.search(mine, 3)
    assert sc.shape == top.shape == (mine.shape[0], 3)
    neg = TreeNegativeSampler(s, k=16, temperature=TEMPERATURE, seed=0, prefetch=True)
    qt = torch.from_numpy(q)
    pos = torch.from_numpy(ids[[rank, rank + 7]])
    neg.submit(qt, pos)
    r = neg.result()
    assert r.ids.shape == (2, 16) and r.log_q.shape == (2, 16)
    assert not (r.ids == pos[:, None]).any()
    r2 = neg.sample(qt, pos)
    assert r2.ids.shape == (2, 16)
    with pytest.raises(ValueError, match="false_negative_margin"):
        TreeNegativeSampler(s, k=4, temperature=TEMPERATURE, false_negative_margin=0.1)
    neg.close()
    return {}


def _gather_union(my_ids, my_vecs, ids):
    """The union of every shard's (ids, vectors), in the order of `ids`."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (my_ids, np.asarray(my_vecs, np.float32)))
    out = np.empty((ids.size, parts[0][1].shape[1]), np.float32)
    for i, v in parts:
        out[np.searchsorted(ids, i)] = v
    return out


def a_rank_dies(rank: int, world: int, out: str) -> dict:
    x, ids = union_data()
    s = ShardedSampler(shard(x, ids, rank, world), temperature=TEMPERATURE, timeout=5.0)
    q = rank_queries(rank, 2)
    if rank == world - 1:
        return {"elapsed": 0.0}  # leaves without making the call the others make
    t0 = time.perf_counter()
    with pytest.raises(ShardError, match="timed out|failed"):
        s.sample(q, 4, seed=0)
    return {"elapsed": time.perf_counter() - t0}


SCENARIOS = {
    "sampling_and_search": sampling_and_search,
    "edits": edits,
    "torch_and_dynamic": torch_and_dynamic,
    "a_rank_dies": a_rank_dies,
}


# ------------------------------------------------------------------------ tests


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_sampling_is_the_union_softmax_and_search_is_exact(world, tmp_path, monkeypatch):
    res = spawn(world, "sampling_and_search", tmp_path, monkeypatch)
    assert ALPHA > 0
    for r, out in enumerate(res):
        assert out["bytes"] > 0
        if r != world - 1:
            assert f"rank(s) [{world - 1}]" in out["shard_error"]


@pytest.mark.parametrize("world", [2, 3])
def test_edits_land_on_the_owning_shard_and_bad_batches_change_nothing(world, tmp_path, monkeypatch):
    res = spawn(world, "edits", tmp_path, monkeypatch)
    assert {out["len"] for out in res} == {N - 90 + 30 * world}


def test_torch_sampler_and_dynamic_shards(tmp_path, monkeypatch):
    spawn(2, "torch_and_dynamic", tmp_path, monkeypatch)


def test_a_rank_that_leaves_does_not_hang_the_others(tmp_path, monkeypatch):
    res = spawn(3, "a_rank_dies", tmp_path, monkeypatch)
    assert max(out["elapsed"] for out in res) < 5.0 + 30.0


def test_shard_of_is_balanced_and_fixed():
    ids = np.arange(100_000)
    r = shard_of(ids, 4)
    assert set(np.unique(r)) == {0, 1, 2, 3}
    assert np.bincount(r).min() > 0.24 * ids.size
    np.testing.assert_array_equal(shard_of(ids[:10], 4), r[:10])
    assert (shard_of(np.array([-5, 2**62]), 3) < 3).all()
    with pytest.raises(ValueError):
        shard_of([1, 2], 0)


@pytest.mark.parametrize("dense_fallback", [None, 1e-12])
def test_trials_accept_at_rate_z_over_envelope_and_follow_the_softmax(dense_fallback):
    """SoftmaxSampler.trials, the building block: the cut (envelope, log Z interval) does
    not depend on m or the seed; each trial is accepted with probability Z / U; the
    accepted ids follow the softmax (exact binomial tests)."""
    from scipy.special import bdtr, bdtrc

    x, ids = union_data(3)
    index = TreeIndex.build(x, ids)
    q = rank_queries(0, 2)
    s = SoftmaxSampler(index, temperature=TEMPERATURE, dense_fallback=dense_fallback)
    m = 20_000
    env = s.trials(q, 0, k=8, seed=0)
    t = s.trials(q, m, k=8, seed=1)
    np.testing.assert_array_equal(env.log_env, t.log_env)
    np.testing.assert_array_equal(env.log_z, t.log_z)
    assert (env.n == 0).all()
    sc = (q.astype(np.float64) @ x.T.astype(np.float64)) / TEMPERATURE
    logz = np.logaddexp.reduce(sc, axis=1)
    assert ((t.log_z[:, 0] <= logz + 1e-12) & (logz <= t.log_z[:, 1] + 1e-12)).all()
    for b in range(2):
        p = float(np.exp(logz[b] - t.log_env[b]))
        assert p <= 1 + 1e-6
        n = int(t.n[b])
        pv = 2 * min(bdtr(n, m, min(p, 1.0)), bdtrc(n - 1, m, min(p, 1.0)))
        assert pv >= ALPHA, (n, m, p)
        pos = np.searchsorted(ids, t.ids[b, :n])
        np.testing.assert_allclose(t.w[b, :n], sc[b, pos], rtol=1e-5, atol=1e-4)
        counts = np.bincount(pos, minlength=ids.size)
        assert binomial_gof_pvalue(counts, np.exp(sc[b] - logz[b])) >= ALPHA
    if dense_fallback is not None:
        assert (t.n == m).all() and (t.frontier_size == 0).all()
    approx = SoftmaxSampler(index, temperature=TEMPERATURE, mode="approx").trials(q, [5, 0], seed=0)
    np.testing.assert_array_equal(approx.n, [5, 0])
    with pytest.raises(ValueError, match="m: expected"):
        s.trials(q, [1, 2, 3])
    with pytest.raises(ValueError, match="m: expected"):
        s.trials(q, -2)
    # m=-1 (as many as k needs), with the same seed: the same trials, a prefix of the m ones
    auto = s.trials(q, -1, k=8, seed=1)
    assert ((auto.proposals > 0) & (auto.proposals <= m)).all()
    for b in range(2):
        first = t.trial[b, : t.n[b]] < auto.proposals[b]
        np.testing.assert_array_equal(auto.ids[b, : auto.n[b]], t.ids[b, : t.n[b]][first])
        np.testing.assert_array_equal(auto.trial[b, : auto.n[b]], t.trial[b, : t.n[b]][first])


def test_the_ddp_example_runs_under_torchrun():
    """bench/ddp_example.py, the loop docs/distributed.md shows: 2 ranks, end to end."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = subprocess.run(
        cmd + [str(root / "bench" / "ddp_example.py"), "--steps", "20"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["world_size"] == 2 and res["bytes_sent_rank0"] > 0
    assert res["last_loss"] < res["first_loss"]
