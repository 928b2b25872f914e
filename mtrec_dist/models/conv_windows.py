"""Which positions each NextItNet block must compute, when only the last block's last position is read.

A dilated causal convolution's output at position t reads positions t, t - d, ..., t - (K-1) d.  Walked back
from the encoder's output (the last position of the last block), each block needs its outputs at a few
positions only: every s-th position counted back from the last one, the last n of them.  Where s divides the
block's dilation d, its inputs are needed at the same stride (d is d / s steps of it), so the block can run on
that subsequence with dilation d / s; where it does not, the stride falls to gcd(s, d).  Each block then
computes a window (one stride, the last n positions at it) that covers every position the output depends on.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["ConvWindow", "nextitnet_windows", "at_stride"]


@dataclass(frozen=True)
class ConvWindow:
    """One block's window: every ``stride``-th position counted back from the last; the last ``n_in`` of them
    read, ``n_mid`` computed by its first convolution, ``n_out`` by its second (the block's outputs)."""

    stride: int
    n_in: int
    n_mid: int
    n_out: int


def _positions_at_stride(length: int, stride: int) -> int:
    """How many positions of ``length`` lie at ``stride``, counted back from the last one."""
    return (length - 1) // stride + 1


@functools.lru_cache(maxsize=64)
def nextitnet_windows(length: int, kernel: int, dilations: Tuple[int, ...]) -> Tuple[ConvWindow, ...]:
    """Each block's window (blocks in order; block i has dilations ``dilations[i]`` and twice that), walked back
    from the last position of the last block.  At length 50, kernel 3 and dilations (1, 2, 4) x 2 the last four
    blocks compute 93, 78, 30 and 6 of their 100 convolution outputs: 407 of 600 in all (32% saved, and each
    block's LayerNorm, ReLU and mask work with it)."""
    need_stride: Optional[int] = None  # the stride at which the next block reads; None: the last position only
    need_n = 1
    windows = []
    for d in reversed(dilations):
        stride = d if need_stride is None else math.gcd(need_stride, d)
        n_out = 1 if need_stride is None else (need_n - 1) * need_stride // stride + 1
        available = _positions_at_stride(length, stride)
        n_mid = min(n_out + (kernel - 1) * 2 * d // stride, available)
        n_in = min(n_mid + (kernel - 1) * d // stride, available)
        windows.append(ConvWindow(stride, n_in, n_mid, n_out))
        need_stride, need_n = stride, n_in
    return tuple(windows[::-1])


def at_stride(x: torch.Tensor, *, stride: int, count: int, new_stride: int, new_count: int) -> torch.Tensor:
    """Of ``x`` [B, count, ...] (every ``stride``-th position, the last one last), every ``new_stride``-th
    position, the last ``new_count`` of them; ``new_stride`` is a multiple of ``stride``."""
    assert new_stride % stride == 0, (stride, new_stride)
    step = new_stride // stride
    return x[:, count - 1 - (new_count - 1) * step::step]
