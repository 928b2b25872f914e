"""Prepare's per-block statistics: computed next to the data on the cluster, merged in the driver.

Each block of rows yields a small table ``(kind, id, reason, count)``: rows per user and per item among
the rows not refused (``kind`` = "user" / "item"), rows per reject reason ("reason"), the block's rows
("rows") and, after the per-user stage, the users it saw whole ("first_of_user") and its transitions.
The driver sums them (:func:`sum_by`, :func:`total`) for the row_id offsets, the vocab and the
accounting; only these counts, never the rows, pass through the driver.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from mtrec_dist.data.readers import REASON_COLUMN


def _id_counts(ok: pa.Table) -> list[pa.Table]:
    """Rows per item and per user among ``ok``, the rows not refused (ids of either type: int, or string)."""
    kinds = (("item", "item_id"), ("user", "user_id"))
    parts = []
    for kind, c in kinds:
        g = ok.group_by(c).aggregate([([], "count_all")])
        parts.append(pa.table({"kind": pa.array([kind] * g.num_rows, pa.string()), "id": g.column(c),
                               "reason": pa.nulls(g.num_rows, pa.string()), "count": g.column("count_all")}))
    return parts


def block_stats(t: pa.Table) -> pa.Table:
    """Per block: rows per user and per item among the rows not refused, counts of each reject reason, and
    the latest ts of the rows not refused ("ts_max": where the log ends, for the return labels).

    After stage 1 the user counts give the row_id offsets (and, for string ids, users and items give the
    id keys); after the per-user stage they are the vocab's counts, plus the split-user check."""
    # only the counted columns are filtered: filtering copies every column it keeps, and the per-user
    # stage's blocks also carry state lists
    ok = t.select(["item_id", "user_id", "ts"]).filter(pc.is_null(t.column(REASON_COLUMN)))
    return pa.concat_tables(_id_counts(ok) + [_reason_counts(t), _ts_max(ok)])


def _ts_max(ok: pa.Table) -> pa.Table:
    """One "ts_max" row with the latest ts of ``ok``, the rows not refused (none if there are none)."""
    latest = pc.max(ok.column("ts")).as_py() if ok.num_rows else None
    n = 0 if latest is None else 1
    return pa.table({"kind": pa.array(["ts_max"] * n, pa.string()), "id": pa.nulls(n, ok.schema.field("user_id").type),
                     "reason": pa.nulls(n, pa.string()), "count": pa.array([latest] * n, pa.int64())})


def _reason_counts(t: pa.Table) -> pa.Table:
    """Rows per reject reason, the block's rows, and (per-user stage) its whole users and transitions."""
    g = t.group_by(REASON_COLUMN).aggregate([([], "count_all")])
    g = g.filter(pc.is_valid(g.column(REASON_COLUMN)))
    extra = {}
    if "_first_of_user" in t.column_names:
        extra = {"first_of_user": int(pc.sum(t.column("_first_of_user")).as_py() or 0),
                 "transitions": int(pc.sum(t.column("_is_transition")).as_py() or 0)}
    id_type = t.schema.field("user_id").type  # the stats' id column holds ids of this type
    rows = pa.table({"kind": pa.array(["reason"] * g.num_rows, pa.string()),
                     "id": pa.nulls(g.num_rows, id_type), "reason": g.column(REASON_COLUMN),
                     "count": g.column("count_all")})
    meta = pa.table({"kind": pa.array(["rows"] + list(extra), pa.string()),
                     "id": pa.nulls(1 + len(extra), id_type), "reason": pa.nulls(1 + len(extra), pa.string()),
                     "count": pa.array([t.num_rows] + list(extra.values()), pa.int64())})
    return pa.concat_tables([rows, meta])


def collect_stats(ds) -> pa.Table:
    """:func:`block_stats` of every block of the Ray dataset ``ds``, concatenated in the driver."""
    import ray

    refs = ds.map_batches(block_stats, batch_size=None, batch_format="pyarrow").to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    if not tables:
        return pa.table({"kind": pa.array([], pa.string()), "id": pa.array([], pa.int64()),
                         "reason": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    return pa.concat_tables(tables)


def sum_by(stats: pa.Table, kind: str, key: str) -> pa.Table:
    """Counts of ``kind`` summed per ``key`` ("id" or "reason"), sorted by it (``count_sum``)."""
    t = stats.filter(pc.equal(stats.column("kind"), kind))
    return t.group_by(key).aggregate([("count", "sum")]).sort_by(key)


def largest(stats: pa.Table, kind: str) -> int | None:
    """The largest count of ``kind`` (None where there is none)."""
    t = stats.filter(pc.equal(stats.column("kind"), kind))
    return pc.max(t.column("count")).as_py() if t.num_rows else None


def total(stats: pa.Table, kind: str) -> int:
    """The sum of all counts of ``kind``."""
    t = stats.filter(pc.equal(stats.column("kind"), kind))
    return int(pc.sum(t.column("count")).as_py() or 0)
