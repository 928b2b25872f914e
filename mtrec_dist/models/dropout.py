"""Dropout with ``nn.Dropout``'s distribution, cheaper on the CPU.

``nn.Dropout`` draws its mask with ``bernoulli_``, which on the CPU took 2.6 ms for a [128, 50, 64] tensor
(the whole call 3.7 ms), against 1.0 ms for ``rand_like`` (1 thread; bench/RESULTS.md, session 16).  Each
element is kept when a uniform draw on [0, 1) is at least ``p``, which happens with probability ``1 - p``
exactly as in a Bernoulli(1 - p) draw, and kept elements are scaled by ``1 / (1 - p)``: the same
distribution of outputs as ``nn.Dropout``, from a different random stream.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Dropout", "dropout_mask"]


def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """``{0, 1 / (1 - p)}`` of ``like``'s shape, dtype and device: 0 with probability ``p``; ``p`` in [0, 1)."""
    return torch.rand_like(like).ge_(p).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """``nn.Dropout(p)`` (not in place): identity in eval mode or at ``p == 0``, else ``x * dropout_mask``."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * dropout_mask(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
