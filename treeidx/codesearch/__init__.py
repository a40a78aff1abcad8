"""The code-search application: treeidx's main job and its own test bed.

A docstring -> code retrieval task mined from the installed Python sources, a
hashed-bag dual encoder, and one training loop that runs every negative strategy
(treeidx and the baselines) behind the same interface. It uses the library only
through its public API; install its extra with `pip install 'treeidx[demo]'`.

    corpus    mine_code_corpus, hash_features: the raw corpus and its hashed features
    data      CodeSearchData: queries, targets, splits, cached features
    encoder   DualEncoder, BagTower, make_optimizer (torch)
    training  train(data, strategy, TrainConfig) -> TrainResult, evaluate
    demo      `treeidx demo`: treeidx negatives against in-batch, table and plot
"""

from __future__ import annotations

from .data import SPLITS, CodeSearchData, module_split

__all__ = ["CodeSearchData", "SPLITS", "module_split"]
