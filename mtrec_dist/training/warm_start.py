"""Warm start: a new model (possibly with a bigger catalog) initialised from an earlier checkpoint's weights
(:func:`warm_start_module`), and the checkpoint's model tensors read whole without a process group."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from mtrec_dist.training.safe_dcp import SafeFileSystemReader, dcp_load, local_checkpoint_dir

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
