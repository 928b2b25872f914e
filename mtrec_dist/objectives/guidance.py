"""Mental-reward guidance of the recommender's supervised loss (docs/method.md "Recommenders and guidance"):
pure functions.

Each guidance mode turns an advantage per logged example into a weight on that example's next-item
cross-entropy.  Weights are constants for the optimiser (detached), bounded, and batch-normalised to mean
1 over real rows, so guidance changes *which* examples matter, not the overall loss scale.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..choices import CLICK_TRAINED, GUIDANCE_MODES  # GUIDANCE_MODES re-exported here: the one list
from .ranking import masked_mean

__all__ = ["GUIDANCE_MODES", "advantage_weights", "guidance_weights", "reward_tilt", "td_loss"]


def advantage_weights(
    advantage: torch.Tensor,
    temperature: float,
    w_min: float,
    w_max: float,
    mask: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Bounded, batch-normalised AWR-style weights.

    ``z_b = (A_b - mean(A)) / (std(A) + eps)`` (moments over real rows: the mental reward's scale is only
    identified up to shaping, so the temperature acts on standardised advantages);
    ``w~_b = clip(exp(z_b / temperature), w_min, w_max)``;  ``w_b = m_b * w~_b / mean_real(w~)``.

    Real rows' weights lie in ``[w_min / w_max, w_max / w_min]`` and average exactly 1; padding rows get 0;
    non-finite advantages raise.  advantage/mask [B] -> [B] (detached).
    """
    a = advantage.detach().float()
    if not torch.isfinite(a).all():
        raise ValueError("advantage_weights: advantage contains NaN/inf")
    m = torch.ones_like(a) if mask is None else mask.detach().to(a.dtype)
    n = m.sum().clamp_min(1.0)
    mean = (a * m).sum() / n
    std = (((a - mean) ** 2) * m).sum().div(n).sqrt()
    z = (a - mean) / (std + eps)
    w = torch.exp(z / temperature).clamp(w_min, w_max)
    w_mean = (w * m).sum() / n
    return (w / w_mean.clamp_min(1e-12) * m).to(advantage.dtype)


def guidance_weights(
    mode: str,
    mask: torch.Tensor,
    temperature: float = 1.0,
    w_min: float = 0.1,
    w_max: float = 3.0,
    reward_mean: Optional[torch.Tensor] = None,
    reward_baseline: Optional[torch.Tensor] = None,
    reward_cvar: Optional[torch.Tensor] = None,
    cvar_baseline: Optional[torch.Tensor] = None,
    q_advantage: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-example weights of the supervised loss for a guidance ``mode``.

    * ``none``: ``w = mask`` (the click-trained baseline);
    * ``reweight``: ``A = R_mean(s,a) - E_{a'~pi} R_mean(s,a')`` -> :func:`advantage_weights`;
    * ``risk_averse``: ``A = CVaR(s,a) - baseline`` (``cvar_baseline`` if given, else ``reward_baseline``);
    * ``actor_critic``: ``A = Q(s,a) - E_{a'~pi} Q(s,a')`` from the recommender's own Q head.
    """
    if mode == CLICK_TRAINED:
        return mask.detach().float()
    if mode == "reweight":
        _need(mode, reward_mean=reward_mean, reward_baseline=reward_baseline)
        adv = reward_mean - reward_baseline
    elif mode == "risk_averse":
        _need(mode, reward_cvar=reward_cvar)
        base = cvar_baseline if cvar_baseline is not None else reward_baseline
        _need(mode, reward_baseline=base)
        adv = reward_cvar - base
    elif mode == "actor_critic":
        _need(mode, q_advantage=q_advantage)
        adv = q_advantage
    else:
        raise ValueError(f"unknown guidance mode {mode!r}; choose from {list(GUIDANCE_MODES)}")
    return advantage_weights(adv, temperature, w_min, w_max, mask)


def reward_tilt(scores: torch.Tensor, reward: torch.Tensor, strength: float, eps: float = 1e-6) -> torch.Tensor:
    """Guidance at serving time: a recommender's candidate scores tilted by the mental reward.

    ``s'_bc = s_bc + beta * (R_bc - mean_c R_bc) / (std_c R_bc + eps)``, moments over each row's candidates
    (population std).  As in :func:`advantage_weights`, beta acts on standardised rewards: the reward's scale is
    only identified up to shaping.  Ranking by ``s'`` is ranking by ``log pi(a|s) + beta z(a)``: with ``beta z``
    the log-odds of satisfaction, the items most likely to be chosen *and* satisfying.  A constant reward, or
    ``beta = 0``, leaves the scores as they are.  scores/reward [B, C] -> [B, C].
    """
    if strength == 0:
        return scores
    r = reward.float()
    z = (r - r.mean(-1, keepdim=True)) / (r.std(-1, unbiased=False, keepdim=True) + eps)
    return scores + strength * z.to(scores.dtype)


def _need(mode: str, **tensors) -> None:
    missing = [k for k, v in tensors.items() if v is None]
    if missing:
        raise KeyError(f"guidance mode {mode!r} needs {missing} in the batch (scored upstream by the reward model)")


def td_loss(
    q_sa: torch.Tensor,
    reward: torch.Tensor,
    next_value: torch.Tensor,
    done: torch.Tensor,
    gamma: float,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One-step TD loss of the actor-critic Q head (SA2C/SNQN, Xin et al. 2020/2022).

    ``y = r + gamma (1-done) sg(V(s'))``,  ``V(s') = E_{a'~pi(.|s')} Q(s',a')``;
    ``L_TD = E[ (Q(s,a) - y)^2 / 2 ]`` (masked mean; reward and next value are constants).
    """
    y = reward.detach() + gamma * (1.0 - done.to(q_sa.dtype)) * next_value.detach()
    return masked_mean(0.5 * (q_sa - y).pow(2), mask)
