"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), loaded without arbitrary unpickling.

Layout of one checkpoint directory (Ray Train merges every rank's files into it):

* ``.metadata`` + ``__<rank>_0.distcp``: DCP state ``{"model": dmp.state_dict(), "optim": opt.state_dict()}``
  (keys ``model.<plain model key>``: see :class:`~mtrec_dist.training.sharding.TrainingModule`);
* ``mtrec_checkpoint.json`` (rank 0): step, epoch, rows seen, world size, config hash, sharding plan;
* ``data_state/consumed_rank<r>.npy``: row ids already trained on in the epoch in progress, so a
  resumed epoch skips exactly those rows (the union over the files; rank 0's file also carries the rows
  consumed before the last restore).

Loading never unpickles arbitrary objects: DCP's ``.metadata`` is read by an unpickler that admits only
an exact list of DCP's metadata classes (no dotted names), non-tensor entries are read with
``torch.load(weights_only=True)`` (DCP's default planner uses ``weights_only=False``), tensors are read by
DCP with ``weights_only=True``, and the numpy files with ``allow_pickle=False``.  Before DCP reads a byte,
the metadata is checked against the shard files (none missing, cut short or outside the directory) and
against the model (every tensor present, same shape); a checkpoint that fails is refused with
:class:`CheckpointError` (:class:`UnsafeCheckpointError` for a refused global), naming the checkpoint.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import pickle
import warnings
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

# Exactly the globals a DCP ``.metadata`` pickle of this project needs (torch 2.13: found by saving
# checkpoints of every model, sharded and not, and recording what the unpickler was asked for).  Each is
# a plain data class, enum, path or a lookup that returns a fixed object, so building them runs nothing.
# Pairs are matched whole: a dotted name ("os.system" under an allowed module) is never walked, because
# protocol 4 lets a pickle reach any attribute of an allowed module that way (the metadata module
# imports ``os`` and ``torch``).
_METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # maps "torch.strided" etc. to a layout, nothing else
    ("torch", "Size"),
    ("torch", "float32"),  # the only dtype the project's models and optimizers hold
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
})


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded: damaged, cut short, or not a checkpoint of this model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's metadata refers to a Python object outside the allowed DCP metadata classes."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler for DCP ``.metadata`` that resolves only :data:`_METADATA_GLOBALS`, by exact name."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _METADATA_GLOBALS:
            raise UnsafeCheckpointError(f"checkpoint {self.path}: its metadata refers to the global "
                                        f"{module!r} {name!r}, which is not a DCP metadata class; refusing "
                                        f"to unpickle it")
        return getattr(importlib.import_module(module), name)  # no dotted walk: the pair is exact

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"checkpoint {self.path}: its metadata holds a persistent id; refusing it")


def _check_metadata(metadata: Any, directory: str) -> None:
    """Refuse metadata that is not DCP's, or whose shards point outside the directory or past the end of
    their file (a shard cut short by a failed copy), or whose chunks lie outside their tensor: every such
    case would otherwise fail deep inside DCP or read the wrong bytes."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"checkpoint {directory}: .metadata is not DCP checkpoint metadata")
    sizes: Dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, str):
            raise CheckpointError(f"checkpoint {directory}: bad storage entry for {index}")
        name = info.relative_path
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise CheckpointError(f"checkpoint {directory}: shard file {name!r} is not a file inside the checkpoint")
        if name not in sizes:
            try:
                sizes[name] = os.path.getsize(os.path.join(directory, name))
            except OSError:
                raise CheckpointError(f"checkpoint {directory}: shard file {name} is missing") from None
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0
                and info.length >= 0 and info.offset + info.length <= sizes[name]):
            raise CheckpointError(f"checkpoint {directory}: shard file {name} has {sizes[name]} bytes but the "
                                  f"metadata places {getattr(index, 'fqn', index)} at bytes {info.offset}.."
                                  f"{info.offset + info.length} (file cut short?)")
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            for chunk in md.chunks:
                if len(chunk.offsets) != len(md.size) or len(chunk.sizes) != len(md.size) or any(
                        o < 0 or n < 0 or o + n > s for o, n, s in zip(chunk.offsets, chunk.sizes, md.size)):
                    raise CheckpointError(f"checkpoint {directory}: a chunk of {key} (offsets {list(chunk.offsets)}, "
                                          f"sizes {list(chunk.sizes)}) lies outside its shape {list(md.size)}")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose ``.metadata`` is unpickled with an exact allow-list of DCP metadata classes
    and checked against the shard files before DCP uses it."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f, str(self.path)).load()
                _check_metadata(metadata, str(self.path))
            except CheckpointError:
                raise
            except Exception as e:  # truncated or garbled: EOFError, UnpicklingError, a field of the wrong type...
                raise CheckpointError(f"checkpoint {self.path}: cannot read .metadata ({type(e).__name__}: {e})") from e
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


def _check_fits(state: Dict[str, Any], metadata, directory: str) -> None:
    """Refuse a checkpoint that lacks a tensor of ``state`` or holds it with another shape (another
    model or catalog size), before DCP allocates or copies anything."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    flat, _ = flatten_state_dict(state)
    saved = metadata.state_dict_metadata
    problems = []
    for key, value in flat.items():
        if not isinstance(value, (torch.Tensor, ShardedTensor)):  # ShardedTensor is no Tensor; size() is global
            continue
        md = saved.get(key)
        if not isinstance(md, TensorStorageMetadata):
            problems.append(f"{key} missing")
        elif tuple(md.size) != tuple(value.size()):
            problems.append(f"{key} has shape {list(md.size)} there, {list(value.size())} in the model")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise CheckpointError(f"checkpoint {directory} does not match the model: {shown}")


def dcp_load(state: Dict[str, Any], directory: str, *, no_dist: bool = False) -> None:
    """Load ``state`` in place from the DCP checkpoint in local ``directory`` (safe reader + planner).

    The metadata is checked (allow-listed classes, shard files whole) and every tensor of ``state`` must be
    in the checkpoint with its shape, else :class:`CheckpointError`; DCP's own failures (a garbled shard)
    are re-raised as :class:`CheckpointError` naming the directory.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    if not (Path(directory) / ".metadata").exists():
        raise FileNotFoundError(f"{directory}: not a checkpoint (no DCP .metadata file)")
    _check_fits(state, SafeFileSystemReader(directory).read_metadata(), directory)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(directory), planner=SafeLoadPlanner(), no_dist=no_dist)
    except (Exception, CheckpointException) as e:
        causes = [f[0] for f in e.failures.values()] if isinstance(e, CheckpointException) else [e]
        why = "; ".join(f"{type(c).__name__}: {(str(c).strip().splitlines() or [''])[0]}" for c in causes)
        raise CheckpointError(f"checkpoint {directory}: DCP could not load it ({why})") from e


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
    with local_checkpoint_dir(checkpoint_path) as d, warnings.catch_warnings():
        # a single-process load is the intent here, not a missing process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_load(state, d)
    module.load_state_dict(state["model"], strict=True)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------------
# Warm start: a new model (possibly with a bigger catalog) initialised from an earlier checkpoint
# --------------------------------------------------------------------------------------------------

MODEL_STATE_PREFIX = "model."  # DCP keys of the model part: "model." + TrainingModule/DMP state-dict key


def checkpoint_tensor_shapes(checkpoint_path: str) -> Dict[str, tuple]:
    """``{TrainingModule state-dict key: full shape}`` of every model tensor in a DCP checkpoint."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with local_checkpoint_dir(checkpoint_path) as d:
        metadata = SafeFileSystemReader(d).read_metadata()
    return {k[len(MODEL_STATE_PREFIX):]: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
            if k.startswith(MODEL_STATE_PREFIX) and isinstance(v, TensorStorageMetadata)}


def read_full_tensors(checkpoint_path: str, keys: Optional[List[str]] = None) -> Dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint re-assembled into plain CPU tensors (every shard of every rank).

    Keys are TrainingModule/DMP state-dict keys (``model.<plain model key>``).  Needs no process group
    (``no_dist``): each caller reads the whole tensors for itself.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with local_checkpoint_dir(checkpoint_path) as d:
        metadata = SafeFileSystemReader(d).read_metadata()
        state: Dict[str, torch.Tensor] = {}
        for k, v in metadata.state_dict_metadata.items():
            if not (k.startswith(MODEL_STATE_PREFIX) and isinstance(v, TensorStorageMetadata)):
                continue
            key = k[len(MODEL_STATE_PREFIX):]
            if keys is None or key in keys:
                state[key] = torch.empty(tuple(v.size), dtype=v.properties.dtype)
        if state:
            dcp_load({MODEL_STATE_PREFIX.rstrip("."): state}, d, no_dist=True)
    return state


def _local_pieces(value) -> List[tuple]:
    """``[(tensor, offsets)]``: the parts of a state-dict value this process holds, with their offsets in
    the full tensor (a plain tensor is one piece at offset 0)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return [(s.tensor, tuple(s.metadata.shard_offsets)) for s in value.local_shards()]
    if type(value).__name__ == "DTensor":
        raise TypeError("warm start into DTensor state is not supported (the item table is a ShardedTensor "
                        "under TorchRec's EmbeddingCollection sharders)")
    if isinstance(value, torch.Tensor):
        return [(value, (0,) * value.dim())]
    return []


def warm_start_state(state: Dict[str, Any], checkpoint_path: str, *, keep_tensors: bool = False) -> Dict[str, Any]:
    """Copy an earlier checkpoint's model weights into ``state`` (a TrainingModule or DMP ``state_dict()``,
    plain tensors and/or ShardedTensors) in place; return a report.

    Tensors of the same shape are copied whole.  A tensor that grew along dim 0 only (the item table after
    the catalog grew: old indices are kept, new items appended) gets its first ``old_rows`` rows copied;
    the new rows keep the values ``state`` already holds (the model's fresh initialisation).  Keys absent
    from the checkpoint keep their fresh values and are listed in the report; any other shape change
    (a different embedding dim or architecture) raises ``ValueError``.  For a sharded tensor only this
    process's local shards are written, each from the rows/columns it covers.

    Report: ``{"checkpoint", "copied": [keys], "grown": {key: [old_rows, new_rows]}, "fresh": [keys],
    "max_abs_diff": max |copied - checkpoint| read back (0.0 = exact)}`` (+ ``"_old"``: the checkpoint's
    tensors, with ``keep_tensors``).
    """
    shapes = checkpoint_tensor_shapes(checkpoint_path)
    pieces = {k: _local_pieces(v) for k, v in state.items()}
    full_shape = {}
    for k, v in state.items():
        if hasattr(v, "metadata") and callable(getattr(v, "metadata")) and hasattr(v.metadata(), "size"):
            full_shape[k] = tuple(v.metadata().size)  # ShardedTensor
        elif isinstance(v, torch.Tensor):
            full_shape[k] = tuple(v.shape)
    wanted, fresh, grown = [], [], {}
    for k, shape in full_shape.items():
        if k not in shapes:
            fresh.append(k)
            continue
        old = shapes[k]
        if old != shape:
            if len(old) != len(shape) or old[1:] != shape[1:] or old[0] > shape[0]:
                raise ValueError(f"warm start from {checkpoint_path}: {k} has shape {list(old)} there and "
                                 f"{list(shape)} in the new model; only growth along dim 0 (more items) is supported")
            grown[k] = [int(old[0]), int(shape[0])]
        wanted.append(k)
    old_tensors = read_full_tensors(checkpoint_path, wanted)
    max_diff = _copy_rows(pieces, old_tensors, write=True)
    return {"checkpoint": str(checkpoint_path), "copied": sorted(wanted), "grown": grown, "fresh": sorted(fresh),
            "max_abs_diff": max_diff, **({"_old": old_tensors} if keep_tensors else {})}


def _copy_rows(pieces: Dict[str, List[tuple]], old: Dict[str, torch.Tensor], *, write: bool) -> float:
    """Copy (``write``) the overlap of each old full tensor into the local pieces; return the largest
    |piece - old| over the overlaps (read back after the copy)."""
    max_diff = 0.0
    with torch.no_grad():
        for k, src in old.items():
            for t, off in pieces.get(k, []):
                if t.dim() == 0:
                    if write:
                        t.copy_(src.to(t.dtype))
                    max_diff = max(max_diff, float((t.float() - src.float()).abs()))
                    continue
                r0 = off[0]
                rows = max(0, min(r0 + t.shape[0], src.shape[0]) - r0)
                if rows == 0:
                    continue
                idx = (slice(r0, r0 + rows),) + tuple(slice(o, o + n) for o, n in zip(off[1:], t.shape[1:]))
                part = src[idx].to(device=t.device, dtype=t.dtype)
                if write:
                    t[:rows].copy_(part)
                if part.numel():
                    max_diff = max(max_diff, float((t[:rows].float() - part.float()).abs().max()))
    return max_diff


def warm_start_module(module: nn.Module, checkpoint_path: str) -> Dict[str, Any]:
    """:func:`warm_start_state` applied to ``module`` (a DMP-wrapped or plain :class:`TrainingModule`):
    its ``state_dict()`` is filled in place and loaded back.  Every rank calls it for a sharded model (no
    collective is involved: each rank reads the whole old tensors and writes its own shards)."""
    state = module.state_dict()
    report = warm_start_state(state, checkpoint_path, keep_tensors=True)
    old = report.pop("_old")
    module.load_state_dict(state)
    # read the module's weights back: the copied rows must now equal the checkpoint's exactly
    report["max_abs_diff"] = _copy_rows({k: _local_pieces(v) for k, v in module.state_dict().items()}, old,
                                        write=False)
    report["rows_copied"] = {k: int(v.shape[0]) for k, v in old.items() if v.dim() > 0 and k in report["grown"]}
    return report
