"""The certified compressed-score exact sampler (bfloat16 codes + a bound on |s - s~|)
and exact mode's plan per query.

* the bound eps >= |s - s~| holds for every target (hypothesis, adversarial scales);
* BruteForce(precision="bf16").sample_certified and SoftmaxSampler's dense pass with
  dense_precision="bf16" draw the exact softmax (binomial goodness of fit, exclusions,
  negative and sparse ids, bfloat16 queries, a huge-norm query);
* the plan sends a peaked clustered query to the tree and a flat one dense, and neither
  the plan nor the draws depend on the thread count or the batch.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._oracles import ALPHA, DRAWS, assert_sampling_exact, binomial_gof_pvalue, excluded_mask
from treeidx import SoftmaxSampler, TreeIndex
from treeidx.brute import Bf16Codes, BruteForce, bf16_scores, certified_eps
from treeidx.sampling import _CODES

torch = pytest.importorskip("torch")


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(n: int, d: int, seed: int, spread: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = _unit(max(n // 100, 2), d, seed + 1)
    x = c[rng.integers(0, c.shape[0], n)] + spread * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 300),
    d=st.integers(1, 96),
    seed=st.integers(0, 2**31),
    log_scale=st.floats(-6, 6),
    spread=st.floats(0, 4),
    cancel=st.booleans(),
)
def test_the_bound_holds_for_every_target(n, d, seed, log_scale, spread, cancel):
    """|s - s~| <= eps for every target, s the float64 inner product (eps covers the
    float32 score's own rounding too), with norms spread over orders of magnitude and
    (cancel) queries orthogonal-ish to the targets so that the products cancel."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * np.exp(spread * rng.standard_normal((n, 1)))
    q = rng.standard_normal((5, d)) * np.exp(log_scale)
    if cancel and n > 1:
        q[0] = x[0] - x[1] * (x[0] @ x[1]) / max(x[1] @ x[1], 1e-30)  # <q0, x1> ~ 0
        q[1] = np.where(np.arange(d) % 2 == 0, 1.0, -1.0) * np.abs(x[0])  # alternating signs
    x, q = x.astype(np.float32), q.astype(np.float32)
    codes = Bf16Codes.from_vectors(x)
    buf = np.empty((q.shape[0], n), np.uint16)
    q_bits = bf16_scores(q, codes, buf)
    eps = certified_eps(q, q_bits, codes)
    s_tilde = (buf.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    s = q.astype(np.float64) @ x.T.astype(np.float64)
    assert (np.abs(s - s_tilde) <= eps[:, None]).all(), float((np.abs(s - s_tilde) / eps[:, None]).max())


def test_the_bound_is_not_vacuous_on_unit_vectors():
    """On unit vectors eps is a few bfloat16 units: acceptance stays high at T = 0.05."""
    x, q = _unit(2000, 64, 0), _unit(8, 64, 1)
    r = BruteForce(x, precision="bf16").sample_certified(q, 64, temperature=0.05, seed=0)
    assert (r.eps < 8 * 2.0**-8).all()
    assert (64 / r.proposals).mean() > 0.5


@pytest.mark.parametrize("temperature", [0.02, 0.2])
def test_certified_draws_follow_the_softmax(temperature):
    """Exclusions, negative and sparse ids, bfloat16 queries (widened) and a huge-norm
    query (its bound too wide: the float32 pass) all draw the exact softmax."""
    x = _clustered(1500, 24, seed=3)
    ids = np.unique(np.random.default_rng(4).integers(-(10**9), 10**9, 1600))[:1500]  # sparse, negative
    q = x[[0, 700, 1400]] + 0.05 * _unit(3, 24, 5)
    q = np.concatenate([q, 400.0 * _unit(1, 24, 6)]).astype(np.float32)
    qb = torch.from_numpy(q).to(torch.bfloat16)  # bfloat16 queries: widened exactly
    qf = qb.float().numpy()
    rows = [ids[:3].tolist(), [], [int(ids[5]), 12345], ids[::7].tolist()]
    bf = BruteForce(x, ids=ids, precision="bf16", batch_size=3)
    r = bf.sample_certified(qb, DRAWS, temperature=temperature, exclude=rows, seed=7)
    beta = 1.0 / temperature
    s = beta * (qf.astype(np.float64) @ x.T.astype(np.float64))
    s[excluded_mask(ids, rows)] = -np.inf
    m = s.max(1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(s - m).sum(1))
    assert ((r.log_z[:, 1] <= logz) & (logz <= r.log_z[:, 2])).all()
    assert ((r.log_z[:, 1] <= r.log_z[:, 0]) & (r.log_z[:, 0] <= r.log_z[:, 2])).all()
    pos = np.searchsorted(ids, r.ids)
    assert (ids[pos] == r.ids).all()
    for b in range(q.shape[0]):
        allowed = np.isfinite(s[b])
        assert allowed[pos[b]].all(), "an excluded id was drawn"
        counts = np.bincount(pos[b], minlength=ids.size)[allowed]
        assert binomial_gof_pvalue(counts, np.exp(s[b, allowed] - logz[b])) >= ALPHA, b
        np.testing.assert_allclose(r.log_p[b], s[b, pos[b]] - r.log_z[b, 0], atol=1e-3 * (1 + beta))
    assert r.proposals[3] == DRAWS  # the huge-norm query took the float32 pass
    assert (r.proposals[:3] >= DRAWS).all()


def test_certified_sample_is_deterministic_and_batch_independent():
    x, q = _unit(3000, 32, 0), _unit(9, 32, 1)
    a = BruteForce(x, precision="bf16", batch_size=4).sample(q, 50, temperature=0.05, seed=3, exact=True)
    b = BruteForce(x, precision="bf16", batch_size=9).sample(q, 50, temperature=0.05, seed=3, exact=True)
    c = BruteForce(x, precision="bf16", batch_size=9).sample(q[3:], 50, temperature=0.05, seed=3, exact=True)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0][3:], c[0])  # the stream follows the seed's position, like fp32's


def test_exact_flag_errors():
    x = _unit(100, 8, 0)
    with pytest.raises(ValueError, match="precision"):
        BruteForce(x, precision="int8").sample(x[:2], 4, temperature=1.0, exact=True)
    with pytest.raises(ValueError, match="bf16"):
        BruteForce(x).sample_certified(x[:2], 4, temperature=1.0)
    r = BruteForce(x).sample(x[:2], 4, temperature=1.0, seed=0, exact=True)  # fp32: always exact
    np.testing.assert_array_equal(r[0], BruteForce(x).sample(x[:2], 4, temperature=1.0, seed=0)[0])


# ------------------------------------------------------------------ the sampler


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_sampler_dense_pass_is_exact(precision):
    """plan="dense": every query by the dense pass, certified bf16 or float32."""
    x = _clustered(2000, 16, seed=8)
    ids = np.arange(2000) * 3 - 3000  # negative and sparse
    index = TreeIndex.build(x, ids=ids)
    q = x[[1, 900]] + 0.1 * _unit(2, 16, 9)
    rows = [ids[:5].tolist(), [int(ids[10])]]
    sampler = SoftmaxSampler(index, temperature=0.05, plan="dense", dense_precision=precision)
    assert_sampling_exact(sampler.sample, x, ids, q, 20.0, rows, 3, dense=True)
    assert (index in _CODES) == (precision == "bf16")


def test_codes_follow_the_index():
    x = _clustered(1200, 16, seed=10)
    index = TreeIndex.build(x[:1000])
    sampler = SoftmaxSampler(index, temperature=0.1, plan="dense", dense_precision="bf16")
    sampler.sample(x[:2], 8, seed=0)
    v0 = index.version
    assert _CODES[index][0] == v0
    index.insert(x[1000:], ids=np.arange(1000, 1200))
    index.remove(np.arange(0, 1000, 2))
    ids = np.concatenate([np.arange(1, 1000, 2), np.arange(1000, 1200)])
    assert_sampling_exact(sampler.sample, x[ids], ids, x[[1001, 3]], 10.0, [[], [1001]], 4, dense=True)
    assert _CODES[index][0] == index.version != v0


def test_plan_sends_a_peaked_query_to_the_tree_and_a_flat_real_like_one_dense():
    x = _clustered(12000, 32, seed=11, spread=0.2)
    clustered = TreeIndex.build(x, seed=0)
    q = x[:4] + 0.02 * _unit(4, 32, 12)
    r = SoftmaxSampler(clustered, temperature=0.05).sample(q, 64, seed=0)
    assert (r.frontier_size > 0).all(), "a peaked clustered query went dense"
    assert (r.inner_products < 0.05 * len(clustered)).all()
    # uniform on the sphere in 32-d: nothing for the bounds to use, like real embeddings
    u = _unit(12000, 32, 13)
    uniform = TreeIndex.build(u, seed=0)
    r = SoftmaxSampler(uniform, temperature=0.05).sample(u[:4] + 0.02 * _unit(4, 32, 14), 64, seed=0)
    assert (r.frontier_size == 0).all(), "a query without structure stayed in the tree"
    assert (r.nodes_opened == 1).all(), "it spent tree work before going dense"


def test_plan_and_draws_do_not_depend_on_threads_or_batch():
    u = _unit(8000, 32, 15)
    index = TreeIndex.build(u, seed=0)
    # unit queries are peaked at T = 0.05 (dense); tiny ones flat (the tree's coarse
    # rejection is cheap for them)
    q = np.concatenate([u[:6], 0.01 * _unit(6, 32, 16)])[[0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]]
    sampler = SoftmaxSampler(index, temperature=0.05, dense_precision="bf16")
    a = sampler.sample(q, 32, seed=5)
    np.testing.assert_array_equal(a.frontier_size == 0, np.arange(12) % 2 == 0)
    before, tb = numba.get_num_threads(), torch.get_num_threads()
    try:
        numba.set_num_threads(1)
        torch.set_num_threads(1)
        b = sampler.sample(q, 32, seed=5)
    finally:
        numba.set_num_threads(before)
        torch.set_num_threads(tb)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.log_q, b.log_q)
    c = sampler.sample(q[::-1].copy(), 32, seed=5)  # another order: other streams, same paths
    np.testing.assert_array_equal(a.frontier_size == 0, (c.frontier_size == 0)[::-1])
    singles = [sampler.sample(q[i : i + 1], 32, seed=5).frontier_size[0] == 0 for i in range(q.shape[0])]
    np.testing.assert_array_equal(a.frontier_size == 0, singles)


def test_plan_argument_errors():
    index = TreeIndex.build(_unit(50, 4, 0))
    with pytest.raises(ValueError, match="plan"):
        SoftmaxSampler(index, temperature=1.0, plan="sometimes")
    with pytest.raises(ValueError, match="dense_precision"):
        SoftmaxSampler(index, temperature=1.0, dense_precision="int8")
    with pytest.raises(ValueError, match="plan_ratio"):
        SoftmaxSampler(index, temperature=1.0, plan_ratio=0)
