"""The item embedding table as a TorchRec ``EmbeddingCollection``, fed by ``KeyedJaggedTensor``s once sharded.

One table (``item_table``; not ``items``, which collides with ``nn.ModuleDict.items``) serves several
*features*: the state items, the action, the next state, sampled candidates, catalog chunks.  Each
feature is a lookup into the same table, so sharding the table (row-wise / table-wise / column-wise,
chosen by the TorchRec planner under ``DistributedModelParallel``) shards every lookup.

Contract of :meth:`ItemEmbedding.forward`: ``ids`` maps each feature name to a LongTensor.  A 2-D tensor
``[B, n]`` is ``n`` ids for each of the ``B`` samples; a 1-D tensor ``[n]`` is a flat list of ids (for
example a chunk of the catalog), given to sample 0.  Sharded, features the module declares but ``ids`` omits
are sent with zero length, because a sharded collection expects every declared feature on every call;
unsharded, each feature is one plain lookup (:meth:`ItemEmbedding._unsharded`).
Index 0 is the padding item; its vector is whatever the table holds and callers mask it.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

ITEM_TABLE = "item_table"
# "slate": the other items of the slate an action was clicked in (the reward model's choice sets, R2)
DEFAULT_FEATURES = ("state", "next_state", "action", "candidates", "catalog", "slate")


class ItemEmbedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        feature_names: Sequence[str] = DEFAULT_FEATURES,
        device: Optional[torch.device] = None,
        table_name: str = ITEM_TABLE,
    ) -> None:
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.feature_names = list(feature_names)
        self.table_name = table_name
        self.ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=table_name,
                    embedding_dim=self.embedding_dim,
                    num_embeddings=self.num_embeddings,
                    feature_names=self.feature_names,
                )
            ],
            device=device,
        )

    def forward(self, ids: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        unknown = set(ids) - set(self.feature_names)
        if unknown:
            raise KeyError(f"unknown embedding feature(s) {sorted(unknown)}; declared: {self.feature_names}")
        batch = next((t.shape[0] for t in ids.values() if t.dim() == 2), 1)
        mismatch = next((name for name, t in ids.items() if t.dim() == 2 and t.shape[0] != batch), None)
        if mismatch:  # checked on both paths, so a model tested in one process fails the same way sharded
            raise ValueError(f"feature {mismatch!r} has batch {ids[mismatch].shape[0]}, expected {batch}")
        if type(self.ec) is EmbeddingCollection:  # not sharded (DMP swaps in its own module): see _unsharded
            return self._unsharded(ids)
        device = next(iter(ids.values())).device
        values, lengths = [], []
        for name in self.feature_names:
            t = ids.get(name)
            if t is None:
                lengths.append(torch.zeros(batch, dtype=torch.int32, device=device))
                continue
            if t.dim() == 2:
                lengths.append(torch.full((batch,), t.shape[1], dtype=torch.int32, device=device))
            else:
                ln = torch.zeros(batch, dtype=torch.int32, device=device)
                ln[0] = t.numel()
                lengths.append(ln)
            values.append(t.reshape(-1).long())
        kjt = KeyedJaggedTensor(
            keys=self.feature_names,
            values=torch.cat(values) if values else torch.zeros(0, dtype=torch.long, device=device),
            lengths=torch.cat(lengths),
        )
        out = self.ec(kjt)
        result = {}
        for name, t in ids.items():
            emb = out[name].values()
            result[name] = emb.view(*t.shape, self.embedding_dim)
        return result

    def _unsharded(self, ids: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The same rows and gradients as the collection (unsharded, it is one ``nn.Embedding`` per table; the
        gradient's rows are summed in ``ids``' order rather than the declared one, so equal up to rounding), by
        one plain lookup per feature: building the KeyedJaggedTensor costs more than the lookup.  Measured at
        B = 256 (four features, 29 ids a row), forward + backward: 1.4-1.5 ms against 2.2-2.6 ms; with
        foreach Adam, one ablation unit (rows A and F of the demo) 66 s against 81 s (bench/RESULTS.md,
        session 20).  Scoring, ranking and training in one process take this path; a sharded table never."""
        weight = self.ec.embeddings[self.table_name].weight
        return {name: nn.functional.embedding(t.long(), weight) for name, t in ids.items()}
