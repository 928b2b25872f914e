"""Next-item cross-entropy losses and the catalog-wide log-sum-exp they (and the soft value) share.

Pure functions on tensors: no modules, no lookups.  Conventions used throughout ``objectives``:

* ``mask`` [B] is 1 for a real row and 0 for a padding row; padding rows contribute nothing.
* a *masked mean* is ``sum_b mask_b * x_b / max(sum_b mask_b, 1)``, so an all-padding batch gives 0
  (and zero gradients) instead of NaN.
* ``log_q`` is the log of the *expected number of times* a candidate is drawn by the sampler,
  ``log(m * q(a))`` for ``m`` draws from the proposal ``q`` (TensorFlow's sampled-softmax convention).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

__all__ = [
    "masked_mean",
    "chunked_logsumexp",
    "full_softmax_ce",
    "sampled_softmax_ce",
]


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum(mask * x) / max(sum(mask), 1)`` over the leading dimension (plain mean when mask is None)."""
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def _lse_chunk(query: torch.Tensor, items: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.logsumexp(query @ items.T * scale, dim=-1)


def chunked_logsumexp(query: torch.Tensor, items: torch.Tensor, chunk: int, scale: float = 1.0) -> torch.Tensor:
    """``out_b = log sum_c exp(scale * <query_b, items_c>)`` over all ``C`` rows of ``items``, in chunks.

    query [B, D], items [C, D] -> [B].  With more than one chunk each chunk's scores are recomputed in the
    backward pass (activation checkpointing), so memory holds O(B * chunk) scores instead of O(B * C):
    that is the point of chunking, since autograd would otherwise keep every chunk's [B, chunk] logits.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    n = items.shape[0]
    if n == 0:
        raise ValueError("chunked_logsumexp needs at least one item")
    if n <= chunk:
        return _lse_chunk(query, items, scale)
    parts = []
    for start in range(0, n, chunk):
        part = items[start : start + chunk]
        if torch.is_grad_enabled() and (query.requires_grad or part.requires_grad):
            parts.append(checkpoint(_lse_chunk, query, part, scale, use_reentrant=False))
        else:
            parts.append(_lse_chunk(query, part, scale))
    return torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)


def full_softmax_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Weighted next-item cross-entropy over the full candidate set.

    ``L = sum_b m_b w_b (logsumexp_c z_bc - z_{b,t_b}) / max(sum_b m_b, 1)``

    logits [B, C], target [B] (column index into C), mask/weights [B] (weights default 1; they are
    treated as constants).  The caller leaves the padding item out of ``logits``.
    """
    ce = torch.logsumexp(logits, dim=-1) - logits.gather(1, target.long().view(-1, 1)).squeeze(1)
    if weights is not None:
        ce = ce * weights.detach()
    return masked_mean(ce, mask)


def sampled_softmax_ce(pos_logit: torch.Tensor, neg_logits: torch.Tensor,
                       log_q_pos: Optional[torch.Tensor] = None, log_q_neg: Optional[torch.Tensor] = None,
                       mask: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                       neg_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sampled softmax cross-entropy with log-q correction (Jean et al. 2015; Bengio & Senecal 2008).

    Corrected logits ``z'_c = z_c - log(m q(c))`` for the positive and each of the ``m`` negatives;
    ``L = sum_b m_b w_b (logsumexp(z'_{b,pos}, z'_{b,negs}) - z'_{b,pos}) / max(sum_b m_b, 1)``.

    pos_logit [B]; neg_logits [B, m]; log_q_pos [B] and log_q_neg [m] or [B, m] (None = no correction);
    neg_valid [B, m] bool (False drops a negative, e.g. an accidental hit equal to the positive).
    """
    pos = pos_logit if log_q_pos is None else pos_logit - log_q_pos
    neg = neg_logits if log_q_neg is None else neg_logits - log_q_neg
    if neg_valid is not None:
        neg = neg.masked_fill(~neg_valid, float("-inf"))
    all_logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
    ce = torch.logsumexp(all_logits, dim=-1) - pos
    if weights is not None:
        ce = ce * weights.detach()
    return masked_mean(ce, mask)
