"""The slate each click was shown in, joined onto the transitions that train the reward model.

``prepare`` writes a ``slates/`` table beside ``transitions/`` when the logs come with impressions
(:mod:`mtrec_dist.data.slates`); a transition names its slate by ``(user_idx, slate_id)``.  The join is a
Ray Data hash join (it needs ``polars``), so no process holds either table whole.  A transition without a
slate (``slate_id`` -1, or a slate the impressions do not have) gets a row of padding, which the reward
model reads as "no slate: the catalog is the choice set".
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SLATE_KEYS = ("user_idx", "slate_id")
SLATE_COLUMN = "slate_items"


def slate_tables(prepared_dirs: Sequence[str]) -> list[str]:
    """The ``slates/`` directories of ``prepared_dirs`` that exist (daily retraining reads several days)."""
    from mtrec_dist.data.input_files import resolve_filesystem
    from mtrec_dist.data.slates import SLATES_DIR
    from mtrec_dist.data.input_files import join_path

    found = []
    for d in prepared_dirs:
        path = join_path(d, SLATES_DIR)
        fs, fs_path = resolve_filesystem(path)
        if fs.get_file_info(fs_path).type.name == "Directory":
            found.append(path)
    return found


def slate_width(slate_dirs: Sequence[str]) -> int:
    """The slate length K of the slates tables (one per run; they must agree)."""
    import pyarrow.parquet as pq

    from mtrec_dist.data.input_files import resolve_filesystem

    widths = set()
    for d in slate_dirs:
        fs, fs_path = resolve_filesystem(d)
        table = pq.ParquetDataset(fs_path, filesystem=fs).fragments[0].head(1, columns=[SLATE_COLUMN])
        widths.add(len(table.column(SLATE_COLUMN)[0]))
    if len(widths) != 1:
        raise ValueError(f"slates tables {list(slate_dirs)} have different slate lengths {sorted(widths)}")
    return widths.pop()


def pad_missing_slates(batch: pa.Table, *, width: int) -> pa.Table:
    """Ray Data UDF after the join: a transition with no slate gets ``width`` zeros (padding), and the
    impression columns the reward model does not read are dropped."""
    col = batch.column(SLATE_COLUMN)
    n = batch.num_rows
    flat = np.zeros((n, width), dtype=np.int64)
    have = ~col.is_null().to_numpy(zero_copy_only=False)
    if have.any():
        flat[have] = pc.list_flatten(col.filter(pa.array(have))).to_numpy().reshape(-1, width)
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    out = batch.drop_columns([c for c in batch.column_names if c == SLATE_COLUMN or c == "click_index"])
    return out.append_column(SLATE_COLUMN, pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1))))


def with_slates(transitions, slate_dirs: Sequence[str], partitions: int):
    """``transitions`` (a Ray Dataset) with a ``slate_items`` [K] column: the items shown with each click,
    from the ``slates/`` tables ``slate_dirs`` (:func:`slate_tables`), hash-joined in ``partitions`` blocks."""
    import ray.data

    width = slate_width(slate_dirs)
    slates = ray.data.read_parquet(list(slate_dirs)).select_columns([*SLATE_KEYS, SLATE_COLUMN])
    # fractional CPUs: on a small box the aggregators would otherwise wait for the CPUs training holds
    joined = transitions.join(slates, "left_outer", num_partitions=max(1, partitions), on=SLATE_KEYS,
                              aggregator_ray_remote_args={"num_cpus": 0.01})
    return joined.map_batches(pad_missing_slates, batch_size=None, batch_format="pyarrow",
                              fn_kwargs=dict(width=width))
