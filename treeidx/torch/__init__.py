"""treeidx's PyTorch layer: negatives for a training step, the loss, and the baselines.

    TreeNegativeSampler   softmax negatives from a TreeIndex / DynamicIndex (prefetch,
                          checkpoints, per-rank seeds)
    sampled_softmax_loss  cross-entropy against sampled (and in-batch) negatives with
                          the log Q correction
    Negatives             what every sampler returns: ids and log_q on the queries' device
    UniformSampler, InBatch, StaleTopK, NegativeCache, BruteForceSampler
                          the usual alternatives, behind the same `sample` call
    GlobalContrastiveBatchSampler, TreeBatchSampler
                          hard batches instead of (or beside) hard negatives: which
                          pairs share a batch (DataLoader(batch_sampler=...))

Import it as a module of its own (`import treeidx.torch as tt`): `import treeidx`
alone never loads torch.
"""

from __future__ import annotations

from ._common import Negatives
from .baselines import BruteForceSampler, InBatch, NegativeCache, StaleTopK, UniformSampler
from .batching import GlobalContrastiveBatchSampler, TreeBatchSampler
from .loss import sampled_softmax_loss
from .sampler import HostSampler, TreeNegativeSampler

__all__ = [
    "Negatives",
    "TreeNegativeSampler",
    "HostSampler",
    "sampled_softmax_loss",
    "UniformSampler",
    "InBatch",
    "StaleTopK",
    "NegativeCache",
    "BruteForceSampler",
    "GlobalContrastiveBatchSampler",
    "TreeBatchSampler",
]
