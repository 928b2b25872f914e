"""The encoders' dropout: nn.Dropout's distribution and scaling, its mask from uniform draws."""
from __future__ import annotations

import math

import pytest
import torch

from mtrec_dist.models.dropout import Dropout


def test_identity_in_eval_mode_and_at_zero():
    x = torch.randn(4, 5)
    assert Dropout(0.3).eval()(x) is x
    assert Dropout(0.0).train()(x) is x


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_keeps_each_element_with_probability_one_minus_p_scaled(p):
    """Each output is 0 or x / (1 - p); over 10^6 elements the kept share is within 5 standard errors of
    1 - p (a Bernoulli(1 - p) mask), and the gradient is the same mask."""
    torch.manual_seed(0)
    n = 1_000_000
    x = (torch.rand(n) + 0.5).requires_grad_(True)  # no zeros: a dropped element is told apart by its 0
    y = Dropout(p).train()(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / (1 - p)) and (y[~kept] == 0).all()
    share = kept.double().mean().item()
    assert abs(share - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.to(x.dtype) / (1 - p))


def test_same_seed_same_mask():
    x = torch.ones(1000)
    torch.manual_seed(7)
    a = Dropout(0.4).train()(x)
    torch.manual_seed(7)
    b = Dropout(0.4).train()(x)
    assert torch.equal(a, b) and not torch.equal(a, Dropout(0.4).train()(x))


def test_bfloat16_keeps_the_float32_share():
    """Drawn in float32: a bfloat16 tensor keeps 1 - p of its elements too (bfloat16's own uniform draws lie on
    a 1/256 grid and kept 0.8981 at p = 0.1)."""
    from mtrec_dist.models.dropout import dropout_mask

    torch.manual_seed(0)
    n, p = 4_000_000, 0.1
    mask = dropout_mask(torch.empty(n, dtype=torch.bfloat16), p)
    assert mask.dtype == torch.bfloat16
    share = (mask != 0).double().mean().item()
    assert abs(share - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
