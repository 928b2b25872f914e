"""Prepare's first stage, read + row-level validation, and the reasons rows are refused for.

Each input file (or group of Parquet row groups) is one *work unit*: parsed with
:mod:`mtrec_dist.data.readers` and checked row by row (:data:`ROW_CHECKS`); a refused row keeps its
values and gets a ``reject_reason``.  Every row gets ``_order`` = (file index, row in file), its
position in the input, so "first" and "file order" stay well defined after any shuffle.  The per-user
checks (:data:`USER_CHECKS`) need all of a user's rows and live in :mod:`mtrec_dist.data.sessionize`.

A reason is a machine-readable code, optionally followed by ``": "`` and a hint for the reader
(``ts_out_of_range: looks like milliseconds``); the manifest counts codes (``rejects_by_reason``) and
hinted reasons (``reject_hints``) separately.
"""
from __future__ import annotations

import datetime as dt
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrec_dist.config import PrepareConfig
from mtrec_dist.data import readers as rd
from mtrec_dist.data.ids import restore_ids
from mtrec_dist.data.readers import (HINT_SEPARATOR, RAW_LINE_COLUMN, REASON_COLUMN, InputError, InputFile,
                                     id_type_of, reject_schema)
from mtrec_dist.data.schema import REQUIRED_COLUMNS

ORDER_COLUMN = "_order"
FILE_BITS = 40  # _order = file_index << 40 | row_in_file  (2^40 rows per file, 2^23 files)

ROW_CHECKS = (
    "null_<col> (required column)", "negative_user_id / negative_item_id / negative_ts",
    "item_id_out_of_range (> max_item_id; integer ids only: string ids are checked by the readers)",
    "ts_out_of_range (> max_ts; 'ts_out_of_range: looks like milliseconds' where ts / 1000 would fit)",
    "ts_outside_partition (ts not inside the day of a day=YYYY-MM-DD partition)",
    "click_out_of_range (not 0/1)", "nan_watch_ratio / watch_ratio_out_of_range (outside [0, 1])",
    "nan_dwell_s / negative_dwell_s / dwell_s_out_of_range (inf)", "negative_session_id / negative_slate_id",
    "nan_<eval col> / negative_eval_rating / <eval col>_out_of_range",
)
USER_CHECKS = ("duplicate_event", "ts_out_of_order")
# ts in a finer unit than seconds: (units per second, name); a hint is given when the value divided
# by the unit lands between MIN_PLAUSIBLE_TS (1973-03-03) and max_ts.
TS_UNITS = ((1_000, "milliseconds"), (1_000_000, "microseconds"), (1_000_000_000, "nanoseconds"))
MIN_PLAUSIBLE_TS = 100_000_000


def reason_code(reason: str) -> str:
    """The code of a reject reason, without its hint (``ts_out_of_range: looks like ms`` -> ``ts_out_of_range``)."""
    return reason.split(HINT_SEPARATOR, 1)[0]


def count_reasons(by_reason: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """``(counts by reason code, counts of the hinted reasons)`` of reject counts keyed by full reason text."""
    codes: dict[str, int] = {}
    for reason, n in by_reason.items():
        codes[reason_code(reason)] = codes.get(reason_code(reason), 0) + n
    hints = {r: n for r, n in by_reason.items() if r != reason_code(r)}
    return dict(sorted(codes.items())), dict(sorted(hints.items()))


def validate_rows(t: pa.Table, partition_day: Optional[str], max_item_id: int, max_ts: int) -> pa.Table:
    """Fill ``reject_reason`` (where still null) with the first row-level problem found (see ROW_CHECKS).

    One flat list of checks in the order ROW_CHECKS documents (the first that fires names the row)."""
    n = t.num_rows
    code = np.zeros(n, dtype=np.int16)
    labels: list[str] = []

    def flag(mask: np.ndarray, label: str) -> None:
        if mask.any():
            labels.append(label)
            code[(code == 0) & mask] = len(labels)

    def ints(c: str) -> tuple[np.ndarray, np.ndarray]:
        a = t.column(c)
        return pc.fill_null(a, 0).to_numpy(), a.is_null().to_numpy()

    def floats(c: str) -> tuple[np.ndarray, np.ndarray]:
        a = t.column(c)
        return pc.fill_null(a, 0.0).to_numpy().astype(np.float64), a.is_null().to_numpy()

    for c in REQUIRED_COLUMNS:
        flag(t.column(c).is_null().to_numpy(), f"null_{c}")
    int_ids = id_type_of(t.schema) == "int"  # string ids: empty / too long was refused by the readers
    user, _ = ints("user_id") if int_ids else (np.zeros(n, np.int64), None)
    item, _ = ints("item_id") if int_ids else (np.zeros(n, np.int64), None)
    ts, _ = ints("ts")
    flag(user < 0, "negative_user_id")
    flag(item < 0, "negative_item_id")
    flag(ts < 0, "negative_ts")
    flag(item > max_item_id, "item_id_out_of_range")
    for per_second, unit in TS_UNITS:  # the likeliest mistake first: say so in the reason
        scaled = ts // per_second
        flag((ts > max_ts) & (scaled >= MIN_PLAUSIBLE_TS) & (scaled <= max_ts),
             f"ts_out_of_range{HINT_SEPARATOR}looks like {unit}")
    flag(ts > max_ts, "ts_out_of_range")
    if partition_day:
        d = dt.date.fromisoformat(partition_day)
        start = int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc).timestamp())
        flag((ts < start) | (ts >= start + 86_400), "ts_outside_partition")
    click, click_null = ints("click")
    flag(~click_null & (click != 0) & (click != 1), "click_out_of_range")
    with np.errstate(invalid="ignore"):
        wr, wr_null = floats("watch_ratio")
        flag(~wr_null & np.isnan(wr), "nan_watch_ratio")
        flag(~wr_null & ~np.isnan(wr) & ((wr < 0) | (wr > 1)), "watch_ratio_out_of_range")
        dw, dw_null = floats("dwell_s")
        flag(~dw_null & np.isnan(dw), "nan_dwell_s")
        flag(~dw_null & (dw < 0), "negative_dwell_s")
        flag(~dw_null & np.isposinf(dw), "dwell_s_out_of_range")
        for c in ("session_id", "slate_id"):
            v, null = ints(c)
            flag(~null & (v < 0), f"negative_{c}")
        for c in ("eval_rating", "eval_true_satisfaction"):
            v, null = floats(c)
            flag(~null & np.isnan(v), f"nan_{c}")
            flag(~null & np.isinf(v), f"{c}_out_of_range")
        r, r_null = floats("eval_rating")
        flag(~r_null & (r < 0), "negative_eval_rating")
        for c in ("eval_purchase", "eval_like", "eval_long_view"):
            v, null = ints(c)
            flag(~null & (v != 0) & (v != 1), f"{c}_out_of_range")
    if not labels:
        return t
    new = pa.DictionaryArray.from_arrays(pa.array(code.astype(np.int32) - 1, mask=code == 0),
                                         pa.array(labels)).cast(pa.string())
    i = t.schema.get_field_index(REASON_COLUMN)
    return t.set_column(i, REASON_COLUMN, pc.coalesce(t.column(REASON_COLUMN), new))


def read_units(batch: pa.Table, *, fs, files: list[InputFile], fmt: str, column_map: dict, delimiter: str,
               max_item_id: int, max_ts: int, id_type: str = "int") -> Iterator[pa.Table]:
    """Ray Data UDF: each input row is one work unit (file, row groups); yields validated row batches."""
    for unit in batch.to_pylist():
        f = files[unit["file"]]
        row = unit["row_offset"]
        groups = unit["row_groups"] or None
        for t in rd.iter_file(fs, f, fmt, column_map, delimiter, row_groups=groups, id_type=id_type):
            t = validate_rows(t, f.partition_day, max_item_id, max_ts)
            order = (np.int64(unit["file"]) << FILE_BITS) + row + np.arange(t.num_rows, dtype=np.int64)
            row += t.num_rows
            yield t.append_column(ORDER_COLUMN, pa.array(order))


def work_units(fs, files: list[InputFile], fmt: str, column_map: dict, delimiter: str,
               say: Callable[[str], None], rows_per_unit: int = 1_000_000) -> tuple[list[dict], int]:
    """Check every file up front (clear errors naming it) and cut Parquet files into row-group units."""
    units, known_rows = [], 0
    for i, f in enumerate(files):
        groups = rd.check_input_file(fs, f, fmt, column_map, delimiter)
        if groups is None:
            units.append(dict(file=i, row_groups=[], row_offset=0))
            continue
        known_rows += sum(groups)
        start, acc, offset = 0, 0, 0
        for g, rows in enumerate(groups):
            acc += rows
            if acc >= rows_per_unit or g == len(groups) - 1:
                units.append(dict(file=i, row_groups=list(range(start, g + 1)), row_offset=offset))
                offset += acc
                start, acc = g + 1, 0
    if fmt == "parquet" and known_rows == 0:
        names = ", ".join(f.display for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise InputError(f"input is empty: {len(files)} Parquet file(s) with 0 rows: {names}")
    say(f"[prepare] {len(files)} input file(s), {sum(f.size for f in files):,} bytes, {len(units)} read unit(s)")
    return units, known_rows


def validate_local(cfg: PrepareConfig, input: Optional[str] = None) -> pa.Table:
    """Stage 1 (read + row-level validation) in this process, without Ray.

    The same work units and the same UDF as the first operator of prepare, so what it accepts and
    rejects is what prepare accepts and rejects before the per-user checks; tests and the fuzzing suite
    use it to check the readers in milliseconds instead of starting a cluster.
    """
    fs, files = rd.list_input_files(input or cfg.input, cfg.format)
    units, _ = work_units(fs, files, cfg.format, cfg.column_map, cfg.delimiter, lambda m: None)
    tables = list(read_units(pa.Table.from_pylist(units), fs=fs, files=files, fmt=cfg.format,
                             column_map=cfg.column_map, delimiter=cfg.delimiter, max_item_id=cfg.max_item_id,
                             max_ts=cfg.max_ts, id_type=cfg.id_type))
    if not tables:
        return rd.parsed_schema(cfg.id_type).append(pa.field(ORDER_COLUMN, pa.int64())).empty_table()
    return pa.concat_tables(tables)


def to_rejects(batch: pa.Table, *, sources: list[str], keys=None) -> pa.Table:
    """Ray Data UDF: the refused rows of ``batch`` as the ``rejects/`` table (values, reason, file, raw text).

    ``keys``: the run's :class:`mtrec_dist.data.ids.IdKeys` when ``batch`` holds string ids as keys (rows
    refused by the per-user stage), so that the rejects show the ids as written."""
    t = batch.filter(pc.is_valid(batch.column(REASON_COLUMN)))
    if keys is not None:
        t = restore_ids(t, keys=keys)
    schema = reject_schema(id_type_of(t.schema))
    file_idx = (t.column(ORDER_COLUMN).to_numpy() >> FILE_BITS) if t.num_rows else np.zeros(0, np.int64)
    src = pa.array(np.asarray(sources, dtype=object)[file_idx] if t.num_rows else [], pa.string())
    raw = t.column(RAW_LINE_COLUMN) if RAW_LINE_COLUMN in t.column_names else pa.nulls(t.num_rows, pa.string())
    cols = [t.column(f.name) for f in list(schema)[:-3]] + [t.column(REASON_COLUMN), src, raw]
    return pa.Table.from_arrays(cols, schema=schema)
