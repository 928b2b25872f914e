"""The library's models on one plain ``nn.Embedding``: the single-process baseline's model.

A user without Ray or TorchRec would keep the same network and losses and look items up in an
``nn.Embedding`` (sparse gradients).  :func:`plain_copy` does exactly that to a library model
(``QRIQLModel`` or ``SequentialRecommender``): the encoders, heads and ``losses`` stay the library's own,
so the baseline cannot drift from the distributed model's math, and only the table and the machinery
around it differ.  :func:`check_same_loss` proves it on a batch before anything is timed.
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
from torch import nn

from mtrec_dist.models.embeddings import ITEM_TABLE

LOSS_TOLERANCE = 1e-5  # |library - plain| allowed on every scalar loss term (float32 sums in another order)


class PlainItemEmbedding(nn.Module):
    """``ItemEmbedding``'s contract (feature name -> ids  =>  feature name -> vectors) on one ``nn.Embedding``,
    all features looked up in a single call (one sparse gradient per step)."""

    def __init__(self, weight: torch.Tensor, sparse: bool = True) -> None:
        super().__init__()
        self.embedding_dim = int(weight.shape[1])
        self.table = nn.Embedding(weight.shape[0], weight.shape[1], sparse=sparse)
        with torch.no_grad():
            self.table.weight.copy_(weight)

    def forward(self, ids: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        names = list(ids)
        flat = torch.cat([ids[k].reshape(-1).long() for k in names])
        vectors = torch.split(self.table(flat), [ids[k].numel() for k in names])
        return {k: v.view(*ids[k].shape, self.embedding_dim) for k, v in zip(names, vectors)}


def item_table_weight(model: nn.Module) -> torch.Tensor:
    """The TorchRec item table of an unsharded library model, as a plain tensor."""
    return model.item_embedding.ec.embeddings[ITEM_TABLE].weight.detach()


def plain_copy(model: nn.Module, sparse: bool = True) -> nn.Module:
    """A copy of an unsharded library model with its TorchRec table swapped for :class:`PlainItemEmbedding`
    holding the same weights (every other parameter and buffer copied as is)."""
    weight = item_table_weight(model).clone()
    table = model.item_embedding
    model.item_embedding = nn.Identity()  # keep the TorchRec module out of the deep copy
    try:
        plain = copy.deepcopy(model)
    finally:
        model.item_embedding = table
    plain.item_embedding = PlainItemEmbedding(weight, sparse=sparse)
    return plain


def _scalar_terms(out: Dict[str, torch.Tensor]) -> Dict[str, float]:
    return {k: float(v) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}


def check_same_loss(library: nn.Module, plain: nn.Module, batch: Dict[str, torch.Tensor], seed: int = 123,
                    tolerance: float = LOSS_TOLERANCE) -> Dict[str, object]:
    """Every scalar that ``losses`` returns (total loss and each term) from both models on ``batch``, with
    the same random state (sampled negatives, next actions) and no dropout; raises ``AssertionError`` if
    any differs by more than ``tolerance``.  Returns the library's loss, the plain one and the largest gap."""
    results = []
    for model in (library, plain):
        was_training = model.training
        model.eval()
        torch.manual_seed(seed)
        with torch.no_grad():
            results.append(_scalar_terms(model.losses(batch)))
        model.train(was_training)
    lib, pln = results
    if set(lib) != set(pln):
        raise AssertionError(f"library and plain models return different loss terms: {sorted(lib)} vs {sorted(pln)}")
    gaps = {k: abs(lib[k] - pln[k]) for k in lib}
    worst = max(gaps, key=gaps.get)
    if not gaps[worst] <= tolerance:  # NaN fails too
        raise AssertionError(f"plain model's {worst!r} is {pln[worst]} but the library's is {lib[worst]} "
                             f"(|diff| {gaps[worst]:.3g} > {tolerance})")
    return {"library_loss": lib["loss"], "plain_loss": pln["loss"], "max_abs_diff": gaps[worst],
            "terms_compared": len(gaps), "rows": int(next(iter(batch.values())).shape[0])}
