"""Candidate sampling shared by the reward model and the recommenders: the proposal ``q`` of sampled
candidate sets (:class:`NegativeSampler`), a chunked Gumbel-max draw from a softmax over the whole
catalog (:func:`catalog_gumbel_argmax`) and one draw per row of a probability table (:func:`draw_per_row`)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = ["NegativeSampler", "catalog_gumbel_argmax", "draw_per_row"]


class NegativeSampler:
    """Proposal ``q`` over items 1..num_items for sampled candidate sets (uniform or popularity).

    Popularity uses ``q(a) ∝ count(a) + 1`` (add-one smoothing keeps every item reachable and every log-q
    finite).  ``item_counts`` is indexed by item index (length num_items + 1; entry 0, the padding item, is
    ignored).  Held as plain CPU tensors, not module buffers: DMP would zero buffers of a meta-built model.
    """

    def __init__(self, num_items: int, kind: str = "uniform", item_counts: Optional[Sequence[float]] = None) -> None:
        self.num_items = int(num_items)
        self.kind = kind
        if kind == "uniform":
            probs = torch.full((self.num_items,), 1.0 / self.num_items, dtype=torch.float64)
        elif kind == "popularity":
            if item_counts is None:
                raise ValueError("negative_sampler='popularity' needs item_counts (length num_items + 1)")
            counts = torch.as_tensor(item_counts, dtype=torch.float64).flatten()
            if counts.numel() != self.num_items + 1:
                raise ValueError(
                    f"item_counts has length {counts.numel()}, expected num_items + 1 = {self.num_items + 1} "
                    "(indexed by item index, entry 0 = padding)"
                )
            if not torch.isfinite(counts).all() or (counts[1:] < 0).any():
                raise ValueError("item_counts must be finite and >= 0")
            smoothed = counts[1:] + 1.0
            probs = smoothed / smoothed.sum()
        else:
            raise ValueError(f"unknown negative sampler {kind!r}; choose 'uniform' or 'popularity'")
        # log q by item index; index 0 (padding, never sampled) gets the uniform value so that masked
        # padding rows stay finite.
        self._log_probs = torch.cat([torch.tensor([-math.log(self.num_items)], dtype=torch.float64), probs.log()]).float()
        self._probs = probs.float()
        self._cache: Dict[torch.device, tuple] = {}

    def _on(self, device: torch.device):
        if device not in self._cache:
            self._cache[device] = (self._probs.to(device), self._log_probs.to(device))
        return self._cache[device]

    def sample(self, m: int, device: torch.device) -> torch.Tensor:
        """``m`` item indices (1..num_items) drawn with replacement from ``q``."""
        probs, _ = self._on(device)
        if self.kind == "uniform":
            return torch.randint(1, self.num_items + 1, (m,), device=device)
        return torch.multinomial(probs, m, replacement=True) + 1

    def log_expected_count(self, items: torch.Tensor, m: int) -> torch.Tensor:
        """``log(m * q(a))`` for item indices ``items`` (the log-q correction)."""
        _, log_probs = self._on(items.device)
        return log_probs[items] + math.log(m)


@torch.no_grad()
def catalog_gumbel_argmax(query: torch.Tensor, items: torch.Tensor, alpha: float, chunk: int) -> torch.Tensor:
    """Sample ``a ~ softmax_a(<query, e_a>/alpha)`` over all rows of ``items`` by Gumbel-max, in chunks.

    query [B, D], items [C, D] -> indices [B] into ``items``; memory O(B * chunk).
    """
    best_val = torch.full((query.shape[0],), float("-inf"), device=query.device, dtype=query.dtype)
    best_idx = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    for start in range(0, items.shape[0], chunk):
        logits = query @ items[start : start + chunk].T / alpha
        u = torch.rand_like(logits).clamp_(1e-20, 1.0 - 1e-7)
        val, idx = (logits - torch.log(-torch.log(u))).max(dim=1)
        better = val > best_val
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + start, best_idx)
    return best_idx


@torch.no_grad()
def draw_per_row(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of ``probs`` [B, C] (non-negative weights, any scale), index i with probability
    ``probs[b, i] / sum_j probs[b, j]``, by the inverse CDF: the first i whose cumulative weight exceeds a
    uniform draw on [0, total).  Indices of zero weight are never drawn.  -> [B] (int64)

    The distribution of ``torch.multinomial(probs, 1)``, from a different random stream: on the CPU that draws an
    exponential per element (5 ms for [256, 1000], a sixth of a reward-model step; bench/RESULTS.md, session
    17), this one uniform per row."""
    cdf = probs.cumsum(dim=1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, device=probs.device, dtype=cdf.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # < total even after rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(1)
