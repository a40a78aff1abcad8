"""Proposal options of the torch samplers (issue 14): a proposal temperature different
from the index's, and the exact false-negative filter. Each checks the property the
loss relies on: log_q is the log-probability of the distribution actually drawn from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from treeidx import DynamicIndex, SoftmaxSampler, TreeIndex
from treeidx.torch import BruteForceSampler, TreeNegativeSampler
from treeidx.torch.sampler import within_margin

P_MIN = 1e-4  # a correct sampler fails a fixed-seed goodness-of-fit test with probability ~1e-4


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def setup():
    x = unit(400, 8, 1)
    ids = np.arange(400) + 1000
    q = torch.from_numpy(2.0 * x[[3, 50, 170]] + 0.2 * unit(3, 8, 2))
    pos = torch.tensor([1003, 1050, 1170])
    return x, ids, TreeIndex.build(x, ids, seed=0), q, pos


def log_softmax(q, x, T, masked):
    """float64 log-softmax of each row over x, with masked[b] ids (rows of x) removed."""
    s = q.double().numpy() @ x.T.astype(np.float64) / T
    for b, m in enumerate(masked):
        s[b, m] = -np.inf
    return s - np.logaddexp.reduce(s, axis=1, keepdims=True)


def fits(rows, logp, k):
    """Chi-square of the drawn rows against exp(logp) (small cells pooled)."""
    p = np.exp(logp)
    counts = np.bincount(rows, minlength=p.size)
    assert counts[p == 0].sum() == 0  # nothing outside the support
    big = p * k >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp_ = np.append(p[big], p[~big].sum()) * k
    keep = exp_ > 0
    return stats.chisquare(obs[keep], exp_[keep] * obs[keep].sum() / exp_[keep].sum()).pvalue


@pytest.mark.parametrize("T_prop", [0.05, 0.2, 0.5])
def test_proposal_temperature_log_q_matches_what_is_drawn(setup, T_prop):
    x, ids, index, q, pos = setup
    s = TreeNegativeSampler(index, k=20000, temperature=0.1, proposal_temperature=T_prop, prefetch=False, seed=3)
    negs = s.sample(q, pos)
    rows = negs.ids.numpy() - 1000
    logp = log_softmax(q, x, T_prop, [[r] for r in pos.numpy() - 1000])
    width = negs.result.log_z[:, 1] - negs.result.log_z[:, 0]
    for b in range(3):
        assert np.abs(negs.log_q[b].double().numpy() - logp[b, rows[b]]).max() <= width[b] + 1e-4
        assert fits(rows[b], logp[b], s.k) > P_MIN
    # the same draws as a sampler built at T_prop: scaling the queries is that proposal
    ref = TreeNegativeSampler(index, k=20000, temperature=T_prop, prefetch=False, seed=3).sample(q, pos)
    agree = (ref.ids == negs.ids).float().mean()
    assert agree > 0.99  # float32 rounding of q·T/T' can move a draw across a CDF step


def test_proposal_temperature_with_a_dynamic_index(setup):
    x, ids, _, q, pos = setup
    dyn = DynamicIndex.build(x, ids, n_landmarks=16, landmarks="uniform", temperature=0.1, seed=0)
    s = TreeNegativeSampler(dyn, k=20000, temperature=0.1, proposal_temperature=0.3, prefetch=False, seed=1)
    negs = s.sample(q, pos)
    logp = log_softmax(q, dyn.predict(ids), 0.3, [[r] for r in pos.numpy() - 1000])
    for b in range(3):
        r = negs.ids[b].numpy() - 1000
        np.testing.assert_allclose(negs.log_q[b].double().numpy(), logp[b, r], atol=2e-3)
        assert fits(r, logp[b], s.k) > P_MIN


@pytest.mark.parametrize("margin", [0.0, 0.15, 0.4])
def test_false_negative_filter_is_exact(setup, margin):
    x, ids, index, q, pos = setup
    T = 0.1
    s = TreeNegativeSampler(index, k=20000, temperature=T, false_negative_margin=margin, prefetch=False, seed=7)
    negs = s.sample(q, pos)
    sc = q.double().numpy() @ x.T.astype(np.float64)
    p_rows = pos.numpy() - 1000
    masked = []
    for b in range(3):
        near = np.flatnonzero(sc[b] >= sc[b, p_rows[b]] - margin)
        masked.append(near)  # the positive itself is in it
        assert int(negs.excluded[b]) == near.size - 1
        got = negs.ids[b].numpy() - 1000
        # nothing within the margin comes back
        assert (sc[b, got] < sc[b, p_rows[b]] - margin).all()
    logp = log_softmax(q, x, T, masked)
    width = negs.result.log_z[:, 1] - negs.result.log_z[:, 0]
    for b in range(3):
        r = negs.ids[b].numpy() - 1000
        # renormalised over what is left: the log-probabilities are those of the filtered softmax
        assert np.abs(negs.log_q[b].double().numpy() - logp[b, r]).max() <= width[b] + 1e-4
        assert fits(r, logp[b], s.k) > P_MIN
    if margin == 0.4:
        assert int(negs.excluded.sum()) > 0  # the test exercises a real exclusion


def test_within_margin_doubles_k_until_the_threshold_is_passed(setup):
    x, ids, index, q, pos = setup
    sampler = SoftmaxSampler(index, temperature=0.1)
    got = within_margin(sampler, q.numpy(), pos.numpy(), 1.2, first_k=2)
    sc = q.numpy() @ x.T
    for b in range(3):
        p = pos[b].item() - 1000
        want = np.flatnonzero(sc[b] >= sc[b, p] - 1.2)
        assert sorted(got[b] - 1000) == sorted(set(want) - {p})
        assert want.size > 8  # more than a few doublings of first_k=2


def test_brute_force_false_negative_filter_and_proposal_temperature():
    x = unit(300, 6, 4)
    ids = np.arange(300)[::-1].copy() * 2  # unsorted ids: the positive's row is looked up
    q = torch.from_numpy(2.0 * x[[10, 20]] + 0.1 * unit(2, 6, 5))
    pos = torch.tensor([ids[10], ids[20]])
    margin, T_prop = 0.3, 0.25
    s = BruteForceSampler(
        torch.from_numpy(x), ids, k=20000, temperature=T_prop, chunk_size=64, seed=2, false_negative_margin=margin
    )
    negs = s.sample(q, pos)
    sc = q.double().numpy() @ x.T.astype(np.float64)
    masked = [np.flatnonzero(sc[b] >= sc[b, (10, 20)[b]] - margin) for b in range(2)]
    assert all(m.size > 1 for m in masked)
    logp = log_softmax(q, x, T_prop, masked)
    row_of = {int(v): i for i, v in enumerate(ids)}
    for b in range(2):
        r = np.array([row_of[int(v)] for v in negs.ids[b]])
        assert not np.isin(r, masked[b]).any()
        np.testing.assert_allclose(negs.log_q[b].double().numpy(), logp[b, r], atol=2e-5)
        assert fits(r, logp[b], s.k) > P_MIN


def test_option_errors(setup):
    _, _, index, _, _ = setup
    with pytest.raises(ValueError, match="proposal_temperature|temperature"):
        TreeNegativeSampler(index, k=2, temperature=0.1, proposal_temperature=0.0)
    for bad in (-0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="false_negative_margin"):
            TreeNegativeSampler(index, k=2, temperature=0.1, false_negative_margin=bad)
    with pytest.raises(ValueError, match="exclude_positives"):
        TreeNegativeSampler(index, k=2, temperature=0.1, false_negative_margin=0.1, exclude_positives=False)
    with pytest.raises(ValueError, match="false_negative_margin"):
        BruteForceSampler(torch.zeros(3, 2), k=1, temperature=1.0, false_negative_margin=-1)
    s = BruteForceSampler(torch.eye(3), k=1, temperature=1.0, false_negative_margin=0.1)
    with pytest.raises(ValueError, match="not among"):
        s.sample(torch.ones(1, 3), torch.tensor([7]))


def test_state_dict_keeps_proposal_options(setup):
    _, _, index, q, pos = setup
    a = TreeNegativeSampler(
        index, k=4, temperature=0.1, proposal_temperature=0.2, false_negative_margin=0.1, prefetch=False, seed=9
    )
    a.sample(q, pos)
    b = TreeNegativeSampler(index, k=4, temperature=0.1, prefetch=False)
    b.load_state_dict(a.state_dict())
    assert (b.proposal_temperature, b.false_negative_margin) == (0.2, 0.1)
    assert torch.equal(a.sample(q, pos).ids, b.sample(q, pos).ids)
