"""treeidx: exact and certified-approximate softmax negatives from a tree index.

Main entry points:
    TreeIndex       -- the index: build, insert, remove, update, search, save/load
    SoftmaxSampler  -- exact (rejection) or certified-approximate softmax samples
    NystromDrift    -- predict current target vectors from a few re-encoded landmarks
    CorrectorDrift  -- ... or with a small network trained on the pairs the loop encodes anyway
    DriftModel      -- the interface DynamicIndex takes (either model, or your own)
    DynamicIndex    -- tree + drift model + sampler that stays current during training
    treeidx.torch   -- TreeNegativeSampler, sampled_softmax_loss (import treeidx.torch)

The code-search training job (imported on demand; docs/training.md):
    treeidx.codesearch -- CodeSearchData: docstring -> code retrieval data, hashed features
    treeidx.encoder    -- DualEncoder, BagTower, make_optimizer (torch)
    treeidx.training   -- train(data, strategy, TrainConfig) -> TrainResult, evaluate
"""

from __future__ import annotations

from ._version import __version__
from .corrector import CorrectorDrift
from .drift import DriftFit, DriftModel, DriftReport
from .dynamic import DynamicIndex, RefreshPolicy
from .io import IndexFileError
from .nystrom import DriftError, NystromDrift
from .sampling import PlanComparison, SampleResult, SoftmaxSampler
from .tree import InvariantError, SearchWork, TreeIndex

__all__ = [
    "TreeIndex",
    "SearchWork",
    "SoftmaxSampler",
    "SampleResult",
    "PlanComparison",
    "NystromDrift",
    "CorrectorDrift",
    "DriftModel",
    "DriftFit",
    "DriftReport",
    "DriftError",
    "DynamicIndex",
    "RefreshPolicy",
    "InvariantError",
    "IndexFileError",
    "__version__",
]
