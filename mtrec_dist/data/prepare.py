"""`mtrec prepare` on Ray Data: raw event logs -> validated, sessionized, windowed transitions.

Stages (each a Ray Data operator; the data never passes through the driver):

1. **read + validate** -- one task per input file (per group of row groups for big Parquet files)
   parses rows with :mod:`mtrec_dist.data.readers` and flags row-level problems in ``reject_reason``
   (see :data:`ROW_CHECKS`).  Every row gets ``_order`` = (file index, row in file), its position in the
   input, so "first" and "file order" are well defined after any shuffle.
2. **per-user stage** -- rows hash-partitioned by ``user_id`` (one user's rows land in one block) and
   processed one block at a time, vectorised over the block's users: ``duplicate_event`` (same user,
   item, ts; the first in input order is kept), ``ts_out_of_order`` (ts earlier than an earlier-in-file
   event of the same user and session_id), then sessionization and windowing of the engaged events.
3. **vocabularies** -- of the accepted rows (per-block id counts merged in the driver): items get
   indices ``1..num_items`` (0 is padding), users ``0..num_users-1``, both in raw-id order.  With an
   existing vocab the old indices are kept and unseen ids are appended (daily retraining never crashes
   on a new id).
4. **write** -- ``transitions/`` (exactly ``TRANSITION_COLUMNS``), ``eval/`` (the only home of the
   ``eval_*`` signals, keyed by ``row_id``), ``rejects/`` (original columns + ``reject_reason`` +
   ``source_file`` + ``raw_line``), ``vocab/items.parquet`` and ``vocab/users.parquet`` (``raw_id,
   idx, count``) and ``manifest.json``.

Engaged events: rows with ``click == 1`` or ``click`` null (logs that record only consumption) become
actions; rows with ``click == 0`` are valid (counted in ``rows_ok``) but are not transitions.

Sessions are cut between consecutive engaged events of a user when the gap exceeds ``session_gap_s``
or when both carry a ``session_id`` and it changes; ``done = 1`` on a session's last transition and on
the user's last.  The state is the user's last ``state_len`` engaged items across sessions, left-padded
with 0; ``state_feedback`` is their watch ratio (1.0 where the source has none, 0 for padding).
``pos_from_end`` counts back from the user's last transition (0 = last).  ``row_id`` is unique over the
dataset (a per-user base offset plus the position in the user's sequence).

Row accounting is checked in code: ``rows_in == rows_ok + rows_rejected`` or :class:`AccountingError`.

Daily retraining (:mod:`mtrec_dist.retrain`) prepares one day at a time: ``carry_in`` starts each user's
states from the last ``state_len`` items carried over from earlier days (``carry/users.parquet``, raw
ids), ``carry_out`` writes the updated carry-over, and ``row_id_offset`` shifts the row ids past the
previous days' (manifest ``row_id_offset`` / ``next_row_id``).  ``pos_from_end`` and ``done`` stay
per input: a user's last transition of the day is ``done = 1`` and that day's test row.
"""
from __future__ import annotations

import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mtrec_dist.config import PrepareConfig
from mtrec_dist.data import readers as rd
from mtrec_dist.data.readers import (RAW_LINE_COLUMN, REASON_COLUMN, REJECT_SCHEMA, InputError,
                                     InputFile, join_path, resolve_filesystem)
from mtrec_dist.data.schema import (EVENT_SCHEMA, EVAL_COLUMNS, REQUIRED_COLUMNS, SCHEMA_VERSION,
                                    TRANSITION_COLUMNS)

TRANSITIONS_DIR, EVAL_DIR, REJECTS_DIR, VOCAB_DIR, MANIFEST_FILE = (
    "transitions", "eval", "rejects", "vocab", "manifest.json")
ORDER_COLUMN = "_order"
FILE_BITS = 40  # _order = file_index << 40 | row_in_file  (2^40 rows per file, 2^23 files)

TRANSITION_SCHEMA = pa.schema([
    pa.field("row_id", pa.int64(), nullable=False),
    pa.field("user_idx", pa.int64(), nullable=False),
    pa.field("state_items", pa.list_(pa.int64())),
    pa.field("state_feedback", pa.list_(pa.float32())),
    pa.field("action", pa.int64(), nullable=False),
    pa.field("action_feedback", pa.float32()),
    pa.field("next_state_items", pa.list_(pa.int64())),
    pa.field("next_state_feedback", pa.list_(pa.float32())),
    pa.field("done", pa.int8()),
    pa.field("ts", pa.int64()),
    pa.field("pos_from_end", pa.int32()),
])
assert TRANSITION_SCHEMA.names == TRANSITION_COLUMNS
EVAL_SCHEMA = pa.schema([pa.field("row_id", pa.int64()), pa.field("user_idx", pa.int64()),
                         pa.field("pos_from_end", pa.int32()), pa.field("action", pa.int64())]
                        + [EVENT_SCHEMA.field(c) for c in EVAL_COLUMNS])
VOCAB_SCHEMA = pa.schema([pa.field("raw_id", pa.int64(), nullable=False), pa.field("idx", pa.int64(), nullable=False),
                          pa.field("count", pa.int64())])

ROW_CHECKS = (
    "null_<col> (required column)", "negative_user_id / negative_item_id / negative_ts",
    "item_id_out_of_range (> max_item_id)",
    "ts_out_of_range (> max_ts; 'ts_out_of_range: looks like milliseconds' where ts / 1000 would fit)",
    "ts_outside_partition (ts not inside the day of a day=YYYY-MM-DD partition)",
    "click_out_of_range (not 0/1)", "nan_watch_ratio / watch_ratio_out_of_range (outside [0, 1])",
    "nan_dwell_s / negative_dwell_s / dwell_s_out_of_range (inf)", "negative_session_id / negative_slate_id",
    "nan_<eval col> / negative_eval_rating / <eval col>_out_of_range",
)
USER_CHECKS = ("duplicate_event", "ts_out_of_order")
# A reason is a machine-readable code, optionally followed by ": " and a hint for the reader
# ("ts_out_of_range: looks like milliseconds"); the manifest counts codes (rejects_by_reason) and
# hinted reasons (reject_hints) separately.
HINT_SEPARATOR = rd.HINT_SEPARATOR
# ts in a finer unit than seconds: (units per second, name); a hint is given when the value divided
# by the unit lands between MIN_PLAUSIBLE_TS (1973-03-03) and max_ts.
TS_UNITS = ((1_000, "milliseconds"), (1_000_000, "microseconds"), (1_000_000_000, "nanoseconds"))
MIN_PLAUSIBLE_TS = 100_000_000


def reason_code(reason: str) -> str:
    """The code of a reject reason, without its hint (``ts_out_of_range: looks like ms`` -> ``ts_out_of_range``)."""
    return reason.split(HINT_SEPARATOR, 1)[0]


class AccountingError(RuntimeError):
    """rows_in != rows_ok + rows_rejected, or a user's rows were split across blocks: a bug, never data."""


class EmptyDatasetError(InputError):
    """The input held rows but none survived validation (the rejects and manifest are still written)."""


# ---- vocabularies ------------------------------------------------------------------------------------
@dataclass
class Vocab:
    """Raw id <-> index maps.  ``item_raw[k]`` has index ``k + 1`` (0 = padding); ``user_raw[k]`` index k."""

    item_raw: np.ndarray
    user_raw: np.ndarray
    item_count: np.ndarray
    user_count: np.ndarray

    def __post_init__(self):
        self._item_order = np.argsort(self.item_raw, kind="stable")
        self._user_order = np.argsort(self.user_raw, kind="stable")
        for name, raw in (("item", self.item_raw), ("user", self.user_raw)):
            srt = np.sort(raw)
            if srt.size > 1 and (srt[1:] == srt[:-1]).any():
                raise ValueError(f"vocab: duplicate {name} raw ids")

    @property
    def num_items(self) -> int:
        return int(self.item_raw.size)

    @property
    def num_users(self) -> int:
        return int(self.user_raw.size)

    @staticmethod
    def _lookup(raw_sorted_order: np.ndarray, raw: np.ndarray, ids: np.ndarray, base: int,
                unknown: int) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if raw.size == 0:
            return np.full(ids.shape, unknown, dtype=np.int64)
        sorted_raw = raw[raw_sorted_order]
        pos = np.clip(np.searchsorted(sorted_raw, ids), 0, raw.size - 1)
        found = sorted_raw[pos] == ids
        return np.where(found, raw_sorted_order[pos] + base, unknown).astype(np.int64)

    def item_index(self, raw_ids, unknown: int = 0) -> np.ndarray:
        """Item indices (1-based) of raw ids; ``unknown`` (default 0 = padding) for ids not in the vocab."""
        return self._lookup(self._item_order, self.item_raw, raw_ids, 1, unknown)

    def user_index(self, raw_ids, unknown: int = -1) -> np.ndarray:
        return self._lookup(self._user_order, self.user_raw, raw_ids, 0, unknown)

    def item_raw_id(self, idx) -> np.ndarray:
        """Raw ids of item indices (index 0, the padding, maps to -1)."""
        idx = np.asarray(idx, dtype=np.int64)
        return np.where(idx > 0, self.item_raw[np.clip(idx - 1, 0, max(self.num_items - 1, 0))], -1)

    def tables(self) -> tuple[pa.Table, pa.Table]:
        items = pa.Table.from_arrays([pa.array(self.item_raw), pa.array(np.arange(1, self.num_items + 1)),
                                      pa.array(self.item_count)], schema=VOCAB_SCHEMA)
        users = pa.Table.from_arrays([pa.array(self.user_raw), pa.array(np.arange(self.num_users)),
                                      pa.array(self.user_count)], schema=VOCAB_SCHEMA)
        return items, users

    def save(self, uri: str) -> None:
        fs, root = resolve_filesystem(uri)
        fs.create_dir(root, recursive=True)
        items, users = self.tables()
        for name, t in (("items.parquet", items), ("users.parquet", users)):
            with fs.open_output_stream(join_path(root, name)) as f:
                pq.write_table(t, f)


def extend_vocab(vocab: Optional[Vocab], item_ids, user_ids, item_counts=None, user_counts=None) -> Vocab:
    """A vocab holding every id of ``vocab`` at its old index plus the new ids appended in raw-id order.

    Counts of the result are those of this data (``item_counts`` aligned with ``item_ids``), 0 for
    ids only in the old vocab.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    user_ids = np.asarray(user_ids, dtype=np.int64)
    item_counts = np.ones(item_ids.size, np.int64) if item_counts is None else np.asarray(item_counts, np.int64)
    user_counts = np.ones(user_ids.size, np.int64) if user_counts is None else np.asarray(user_counts, np.int64)
    old_items = vocab.item_raw if vocab is not None else np.zeros(0, np.int64)
    old_users = vocab.user_raw if vocab is not None else np.zeros(0, np.int64)
    new_items = np.setdiff1d(item_ids, old_items)  # sorted, unique
    new_users = np.setdiff1d(user_ids, old_users)
    item_raw = np.concatenate([old_items, new_items])
    user_raw = np.concatenate([old_users, new_users])
    out = Vocab(item_raw, user_raw, np.zeros(item_raw.size, np.int64), np.zeros(user_raw.size, np.int64))
    np.add.at(out.item_count, out.item_index(item_ids) - 1, item_counts)
    np.add.at(out.user_count, out.user_index(user_ids), user_counts)
    return out


def load_vocab(path: str) -> Vocab:
    """Load ``<path>/items.parquet`` and ``<path>/users.parquet`` (``path`` = a vocab dir or a dataset dir)."""
    fs, root = resolve_filesystem(path)
    if fs.get_file_info(join_path(root, VOCAB_DIR, "items.parquet")).type == pafs.FileType.File:
        root = join_path(root, VOCAB_DIR)
    tables = {}
    for name in ("items", "users"):
        p = join_path(root, f"{name}.parquet")
        try:
            with fs.open_input_file(p) as f:
                tables[name] = pq.read_table(f)
        except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
            raise InputError(f"vocab: cannot read {rd.display_path(fs, p)} ({e})") from e
        missing = [c for c in ("raw_id", "idx") if c not in tables[name].column_names]
        if missing:
            raise InputError(f"vocab: {rd.display_path(fs, p)} lacks column(s) {missing}")
    it = tables["items"].sort_by("idx")
    us = tables["users"].sort_by("idx")
    if not np.array_equal(it.column("idx").to_numpy(), np.arange(1, it.num_rows + 1)):
        raise InputError(f"vocab: item indices in {path} are not 1..{it.num_rows}")
    if not np.array_equal(us.column("idx").to_numpy(), np.arange(us.num_rows)):
        raise InputError(f"vocab: user indices in {path} are not 0..{us.num_rows - 1}")
    cnt = lambda t: (t.column("count").to_numpy() if "count" in t.column_names  # noqa: E731
                     else np.zeros(t.num_rows, np.int64))
    return Vocab(it.column("raw_id").to_numpy().astype(np.int64), us.column("raw_id").to_numpy().astype(np.int64),
                 cnt(it), cnt(us))


def load_manifest(path: str) -> dict:
    """The manifest of a prepared dataset (``path`` = the dataset dir or its manifest.json)."""
    fs, root = resolve_filesystem(path)
    p = root if root.endswith(".json") else join_path(root, MANIFEST_FILE)
    try:
        with fs.open_input_stream(p) as f:
            manifest = json.loads(f.read().decode())
    except (FileNotFoundError, OSError) as e:
        raise InputError(f"no prepared dataset at {path}: cannot read {rd.display_path(fs, p)} ({e})") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{rd.display_path(fs, p)} is not valid JSON ({e})") from e
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"{rd.display_path(fs, p)}: schema_version {manifest.get('schema_version')!r}, "
                         f"this code reads {SCHEMA_VERSION}; re-run `mtrec prepare`")
    return manifest


# ---- carry-over between daily inputs (daily retraining) ---------------------------------------------
CARRY_FILE = "users.parquet"
CARRY_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False),  # raw user id
    pa.field("state_raw", pa.list_(pa.int64())),  # the user's last state_len engaged items (raw ids), -1 = padding
    pa.field("state_feedback", pa.list_(pa.float32())),  # their feedback (0 on padding)
    pa.field("last_ts", pa.int64()),  # ts of the user's last engaged event
])


def load_carry(path: str, state_len: int) -> pa.Table:
    """The carry-over table under ``path`` (a dir holding ``users.parquet``, or the file), sorted by user."""
    fs, root = resolve_filesystem(path)
    p = root if root.endswith(".parquet") else join_path(root, CARRY_FILE)
    try:
        with fs.open_input_file(p) as f:
            t = pq.read_table(f)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
        raise InputError(f"carry-over: cannot read {rd.display_path(fs, p)} ({e})") from e
    missing = [c for c in CARRY_SCHEMA.names if c not in t.column_names]
    if missing:
        raise InputError(f"carry-over {rd.display_path(fs, p)} lacks column(s) {missing}")
    t = t.select(CARRY_SCHEMA.names).cast(CARRY_SCHEMA).sort_by("user_id")
    lens = pc.list_value_length(t.column("state_raw")).to_numpy(zero_copy_only=False)
    if t.num_rows and not (lens == state_len).all():
        raise InputError(f"carry-over {rd.display_path(fs, p)} holds states of length {sorted(set(lens.tolist()))}, "
                         f"prepare.state_len is {state_len}")
    return t


def _carry_arrays(t: pa.Table, state_len: int) -> tuple:
    """(sorted raw user ids, items [n, L], feedback [n, L]) of a carry table (what annotate_users reads)."""
    n = t.num_rows
    items = pc.list_flatten(t.column("state_raw")).to_numpy().reshape(n, state_len)
    fb = pc.list_flatten(t.column("state_feedback")).to_numpy().astype(np.float32).reshape(n, state_len)
    return t.column("user_id").to_numpy(), items, fb


def update_carry(previous: Optional[pa.Table], prepared_dir: str, vocab: "Vocab", state_len: int) -> pa.Table:
    """Carry-over after a prepared dataset: each user's last transition's next state (in raw ids), plus the
    carried users of ``previous`` that this data did not see (unchanged)."""
    import pyarrow.dataset as pads

    fs, root = resolve_filesystem(prepared_dir)
    tdir = join_path(root, TRANSITIONS_DIR)
    if fs.get_file_info(tdir).type == pafs.FileType.Directory:
        last = pads.dataset(tdir, filesystem=fs, format="parquet").to_table(
            columns=["user_idx", "next_state_items", "next_state_feedback", "ts"],
            filter=pc.field("pos_from_end") == 0)
    else:
        last = pa.table({"user_idx": pa.array([], pa.int64()), "next_state_items": pa.array([], pa.list_(pa.int64())),
                         "next_state_feedback": pa.array([], pa.list_(pa.float32())), "ts": pa.array([], pa.int64())})
    n = last.num_rows
    idx = pc.list_flatten(last.column("next_state_items")).to_numpy().reshape(n, state_len)
    raw = np.where(idx > 0, vocab.item_raw_id(idx), PAD_RAW).astype(np.int64)
    users = vocab.user_raw[last.column("user_idx").to_numpy()]
    today = pa.Table.from_arrays(
        [pa.array(users, pa.int64()), _lists(raw, state_len, pa.int64()),
         last.column("next_state_feedback").combine_chunks().cast(pa.list_(pa.float32())),
         last.column("ts").combine_chunks()], schema=CARRY_SCHEMA)
    if np.unique(users).size != n:
        raise AccountingError("a user has more than one last transition (pos_from_end == 0)")
    if previous is not None and previous.num_rows:
        keep = pc.invert(pc.is_in(previous.column("user_id"), value_set=pa.array(users, pa.int64())))
        today = pa.concat_tables([previous.filter(keep).cast(CARRY_SCHEMA), today])
    return today.sort_by("user_id")


def save_carry(t: pa.Table, path: str) -> None:
    fs, root = resolve_filesystem(path)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(join_path(root, CARRY_FILE)) as f:
        pq.write_table(t.cast(CARRY_SCHEMA), f)


# ---- stage 1: read + row-level validation ------------------------------------------------------------
def validate_rows(t: pa.Table, partition_day: Optional[str], max_item_id: int, max_ts: int) -> pa.Table:
    """Fill ``reject_reason`` (where still null) with the first row-level problem found (see ROW_CHECKS)."""
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
    user, _ = ints("user_id")
    item, _ = ints("item_id")
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


def _read_units(batch: pa.Table, *, fs, files: list[InputFile], fmt: str, column_map: dict, delimiter: str,
                max_item_id: int, max_ts: int) -> Iterator[pa.Table]:
    """Ray Data UDF: each input row is one work unit (file, row groups); yields validated row batches."""
    for unit in batch.to_pylist():
        f = files[unit["file"]]
        row = unit["row_offset"]
        groups = unit["row_groups"] or None
        for t in rd.iter_file(fs, f, fmt, column_map, delimiter, row_groups=groups):
            t = validate_rows(t, f.partition_day, max_item_id, max_ts)
            order = (np.int64(unit["file"]) << FILE_BITS) + row + np.arange(t.num_rows, dtype=np.int64)
            row += t.num_rows
            yield t.append_column(ORDER_COLUMN, pa.array(order))


def count_reasons(by_reason: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """``(counts by reason code, counts of the hinted reasons)`` of reject counts keyed by full reason text."""
    codes: dict[str, int] = {}
    for reason, n in by_reason.items():
        codes[reason_code(reason)] = codes.get(reason_code(reason), 0) + n
    hints = {r: n for r, n in by_reason.items() if r != reason_code(r)}
    return dict(sorted(codes.items())), dict(sorted(hints.items()))


def validate_local(cfg: PrepareConfig, input: Optional[str] = None) -> pa.Table:
    """Stage 1 (read + row-level validation) in this process, without Ray.

    The same work units and the same UDF as the first operator of :func:`prepare_dataset`, so what it
    accepts and rejects is what prepare accepts and rejects before the per-user checks; tests and the
    fuzzing suite use it to check the readers in milliseconds instead of starting a cluster.
    """
    fs, files = rd.list_input_files(input or cfg.input, cfg.format)
    units, _ = _work_units(fs, files, cfg.format, cfg.column_map, cfg.delimiter, lambda m: None)
    tables = list(_read_units(pa.Table.from_pylist(units), fs=fs, files=files, fmt=cfg.format,
                              column_map=cfg.column_map, delimiter=cfg.delimiter, max_item_id=cfg.max_item_id,
                              max_ts=cfg.max_ts))
    if not tables:
        return rd.PARSED_SCHEMA.append(pa.field(ORDER_COLUMN, pa.int64())).empty_table()
    return pa.concat_tables(tables)


def _work_units(fs, files: list[InputFile], fmt: str, column_map: dict, delimiter: str,
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


# ---- stage 2: per-user checks, sessions and windows; stage 4: indexing for the writes -------------------
def _segment_starts(*keys: np.ndarray) -> np.ndarray:
    """Bool mask: row k starts a new run of equal keys (keys already sorted)."""
    n = keys[0].size
    start = np.ones(n, dtype=bool)
    if n > 1:
        same = np.ones(n - 1, dtype=bool)
        for k in keys:
            same &= k[1:] == k[:-1]
        start[1:] = ~same
    return start


def _lists(flat: np.ndarray, width: int, typ: pa.DataType) -> pa.Array:
    n = flat.shape[0]
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1), typ))


PAD_RAW = -1  # padding in raw-id state lists (raw ids are >= 0); becomes index 0


def _get(ref):
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def annotate_users(block: pa.Table, *, state_len: int, session_gap_s: int, row_base, carry=None) -> pa.Table:
    """Ray Data UDF over a block holding whole users: per-user rejects, sessions and state windows.

    Returns one row per input row: the event columns, ``reject_reason`` (``duplicate_event`` /
    ``ts_out_of_order`` or null), and for engaged rows the transition fields (``_is_transition`` = 1)
    in *raw* ids (``state_raw`` padded with -1); :func:`index_transitions` maps them to indices once the
    vocab of the accepted rows is known.  ``row_base`` = (sorted raw user ids, first row_id of each).
    ``carry`` (daily retraining) = (sorted raw user ids, their last ``state_len`` items in raw ids [n, L]
    padded with -1, the items' feedback [n, L]): a carried user's first states start from those items
    instead of padding (see :func:`load_carry`); ``None`` = every user starts empty.
    """
    user_sorted_raw, user_row_base = _get(row_base)
    n, L = block.num_rows, state_len
    u = block.column("user_id").to_numpy()
    it = block.column("item_id").to_numpy()
    ts = block.column("ts").to_numpy()
    order = block.column(ORDER_COLUMN).to_numpy()
    click = pc.fill_null(block.column("click"), 1).to_numpy()  # null click = engaged
    sid_null = block.column("session_id").is_null().to_numpy()
    sid = pc.fill_null(block.column("session_id"), -1).to_numpy()
    wr = block.column("watch_ratio").to_numpy(zero_copy_only=False).astype(np.float32)  # null -> NaN
    reason = np.full(n, None, dtype=object)

    # duplicate_event: same (user, item, ts); the first in input order stays.
    p = np.lexsort((order, ts, it, u))
    dup = np.zeros(n, dtype=bool)
    dup[p] = ~_segment_starts(u[p], it[p], ts[p])
    reason[dup] = "duplicate_event"
    # ts_out_of_order: earlier than an earlier-in-file event of the same (user, session_id).
    cand = np.flatnonzero(~sid_null & ~dup)
    if cand.size:
        q = cand[np.lexsort((order[cand], sid[cand], u[cand]))]
        seg = np.cumsum(_segment_starts(u[q], sid[q])) - 1
        big = np.int64(1) << 36  # ts < 2^33 (max_ts); segment ids stay below 2^26 per block
        running = np.maximum.accumulate(ts[q] + seg * big) - seg * big  # cummax within each segment
        prev_max = np.concatenate([[np.iinfo(np.int64).min], running[:-1]])
        prev_max[_segment_starts(u[q], sid[q])] = np.iinfo(np.int64).min
        ooo = ts[q] < prev_max
        reason[q[ooo]] = "ts_out_of_order"
    ok = np.equal(reason, None)
    engaged = ok & (click == 1)

    # timeline of engaged events per user
    e = np.flatnonzero(engaged)
    e = e[np.lexsort((order[e], ts[e], u[e]))]
    m = e.size
    eu, ets = u[e], ts[e]
    new_user = _segment_starts(eu)
    user_first = np.maximum.accumulate(np.where(new_user, np.arange(m), 0)) if m else np.zeros(0, np.int64)
    k = np.arange(m) - user_first
    last_of_user = np.ones(m, dtype=bool)
    last_of_user[:-1] = new_user[1:]
    gap_cut = np.ones(m, dtype=bool)
    if m > 1:
        esid, esnull = sid[e], sid_null[e]
        sid_change = ~esnull[1:] & ~esnull[:-1] & (esid[1:] != esid[:-1])
        gap_cut[:-1] = (ets[1:] - ets[:-1] > session_gap_s) | sid_change
    done = (last_of_user | gap_cut).astype(np.int8)
    user_len = np.bincount(np.cumsum(new_user) - 1, minlength=int(new_user.sum())) if m else np.zeros(0, np.int64)
    pos_from_end = (user_len[np.cumsum(new_user) - 1] - 1 - k).astype(np.int32) if m else np.zeros(0, np.int32)

    action = it[e]
    fb = np.where(np.isnan(wr[e]), np.float32(1.0), wr[e]).astype(np.float32)
    state = np.full((m, L), PAD_RAW, dtype=np.int64)
    state_fb = np.zeros((m, L), dtype=np.float32)
    for j in range(1, L + 1):
        src = np.flatnonzero(k >= j)
        state[src, L - j] = action[src - j]
        state_fb[src, L - j] = fb[src - j]
    if carry is not None and m:
        # history before the first event of this input = the carried last L items: the item j steps back
        # from event k (k < j) is carried item L - (j - k)
        c_users, c_items, c_fb = _get(carry)
        if c_items.shape[1] != L:
            raise ValueError(f"carry-over state has {c_items.shape[1]} items per user, state_len is {L}")
        if c_users.size:
            pos = np.clip(np.searchsorted(c_users, eu), 0, c_users.size - 1)
            has = c_users[pos] == eu
            for j in range(1, L + 1):
                src = np.flatnonzero((k < j) & has)
                state[src, L - j] = c_items[pos[src], L - j + k[src]]
                state_fb[src, L - j] = c_fb[pos[src], L - j + k[src]]
    row_id = _find(user_sorted_raw, eu, "user", user_row_base) + k

    # one output row per input row; transition fields only on engaged rows
    pos_in_e = np.full(n, -1, dtype=np.int64)
    pos_in_e[e] = np.arange(m)
    is_tr = pos_in_e >= 0
    take = np.where(is_tr, pos_in_e, 0)

    def spread(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        if m == 0:
            return pa.nulls(n, typ)
        return pa.array(values[take], typ, mask=~is_tr)

    def spread_lists(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        full = np.full((n, L), PAD_RAW if values.dtype == np.int64 else 0, dtype=values.dtype)
        if m:
            full[is_tr] = values[take[is_tr]]
        return _lists(full, L, typ)

    first_of_user = np.zeros(n, dtype=np.int8)  # detects a user split across blocks (see prepare_dataset)
    s = np.argsort(u, kind="stable")
    first_of_user[s[_segment_starts(u[s])]] = 1
    out = block.drop_columns([c for c in (REASON_COLUMN, RAW_LINE_COLUMN) if c in block.column_names])
    extra = {
        REASON_COLUMN: pa.array(reason, pa.string()),
        "_is_transition": pa.array(is_tr.astype(np.int8)),
        "_first_of_user": pa.array(first_of_user),
        "row_id": spread(row_id, pa.int64()),
        "state_raw": spread_lists(state, pa.int64()), "state_feedback": spread_lists(state_fb, pa.float32()),
        "action_feedback": spread(fb, pa.float32()),
        "done": spread(done, pa.int8()), "pos_from_end": spread(pos_from_end, pa.int32()),
    }
    for name, arr in extra.items():
        out = out.append_column(name, arr)
    return out


def _find(sorted_raw: np.ndarray, ids: np.ndarray, what: str, values: np.ndarray) -> np.ndarray:
    """``values[k]`` where ``sorted_raw[k] == ids``; every id must be present (they come from the same rows)."""
    if ids.size == 0:
        return np.zeros(0, dtype=values.dtype)
    pos = np.clip(np.searchsorted(sorted_raw, ids), 0, max(sorted_raw.size - 1, 0))
    if sorted_raw.size == 0 or not (sorted_raw[pos] == ids).all():
        missing = ids[(sorted_raw.size == 0) | (sorted_raw[pos] != ids)][:5].tolist()
        raise AccountingError(f"{what} raw id(s) {missing} missing from the map built from the same rows")
    return values[pos]


def vocab_lookup(vocab: "Vocab") -> tuple:
    """What :func:`index_transitions` needs: raw ids in sorted order and their indices."""
    io_ = np.argsort(vocab.item_raw, kind="stable")
    uo = np.argsort(vocab.user_raw, kind="stable")
    return vocab.item_raw[io_], (io_ + 1).astype(np.int64), vocab.user_raw[uo], uo.astype(np.int64)


def index_transitions(batch: pa.Table, *, lookup, part: str = "transitions") -> pa.Table:
    """Transition rows of annotated events in indices: the ``transitions/`` table (``part`` =
    "transitions", with ``next_state = state[1:] + [action]``) or the ``eval/`` table (``part`` = "eval")."""
    item_raw, item_idx, user_raw, user_idx = _get(lookup)
    t = batch.filter(pc.equal(batch.column("_is_transition"), 1))
    n = t.num_rows
    schema = TRANSITION_SCHEMA if part == "transitions" else EVAL_SCHEMA
    if n == 0:
        return schema.empty_table()
    uidx = pa.array(_find(user_raw, t.column("user_id").to_numpy(), "user", user_idx))
    action = _find(item_raw, t.column("item_id").to_numpy(), "item", item_idx)
    if part == "eval":
        cols = {"row_id": t.column("row_id"), "user_idx": uidx, "pos_from_end": t.column("pos_from_end"),
                "action": pa.array(action)}
        return pa.Table.from_arrays([cols.get(c) if c in cols else t.column(c) for c in EVAL_SCHEMA.names],
                                    schema=EVAL_SCHEMA)
    raw_state = pc.list_flatten(t.column("state_raw")).to_numpy()
    L = raw_state.size // n
    pad = raw_state == PAD_RAW
    state = np.where(pad, 0, _find(item_raw, np.where(pad, item_raw[0], raw_state), "item", item_idx)).reshape(n, L)
    sfb = pc.list_flatten(t.column("state_feedback")).to_numpy().reshape(n, L)
    afb = t.column("action_feedback").to_numpy()
    nxt = np.concatenate([state[:, 1:], action[:, None]], 1)
    nfb = np.concatenate([sfb[:, 1:], afb[:, None]], 1)
    cols = {
        "row_id": t.column("row_id"), "user_idx": uidx,
        "state_items": _lists(state, L, pa.int64()), "state_feedback": t.column("state_feedback"),
        "action": pa.array(action), "action_feedback": t.column("action_feedback"),
        "next_state_items": _lists(nxt, L, pa.int64()), "next_state_feedback": _lists(nfb, L, pa.float32()),
        "done": t.column("done"), "ts": t.column("ts"), "pos_from_end": t.column("pos_from_end"),
    }
    return pa.Table.from_arrays([cols[c] for c in TRANSITION_COLUMNS], schema=TRANSITION_SCHEMA)


def to_rejects(batch: pa.Table, *, sources: list[str]) -> pa.Table:
    t = batch.filter(pc.is_valid(batch.column(REASON_COLUMN)))
    file_idx = (t.column(ORDER_COLUMN).to_numpy() >> FILE_BITS) if t.num_rows else np.zeros(0, np.int64)
    src = pa.array(np.asarray(sources, dtype=object)[file_idx] if t.num_rows else [], pa.string())
    raw = t.column(RAW_LINE_COLUMN) if RAW_LINE_COLUMN in t.column_names else pa.nulls(t.num_rows, pa.string())
    cols = [t.column(f.name) for f in EVENT_SCHEMA] + [t.column(REASON_COLUMN), src, raw]
    return pa.Table.from_arrays(cols, schema=REJECT_SCHEMA)


# ---- per-block statistics (map on the cluster, merge in the driver) ----------------------------------
def _id_counts(t: pa.Table, kinds=(("item", "item_id"), ("user", "user_id"))) -> list[pa.Table]:
    ok = t.filter(pc.is_null(t.column(REASON_COLUMN)))
    parts = []
    for kind, c in kinds:
        g = ok.group_by(c).aggregate([([], "count_all")])
        parts.append(pa.table({"kind": pa.array([kind] * g.num_rows, pa.string()), "id": g.column(c),
                               "reason": pa.nulls(g.num_rows, pa.string()), "count": g.column("count_all")}))
    return parts


def _staged_stats(t: pa.Table) -> pa.Table:
    """Per block of validated rows: rows per user (for row_id offsets) and counts of each reject reason."""
    return pa.concat_tables(_id_counts(t, (("user", "user_id"),)) + [_reason_counts(t)])


def _annotated_stats(t: pa.Table) -> pa.Table:
    """Per block after the per-user stage: id counts of accepted rows (the vocab) and reject reasons."""
    return pa.concat_tables(_id_counts(t) + [_reason_counts(t)])


def _reason_counts(t: pa.Table) -> pa.Table:
    g = t.group_by(REASON_COLUMN).aggregate([([], "count_all")])
    g = g.filter(pc.is_valid(g.column(REASON_COLUMN)))
    extra = {}
    if "_first_of_user" in t.column_names:
        extra = {"first_of_user": int(pc.sum(t.column("_first_of_user")).as_py() or 0),
                 "transitions": int(pc.sum(t.column("_is_transition")).as_py() or 0)}
    rows = pa.table({"kind": pa.array(["reason"] * g.num_rows, pa.string()),
                     "id": pa.nulls(g.num_rows, pa.int64()), "reason": g.column(REASON_COLUMN),
                     "count": g.column("count_all")})
    meta = pa.table({"kind": pa.array(["rows"] + list(extra), pa.string()),
                     "id": pa.nulls(1 + len(extra), pa.int64()), "reason": pa.nulls(1 + len(extra), pa.string()),
                     "count": pa.array([t.num_rows] + list(extra.values()), pa.int64())})
    return pa.concat_tables([rows, meta])


def _collect(ds, fn) -> pa.Table:
    import ray

    refs = ds.map_batches(fn, batch_size=None, batch_format="pyarrow").to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    if not tables:
        return pa.table({"kind": pa.array([], pa.string()), "id": pa.array([], pa.int64()),
                         "reason": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    return pa.concat_tables(tables)


def _sum_by(stats: pa.Table, kind: str, key: str) -> pa.Table:
    t = stats.filter(pc.equal(stats.column("kind"), kind))
    return t.group_by(key).aggregate([("count", "sum")]).sort_by(key)


def _total(stats: pa.Table, kind: str) -> int:
    t = stats.filter(pc.equal(stats.column("kind"), kind))
    return int(pc.sum(t.column("count")).as_py() or 0)


# ---- driver ---------------------------------------------------------------------------------------------
def _unwrap_input_error(e: BaseException) -> Optional[InputError]:
    """The InputError raised inside a Ray task (wrapped by Ray Core / Ray Data), if that is the cause."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError keeps the task's exception here
        if isinstance(cause, BaseException):
            e = cause
            continue
        if isinstance(e, InputError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _list_shards(fs, root: str, sub: str) -> list[dict]:
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


def _prepare_output(fs, root: str, overwrite: bool, display: str) -> None:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise InputError(f"output {display} is a file, not a directory")
    if info.type == pafs.FileType.Directory:
        ours = [join_path(root, p) for p in (TRANSITIONS_DIR, EVAL_DIR, REJECTS_DIR, VOCAB_DIR, MANIFEST_FILE)]
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


def prepare_dataset(cfg: PrepareConfig, input: Optional[str] = None, output: Optional[str] = None,
                    vocab_dir: Optional[str] = None, progress: Optional[Callable[[str], None]] = None, *,
                    carry_in: Optional[str] = None, carry_out: Optional[str] = None,
                    row_id_offset: int = 0) -> dict:
    """Run the whole prepare pipeline on Ray Data; write the dataset under ``output``; return the manifest.

    ``input``/``output``/``vocab_dir`` default to ``cfg.input``/``cfg.output``/``cfg.vocab_dir``.
    Starts (or attaches to) a Ray cluster if none is running.

    Daily retraining (:mod:`mtrec_dist.retrain`): ``carry_in`` = a carry-over dir written by an earlier
    prepare (``carry_out``) whose users' first states start from their carried last ``state_len`` items
    (needs ``vocab_dir``, the vocab those items are in); ``carry_out`` = where to write each user's last
    ``state_len`` engaged items after this input (carried users absent from it are kept as they were);
    ``row_id_offset`` is added to every ``row_id`` so that the row ids of successive inputs never collide
    (this dataset's ids lie in ``[row_id_offset, row_id_offset + rows_in)``; manifest ``next_row_id``).
    """
    import ray
    from ray.data.expressions import col

    from mtrec_dist.runtime import init_ray

    cfg.validate()
    input_uri, output_uri = input or cfg.input, output or cfg.output
    vocab_dir = vocab_dir if vocab_dir is not None else cfg.vocab_dir
    if not input_uri:
        raise InputError("prepare: no input given (--input or prepare.input)")
    if not output_uri:
        raise InputError("prepare: no output given (--out or prepare.output)")
    say = progress or ((lambda m: print(m, file=sys.stderr, flush=True)) if cfg.progress else (lambda m: None))
    t_start = time.time()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        timings[name] = round(time.time() - t0, 3)
        return time.time()

    fs_in, files = rd.list_input_files(input_uri, cfg.format)
    units, _ = _work_units(fs_in, files, cfg.format, cfg.column_map, cfg.delimiter, say)
    base_vocab = load_vocab(vocab_dir) if vocab_dir else None
    if row_id_offset < 0:
        raise ValueError(f"row_id_offset must be >= 0, got {row_id_offset}")
    carried = load_carry(carry_in, cfg.state_len) if carry_in else None
    if carried is not None and carried.num_rows:
        if base_vocab is None:
            raise InputError(f"carry-over {carry_in} needs the vocab its items are in (vocab_dir)")
        c_items = pc.list_flatten(carried.column("state_raw")).to_numpy()
        unknown = np.setdiff1d(c_items[c_items != PAD_RAW], base_vocab.item_raw)
        if unknown.size:
            raise InputError(f"carry-over {carry_in} holds item ids missing from vocab {vocab_dir}: "
                             f"{unknown[:5].tolist()}")
    fs_out, out_root = resolve_filesystem(output_uri)
    out_display = rd.display_path(fs_out, out_root)
    _prepare_output(fs_out, out_root, cfg.overwrite, out_display)

    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(cfg.progress)
    try:
        t0 = time.time()
        # 1. read + validate
        staged = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
            _read_units, batch_size=1, batch_format="pyarrow",
            fn_kwargs=dict(fs=fs_in, files=files, fmt=cfg.format, column_map=cfg.column_map,
                           delimiter=cfg.delimiter, max_item_id=cfg.max_item_id, max_ts=cfg.max_ts),
        ).materialize()
        t0 = lap("read_validate", t0)
        stats = _collect(staged, _staged_stats)
        rows_in = _total(stats, "rows")
        t0 = lap("stats", t0)
        say(f"[prepare] read + validate: {rows_in:,} rows in {timings['read_validate']:.1f}s")
        if rows_in == 0:
            raise InputError(f"input is empty: {len(files)} file(s) under {input_uri} hold no rows")

        # 2. per-user checks, sessions, windows.  A hash repartition on user_id puts each user's rows in
        # one block (the same guarantee groupby().map_groups() relies on); the UDF is vectorised over
        # all users of a block instead of being called once per user.
        users = _sum_by(stats, "user", "id")
        user_counts = users.column("count_sum").to_numpy()
        row_base = ray.put((users.column("id").to_numpy(),
                            np.concatenate([[0], np.cumsum(user_counts)[:-1]]).astype(np.int64) + row_id_offset))
        carry_ref = ray.put(_carry_arrays(carried, cfg.state_len)) if carried is not None else None
        ok = staged.filter(expr=col(REASON_COLUMN).is_null())
        rows_ok_staged = rows_in - _total(stats, "reason")
        partitions = max(1, min(cfg.max_partitions, -(-rows_ok_staged // cfg.rows_per_partition)))
        # Small inputs skip the hash shuffle: one block trivially holds each user whole.
        grouped = (ok.repartition(1) if partitions == 1
                   else ok.repartition(partitions, keys=["user_id"], sort=True))
        annotated = grouped.map_batches(
            annotate_users, batch_size=None, batch_format="pyarrow",
            fn_kwargs=dict(state_len=cfg.state_len, session_gap_s=cfg.session_gap_s, row_base=row_base,
                           **(dict(carry=carry_ref) if carry_ref is not None else {})),
        ).materialize()
        ann_stats = _collect(annotated, _annotated_stats)
        t0 = lap("sessionize", t0)
        users_seen = _total(ann_stats, "first_of_user")
        if users_seen != users.num_rows:
            raise AccountingError(f"per-user stage saw {users_seen} user blocks for {users.num_rows} users: "
                                  "a user was split across blocks")
        num_transitions = _total(ann_stats, "transitions")
        say(f"[prepare] sessionize + windows: {num_transitions:,} transitions in {timings['sessionize']:.1f}s")

        # 3. vocabularies of the accepted rows (old indices kept, unseen ids appended)
        items_ok = _sum_by(ann_stats, "item", "id")
        users_ok = _sum_by(ann_stats, "user", "id")
        vocab = extend_vocab(base_vocab, items_ok.column("id").to_numpy(), users_ok.column("id").to_numpy(),
                             items_ok.column("count_sum").to_numpy(), users_ok.column("count_sum").to_numpy())
        new_items = vocab.num_items - (base_vocab.num_items if base_vocab else 0)
        new_users = vocab.num_users - (base_vocab.num_users if base_vocab else 0)
        vocab.save(join_path(output_uri, VOCAB_DIR))
        lookup = ray.put(vocab_lookup(vocab))
        t0 = lap("vocab", t0)
        say(f"[prepare] vocab: {vocab.num_items:,} items ({new_items:,} new), "
            f"{vocab.num_users:,} users ({new_users:,} new)")

        # 4. write
        shard = dict(min_rows_per_file=cfg.rows_per_shard, max_rows_per_file=cfg.rows_per_shard)
        transitions = annotated.filter(expr=col("_is_transition") == 1)
        if num_transitions:
            for part, sub in (("transitions", TRANSITIONS_DIR), ("eval", EVAL_DIR)):
                transitions.map_batches(index_transitions, batch_size=None, batch_format="pyarrow",
                                        fn_kwargs=dict(lookup=lookup, part=part)).write_parquet(
                    join_path(out_root, sub), filesystem=fs_out, **shard)
        sources = [f.display for f in files]
        rejects = staged.filter(expr=col(REASON_COLUMN).is_not_null()).union(
            annotated.filter(expr=col(REASON_COLUMN).is_not_null()))
        rows_rejected_b = _total(ann_stats, "reason")
        if _total(stats, "reason") + rows_rejected_b:
            rejects.map_batches(to_rejects, batch_size=None, batch_format="pyarrow",
                                fn_kwargs=dict(sources=sources)).write_parquet(
                join_path(out_root, REJECTS_DIR), filesystem=fs_out, **shard)
        t0 = lap("write", t0)
    except Exception as e:
        err = _unwrap_input_error(e)
        if err is not None and err is not e:
            raise err from None  # the file and the problem, not a Ray traceback
        raise

    # accounting
    full_reasons: dict[str, int] = {}
    for s in (stats, ann_stats):
        for r in _sum_by(s, "reason", "reason").to_pylist():
            full_reasons[r["reason"]] = full_reasons.get(r["reason"], 0) + int(r["count_sum"])
    reasons, hints = count_reasons(full_reasons)
    rows_rejected = sum(reasons.values())
    rows_ok = _total(ann_stats, "rows") - rows_rejected_b
    if rows_in != rows_ok + rows_rejected:
        raise AccountingError(f"rows_in {rows_in} != rows_ok {rows_ok} + rows_rejected {rows_rejected}")
    shards = {sub: _list_shards(fs_out, out_root, sub) for sub in (TRANSITIONS_DIR, EVAL_DIR, REJECTS_DIR)}
    written = sum(s["rows"] for s in shards[TRANSITIONS_DIR])
    if written != num_transitions or sum(s["rows"] for s in shards[REJECTS_DIR]) != rows_rejected:
        raise AccountingError(f"wrote {written} transitions (expected {num_transitions}) and "
                              f"{sum(s['rows'] for s in shards[REJECTS_DIR])} rejects (expected {rows_rejected})")
    manifest = dict(
        schema_version=SCHEMA_VERSION,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        input=input_uri, format=cfg.format, column_map=cfg.column_map,
        rows_in=rows_in, rows_ok=rows_ok, rows_rejected=rows_rejected,
        rejects_by_reason=reasons, reject_hints=hints,
        rows_engaged=num_transitions, rows_not_engaged=rows_ok - num_transitions,
        num_transitions=num_transitions, num_items=vocab.num_items, num_users=vocab.num_users,
        embedding_rows=vocab.num_items + 1, state_len=cfg.state_len, session_gap_s=cfg.session_gap_s,
        shuffle_partitions=partitions,
        vocab=dict(base=vocab_dir or None, new_items=new_items, new_users=new_users,
                   items_in_data=int((vocab.item_count > 0).sum()),
                   users_in_data=int((vocab.user_count > 0).sum())),
        source_files=[dict(path=f.display, bytes=f.size, partition_day=f.partition_day) for f in files],
        shards=shards, seconds=timings, total_seconds=round(time.time() - t_start, 3),
        events_per_s=round(rows_in / max(time.time() - t_start, 1e-9), 1),
    )
    if row_id_offset or carry_in or carry_out:
        manifest.update(row_id_offset=int(row_id_offset), next_row_id=int(row_id_offset + rows_in))
    if carry_in or carry_out:
        carry_stats = dict(input=carry_in or None, output=carry_out or None,
                           users_in=int(carried.num_rows) if carried is not None else 0)
        if carry_out:
            new_carry = update_carry(carried, output_uri, vocab, cfg.state_len)
            save_carry(new_carry, carry_out)
            carry_stats["users_out"] = int(new_carry.num_rows)
        manifest["carry"] = carry_stats
    with fs_out.open_output_stream(join_path(out_root, MANIFEST_FILE)) as f:
        f.write(json.dumps(manifest, indent=2).encode())
    say(f"[prepare] {rows_in:,} rows in = {rows_ok:,} ok + {rows_rejected:,} rejected; "
        f"{num_transitions:,} transitions -> {out_display} ({manifest['total_seconds']:.1f}s)")
    if num_transitions == 0:
        raise EmptyDatasetError(f"no valid engaged events in {input_uri}: {rows_in:,} rows read, "
                                f"{rows_rejected:,} rejected ({dict(sorted(full_reasons.items()))}); "
                                f"see {join_path(out_display, REJECTS_DIR)}")
    return manifest


def summarize_manifest(m: dict) -> str:
    """Human-readable summary of a manifest (printed by `mtrec prepare` and `mtrec inspect`)."""
    lines = [
        f"prepared dataset (schema v{m['schema_version']}, created {m['created_at']}) from {m['input']} "
        f"[{m['format']}]",
        f"  rows_in {m['rows_in']:,} = rows_ok {m['rows_ok']:,} + rows_rejected {m['rows_rejected']:,}",
        f"  transitions {m['num_transitions']:,} (not engaged: {m['rows_not_engaged']:,}); "
        f"items {m['num_items']:,}; users {m['num_users']:,}; state_len {m['state_len']}; "
        f"session_gap_s {m['session_gap_s']}",
    ]
    if m["rejects_by_reason"]:
        lines.append("  rejects by reason: " + ", ".join(f"{k}={v:,}" for k, v in m["rejects_by_reason"].items()))
    if m.get("reject_hints"):
        lines.append("  hints: " + ", ".join(f"{k} ({v:,})" for k, v in m["reject_hints"].items()))
    lines.append(f"  shards: " + ", ".join(f"{k} {len(v)} file(s)/{sum(s['rows'] for s in v):,} rows"
                                         for k, v in m["shards"].items()))
    lines.append(f"  time {m['total_seconds']}s ({m['events_per_s']:,} events/s): {m['seconds']}")
    return "\n".join(lines)


def default_paths(cfg) -> tuple[str, str]:
    """(input, output) of prepare for a PipelineConfig: the configured paths, else the run's defaults."""
    from mtrec_dist.data.simulator import default_sim_dir

    return (cfg.prepare.input or join_path(default_sim_dir(cfg.run_dir), "logs"),
            cfg.prepare.output or join_path(cfg.run_dir, "prepared"))


def _sample(fs, path: str, rows: int) -> tuple[pa.Schema, list[dict]]:
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        first = next(pf.iter_batches(batch_size=max(rows, 1)), None)
        return pf.schema_arrow, ([] if first is None else pa.Table.from_batches([first]).slice(0, rows).to_pylist())


def _fmt_rows(sample: list[dict]) -> list[str]:
    def short(v):
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, list):
            return [short(x) for x in v]
        return v
    return [f"    {json.dumps({k: short(v) for k, v in r.items()}, default=str)}" for r in sample]


def describe_path(path: str, fmt: str = "parquet", rows: int = 3) -> str:
    """Text summary of a prepared dataset, a simulator output directory, or raw logs of ``fmt``."""
    fs, root = resolve_filesystem(path)
    if fs.get_file_info(join_path(root, MANIFEST_FILE)).type == pafs.FileType.File:
        m = load_manifest(path)
        out = [summarize_manifest(m)]
        for sub in (TRANSITIONS_DIR, EVAL_DIR, REJECTS_DIR):
            if m["shards"].get(sub):
                schema, sample = _sample(fs, join_path(root, m["shards"][sub][0]["path"]), rows)
                out.append(f"  {sub}/ schema: " + ", ".join(f"{f.name}: {f.type}" for f in schema))
                out += _fmt_rows(sample)
        vocab = load_vocab(path)
        out.append(f"  vocab: {vocab.num_items:,} items (embedding rows {vocab.num_items + 1:,}), "
                   f"{vocab.num_users:,} users")
        return "\n".join(out)
    summary_path = join_path(root, "truth", "summary.json")
    if fs.get_file_info(summary_path).type == pafs.FileType.File:
        with fs.open_input_stream(summary_path) as f:
            s = json.loads(f.read().decode())
        from mtrec_dist.commands.simulate import format_summary  # presentation only

        return format_summary(s) + "\n" + describe_path(join_path(path, "logs"), "parquet", rows)
    fs, files = rd.list_input_files(path, fmt)
    out = [f"raw {fmt} logs at {path}: {len(files)} file(s), {sum(f.size for f in files):,} bytes"]
    days = sorted({f.partition_day for f in files if f.partition_day})
    if days:
        out.append(f"  day partitions: {len(days)} ({days[0]} .. {days[-1]})")
    if fmt == "parquet":
        total = 0
        for f in files:
            total += sum(rd.parquet_row_groups(fs, f))
        schema, sample = _sample(fs, files[0].path, rows)
        out.append(f"  rows: {total:,}")
        out.append("  schema: " + ", ".join(f"{f.name}: {f.type}" for f in schema))
        out += _fmt_rows(sample)
    else:
        rd.check_input_file(fs, files[0], fmt)
        first = next(rd.iter_file(fs, files[0], fmt), None)
        if first is not None:
            out.append(f"  parsed sample of {files[0].display} (as event columns):")
            out += _fmt_rows(first.slice(0, rows).to_pylist())
    return "\n".join(out)
