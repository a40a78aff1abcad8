"""bench.step at toy size: every sampler runs, and the figures it reports are consistent."""

from __future__ import annotations

import torch

from bench import step


def test_step_benchmark_runs_every_sampler_at_toy_size():
    threads = torch.get_num_threads()
    try:
        res = step.main(
            [
                "--n",
                "4000",
                "--batch",
                "16",
                "--k",
                "4",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--pretrain",
                "3",
                "--refresh",
                "10",
                "--cache",
                "512",
                "--json",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    per = res["samplers"]
    assert set(per) == set(step.ALL_SAMPLERS)
    for name, v in per.items():
        assert v["step_ms"] >= v["sampling_ms"] >= 0.0, name
        assert abs(v["rest_ms"] - (v["step_ms"] - v["sampling_ms"])) < 1e-6
        assert v["torch_threads"] == res["torch_threads"], name  # treeidx left torch's setting alone
    assert per["uniform"]["added_vs_uniform_pct"] == 0.0
    q = res["approx_quality"]
    assert 0.0 <= q["tv_is"] <= 1.0 and q["tv_is"] <= q["tv_bound_mean"] + 5 * q["tv_is_se"] + 1e-9
    assert res["target"]["sampler"] == "tree_approx_prefetch"
