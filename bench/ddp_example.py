"""A DDP training loop with softmax negatives from a sharded index (docs/distributed.md).

    torchrun --nproc_per_node=2 bench/ddp_example.py --steps 30

Tiny synthetic retrieval task on CPU (gloo): targets are items with feature vectors,
queries are noisy views of a target; a query tower (trained with DistributedDataParallel)
and a target tower (the same module, shared) embed both. Each rank owns the targets
`shard_of(ids, world_size) == rank` and indexes their embeddings; a `ShardedSampler`
over the shards gives every rank negatives drawn from the softmax over *all* targets, and
`TreeNegativeSampler` prefetches the next batch's while the current step runs. Every
`--refresh` steps each rank re-encodes the targets it owns and writes them back
(`ShardedSampler.update`, collective). Prints one JSON line on rank 0: the loss and the
recall@1 over all targets before and after training.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from treeidx import TreeIndex
from treeidx.distributed import ShardedSampler, shard_of
from treeidx.torch import TreeNegativeSampler, sampled_softmax_loss


def make_data(n: int, d_in: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, d_in)).astype(np.float32)
    return feats, np.arange(n, dtype=np.int64)


def noisy(feats: np.ndarray, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return feats[ids] + 0.7 * rng.standard_normal((ids.size, feats.shape[1])).astype(np.float32)


def encode(tower: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.nn.functional.normalize(tower(torch.from_numpy(x)), dim=1).numpy()


def recall_at_1(tower, feats, ids, rng) -> float:
    """Over all targets, on this rank's copy of the model (the same on every rank)."""
    q = noisy(feats, ids[:500], rng)
    top = (encode(tower, q) @ encode(tower, feats).T).argmax(1)
    return float((top == ids[:500]).mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--refresh", type=int, default=10)
    a = p.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts it)
    torch.set_num_threads(1)
    feats, ids = make_data(a.n, 32)
    tower = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    model = DistributedDataParallel(tower)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    eval_rng = np.random.default_rng(123)
    before = recall_at_1(tower, feats, ids, np.random.default_rng(123))

    # this rank's shard: the targets it owns, embedded by the current model
    own = ids[shard_of(ids, world) == rank]
    index = TreeIndex.build(encode(tower, feats[own]), own, seed=rank)
    sharded = ShardedSampler(index, temperature=a.temperature, timeout=120)
    negatives = TreeNegativeSampler(sharded, k=a.k, temperature=a.temperature, seed=0)

    rng = np.random.default_rng([1, rank])  # each rank its own batches
    t0 = time.perf_counter()
    losses = []

    def batch():
        pos = rng.choice(ids, a.batch, replace=False)
        return torch.from_numpy(noisy(feats, pos, rng)), torch.from_numpy(pos)

    qx, pos = batch()
    with torch.no_grad():
        q_emb = torch.nn.functional.normalize(tower(qx), dim=1)
    negatives.submit(q_emb, pos)  # prefetch: collective, every rank submits in step
    for step in range(a.steps):
        neg = negatives.result()
        q = torch.nn.functional.normalize(model(qx), dim=1)
        p_emb = torch.nn.functional.normalize(model(torch.from_numpy(feats[pos.numpy()])), dim=1)
        n_emb = torch.nn.functional.normalize(model(torch.from_numpy(feats[neg.ids.numpy().ravel()])), dim=1)
        loss = sampled_softmax_loss(
            q,
            p_emb,
            n_emb.view(a.batch, a.k, -1),
            log_q=neg.log_q,
            temperature=a.temperature,
            in_batch_negatives=False,
            pos_ids=pos,
            neg_ids=neg.ids,
        )
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients over the ranks
        opt.step()
        losses.append(loss.detach().item())
        if (step + 1) % a.refresh == 0:
            # the model moved: each rank re-encodes the targets it owns (collective)
            sharded.update(encode(tower, feats[own]), own)
        qx, pos = batch()
        with torch.no_grad():
            q_emb = torch.nn.functional.normalize(tower(qx), dim=1)
        if step + 1 < a.steps:
            negatives.submit(q_emb, pos)
    after = recall_at_1(tower, feats, ids, eval_rng)
    negatives.close()
    if rank == 0:
        print(
            json.dumps(
                {
                    "world_size": world,
                    "targets": a.n,
                    "steps": a.steps,
                    "first_loss": losses[0],
                    "last_loss": float(np.mean(losses[-5:])),
                    "recall_at_1_before": before,
                    "recall_at_1_after": after,
                    "seconds": time.perf_counter() - t0,
                    "bytes_sent_rank0": sharded.bytes_sent,
                }
            )
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
