"""The slate each click was shown in, joined onto the transitions that train the reward model.

``prepare`` writes a ``slates/`` table beside ``transitions/`` when the logs come with impressions
(:mod:`mtrec_dist.data.slates`); a transition names its slate by ``(user_idx, slate_id)``, unique within one
prepared dataset.  The join is a Ray Data hash join (it needs ``polars``), so no process holds either table
whole, and it runs per prepared dataset (one day of daily retraining): a source that numbers slates per
session could reuse an id on another day.  A set small enough for the driver (``train.driver_read_mb``) is
joined there with pyarrow instead (:func:`with_slates_table`): Ray Data's join starts its aggregator actors
first, which took 17 s for 2,000 rows on a 2-core box.  A transition without a slate (``slate_id`` -1, or a slate that
prepare refused) gets a row of padding, which the reward model reads as "the catalog is the choice set".
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SLATE_KEYS = ("user_idx", "slate_id")
SLATE_COLUMN = "slate_items"


def slate_table(prepared_dir: str) -> Optional[tuple[str, int]]:
    """``(the slates/ directory, the slate length K)`` of a prepared dataset (its manifest's ``slates``
    entry), or None where prepare read no impressions or kept no slate."""
    from mtrec_dist.data.dataset import SLATES_DIR, load_manifest
    from mtrec_dist.data.input_files import join_path

    entry = load_manifest(prepared_dir).get("slates")
    if not entry or not entry.get("rows_ok"):
        return None
    return join_path(prepared_dir, SLATES_DIR), int(entry["slate_len"])


def pad_missing_slates(batch: pa.Table, *, width: int) -> pa.Table:
    """After the join (a Ray Data UDF, or on the driver's table): a transition with no slate gets ``width``
    zeros (padding)."""
    col = batch.column(SLATE_COLUMN)
    n = batch.num_rows
    flat = np.zeros((n, width), dtype=np.int64)
    have = ~col.is_null().to_numpy(zero_copy_only=False)
    if have.any():
        flat[have] = pc.list_flatten(col.filter(pa.array(have))).to_numpy().reshape(-1, width)
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    out = batch.drop_columns([SLATE_COLUMN])
    return out.append_column(SLATE_COLUMN, pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1))))


def no_slates(batch: pa.Table, *, width: int) -> pa.Table:
    """Transitions of a day without slates, trained with days that have them: every row gets padding (the
    catalog is its choice set), so that all days share one schema.  A Ray Data UDF, or on a table."""
    return pad_missing_slates(batch.append_column(SLATE_COLUMN, pa.nulls(batch.num_rows, pa.list_(pa.int64()))),
                              width=width)


def with_slates(transitions, slates_dir: str, width: int, partitions: int):
    """``transitions`` (a Ray Dataset of one prepared dataset) with a ``slate_items`` [``width``] column: the
    items shown with each click, from ``slates_dir`` (:func:`slate_table`), hash-joined in ``partitions``
    blocks."""
    import ray.data

    from mtrec_dist.data.input_files import resolve_filesystem

    fs, path = resolve_filesystem(slates_dir)
    slates = ray.data.read_parquet(path, filesystem=fs).select_columns([*SLATE_KEYS, SLATE_COLUMN])
    # fractional CPUs: on a small box the aggregators would otherwise wait for the CPUs training holds
    joined = transitions.join(slates, "left_outer", num_partitions=max(1, partitions), on=SLATE_KEYS,
                              aggregator_ray_remote_args={"num_cpus": 0.01})
    return joined.map_batches(pad_missing_slates, batch_size=None, batch_format="pyarrow",
                              fn_kwargs=dict(width=width))


def read_slates_table(slates_dir: str) -> pa.Table:
    """The keys and items of a ``slates/`` table (:func:`slate_table`), read in this process with pyarrow."""
    import pyarrow.dataset as pads

    from mtrec_dist.data.input_files import resolve_filesystem

    fs, path = resolve_filesystem(slates_dir)
    return pads.dataset(path, filesystem=fs, format="parquet", ignore_prefixes=["_", "."]).to_table(
        columns=[*SLATE_KEYS, SLATE_COLUMN])


def matched_rows(left: pa.Table, right: pa.Table, keys: Sequence[str], join_type: str = "left outer") -> pa.Table:
    """Row numbers ``__left`` and ``__right`` of the rows of ``left`` and ``right`` that match on ``keys``, in
    ``left``'s row order (``__right`` null where a left row has no match, for a left outer join).  Acero joins
    no list columns, so only the keys and row numbers are joined; the caller takes the rows it needs by them."""
    def numbered(table: pa.Table, name: str) -> pa.Table:
        return table.select(list(keys)).append_column(name, pa.array(np.arange(table.num_rows, dtype=np.int64)))

    return numbered(left, "__left").join(numbered(right, "__right"), list(keys), join_type=join_type).sort_by("__left")


def with_slates_table(transitions: pa.Table, slates: pa.Table, width: int) -> pa.Table:
    """:func:`with_slates` for tables one process holds: the same left join on :data:`SLATE_KEYS` and the same
    padding, in the transitions' row order.  A key seen twice in ``slates`` copies its transitions, as Ray
    Data's join does (the caller counts the rows)."""
    pairs = matched_rows(transitions, slates, SLATE_KEYS)
    joined = transitions.take(pairs.column("__left")).append_column(
        SLATE_COLUMN, slates.column(SLATE_COLUMN).take(pairs.column("__right")))
    return pad_missing_slates(joined, width=width)
