"""What every negative sampler of the torch layer shares: the `Negatives` record and
the checks that turn a training loop's tensors into host arrays."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._validate import check_k, check_positive  # noqa: F401  (check_k: shared by the samplers)
from ..sampling import SampleResult


@dataclass
class Negatives:
    """Negatives for one batch of B queries.

    ids:    (B, k) int64 target ids, on the queries' device.
    log_q:  (B, k) log-probability of each id under the distribution it was drawn from
            (float64 for float64 queries, else float32: half precision is too coarse
            for a log-probability), on the queries' device. Pass it to
            `sampled_softmax_loss(log_q=...)`.
    result: the host-side `SampleResult` (certified log Z interval, tv_bound, work
            counters) when the negatives come from a tree sampler; None otherwise.
    excluded: (B,) int64 number of targets a false-negative filter excluded per row
            beside the positive (None without a filter).
    """

    ids: torch.Tensor
    log_q: torch.Tensor
    result: SampleResult | None = field(default=None, repr=False, compare=False)
    excluded: torch.Tensor | None = field(default=None, repr=False, compare=False)


def check_queries(query_emb: Any, dim: int | None = None) -> torch.Tensor:
    """The (B, d) floating-point query tensor, detached from autograd."""
    if not isinstance(query_emb, torch.Tensor):
        raise TypeError(f"query_emb: expected a torch.Tensor, got {type(query_emb).__name__}")
    if query_emb.dim() != 2:
        raise ValueError(f"query_emb: expected shape (B, d), got {tuple(query_emb.shape)}")
    if not query_emb.is_floating_point():
        raise ValueError(f"query_emb: expected a floating-point tensor, got {query_emb.dtype}")
    if dim is not None and query_emb.shape[1] != dim:
        raise ValueError(f"query_emb: expected dimension {dim}, got {query_emb.shape[1]}")
    return query_emb.detach()


def check_positives(positive_ids: Any, batch: int) -> torch.Tensor | None:
    """positive_ids as a (B,) int64 tensor (None stays None)."""
    if positive_ids is None:
        return None
    if not isinstance(positive_ids, torch.Tensor):
        positive_ids = torch.as_tensor(np.asarray(positive_ids))
    if positive_ids.dim() != 1 or positive_ids.shape[0] != batch:
        raise ValueError(f"positive_ids: expected shape ({batch},) (one per query), got {tuple(positive_ids.shape)}")
    if positive_ids.is_floating_point() or positive_ids.is_complex() or positive_ids.dtype == torch.bool:
        raise ValueError(f"positive_ids: expected an integer tensor, got {positive_ids.dtype}")
    return positive_ids.detach().to(torch.int64)


def log_q_dtype(query_emb: torch.Tensor) -> torch.dtype:
    """float64 for float64 queries, else float32 (a bf16 log-probability is off by ~0.05)."""
    return torch.float64 if query_emb.dtype == torch.float64 else torch.float32


def host_queries(query_emb: torch.Tensor) -> np.ndarray:
    """A float32 host copy of the queries (fp16/bf16 are widened: numpy has no bf16)."""
    return query_emb.detach().to(device="cpu", dtype=torch.float32).numpy()


def empty_negatives(query_emb: torch.Tensor, k: int) -> Negatives:
    B = query_emb.shape[0]
    return Negatives(
        ids=torch.empty((B, k), dtype=torch.int64, device=query_emb.device),
        log_q=torch.empty((B, k), dtype=log_q_dtype(query_emb), device=query_emb.device),
    )


def check_temperature(t: Any) -> float:
    return check_positive(t, "temperature")


def default_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


def check_margin(margin: Any) -> float | None:
    """A false-negative margin: None, or a finite number >= 0 (raw inner-product units)."""
    if margin is None:
        return None
    if (
        isinstance(margin, bool)
        or not isinstance(margin, (int, float, np.floating, np.integer))
        or not math.isfinite(margin)
        or margin < 0
    ):
        raise ValueError(f"false_negative_margin: expected None or a finite number >= 0, got {margin!r}")
    return float(margin)
