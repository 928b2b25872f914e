"""QR-IQL objectives (docs/method.md "QR-IQL v1"): pure tensor functions.

Shapes: B rows, N quantiles, M target samples, C candidates.  ``mask`` [B] is 1 for real rows and 0 for
padding rows (which contribute nothing); ``done`` [B] is 1 where the session ended after the action.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import torch

from .ranking import chunked_logsumexp, masked_mean

__all__ = [
    "quantile_midpoints",
    "soft_value",
    "catalog_soft_value",
    "implied_reward",
    "iq_chi2_loss",
    "quantile_huber_loss",
    "distributional_soft_target",
    "cvar",
    "cvar_along",
    "qr_iql_loss",
]


def quantile_midpoints(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``tau_i = (2i - 1) / (2N)`` for ``i = 1..N`` (QR-DQN's quantile midpoints)."""
    if n < 1:
        raise ValueError(f"number of quantiles must be >= 1, got {n}")
    return (2 * torch.arange(1, n + 1, device=device, dtype=dtype) - 1) / (2 * n)


def soft_value(
    q_values: torch.Tensor,
    alpha: float,
    log_q: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Soft state value over a candidate set.

    ``V(s) = alpha * log sum_{c in C(s)} exp(Q(s,c)/alpha - log_q_c)``

    q_values [..., C]; ``log_q`` (broadcastable to q_values) is ``log(m * q(c))`` when ``C(s)`` was sampled
    from a proposal ``q`` (importance-sampling estimate of the partition function), None for the exact
    full set; ``mask`` (bool, broadcastable) drops candidates (e.g. accidental hits).  A row must keep at
    least one candidate.
    """
    logits = q_values / alpha
    if log_q is not None:
        logits = logits - log_q
    if mask is not None:
        logits = logits.masked_fill(~mask.bool(), float("-inf"))
    return alpha * torch.logsumexp(logits, dim=-1)


def catalog_soft_value(query: torch.Tensor, item_vectors: torch.Tensor, alpha: float, chunk: int) -> torch.Tensor:
    """``V(s) = alpha * log sum_a exp(<query_s, e_a>/alpha)`` over every catalog item, in chunks.

    query [B, D] is the state's mean-critic projection (``Q(s,a) = <query_s, e_a>``), item_vectors [C, D]
    the catalog (padding item excluded by the caller).  Chunks are recomputed in backward (see
    :func:`mtrec_dist.objectives.ranking.chunked_logsumexp`).
    """
    return alpha * chunked_logsumexp(query, item_vectors, chunk, scale=1.0 / alpha)


def implied_reward(q_sa: torch.Tensor, v_next: torch.Tensor, done: torch.Tensor, gamma: float) -> torch.Tensor:
    """Inverse soft Bellman operator: ``r(s,a,s') = Q(s,a) - gamma * (1 - done) * V(s')``."""
    return q_sa - gamma * (1.0 - done.to(q_sa.dtype)) * v_next


def consumption_implied_reward(watch_ratio: torch.Tensor, alpha: float, eps: float = 0.02) -> torch.Tensor:
    """Implied reward of the consumption choice: ``r_c = alpha * logit(clip(y, eps, 1 - eps))``.

    After engaging with an item the user keeps consuming it (reward ``r``) or stops (outside option,
    reward 0).  A soft-optimal (Boltzmann, temperature ``alpha``) binary choice continues with probability
    ``sigmoid(r / alpha)``; reading the watch ratio ``y`` as that probability and inverting gives ``r_c``.
    ``eps`` bounds the logit (``y`` of exactly 0 or 1 would be infinite).  Sources without a watch signal
    carry ``y = 1`` for every row, so ``r_c`` is the same constant everywhere and ranks nothing.
    """
    y = watch_ratio.clamp(eps, 1.0 - eps)
    return alpha * (torch.log(y) - torch.log1p(-y))


def realised_reward_target(implied: torch.Tensor, watch_ratio: torch.Tensor, alpha: float,
                           choice_weight: float, consumption_weight: float) -> torch.Tensor:
    """What the reward-quantile head regresses:
    ``r_real = choice_weight * sg(r(s,a,s')) + consumption_weight * consumption_implied_reward(y)``.

    ``choice_weight=1, consumption_weight=0`` is the spec (the item choice's implied reward only).  See
    docs/method.md ("Grounding the reward in consumption") for why the consumption term is needed when
    clicks follow appeal rather than satisfaction.
    """
    out = choice_weight * implied.detach()
    if consumption_weight:
        out = out + consumption_weight * consumption_implied_reward(watch_ratio.to(out.dtype), alpha)
    return out


def iq_chi2_loss(
    q_sa: torch.Tensor,
    v_s: torch.Tensor,
    v_next: torch.Tensor,
    done: torch.Tensor,
    gamma: float,
    chi2_c: float,
    mask: Optional[torch.Tensor] = None,
    expected_reward: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """IQ-Learn, offline "value-expert" form with the chi-square regulariser (Garg et al. 2021).

    ``r = Q(s,a) - gamma (1-done) V(s')``;
    ``L_IQ = -E[r] + E[V(s) - gamma (1-done) V(s')] + (1/(4c)) E[r^2]``,
    expectations being masked means over the expert batch.  All of q_sa, v_s, v_next carry gradients.

    Debiased regulariser (``expected_reward`` given, our change; docs/method.md): the chi-square term
    is meant for the Bellman residual ``rbar(s,a) = E_{s'}[r(s,a,s')]``, but one sampled ``s'`` gives
    ``E[r^2] = rbar^2 + Var_{s'}(r)``: stochastic transitions (leaving, feedback) then shrink the value
    scale to cut that variance.  With ``rhat(s,a) ≈ rbar(s,a)`` an independent estimate (the reward
    head's mean), the term becomes ``(1/(4c)) E[2 sg(rhat) r - sg(rhat)^2]``, whose gradient
    ``(1/(2c)) E[rhat grad r]`` is unbiased for ``grad (1/(4c)) E[rbar^2]`` and whose value equals
    ``E[r^2]`` when ``rhat = r``.
    """
    not_done = 1.0 - done.to(q_sa.dtype)
    r = q_sa - gamma * not_done * v_next
    value_gap = v_s - gamma * not_done * v_next
    if expected_reward is None:
        reg = r.pow(2)
    else:
        rhat = expected_reward.detach()
        reg = 2.0 * rhat * r - rhat.pow(2)
    return -masked_mean(r, mask) + masked_mean(value_gap, mask) + masked_mean(reg, mask) / (4.0 * chi2_c)


def quantile_huber_loss(
    pred_quantiles: torch.Tensor,
    target_samples: torch.Tensor,
    taus: torch.Tensor,
    kappa: float = 1.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """QR-DQN quantile Huber loss over the pairwise (prediction i, target j) grid (Dabney et al. 2018).

    ``u_ij = T_j - Z_i``;  ``L_kappa(u) = u^2/2 if |u| <= kappa else kappa (|u| - kappa/2)``;
    ``rho_tau(u) = |tau - 1{u < 0}| * L_kappa(u) / kappa``;
    ``L = E_b[ sum_i mean_j rho_{tau_i}(u_bij) ]``  (masked mean over rows b).

    pred_quantiles [B, N], target_samples [B, M] (treated as constants: detached here), taus [N].
    """
    target = target_samples.detach()
    u = target.unsqueeze(1) - pred_quantiles.unsqueeze(2)  # [B, N, M]
    abs_u = u.abs()
    huber = torch.where(abs_u <= kappa, 0.5 * u.pow(2), kappa * (abs_u - 0.5 * kappa))
    weight = (taus.view(1, -1, 1) - (u.detach() < 0).to(u.dtype)).abs()
    per_row = (weight * huber / kappa).mean(dim=2).sum(dim=1)
    return masked_mean(per_row, mask)


def distributional_soft_target(
    realised_reward: torch.Tensor,
    next_quantiles: torch.Tensor,
    next_log_pi: torch.Tensor,
    done: torch.Tensor,
    gamma: float,
    alpha: float,
) -> torch.Tensor:
    """Soft distributional Bellman target for the critic quantiles (constants; no gradient).

    ``T_j = sg(r) + gamma (1-done) (Z'_j(s',a') - alpha log pi(a'|s'))``,  ``a' ~ pi(.|s')``.

    The entropy term makes ``E[T] = r + gamma (1-done) V(s') = Q(s,a)`` in expectation over ``a'``, i.e.
    consistent with the soft critic that IQ-Learn trains (the spec's target omitted it; see docs/method.md).
    realised_reward [B], next_quantiles [B, M], next_log_pi [B], done [B] -> [B, M].
    """
    not_done = (1.0 - done.to(next_quantiles.dtype)).unsqueeze(1)
    cont = next_quantiles - alpha * next_log_pi.unsqueeze(1)
    return (realised_reward.unsqueeze(1) + gamma * not_done * cont).detach()


def cvar(quantiles: torch.Tensor, level: float) -> torch.Tensor:
    """Lower-tail CVaR of the N-atom distribution given by equally weighted quantiles (last dim).

    With sorted quantiles ``q_(1) <= ... <= q_(N)``, each of mass 1/N, ``k = floor(level N)``:
    ``CVaR_level = (1/level) [ (1/N) sum_{i<=k} q_(i) + (level - k/N) q_(k+1) ]``  (``level = 1`` = mean).
    """
    n = quantiles.shape[-1]
    k, rest = _lower_tail(n, level)
    sorted_q, _ = torch.sort(quantiles, dim=-1)
    total = sorted_q[..., :k].sum(dim=-1) / n
    if rest:
        total = total + rest * sorted_q[..., k]
    return total / level


def _lower_tail(n: int, level: float) -> Tuple[int, float]:
    """``(k, rest)`` of :func:`cvar`'s formula for ``n`` atoms: the ``k`` whole atoms in the tail, and the mass
    ``rest`` taken from atom ``k + 1`` (0.0 when the tail ends on an atom's edge)."""
    if not 0.0 < level <= 1.0:
        raise ValueError(f"CVaR level must be in (0, 1], got {level}")
    k = min(int(level * n + 1e-9), n)
    rest = level - k / n
    return k, (rest if k < n and rest > 1e-12 else 0.0)


def _padded_size(n: int) -> int:
    """``n`` rounded up to a power of two (the width of Batcher's network)."""
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _tail_network(n: int, k: int, need_next: bool) -> Tuple[Tuple[int, int], ...]:
    """The comparators ``(i, j)`` (min to ``i``, max to ``j``) of Batcher's odd-even merge sort on ``n``
    values (padded to a power of two) that the sum of the ``k`` smallest, and the ``(k+1)``-th smallest when
    ``need_next``, depend on.

    Pruned backwards: a comparator is dropped when neither output is read later, or when both outputs only
    enter the final sum (swapping two terms of a sum changes nothing)."""
    size = _padded_size(n)
    network = []
    p = 1
    while p < size:
        step = p
        while step >= 1:
            for j in range(step % p, size - step, 2 * step):
                for i in range(min(step, size - j - step)):
                    if (i + j) // (2 * p) == (i + j + step) // (2 * p):
                        network.append((i + j, i + j + step))
            step //= 2
        p *= 2
    DEAD, SUM, LIVE = 0, 1, 2
    state = [SUM if pos < k else DEAD for pos in range(size)]
    if need_next:
        state[k] = LIVE
    kept = []
    for i, j in reversed(network):
        if (state[i], state[j]) in ((DEAD, DEAD), (SUM, SUM)):
            continue
        kept.append((i, j))
        state[i] = state[j] = LIVE
    return tuple(reversed(kept))


def cvar_along(quantiles: torch.Tensor, level: float, dim: int = -1) -> torch.Tensor:
    """:func:`cvar` along ``dim`` without sorting: a selection network of elementwise min/max over the
    quantile slices, each slice a whole tensor (fast where there are many distributions of few quantiles,
    e.g. ``[B, N, C]`` for every catalog item; a sort of millions of 16-atom rows is not).  Same formula,
    same value as :func:`cvar` up to float rounding of the sum's order."""
    n = quantiles.shape[dim]
    k, rest = _lower_tail(n, level)
    slices = list(quantiles.unbind(dim))
    slices += [torch.full_like(slices[0], float("inf"))] * (_padded_size(n) - n)  # padding sorts last
    for i, j in _tail_network(n, k, bool(rest)):
        slices[i], slices[j] = torch.minimum(slices[i], slices[j]), torch.maximum(slices[i], slices[j])
    total = torch.stack(slices[:k]).sum(0) / n if k else torch.zeros_like(slices[0])
    if rest:
        total = total + rest * slices[k]
    return total / level


def qr_iql_loss(
    q_sa: torch.Tensor,
    v_s: torch.Tensor,
    v_next: torch.Tensor,
    done: torch.Tensor,
    critic_quantiles: torch.Tensor,
    critic_targets: torch.Tensor,
    reward_quantiles: torch.Tensor,
    realised_reward: torch.Tensor,
    taus: torch.Tensor,
    gamma: float,
    chi2_c: float,
    kappa: float,
    lambda_qr: float,
    lambda_r: float,
    mask: Optional[torch.Tensor] = None,
    debias_chi2: bool = False,
) -> Dict[str, torch.Tensor]:
    """QR-IQL total: ``L = L_IQ + lambda_qr * L_QR + lambda_r * L_R``.

    * ``L_IQ = iq_chi2_loss(q_sa, v_s, v_next, done)``, with ``expected_reward = mean_i R_i(s,a)`` when
      ``debias_chi2`` (see :func:`iq_chi2_loss`);
    * ``L_QR = quantile_huber_loss(Z(s,a) [B,N], T [B,M])`` with T from :func:`distributional_soft_target`;
    * ``L_R = quantile_huber_loss(R(s,a) [B,N], sg(r(s,a,s')) [B,1])``: the reward head regresses the
      realised implied reward, so its quantiles describe how the reward varies with what followed.

    Returns {"loss", "iq", "qr", "r"} (0-d tensors; "loss" carries the gradient).
    """
    rhat = reward_quantiles.mean(dim=-1) if debias_chi2 else None
    iq = iq_chi2_loss(q_sa, v_s, v_next, done, gamma, chi2_c, mask, expected_reward=rhat)
    qr = quantile_huber_loss(critic_quantiles, critic_targets, taus, kappa, mask)
    rl = quantile_huber_loss(reward_quantiles, realised_reward.detach().unsqueeze(1), taus, kappa, mask)
    return {"loss": iq + lambda_qr * qr + lambda_r * rl, "iq": iq, "qr": qr, "r": rl}
