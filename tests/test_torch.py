"""treeidx.torch and treeidx.torch: the loss's estimator, samplers, seeds, prefetch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from treeidx import SoftmaxSampler, TreeIndex
from treeidx.torch import (
    BruteForceSampler,
    InBatch,
    NegativeCache,
    Negatives,
    StaleTopK,
    TreeNegativeSampler,
    UniformSampler,
    sampled_softmax_loss,
)

P_MIN = 1e-4  # fixed-seed goodness-of-fit tests fail a correct sampler with probability ~1e-4


def data(n=300, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def full_ce(q, targets, pos_idx, temperature, reduction="none"):
    return F.cross_entropy(q @ targets.T / temperature, pos_idx, reduction=reduction)


# ----------------------------------------------------------------------------- the loss


def test_loss_equals_full_softmax_when_negatives_are_all_targets():
    # Every target once as a negative with Q = 1/N: log(k·Q) = log(N/N) = 0, so the
    # negatives' logits are the raw scores; the positive's own column is an accidental
    # hit (masked), leaving Ẑ = e^{s+} + Σ_{y≠y+} e^{s_y} = Z exactly.
    g = torch.Generator().manual_seed(0)
    N, d, B, T = 30, 5, 6, 0.7
    Y = torch.randn(N, d, generator=g, dtype=torch.float64)
    q = torch.randn(B, d, generator=g, dtype=torch.float64)
    p = torch.randint(0, N, (B,), generator=g)
    want = full_ce(q, Y, p, T)
    neg = Y.expand(B, N, d)
    got = sampled_softmax_loss(
        q,
        Y[p],
        neg,
        log_q=torch.full((B, N), -math.log(N), dtype=torch.float64),
        temperature=T,
        in_batch_negatives=False,
        reduction="none",
        pos_ids=p,
        neg_ids=torch.arange(N).expand(B, N),
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the same with the positive left out of Q's support: k = N-1, Q = 1/(N-1)
    others = torch.stack([torch.cat([torch.arange(int(i)), torch.arange(int(i) + 1, N)]) for i in p])
    got2 = sampled_softmax_loss(
        q,
        Y[p],
        Y[others],
        log_q=torch.full((B, N - 1), -math.log(N - 1), dtype=torch.float64),
        temperature=T,
        in_batch_negatives=False,
        reduction="none",
    )
    torch.testing.assert_close(got2, want, rtol=1e-12, atol=1e-12)
    for red in ("mean", "sum"):
        torch.testing.assert_close(
            sampled_softmax_loss(
                q,
                Y[p],
                Y[others],
                log_q=torch.full((B, N - 1), -math.log(N - 1), dtype=torch.float64),
                temperature=T,
                in_batch_negatives=False,
                reduction=red,
            ),
            full_ce(q, Y, p, T, red),
            rtol=1e-12,
            atol=1e-12,
        )


def test_gradient_unbiased_with_exact_softmax_samples():
    # Q = softmax over the targets other than the positive (BruteForceSampler excludes
    # it): every column's logit is s_j − log(k·Q_j) = log((Z − e^{s+})/k), so each draw's
    # loss is the full loss and E[∇_q] is the full gradient, for any k.
    # The positive holds ~1/3 of the mass (perplexity ~12), so the positive's own
    # weight in Ẑ matters and a wrong k factor shows.
    N, d, T, k, M = 50, 4, 2.0, 3, 4000
    g = torch.Generator().manual_seed(1)
    Y = torch.randn(N, d, generator=g, dtype=torch.float64)
    p = 7
    q0 = Y[p] + 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    q_full = q0.clone().requires_grad_()
    full = full_ce(q_full[None], Y, torch.tensor([p]), T)[0]
    full.backward()
    want = q_full.grad

    sampler = BruteForceSampler(Y, k=k, temperature=T, chunk_size=16, seed=3)
    qs = q0.expand(M, d).clone()
    negs = sampler.sample(qs, torch.full((M,), p))
    assert negs.log_q.dtype == torch.float64 and not (negs.ids == p).any()

    def mean_and_se(log_q):
        qv = qs.clone().requires_grad_()
        loss = sampled_softmax_loss(
            qv, Y[p].expand(M, d), Y[negs.ids], log_q=log_q, temperature=T, in_batch_negatives=False, reduction="none"
        )
        loss.sum().backward()
        grads = qv.grad
        return loss.detach(), grads.mean(0), grads.std(0) / math.sqrt(M)

    loss, mean, se = mean_and_se(negs.log_q)
    torch.testing.assert_close(loss, full.detach().expand(M), rtol=1e-10, atol=1e-10)
    assert (se > 1e-4).all()  # the draws do vary: the test below has something to test
    assert ((mean - want).abs() <= 5 * se).all(), (mean, want, se)
    # power: the same draws with no correction, or with log Q but not log k, give a
    # clearly biased gradient
    for wrong in (None, negs.log_q - math.log(k)):
        _, mean0, se0 = mean_and_se(wrong)
        assert ((mean0 - want).abs() > 10 * se0).any()


def test_accidental_hits_and_in_batch_columns():
    g = torch.Generator().manual_seed(2)
    B, k, d, T = 3, 4, 5, 0.3
    q, pos = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
    neg = torch.randn(B, k, d, generator=g)
    log_q = torch.randn(B, k, generator=g) - 3
    pos_ids = torch.tensor([5, 5, 9])  # rows 0 and 1 share a positive
    neg_ids = torch.tensor([[5, 1, 2, 5], [3, 4, 6, 7], [9, 9, 9, 1]])
    q.requires_grad_()
    got = sampled_softmax_loss(
        q, pos, neg, log_q=log_q, temperature=T, reduction="none", pos_ids=pos_ids, neg_ids=neg_ids
    )
    s_pos = (q * pos).sum(1) / T
    s_neg = torch.einsum("bd,bkd->bk", q, neg) / T - log_q - math.log(k)
    s_neg = s_neg.masked_fill(neg_ids == pos_ids[:, None], -math.inf)
    s_ib = (q @ pos.T / T).masked_fill(pos_ids[:, None] == pos_ids[None, :], -math.inf)
    want = torch.logsumexp(torch.cat([s_pos[:, None], s_neg, s_ib], 1), 1) - s_pos
    torch.testing.assert_close(got, want)
    # row 2: all but one sampled negative are hits; row 0 lost one in-batch column
    got.sum().backward()
    assert torch.isfinite(q.grad).all()
    # without ids only the diagonal in-batch column is masked
    plain = sampled_softmax_loss(q, pos, neg, log_q=log_q, temperature=T, reduction="none")
    s_ib2 = (q @ pos.T / T).masked_fill(torch.eye(B, dtype=torch.bool), -math.inf)
    s_neg2 = torch.einsum("bd,bkd->bk", q, neg) / T - log_q - math.log(k)
    torch.testing.assert_close(plain, torch.logsumexp(torch.cat([s_pos[:, None], s_neg2, s_ib2], 1), 1) - s_pos)
    with pytest.raises(ValueError, match="pos_ids"):
        sampled_softmax_loss(q, pos, neg, temperature=T, neg_ids=neg_ids)
    with pytest.raises(ValueError, match="reduction"):
        sampled_softmax_loss(q, pos, neg, temperature=T, reduction="avg")
    with pytest.raises(ValueError, match="neg"):
        sampled_softmax_loss(q, pos, neg[:, :, :2], temperature=T)


def test_in_batch_only_is_dpr_cross_entropy():
    g = torch.Generator().manual_seed(3)
    B, d, T = 5, 4, 0.2
    q, pos = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
    negs = InBatch().sample(q, torch.arange(B))
    assert negs.ids.shape == (B, 0) and negs.log_q.shape == (B, 0)
    want = full_ce(q, pos, torch.arange(B), T, "mean")
    empty = pos[negs.ids]  # (B, 0, d)
    for neg, lq in ((empty, negs.log_q), (None, None)):
        torch.testing.assert_close(sampled_softmax_loss(q, pos, neg, log_q=lq, temperature=T), want)


# ----------------------------------------------------------------------------- TreeNegativeSampler


@pytest.fixture(scope="module")
def tree():
    x = data()
    return x, TreeIndex.build(x, np.arange(x.shape[0]) + 100)


def queries(x, B=6, seed=0, dtype=torch.float32):
    rng = np.random.default_rng(seed)
    q = x[rng.integers(0, x.shape[0], B)] * 1.5 + 0.1 * rng.standard_normal((B, x.shape[1]))
    return torch.from_numpy(q.astype(np.float32)).to(dtype), torch.from_numpy(rng.integers(0, x.shape[0], B) + 100)


def test_tree_sampler_excludes_positive_and_log_q_is_log_softmax(tree):
    x, index = tree
    T = 0.1
    q, pos = queries(x)
    s = TreeNegativeSampler(index, k=200, temperature=T, prefetch=False)
    negs = s.sample(q, pos)
    assert isinstance(negs, Negatives) and negs.ids.shape == (6, 200) and negs.ids.dtype == torch.int64
    assert not (negs.ids == pos[:, None]).any()
    scores = q.double().numpy() @ x.T.astype(np.float64) / T
    scores[np.arange(6), pos.numpy() - 100] = -np.inf  # the positive is outside the support
    exact = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
    got = np.take_along_axis(exact, negs.ids.numpy() - 100, 1)
    width = negs.result.log_z[:, 1] - negs.result.log_z[:, 0]
    assert (np.abs(negs.log_q.double().numpy() - got) <= width[:, None] + 1e-4).all()
    # without exclusion the positive can come back (a query sitting on its positive)
    s2 = TreeNegativeSampler(index, k=200, temperature=T, exclude_positives=False)
    q_on = torch.from_numpy(x[:2] * 3)
    assert (s2.sample(q_on, torch.tensor([100, 101])).ids == torch.tensor([[100], [101]])).any()


@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_batched_tree_sampler_excludes_positive_and_log_q_is_log_softmax(tree, mode):
    x, index = tree
    T = 0.1
    q, pos = queries(x, dtype=torch.bfloat16)  # as a bf16 training loop sends them
    budget = 10 * len(index) if mode == "approx" else None  # every cluster opened: the softmax
    s = TreeNegativeSampler(index, k=200, temperature=T, mode=mode, budget=budget, batched=True, prefetch=False)
    assert s.sampler.batched
    negs = s.sample(q, pos)
    assert not (negs.ids == pos[:, None]).any()
    scores = q.double().numpy() @ x.T.astype(np.float64) / T
    scores[np.arange(6), pos.numpy() - 100] = -np.inf
    exact = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
    got = np.take_along_axis(exact, negs.ids.numpy() - 100, 1)
    width = negs.result.log_z[:, 1] - negs.result.log_z[:, 0]
    assert (np.abs(negs.log_q.double().numpy() - got) <= width[:, None] + 1e-4).all()
    # a checkpoint at another temperature rebuilds the sampler, and keeps the option
    s2 = TreeNegativeSampler(index, k=200, temperature=2 * T, mode=mode, budget=budget, batched=True)
    s2.load_state_dict(s.state_dict())
    assert s2.sampler.batched and s2.sampler is not s.sampler and s2.temperature == T
    with pytest.raises(TypeError, match="batched"):
        TreeNegativeSampler(index, k=2, temperature=T, batched="yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_device_and_dtype_round_trip(tree, dtype):
    x, index = tree
    q, pos = queries(x, dtype=dtype)
    q.requires_grad_()
    ref = TreeNegativeSampler(index, k=8, temperature=0.2, seed=5).sample(q.detach().float(), pos)
    got = TreeNegativeSampler(index, k=8, temperature=0.2, seed=5).sample(q, pos)
    assert got.ids.device == q.device and got.ids.dtype == torch.int64
    assert got.log_q.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not got.log_q.requires_grad
    assert torch.equal(got.ids, ref.ids)  # low precision is widened exactly before sampling
    torch.testing.assert_close(got.log_q.float(), ref.log_q)
    # the loss runs in >= float32 and its gradient comes back in the input dtype
    V = torch.from_numpy(x).to(dtype)
    loss = sampled_softmax_loss(
        q, V[pos - 100], V[got.ids - 100], log_q=got.log_q, temperature=0.2, pos_ids=pos, neg_ids=got.ids
    )
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss.backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_round_trip(tree):
    x, index = tree
    q, pos = queries(x)
    ref = TreeNegativeSampler(index, k=4, temperature=0.2).sample(q, pos)
    got = TreeNegativeSampler(index, k=4, temperature=0.2).sample(q.cuda(), pos.cuda())
    assert got.ids.is_cuda and got.log_q.is_cuda
    assert torch.equal(got.ids.cpu(), ref.ids)


def test_prefetch_equals_synchronous(tree):
    x, index = tree
    batches = [queries(x, seed=i) for i in range(4)]
    sync = TreeNegativeSampler(index, k=16, temperature=0.1, seed=9)
    want = [sync.sample(q, p) for q, p in batches]
    for prefetch in (True, False):
        with TreeNegativeSampler(index, k=16, temperature=0.1, seed=9, prefetch=prefetch) as s:
            got = []
            s.submit(*batches[0])
            got.append(s.result())
            s.submit(*batches[1])
            got.append(s.sample(*batches[1]))  # the same tensors: picks up the prefetched batch
            got.append(s.sample(*batches[2]))  # plain synchronous call in between
            s.submit(*batches[3])
            assert s.pending
            got.append(s.result())
            assert s.calls == sync.calls == 4
        for a, b in zip(got, want):
            assert torch.equal(a.ids, b.ids) and torch.equal(a.log_q, b.log_q)
    s = TreeNegativeSampler(index, k=2, temperature=0.1)
    s.submit(*batches[0])
    with pytest.raises(RuntimeError, match="twice"):
        s.submit(*batches[1])
    with pytest.raises(RuntimeError, match="pending"):
        s.sample(*batches[1])
    with pytest.raises(RuntimeError, match="pending"):
        s.load_state_dict(s.state_dict())
    s.result()
    with pytest.raises(RuntimeError, match="without a pending"):
        s.result()
    s.close()


def test_treeidx_leaves_torch_thread_count_alone():
    """numba's OpenMP layer resets the calling thread's OpenMP thread count at every
    parallel launch, and torch reads that count: without care, a loop that set
    torch.set_num_threads(1) to leave a core to the sampler would get every core back
    after the first build or sample."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 or more cores for numba and torch counts to differ")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        x = data(n=3000, d=16)
        index = TreeIndex.build(x)  # parallel build kernels
        index.search(x[:8], 3)
        for mode in ("exact", "approx"):
            SoftmaxSampler(index, temperature=0.1, mode=mode).sample(x[:8], 4, seed=0)
        BruteForceSampler(torch.from_numpy(x), k=4, temperature=0.1).sample(torch.from_numpy(x[:8]))
        assert torch.get_num_threads() == 1
        with TreeNegativeSampler(index, k=4, temperature=0.1, prefetch=True) as s:
            s.submit(*queries(x, seed=1))
            s.result()
        assert torch.get_num_threads() == 1
        # threads=: the sampling's own numba count; the caller's counts come back, and
        # the draws do not depend on it
        numba_before = numba.get_num_threads()
        torch.set_num_threads(1)
        want = TreeNegativeSampler(index, k=4, temperature=0.1, seed=3).sample(*queries(x, seed=2))
        for prefetch in (False, True):
            with TreeNegativeSampler(index, k=4, temperature=0.1, seed=3, threads=1, prefetch=prefetch) as s:
                s.submit(*queries(x, seed=2))
                got = s.result()
            assert torch.equal(got.ids, want.ids) and torch.equal(got.log_q, want.log_q)
            assert numba.get_num_threads() == numba_before and torch.get_num_threads() == 1
        for bad in (0, True, 1.5, numba.config.NUMBA_NUM_THREADS + 1):
            with pytest.raises(ValueError, match="threads"):
                TreeNegativeSampler(index, k=4, temperature=0.1, threads=bad)
    finally:
        torch.set_num_threads(before)


def test_seed_streams(tree):
    x, index = tree
    q, pos = queries(x)

    def ids(**kw):
        return TreeNegativeSampler(index, k=32, temperature=0.3, **kw).sample(q, pos).ids

    assert torch.equal(ids(seed=1, rank=0), ids(seed=1, rank=0))
    assert torch.equal(ids(seed=1), ids(seed=1, rank=0))  # no process group: rank 0
    assert not torch.equal(ids(seed=1, rank=0), ids(seed=1, rank=1))
    assert not torch.equal(ids(seed=1, rank=0), ids(seed=2, rank=0))
    s = TreeNegativeSampler(index, k=32, temperature=0.3)
    assert not torch.equal(s.sample(q, pos).ids, s.sample(q, pos).ids)  # the counter moves


def test_state_dict_round_trip(tree):
    x, index = tree
    q, pos = queries(x)
    a = TreeNegativeSampler(index, k=8, temperature=0.1, seed=4, rank=2)
    a.sample(q, pos)
    a.sample(q, pos)
    state = a.state_dict()
    assert state == {
        "seed": 4,
        "rank": 2,
        "calls": 2,
        "k": 8,
        "temperature": 0.1,
        "mode": "exact",
        "proposal_temperature": 0.1,
        "false_negative_margin": None,
    }
    want = a.sample(q, pos)
    b = TreeNegativeSampler(index, k=3, temperature=1.0, mode="approx", seed=0, rank=2)
    b.load_state_dict(state)
    assert (b.k, b.temperature, b.mode, b.calls) == (8, 0.1, "exact", 2)
    assert b.sampler.temperature == 0.1 and b.sampler.mode == "exact"
    got = b.sample(q, pos)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.log_q, want.log_q)
    # a checkpoint from another rank keeps this process's rank (its own stream)
    c = TreeNegativeSampler(index, k=8, temperature=0.1, rank=3)
    c.load_state_dict(state)
    assert c.rank == 3


def test_duck_typed_sampler_and_errors(tree):
    x, index = tree
    q, pos = queries(x)
    inner = SoftmaxSampler(index, temperature=0.1)
    s = TreeNegativeSampler(inner, k=4, temperature=0.1, seed=1)
    assert torch.equal(
        s.sample(q, pos).ids, TreeNegativeSampler(index, k=4, temperature=0.1, seed=1).sample(q, pos).ids
    )
    with pytest.raises(ValueError, match="temperature"):
        TreeNegativeSampler(inner, k=4, temperature=0.2)
    with pytest.raises(TypeError, match="index"):
        TreeNegativeSampler(object(), k=4, temperature=0.1)
    with pytest.raises(ValueError, match="k"):
        TreeNegativeSampler(index, k=0, temperature=0.1)
    with pytest.raises(ValueError, match="temperature"):
        TreeNegativeSampler(index, k=2, temperature=-1.0)
    with pytest.raises(ValueError, match="mode"):
        TreeNegativeSampler(index, k=2, temperature=1.0, mode="fast")
    with pytest.raises(ValueError, match=r"shape \(B, d\)"):
        s.sample(q[0], pos)
    with pytest.raises(ValueError, match="dimension"):
        s.sample(q[:, :3], pos)
    with pytest.raises(ValueError, match="positive_ids"):
        s.sample(q, pos[:3])
    with pytest.raises(TypeError, match="Tensor"):
        s.sample(q.numpy(), pos)
    assert s.calls == 1  # rejected calls take no call number
    empty = s.sample(q[:0], pos[:0])
    assert empty.ids.shape == (0, 4)


# ----------------------------------------------------------------------------- baselines


def test_uniform_sampler():
    ids = np.array([3, 10, 11, 40, 77])
    s = UniformSampler(ids, k=2000, seed=0)
    q = torch.zeros(3, 4, dtype=torch.float64)
    negs = s.sample(q)
    torch.testing.assert_close(negs.log_q, torch.full((3, 2000), -math.log(5), dtype=torch.float64))
    counts = np.array([(negs.ids == i).sum().item() for i in ids])
    assert counts.sum() == 6000
    assert stats.chisquare(counts).pvalue > P_MIN
    assert UniformSampler(7, k=3).sample(q.float()).log_q.dtype == torch.float32
    assert not torch.equal(negs.ids, s.sample(q).ids)


def test_stale_topk_uses_stale_vectors_until_refresh():
    x = data(n=200, d=6, seed=1)
    state = {"v": x, "calls": 0}

    def encode():
        state["calls"] += 1
        return torch.from_numpy(state["v"])

    ids = np.arange(200) + 1000
    q, _ = queries(x, B=5, seed=2)
    pos = torch.tensor([1000, 1001, 1002, 1003, 1004])

    def top(v, skip, k):
        s = q.double().numpy() @ v.T.astype(np.float64)
        s[np.arange(5), pos.numpy() - 1000] = -np.inf
        return torch.from_numpy(np.argsort(-s, axis=1)[:, skip : skip + k] + 1000)

    for backend in ("brute", "tree"):
        state.update(v=x, calls=0)
        s = StaleTopK(encode, ids, k=4, refresh_every=3, skip=2, backend=backend)
        first = s.sample(q, pos)
        assert state["calls"] == 1 and torch.equal(first.ids, top(x, 2, 4))
        torch.testing.assert_close(first.log_q, torch.full((5, 4), -math.log(4)))
        state["v"] = -x  # the encoder moves on; the index does not until the refresh
        for _ in range(2):
            assert torch.equal(s.sample(q, pos).ids, first.ids)
        assert state["calls"] == 1
        third = s.sample(q, pos)
        assert state["calls"] == 2 and torch.equal(third.ids, top(-x, 2, 4))
        assert not torch.equal(third.ids, first.ids)


def test_negative_cache_old_argument_order_warns_and_still_works():
    v = np.random.default_rng(5).standard_normal((6, 3)).astype(np.float32)
    new = NegativeCache(v[:4], np.arange(4), k=1, temperature=0.5, cache_size=8, seed=0)
    with pytest.warns(DeprecationWarning, match=r"\(vectors, ids\)"):
        old = NegativeCache(np.arange(4), v[:4], k=1, temperature=0.5, cache_size=8, seed=0)
    with pytest.warns(DeprecationWarning, match=r"\(vectors, ids\)"):
        old.update([5, 4], v[4:6])
    new.update(v[4:6], [5, 4])
    assert old.cached_ids.tolist() == new.cached_ids.tolist() == [0, 1, 2, 3, 5, 4]
    q = torch.from_numpy(v[:2])
    assert torch.equal(old.sample(q).ids, new.sample(q).ids)


def test_negative_cache_fifo_and_sampling():
    rng = np.random.default_rng(4)
    v = rng.standard_normal((12, 3)).astype(np.float32)
    c = NegativeCache(v[:6], np.arange(6), k=1, temperature=0.5, cache_size=4, seed=0)
    assert c.cached_ids.tolist() == [2, 3, 4, 5]  # the oldest two never fit
    c.update(torch.from_numpy(v[10:12]), torch.tensor([10, 11]))
    assert c.cached_ids.tolist() == [4, 5, 10, 11]  # 2 and 3, the oldest, evicted
    c.update(v[6:7], [4])  # re-encoded: old copy dropped, fresh one at the back
    assert c.cached_ids.tolist() == [5, 10, 11, 4] and len(c) == 4
    c.update(v[7:8], [11])  # evicts 5 (the oldest) and drops 11's stale copy
    assert c.cached_ids.tolist() == [10, 4, 11] and len(c) == 3
    # sampling: the softmax over the cache, positive excluded, log_q its log-probability
    cached = {10: v[10], 4: v[6], 11: v[7]}
    q = torch.from_numpy(rng.standard_normal((2, 3)).astype(np.float32))
    c.k = 30000
    negs = c.sample(q, torch.tensor([11, 99]))
    for b, allowed in enumerate(([10, 4], [10, 4, 11])):
        s = np.array([q[b].double().numpy() @ cached[i] / 0.5 for i in allowed])
        logp = s - np.logaddexp.reduce(s)
        counts = np.array([(negs.ids[b] == i).sum().item() for i in allowed])
        assert counts.sum() == c.k
        assert stats.chisquare(counts, np.exp(logp) * c.k).pvalue > P_MIN
        for i, lp in zip(allowed, logp):
            got = negs.log_q[b][negs.ids[b] == i]
            torch.testing.assert_close(got, torch.full_like(got, lp), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no cached entry"):
        NegativeCache(v[:1], [1], k=1, temperature=1.0, cache_size=2).sample(q[:1], torch.tensor([1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_brute_force_sampler_is_exact(dtype):
    x = data(n=200, d=5, seed=5)
    ids = np.arange(200) * 3
    calls = []

    def encode():
        calls.append(1)
        return torch.from_numpy(x)

    T = 0.2
    s = BruteForceSampler(encode, ids, k=20000, temperature=T, chunk_size=32, seed=0)
    q, _ = queries(x, B=2, seed=6, dtype=dtype)
    pos = torch.tensor([ids[5], ids[150]])
    negs = s.sample(q, pos)
    assert len(calls) == 1 and negs.log_q.dtype == dtype
    sc = q.double().numpy() @ x.T.astype(np.float64) / T
    sc[0, 5] = sc[1, 150] = -np.inf
    logp = sc - np.logaddexp.reduce(sc, axis=1, keepdims=True)
    for b in range(2):
        rows = negs.ids[b].numpy() // 3
        assert not (rows == (5, 150)[b]).any()
        torch.testing.assert_close(
            negs.log_q[b].double(),
            torch.from_numpy(logp[b, rows]),
            rtol=0,
            atol=1e-12 if dtype == torch.float64 else 2e-5,
        )
        p = np.exp(logp[b])
        counts = np.bincount(rows, minlength=200)
        big = p * s.k >= 5
        obs = np.append(counts[big], counts[~big].sum())
        exp_ = np.append(p[big], p[~big].sum()) * s.k
        assert stats.chisquare(obs, exp_ * obs.sum() / exp_.sum()).pvalue > P_MIN
    with pytest.raises(ValueError, match="ids"):
        BruteForceSampler(encode, k=1, temperature=1.0)
