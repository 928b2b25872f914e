"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), loaded without arbitrary unpickling.

Layout of one checkpoint directory (Ray Train merges every rank's files into it):

* ``.metadata`` + ``__<rank>_0.distcp``: DCP state ``{"model": dmp.state_dict(), "optim": opt.state_dict()}``
  (keys ``model.<plain model key>``: see :class:`~mtrec_dist.training.sharding.TrainingModule`);
* ``mtrec_checkpoint.json`` (rank 0): step, epoch, rows seen, world size, config hash, sharding plan;
* ``data_state/consumed_rank<r>.npy``: row ids already trained on in the epoch in progress, so a
  resumed epoch skips exactly those rows (the union over the files; rank 0's file also carries the rows
  consumed before the last restore).

Safe loading (:mod:`.safe_dcp`: no arbitrary unpickling, the metadata checked against the shard files and
the model) and warm starts (:mod:`.warm_start`) live next to this module; their names stay importable from
here.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from mtrec_dist.training.safe_dcp import (  # noqa: F401  (re-exported)
    CheckpointError, SafeFileSystemReader, UnsafeCheckpointError, dcp_load, local_checkpoint_dir,
)
from mtrec_dist.training.warm_start import checkpoint_tensor_shapes, warm_start_module  # noqa: F401  (re-exported)

META_FILE = "mtrec_checkpoint.json"
DATA_STATE_DIR = "data_state"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Save / load of a sharded training state
# --------------------------------------------------------------------------------------------------


def config_hash(fingerprint: Any) -> str:
    """Short stable hash of a JSON-able config fingerprint."""
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


SAVE_CHUNK_ROWS = 1 << 20  # rows per saved piece of a sharded table (128 MiB at 32 dims)


def in_row_chunks(model_state: Dict[str, Any], rows: int) -> Dict[str, Any]:
    """``model_state`` with every 2-D ShardedTensor's local shards cut into pieces of at most ``rows`` rows
    (views: nothing is copied), so that DCP saves each piece as its own item and any later load, sharded or
    not, reads one piece at a time: the load's extra memory is one piece, not one shard.  Collective: every
    rank calls it with the same keys (a rank may hold no shard of a table)."""
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

    out = dict(model_state)
    for key, value in model_state.items():
        if not isinstance(value, ShardedTensor) or value.dim() != 2:
            continue
        pieces = []
        for shard in value.local_shards():
            first, col = shard.metadata.shard_offsets
            for lo in range(0, shard.tensor.shape[0], rows):
                pieces.append(Shard.from_tensor_and_offsets(shard.tensor[lo: lo + rows], [first + lo, col],
                                                            dist.get_rank()))
        out[key] = ShardedTensor._init_from_local_shards(pieces, *value.size())
    return out


def save_checkpoint(directory: str, dmp: nn.Module, optimizer, *, rank: int, meta: Dict[str, Any],
                    consumed_row_ids: np.ndarray, chunk_rows: int = SAVE_CHUNK_ROWS) -> None:
    """Write this rank's part of a checkpoint into local ``directory`` (every rank calls it); sharded tables
    are saved in pieces of ``chunk_rows`` rows (:func:`in_row_chunks`)."""
    import torch.distributed.checkpoint as dcp

    os.makedirs(directory, exist_ok=True)
    dcp.save({"model": in_row_chunks(dmp.state_dict(), chunk_rows), "optim": optimizer.state_dict()},
             checkpoint_id=directory)
    state_dir = os.path.join(directory, DATA_STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    np.save(os.path.join(state_dir, f"consumed_rank{rank}.npy"), np.asarray(consumed_row_ids, dtype=np.int64))
    if rank == 0:
        body = dict(meta, format_version=FORMAT_VERSION, saved_at=time.time())
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(body, f, indent=1, sort_keys=True)


def _dense_optimizers(optimizer) -> List[Any]:
    """The non-fused KeyedOptimizers inside a CombinedOptimizer (whose state is created lazily)."""
    parts = getattr(optimizer, "_optims", None)
    if parts is None:
        return [optimizer]
    return [opt for key, opt in parts if key != "sparse"]


def load_checkpoint(directory: str, dmp: nn.Module, optimizer) -> Dict[str, Any]:
    """Restore model and optimizer state in place from local ``directory``; return its meta with
    ``skip_row_ids`` (rows of the epoch in progress already trained on).  Every rank calls it."""
    meta = read_checkpoint_meta(directory)
    for dense in _dense_optimizers(optimizer):
        # Adam creates its state on the first step; a zero-gradient step creates it (parameters do
        # not move: the update is 0) so that DCP can load into it in place.
        dense.init_state()
    model_sd = dmp.state_dict()
    optim_sd = optimizer.state_dict()
    state = {"model": model_sd, "optim": optim_sd}
    dcp_load(state, directory)
    dmp.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    meta["skip_row_ids"] = read_consumed(directory)
    return meta


def read_consumed(directory: str) -> np.ndarray:
    state_dir = Path(directory) / DATA_STATE_DIR
    parts = [np.load(p, allow_pickle=False) for p in sorted(state_dir.glob("consumed_rank*.npy"))]
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(parts).astype(np.int64))


def read_checkpoint_meta(path: str) -> Dict[str, Any]:
    """The ``mtrec_checkpoint.json`` of a checkpoint (local path or URI)."""
    if "://" in str(path):
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(str(path))
        with fs.open_input_stream(f"{p.rstrip('/')}/{META_FILE}") as f:
            return json.loads(f.read().decode())
    meta_path = Path(path) / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{path}: not an mtrec checkpoint (no {META_FILE})")
    return json.loads(meta_path.read_text())


def _is_complete(fs, directory: str, meta: Dict[str, Any]) -> bool:
    import pyarrow.fs as pafs

    names = {Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(directory))}
    need = {".metadata"} | {f"__{r}_0.distcp" for r in range(int(meta.get("world_size", 1)))}
    return need <= names


def list_checkpoints(storage_path: str, run_name: Optional[str] = None) -> List[Dict[str, Any]]:
    """Complete mtrec checkpoints under ``storage_path`` (optionally one run), oldest first.

    Each entry is the checkpoint's meta plus ``path``.  Directories missing a rank's DCP file (an upload
    cut short) are left out.
    """
    import pyarrow.fs as pafs

    if "://" in str(storage_path):
        fs, base = pafs.FileSystem.from_uri(str(storage_path))
        prefix = str(storage_path).split("://", 1)[0] + "://"
    else:
        fs, base, prefix = pafs.LocalFileSystem(), os.path.abspath(storage_path), ""
    if run_name:
        base = f"{base.rstrip('/')}/{run_name}"
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type != pafs.FileType.File or not info.path.endswith("/" + META_FILE):
            continue
        directory = info.path[: -len(META_FILE) - 1]
        with fs.open_input_stream(info.path) as f:
            try:
                meta = json.loads(f.read().decode())
            except json.JSONDecodeError:
                continue
        if _is_complete(fs, directory, meta):
            found.append(dict(meta, path=prefix + directory))
    found.sort(key=lambda m: (m.get("saved_at", 0.0), m.get("step", 0)))
    return found


def find_latest_checkpoint(storage_path: str, run_name: Optional[str] = None) -> str:
    """Path of the most recently saved complete checkpoint under ``storage_path``."""
    found = list_checkpoints(storage_path, run_name)
    if not found:
        where = f"{storage_path}/{run_name}" if run_name else storage_path
        raise FileNotFoundError(f"no complete mtrec checkpoint under {where}")
    return found[-1]["path"]


# --------------------------------------------------------------------------------------------------
# Export: a DCP checkpoint into a plain single-process model
# --------------------------------------------------------------------------------------------------


def load_for_inference_actor(model_factory: Callable[[torch.device], nn.Module], checkpoint_path: str, *,
                             threads: int = 1, malloc_trim_mb: int = 0) -> nn.Module:
    """What every scoring and ranking actor does first: keep its freed memory
    (:func:`~mtrec_dist.runtime.retain_freed_memory`), use ``threads`` torch threads, and load the whole model
    from the checkpoint (:func:`load_unsharded_model`)."""
    from mtrec_dist.runtime import retain_freed_memory

    retain_freed_memory(malloc_trim_mb)
    torch.set_num_threads(max(1, threads))
    return load_unsharded_model(model_factory, checkpoint_path)


def load_unsharded_model(model_factory: Callable[[torch.device], nn.Module], checkpoint_path: str,
                         device: torch.device | str = "cpu") -> nn.Module:
    """Build ``model_factory(device)`` (unsharded, no process group) and load the checkpoint's weights.

    DCP re-assembles the row/table/column shards of every rank into the plain tensors; the keys match
    because the DMP-wrapped module and this one are both :class:`TrainingModule` around the same model.
    """
    from mtrec_dist.training.sharding import TrainingModule

    device = torch.device(device)
    model = model_factory(device)
    module = TrainingModule(model)
    state = {"model": module.state_dict()}
    with local_checkpoint_dir(checkpoint_path) as d, warnings.catch_warnings():
        # a single-process load is the intent here, not a missing process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_load(state, d)
    module.load_state_dict(state["model"], strict=True)
    model.eval()
    return model
