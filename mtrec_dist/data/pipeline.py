"""Ray Data -> Ray Train streaming of prepared transitions.

* :func:`read_transitions` opens ``<prepared>/transitions`` as a :class:`ray.data.Dataset` holding only
  training columns (never ``eval/``, never an ``eval_*`` column).
* :class:`~mtrec_dist.data.train_split.NoDropDataConfig` (its own module, so that reading here never imports
  Ray Train) splits a dataset over the Train workers without dropping rows.
* :func:`iter_train_batches` (runs inside a worker) turns a worker's shard into torch batch dicts (the
  contract at the bottom of :mod:`mtrec_dist.data.schema`) and keeps the ranks in lock-step: shards can
  differ by a row, and after a restore each rank skips different already-trained rows, so each step all
  ranks agree whether anyone still has data; exhausted ranks yield fully masked batches until every rank
  is done, so every rank runs the same number of steps (TorchRec's sharded lookups and DDP are
  collectives that all ranks must enter together).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import torch

from mtrec_dist.data.input_files import resolve_filesystem
from mtrec_dist.data.schema import TRANSITION_COLUMNS, EvalLeakError, assert_training_columns, is_eval_column

# Columns whose values are fixed-length lists (length = state_len).
LIST_COLUMNS = ("state_items", "state_feedback", "next_state_items", "next_state_feedback")
# Dtypes of the batch contract (schema.py); any other numeric column passes through (float -> float32,
# integer/bool -> int64), so joined-in columns such as reward_mean / reward_q reach the model too.
_LONG_COLUMNS = {"state_items", "next_state_items", "action", "row_id", "user_idx", "pos_from_end", "ts"}
_FLOAT_COLUMNS = {"state_feedback", "next_state_feedback", "action_feedback", "done"}
MASK = "mask"


# --------------------------------------------------------------------------------------------------
# Paths (local directories or cloud URIs)
# --------------------------------------------------------------------------------------------------


def _uri(fs: pafs.FileSystem, fs_path: str, original: str) -> str:
    return original if "://" in str(original) else fs_path


def transitions_path(path: str) -> str:
    """The Parquet folder of transitions for ``path`` (a prepared dataset dir or the folder itself)."""
    fs, p = resolve_filesystem(path)
    p = p.rstrip("/")
    if p.split("/")[-1] == "eval":
        raise EvalLeakError(f"{path}: the eval/ table holds evaluation-only signals; training never reads it")
    sub = f"{p}/transitions"
    if fs.get_file_info(sub).type == pafs.FileType.Directory:
        return _uri(fs, sub, f"{str(path).rstrip('/')}/transitions")
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"transitions not found: {path}")
    return _uri(fs, p, str(path))


def _parquet_dataset(path: str):
    import pyarrow.dataset as pads

    fs, p = resolve_filesystem(transitions_path(path))
    dataset = pads.dataset(p, filesystem=fs, format="parquet")
    if not dataset.files:
        raise FileNotFoundError(f"no Parquet files under {transitions_path(path)}")
    return dataset


def transition_schema(path: str) -> pa.Schema:
    """Arrow schema of the transitions under ``path`` (reads Parquet footers only)."""
    return _parquet_dataset(path).schema


def transition_files(path: str) -> List[str]:
    """The Parquet files of the transitions under ``path``."""
    return list(_parquet_dataset(path).files)


def read_transitions(path: str, columns: Optional[Sequence[str]] = None, *, override_num_blocks: Optional[int] = None):
    """Open prepared transitions as a Ray Dataset with training columns only.

    ``path``: the prepared dataset directory (its ``transitions/`` folder is read) or a folder/URI of
    transition Parquet files.  ``columns``: the columns to read (default: every column of the files
    except evaluation-only ones; requesting an ``eval_*`` column raises :class:`EvalLeakError`).
    Every column of :data:`TRANSITION_COLUMNS` must be present; a missing one raises naming the file.
    """
    import ray.data

    source, columns = _training_columns(path, columns)
    kwargs = {"override_num_blocks": override_num_blocks} if override_num_blocks else {}
    # select_columns is pushed down into the Parquet read: the other columns are never loaded.
    return ray.data.read_parquet(source, **kwargs).select_columns(columns)


def read_transitions_table(path: str, columns: Optional[Sequence[str]] = None,
                           where: Optional[pc.Expression] = None) -> pa.Table:
    """The same rows and columns as :func:`read_transitions`, read in this process with pyarrow (a small
    dataset: no Ray Data read tasks to start); only the rows ``where`` (a pyarrow expression, e.g.
    :func:`~mtrec_dist.data.heldout.heldout_expr`) selects, when given, filtered while reading (the other
    rows are never held)."""
    _, columns = _training_columns(path, columns)
    return _parquet_dataset(path).to_table(columns=columns, filter=where)


def _training_columns(path: str, columns: Optional[Sequence[str]]) -> tuple:
    """``(source, columns)``: the transitions folder under ``path`` and the checked training columns to read
    from it (default: every column but evaluation-only ones)."""
    source = transitions_path(path)
    schema = transition_schema(path)
    if columns is None:
        columns = [n for n in schema.names if not is_eval_column(n)]
    columns = list(columns)
    assert_training_columns(columns)
    missing = [c for c in TRANSITION_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"{source}: transition column(s) {missing} missing; found {schema.names}")
    absent = [c for c in columns if c not in schema.names]
    if absent:
        raise ValueError(f"{source}: requested column(s) {absent} not in the files; found {schema.names}")
    return source, columns


IN_MEMORY_BLOCK_MB = 64  # blocks of an in-memory dataset: Ray Data's splits and prefetches work block by block


def in_memory_dataset(table: pa.Table, block_mb: float = IN_MEMORY_BLOCK_MB):
    """``table`` as a Ray Dataset of in-memory blocks of at most about ``block_mb`` MiB each (in row order).

    For a training set small enough for one process to read: every epoch then starts from blocks already in
    the object store, without Ray Data's file listing and read tasks."""
    import math

    import ray.data

    return ray.data.from_arrow(table, override_num_blocks=max(1, math.ceil(table.nbytes / (block_mb * 2**20))))


def count_transitions(path: str, where: Optional[pc.Expression] = None) -> int:
    """Number of transitions under ``path``, from the Parquet footers (no data is read); only those ``where``
    (a pyarrow expression, e.g. the held-out users' rows) selects when given, reading the columns it names."""
    if where is None:
        return int(_parquet_dataset(path).count_rows())
    return int(_parquet_dataset(path).count_rows(filter=where))


def action_counts(paths: Sequence[str], num_items: int, where: Optional[pc.Expression] = None) -> np.ndarray:
    """How often each item is the logged action in the transitions under ``paths`` (only the rows ``where``
    selects, e.g. the training users'), indexed by item index (entry 0, the padding item, stays 0).  The
    popularity negative sampler reads these: counted from the rows training reads, it learns nothing from the
    held-out users it is measured on.  Reads the ``action`` column (and what ``where`` names) batch by batch."""
    counts = np.zeros(num_items + 1, dtype=np.float64)
    for path in paths:
        for batch in _parquet_dataset(path).to_batches(columns=["action"], filter=where):
            actions = batch.column(0).to_numpy(zero_copy_only=False)
            if actions.size and (actions.min() < 1 or actions.max() > num_items):
                raise ValueError(f"{path}: an action index outside 1..{num_items} (stale or foreign transitions)")
            counts += np.bincount(actions, minlength=num_items + 1)
    return counts


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def _list_column_to_numpy(col: pa.ChunkedArray | pa.Array, name: str, expected_len: Optional[int]) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if col.null_count:
        raise ValueError(f"column {name!r}: {col.null_count} null list(s); prepared states must be padded, not null")
    if n == 0:
        return np.zeros((0, expected_len or 0))
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    width = int(lengths[0]) if expected_len is None else int(expected_len)
    bad = np.nonzero(lengths != width)[0]
    if bad.size:
        raise ValueError(f"column {name!r}: row {int(bad[0])} has {int(lengths[bad[0]])} values, expected {width} "
                         "(states are fixed-length, left-padded with 0)")
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(n, width)


def collate_transitions(batch: pa.Table | Dict[str, Any], device: Optional[torch.device] = None,
                        state_len: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Arrow table (or dict of numpy arrays) of transitions -> the torch batch dict of schema.py.

    List columns become ``[B, L]`` tensors (all rows must have the same length; ``state_len`` checks
    it), the contract columns get their contract dtypes, other numeric columns pass through (float ->
    float32, int -> int64, list<float> -> ``[B, K]`` float32), and ``mask`` is all ones unless the input
    carries one.  A column that is not numeric raises ``ValueError`` naming it.
    """
    out: Dict[str, torch.Tensor] = {}
    if isinstance(batch, pa.Table):
        names = batch.column_names
        get = batch.column
    else:
        names = list(batch)
        get = batch.__getitem__
    for name in names:
        col = get(name)
        if isinstance(col, (pa.ChunkedArray, pa.Array)):
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
                arr = _list_column_to_numpy(col, name, state_len if name in LIST_COLUMNS else None)
            else:
                if col.null_count:
                    raise ValueError(f"column {name!r}: {col.null_count} null value(s)")
                arr = col.to_numpy(zero_copy_only=False)
        else:
            arr = np.asarray(col)
            if arr.dtype == object:
                arr = np.stack([np.asarray(v) for v in arr]) if len(arr) else arr.astype(np.float32)
        if not arr.flags.writeable:  # Arrow buffers are read-only; torch wants writable memory
            arr = arr.copy()
        if name in _LONG_COLUMNS:
            t = torch.as_tensor(np.ascontiguousarray(arr, dtype=np.int64))
        elif name in _FLOAT_COLUMNS or name == MASK:
            t = torch.as_tensor(np.ascontiguousarray(arr, dtype=np.float32))
        elif arr.dtype.kind == "f":
            t = torch.as_tensor(np.ascontiguousarray(arr, dtype=np.float32))
        elif arr.dtype.kind in "iub":
            t = torch.as_tensor(np.ascontiguousarray(arr, dtype=np.int64))
        else:
            raise ValueError(f"column {name!r} has non-numeric type {arr.dtype}; only numeric columns can enter a batch")
        out[name] = t
    if MASK not in out:
        n = next(iter(out.values())).shape[0] if out else 0
        out[MASK] = torch.ones(n, dtype=torch.float32)
    if device is not None and device.type != "cpu":
        out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
    return out


def pad_batch(batch: Dict[str, torch.Tensor], batch_size: int) -> Dict[str, torch.Tensor]:
    """Pad every tensor to ``batch_size`` rows by repeating row 0, with ``mask`` = 0 on the added rows.

    Repeating a real row keeps every id a valid table index (padding rows still go through the sharded
    lookups, which all ranks must run together); the mask removes them from every loss and metric.
    """
    n = batch[MASK].shape[0]
    if n == batch_size:
        return batch
    if n > batch_size or n == 0:
        raise ValueError(f"cannot pad a batch of {n} rows to {batch_size}")
    out = {}
    for k, v in batch.items():
        fill = torch.zeros_like(v[:1]).expand(batch_size - n, *v.shape[1:]) if k == MASK else \
            v[:1].expand(batch_size - n, *v.shape[1:])
        out[k] = torch.cat([v, fill], dim=0)
    return out


def masked_like(template: Dict[str, torch.Tensor], batch_size: int) -> Dict[str, torch.Tensor]:
    """A batch of ``batch_size`` copies of ``template``'s first row, all masked out."""
    out = {k: v[:1].expand(batch_size, *v.shape[1:]).clone() for k, v in template.items()}
    out[MASK] = torch.zeros(batch_size, dtype=torch.float32, device=template[MASK].device)
    return out


def filter_and_rebatch(tables: Iterable[pa.Table], batch_size: int, skip_row_ids: Optional[np.ndarray]) -> Iterator[pa.Table]:
    """Drop split-filler rows (``row_id < 0``) and rows whose ``row_id`` is in ``skip_row_ids`` (sorted),
    and re-form full batches."""
    buffer: List[pa.Table] = []
    buffered = 0
    for table in tables:
        if "row_id" in table.column_names:
            ids = table.column("row_id").to_numpy(zero_copy_only=False)
            drop = ids < 0
            if skip_row_ids is not None and skip_row_ids.size:
                pos = np.searchsorted(skip_row_ids, ids)
                drop |= (pos < skip_row_ids.size) & (skip_row_ids[np.minimum(pos, skip_row_ids.size - 1)] == ids)
            if drop.any():
                table = table.filter(pa.array(~drop))
        if table.num_rows == 0:
            continue
        buffer.append(table)
        buffered += table.num_rows
        while buffered >= batch_size:
            merged = pa.concat_tables(buffer)
            yield merged.slice(0, batch_size)
            rest = merged.slice(batch_size)
            buffer, buffered = ([rest] if rest.num_rows else []), rest.num_rows
    if buffered:
        yield pa.concat_tables(buffer)


def max_over_ranks(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``flags`` over all ranks (identity without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def _share_template(mine: Optional[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Get a one-row batch template from any rank that has one (for a rank whose shard is empty)."""
    import torch.distributed as dist

    local = None if mine is None else {k: v[:1].cpu() for k, v in mine.items()}
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if local is None:
            raise RuntimeError("no data at all: cannot build a batch template")
        return local
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    for t in gathered:
        if t is not None:
            return t
    raise RuntimeError("no rank has data: cannot build a batch template")


def iter_train_batches(
    shard_iterator,
    batch_size: int,
    device: torch.device,
    *,
    state_len: Optional[int] = None,
    skip_row_ids: Optional[np.ndarray] = None,
    prefetch_batches: int = 1,
    local_shuffle_buffer_size: Optional[int] = None,
    local_shuffle_seed: Optional[int] = None,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Yield one epoch of torch batches from this worker's shard, in lock-step with the other ranks.

    Every yielded batch has exactly ``batch_size`` rows; the last local batch is padded with ``mask``=0
    rows.  Each step all ranks all-reduce a "has data" flag: while any rank has data, exhausted ranks
    yield fully masked batches; when none has, every rank stops at the same step.  ``skip_row_ids``
    (sorted int64) are rows already consumed in this epoch before a restart: they are dropped so that a
    resumed epoch sees each remaining row exactly once.  Must be called by all ranks (it runs
    collectives).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tables = shard_iterator.iter_batches(
        batch_size=batch_size, batch_format="pyarrow", prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=local_shuffle_buffer_size or None, local_shuffle_seed=local_shuffle_seed,
    )
    if skip_row_ids is not None:
        skip_row_ids = np.unique(np.asarray(skip_row_ids, dtype=np.int64))
    local = iter(filter_and_rebatch(tables, batch_size, skip_row_ids))
    template: Optional[Dict[str, torch.Tensor]] = None
    flag_device = device if device.type != "cpu" else torch.device("cpu")
    while True:
        table = next(local, None)
        batch = None
        if table is not None:
            batch = pad_batch(collate_transitions(table, device, state_len), batch_size)
            if template is None:
                template = batch
        # flags[0]: this rank has a batch; flags[1]: this rank needs a template (exhausted before any row)
        flags = torch.tensor([batch is not None, batch is None and template is None], dtype=torch.int32,
                             device=flag_device)
        flags = max_over_ranks(flags)
        if int(flags[0]) == 0:
            return
        if int(flags[1]) == 1:
            shared = _share_template(template)
            if template is None:
                template = {k: v.to(device) for k, v in shared.items()}
        yield batch if batch is not None else masked_like(template, batch_size)


class HeldShard:
    """One worker's collated shard of a whole epoch, kept in host memory for the epochs after it
    (``train.feed: memory``): later epochs cost no reading, splitting or collating.

    :meth:`epoch` yields the same number of ``batch_size`` batches every time (the lock-step count of the
    epoch it was collected in, so every rank still runs the same steps), in the stored order when ``seed`` is
    None, else with the rows permuted by ``seed``.  Padding rows (``mask`` = 0) move with the rest, so each
    real row is trained on exactly once per epoch.  Rows never move between workers: a worker reshuffles the
    rows it holds.
    """

    def __init__(self, batches: Sequence[Dict[str, torch.Tensor]]) -> None:  # host-memory batches, emptied
        self.num_batches = len(batches)
        self.batch_size = int(batches[0][MASK].shape[0]) if batches else 0
        # column by column, each batch's piece let go as it is copied: the peak is the shard plus one column
        self.columns = {k: torch.cat([b.pop(k) for b in batches]) for k in list(batches[0])} if batches else {}

    @property
    def nbytes(self) -> int:
        return sum(v.element_size() * v.nelement() for v in self.columns.values())

    def epoch(self, device: torch.device, seed: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
        rows = self.num_batches * self.batch_size
        if not rows:
            return
        order = None if seed is None else torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
        for start in range(0, rows, self.batch_size):
            part = slice(start, start + self.batch_size) if order is None else order[start:start + self.batch_size]
            yield {k: v[part].to(device, non_blocking=True) for k, v in self.columns.items()}


def consumed_row_ids(batch: Dict[str, torch.Tensor]) -> np.ndarray:
    """``row_id`` of the real (mask = 1) rows of a batch."""
    keep = batch[MASK] > 0
    return batch["row_id"][keep].cpu().numpy()


def skip_set(parts: Iterable[np.ndarray]) -> np.ndarray:
    """Sorted unique union of row-id arrays."""
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


__all__ = [
    "HeldShard", "LIST_COLUMNS", "MASK", "collate_transitions", "count_transitions", "consumed_row_ids",
    "filter_and_rebatch", "iter_train_batches", "max_over_ranks",
    "masked_like", "pad_batch", "read_transitions", "read_transitions_table", "skip_set", "transition_files",
    "transition_schema", "transitions_path",
]
