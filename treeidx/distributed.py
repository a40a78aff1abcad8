"""`treeidx.distributed`: an index sharded over torch.distributed (see treeidx.torch.distributed).

    ShardedSampler   exact (or certified-approximate) softmax samples and exact top-k over
                     the union of every rank's shard; edits routed to the owning rank
    shard_of         the default id -> rank assignment
    ShardError       raised on every rank when another rank failed a collective call

It needs torch (it is part of the torch layer); `import treeidx` alone never loads it.
docs/distributed.md: how to shard, why the samples are exact, a DDP training loop.
"""

from __future__ import annotations

from .torch.distributed import ShardedSampler, ShardError, shard_of

__all__ = ["ShardedSampler", "ShardError", "shard_of"]
