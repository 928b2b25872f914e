"""A prepared dataset on disk: its folders, the schemas of its tables, its manifest and shard listing.

``mtrec prepare`` (:mod:`mtrec_dist.data.prepare`) writes, under one output directory:
``transitions/`` (exactly ``TRANSITION_COLUMNS``), ``eval/`` (the only home of the ``eval_*`` signals,
keyed by ``row_id``), ``rejects/`` (original columns + ``reject_reason`` + ``source_file`` +
``raw_line``), ``vocab/`` (see :mod:`mtrec_dist.data.vocab`), where the logs come with impressions
``slates/`` (``SLATE_SCHEMA``) and ``slates_rejects/`` (see :mod:`mtrec_dist.data.slates`), and
``manifest.json``.  Everything that reads a prepared dataset back (training, scoring, evaluation,
retraining, ``mtrec inspect``) goes through the names and loaders here.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mtrec_dist.data.readers import InputError, display_path, join_path, resolve_filesystem
from mtrec_dist.data.schema import EVAL_COLUMNS, EVENT_SCHEMA, SCHEMA_VERSION, TRANSITION_COLUMNS, typed_fields

TRANSITIONS_DIR, EVAL_DIR, REJECTS_DIR, VOCAB_DIR, MANIFEST_FILE = (
    "transitions", "eval", "rejects", "vocab", "manifest.json")
# written only when the logs come with impressions (mtrec_dist.data.slates)
SLATES_DIR, SLATE_REJECTS_DIR = "slates", "slates_rejects"
OUTPUTS = (TRANSITIONS_DIR, EVAL_DIR, REJECTS_DIR, VOCAB_DIR, SLATES_DIR, SLATE_REJECTS_DIR, MANIFEST_FILE)

TRANSITION_SCHEMA = pa.schema(
    typed_fields(row_id=pa.int64(), user_idx=pa.int64(), nullable=False)
    + typed_fields(state_items=pa.list_(pa.int64()), state_feedback=pa.list_(pa.float32()))
    + typed_fields(action=pa.int64(), nullable=False)
    + typed_fields(action_feedback=pa.float32(), next_state_items=pa.list_(pa.int64()),
                   next_state_feedback=pa.list_(pa.float32()), done=pa.int8(), ts=pa.int64(), pos_from_end=pa.int32(),
                   returned=pa.int8(), return_known=pa.int8(), action_log_duration=pa.float32(),
                   slate_id=pa.int64()))
assert TRANSITION_SCHEMA.names == TRANSITION_COLUMNS
# slates/: one row per impression kept -- the K items shown (vocab indices; 0 = an item no accepted event has)
# and the position clicked (-1 = no click); (user_idx, slate_id) is unique and is what a transition names
SLATE_SCHEMA = pa.schema(typed_fields(user_idx=pa.int64(), slate_id=pa.int64(), slate_items=pa.list_(pa.int64()),
                                      click_index=pa.int8()))
EVAL_SCHEMA = pa.schema([pa.field("row_id", pa.int64()), pa.field("user_idx", pa.int64()),
                         pa.field("pos_from_end", pa.int32()), pa.field("action", pa.int64())]
                        + [EVENT_SCHEMA.field(c) for c in EVAL_COLUMNS])


class AccountingError(RuntimeError):
    """rows_in != rows_ok + rows_rejected, or a user's rows were split across blocks: a bug, never data."""


class EmptyDatasetError(InputError):
    """The input held rows but none survived validation (the rejects and manifest are still written)."""


def resolve_broadcast(ref):
    """A value the driver broadcast to Ray Data UDFs: ``ray.get`` of an object ref, or the value itself
    (tests and in-process callers pass plain values)."""
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def list_array(flat: np.ndarray, width: int, typ: pa.DataType) -> pa.Array:
    """Rows of ``flat`` ([n, width], or n * width values) as a list column of fixed-length lists (states)."""
    n = flat.shape[0]
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1), typ))


def load_manifest(path: str, *, any_version: bool = False) -> dict:
    """The manifest of a prepared dataset (``path`` = the dataset dir or its manifest.json).

    A dataset of another schema version is refused (its transitions lack columns this code reads) unless
    ``any_version``: daily retraining reads only an earlier run's bookkeeping (days, row ids, carry-over),
    which every version records."""
    fs, root = resolve_filesystem(path)
    p = root if root.endswith(".json") else join_path(root, MANIFEST_FILE)
    try:
        with fs.open_input_stream(p) as f:
            manifest = json.loads(f.read().decode())
    except (FileNotFoundError, OSError) as e:
        raise InputError(f"no prepared dataset at {path}: cannot read {display_path(fs, p)} ({e})") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{display_path(fs, p)} is not valid JSON ({e})") from e
    if manifest.get("schema_version") != SCHEMA_VERSION and not any_version:
        raise InputError(f"{display_path(fs, p)}: schema_version {manifest.get('schema_version')!r}, "
                         f"this code reads {SCHEMA_VERSION}; re-run `mtrec prepare`")
    return manifest


def write_manifest(fs: pafs.FileSystem, root: str, manifest: dict) -> None:
    """Write ``manifest.json`` last: its presence marks the dataset complete."""
    with fs.open_output_stream(join_path(root, MANIFEST_FILE)) as f:
        f.write(json.dumps(manifest, indent=2).encode())


def list_shards(fs: pafs.FileSystem, root: str, sub: str) -> list[dict]:
    """The Parquet files of ``<root>/<sub>`` with their row counts (the manifest's ``shards``; read back
    from the footers so that the accounting checks what was really written)."""
    d = join_path(root, sub)
    if fs.get_file_info(d).type != pafs.FileType.Directory:
        return []
    out = []
    for info in sorted(fs.get_file_info(pafs.FileSelector(d)), key=lambda i: i.path):
        if info.type == pafs.FileType.File and info.path.endswith(".parquet"):
            with fs.open_input_file(info.path) as f:
                rows = pq.ParquetFile(f).metadata.num_rows
            out.append(dict(path=f"{sub}/{info.base_name}", rows=int(rows), bytes=int(info.size or 0)))
    return out


def prepare_output_dir(fs: pafs.FileSystem, root: str, overwrite: bool, display: str) -> None:
    """Make ``root`` ready for a new dataset: refuse to replace one unless ``overwrite`` (then delete only
    what prepare writes, never anything else the directory holds)."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise InputError(f"output {display} is a file, not a directory")
    if info.type == pafs.FileType.Directory:
        ours = [join_path(root, p) for p in OUTPUTS]
        present = [p for p in ours if fs.get_file_info(p).type != pafs.FileType.NotFound]
        if present and not overwrite:
            raise InputError(f"output {display} already holds a prepared dataset; pass --overwrite "
                             "(prepare.overwrite=true) to replace it")
        for p in present:
            if fs.get_file_info(p).type == pafs.FileType.Directory:
                fs.delete_dir(p)
            else:
                fs.delete_file(p)
    fs.create_dir(root, recursive=True)


def is_prepared_dataset(path: str) -> bool:
    """Whether ``path`` holds a (complete) prepared dataset, i.e. its manifest."""
    fs, root = resolve_filesystem(path)
    return fs.get_file_info(join_path(root, MANIFEST_FILE)).type == pafs.FileType.File
