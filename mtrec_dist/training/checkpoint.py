"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), loaded without arbitrary unpickling.

Layout of one checkpoint directory (Ray Train merges every rank's files into it):

* ``.metadata`` + ``__<rank>_0.distcp``: DCP state ``{"model": dmp.state_dict(), "optim": opt.state_dict()}``
  (keys ``model.<plain model key>``: see :class:`~mtrec_dist.training.sharding.TrainingModule`);
* ``mtrec_checkpoint.json`` (rank 0): step, epoch, rows seen, world size, config hash, sharding plan;
* ``data_state/consumed_rank<r>.npy``: row ids already trained on in the epoch in progress, so a
  resumed epoch skips exactly those rows (the union over the files; rank 0's file also carries the rows
  consumed before the last restore).

Loading never unpickles arbitrary objects: DCP's ``.metadata`` is read by an unpickler that admits only
DCP's own metadata classes, non-tensor entries are read with ``torch.load(weights_only=True)`` (DCP's
default planner uses ``weights_only=False``), tensors are read by DCP with ``weights_only=True``, and the
numpy files with ``allow_pickle=False``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

META_FILE = "mtrec_checkpoint.json"
DATA_STATE_DIR = "data_state"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Safe DCP reading
# --------------------------------------------------------------------------------------------------

_ALLOWED_GLOBALS = {
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("pathlib", "Path"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint's metadata refers to a Python object outside the allowed DCP metadata classes."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"checkpoint metadata refers to {module}.{name}; refusing to unpickle it")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose ``.metadata`` is unpickled with an allow-list of DCP metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor entries with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load(state: Dict[str, Any], directory: str) -> None:
    """Load ``state`` in place from the DCP checkpoint in local ``directory`` (safe reader + planner)."""
    import torch.distributed.checkpoint as dcp

    if not (Path(directory) / ".metadata").exists():
        raise FileNotFoundError(f"{directory}: not a checkpoint (no DCP .metadata file)")
    dcp.load(state, storage_reader=SafeFileSystemReader(directory), planner=SafeLoadPlanner())


# --------------------------------------------------------------------------------------------------
# Save / load of a sharded training state
# --------------------------------------------------------------------------------------------------


def config_hash(fingerprint: Any) -> str:
    """Short stable hash of a JSON-able config fingerprint."""
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_checkpoint(directory: str, dmp: nn.Module, optimizer, *, rank: int, meta: Dict[str, Any],
                    consumed_row_ids: np.ndarray) -> None:
    """Write this rank's part of a checkpoint into local ``directory`` (every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    os.makedirs(directory, exist_ok=True)
    dcp.save({"model": dmp.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=directory)
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


@contextmanager
def local_checkpoint_dir(path: str) -> Iterator[str]:
    """A local directory holding the checkpoint at ``path`` (downloaded first if it is a URI)."""
    if "://" not in str(path):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        yield str(Path(path).resolve())
        return
    from ray.train import Checkpoint

    with Checkpoint(path).as_directory() as d:
        yield d


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
    with local_checkpoint_dir(checkpoint_path) as d:
        dcp_load(state, d)
    module.load_state_dict(state["model"], strict=True)
    model.eval()
    return model
