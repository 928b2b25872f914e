"""Reading a DCP checkpoint without arbitrary unpickling (:func:`dcp_load`), from a local path or a URI
(:func:`local_checkpoint_dir`).

Loading never unpickles arbitrary objects: DCP's ``.metadata`` is read by an unpickler that admits only
an exact list of DCP's metadata classes (no dotted names), non-tensor entries are read with
``torch.load(weights_only=True)`` (DCP's default planner uses ``weights_only=False``), tensors are read by
DCP with ``weights_only=True``, and the numpy files with ``allow_pickle=False``.  Before DCP reads a byte,
the metadata is checked against the shard files (none missing, cut short or outside the directory) and
against the model (every tensor present, same shape); a checkpoint that fails is refused with
:class:`CheckpointError` (:class:`UnsafeCheckpointError` for a refused global), naming the checkpoint.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

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
