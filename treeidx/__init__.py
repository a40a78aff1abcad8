"""treeidx: exact and certified-approximate softmax negatives from a tree index.

Main entry points:
    TreeIndex       -- the index: build, insert, remove, update, search, save/load
    SoftmaxSampler  -- exact (rejection) or certified-approximate softmax samples
    NystromDrift    -- predict current target vectors from a few re-encoded landmarks
    DynamicIndex    -- tree + drift model + sampler that stays current during training
    treeidx.torch   -- TreeNegativeSampler, sampled_softmax_loss (import treeidx.torch)
"""
from __future__ import annotations

from .dynamic import DynamicIndex, RefreshPolicy
from .io import IndexFileError
from .nystrom import DriftError, DriftFit, NystromDrift
from .sampling import SampleResult, SoftmaxSampler
from .tree import InvariantError, TreeIndex

__version__ = "0.1.0"
__all__ = ["TreeIndex", "SoftmaxSampler", "SampleResult", "NystromDrift", "DriftFit", "DriftError",
           "DynamicIndex", "RefreshPolicy", "InvariantError", "IndexFileError", "__version__"]
