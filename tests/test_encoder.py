"""Tests for treeidx.codesearch.encoder: CSR -> EmbeddingBag inputs, towers, the dual encoder, the optimizer."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from treeidx.codesearch.encoder import BagTower, DualEncoder, bag_inputs, make_optimizer

NB = 97


def _csr(n: int, seed: int) -> sp.csr_matrix:
    x = sp.random(n, NB, density=0.08, format="csr", dtype=np.float32, random_state=seed)
    x.data += 1.0  # like 1 + log tf
    x = x.tolil()
    x[3] = 0  # an empty row
    return x.tocsr()


@pytest.fixture()
def feats():
    return _csr(40, 0), _csr(30, 1)


@pytest.mark.parametrize("rows", [np.array([5, 3, 3, 0, 39]), torch.tensor([7, 1]), slice(2, 9), range(0, 40, 3)])
def test_bag_inputs_equal_dense_reference(feats, rows):
    x = feats[0]
    bag = torch.nn.EmbeddingBag(NB, 6, mode="sum")
    with torch.no_grad():
        got = bag(*bag_inputs(x, rows)[:2], per_sample_weights=bag_inputs(x, rows)[2]).numpy()
    idx = np.arange(40)[rows.numpy() if isinstance(rows, torch.Tensor) else rows]
    ref = x.toarray()[idx] @ bag.weight.detach().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_bag_inputs_bad_rows(feats):
    with pytest.raises(ValueError, match="indices in"):
        bag_inputs(feats[0], np.array([0, 40]))
    with pytest.raises(ValueError, match="integer"):
        bag_inputs(feats[0], np.array([0.5]))


@pytest.mark.parametrize("bag_dim", [None, 12])
def test_tower_is_normalised_projection(feats, bag_dim):
    x = feats[0]
    tower = BagTower(NB, 8, bag_dim=bag_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tower.encode(x, np.arange(40)).numpy()
    h = x.toarray() @ tower.bag.weight.detach().numpy()
    if bag_dim is not None:
        h = h @ tower.proj.weight.detach().numpy().T
    norm = np.linalg.norm(h, axis=1, keepdims=True)
    ref = np.divide(h, norm, out=np.zeros_like(h), where=norm > 0)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)
    assert out.dtype == np.float32 and tower.dim == 8
    nonempty = np.diff(x.indptr) > 0
    np.testing.assert_allclose(np.linalg.norm(out[nonempty], axis=1), 1, atol=1e-5)
    assert not out[3].any()  # an empty bag encodes to 0


def test_dual_encoder_encodes_and_is_seeded(feats):
    q, t = feats
    enc = DualEncoder(q, t, dim=8, seed=3)
    v = enc.encode_targets(np.array([1, 2]))
    assert v.requires_grad and v.shape == (2, 8)
    allt = enc.encode_all_targets(batch_size=7)
    assert not allt.requires_grad and allt.shape == (30, 8) and allt.dtype == torch.float32
    assert torch.equal(allt, enc.encode_all_targets())  # chunking does not matter
    torch.testing.assert_close(allt[[1, 2]], v.detach())
    torch.testing.assert_close(enc.encode_all_queries(np.array([4, 0])), enc.encode_queries([4, 0]).detach())
    # same init for both towers by default; independent on request; seeded
    torch.testing.assert_close(enc.query_tower.bag.weight, enc.target_tower.bag.weight)
    other = DualEncoder(q, t, dim=8, seed=3, same_init=False)
    assert not torch.equal(other.query_tower.bag.weight, other.target_tower.bag.weight)
    assert all(
        torch.equal(a, b)
        for a, b in zip(DualEncoder(q, t, dim=8, seed=3).state_dict().values(), enc.state_dict().values())
    )
    assert not torch.equal(DualEncoder(q, t, dim=8, seed=4).query_tower.bag.weight, enc.query_tower.bag.weight)


def test_checkpoint_round_trip(feats):
    q, t = feats
    enc = DualEncoder(q, t, dim=8, bag_dim=16, seed=1)
    opt = make_optimizer(enc, 0.05)
    enc.encode_targets(np.arange(30)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save({"hparams": enc.hparams, "state": enc.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    back = DualEncoder(q, t, **ck["hparams"])
    back.load_state_dict(ck["state"])
    assert torch.equal(back.encode_all_targets(), enc.encode_all_targets())
    assert torch.equal(back.encode_all_queries(), enc.encode_all_queries())


@pytest.mark.parametrize("sparse", [False, True])
def test_optimizer_steps_every_parameter(feats, sparse):
    q, t = feats
    enc = DualEncoder(q, t, dim=8, bag_dim=16, sparse=sparse, seed=0)
    opt = make_optimizer(enc, 0.01)
    kinds = sorted(type(o).__name__ for o in opt)
    assert kinds == (["Adam", "SparseAdam"] if sparse else ["Adam"])
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    loss = -(enc.encode_queries(np.arange(10)) * enc.encode_targets(np.arange(10))).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = enc.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    opt.load_state_dict(opt.state_dict())
    opt.zero_grad()
    assert all(p.grad is None for p in enc.parameters())


def test_shared_tower(feats):
    q, t = feats
    enc = DualEncoder(q, t, dim=8, shared=True)
    assert enc.query_tower is enc.target_tower
    opt = make_optimizer(enc, 0.01)
    assert sum(len(g["params"]) for o in opt for g in o.param_groups) == 1  # counted once


def test_bad_inputs(feats):
    q, t = feats
    with pytest.raises(TypeError, match="CSR"):
        DualEncoder(q.toarray(), t)
    with pytest.raises(ValueError, match="one hash space"):
        DualEncoder(q[:, :50], t)
    with pytest.raises(ValueError, match="dim"):
        DualEncoder(q, t, dim=0)
    with pytest.raises(ValueError, match="lr"):
        make_optimizer(DualEncoder(q, t), 0.0)
