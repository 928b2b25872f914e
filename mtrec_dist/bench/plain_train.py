"""The training loop a user would write without Ray: one process, the whole training set in memory as
tensors (read once with pyarrow), shuffled slices as batches, Adagrad on the sparse table and Adam on
the dense parameters (the library's learning rates), the target update after each step.

:func:`train_plain` times it the way the library's loop reports itself (samples/s and step time over the
steps after the warm-up, the share of time spent making batches), so the two read side by side.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
from torch import nn

from mtrec_dist.data.dataset import TRANSITIONS_DIR

# Every column the benchmarked models read (QR-IQL needs the next state; SASRec ignores it).
BATCH_COLUMNS = ("state_items", "state_feedback", "next_state_items", "next_state_feedback", "action",
                 "action_feedback", "done")
TEST_POSITION = 0  # pos_from_end of each user's last transition, which the benchmarked SASRecs do not train on


def load_transitions(prepared_dir: str | Path, state_len: int, drop_test_rows: bool = False) -> Dict[str, torch.Tensor]:
    """The prepared transitions as tensors (``drop_test_rows``: without each user's last transition, as the
    benchmark's ``train_recommender(..., skip_last=True)`` trains)."""
    ds = pads.dataset(str(Path(prepared_dir) / TRANSITIONS_DIR), format="parquet", ignore_prefixes=["_", "."])
    table = ds.to_table(columns=list(BATCH_COLUMNS) + ["pos_from_end"])
    if drop_test_rows:
        table = table.filter(pc.field("pos_from_end") != TEST_POSITION)
    out = {}
    for name in BATCH_COLUMNS:
        col = table.column(name).combine_chunks()
        if name.startswith(("state_", "next_state_")):
            arr = pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(len(col), state_len)
        else:
            arr = col.to_numpy(zero_copy_only=False)
        dtype = np.int64 if name.endswith("_items") or name == "action" else np.float32
        out[name] = torch.from_numpy(np.array(arr, dtype=dtype))  # a writable copy: Arrow buffers are read-only
    return out


def iter_batches(data: Dict[str, torch.Tensor], batch_size: int, seed: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
    """Full shuffled batches, epoch after epoch (a partial last batch is dropped)."""
    n = data["action"].shape[0]
    if n < batch_size:
        raise ValueError(f"{n} training rows are fewer than one batch of {batch_size}")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for lo in range(0, n - batch_size + 1, batch_size):
            idx = perm[lo:lo + batch_size]
            batch = {k: v[idx] for k, v in data.items()}
            batch["mask"] = torch.ones(batch_size)
            yield batch


def make_optimizers(model: nn.Module, lr: float, sparse_lr: float) -> List[torch.optim.Optimizer]:
    """Adagrad on the item table (sparse gradients), Adam on every other trainable parameter."""
    table = model.item_embedding.table.weight
    dense = [p for p in model.parameters() if p.requires_grad and p is not table]
    return [torch.optim.Adagrad([table], lr=sparse_lr, eps=1e-8), torch.optim.Adam(dense, lr=lr)]


def train_step(model: nn.Module, optimizers: List[torch.optim.Optimizer], batch: Dict[str, torch.Tensor]) -> float:
    """Forward, backward, step, target update (when the model has one); the loss."""
    out = model.losses(batch)
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    out["loss"].backward()
    for o in optimizers:
        o.step()
    if hasattr(model, "update_target"):
        model.update_target()
    return float(out["loss"].detach())


def train_plain(model: nn.Module, data: Dict[str, torch.Tensor], *, steps: int, batch_size: int, lr: float,
                sparse_lr: float, warmup_steps: int, seed: int = 0,
                device: Optional[torch.device] = None) -> Dict[str, object]:
    """Train ``steps`` steps; samples/s and step time over the steps after ``warmup_steps``, the share of
    that time spent slicing batches (the plain loop's "data wait"), the loss over the last steps."""
    device = device or torch.device("cpu")
    t0 = time.perf_counter()
    model.to(device).train()
    optimizers = make_optimizers(model, lr, sparse_lr)
    batches = iter_batches(data, batch_size, seed)
    data_s, step_s, losses = [], [], []
    with warnings.catch_warnings():  # torch's notice that sparse Adagrad skips invariant checks, once per process
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        for _ in range(steps):
            t_data = time.perf_counter()
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            t_step = time.perf_counter()
            losses.append(train_step(model, optimizers, batch))
            data_s.append(t_step - t_data)
            step_s.append(time.perf_counter() - t_step)
    total = [d + s for d, s in zip(data_s, step_s)][warmup_steps:]
    steady_data = sum(data_s[warmup_steps:])
    return {"samples_per_s": batch_size * len(total) / sum(total), "step_time_s": float(np.mean(total)),
            "data_wait_frac": steady_data / sum(total), "steps": steps, "steady_steps": len(total),
            "loop_s": round(time.perf_counter() - t0, 3), "final_loss": float(np.mean(losses[-10:])),
            "torch_threads": torch.get_num_threads()}
