"""The sampled-softmax loss with the log Q correction."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ._common import check_temperature

__all__ = ["sampled_softmax_loss"]


def sampled_softmax_loss(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None,
    *,
    log_q: torch.Tensor | None = None,
    temperature: float,
    in_batch_negatives: bool = True,
    reduction: str = "mean",
    pos_ids: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the positive against sampled (and in-batch) negatives.

    q (B, d) queries; pos (B, d) their positives' embeddings; neg (B, k, d) the sampled
    negatives' embeddings (or None / k = 0). Logits are <q, ·> / temperature, computed
    in at least float32; the positive is column 0.

    log Q correction (Bengio & Senécal 2008; Blanc & Rendle 2018): with log_q given,
    negative j's logit is s_j − log(k · Q(y_j)). Then
        Ẑ = e^{s+} + Σ_j e^{s_j} / (k Q(y_j)),   E[Σ_j e^{s_j} / (k Q(y_j))] = Σ_{y ≠ y+} e^{s_y}
    when Q's support is the targets other than the positive (sampler excludes it), or
    when Q covers all targets and draws equal to the positive are masked (accidental
    hits, below): Ẑ is unbiased for Z, so the loss is consistent as k → ∞. Subtracting
    log Q alone would count the negatives' mass k times. If Q is the softmax itself
    (over the targets other than the positive), every column's weight is exactly what it
    should be: each draw's loss equals the full softmax loss, and the gradient is
    unbiased for any k. log_q is a constant (detached): the proposal is not trained.
    log_q=None: no correction (logits s_j as they are; e.g. top-k hard negatives).

    in_batch_negatives (default True): the other rows' positives are extra negatives
    with no correction, as in MultipleNegativesRankingLoss; they cost nothing (already
    encoded) and alone they are the in-batch baseline (neg=None). Their inclusion
    probability is unknown, so they add their raw mass to Ẑ: Z is over-estimated by
    that mass (the DPR bias: popular targets are pushed down extra). With sampled
    negatives and log_q, pass False for the consistent estimator of the full-softmax
    loss; whether the extra mass helps or hurts the trained model is an empirical
    question (docs/training.md).

    Accidental hits (pos_ids (B,) and neg_ids (B, k) given): a sampled id equal to the
    row's positive, and an in-batch column whose positive id equals the row's own
    (other than the diagonal), get logit −inf.

    reduction: "mean" | "sum" | "none" (per-row losses, shape (B,)).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    temperature = check_temperature(temperature)
    if q.dim() != 2:
        raise ValueError(f"q: expected shape (B, d), got {tuple(q.shape)}")
    B, d = q.shape
    if pos.shape != (B, d):
        raise ValueError(f"pos: expected shape {(B, d)} like q, got {tuple(pos.shape)}")
    dt = torch.promote_types(torch.promote_types(q.dtype, pos.dtype), torch.float32)
    q = q.to(dt)
    pos = pos.to(dt)
    cols = [((q * pos).sum(-1) / temperature)[:, None]]  # (B, 1): the positive
    if neg is not None:
        if neg.dim() != 3 or neg.shape[0] != B or neg.shape[2] != d:
            raise ValueError(f"neg: expected shape ({B}, k, {d}), got {tuple(neg.shape)}")
        k = neg.shape[1]
        s = torch.einsum("bd,bkd->bk", q, neg.to(dt)) / temperature
        if log_q is not None:
            if log_q.shape != (B, k):
                raise ValueError(f"log_q: expected shape {(B, k)} like neg's first two dims, got {tuple(log_q.shape)}")
            if k:  # − log(k · Q(y_j))
                s = s - (log_q.detach().to(device=s.device, dtype=dt) + math.log(k))
        if neg_ids is not None:
            if pos_ids is None:
                raise ValueError("neg_ids given without pos_ids: accidental hits need both")
            if neg_ids.shape != (B, k):
                raise ValueError(f"neg_ids: expected shape {(B, k)}, got {tuple(neg_ids.shape)}")
            hit = neg_ids.to(s.device) == _pos_ids(pos_ids, B).to(s.device)[:, None]
            s = s.masked_fill(hit, -math.inf)
        cols.append(s)
    elif log_q is not None and log_q.numel():
        raise ValueError("log_q given without neg")
    if in_batch_negatives and B > 1:
        s = q @ pos.T / temperature  # (B, B); the diagonal is column 0 already
        same = torch.eye(B, dtype=torch.bool, device=s.device)
        if pos_ids is not None:
            p = _pos_ids(pos_ids, B).to(s.device)
            same = same | (p[:, None] == p[None, :])
        cols.append(s.masked_fill(same, -math.inf))
    logits = torch.cat(cols, dim=1)
    # cross-entropy with target column 0: logsumexp − positive logit (−inf columns add nothing)
    loss = torch.logsumexp(logits, dim=1) - logits[:, 0]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _pos_ids(pos_ids: Any, B: int) -> torch.Tensor:
    p = pos_ids if isinstance(pos_ids, torch.Tensor) else torch.as_tensor(np.asarray(pos_ids))
    if p.shape != (B,):
        raise ValueError(f"pos_ids: expected shape ({B},), got {tuple(p.shape)}")
    return p
