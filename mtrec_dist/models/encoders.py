"""State encoders: (state item embeddings [B,L,D], state feedback [B,L], valid [B,L]) -> h [B,D].

``valid`` is a bool mask, True where the state holds a real item (``state_items != 0``).  States are
left-padded (schema.py), so the most recent item sits at position L-1.  An all-padding state (the first
action of a session) is legal and maps to a learned "empty state" vector.

Every encoder is dense (no lookups: the item vectors come from the shared TorchRec ``ItemEmbedding``),
makes no data-dependent Python branches (identical graphs on every rank under DDP/DMP), takes a
``device`` (``meta`` works), and every module that owns parameters directly has ``reset_parameters`` so
that ``DistributedModelParallel`` can materialise a meta-built model correctly.

Feedback features (``ModelConfig.feedback_features``): each real position gets
``e_item + log1p(max(watch_ratio, 0)) * w_fb`` (a learned direction; log1p tames long-tailed watch ratios
such as KuaiRand's).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import BACKBONES
from ..config import ModelConfig
from .conv_windows import ConvWindow, at_stride, nextitnet_windows, positions_at_stride
from .dropout import Dropout, dropout_mask

__all__ = ["build_encoder", "ENCODER_NAMES", "SASRecEncoder", "GRU4RecEncoder", "CaserEncoder", "NextItNetEncoder"]

ENCODER_NAMES = BACKBONES  # one name per sequence model, shared with rec.backbone (choices.Backbone)


class FeedbackInput(nn.Module):
    """Input layer shared by the encoders: item vector plus (optionally) projected feedback, pads zeroed."""

    def __init__(self, dim: int, use_feedback: bool, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.use_feedback = use_feedback
        self.feedback_proj = nn.Linear(1, dim, bias=False, device=device) if use_feedback else None

    def forward(self, emb: torch.Tensor, feedback: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = emb
        if self.feedback_proj is not None:
            fb = torch.log1p(feedback.to(emb.dtype).clamp_min(0.0)).unsqueeze(-1)
            x = x + self.feedback_proj(fb)
        return x * valid.unsqueeze(-1).to(x.dtype)


# ---- SASRec (Kang & McAuley 2018) ----------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, dropout_p: float
              ) -> torch.Tensor:
    """``softmax(q k^T / sqrt(h))`` over the ``allowed`` keys (bool, broadcast to [B, H, Lq, Lk]), with dropout
    ``dropout_p`` on those probabilities, times ``v``.

    ``scaled_dot_product_attention`` everywhere except on the CPU with dropout, where it leaves its fused kernel
    for an unfused path that draws the mask with ``bernoulli_``: there the same computation with
    :func:`~.dropout.dropout_mask` (SASRec's encoder step took 75-77 ms with attention dropout against 58-59 ms
    without, batch 128, length 50, 1 thread; bench/RESULTS.md, session 16)."""
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return (probs * dropout_mask(probs, dropout_p)) @ v


class SASRecBlock(nn.Module):
    """Pre-LayerNorm causal self-attention block + point-wise feed-forward, both residual."""

    def __init__(self, dim: int, heads: int, dropout: float, device=None) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(dim, device=device)
        self.qkv = nn.Linear(dim, 3 * dim, device=device)
        self.out = nn.Linear(dim, dim, device=device)
        self.ln2 = nn.LayerNorm(dim, device=device)
        self.ff1 = nn.Linear(dim, dim, device=device)
        self.ff2 = nn.Linear(dim, dim, device=device)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """[B, L, D] -> [B, L, D]; with ``last_only`` only the last position's output, [B, 1, D] (its query
        still attends to every position: the keys and values are computed for all of them)."""
        b, l, d = x.shape
        h = d // self.heads
        # unbind, not indexing a permuted view: its backward is one stack into the projection's own layout,
        # where each index zero-filled a [3, B, H, L, h] gradient and the permute's copied it back
        qkv = self.qkv(self.ln1(x)).view(b, l, 3, self.heads, h)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each [B, H, L, h]
        if last_only:
            q, x, attn_mask = q[:, :, -1:], x[:, -1:], attn_mask[:, -1:]
        a = attention(q, k, v, attn_mask.unsqueeze(1), self.dropout if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, q.shape[2], d)))
        return x + self.drop(self.ff2(self.drop(F.relu(self.ff1(self.ln2(x))))))


class SASRecEncoder(nn.Module):
    """Causal transformer over the state with learned positional embeddings; output at the last position."""

    def __init__(self, cfg: ModelConfig, state_len: int, device=None) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.scale = math.sqrt(d)
        self.inp = FeedbackInput(d, cfg.feedback_features, device)
        self.pos = nn.Parameter(torch.empty(state_len, d, device=device))
        self.blocks = nn.ModuleList([SASRecBlock(d, cfg.num_heads, cfg.dropout, device) for _ in range(cfg.num_layers)])
        self.final_norm = nn.LayerNorm(d, device=device)
        self.drop = Dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos, std=0.1)

    def forward(self, emb: torch.Tensor, feedback: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        l = emb.shape[1]
        keep = valid.unsqueeze(-1).to(emb.dtype)
        x = self.drop(self.inp(emb, feedback, valid) * self.scale + self.pos[:l]) * keep
        causal = torch.ones(l, l, dtype=torch.bool, device=emb.device).tril()
        # Attend to earlier real items; every position may attend to itself so that no softmax row is empty
        # (an all-padding state would otherwise produce NaN).
        attn_mask = (causal & valid.unsqueeze(1)) | torch.eye(l, dtype=torch.bool, device=emb.device)
        # The state is read at the last position only, so the last block computes only that position's output
        # (the others would be thrown away); every earlier block feeds the last block's keys and values.
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, last_only=(i == last)) * (keep[:, -1:] if i == last else keep)
        return self.final_norm(x[:, -1])


# ---- GRU4Rec (Hidasi et al. 2016) ----------------------------------------------------------------


class GRU4RecEncoder(nn.Module):
    """GRU over the state's valid steps only (padding steps are never fed, so left padding is inert).

    Each row's valid steps are moved to the front in their order (a stable sort on "is padding") and one
    fused ``nn.GRU`` call runs over the batch; a row's state is the last layer's output at its last valid
    step (what follows it is padding and cannot reach back).  A row with no valid step keeps the zero state.
    The same function as stepping the GRU position by position and skipping the padding, at one call instead
    of ``state_len`` (:func:`stepwise_gru_state` is that loop, kept as the reference the tests compare with).
    """

    def __init__(self, cfg: ModelConfig, state_len: int, device=None) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.num_layers = cfg.num_layers
        self.inp = FeedbackInput(d, cfg.feedback_features, device)
        self.gru = nn.GRU(d, d, num_layers=cfg.num_layers, batch_first=True,
                          dropout=cfg.dropout if cfg.num_layers > 1 else 0.0, device=device)
        self.drop = Dropout(cfg.dropout)
        self.out = nn.Linear(d, d, device=device)  # its bias is the learned empty-state vector

    def forward(self, emb: torch.Tensor, feedback: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, _, d = emb.shape
        x = self.drop(self.inp(emb, feedback, valid))
        valid = valid.bool()
        front = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # valid steps first, in order
        outputs, _ = self.gru(torch.gather(x, 1, front.unsqueeze(-1).expand(-1, -1, d)))
        lengths = valid.sum(1)
        last = outputs[torch.arange(b, device=emb.device), (lengths - 1).clamp_min(0)]
        h = torch.where((lengths > 0).unsqueeze(1), last, torch.zeros_like(last))
        return self.out(self.drop(h))


def stepwise_gru_state(gru: nn.GRU, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The last layer's state after stepping ``gru`` over ``x`` [B, L, D] one position at a time, padding
    positions (``valid`` False) leaving the state unchanged: the definition :class:`GRU4RecEncoder` computes
    in one fused call."""
    b, l, d = x.shape
    h = x.new_zeros(gru.num_layers, b, d)
    for t in range(l):
        _, h_new = gru(x[:, t : t + 1], h)
        h = torch.where(valid[:, t].view(1, b, 1), h_new, h)
    return h[-1]


# ---- Caser (Tang & Wang 2018) --------------------------------------------------------------------


class CaserEncoder(nn.Module):
    """Horizontal convolutions (heights 1..L, max-pooled) and vertical convolutions over the L x D image.

    Caser's user embedding and item-specific output layer are replaced by scoring ``<h, e_a>`` against the
    shared item table (tied embeddings), so that all lookups stay in the one sharded table.
    """

    def __init__(self, cfg: ModelConfig, state_len: int, device=None) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.inp = FeedbackInput(d, cfg.feedback_features, device)
        self.conv_v = nn.Conv2d(1, cfg.caser_v_filters, (state_len, 1), device=device)
        self.conv_h = nn.ModuleList(
            [nn.Conv2d(1, cfg.caser_h_filters, (h, d), device=device) for h in range(1, state_len + 1)]
        )
        self.fc = nn.Linear(cfg.caser_v_filters * d + cfg.caser_h_filters * state_len, d, device=device)
        self.out = nn.Linear(d, d, device=device)
        self.drop = Dropout(cfg.dropout)

    def forward(self, emb: torch.Tensor, feedback: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b = emb.shape[0]
        x = self.inp(emb, feedback, valid)  # [B, L, D]
        out_v = self.conv_v(x.unsqueeze(1)).reshape(b, -1)
        # A horizontal filter of height h spans all D columns: it is a 1-D convolution over positions with the
        # D columns as input channels, run on x viewed channels-last (no copy), not a 2-D convolution of a
        # one-channel image (the same numbers; measured 4x faster at length 50, d=64)
        seq = x.unsqueeze(1).permute(0, 3, 1, 2)  # [B, D, 1, L], channels-last
        out_h = [F.relu(F.conv2d(seq, conv.weight.permute(0, 3, 1, 2), conv.bias)).amax(dim=(2, 3))
                 for conv in self.conv_h]
        z = F.relu(self.fc(self.drop(torch.cat([out_v, *out_h], dim=1))))
        return self.out(self.drop(z))


# ---- NextItNet (Yuan et al. 2019) ----------------------------------------------------------------


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
                out_len: Optional[int] = None, stride: int = 1) -> torch.Tensor:
    """A dilated causal 1-D convolution in the sequence layout: x [B, L, D_in], ``weight`` [D_out, D_in, K] (an
    ``nn.Conv1d``'s), -> [B, L, D_out] with ``y[t] = bias + sum_j W[:, :, j] x[t - (K-1-j) dilation]`` (zero
    before the start: left padding only).  With ``out_len`` only the last ``out_len`` outputs are computed, and
    with ``stride`` only every ``stride``-th of them counted back from the last (the inputs they do not read are
    never touched).

    ``x`` viewed as [B, D_in, 1, L] is channels-last, so a 2-D convolution with a 1 x K kernel runs on it
    without copying.  Transposing to the channels-first layout of ``nn.Conv1d`` and back cost more than the
    convolution itself at recommender sizes (measured 7.3 vs 4.7 ms per convolution, forward and backward, at
    batch 128, length 50, d=64).  The left padding is added in the sequence layout, so the output comes back
    contiguous (keeping the first L outputs of a both-ends padding instead was 15% slower with the LayerNorm
    that follows, which then copies)."""
    length = x.shape[1]
    out_len = positions_at_stride(length, stride) if out_len is None else out_len
    span = (out_len - 1) * stride + (weight.shape[2] - 1) * dilation + 1  # the inputs the outputs read, in order
    pad = max(0, span - length)  # zeros before the start, where the outputs read past it
    seq = x[:, length + pad - span:]
    if pad:  # concatenated, not F.pad: that fills the whole output before copying x in
        seq = torch.cat([seq.new_zeros(seq.shape[0], pad, seq.shape[2]), seq], dim=1)  # [B, span, D_in]
    y = F.conv2d(seq.unsqueeze(1).permute(0, 3, 1, 2), weight.unsqueeze(2), bias,
                 stride=(1, stride), dilation=(1, dilation))  # [B, D_out, 1, out_len], channels-last
    return y.permute(0, 2, 3, 1).squeeze(1)  # a view both ways ([:, 0] would zero-fill and copy in backward)


class NextItNetBlock(nn.Module):
    """Residual block of two dilated causal 1-D convolutions (dilations d and 2d), each LayerNorm + ReLU."""

    def __init__(self, dim: int, kernel: int, dilation: int, device=None) -> None:
        super().__init__()
        self.kernel, self.dilation = kernel, dilation
        self.conv1 = nn.Conv1d(dim, dim, kernel, dilation=dilation, device=device)
        self.ln1 = nn.LayerNorm(dim, device=device)
        self.conv2 = nn.Conv1d(dim, dim, kernel, dilation=2 * dilation, device=device)
        self.ln2 = nn.LayerNorm(dim, device=device)

    def forward(self, x: torch.Tensor, keep_mid: torch.Tensor, keep_out: torch.Tensor, window: ConvWindow
                ) -> torch.Tensor:
        """x [B, n_in, D] (``window``'s input positions) -> [B, n_out, D] at its output positions; ``keep_mid``
        and ``keep_out`` are the valid masks at the first convolution's and the block's output positions."""
        # re-zero padding positions after each convolution, so that left padding acts exactly like the
        # causal zero padding (the output does not depend on how many pads precede the sequence)
        w = window
        y = causal_conv(x, self.conv1.weight, self.conv1.bias, self.dilation // w.in_stride, w.n_mid,
                        w.mid_stride // w.in_stride)
        y = F.relu_(self.ln1(y).mul_(keep_mid))  # in place: LayerNorm's backward does not read its output
        y = causal_conv(y, self.conv2.weight, self.conv2.bias, 2 * self.dilation // w.mid_stride, w.n_out,
                        w.out_stride // w.mid_stride)
        y = F.relu_(self.ln2(y).mul_(keep_out))
        residual = at_stride(x, stride=w.in_stride, count=w.n_in, new_stride=w.out_stride, new_count=w.n_out)
        return residual + y


class NextItNetEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, state_len: int, device=None) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.inp = FeedbackInput(d, cfg.feedback_features, device)
        self.kernel = cfg.nextitnet_kernel
        self.dilations = tuple(dil for _ in range(cfg.num_layers) for dil in cfg.nextitnet_dilations)
        self.blocks = nn.ModuleList([NextItNetBlock(d, self.kernel, dil, device) for dil in self.dilations])
        self.drop = Dropout(cfg.dropout)
        self.out = nn.Linear(d, d, device=device)

    def forward(self, emb: torch.Tensor, feedback: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        keep = valid.unsqueeze(-1).to(emb.dtype)
        x = self.inp(emb, feedback, valid)
        length = x.shape[1]
        stride, count = 1, length
        for block, w in zip(self.blocks, nextitnet_windows(length, self.kernel, self.dilations)):
            x = at_stride(x, stride=stride, count=count, new_stride=w.in_stride, new_count=w.n_in)
            keep_mid = at_stride(keep, stride=1, count=length, new_stride=w.mid_stride, new_count=w.n_mid)
            keep_out = at_stride(keep, stride=1, count=length, new_stride=w.out_stride, new_count=w.n_out)
            x = block(x, keep_mid, keep_out, w)
            stride, count = w.out_stride, w.n_out
        return self.out(self.drop(x[:, -1]))


def build_encoder(name: str, cfg: ModelConfig, state_len: int, device: Optional[torch.device] = None) -> nn.Module:
    """Encoder by name: ``sasrec``, ``gru4rec``, ``caser`` or ``nextitnet``."""
    if state_len < 1:
        raise ValueError(f"state_len must be >= 1, got {state_len}")
    if name == "sasrec":
        return SASRecEncoder(cfg, state_len, device)
    if name == "gru4rec":
        return GRU4RecEncoder(cfg, state_len, device)
    if name == "caser":
        return CaserEncoder(cfg, state_len, device)
    if name == "nextitnet":
        return NextItNetEncoder(cfg, state_len, device)
    raise ValueError(f"unknown encoder {name!r}; choose from {list(ENCODER_NAMES)}")
