"""treeidx: exact and certified-approximate softmax negatives from a tree index."""
from __future__ import annotations

__version__ = "0.1.0"
