"""The industry baseline of the ablation: a supervised regressor of observable feedback (method.md R5).

``f(s, a) = <P h(s), e_a> + <u, e_a>`` over the same state encoder and item table as the reward model,
fitted to one observable signal of each logged action:

* ``target="watch"`` (ablation row B): the watch logit ``logit(clip(y))``, squared error;
* ``target="leave_return"`` (row C): whether the user went on, ``1`` if they stayed in the session or
  came back after leaving, ``0`` if they left and did not return (binary cross-entropy; rows that ended a
  session with an unknown return are skipped).

Its prediction is used as the "reward" that guides the recommender, exactly like the mental reward.
"""
from __future__ import annotations

from typing import Dict, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..objectives.mental_reward import watch_logit
from ..objectives.ranking import masked_mean
from .embeddings import ItemEmbedding
from .encoders import build_encoder

__all__ = ["FeedbackRegressor"]


class FeedbackRegressor(nn.Module):
    def __init__(self, num_items: int, model_cfg: ModelConfig, state_len: int,
                 target: Literal["watch", "leave_return"]) -> None:
        super().__init__()
        if target not in ("watch", "leave_return"):
            raise ValueError(f"unknown feedback target {target!r}; choose 'watch' or 'leave_return'")
        d = model_cfg.embedding_dim
        self.target = target
        self.num_items = int(num_items)
        self.item_embedding = ItemEmbedding(num_items + 1, d)
        self.encoder = build_encoder(model_cfg.encoder, model_cfg, state_len)
        self.proj = nn.Linear(d, d)
        self.item_bias = nn.Parameter(torch.zeros(d))

    def predict(self, state_items: torch.Tensor, state_feedback: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Predicted feedback [B, C] of candidates [B, C] (a logit for both targets)."""
        emb = self.item_embedding({"state": state_items.long(), "candidates": candidates.long()})
        h = self.encoder(emb["state"], state_feedback.float(), state_items.long() != 0)
        return torch.einsum("bd,bcd->bc", self.proj(h) + self.item_bias, emb["candidates"])

    def losses(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        pred = self.predict(batch["state_items"], batch["state_feedback"], batch["action"].view(-1, 1))[:, 0]
        mask = batch["mask"].float() if "mask" in batch else torch.ones_like(pred)
        if self.target == "watch":
            loss = masked_mean((pred - watch_logit(batch["action_feedback"].float())).pow(2), mask)
        else:
            done = batch["done"].float()
            went_on = (1 - done) + done * batch["returned"].float()
            keep = mask * ((1 - done) + done * batch["return_known"].float())
            loss = masked_mean(F.binary_cross_entropy_with_logits(pred, went_on, reduction="none"), keep)
        return {"loss": loss}
