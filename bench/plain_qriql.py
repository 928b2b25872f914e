"""A plain single-process PyTorch QR-IQL reward model (no Ray, no TorchRec): the benchmark baseline.

Same math as :class:`mtrec_dist.models.reward_model.QRIQLModel`: it IS that class (same encoders, heads and
``losses``, which call the pure loss functions of :mod:`mtrec_dist.objectives.qr_iql`), with the TorchRec
``EmbeddingCollection`` swapped for one ``nn.Embedding`` (sparse gradients) looked up once per step, and
trained in a plain loop: no Ray, no process group, no DMP/DDP, no fused optimizer.  :func:`check_equivalence`
copies a ``QRIQLModel``'s weights into it and compares the losses on one batch.

Optimisers: ``torch.optim.Adagrad`` on the sparse table (the DMP path uses FBGEMM's fused
EXACT_ROWWISE_ADAGRAD, which keeps one accumulator per row instead of one per element) and Adam on the
dense parameters, with the learning rates of ``train.sparse_lr`` / ``train.lr``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Iterator

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtrec_dist.config import ModelConfig, RewardConfig  # noqa: E402
from mtrec_dist.models.embeddings import ITEM_TABLE  # noqa: E402
from mtrec_dist.models.reward_model import QRIQLModel  # noqa: E402


class PlainItemEmbedding(nn.Module):
    """``ItemEmbedding``'s contract (feature name -> id tensor  =>  feature name -> vectors) on one
    ``nn.Embedding``: all features are looked up in a single call (one sparse gradient per step)."""

    def __init__(self, num_embeddings: int, dim: int, sparse: bool = True) -> None:
        super().__init__()
        self.embedding_dim = dim
        self.table = nn.Embedding(num_embeddings, dim, sparse=sparse)

    def forward(self, ids: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        names = list(ids)
        flat = torch.cat([ids[k].reshape(-1).long() for k in names])
        vecs = torch.split(self.table(flat), [ids[k].numel() for k in names])
        return {k: v.view(*ids[k].shape, self.embedding_dim) for k, v in zip(names, vecs)}


class PlainQRIQL(QRIQLModel):
    """``QRIQLModel`` with its TorchRec table swapped for :class:`PlainItemEmbedding`; ``losses`` is the
    library's own (inherited), so the math cannot drift from the distributed model's."""

    def __init__(self, num_items: int, model_cfg: ModelConfig, reward_cfg: RewardConfig, state_len: int,
                 sparse: bool = True) -> None:
        super().__init__(num_items, model_cfg, reward_cfg, state_len, device=torch.device("cpu"))
        ec_weight = self.item_embedding.ec.embeddings[ITEM_TABLE].weight.detach().clone()
        self.item_embedding = PlainItemEmbedding(num_items + 1, model_cfg.embedding_dim, sparse)
        with torch.no_grad():
            self.item_embedding.table.weight.copy_(ec_weight)  # same initial values as the TorchRec table


def make_optimizer(model: PlainQRIQL, lr: float, sparse_lr: float):
    table = model.item_embedding.table.weight
    dense = [p for p in model.parameters() if p.requires_grad and p is not table]
    return [torch.optim.Adagrad([table], lr=sparse_lr, eps=1e-8), torch.optim.Adam(dense, lr=lr)]


def train_step(model: PlainQRIQL, opts, batch: Dict[str, torch.Tensor]) -> float:
    out = model.losses(batch)
    for o in opts:
        o.zero_grad(set_to_none=True)
    out["loss"].backward()
    for o in opts:
        o.step()
    model.update_target()
    return float(out["loss"].detach())


# ---- data: the same Parquet transitions, read with pyarrow -------------------------------------------

BATCH_COLUMNS = ("state_items", "state_feedback", "next_state_items", "next_state_feedback", "action",
                 "action_feedback", "done")


def load_transitions(prepared_dir: str, state_len: int) -> Dict[str, torch.Tensor]:
    """All transitions of ``<prepared_dir>/transitions`` as tensors (pyarrow read, no Ray)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    t = pads.dataset(str(Path(prepared_dir) / "transitions"), format="parquet").to_table(columns=list(BATCH_COLUMNS))
    out = {}
    for name in BATCH_COLUMNS:
        col = t.column(name).combine_chunks()
        if name.startswith(("state_", "next_state_")):
            arr = pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(len(col), state_len)
        else:
            arr = col.to_numpy(zero_copy_only=False)
        dtype = np.int64 if name.endswith("_items") or name == "action" else np.float32  # done: int8 -> float
        out[name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=dtype))
    return out


def iter_batches(data: Dict[str, torch.Tensor], batch_size: int, seed: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
    """Shuffled full batches, epoch after epoch."""
    n = data["action"].shape[0]
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for lo in range(0, n - batch_size + 1, batch_size):
            idx = perm[lo:lo + batch_size]
            batch = {k: v[idx] for k, v in data.items()}
            batch["mask"] = torch.ones(batch_size)
            yield batch


def synthetic_batch(num_items: int, batch_size: int, state_len: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A random batch (ids uniform over the catalog, 1 pad in 5, 10% done) for step-time measurements."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(1, num_items + 1, (batch_size, state_len), generator=g)
    s[torch.rand(batch_size, state_len, generator=g) < 0.2] = 0
    a = torch.randint(1, num_items + 1, (batch_size,), generator=g)
    s2 = torch.cat([s[:, 1:], a.view(-1, 1)], dim=1)
    return {"state_items": s, "state_feedback": (s != 0).float(), "next_state_items": s2,
            "next_state_feedback": (s2 != 0).float(), "action": a, "action_feedback": torch.ones(batch_size),
            "done": (torch.rand(batch_size, generator=g) < 0.1).float(), "mask": torch.ones(batch_size),
            "row_id": torch.arange(batch_size)}


def check_equivalence(num_items: int, model_cfg: ModelConfig, reward_cfg: RewardConfig, state_len: int,
                      batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Losses of QRIQLModel (unsharded TorchRec EC) and PlainQRIQL with the same weights and RNG state."""
    from mtrec_dist.models.reward_model import QRIQLModel

    torch.manual_seed(0)
    ref = QRIQLModel(num_items, model_cfg, reward_cfg, state_len, device=torch.device("cpu"))
    plain = PlainQRIQL(num_items, model_cfg, reward_cfg, state_len)
    sd = {("item_embedding.table.weight" if k.endswith("item_table.weight") else k): v for k, v in ref.state_dict().items()}
    plain.load_state_dict(sd)
    ref.eval(), plain.eval()
    out = {}
    for name, m in (("torchrec", ref), ("plain", plain)):
        torch.manual_seed(123)
        with torch.no_grad():
            res = m.losses(batch)
        out.update({f"{name}_{k}": float(res[k]) for k in ("loss", "iq", "qr", "r")})
    out["max_abs_diff"] = max(abs(out[f"torchrec_{k}"] - out[f"plain_{k}"]) for k in ("loss", "iq", "qr", "r"))
    return out
