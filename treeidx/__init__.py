"""treeidx: exact and certified-approximate softmax negatives from a tree index.

Main entry points:
    TreeIndex       -- the index: build, insert, remove, update, search, save/load
    SoftmaxSampler  -- exact (rejection) or certified-approximate softmax samples
"""
from __future__ import annotations

from .io import IndexFileError
from .sampling import SampleResult, SoftmaxSampler
from .tree import InvariantError, TreeIndex

__version__ = "0.1.0"
__all__ = ["TreeIndex", "SoftmaxSampler", "SampleResult", "InvariantError", "IndexFileError",
           "__version__"]
