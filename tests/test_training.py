"""Tests for treeidx.codesearch.training: exact evaluation, determinism, every strategy, the loop's bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from treeidx.codesearch import CodeSearchData
from treeidx.codesearch.encoder import DualEncoder
from treeidx.codesearch.training import STRATEGIES, TrainConfig, evaluate, parse_strategy, train

from ._codesearch_corpus import FAST, tiny_codesearch_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_codesearch_data(tmp_path_factory.mktemp("codesearch"))


def _reference(model: DualEncoder, data: CodeSearchData, rows: np.ndarray) -> dict[str, float]:
    """Brute-force numpy metrics: rank = 1 + #targets scoring strictly higher."""
    t = model.encode_all_targets().numpy().astype(np.float64)
    q = model.encode_all_queries(rows).numpy().astype(np.float64)
    ranks = []
    for i, r in enumerate(rows):
        s = (t @ q[i]).astype(np.float32)  # the same float32 scores, computed apart
        ranks.append(1 + int((s > s[data.query_target[r]]).sum()))
    ranks = np.array(ranks)
    return {
        "recall@1": float(np.mean(ranks <= 1)),
        "recall@10": float(np.mean(ranks <= 10)),
        "mrr": float(np.mean(1.0 / ranks)),
    }


def test_evaluate_matches_brute_force(data):
    model = DualEncoder(data.query_features, data.target_features, dim=4, seed=0)  # weak: ranks spread
    got = evaluate(model, data, "val", chunk=7)
    ref = _reference(model, data, data.val)
    assert got["n_queries"] == data.val.size
    for key in ref:  # float32 vs float64 scores can swap near-ties only
        assert got[key] == pytest.approx(ref[key], abs=1.5 / data.val.size)
    sub = evaluate(model, data, "test", max_queries=5, seed=1)
    assert sub["n_queries"] == 5 and sub == evaluate(model, data, "test", max_queries=5, seed=1)


def test_evaluate_ties_favour_the_positive(data):
    model = DualEncoder(data.query_features, data.target_features, dim=4, seed=0)
    with torch.no_grad():  # every target and query the same vector: all tied, every rank 1
        model.query_tower.bag.weight.fill_(1.0)
        model.target_tower.bag.weight.fill_(1.0)
    m = evaluate(model, data, "train")
    assert m["recall@1"] == m["recall@10"] == m["mrr"] == 1.0


def test_training_learns_and_is_deterministic(data):
    cfg = TrainConfig(steps=40, lr=0.01, seed=5, **{**FAST, "eval_every": 20})
    a = train(data, "inbatch", cfg)
    b = train(data, "inbatch", cfg)
    assert a.losses == b.losses and len(a.losses) == 40
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert np.mean(a.losses[-5:]) < 0.5 * np.mean(a.losses[:5])
    assert [h[0] for h in a.history] == [20, 40] and a.history[0][1] <= a.history[1][1] <= a.train_s
    untrained = evaluate(DualEncoder(data.query_features, data.target_features, **cfg.model_kwargs()), data, "train")
    assert evaluate(a.model, data, "train")["mrr"] > untrained["mrr"]
    assert a.test["n_queries"] == data.test.size


def test_same_seed_same_start_and_batches_across_strategies(data):
    starts, firsts = {}, {}
    for s in ("inbatch", "uniform"):
        seen = []
        r = train(
            data,
            s,
            TrainConfig(steps=2, seed=3, **FAST),
            callback=lambda step, m: seen.append((step, {k: v.clone() for k, v in m.state_dict().items()})),
        )
        assert [st for st, _ in seen] == [0, 1, 2] and r.steps == 2
        starts[s] = seen[0][1]
        firsts[s] = r
    assert all(torch.equal(starts["inbatch"][k], starts["uniform"][k]) for k in starts["inbatch"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs(data, strategy):
    steps = 3
    r = train(data, strategy, TrainConfig(steps=steps, seed=1, **FAST))
    assert r.steps == steps and len(r.losses) == steps and all(math.isfinite(v) for v in r.losses)
    assert set(r.test) == {"recall@1", "recall@10", "mrr", "n_queries"}
    split = r.time_split
    assert min(split.values()) >= 0 or split["rest_s"] > -1e-6
    assert split["sampling_s"] + split["reencode_s"] + split["rest_s"] == pytest.approx(r.train_s)
    n, n_train = data.n_targets, data.train.size
    n_pos = np.unique(data.query_target[data.train]).size
    expected = {
        "inbatch": 0,
        "uniform": 0,
        "stale-topk": 2 * n,  # refreshed at steps 0 and 2
        "cache": 64,
        "treeidx": n + 2 * 20,  # initial encode + landmarks at steps 1, 2
        "treeidx-fresh": steps * n,
        "oracle": steps * n,
        "gcbs": n_train,  # every pair's positive (and query) once: 3 steps < 1 epoch
        "tree-batches": n_pos,  # its index of the distinct positives
        "gcbs+treeidx": n + 2 * 20 + n_train,
        "tree-batches+treeidx": n + 2 * 20,
        "full": 0,
    }[strategy]  # batches from treeidx's own index
    assert r.targets_encoded_per_step == pytest.approx(expected / steps)
    assert (r.sampler_mib > 0) == (strategy not in ("inbatch", "full"))
    assert r.to_dict()["strategy"] == strategy


def test_strategy_names():
    assert parse_strategy("treeidx") == (None, "treeidx")
    assert parse_strategy("gcbs") == ("gcbs", "inbatch")
    assert parse_strategy("tree-batches+treeidx") == ("tree-batches", "treeidx")
    assert parse_strategy("gcbs+cache") == ("gcbs", "cache")
    for bad in ("gcbs+", "gcbs+hardest", "hardest+treeidx", "treeidx+gcbs", "gcbs+tree-batches", 3):
        with pytest.raises(ValueError, match="strategy"):
            parse_strategy(bad)


def test_hard_batches_after_the_warmup(data):
    cfg = TrainConfig(steps=8, warmup_steps=3, seed=2, **FAST)
    base = train(data, "inbatch", cfg)
    for s in ("gcbs", "tree-batches"):
        r = train(data, s, cfg)
        assert r.losses[:3] == base.losses[:3] and r.losses[3:] != base.losses[3:]
        assert r.losses == train(data, s, cfg).losses  # deterministic
        # the same model after the warm-up, harder in-batch negatives than random batches
        assert r.inbatch_negative_cos > base.inbatch_negative_cos
        assert r.sampler_stats["batch_source"] == s and r.sampler_stats["batch_epochs"] == 1
    n_train = data.train.size
    per_epoch = -(-n_train // FAST["batch_size"])
    r = train(data, "gcbs", TrainConfig(steps=per_epoch + 1, seed=2, **FAST))  # 1 step into epoch 2
    assert r.sampler_stats["batch_epochs"] == 2 and r.sampler_stats["queries_encoded_for_batches"] == 2 * n_train
    assert r.time_split["reencode_s"] > 0 and r.sampler_stats["gcbs_last_graph"]["pairs"] == n_train
    r = train(data, "tree-batches", TrainConfig(steps=6, **{**FAST, "batch_refresh_every": 2, "batch_mix": 0.5}))
    assert r.sampler_stats["batch_regroups"] == 3
    for bad in (dict(batch_mix=2.0), dict(gcbs_similarity="l2"), dict(gcbs_neighbors=0), dict(batch_refresh_every=0)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_warmup_is_inbatch_then_the_strategy(data):
    cfg = TrainConfig(steps=5, warmup_steps=3, seed=2, **FAST)
    a = train(data, "inbatch", cfg)
    b = train(data, "uniform", cfg)
    assert a.losses[:3] == b.losses[:3] and a.losses[3:] != b.losses[3:]
    t = train(data, "treeidx", cfg)  # set up at step 3 (all targets), landmarks at step 4
    assert t.losses[:3] == a.losses[:3]
    assert t.targets_encoded_per_step == pytest.approx((data.n_targets + 20) / 2)
    never = train(data, "treeidx", TrainConfig(steps=2, warmup_steps=5, seed=2, **FAST))
    assert never.sampler_mib == 0 and never.sampler_stats == {} and never.losses == a.losses[:2]


def test_treeidx_refresh_options(data):
    n = data.n_targets
    r = train(data, "treeidx", TrainConfig(steps=5, full_refresh_every=2, **FAST))
    assert r.sampler_stats["full_refreshes"] == 2  # steps 2 and 4; landmarks at 1 and 3
    assert r.targets_encoded_per_step == pytest.approx((3 * n + 2 * 20) / 5)
    assert r.sampler_stats["drift_error_median"] >= 0
    r = train(data, "treeidx", TrainConfig(steps=4, **{**FAST, "max_drift_error": 1e-9}))
    assert r.sampler_stats["full_refreshes"] >= 1  # the first write-back's error is over the bar
    r = train(data, "treeidx", TrainConfig(steps=4, **{**FAST, "max_drift_error": 1e9}))
    assert r.sampler_stats["full_refreshes"] == 0
    r = train(data, "treeidx", TrainConfig(steps=3, write_back=False, **FAST))
    assert {k: r.sampler_stats[k] for k in ("full_refreshes", "drift_error_median", "drift_error_max")} == {
        "full_refreshes": 0,
        "drift_error_median": None,
        "drift_error_max": None,
    }


def test_eval_every_seconds(data):
    r = train(data, "inbatch", TrainConfig(steps=4, **{**FAST, "eval_every_s": 1e-9}))
    assert [h[0] for h in r.history] == [1, 2, 3, 4]  # due after every step
    r = train(data, "inbatch", TrainConfig(steps=4, **{**FAST, "eval_every_s": 1e9}))
    assert [h[0] for h in r.history] == [4]  # only the final one
    with pytest.raises(ValueError, match="eval_every_s"):
        TrainConfig(eval_every_s=0.0)


def test_time_limit_and_bad_arguments(data):
    r = train(data, "inbatch", TrainConfig(steps=10**6, time_limit_s=0.3, **FAST))
    assert 0 < r.steps < 10**6 and r.train_s >= 0.3
    with pytest.raises(ValueError, match="strategy"):
        train(data, "hardest", TrainConfig(**FAST))
    with pytest.raises(ValueError, match="in_batch_negatives"):
        train(data, "inbatch", TrainConfig(in_batch_negatives=False, **FAST))
    with pytest.raises(ValueError, match="k="):
        train(data, "uniform", TrainConfig(**{**FAST, "k": data.n_targets}))
    for bad in (
        dict(k=0),
        dict(batch_size=0),
        dict(temperature=0.0),
        dict(sampler_mode="fast"),
        dict(lr=-1.0),
        dict(seed=-1),
        dict(time_limit_s=0.0),
        dict(n_landmarks=0),
    ):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="split"):
        evaluate(DualEncoder(data.query_features, data.target_features), data, "dev")


def test_demo_takes_hard_batch_strategies(data, monkeypatch, tmp_path, capsys):
    import argparse
    import json

    from treeidx.codesearch import demo

    monkeypatch.setattr(CodeSearchData, "load", classmethod(lambda cls, **kw: data))
    monkeypatch.setattr(demo, "demo_config", lambda: TrainConfig(warmup_steps=2, **FAST))
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    args = p.parse_args(
        [
            "--strategies",
            "gcbs,tree-batches+treeidx",
            "--steps",
            "4",
            "--batch-mix",
            "0.25",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert demo.run(args) == 0
    out = json.loads((tmp_path / "results.json").read_text())
    assert set(out) == {"gcbs", "tree-batches+treeidx"}
    assert all(r["steps"] == 4 and r["config"]["batch_mix"] == 0.25 for r in out.values())
    assert "s/step" in capsys.readouterr().out
