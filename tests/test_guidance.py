"""Guidance weights (hand values, bounds) and the toy "regretted clicks" test of every guidance mode."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtrec_dist.config import ModelConfig, RecConfig
from mtrec_dist.models.recommender import SequentialRecommender
from mtrec_dist.objectives.guidance import advantage_weights, guidance_weights, reward_tilt, td_loss

torch.set_num_threads(1)
T = torch.tensor


def test_advantage_weights_hand_values():
    a = T([1.0, -1.0, 0.0, 5.0])
    mask = T([1.0, 1.0, 1.0, 0.0])
    w = advantage_weights(a, temperature=1.0, w_min=0.1, w_max=3.0, mask=mask)
    z = 1.0 / math.sqrt(2.0 / 3.0)  # standardised advantage of the first row
    raw = [min(math.exp(z), 3.0), math.exp(-z), 1.0]
    mean = sum(raw) / 3
    assert torch.allclose(w, T([raw[0] / mean, raw[1] / mean, raw[2] / mean, 0.0]), atol=1e-5)
    assert torch.isclose(w[:3].mean(), T(1.0))


def test_reward_tilt_hand_values():
    scores = T([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    reward = T([[0.0, 1.0, 2.0], [4.0, 4.0, 4.0]])  # the second row's reward is constant: nothing to tilt by
    z = 1.0 / math.sqrt(2.0 / 3.0)  # (r - 1) / population std of (0, 1, 2)
    got = reward_tilt(scores, reward, 0.5)
    assert torch.allclose(got, T([[1.0 - 0.5 * z, 2.0, 3.0 + 0.5 * z], [0.5, 0.5, 0.5]]), atol=1e-5)
    assert torch.equal(reward_tilt(scores, reward, 0.0), scores)
    # a tilt moves the order only where the reward disagrees with the scores: a reward rising against them swaps
    # the top item once beta reaches the score gap over the z gap
    flipped = reward_tilt(T([[1.0, 1.2]]), T([[1.0, 0.0]]), 0.1)  # z = (1, -1): 1.1 vs 1.1 - tie at beta 0.1
    assert torch.allclose(flipped, T([[1.1, 1.1]]))
    assert reward_tilt(T([[1.0, 1.2]]), T([[1.0, 0.0]]), 0.2).argmax().item() == 0


def test_advantage_weights_bounded_finite_mean_one():
    torch.manual_seed(0)
    for scale in (1e-3, 1.0, 1e4):
        a = torch.randn(257) * scale
        mask = (torch.rand(257) > 0.2).float()
        w = advantage_weights(a, 0.5, 0.2, 4.0, mask)
        real = w[mask > 0]
        assert torch.isfinite(w).all() and (w[mask == 0] == 0).all()
        assert real.min() >= 0.2 / 4.0 - 1e-6 and real.max() <= 4.0 / 0.2 + 1e-6
        assert torch.isclose(real.mean(), T(1.0), atol=1e-5)
    # a constant advantage (or a single real row) gives weight 1
    assert torch.allclose(advantage_weights(torch.full((4,), 3.0), 1.0, 0.1, 3.0), torch.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        advantage_weights(T([1.0, float("nan")]), 1.0, 0.1, 3.0)


def test_guidance_weights_modes():
    mask = T([1.0, 1.0, 0.0])
    assert torch.equal(guidance_weights("none", mask), mask)
    rm, base = T([2.0, 0.0, 9.0]), T([1.0, 1.0, 1.0])
    w = guidance_weights("reweight", mask, reward_mean=rm, reward_baseline=base)
    assert w[0] > 1.0 > w[1] and w[2] == 0
    # risk-averse uses the CVaR: here it reverses the preference
    w = guidance_weights("risk_averse", mask, reward_cvar=T([-3.0, 0.0, 0.0]), reward_baseline=base)
    assert w[0] < 1.0 < w[1]
    w = guidance_weights("actor_critic", mask, q_advantage=T([0.5, -0.5, 0.0]))
    assert w[0] > w[1]
    with pytest.raises(KeyError, match="reward_baseline"):
        guidance_weights("reweight", mask, reward_mean=rm)
    with pytest.raises(ValueError, match="unknown guidance"):
        guidance_weights("greedy", mask)


def test_td_loss_hand_value():
    # y = [0.5 + 0.5*2, 1 + 0] = [1.5, 1]; loss = mean(0.5*0.25, 0.5*1)
    loss = td_loss(T([1.0, 2.0]), T([0.5, 1.0]), T([2.0, 10.0]), T([0.0, 1.0]), 0.5)
    assert torch.isclose(loss, T(0.3125))


# ---- toy data set: half of the clicked items are regretted ---------------------------------------

N_ITEMS, L = 20, 2
SATISFYING = set(range(1, 11))  # items 11..20 are clickbait: clicked as often, regretted


def toy_batch(rng: np.random.Generator, b: int) -> dict:
    """Clicks follow the parity of the last item (so the state matters); within that parity, satisfying
    and regretted items are clicked equally often.  The mental reward (as the reward model would score it)
    is high for satisfying items and low for regretted ones; its lower tail is lower still."""
    s = rng.integers(1, N_ITEMS + 1, size=(b, L))
    s[rng.random(b) < 0.1, 0] = 0
    parity = s[:, -1] % 2
    same = [np.array([i for i in range(1, N_ITEMS + 1) if i % 2 == p]) for p in (0, 1)]
    a = np.array([rng.choice(same[p]) for p in parity])
    sat = np.isin(a, list(SATISFYING))
    reward_mean = np.where(sat, 1.0, -1.0) + rng.normal(0, 0.3, b)
    reward_cvar = np.where(sat, 0.5, -2.0) + rng.normal(0, 0.3, b)
    t = lambda x, dt=torch.float32: torch.as_tensor(x, dtype=dt)  # noqa: E731
    return {"state_items": t(s, torch.long), "state_feedback": torch.ones(b, L), "action": t(a, torch.long),
            "next_state_items": t(np.concatenate([s[:, 1:], a[:, None]], 1), torch.long),
            "next_state_feedback": torch.ones(b, L), "done": t(rng.random(b) < 0.2), "mask": torch.ones(b),
            "reward_mean": t(reward_mean), "reward_baseline": torch.zeros(b), "reward_cvar": t(reward_cvar)}


def train_toy(guidance: str, steps: int = 150) -> tuple:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model_cfg = ModelConfig(embedding_dim=16, num_layers=1, num_heads=1, dropout=0.0)
    rec_cfg = RecConfig(guidance=guidance, weight_temperature=1.0, weight_min=0.1, weight_max=3.0, ac_gamma=0.5)
    rec = SequentialRecommender(N_ITEMS, "gru4rec", model_cfg, rec_cfg, state_len=L)
    opt = torch.optim.Adam(rec.parameters(), lr=0.01)
    max_weight = 0.0
    for _ in range(steps):
        out = rec(toy_batch(rng, 64))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        assert torch.isfinite(out["loss"])
        max_weight = max(max_weight, float(out["weight_max"]))
    rec.eval()
    ev = toy_batch(np.random.default_rng(123), 200)
    with torch.no_grad():
        scores = rec.score_catalog(ev["state_items"], ev["state_feedback"], torch.arange(1, N_ITEMS + 1))
    top = scores.topk(5, dim=1).indices + 1
    share = float(np.isin(top.numpy(), list(SATISFYING)).mean())
    return share, max_weight


def test_guided_models_rank_satisfying_items_higher():
    baseline, w0 = train_toy("none")
    assert 0.25 < baseline < 0.75  # clicks alone cannot tell satisfying from regretted items
    assert w0 == 1.0
    for mode in ("reweight", "risk_averse", "actor_critic"):
        share, w_max = train_toy(mode)
        assert w_max <= 3.0 / 0.1 + 1e-6  # bounded (w_max / w_min after batch normalisation)
        assert share > baseline + 0.2, (mode, share, baseline)
