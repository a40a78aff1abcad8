"""The README's training loop, run as written on a small stand-in model and data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

README = Path(__file__).resolve().parents[1] / "README.md"


def _loop() -> str:
    text = README.read_text()
    m = re.compile(r"<!-- readme-loop -->\n```python\n(.*?)```", re.S).search(text)
    assert m is not None, "README has no <!-- readme-loop --> python block"
    return m.group(1)


def test_readme_loop_trains_with_the_log_kq_correction():
    n, d, vocab, batch = 2_000, 8, 500, 16
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (n, 6), generator=g)
    q_tower = torch.nn.EmbeddingBag(vocab, d, mode="mean")
    t_tower = torch.nn.EmbeddingBag(vocab, d, mode="mean")
    target_ids = torch.randperm(n, generator=g) * 7 - 5_000  # sparse, unsorted, some negative
    row_of = {int(i): r for r, i in enumerate(target_ids)}

    def encode_targets(ids):
        rows = torch.tensor([row_of[int(i)] for i in ids])
        return torch.nn.functional.normalize(t_tower(tokens[rows]), dim=-1)

    def batches(steps):
        for _ in range(steps):
            rows = torch.randint(0, n, (batch,), generator=g)
            yield tokens[rows][:, :3], target_ids[rows]

    before = {k: v.detach().clone() for k, v in t_tower.state_dict().items()}
    ns = {
        "encode_targets": encode_targets,
        "target_ids": target_ids,
        "loader": batches(3),
        "encode_queries": lambda tok: torch.nn.functional.normalize(q_tower(tok), dim=-1),
        "opt": torch.optim.Adam([*q_tower.parameters(), *t_tower.parameters()], lr=1e-2),
    }
    exec(compile(_loop(), str(README), "exec"), ns)

    index, loss, seen = ns["index"], ns["loss"], ns["seen"]
    assert torch.isfinite(loss)
    assert not torch.equal(before["weight"], t_tower.weight)  # it trained
    index.check()
    # the written-back vectors are what the (final) target tower encoded for those ids
    with torch.no_grad():
        np.testing.assert_allclose(
            index.vectors(seen[:5]), ns["t"].flatten(0, 1).numpy()[ns["first"][:5]], rtol=1e-6, atol=1e-6
        )
    # the loop's loss is the log(k·Q)-corrected one, not a log Q-only variant
    neg, q, t = ns["neg"], ns["q"], ns["t"]
    k = neg.ids.shape[1]
    s = torch.einsum("bd,bkd->bk", q, t[:, 1:]) / 0.05 - neg.log_q - np.log(k)
    s = s.masked_fill(neg.ids == ns["pos_ids"][:, None], -np.inf)
    inb = q @ t[:, 0].T / 0.05
    same = ns["pos_ids"][:, None] == ns["pos_ids"][None, :]
    logits = torch.cat([(q * t[:, 0]).sum(-1, keepdim=True) / 0.05, s, inb.masked_fill(same, -np.inf)], 1)
    expect = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-5)
