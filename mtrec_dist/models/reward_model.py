"""QR-IQL mental reward model (method.md section 2; docs/method.md for the design as built).

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

import torch
from torch import nn

from ..config import ModelConfig, RewardConfig
from ..objectives.qr_iql import (
    catalog_soft_value,
    cvar,
    distributional_soft_target,
    qr_iql_loss,
    realised_reward_target,
    quantile_midpoints,
    soft_value,
)
from .embeddings import ItemEmbedding
from .encoders import build_encoder

__all__ = ["QRIQLModel", "NegativeSampler", "catalog_gumbel_argmax"]


class NegativeSampler:
    """Proposal ``q`` over items 1..num_items for sampled candidate sets (uniform or popularity).

    Popularity uses ``q(a) ∝ count(a) + 1`` (add-one smoothing keeps every item reachable and every log-q
    finite).  ``item_counts`` is indexed by item index (length num_items + 1; entry 0, the padding item, is
    ignored).  Held as plain CPU tensors, not module buffers: DMP would zero buffers of a meta-built model.
    """

    def __init__(self, num_items: int, kind: str = "uniform", item_counts: Optional[Sequence[float]] = None) -> None:
        self.num_items = int(num_items)
        self.kind = kind
        if kind == "uniform":
            probs = torch.full((self.num_items,), 1.0 / self.num_items, dtype=torch.float64)
        elif kind == "popularity":
            if item_counts is None:
                raise ValueError("negative_sampler='popularity' needs item_counts (length num_items + 1)")
            counts = torch.as_tensor(item_counts, dtype=torch.float64).flatten()
            if counts.numel() != self.num_items + 1:
                raise ValueError(
                    f"item_counts has length {counts.numel()}, expected num_items + 1 = {self.num_items + 1} "
                    "(indexed by item index, entry 0 = padding)"
                )
            if not torch.isfinite(counts).all() or (counts[1:] < 0).any():
                raise ValueError("item_counts must be finite and >= 0")
            smoothed = counts[1:] + 1.0
            probs = smoothed / smoothed.sum()
        else:
            raise ValueError(f"unknown negative sampler {kind!r}; choose 'uniform' or 'popularity'")
        # log q by item index; index 0 (padding, never sampled) gets the uniform value so that masked
        # padding rows stay finite.
        self._log_probs = torch.cat([torch.tensor([-math.log(self.num_items)], dtype=torch.float64), probs.log()]).float()
        self._probs = probs.float()
        self._cache: Dict[torch.device, tuple] = {}

    def _on(self, device: torch.device):
        if device not in self._cache:
            self._cache[device] = (self._probs.to(device), self._log_probs.to(device))
        return self._cache[device]

    def sample(self, m: int, device: torch.device) -> torch.Tensor:
        """``m`` item indices (1..num_items) drawn with replacement from ``q``."""
        probs, _ = self._on(device)
        if self.kind == "uniform":
            return torch.randint(1, self.num_items + 1, (m,), device=device)
        return torch.multinomial(probs, m, replacement=True) + 1

    def log_expected_count(self, items: torch.Tensor, m: int) -> torch.Tensor:
        """``log(m * q(a))`` for item indices ``items`` (the log-q correction)."""
        _, log_probs = self._on(items.device)
        return log_probs[items] + math.log(m)


@torch.no_grad()
def catalog_gumbel_argmax(query: torch.Tensor, items: torch.Tensor, alpha: float, chunk: int) -> torch.Tensor:
    """Sample ``a ~ softmax_a(<query, e_a>/alpha)`` over all rows of ``items`` by Gumbel-max, in chunks.

    query [B, D], items [C, D] -> indices [B] into ``items``; memory O(B * chunk).
    """
    best_val = torch.full((query.shape[0],), float("-inf"), device=query.device, dtype=query.dtype)
    best_idx = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    for start in range(0, items.shape[0], chunk):
        logits = query @ items[start : start + chunk].T / alpha
        u = torch.rand_like(logits).clamp_(1e-20, 1.0 - 1e-7)
        val, idx = (logits - torch.log(-torch.log(u))).max(dim=1)
        better = val > best_val
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + start, best_idx)
    return best_idx


class QRIQLModel(nn.Module):
    def __init__(
        self,
        num_items: int,
        model_cfg: ModelConfig,
        reward_cfg: RewardConfig,
        state_len: int,
        device: Optional[torch.device] = None,
        item_counts: Optional[Sequence[float]] = None,
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
        self.sync_target()

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
        """QR-IQL losses on a batch of logged transitions (schema.py's torch batch contract).

        Returns "loss" (total, with gradient), the terms "iq", "qr", "r", and detached diagnostics:
        "reward_mean" (mean of R over real rows), "reward_spread" (mean q_max - q_min of R),
        "implied_reward", "value" (mean V(s)), "q_mean", "expert_logp" (mean alpha log pi(a|s) / alpha).
        """
        cfg = self.reward_cfg
        s, fb = batch["state_items"].long(), batch["state_feedback"].float()
        s2, fb2 = batch["next_state_items"].long(), batch["next_state_feedback"].float()
        action = batch["action"].long()
        done = batch["done"].float()
        mask = batch["mask"].float() if "mask" in batch else torch.ones_like(done)
        b, dev = s.shape[0], s.device

        ids = {"state": s, "next_state": s2, "action": action.view(-1, 1)}
        if self.sampler is None:
            ids["catalog"] = self.catalog_ids(dev)
        else:
            negatives = self.sampler.sample(cfg.num_negatives, dev)
            ids["candidates"] = negatives
        emb = self.item_embedding(ids)

        h_both = self._encode(self.encoder, torch.cat([emb["state"], emb["next_state"]]),
                              torch.cat([s, s2]), torch.cat([fb, fb2]))
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
                nxt = torch.multinomial(probs, 1).squeeze(1)
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
        q = torch.einsum("bd,bcd->bc", self._project(h, self.critic_weight, self.critic_item_bias).mean(1), e)
        reward_q = torch.einsum("bnd,bcd->bcn", self._project(h, self.reward_weight, self.reward_item_bias), e)
        return {"q": q, "reward_q": reward_q}

    def reward_quantiles(self, state_items: torch.Tensor, state_feedback: torch.Tensor,
                         candidate_items: torch.Tensor) -> torch.Tensor:
        """Mental reward quantiles ``R_i(s, a)`` [B, C, N] for candidates [B, C]; needs no next state."""
        return self.score(state_items, state_feedback, candidate_items)["reward_q"]

    @torch.no_grad()
    def catalog_reward_baseline(self, state_items: torch.Tensor, state_feedback: torch.Tensor,
                                chunk: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Per state, over the full catalog under the model's soft policy ``pi(a|s) ∝ exp(Q(s,a)/alpha)``:
        "reward_baseline" ``E_pi R_mean(s,a)``, "reward_cvar_baseline" ``E_pi CVaR(R(s,a))``, "value" ``V(s)`` ([B] each).
        One embedding lookup (the catalog); scoring in chunks of ``chunk`` (default reward.catalog_chunk)."""
        cfg = self.reward_cfg
        chunk = chunk or cfg.catalog_chunk
        s = state_items.long()
        emb = self.item_embedding({"state": s, "catalog": self.catalog_ids(s.device)})
        h = self._encode(self.encoder, emb["state"], s, state_feedback.float())
        qbar = self._project(h, self.critic_weight, self.critic_item_bias).mean(1)
        p_r = self._project(h, self.reward_weight, self.reward_item_bias)
        items = emb["catalog"]
        v = catalog_soft_value(qbar, items, cfg.alpha, chunk)
        base = torch.zeros_like(v)
        cvar_base = torch.zeros_like(v)
        for start in range(0, items.shape[0], chunk):
            e = items[start : start + chunk]
            pi = torch.exp((qbar @ e.T - v.unsqueeze(1)) / cfg.alpha)  # [B, c]
            rq = torch.einsum("bnd,cd->bcn", p_r, e)
            base += (pi * rq.mean(-1)).sum(1)
            cvar_base += (pi * cvar(rq, cfg.cvar_alpha)).sum(1)
        return {"reward_baseline": base, "reward_cvar_baseline": cvar_base, "value": v}
