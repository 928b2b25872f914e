"""Which positions each NextItNet convolution must compute, when only the last block's last position is read.

A dilated causal convolution's output at position t reads positions t, t - d, ..., t - (K-1) d.  Walked back
from the encoder's output (the last position of the last block), each convolution needs its outputs at a few
positions only: every s-th position counted back from the last one, the last n of them.  Outputs needed at
stride s read their inputs at stride gcd(s, d) (d is d / gcd(s, d) steps of it), so the convolution runs on that
subsequence with dilation d / gcd(s, d) and stride s / gcd(s, d).  A block's second convolution (dilation 2d)
fixes its first one's outputs this way, and the first (dilation d) the block's inputs, which also carry the
residual.  Each window holds every position the output depends on, and with NextItNet's doubling dilations
(1, 2, 4, ...) only those (both checked against the dependency sets built position by position, in
tests/test_encoders.py); with other dilations a window can hold positions between the needed ones.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["ConvWindow", "nextitnet_windows", "at_stride", "positions_at_stride"]


@dataclass(frozen=True)
class ConvWindow:
    """One block's windows, each every ``*_stride``-th position counted back from the last, the last ``n_*``:
    the inputs it reads (``in``), its first convolution's outputs (``mid``) and its second's (``out``, the
    block's outputs)."""

    in_stride: int
    n_in: int
    mid_stride: int
    n_mid: int
    out_stride: int
    n_out: int


def positions_at_stride(length: int, stride: int) -> int:
    """How many positions of ``length`` lie at ``stride``, counted back from the last one."""
    return (length - 1) // stride + 1


def _inputs_read(n_out: int, out_stride: int, dilation: int, kernel: int, length: int) -> Tuple[int, int]:
    """(stride, count) of the inputs a causal convolution reads for its last ``n_out`` outputs at ``out_stride``."""
    stride = math.gcd(out_stride, dilation)
    reach = (n_out - 1) * out_stride // stride + 1 + (kernel - 1) * dilation // stride
    return stride, min(reach, positions_at_stride(length, stride))


@functools.lru_cache(maxsize=64)
def nextitnet_windows(length: int, kernel: int, dilations: Tuple[int, ...]) -> Tuple[ConvWindow, ...]:
    """Each block's windows (blocks in order; block i has dilations ``dilations[i]`` and twice that), walked back
    from the last position of the last block.  At length 50, kernel 3 and dilations (1, 2, 4) x 2 the blocks
    compute 100, 100, 93, 40, 16 and 4 of their 100 convolution outputs: 353 of 600 in all (41% saved, and each
    block's LayerNorm, ReLU and mask work with it)."""
    need: Optional[Tuple[int, int]] = None  # (stride, count) the next block reads; None: the last position only
    windows = []
    for d in reversed(dilations):
        out_stride, n_out = need if need is not None else (2 * d, 1)  # one position: any stride; 2d keeps the most
        mid_stride, n_mid = _inputs_read(n_out, out_stride, 2 * d, kernel, length)
        in_stride, n_in = _inputs_read(n_mid, mid_stride, d, kernel, length)
        windows.append(ConvWindow(in_stride, n_in, mid_stride, n_mid, out_stride, n_out))
        need = (in_stride, n_in)
    return tuple(windows[::-1])


def at_stride(x: torch.Tensor, *, stride: int, count: int, new_stride: int, new_count: int) -> torch.Tensor:
    """Of ``x`` [B, count, ...] (every ``stride``-th position, the last one last), every ``new_stride``-th
    position, the last ``new_count`` of them; ``new_stride`` is a multiple of ``stride``."""
    assert new_stride % stride == 0, (stride, new_stride)
    step = new_stride // stride
    return x[:, count - 1 - (new_count - 1) * step::step]
