"""QR-IQL v2 objectives (docs/method.md "QR-IQL v2: the mental reward as built"): pure tensor functions.

v2 separates two utilities (R2): a *decision utility* ``U(s,a)`` that explains the click, and a *mental
reward* ``M(s,a)`` (quantiles ``M_i``, mean ``Mbar``) that explains what the user did after consuming (R4):

* consumption depth: ``z = logit(clip(y))  ~  Normal(k_y Mbar + d(s), sigma_y^2)``;
* continuation: staying is worth ``Mbar + W(s)``, leaving is the outside option worth 0 (R1):
  ``P(stay) = sigmoid(Mbar + W(s))``;
* return after a session ends: coming back is worth ``Mbar + W_r(s)``, staying away 0:
  ``P(return | done) = sigmoid(Mbar + W_r(s))`` (rows whose return is unknown are skipped).

``d``, ``W``, ``W_r`` are state-only offsets (a user who finishes everything, a good mood), so ``Mbar``
ranks items within a state by what all consequences agree on.  The realised mental reward of one event is
the posterior mean of ``m`` after seeing its outcome ``o`` (one Newton step from the prior ``N(Mbar,
tau^2)``), so every distributional target contains an observed outcome (R3):
``T_j = m(s,a,o) + gamma (1-done) Z'_j(s',a')``.

Shapes: B rows, N quantiles; ``mask`` [B] is 1 for real rows.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .ranking import masked_mean

__all__ = [
    "ConsequenceModel",
    "watch_logit",
    "consequence_nll",
    "realised_mental_reward",
    "mental_return_target",
    "shown_choice_nll",
    "choice_nll",
    "order_nll",
]


def watch_logit(watch_ratio: torch.Tensor, eps: float = 0.02) -> torch.Tensor:
    """``z = log(y / (1 - y))`` with ``y`` clipped to ``[eps, 1 - eps]`` (0 and 1 would be infinite)."""
    y = watch_ratio.clamp(eps, 1.0 - eps)
    return torch.log(y) - torch.log1p(-y)


class ConsequenceModel(NamedTuple):
    """The consequence model's parameters besides ``Mbar``: the state offsets ``d`` (watch), ``W``
    (continuation) and ``W_r`` (return), each [B], and the watch link's slope ``k_y`` and noise ``sigma_y``
    (scalars); shared by :func:`consequence_nll` and :func:`realised_mental_reward`."""

    d: torch.Tensor
    W: torch.Tensor
    W_r: torch.Tensor
    k_y: torch.Tensor
    sigma_y: torch.Tensor

    def detach(self) -> "ConsequenceModel":
        """The same parameters as constants."""
        return ConsequenceModel(*(t.detach() for t in self))


def _links(mbar: torch.Tensor, outcomes: Dict[str, torch.Tensor], model: ConsequenceModel) -> Dict[str, torch.Tensor]:
    """The outcome model's predictors, defined once for the likelihood and its Newton step: the watch
    residual ``z - k_y Mbar - d``, the continuation logit ``Mbar + W`` and the return logit ``Mbar + W_r``,
    with the row weights of the watch, continuation and return terms."""
    return {"resid": outcomes["z"] - model.k_y * mbar - model.d, "logit_c": mbar + model.W,
            "logit_r": mbar + model.W_r, "has_watch": outcomes["has_watch"].to(mbar.dtype),
            "known": outcomes["return_known"].to(mbar.dtype), "stay": outcomes["stay"].to(mbar.dtype),
            "stay_known": outcomes.get("stay_known", torch.ones_like(mbar)).to(mbar.dtype),
            "returned": outcomes["returned"].to(mbar.dtype)}


def consequence_nll(mbar: torch.Tensor, outcomes: Dict[str, torch.Tensor], model: ConsequenceModel,
                    mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Negative log-likelihood of the post-consumption outcomes given the mean mental reward.

    ``L_y = E[ (z - k_y Mbar - d)^2 / (2 sigma_y^2) + log sigma_y ]`` over rows with a watch signal;
    ``L_c = E[ stay_known BCE(stay, sigmoid(Mbar + W)) ]``;
    ``L_r = E_{done, known}[ BCE(returned, sigmoid(Mbar + W_r)) ]`` (sum over known rows / real rows).

    outcomes: "z" [B] (watch logit), "has_watch" [B] (0 where the source has no watch signal), "stay" [B]
    (1 - done), optional "stay_known" [B] (default 1; 0 where continuing is not read as a consequence),
    "returned" [B], "return_known" [B] (1 where the row ends a session and the log shows whether the user
    came back); model: ``d``, ``W``, ``W_r``, ``k_y``, ``sigma_y``.  Returns {"y", "continue", "return", "total"}.
    """
    m = torch.ones_like(mbar) if mask is None else mask.to(mbar.dtype)
    n = m.sum().clamp_min(1.0)
    x = _links(mbar, outcomes, model)
    wy = m * x["has_watch"]
    sigma_y = model.sigma_y
    l_y = ((x["resid"].pow(2) / (2 * sigma_y.pow(2)) + torch.log(sigma_y)) * wy).sum() / wy.sum().clamp_min(1.0)
    l_c = (F.binary_cross_entropy_with_logits(x["logit_c"], x["stay"], reduction="none")
           * m * x["stay_known"]).sum() / n
    l_r = (F.binary_cross_entropy_with_logits(x["logit_r"], x["returned"], reduction="none")
           * m * x["known"]).sum() / n
    return {"y": l_y, "continue": l_c, "return": l_r, "total": l_y + l_c + l_r}


@torch.no_grad()
def realised_mental_reward(mbar: torch.Tensor, outcomes: Dict[str, torch.Tensor], model: ConsequenceModel,
                           prior_sd: float) -> torch.Tensor:
    """Posterior mean of one event's mental reward given its outcome: a Newton step from the prior.

    With prior ``m ~ N(Mbar, tau^2)`` and the outcome log-likelihood ``ell(m)`` of
    :func:`consequence_nll`, ``m = Mbar + ell'(Mbar) / (1/tau^2 - ell''(Mbar))`` where
    ``ell' = has_watch k_y (z - k_y Mbar - d) / sigma_y^2 + stay_known (stay - p_c) + known (returned - p_r)``
    and ``-ell'' = has_watch k_y^2 / sigma_y^2 + stay_known p_c (1 - p_c) + known p_r (1 - p_r)``.
    Exact for the Gaussian term; a Laplace step for the two choices.  [B] -> [B] (constants).
    """
    x = _links(mbar, outcomes, model)
    k_y, sigma_y = model.k_y, model.sigma_y
    hw, known = x["has_watch"], x["known"]
    p_c, p_r = torch.sigmoid(x["logit_c"]), torch.sigmoid(x["logit_r"])
    sk = x["stay_known"]
    grad = hw * k_y * x["resid"] / sigma_y.pow(2) + sk * (x["stay"] - p_c) + known * (x["returned"] - p_r)
    curv = hw * k_y.pow(2) / sigma_y.pow(2) + sk * p_c * (1 - p_c) + known * p_r * (1 - p_r)
    return (mbar + grad / (1.0 / prior_sd ** 2 + curv)).detach()


def mental_return_target(realised: torch.Tensor, next_quantiles: torch.Tensor, done: torch.Tensor,
                         gamma: float) -> torch.Tensor:
    """Distributional target over mental returns: ``T_j = m + gamma (1-done) Z'_j(s',a')`` (constants).

    ``m`` is observed through the outcome (:func:`realised_mental_reward`), so the spread of ``T`` is the
    spread of what actually followed, unlike v1's circular ``Q + gamma (Z' - Qbar')``.
    realised [B], next_quantiles [B, M], done [B] -> [B, M].
    """
    not_done = (1.0 - done.to(next_quantiles.dtype)).unsqueeze(1)
    return (realised.unsqueeze(1) + gamma * not_done * next_quantiles).detach()


def shown_choice_nll(chosen: torch.Tensor, shown: torch.Tensor, shown_mask: torch.Tensor) -> torch.Tensor:
    """Luce choice of one item among the items shown with it, per row:
    ``-log( exp(u_a) / (exp(u_a) + sum_k mask_k exp(u_k)) )``.

    The top of any subset of a softmax is a softmax over that subset, so a click conditional on clicking is a
    choice among the slate it was shown in, and a session's first choice one among its later choices.
    chosen [B] (utility of the chosen item), shown [B, K] (utilities of the other shown items), shown_mask
    [B, K] (1 for a real item) -> [B]; a row with nothing else shown is 0 (a choice among one says nothing).
    """
    keep = shown_mask.to(chosen.dtype)
    logits = torch.cat([chosen.unsqueeze(1), shown.masked_fill(keep == 0, float("-inf"))], 1)
    return -torch.log_softmax(logits, 1)[:, 0]


def choice_nll(utility_logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
               slate_nll: Optional[torch.Tensor] = None, on_slate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decision utility fitted to choices: ``L_U = E[ -log softmax_a U(s,a) [logged a] ]``.

    utility_logits [B, C] over the catalog (or sampled candidates); target [B] column of the chosen item.
    Rows ``on_slate`` [B] (bool) use ``slate_nll`` [B] (:func:`shown_choice_nll` over the slate the item was
    clicked in, R2) instead: the slate is the choice set the user actually had.
    """
    nll = F.cross_entropy(utility_logits, target, reduction="none")
    if slate_nll is not None:
        nll = torch.where(on_slate, slate_nll, nll)
    return masked_mean(nll, mask)


def order_nll(first: torch.Tensor, later: torch.Tensor, later_mask: torch.Tensor,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rank-ordered choice within a self-directed session: the item a user reaches for first is, among the
    items they go on to choose in the same session, the one they expect to enjoy most (Luce: the top of any
    subset is a softmax over that subset, so the next K items of the session are a valid choice set).

    ``L_o = E_{rows with a later item}[ -log( exp(Mbar_a) / (exp(Mbar_a) + sum_k mask_k exp(Mbar_k)) ) ]``.
    first [B] (Mbar of the logged item), later [B, K] (Mbar of the session's next K items, same state),
    later_mask [B, K] (1 for real items).  Rows without a later item say nothing and are left out.
    """
    nll = shown_choice_nll(first, later, later_mask)
    w = (later_mask.sum(1) > 0).to(first.dtype) * (1.0 if mask is None else mask.to(first.dtype))
    return (nll * w).sum() / w.sum().clamp_min(1.0)
