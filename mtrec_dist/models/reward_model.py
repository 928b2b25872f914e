"""QR-IQL mental reward model (docs/method.md "QR-IQL v2: the mental reward as built" and "QR-IQL v1").

Parametrisation (D = embedding dim, N = quantiles, h = g(s) the state encoding):

* distributional critic ``Z_i(s,a) = <W_i h + u_i, e_a>``: the per-item bias ``b_i(a)`` of the spec is
  ``<u_i, e_a>``.  This keeps the model to ONE sharded table (no second per-item table, no extra table
  column whose gradient would have to be routed by hand) and makes every score a dense projection of ``h``
  dotted with item vectors, so the full-catalog soft value is a matmul against the catalog's vectors;
* mean critic ``Q(s,a) = (1/N) sum_i Z_i(s,a) = <mean_i(W_i h + u_i), e_a>`` (linear, hence cheap);
* reward-quantile head ``R_i(s,a) = <V_i h + v_i, e_a>`` (same form, separate parameters);
* Polyak target critic: copies of the dense critic parameters (encoder, W, u) updated by
  :meth:`QRIQLModel.update_target`.  The target shares the item table: it reads the *current* item
  vectors, detached (a second copy of a sharded table would double its memory and its all-to-alls).

DMP notes: all lookups go through ``self.item_embedding`` in exactly one call per :meth:`losses` (same
features, same order on every rank); ``forward(batch)`` is :meth:`losses` so that DDP's gradient hooks
see the dense parameters; target parameters have ``requires_grad=False`` (optimisers and DDP skip them);
after DMP materialises a meta-built model it calls :meth:`reset_parameters`, which re-initialises the
heads and copies the online critic into the target.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig, RewardConfig
from ..objectives.qr_iql import (
    quantile_huber_loss,
    catalog_soft_value,
    cvar_along,
    distributional_soft_target,
    qr_iql_loss,
    realised_reward_target,
    quantile_midpoints,
    soft_value,
)
from ..objectives.mental_reward import (
    ConsequenceModel, choice_nll, consequence_nll, mental_return_target, order_nll, realised_mental_reward,
    shown_choice_nll, watch_logit,
)
from ..objectives.ranking import masked_mean
from .embeddings import ItemEmbedding
from .encoders import build_encoder
# NegativeSampler and catalog_gumbel_argmax are re-exported: older imports read them here
from .sampling import NegativeSampler, catalog_gumbel_argmax, draw_per_row

__all__ = ["QRIQLModel", "NegativeSampler", "catalog_gumbel_argmax"]

# The per-item level b_M(a) = ITEM_LEVEL_SCALE * w_a.  Adam moves a parameter about lr per step whatever the
# gradient's size, and one item's level is in only a few batches per epoch; the scale lets it move as far as
# the shared weights, which every batch updates.
ITEM_LEVEL_SCALE = 30.0
# Floats of the [B, N, c] reward quantiles scored at once by the catalog baseline: about 1 MiB, so the CVaR
# selection network's many elementwise passes run in cache (measured: 4x faster than one 8192-item chunk).
TAIL_CHUNK_ELEMENTS = 1 << 18
# Floats of each [B, c] temporary (scores, policy, cumulative mass) of the catalog baseline's soft value and mean:
# 4 MiB.  glibc serves larger blocks with mmap and hands them back on free, so every batch page-faults them in
# again: in a fresh process, scoring 49k rows (B = 512, 4,978 items) took 14.7 s with one 8,192-item chunk and
# 9.1-9.6 s with 1,024-2,048 items per step (8.4 and 7.9 s once warm; 512 items: 9.8 s, the per-step work shows).
BASELINE_CHUNK_ELEMENTS = 1 << 20


def tail_chunk_items(chunk: int, floats_per_item: int, device: torch.device,
                     elements: Optional[int] = None) -> int:
    """Items per step of a catalog loop: on a CPU, as many as keep one step's temporaries near ``elements``
    floats (default :data:`TAIL_CHUNK_ELEMENTS`, the [B, N, c] quantiles of the CVaR network, in cache
    through its many elementwise passes); on an accelerator, where each pass is a kernel launch, the whole
    ``chunk``."""
    if device.type != "cpu":
        return max(1, chunk)
    budget = TAIL_CHUNK_ELEMENTS if elements is None else elements
    return max(1, min(chunk, budget // max(1, floats_per_item)))


def draws_cvar_baseline(cvar_draws: int, set_size: int) -> bool:
    """Whether :meth:`QRIQLModel.reward_baseline_over` estimates the CVaR baseline from ``cvar_draws`` policy
    draws (a set larger than that, and draws on) rather than computing it exactly."""
    return 0 < int(cvar_draws) < int(set_size)


class PolicyDraws:
    """``K`` draws per row from a policy over a set seen in chunks, at the evenly spaced points
    ``u_k = (k + 1/2) / K`` of each row's CDF (systematic sampling: no random numbers, every part of the
    distribution covered in proportion).  :meth:`add` takes the next chunk's probabilities [B, c];
    :meth:`positions` [B, K] are indices into the whole set.  A point past a row's last cumulative sum (the sum
    falls short of 1 by rounding) takes the row's last item of positive probability."""

    def __init__(self, rows: int, draws: int, set_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.points = ((torch.arange(draws, device=device, dtype=dtype) + 0.5) / draws).expand(rows, draws).contiguous()
        self.found = torch.full((rows, draws), -1, dtype=torch.long, device=device)
        self.last_positive = torch.full((rows,), set_size - 1, dtype=torch.long, device=device)
        self.mass_before = torch.zeros(rows, 1, device=device, dtype=dtype)

    def add(self, probs: torch.Tensor, start: int) -> None:
        cum = self.mass_before + probs.cumsum(1)  # [B, c]
        pos = torch.searchsorted(cum, self.points)  # first item whose cumulative mass reaches u_k
        here = (pos < probs.shape[1]) & (self.points > self.mass_before)
        self.found = torch.where(here, pos + start, self.found)
        index = torch.arange(probs.shape[1], device=probs.device)
        last = torch.where(probs > 0, index, -1).amax(1)  # this chunk's last item of positive probability
        self.last_positive = torch.where(last >= 0, last + start, self.last_positive)
        self.mass_before = cum[:, -1:]

    def positions(self) -> torch.Tensor:
        return torch.where(self.found >= 0, self.found, self.last_positive.unsqueeze(1))


class QRIQLModel(nn.Module):
    def __init__(
        self,
        num_items: int,
        model_cfg: ModelConfig,
        reward_cfg: RewardConfig,
        state_len: int,
        device: Optional[torch.device] = None,
        item_counts: Optional[Sequence[float]] = None,
        item_prior: Optional[Dict[str, Sequence[float]]] = None,
    ) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = int(num_items)
        self.state_len = int(state_len)
        self.model_cfg = model_cfg
        self.reward_cfg = reward_cfg
        d, n = model_cfg.embedding_dim, reward_cfg.num_quantiles
        self.item_embedding = ItemEmbedding(num_items + 1, d, device=device)
        self.encoder = build_encoder(model_cfg.encoder, model_cfg, state_len, device)
        self.target_encoder = build_encoder(model_cfg.encoder, model_cfg, state_len, device)
        self.target_encoder.requires_grad_(False)
        self.critic_weight = nn.Parameter(torch.empty(n, d, d, device=device))
        self.critic_item_bias = nn.Parameter(torch.empty(n, d, device=device))
        self.reward_weight = nn.Parameter(torch.empty(n, d, d, device=device))
        self.reward_item_bias = nn.Parameter(torch.empty(n, d, device=device))
        self.target_critic_weight = nn.Parameter(torch.empty(n, d, d, device=device), requires_grad=False)
        self.target_critic_item_bias = nn.Parameter(torch.empty(n, d, device=device), requires_grad=False)
        self.v2 = reward_cfg.objective == "v2"
        if self.v2:  # decision utility U(s,a) = <A h + c, e_a>; state offsets (d, W, W_r); watch link k_y, sigma_y
            self.utility_weight = nn.Parameter(torch.empty(d, d, device=device))
            self.utility_item_bias = nn.Parameter(torch.empty(d, device=device))
            self.state_offsets = nn.Linear(d, 3, device=device)
            self.log_watch_link = nn.Parameter(torch.zeros(2, device=device))  # log k_y, log sigma_y
            self.watch_item_offset = nn.Parameter(torch.zeros(d, device=device))  # b_y(a) = <v, e_a>
            self.watch_duration_coef = nn.Parameter(torch.zeros(1, device=device))  # c in c * log(duration / 60 s)
        # a free per-item level of the mental reward, fitted to the order of self-directed sessions (order term):
        # one float per item, a dense vector rather than a second sharded table
        self.order_term = self.v2 and reward_cfg.order_items > 0
        if self.order_term:
            self.reward_item_level = nn.Parameter(torch.zeros(num_items + 1, device=device))
        # the item prior (objectives.item_prior, reward.item_prior): a fixed level added to Mbar and the watch
        # link's per-item offset, counted from the training rows before training; buffers, so checkpoints keep
        # them and scoring reads them back.  The values wait here: the model may be built on the meta device.
        self.uses_item_prior = reward_cfg.uses_item_prior
        if self.uses_item_prior:
            self.register_buffer("item_prior_level", torch.zeros(num_items + 1, device=device))
            self.register_buffer("item_prior_watch_level", torch.zeros(num_items + 1, device=device))
            self._item_prior_init = None if item_prior is None else {
                k: torch.as_tensor(np.asarray(item_prior[k], np.float32)) for k in ("level", "watch_level")}
            for key, values in (self._item_prior_init or {}).items():
                if values.shape != (num_items + 1,):
                    raise ValueError(f"item_prior: {values.shape[0]} {key}s for {num_items} items (+1 padding)")
        self.has_item_level = self.order_term or self.uses_item_prior
        self.sampler = (
            NegativeSampler(num_items, reward_cfg.negative_sampler, item_counts)
            if reward_cfg.num_negatives > 0 else None
        )
        self.reset_parameters()

    # ---- parameters --------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Initialise the heads and copy the online critic into the target (called again by DMP)."""
        d = self.model_cfg.embedding_dim
        with torch.no_grad():
            for w in (self.critic_weight, self.reward_weight):
                nn.init.normal_(w, std=1.0 / math.sqrt(d))
            for b in (self.critic_item_bias, self.reward_item_bias):
                nn.init.zeros_(b)
            if self.v2:
                nn.init.normal_(self.utility_weight, std=1.0 / math.sqrt(d))
                nn.init.zeros_(self.utility_item_bias)
                self.state_offsets.reset_parameters()
                self.log_watch_link.zero_()
                self.watch_item_offset.zero_()
                self.watch_duration_coef.zero_()
                if not self.reward_cfg.consequences:  # no outcome to fit the state part to: it stays at 0
                    self.reward_weight.zero_()
            if self.order_term:
                self.reward_item_level.zero_()
        self.apply_item_prior()
        self.sync_target()

    @torch.no_grad()
    def apply_item_prior(self) -> None:
        """Write the item prior this model was built with into its buffers (zeros without one: a model built
        for scoring, whose buffers come from its checkpoint).  Also called after a warm start, which copies
        every tensor of the earlier checkpoint, the earlier days' prior included."""
        if not self.uses_item_prior:
            return
        if self._item_prior_init is None:  # built on the meta device, the buffers hold whatever memory held
            self.item_prior_level.zero_()
            self.item_prior_watch_level.zero_()
            return
        self.item_prior_level.copy_(self._item_prior_init["level"])
        self.item_prior_watch_level.copy_(self._item_prior_init["watch_level"])

    after_warm_start = apply_item_prior

    def _critic_pairs(self):
        pairs = [(self.target_critic_weight, self.critic_weight), (self.target_critic_item_bias, self.critic_item_bias)]
        pairs += list(zip(self.target_encoder.parameters(), self.encoder.parameters()))
        pairs += list(zip(self.target_encoder.buffers(), self.encoder.buffers()))
        return pairs

    @torch.no_grad()
    def sync_target(self) -> None:
        """Hard copy: target critic <- online critic."""
        for tgt, src in self._critic_pairs():
            tgt.copy_(src)

    @torch.no_grad()
    def update_target(self, tau: Optional[float] = None) -> None:
        """Polyak step ``theta' <- (1 - tau) theta' + tau theta`` (tau defaults to reward.polyak).

        Call after every optimiser step (on every rank: the dense parameters are replicated, so all ranks
        compute the same target)."""
        tau = self.reward_cfg.polyak if tau is None else float(tau)
        for tgt, src in self._critic_pairs():
            if tgt.dtype.is_floating_point:
                tgt.lerp_(src, tau)
            else:
                tgt.copy_(src)

    def train(self, mode: bool = True) -> "QRIQLModel":
        super().train(mode)
        self.target_encoder.train(False)  # targets never use dropout
        return self

    # ---- building blocks ---------------------------------------------------------------------------

    @staticmethod
    def _project(h: torch.Tensor, weight: torch.Tensor, item_bias: torch.Tensor) -> torch.Tensor:
        """``P_i = W_i h + u_i``: h [B, D] -> [B, N, D], so that head_i(s, a) = <P_i, e_a>."""
        return torch.einsum("nde,be->bnd", weight, h) + item_bias.unsqueeze(0)

    def _encode(self, encoder: nn.Module, emb: torch.Tensor, items: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
        return encoder(emb, feedback, items != 0)

    def taus(self, device=None) -> torch.Tensor:
        return quantile_midpoints(self.reward_cfg.num_quantiles, device=device)

    def catalog_ids(self, device) -> torch.Tensor:
        """Item indices 1..num_items (the padding item 0 is never a candidate)."""
        return torch.arange(1, self.num_items + 1, device=device)

    # ---- training ----------------------------------------------------------------------------------

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.losses(batch)

    def losses(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The training losses of the configured objective (``reward.objective``)."""
        return self.losses_v2(batch) if self.v2 else self.losses_v1(batch)

    def _lookup(self, batch: Dict[str, torch.Tensor]):
        """The batch's columns, ONE item-table lookup (states, next states, actions, the slates shown where
        the batch has them, and the catalog or the shared sampled negatives) and the encodings of ``s`` and
        ``s'`` stacked as ``[2B, D]``."""
        s, fb = batch["state_items"].long(), batch["state_feedback"].float()
        s2, fb2 = batch["next_state_items"].long(), batch["next_state_feedback"].float()
        action, done = batch["action"].long(), batch["done"].float()
        mask = batch["mask"].float() if "mask" in batch else torch.ones_like(done)
        ids = {"state": s, "next_state": s2, "action": action.view(-1, 1)}
        if self.v2 and self.reward_cfg.slate_choice and "slate_items" in batch:
            ids["slate"] = batch["slate_items"].long()
        negatives = None
        if self.sampler is None:
            ids["catalog"] = self.catalog_ids(s.device)
        else:
            negatives = self.sampler.sample(self.reward_cfg.num_negatives, s.device)
            ids["candidates"] = negatives
        emb = self.item_embedding(ids)
        h_both = self._encode(self.encoder, torch.cat([emb["state"], emb["next_state"]]),
                              torch.cat([s, s2]), torch.cat([fb, fb2]))
        return s, fb, s2, fb2, action, done, mask, emb, negatives, h_both

    def item_level(self, items: torch.Tensor) -> torch.Tensor:
        """The mental reward's per-item level ``b_M(a)`` for item indices of any shape: the order term's
        free level plus the item prior's fixed one (whichever of the two the model has)."""
        items = items.long()
        level = ITEM_LEVEL_SCALE * self.reward_item_level[items] if self.order_term else 0.0
        return level + self.item_prior_level[items] if self.uses_item_prior else level

    def _plus_item_level(self, reward_q: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``reward_q + b_M(items)`` over the quantile axis (the last; ``items`` indexes the leading axes or
        broadcasts against them); ``reward_q`` unchanged without an item level."""
        return reward_q + self.item_level(items).unsqueeze(-1) if self.has_item_level else reward_q

    def policy_projection(self, h: torch.Tensor) -> torch.Tensor:
        """The projection whose dot with ``e_a`` drives choices: ``U`` in v2, the critic mean ``Q`` in v1."""
        if self.v2:
            return h @ self.utility_weight.T + self.utility_item_bias
        return self._project(h, self.critic_weight, self.critic_item_bias).mean(1)

    def outcomes(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The observed consequences of each logged action (objectives.mental_reward.consequence_nll), those
        not in ``reward.consequences`` switched off.

        ``returned`` / ``return_known`` are optional batch columns (absent: no return term); a source
        without a watch signal carries ``action_feedback`` 1.0 on every row and gets no watch term."""
        used = self.reward_cfg.consequences
        done = batch["done"].float()
        fb = batch["action_feedback"].float() if "action_feedback" in batch else torch.ones_like(done)
        has_watch = (fb < 1.0).any().float().expand_as(done)  # a constant 1.0 column carries no signal
        zeros = torch.zeros_like(done)
        known = batch["return_known"].float() if "return_known" in batch else zeros
        return dict(z=watch_logit(fb), has_watch=has_watch * ("watch" in used), stay=1.0 - done,
                    stay_known=torch.full_like(done, float("continue" in used)),
                    returned=batch["returned"].float() if "returned" in batch else zeros,
                    return_known=known * ("return" in used))

    def _slate_choice(self, batch, u_proj: torch.Tensor, e_a: torch.Tensor, emb, action: torch.Tensor):
        """``(per-row NLL of the click among its slate, rows that have a slate)`` for :func:`choice_nll`
        (R2: the slate shown is the choice set), or ``(None, None)`` when the batch has no ``slate_items``.
        The slate's padding (0: no slate, or an item the vocab does not know) and the clicked item itself
        are left out of the other items; a row uses its slate only where the slate holds the clicked item."""
        if "slate" not in emb:
            return None, None
        slate = batch["slate_items"].long()
        clicked = slate == action.view(-1, 1)
        others = (slate > 0) & ~clicked
        alpha = self.reward_cfg.alpha
        u_shown = torch.einsum("bd,bkd->bk", u_proj, emb["slate"]) / alpha
        nll = shown_choice_nll((u_proj * e_a).sum(-1) / alpha, u_shown, others)
        # a slate that does not hold the clicked item tells another story than the click: the catalog it is
        return nll, others.any(1) & clicked.any(1)

    def losses_v2(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """QR-IQL v2 (docs/method.md "QR-IQL v2"):
        ``L = L_U + L_cons + L_o + lambda_r * QH(M_i; m) + lambda_qr * QH(Z_i; m + gamma (1-d) Z'_j)``.

        ``L_U`` fits the decision utility to the logged choice over the slate it was clicked in where the batch
        has ``slate_items`` (``reward.slate_choice``), else over the catalog (or sampled candidates);
        ``L_cons`` fits the mean mental reward to the consequences (those in ``reward.consequences``);
        ``L_o`` (``reward.order_items`` > 0 and a batch with ``later_items``) ranks the per-item level
        ``b_M(a)`` of ``Mbar`` by the order of a self-directed session's choices; ``m`` is the realised mental reward
        (posterior mean given the outcome); ``a' ~ softmax U(s', .)``.
        """
        cfg = self.reward_cfg
        s, fb, s2, fb2, action, done, mask, emb, negatives, h_both = self._lookup(batch)
        b, dev = s.shape[0], s.device
        h = h_both[:b]
        e_a = emb["action"][:, 0]
        items = emb["catalog"] if self.sampler is None else emb["candidates"]
        u_proj = self.policy_projection(h_both)
        slate = self._slate_choice(batch, u_proj[:b], e_a, emb, action)
        if self.sampler is None:
            l_u = choice_nll(u_proj[:b] @ items.T / cfg.alpha, (action - 1).clamp_min(0), mask, *slate)
        else:  # sampled softmax with log-q correction; the logged item is column 0
            log_q = self.sampler.log_expected_count(negatives, cfg.num_negatives)
            log_q_pos = self.sampler.log_expected_count(action, cfg.num_negatives).unsqueeze(1)
            pos = (u_proj[:b] * e_a).sum(-1, keepdim=True) / cfg.alpha - log_q_pos
            neg = (u_proj[:b] @ items.T / cfg.alpha - log_q).masked_fill(negatives.view(1, -1) == action.view(-1, 1), float("-inf"))
            l_u = choice_nll(torch.cat([pos, neg], 1), torch.zeros(b, dtype=torch.long, device=dev), mask, *slate)

        r_q = torch.einsum("bnd,bd->bn", self._project(h, self.reward_weight, self.reward_item_bias), e_a)
        r_q = self._plus_item_level(r_q, action)
        mbar = r_q.mean(dim=1)
        l_o = torch.zeros((), device=dev)
        if self.order_term and "later_items" in batch:  # the user's own order of a session's choices
            later = batch["later_items"].long()
            l_o = order_nll(self.item_level(action), self.item_level(later), later > 0, mask)
        d_w_wr = self.state_offsets(h)
        d_y = d_w_wr[:, 0]
        k_y, sigma_y = self.log_watch_link.exp().unbind(0)
        if self.uses_item_prior:  # the item's watch level less what its prior level explains: only what
            # varies within an item (and the network's own item part) is left to the watch term
            d_y = d_y + self.item_prior_watch_level[action] - k_y * self.item_prior_level[action]
        elif cfg.watch_item_offset:
            d_y = d_y + e_a @ self.watch_item_offset
        if "action_log_duration" in batch:  # an observable item length explains part of the watch ratio
            d_y = d_y + self.watch_duration_coef * batch["action_log_duration"].float()
        cons_model = ConsequenceModel(d=d_y, W=d_w_wr[:, 1], W_r=d_w_wr[:, 2], k_y=k_y, sigma_y=sigma_y)
        obs = self.outcomes(batch)
        cons = consequence_nll(mbar, obs, cons_model, mask)
        realised = realised_mental_reward(mbar.detach(), obs, cons_model.detach(), cfg.prior_sd)
        taus = self.taus(dev)
        # with no outcome m is Mbar itself: nothing to regress, and Adam would turn rounding noise into steps
        l_r = (quantile_huber_loss(r_q, realised.unsqueeze(1), taus, cfg.kappa, mask) if cfg.consequences
               else torch.zeros((), device=dev))

        z_sa = torch.einsum("bnd,bd->bn", self._project(h, self.critic_weight, self.critic_item_bias), e_a)
        with torch.no_grad():
            logits2 = u_proj[b:].detach() @ items.detach().T / cfg.alpha
            nxt = draw_per_row(torch.softmax(logits2, dim=1))
            h_t = self._encode(self.target_encoder, emb["next_state"].detach(), s2, fb2)
            p_t = self._project(h_t, self.target_critic_weight, self.target_critic_item_bias)
            z_next = torch.einsum("bnd,bd->bn", p_t, items.detach()[nxt])
            targets = mental_return_target(realised, z_next, done, cfg.gamma)
        l_qr = quantile_huber_loss(z_sa, targets, taus, cfg.kappa, mask)
        loss = l_u + cons["total"] + l_o + cfg.lambda_r * l_r + cfg.lambda_qr * l_qr
        with torch.no_grad():
            out = {"loss": loss, "choice": l_u.detach(), "consequence": cons["total"].detach(),
                   "cons_watch": cons["y"].detach(), "cons_continue": cons["continue"].detach(),
                   "cons_return": cons["return"].detach(), "order": l_o.detach(), "r": l_r.detach(), "qr": l_qr.detach(),
                   "watch_link": k_y.detach(), "reward_mean": masked_mean(mbar, mask),
                   "reward_spread": masked_mean(r_q.amax(dim=1) - r_q.amin(dim=1), mask),
                   "critic_spread": masked_mean(z_sa.amax(dim=1) - z_sa.amin(dim=1), mask),
                   "realised_reward": masked_mean(realised, mask), "real_rows": mask.sum()}
        out["loss"] = loss
        return out

    def losses_v1(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """QR-IQL v1 losses on a batch of logged transitions (schema.py's torch batch contract).

        Returns "loss" (total, with gradient), the terms "iq", "qr", "r", and detached diagnostics:
        "reward_mean" (mean of R over real rows), "reward_spread" (mean q_max - q_min of R),
        "implied_reward", "value" (mean V(s)), "q_mean", "expert_logp" (mean alpha log pi(a|s) / alpha).
        """
        cfg = self.reward_cfg
        s, fb, s2, fb2, action, done, mask, emb, negatives, h_both = self._lookup(batch)
        b, dev = s.shape[0], s.device
        p_both = self._project(h_both, self.critic_weight, self.critic_item_bias)  # [2B, N, D]
        p_s, p_s2 = p_both[:b], p_both[b:]
        e_a = emb["action"][:, 0]  # [B, D]
        z_sa = torch.einsum("bnd,bd->bn", p_s, e_a)  # [B, N]
        q_sa = z_sa.mean(dim=1)
        qbar_s, qbar_s2 = p_s.mean(dim=1), p_s2.mean(dim=1)  # mean-critic projections [B, D]

        if self.sampler is None:
            items = emb["catalog"]  # [C, D]
            v_s = catalog_soft_value(qbar_s, items, cfg.alpha, cfg.catalog_chunk)
            v_s2 = catalog_soft_value(qbar_s2, items, cfg.alpha, cfg.catalog_chunk)
            with torch.no_grad():
                nxt = catalog_gumbel_argmax(qbar_s2.detach(), items.detach(), cfg.alpha, cfg.catalog_chunk)
                e_next = items.detach()[nxt]
        else:
            m = cfg.num_negatives
            items = emb["candidates"]  # [m, D]
            log_q_neg = self.sampler.log_expected_count(negatives, m)  # [m]
            log_q_pos = self.sampler.log_expected_count(action, m)  # [B]
            q_neg_s = qbar_s @ items.T  # [B, m]
            q_neg_s2 = qbar_s2 @ items.T
            not_hit = negatives.view(1, -1) != action.view(-1, 1)  # accidental hits are dropped
            v_s = soft_value(
                torch.cat([q_sa.unsqueeze(1), q_neg_s], dim=1), cfg.alpha,
                log_q=torch.cat([log_q_pos.unsqueeze(1), log_q_neg.expand(b, m)], dim=1),
                mask=torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), not_hit], dim=1),
            )
            # V(s'): plain importance-sampling estimate over the shared negatives (no positive is known)
            v_s2 = soft_value(q_neg_s2, cfg.alpha, log_q=log_q_neg)
            with torch.no_grad():
                probs = torch.softmax(q_neg_s2.detach() / cfg.alpha - log_q_neg, dim=1)
                nxt = draw_per_row(probs)
                e_next = items.detach()[nxt]

        r = q_sa - cfg.gamma * (1.0 - done) * v_s2  # implied reward (objectives.qr_iql.implied_reward)
        with torch.no_grad():
            next_log_pi = ((qbar_s2 * e_next).sum(-1) - v_s2) / cfg.alpha
            h_t = self._encode(self.target_encoder, emb["next_state"].detach(), s2, fb2)
            p_t = self._project(h_t, self.target_critic_weight, self.target_critic_item_bias)
            z_next = torch.einsum("bnd,bd->bn", p_t, e_next)
            targets = distributional_soft_target(r.detach(), z_next, next_log_pi, done, cfg.gamma, cfg.alpha)

        p_r = self._project(h_both[:b], self.reward_weight, self.reward_item_bias)
        r_q = torch.einsum("bnd,bd->bn", p_r, e_a)  # [B, N]

        watch = batch["action_feedback"].float() if "action_feedback" in batch else torch.ones_like(done)
        r_target = realised_reward_target(r, watch, cfg.alpha, cfg.choice_weight, cfg.consumption_weight)
        out = qr_iql_loss(
            q_sa, v_s, v_s2, done, z_sa, targets, r_q, r_target, self.taus(dev),
            cfg.gamma, cfg.chi2_c, cfg.kappa, cfg.lambda_qr, cfg.lambda_r, mask, debias_chi2=cfg.chi2_debias,
        )
        with torch.no_grad():
            n_real = mask.sum().clamp_min(1.0)
            mean = lambda x: (x * mask).sum() / n_real  # noqa: E731
            out["reward_mean"] = mean(r_q.mean(dim=1))
            out["reward_spread"] = mean(r_q.amax(dim=1) - r_q.amin(dim=1))
            out["implied_reward"] = mean(r)
            out["value"] = mean(v_s)
            out["q_mean"] = mean(q_sa)
            out["expert_logp"] = mean((q_sa - v_s) / cfg.alpha)
            out["real_rows"] = mask.sum()
        return out

    # ---- scoring -----------------------------------------------------------------------------------

    def score(self, state_items: torch.Tensor, state_feedback: torch.Tensor, candidate_items: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Critic mean ``q`` [B, C] and reward quantiles ``reward_q`` [B, C, N] of candidates [B, C]."""
        emb = self.item_embedding({"state": state_items.long(), "candidates": candidate_items.long()})
        h = self._encode(self.encoder, emb["state"], state_items.long(), state_feedback.float())
        e = emb["candidates"]  # [B, C, D]
        q = torch.einsum("bd,bcd->bc", self.policy_projection(h), e)
        reward_q = torch.einsum("bnd,bcd->bcn", self._project(h, self.reward_weight, self.reward_item_bias), e)
        reward_q = self._plus_item_level(reward_q, candidate_items)
        return {"q": q, "reward_q": reward_q}

    def reward_quantiles(self, state_items: torch.Tensor, state_feedback: torch.Tensor,
                         candidate_items: torch.Tensor) -> torch.Tensor:
        """Mental reward quantiles ``R_i(s, a)`` [B, C, N] for candidates [B, C]; needs no next state."""
        return self.score(state_items, state_feedback, candidate_items)["reward_q"]

    def _drawn_tail_gap(self, p_r: torch.Tensor, items: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``(1/K) sum_k [CVaR - R_mean](s, a_k)`` [B] for the drawn items' ``positions`` [B, K] into ``items``,
        from the reward projections ``p_r`` [B, N, D]; on a CPU a block of rows at a time, so that the drawn
        items' embeddings [b, K, D] and quantiles [b, N, K] each stay near :data:`BASELINE_CHUNK_ELEMENTS` floats
        (with ``cvar_along``'s temporaries a block holds a few times that)."""
        rows, draws, dim = positions.shape[0], positions.shape[1], items.shape[1]
        block = tail_chunk_items(rows, draws * max(dim, p_r.shape[1]), p_r.device, BASELINE_CHUNK_ELEMENTS)
        gaps = []
        for r in range(0, rows, block):
            q = torch.bmm(p_r[r : r + block], items[positions[r : r + block]].transpose(1, 2))  # [b, N, K]
            gaps.append((cvar_along(q, self.reward_cfg.cvar_alpha, dim=1) - q.mean(1)).mean(1))
        return torch.cat(gaps) if gaps else p_r.new_zeros(0)

    @torch.no_grad()
    def catalog_reward_baseline(self, state_items: torch.Tensor, state_feedback: torch.Tensor,
                                chunk: Optional[int] = None, candidate_items: Optional[torch.Tensor] = None,
                                cvar_draws: int = 0) -> Dict[str, torch.Tensor]:
        """:meth:`reward_baseline_over` the whole catalog (``E_pi`` under the soft policy)."""
        return self.reward_baseline_over(state_items, state_feedback, self.catalog_ids(state_items.device), chunk,
                                         candidate_items, cvar_draws)

    @torch.no_grad()
    def reward_baseline_over(self, state_items: torch.Tensor, state_feedback: torch.Tensor, item_ids: torch.Tensor,
                             chunk: Optional[int] = None, candidate_items: Optional[torch.Tensor] = None,
                             cvar_draws: int = 0) -> Dict[str, torch.Tensor]:
        """Per state, under the model's soft policy restricted to ``item_ids`` [C] (one set for every row),
        ``pi(a|s) = exp((Q(s,a) - V(s)) / alpha)`` with ``V(s) = alpha logsumexp_{a in set} Q(s,a)/alpha``:
        "reward_baseline" ``E_pi R_mean(s,a)``, "reward_cvar_baseline" ``E_pi CVaR(R(s,a))``, "value" ``V(s)``
        ([B] each).  Over the whole catalog the mean baseline is exact; over items drawn uniformly (repeats
        allowed) it is the self-normalised estimate (the uniform proposal cancels).

        The CVaR baseline is exact too when ``cvar_draws`` is 0 (the default) or the set has at most that many
        items (score-rewards passes ``train.score_cvar_draws``).  Above, it is ``E_pi R_mean + (1/K) sum_k [CVaR - R_mean](s, a_k)``, the ``K`` draws ``a_k`` taken from
        ``pi`` at the evenly spaced points ``(k + 1/2) / K`` of its CDF (systematic sampling): the exact CVaR
        costs a selection network per (state, item), most of the scoring time, while the mean is one
        projection.  The mean is the control variate: item levels cancel in ``CVaR - R_mean``, which keeps only
        each distribution's lower-tail shape, so few draws estimate it closely (tests/test_objectives.py).

        With ``candidate_items`` [B, C] it also returns their "reward_q" [B, C, N] (as :meth:`reward_quantiles`)
        from the same state encoding.  One embedding lookup of the set and the candidates (under DMP a
        collective: every rank calls it with its own set), scoring in chunks of ``chunk`` (default
        reward.catalog_chunk; on a CPU at most :data:`BASELINE_CHUNK_ELEMENTS` / B items)."""
        cfg = self.reward_cfg
        chunk = chunk or cfg.catalog_chunk
        s = state_items.long()
        ids = item_ids.long()
        keys = {"state": s, "catalog": ids}
        if candidate_items is not None:
            keys["candidates"] = candidate_items.long()
        emb = self.item_embedding(keys)
        h = self._encode(self.encoder, emb["state"], s, state_feedback.float())
        qbar = self.policy_projection(h)
        p_r = self._project(h, self.reward_weight, self.reward_item_bias)
        chunk = tail_chunk_items(chunk, qbar.shape[0], qbar.device, BASELINE_CHUNK_ELEMENTS)
        out = {}
        if candidate_items is not None:
            out["reward_q"] = self._plus_item_level(torch.einsum("bnd,bcd->bcn", p_r, emb["candidates"]), candidate_items)
        items = emb["catalog"]
        alpha = cfg.alpha
        v = catalog_soft_value(qbar, items, alpha, chunk)
        p_mean = p_r.mean(1)  # the quantiles' mean is linear in them: one [B, D] projection
        base = torch.zeros_like(v)
        cvar_base = torch.zeros_like(v)
        sampled = draws_cvar_baseline(cvar_draws, items.shape[0])
        if sampled:
            picks = PolicyDraws(v.shape[0], int(cvar_draws), items.shape[0], v.device, v.dtype)
            step = chunk
        else:
            step = tail_chunk_items(chunk, p_r.shape[0] * p_r.shape[1], items.device)
        for start in range(0, items.shape[0], step):
            e, e_ids = items[start : start + step], ids[start : start + step]
            pi = torch.exp((qbar @ e.T - v.unsqueeze(1)) / alpha)  # [B, c]
            item_shift = self.item_level(e_ids) if self.has_item_level else 0.0  # shifts every quantile alike
            base += (pi * (p_mean @ e.T + item_shift)).sum(1)
            if sampled:
                picks.add(pi, start)
            else:
                cvar_base += (pi * (cvar_along(torch.matmul(p_r, e.T), cfg.cvar_alpha, dim=1) + item_shift)).sum(1)
        if sampled:
            cvar_base = base + self._drawn_tail_gap(p_r, items, picks.positions())
        return {**out, "reward_baseline": base, "reward_cvar_baseline": cvar_base, "value": v}
