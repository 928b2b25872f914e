"""Guided sequential recommenders (docs/method.md "Recommenders and guidance"): SASRec, GRU4Rec, Caser and
NextItNet backbones.

``score(s, a) = <h(s), e_a>`` with ``h`` from the backbone (models/encoders.py) and ``e_a`` from the one
TorchRec ``ItemEmbedding`` (tied input/output item vectors, so every lookup hits the sharded table).
The base loss is next-item cross-entropy: a full softmax over items 1..num_items (``rec.num_negatives ==
0``) or a sampled softmax over the batch-shared negatives with log-q correction.  The guidance mode
(``rec.guidance``) weights each example's cross-entropy (objectives/guidance.py):

* ``none``: uniform weights (the click-trained baseline);
* ``reweight``: advantage ``reward_mean - reward_baseline`` (batch columns scored upstream by the reward
  model and joined by row_id);
* ``risk_averse``: advantage ``reward_cvar - reward_cvar_baseline`` (or ``- reward_baseline`` when the
  CVaR baseline column is absent);
* ``actor_critic`` (SA2C-style): a Q head ``Q(s,a) = <W_q h + b_q, e_a>`` trained by one-step TD on
  ``reward_mean`` with a detached next-state value ``E_{a'~pi(.|s')} Q(s',a')`` (``pi`` = the
  recommender's softmax); its advantage ``Q(s,a) - E_{a'~pi(.|s)} Q(s,a')`` weights the cross-entropy.
  The Q head exists only in this mode, so DDP (static graph) never sees unused parameters.

``forward(batch)`` is :meth:`losses` (DDP hooks need the call to go through the wrapper).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..choices import BACKBONES  # re-exported here: the one list
from ..config import ModelConfig, RecConfig
from ..objectives.guidance import guidance_weights, td_loss
from ..objectives.ranking import full_softmax_ce, masked_mean, sampled_softmax_ce
from .embeddings import ItemEmbedding
from .encoders import build_encoder
from .sampling import NegativeSampler

__all__ = ["SequentialRecommender", "BACKBONES"]


class SequentialRecommender(nn.Module):
    def __init__(self, num_items: int, backbone: str, model_cfg: ModelConfig, rec_cfg: RecConfig, state_len: int,
                 device: Optional[torch.device] = None, item_counts: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose from {list(BACKBONES)}")
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = int(num_items)
        self.backbone = backbone
        self.rec_cfg = rec_cfg
        self.guidance = rec_cfg.guidance
        d = model_cfg.embedding_dim
        self.item_embedding = ItemEmbedding(num_items + 1, d, device=device)
        self.encoder = build_encoder(backbone, model_cfg, state_len, device)
        self.q_head = nn.Linear(d, d, device=device) if self.guidance == "actor_critic" else None
        self.sampler = (
            NegativeSampler(num_items, rec_cfg.negative_sampler, item_counts) if rec_cfg.num_negatives > 0 else None
        )

    def catalog_ids(self, device) -> torch.Tensor:
        return torch.arange(1, self.num_items + 1, device=device)

    # ---- training ----------------------------------------------------------------------------------

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.losses(batch)

    def losses(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Weighted next-item cross-entropy (+ TD loss in actor_critic mode).

        Returns "loss" (with gradient), "ce" (unweighted CE, detached), "weighted_ce", "weight_std",
        "weight_max", and in actor_critic mode "td" and "q_advantage_std".
        """
        cfg = self.rec_cfg
        s, fb = batch["state_items"].long(), batch["state_feedback"].float()
        action = batch["action"].long()
        mask = batch["mask"].float() if "mask" in batch else torch.ones(action.shape[0], device=action.device)
        b, dev = s.shape[0], s.device
        ac = self.guidance == "actor_critic"

        ids = {"state": s, "action": action.view(-1, 1)}
        if ac:
            s2, fb2 = batch["next_state_items"].long(), batch["next_state_feedback"].float()
            ids["next_state"] = s2
        negatives = None
        if self.sampler is None:
            ids["catalog"] = self.catalog_ids(dev)
        else:
            negatives = self.sampler.sample(cfg.num_negatives, dev)
            ids["candidates"] = negatives
        emb = self.item_embedding(ids)

        h2 = None
        if ac:
            h_both = self.encoder(torch.cat([emb["state"], emb["next_state"]]), torch.cat([fb, fb2]),
                                  torch.cat([s, s2]) != 0)
            h, h2 = h_both[:b], h_both[b:]
        else:
            h = self.encoder(emb["state"], fb, s != 0)
        e_a = emb["action"][:, 0]
        items = emb["catalog"] if self.sampler is None else emb["candidates"]  # [C, D]
        logits = h @ items.T  # [B, C]
        log_q_cand, cand_valid = self._candidate_terms(action, negatives)

        out: Dict[str, torch.Tensor] = {}
        q_adv = self._actor_critic(batch, h, h2, e_a, items, logits, log_q_cand, cand_valid, mask, out) if ac else None
        weights = guidance_weights(
            self.guidance, mask, cfg.weight_temperature, cfg.weight_min, cfg.weight_max,
            reward_mean=batch.get("reward_mean"), reward_baseline=batch.get("reward_baseline"),
            reward_cvar=batch.get("reward_cvar"), cvar_baseline=batch.get("reward_cvar_baseline"),
            q_advantage=q_adv,
        )
        ce_w, ce = self._cross_entropy(logits, h, e_a, action, log_q_cand, cand_valid, mask, weights)
        loss = ce_w + (cfg.td_weight * out["td"] if ac else 0.0)
        real = mask > 0
        out.update({
            "loss": loss,
            "weighted_ce": ce_w.detach(),
            "ce": ce,
            "weight_std": weights[real].std() if int(real.sum()) > 1 else torch.zeros((), device=dev),
            "weight_max": weights.max().detach(),
            "real_rows": mask.sum(),
        })
        return out

    def _candidate_terms(self, action: torch.Tensor, negatives: Optional[torch.Tensor]):
        """(log expected count of each sampled candidate, which candidates are not the row's own action);
        both ``None`` under the full softmax."""
        if self.sampler is None:
            return None, None
        log_q_cand = self.sampler.log_expected_count(negatives, self.rec_cfg.num_negatives)
        cand_valid = negatives.view(1, -1) != action.view(-1, 1)  # accidental hits dropped
        return log_q_cand, cand_valid

    def _cross_entropy(self, logits, h, e_a, action, log_q_cand, cand_valid, mask, weights):
        """(weighted cross-entropy with gradient, unweighted cross-entropy detached)."""
        if self.sampler is None:
            target_col = (action - 1).clamp_min(0)  # padding rows may carry action 0; they are masked
            ce_w = full_softmax_ce(logits, target_col, mask, weights)
            with torch.no_grad():
                ce = full_softmax_ce(logits, target_col, mask)
            return ce_w, ce
        log_q_pos = self.sampler.log_expected_count(action, self.rec_cfg.num_negatives)
        pos = (h * e_a).sum(-1)
        ce_w = sampled_softmax_ce(pos, logits, log_q_pos, log_q_cand, mask, weights, cand_valid)
        with torch.no_grad():
            ce = sampled_softmax_ce(pos, logits, log_q_pos, log_q_cand, mask, None, cand_valid)
        return ce_w, ce

    def _actor_critic(self, batch, h, h2, e_a, items, logits, log_q_cand, cand_valid, mask,
                      out: Dict[str, torch.Tensor]) -> torch.Tensor:
        """SA2C: the Q head's one-step TD loss (``out["td"]``) and its detached advantage
        ``Q(s,a) - E_{a'~pi(.|s)} Q(s,a')``, which weights the cross-entropy."""
        cfg = self.rec_cfg
        q_proj = self.q_head(h)
        q_sa = (q_proj * e_a).sum(-1)
        q_all = q_proj @ items.T
        with torch.no_grad():
            pi = self._policy(logits.detach(), log_q_cand, cand_valid)
            q_adv = q_sa.detach() - (pi * q_all.detach()).sum(-1)
            pi2 = self._policy(h2.detach() @ items.detach().T, log_q_cand, None)
            v2 = (pi2 * (self.q_head(h2.detach()) @ items.detach().T)).sum(-1)
        td = td_loss(q_sa, self._need(batch, "reward_mean"), v2, batch["done"].float(), cfg.ac_gamma, mask)
        out["td"] = td
        out["q_advantage_std"] = q_adv.std() if h.shape[0] > 1 else torch.zeros((), device=h.device)
        return q_adv

    @staticmethod
    def _policy(logits: torch.Tensor, log_q: Optional[torch.Tensor], valid: Optional[torch.Tensor]) -> torch.Tensor:
        """``pi(a|s) = softmax(logits)``; over sampled candidates, self-normalised IS weights (log-q corrected)."""
        z = logits if log_q is None else logits - log_q
        if valid is not None:
            z = z.masked_fill(~valid, float("-inf"))
        return torch.softmax(z, dim=-1)

    @staticmethod
    def _need(batch: Dict[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in batch:
            raise KeyError(f"guidance needs batch column {key!r} (scored upstream by the reward model)")
        return batch[key].float()

    # ---- scoring -----------------------------------------------------------------------------------

    def encode(self, state_items: torch.Tensor, state_feedback: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.encoder(emb, state_feedback.float(), state_items.long() != 0)

    def score_items(self, state_items: torch.Tensor, state_feedback: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """Scores ``<h(s_b), e_{item_ids[b,c]}>`` [B, C] of per-row candidates item_ids [B, C]."""
        emb = self.item_embedding({"state": state_items.long(), "candidates": item_ids.long()})
        h = self.encode(state_items, state_feedback, emb["state"])
        return torch.einsum("bd,bcd->bc", h, emb["candidates"])

    def score_catalog(self, state_items: torch.Tensor, state_feedback: torch.Tensor, catalog_ids: torch.Tensor) -> torch.Tensor:
        """Scores [B, C] of the shared item list catalog_ids [C] (pass chunks of 1..num_items to bound memory)."""
        emb = self.item_embedding({"state": state_items.long(), "catalog": catalog_ids.long()})
        h = self.encode(state_items, state_feedback, emb["state"])
        return h @ emb["catalog"].T
