"""Dropout with ``nn.Dropout``'s distribution, cheaper on the CPU.

On the CPU ``nn.Dropout`` draws its mask with ``bernoulli_``, which took 2.6 ms for a [128, 50, 64] tensor (the
whole call 3.7 ms), against 1.0 ms for ``rand``'s uniform draws (1 thread; bench/RESULTS.md, session 16).  Each
element is kept when a float32 uniform draw on [0, 1) is at least ``p``, which happens with probability
``1 - p`` as in a Bernoulli(1 - p) draw, and kept elements are scaled by ``1 / (1 - p)``: the distribution of
``nn.Dropout``'s outputs, from a different random stream.  (Drawn in float32 whatever the tensor's dtype:
bfloat16's uniform draws lie on a 1/256 grid, which would bias the kept share.)  On other devices it is
``F.dropout``, one fused kernel there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Dropout", "dropout_mask"]


def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """``{0, 1 / (1 - p)}`` of ``like``'s shape, dtype and device: 0 with probability ``p``; ``p`` in [0, 1)."""
    keep = torch.rand(like.shape, device=like.device).ge_(p)
    return keep.to(like.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """``nn.Dropout(p)`` (not in place): identity in eval mode or at ``p == 0``, else ``x * dropout_mask`` on
    the CPU and ``F.dropout`` elsewhere.  ``p`` is checked where it is configured (``ModelConfig.dropout``)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * dropout_mask(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
