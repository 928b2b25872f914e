"""A dilated, strided 1 x K convolution in the sequence layout, [B, span, D_in] -> [B, out_len, D_out]:
:func:`seq_conv`.  ``y[j] = bias + sum_k W[:, :, k] x[k d + j s]`` (no padding: the caller pads).

The forward is ``F.conv2d`` on the channels-last view [B, D_in, 1, span].  On the CPU the backward is
computed here: oneDNN's weight gradient for these shapes took 5.8 ms where one GEMM over the K shifted
copies of the input takes 2.8 ms (batch 128, length 50, d=64, kernel 3, 1 thread; bench/RESULTS.md session
18), while its input gradient (2.7 ms) is as fast as the forward, so that part stays with
``aten::convolution_backward``.  On a GPU, and under CPU autocast (whose gradients would reach oneDNN in another
dtype than the saved inputs), autograd's own backward of ``F.conv2d`` runs.  ``torch.func.vmap`` is not
supported on the CPU path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _conv_args(weight: torch.Tensor, dilation: int, stride: int):
    """The 2-D convolution that a 1-D one over positions is, on the [B, D, 1, L] view."""
    return weight.unsqueeze(2), (1, stride), (1, dilation)


def _channels_last(seq: torch.Tensor) -> torch.Tensor:
    return seq.unsqueeze(1).permute(0, 3, 1, 2)  # [B, span, D] -> [B, D, 1, span], a view


def _shifted_copies(seq: torch.Tensor, kernel: int, dilation: int, stride: int, out_len: int) -> torch.Tensor:
    """[B * out_len, K * D_in]: row (b, j) holds the K inputs that output j reads, tap by tap."""
    last = (out_len - 1) * stride + 1
    taps = [seq[:, k * dilation: k * dilation + last: stride] for k in range(kernel)]
    return torch.cat(taps, dim=2).reshape(-1, kernel * seq.shape[2])


def _conv2d(seq: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
            stride: int) -> torch.Tensor:
    w, strides, dilations = _conv_args(weight, dilation, stride)
    y = F.conv2d(_channels_last(seq), w, bias, stride=strides, dilation=dilations)
    return y.permute(0, 2, 3, 1).squeeze(1)  # [B, out_len, D_out], contiguous (channels-last)


class _SeqConv(torch.autograd.Function):
    @staticmethod
    def forward(seq, weight, bias, dilation: int, stride: int):
        return _conv2d(seq, weight, bias, dilation, stride)

    @staticmethod
    def setup_context(ctx, inputs, output):
        seq, weight, bias, dilation, stride = inputs
        ctx.save_for_backward(seq, weight)
        ctx.dilation, ctx.stride, ctx.has_bias = dilation, stride, bias is not None

    @staticmethod
    def backward(ctx, grad_out):
        seq, weight = ctx.saved_tensors
        d, s = ctx.dilation, ctx.stride
        d_out, d_in, kernel = weight.shape
        out_len = grad_out.shape[1]
        grad_out = grad_out.contiguous()
        grad_seq = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            w, strides, dilations = _conv_args(weight, d, s)
            grad_y = grad_out.unsqueeze(1).permute(0, 3, 1, 2)  # [B, D_out, 1, out_len], channels-last
            grad_x = torch.ops.aten.convolution_backward(
                grad_y, _channels_last(seq), w, None, list(strides), [0, 0], list(dilations), False, [0, 0], 1,
                [True, False, False])[0]
            grad_seq = grad_x.permute(0, 2, 3, 1).squeeze(1)
        rows = grad_out.reshape(-1, d_out)  # [B * out_len, D_out]
        if ctx.needs_input_grad[1]:
            flat = _shifted_copies(seq, kernel, d, s, out_len).t() @ rows  # [K * D_in, D_out]
            grad_weight = flat.view(kernel, d_in, d_out).permute(2, 1, 0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_seq, grad_weight, grad_bias, None, None


def seq_conv(seq: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
             stride: int = 1) -> torch.Tensor:
    """``seq`` [B, span, D_in], ``weight`` [D_out, D_in, K] (an ``nn.Conv1d``'s) -> [B, out_len, D_out] with
    ``out_len = (span - (K - 1) dilation - 1) // stride + 1`` and ``y[j] = bias + sum_k W[:, :, k] seq[k dilation +
    j stride]``."""
    if seq.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return _conv2d(seq, weight, bias, dilation, stride)
    return _SeqConv.apply(seq, weight, bias, dilation, stride)
