"""Test helpers for the training tests: a synthetic prepared dataset and a small TorchRec model.

The dataset has the layout of ``mtrec prepare`` output (transitions/*.parquet with TRANSITION_COLUMNS,
manifest.json, eval/*.parquet) and a learnable structure: a user's next item is, with probability
``p_rule``, a fixed function of the last item, so a next-item model's loss can fall well below
log(num_items).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from mtrec_dist.data.schema import NO_SLATE, SCHEMA_VERSION, TRANSITION_COLUMNS
from mtrec_dist.models.embeddings import ItemEmbedding

# Ray workers cannot import this file (tests/ is not a package on their path): ship it by value.
import ray.cloudpickle as _cp  # noqa: E402



def ship_by_value(module_name: str) -> None:
    """Make cloudpickle send functions/classes of ``module_name`` by value to Ray workers."""
    _cp.register_pickle_by_value(sys.modules[module_name])


ship_by_value(__name__)


def next_rule(item: np.ndarray, num_items: int) -> np.ndarray:
    return (item * 7 + 3) % num_items + 1


def write_prepared(root: Path, *, num_items: int = 40, num_users: int = 30, state_len: int = 4,
                   rows: int = 601, files: int = 3, p_rule: float = 0.85, row_id_offset: int = 1000,
                   seed: int = 0) -> Path:
    """Write a synthetic prepared dataset with exactly ``rows`` transitions under ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "transitions").mkdir(parents=True, exist_ok=True)
    (root / "eval").mkdir(parents=True, exist_ok=True)
    (root / "vocab").mkdir(parents=True, exist_ok=True)
    recs = {c: [] for c in TRANSITION_COLUMNS}
    sat = []
    per_user = int(np.ceil(rows / num_users))
    row = 0
    for u in range(num_users):
        items = [int(rng.integers(1, num_items + 1))]
        for _ in range(per_user):
            prev = np.array(items[-1])
            items.append(int(next_rule(prev, num_items)) if rng.random() < p_rule else int(rng.integers(1, num_items + 1)))
        fb = rng.random(len(items)).astype(np.float32)
        for t in range(1, len(items)):
            if row >= rows:
                break
            hist = items[max(0, t - state_len):t]
            hist_fb = list(fb[max(0, t - state_len):t])
            pad = state_len - len(hist)
            s_items = [0] * pad + hist
            s_fb = [0.0] * pad + hist_fb
            recs["row_id"].append(row_id_offset + row)
            recs["user_idx"].append(u)
            recs["state_items"].append(s_items)
            recs["state_feedback"].append(s_fb)
            recs["action"].append(items[t])
            recs["action_feedback"].append(float(fb[t]))
            recs["next_state_items"].append(s_items[1:] + [items[t]])
            recs["next_state_feedback"].append(s_fb[1:] + [float(fb[t])])
            recs["done"].append(1 if t == len(items) - 1 else 0)
            recs["ts"].append(1_700_000_000 + t * 60)
            recs["pos_from_end"].append(len(items) - 1 - t)
            recs["returned"].append(0)
            recs["return_known"].append(0)
            recs["action_log_duration"].append(0.0)
            recs["slate_id"].append(NO_SLATE)
            sat.append(float(rng.normal()))
            row += 1
    assert row == rows, (row, rows)
    types = {
        "row_id": pa.int64(), "user_idx": pa.int64(), "state_items": pa.list_(pa.int64()),
        "state_feedback": pa.list_(pa.float32()), "action": pa.int64(), "action_feedback": pa.float32(),
        "next_state_items": pa.list_(pa.int64()), "next_state_feedback": pa.list_(pa.float32()),
        "done": pa.int8(), "ts": pa.int64(), "pos_from_end": pa.int32(),
        "returned": pa.int8(), "return_known": pa.int8(), "action_log_duration": pa.float32(),
        "slate_id": pa.int64(),
    }
    table = pa.table({c: pa.array(recs[c], type=types[c]) for c in TRANSITION_COLUMNS})
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for i in range(files):
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), root / "transitions" / f"part-{i:04d}.parquet")
    pq.write_table(pa.table({"row_id": table.column("row_id"),
                             "eval_true_satisfaction": pa.array(sat, pa.float32())}), root / "eval" / "part-0000.parquet")
    (root / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "num_items": num_items, "num_users": num_users, "state_len": state_len,
        "num_transitions": rows,
    }))
    return root


class TinyNextItemModel(nn.Module):
    """ItemEmbedding + dense head; ``losses`` = masked full-catalog next-item cross-entropy."""

    def __init__(self, num_items: int, dim: int = 8, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_items = num_items
        self.item_embedding = ItemEmbedding(num_items + 1, dim, device=device)
        self.proj = nn.Linear(dim, dim, device=device)
        self.target_calls = 0

    def losses(self, batch):
        s, a, mask = batch["state_items"], batch["action"], batch["mask"]
        catalog = torch.arange(1, self.num_items + 1, device=s.device)
        emb = self.item_embedding({"state": s[:, -1:], "catalog": catalog})
        h = self.proj(emb["state"][:, 0])
        logits = h @ emb["catalog"].T
        ce = F.cross_entropy(logits, a - 1, reduction="none")
        n = mask.sum().clamp_min(1.0)
        loss = (ce * mask).sum() / n
        acc = ((logits.argmax(1) == a - 1).float() * mask).sum() / n
        return {"loss": loss, "accuracy": acc.detach(), "update_calls": torch.tensor(float(self.target_calls))}

    def update_target(self):
        self.target_calls += 1


def tiny_factory(num_items: int, dim: int, device: torch.device) -> TinyNextItemModel:
    return TinyNextItemModel(num_items, dim, device)


def exits_once_factory(marker: str, wait_s: float, num_items: int, dim: int, device: torch.device) -> TinyNextItemModel:
    """``tiny_factory``, except that the first process to build it exits there, ``wait_s`` seconds in (a worker
    lost while a job sets up, before that job has any checkpoint); ``marker`` is created then, so every later
    build succeeds.  The wait lets Ray Train's controller poll in the checkpoints already reported: a worker that
    exits at once can beat the poll that registers the previous job's final checkpoint."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return TinyNextItemModel(num_items, dim, device)
    os.write(fd, f"pid {os.getpid()} exits while building the model\n".encode())
    os.close(fd)
    time.sleep(wait_s)
    os._exit(1)
