"""The issue-14 options of treeidx.codesearch.training: the loss's correction, the
full-softmax reference, the proposal temperature, the false-negative filter and its
statistics, and the time-based progress bar."""

from __future__ import annotations

import types

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from treeidx.codesearch import training
from treeidx.codesearch.encoder import DualEncoder
from treeidx.codesearch.training import TrainConfig, _batches, duplicate_groups, train

from ._codesearch_corpus import FAST, tiny_codesearch_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_codesearch_data(tmp_path_factory.mktemp("codesearch"))


def test_full_softmax_step_is_cross_entropy_over_all_targets(data):
    cfg = TrainConfig(steps=1, seed=4, **FAST)
    init = DualEncoder(data.query_features, data.target_features, **cfg.model_kwargs())
    rows = next(_batches(data.train, cfg.batch_size, cfg.seed))
    with torch.no_grad():
        q = init.encode_queries(rows)
        t = init.encode_targets(np.arange(data.n_targets))
        want = F.cross_entropy(q @ t.T / cfg.temperature, torch.from_numpy(data.query_target[rows]))
    r = train(data, "full", cfg)
    assert r.losses[0] == pytest.approx(float(want), rel=1e-5)


def test_oracle_fresh_correction_is_its_own_log_q(data):
    # the oracle draws from the fresh softmax itself, so replacing its log_q by the
    # model's fresh log-softmax changes nothing (beyond float rounding)
    cfg = TrainConfig(steps=4, warmup_steps=1, seed=2, **FAST)
    a = train(data, "oracle", cfg)
    b = train(data, "oracle", TrainConfig(**{**cfg.__dict__, "correction": "fresh"}))
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-4)
    c = train(data, "oracle", TrainConfig(**{**cfg.__dict__, "correction": "none"}))
    assert c.losses[0] == a.losses[0] and c.losses[1] != pytest.approx(a.losses[1], rel=1e-3)
    # "fresh" re-encodes every target each step for the sampler's bookkeeping
    cache = train(data, "cache", TrainConfig(**{**cfg.__dict__, "correction": "fresh"}))
    assert cache.targets_encoded_per_step == pytest.approx((64 + 3 * data.n_targets) / 3)


def test_proposal_temperature_reaches_the_samplers(data, monkeypatch):
    seen = []
    real = training.BruteForceSampler

    def spy(*a, **kw):
        seen.append(kw["temperature"])
        return real(*a, **kw)

    monkeypatch.setattr(training, "BruteForceSampler", spy)
    cfg = TrainConfig(steps=3, seed=1, **FAST)
    same = train(data, "oracle", TrainConfig(**{**cfg.__dict__, "proposal_temperature": cfg.temperature}))
    base = train(data, "oracle", cfg)
    flat = train(data, "oracle", TrainConfig(**{**cfg.__dict__, "proposal_temperature": 0.5}))
    assert seen == [cfg.temperature, cfg.temperature, 0.5]
    assert same.losses == base.losses and flat.losses[1:] != base.losses[1:]
    assert TrainConfig(proposal_temperature=0.2).sampler_temperature == 0.2
    assert TrainConfig().sampler_temperature == TrainConfig().temperature


def test_false_negative_filter_and_statistics(data):
    cfg = TrainConfig(steps=3, seed=1, **FAST)
    r = train(data, "oracle", cfg)
    st = r.sampler_stats
    assert 0 <= st["neg_exact_dup_rate"] <= st["neg_near_dup_rate"] <= 1 and 0 <= st["neg_above_pos_rate"] <= 1
    # with fresh vectors, a margin of 0 leaves no sampled negative scoring at or above its positive
    f = train(data, "oracle", TrainConfig(**{**cfg.__dict__, "false_negative_margin": 0.0}))
    assert f.sampler_stats["neg_above_pos_rate"] == 0.0
    t = train(data, "treeidx", TrainConfig(**{**cfg.__dict__, "false_negative_margin": 0.05}))
    assert all(np.isfinite(t.losses))
    with pytest.raises(ValueError, match="false_negative_margin"):
        train(data, "cache", TrainConfig(**{**cfg.__dict__, "false_negative_margin": 0.1}))
    for bad in (
        dict(false_negative_margin=-0.1),
        dict(correction="logQ"),
        dict(proposal_temperature=0.0),
        dict(near_duplicate_cosine=1.5),
    ):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_duplicate_groups():
    rows = [[1, 2], [3], [1, 2], [1, 2], [3, 4], [3]]
    m = sp.lil_matrix((6, 8), dtype=np.float32)
    for i, r in enumerate(rows):
        m[i, r] = 1.0
    m[3, 2] = 2.0  # same buckets, another weight: not a duplicate
    g = duplicate_groups(types.SimpleNamespace(target_features=m.tocsr()))
    assert g.tolist() == [0, 1, 0, 3, 4, 1]


def test_progress_counts_seconds_when_time_limited(data, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, enabled, *, total, desc, unit="it"):
            self.total, self.unit, self.n = total, unit, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass

    monkeypatch.setattr(training, "progress_bar", Bar)
    train(data, "inbatch", TrainConfig(steps=10**9, time_limit_s=1.0, **FAST), progress=True)
    train(data, "inbatch", TrainConfig(steps=3, **FAST), progress=True)
    assert (bars[0].total, bars[0].unit, bars[0].n) == (1, "s", 1)
    assert (bars[1].total, bars[1].unit, bars[1].n) == (3, "step", 3)


def test_demo_plot_has_time_and_step_axes(tmp_path):
    pytest.importorskip("matplotlib")
    from treeidx.codesearch.demo import plot_histories

    runs = {
        "a": types.SimpleNamespace(history=[(10, 1.0, 0.1), (20, 2.5, 0.2)]),
        "b": types.SimpleNamespace(history=[(5, 2.0, 0.15)]),
    }
    seen = {}
    import matplotlib.figure

    real = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **kw):
        seen["axes"] = [(ax.get_xlabel(), [list(line.get_xdata()) for line in ax.get_lines()]) for ax in fig.axes]
        return real(fig, *a, **kw)

    import unittest.mock

    with unittest.mock.patch.object(matplotlib.figure.Figure, "savefig", spy):
        assert plot_histories(runs, str(tmp_path / "p.png"), title="t")
    (time_label, time_x), (step_label, step_x) = seen["axes"]
    assert "time" in time_label and time_x == [[1.0, 2.5], [2.0]]
    assert "steps" in step_label and step_x == [[10, 20], [5]]
    assert (tmp_path / "p.png").stat().st_size > 0


def test_treeidx_proposal_temperature_is_treeidx_only(data, monkeypatch):
    made = []
    real = training.TreeNegativeSampler

    def spy(*a, **kw):
        made.append((kw["temperature"], kw["proposal_temperature"]))
        return real(*a, **kw)

    monkeypatch.setattr(training, "TreeNegativeSampler", spy)
    cfg = TrainConfig(steps=3, seed=1, treeidx_proposal_temperature=0.2, **FAST)
    for s in ("treeidx", "treeidx-fresh"):
        train(data, s, cfg)
    assert made == [(cfg.temperature, 0.2), (cfg.temperature, 0.2)]
    assert cfg.sampler_temperature == cfg.temperature  # the baselines keep the loss's
    assert TrainConfig(proposal_temperature=0.3).treeidx_temperature == 0.3


def test_oracle_support_subset_draws_from_a_subset_softmax(data):
    # support_size: the oracle's softmax is restricted to a fresh random subset per step;
    # ratios of q within a row are the softmax's, the normaliser is the subset's (smaller)
    n_sub = 12
    cfg = TrainConfig(steps=1, seed=3, support_size=n_sub, **FAST)
    model = DualEncoder(data.query_features, data.target_features, **cfg.model_kwargs())
    strat = training._ADAPTERS["oracle"](model, cfg, training._Clock())
    strat.setup()
    rows = next(_batches(data.train, cfg.batch_size, cfg.seed))
    with torch.no_grad():
        q = model.encode_queries(rows)
        t = model.encode_targets(np.arange(data.n_targets))
    pos = torch.from_numpy(data.query_target[rows])
    neg = strat.negatives(7, q, pos)
    assert neg.ids.shape == (len(rows), cfg.k)
    assert torch.unique(neg.ids).numel() <= n_sub
    assert not (neg.ids == pos[:, None]).any()
    s = (q @ t.T).double() / cfg.temperature
    s[torch.arange(len(rows)), pos] = -float("inf")
    full = torch.log_softmax(s, 1).gather(1, neg.ids)
    lq = neg.log_q.double()
    assert (lq >= full - 1e-5).all() and (lq > full + 1e-3).any()
    got = lq - lq[:, :1]
    want = s.gather(1, neg.ids) - s.gather(1, neg.ids[:, :1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # a new step, a new subset; the same step, the same draws
    again = strat.negatives(7, q, pos)
    assert torch.equal(again.ids, neg.ids)
    assert not torch.equal(strat.negatives(8, q, pos).ids, neg.ids)


def test_support_size_refuses_the_options_it_would_not_apply():
    with pytest.raises(ValueError, match="fresh"):
        TrainConfig(support_size=10, correction="fresh")
    with pytest.raises(ValueError, match="false-negative"):
        TrainConfig(support_size=10, false_negative_margin=0.1)
