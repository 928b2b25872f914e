"""Readers: public log formats -> interaction events in ``EVENT_SCHEMA``.

Supported formats (``PrepareConfig.format``):

* ``movielens`` -- MovieLens ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``).  Every rating is
  an engaged event (``click = 1``); the rating is evaluation-only (``eval_rating``); no watch ratio.
* ``retailrocket`` -- RetailRocket ``events.csv`` (``timestamp,visitorid,event,itemid,transactionid``,
  timestamp in ms).  ``view`` and ``addtocart`` are engagement (``click = 1``).  A ``transaction`` is a
  purchase: it labels the visitor's events of that item up to the transaction with
  ``eval_purchase = 1`` (evaluation-only), and the transaction row itself is kept as a non-engaged
  event (``click = 0``, ``eval_purchase = 1``), so it is counted but never becomes a training action.
* ``kuairand`` -- KuaiRand-style CSV logs (``user_id, video_id, time_ms, is_click`` required;
  ``play_time_ms, duration_ms, long_view, is_like`` optional).  ``watch_ratio = play / duration`` capped
  at 1 (replays), null where the duration is unknown; ``dwell_s = play_time_ms / 1000``;
  ``is_like`` / ``long_view`` become ``eval_like`` / ``eval_long_view``.
* ``parquet`` / ``csv`` -- any table whose columns are the schema's names, or are renamed to them by
  ``column_map`` (raw name -> schema name).  Columns the schema does not know are ignored.  (MovieLens
  "latest" CSVs read this way: ``userId=user_id, movieId=item_id, timestamp=ts, rating=eval_rating``.)

Paths may be local paths or any URI pyarrow understands (``s3://``, ``gs://``, ``file://``...); a
directory is searched recursively (hidden and ``_``-prefixed files are skipped), and a Hive
partition ``day=YYYY-MM-DD`` in a file's path is recorded so that events outside their day can be
quarantined.

Bad input: an unreadable file or a file without a required column raises :class:`InputError` naming the
file (and the column).  Rows that cannot be parsed are *not* dropped: they come back with a
``reject_reason`` (``malformed_row``, ``invalid_<column>``, ``invalid_event``) and the offending text in
``raw_line``.  Value checks (negative ids, NaN, ranges, duplicates, order) belong to
:mod:`mtrec_dist.data.prepare`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mtrec_dist.data.schema import EVENT_SCHEMA, REQUIRED_COLUMNS

FORMATS = ("parquet", "csv", "movielens", "retailrocket", "kuairand")
_EXTENSIONS = {
    "parquet": (".parquet", ".parq", ".pq"),
    "csv": (".csv", ".csv.gz", ".tsv"),
    "movielens": (".dat", ".dat.gz"),
    "retailrocket": (".csv", ".csv.gz"),
    "kuairand": (".csv", ".csv.gz"),
}
_DAY_RE = re.compile(r"(?:^|/)(?:day|date|dt)=(\d{4}-\d{2}-\d{2})(?:/|$)")

# Columns added while reading: why a row was refused (null = fine so far) and its text when unparsable.
REASON_COLUMN = "reject_reason"
RAW_LINE_COLUMN = "raw_line"
SOURCE_COLUMN = "source_file"
PARSED_SCHEMA = pa.schema(list(EVENT_SCHEMA) + [pa.field(REASON_COLUMN, pa.string()),
                                                pa.field(RAW_LINE_COLUMN, pa.string())])
# The rejects table: every event column (nullable), the reason, the source file, the raw text.
REJECT_SCHEMA = pa.schema([f.with_nullable(True) for f in EVENT_SCHEMA]
                          + [pa.field(REASON_COLUMN, pa.string(), nullable=False),
                             pa.field(SOURCE_COLUMN, pa.string()), pa.field(RAW_LINE_COLUMN, pa.string())])


class InputError(ValueError):
    """The input cannot be read at all: unreadable file, missing column, no files, no rows."""


# ---- filesystems -------------------------------------------------------------------------------------
def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or a URI (``s3://b/k``, ``gs://...``, ``file:///...``)."""
    if not uri:
        raise InputError("empty path")
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join_path(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]])


def display_path(fs: pafs.FileSystem, path: str) -> str:
    """A path a user can paste: plain for local files, ``scheme://`` otherwise."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{fs.type_name}://{path}"


@dataclass
class InputFile:
    path: str  # path inside the filesystem
    display: str  # what error messages and the manifest show
    size: int
    partition_day: Optional[str] = None  # "YYYY-MM-DD" from a Hive partition in the path


def partition_day(path: str) -> Optional[str]:
    m = None
    for m in _DAY_RE.finditer(path):
        pass
    return m.group(1) if m else None


def list_input_files(uri: str, fmt: str) -> tuple[pafs.FileSystem, list[InputFile]]:
    """Every data file of ``fmt`` under ``uri`` (a file or a directory), in a stable order."""
    if fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}; choose from {list(FORMATS)}")
    fs, root = resolve_filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input not found: {uri}")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                 if i.type == pafs.FileType.File and not _hidden(i.path[len(root):])
                 and i.path.lower().endswith(_EXTENSIONS[fmt])]
        if not infos:
            raise InputError(f"input is empty: no {fmt} files ({', '.join(_EXTENSIONS[fmt])}) under {uri}")
    infos.sort(key=lambda i: i.path)
    return fs, [InputFile(i.path, display_path(fs, i.path), int(i.size or 0), partition_day(i.path))
                for i in infos]


def _hidden(rel: str) -> bool:
    return any(p.startswith((".", "_")) for p in rel.strip("/").split("/") if p and "=" not in p)


# ---- casting with per-row failure masks ---------------------------------------------------------------
_INT_RE = r"^\s*[+-]?\d+\s*$"
_FLOAT_RE = r"^\s*[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|nan|inf|infinity)\s*$"


def coerce_column(arr: pa.Array, target: pa.DataType) -> tuple[pa.Array, Optional[np.ndarray]]:
    """Cast ``arr`` to ``target``; values that cannot be represented become null and are flagged.

    Returns ``(values, bad)`` where ``bad`` is a bool mask of unparsable values (None if all parsed).
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if arr.type == target:
        return arr, None
    if pa.types.is_timestamp(arr.type) and pa.types.is_integer(target):
        arr = pc.cast(arr, pa.timestamp("s"), safe=False).cast(pa.int64())
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), target), None
    try:
        return pc.cast(arr, target), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        pattern = _INT_RE if pa.types.is_integer(target) else _FLOAT_RE
        ok = pc.fill_null(pc.match_substring_regex(arr, pattern, ignore_case=True), True)
        cleaned = pc.if_else(ok, pc.utf8_trim_whitespace(arr), pa.scalar(None, arr.type))
        if pa.types.is_integer(target):  # digits that overflow the target type
            as_int = pc.cast(pc.if_else(pc.less_equal(pc.utf8_length(cleaned), 18), cleaned,
                                        pa.scalar(None, arr.type)), pa.int64())
            ok = pc.and_(ok, pc.or_(pc.is_null(cleaned), pc.is_valid(as_int)))
            values, more_bad = _int64_to(as_int, target)
            bad = ~ok.to_numpy(zero_copy_only=False)
            if more_bad is not None:
                bad |= more_bad
            return values, bad
        return pc.cast(cleaned, target), ~ok.to_numpy(zero_copy_only=False)
    if pa.types.is_floating(arr.type) and pa.types.is_integer(target):
        x = arr.to_numpy(zero_copy_only=False).astype(np.float64)
        with np.errstate(invalid="ignore"):
            ok = np.isnan(x) & ~arr.is_valid().to_numpy(zero_copy_only=False)  # real nulls are fine
            ok |= np.isfinite(x) & (np.floor(x) == x) & (np.abs(x) < 2**62)
        ints = np.where(ok & ~np.isnan(x), x, 0).astype(np.int64)
        values, more_bad = _int64_to(pa.array(ints, mask=~(ok & arr.is_valid().to_numpy(zero_copy_only=False))),
                                     target)
        bad = ~ok
        if more_bad is not None:
            bad |= more_bad
        return values, bad
    if pa.types.is_integer(arr.type) and pa.types.is_integer(target):
        return _int64_to(pc.cast(arr, pa.int64(), safe=False) if arr.type != pa.uint64()
                         else _uint64_to_int64(arr), target)
    raise InputError(f"cannot convert a column of type {arr.type} to {target}")


def _uint64_to_int64(arr: pa.Array) -> pa.Array:
    x = arr.to_numpy(zero_copy_only=False)
    return pa.array(np.where(x > 2**63 - 1, 0, x).astype(np.int64), mask=~arr.is_valid().to_numpy(zero_copy_only=False)
                    | (np.nan_to_num(x.astype(np.float64)) > 2**63 - 1))


def _int64_to(arr: pa.Array, target: pa.DataType) -> tuple[pa.Array, Optional[np.ndarray]]:
    if target == pa.int64():
        return arr, None
    info = np.iinfo(target.to_pandas_dtype())
    x = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)
    bad = (x < info.min) | (x > info.max)
    if not bad.any():
        return arr.cast(target), None
    valid = arr.is_valid().to_numpy(zero_copy_only=False) & ~bad
    return pa.array(np.where(valid, x, 0).astype(target.to_pandas_dtype()), mask=~valid), bad


def _describe_rows(raw: pa.Table, mask: np.ndarray) -> pa.Array:
    """JSON text of the raw values of rows in ``mask`` (null elsewhere): what the reject table keeps."""
    out = np.full(raw.num_rows, None, dtype=object)
    idx = np.flatnonzero(mask)
    if idx.size:
        sub = raw.take(pa.array(idx)).to_pylist()
        out[idx] = [json.dumps(r, default=str) for r in sub]
    return pa.array(out, pa.string())


def to_parsed(raw: pa.Table, mapping: dict[str, str], fixed: Optional[dict[str, pa.Array]] = None,
              reasons: Optional[list[tuple[np.ndarray, str]]] = None) -> pa.Table:
    """Build a ``PARSED_SCHEMA`` table from ``raw`` columns renamed by ``mapping`` (schema <- raw).

    ``fixed`` supplies ready columns (schema name -> array); ``reasons`` are extra (mask, reason)
    pairs found by the caller.  Unparsable values become ``invalid_<column>``.
    """
    n = raw.num_rows
    cols, reason_code = [], np.zeros(n, dtype=np.int16)
    labels: list[str] = []

    def flag(mask: Optional[np.ndarray], label: str) -> None:
        if mask is None or not mask.any():
            return
        labels.append(label)
        reason_code[(reason_code == 0) & mask] = len(labels)

    for mask, label in reasons or []:
        flag(mask, label)
    for f in EVENT_SCHEMA:
        if fixed and f.name in fixed:
            cols.append(fixed[f.name])
            continue
        src = mapping.get(f.name)
        if src is None or src not in raw.column_names:
            cols.append(pa.nulls(n, f.type))
            continue
        values, bad = coerce_column(raw.column(src), f.type)
        flag(bad, f"invalid_{f.name}")
        cols.append(values)
    bad_any = reason_code > 0
    if labels:
        reason = pa.DictionaryArray.from_arrays(
            pa.array(reason_code.astype(np.int32) - 1, mask=~bad_any), pa.array(labels)).cast(pa.string())
    else:
        reason = pa.nulls(n, pa.string())
    cols += [reason, _describe_rows(raw, bad_any) if bad_any.any() else pa.nulls(n, pa.string())]
    return pa.Table.from_arrays(cols, schema=PARSED_SCHEMA)


def malformed_rows(lines: list[str]) -> pa.Table:
    """Rows that could not even be split into fields, kept as rejects with their text."""
    n = len(lines)
    cols = [pa.nulls(n, f.type) for f in EVENT_SCHEMA]
    cols += [pa.array(["malformed_row"] * n, pa.string()), pa.array(lines, pa.string())]
    return pa.Table.from_arrays(cols, schema=PARSED_SCHEMA)


# ---- per-format parsers (each yields PARSED_SCHEMA tables in file order) ------------------------------
def _check_columns(f: InputFile, present: list[str], required: dict[str, str]) -> None:
    """``required`` maps schema column -> raw column; raise naming the first that is absent."""
    for schema_col, raw_col in required.items():
        if raw_col not in present:
            via = f" (mapped to {schema_col!r})" if raw_col != schema_col else ""
            raise InputError(f"{f.display}: missing required column {raw_col!r}{via}; "
                             f"the file has columns {present}")


def _mapping(column_map: Optional[dict]) -> dict[str, str]:
    """schema column -> raw column (identity unless ``column_map`` renames it)."""
    mapping = {f.name: f.name for f in EVENT_SCHEMA}
    known = set(mapping)
    for raw_name, schema_name in (column_map or {}).items():
        if schema_name not in known:
            raise InputError(f"column_map: {raw_name!r} -> {schema_name!r}: {schema_name!r} is not an event column; "
                             f"known: {sorted(known)}")
        mapping[schema_name] = raw_name
    return mapping


def parquet_row_groups(fs: pafs.FileSystem, f: InputFile, column_map: Optional[dict] = None) -> list[int]:
    """Rows of each row group of a Parquet file, after checking it opens and has the required columns."""
    try:
        with fs.open_input_file(f.path) as fh:
            meta = pq.ParquetFile(fh).metadata
            names = meta.schema.to_arrow_schema().names
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError flavours for corrupt files
        raise InputError(f"{f.display}: cannot read Parquet file ({type(e).__name__}: {e})") from e
    m = _mapping(column_map)
    _check_columns(f, names, {c: m[c] for c in REQUIRED_COLUMNS})
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def iter_parquet(fs: pafs.FileSystem, f: InputFile, column_map: Optional[dict] = None,
                 row_groups: Optional[list[int]] = None, batch_rows: int = 262_144) -> Iterator[pa.Table]:
    m = _mapping(column_map)
    try:
        with fs.open_input_file(f.path) as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            _check_columns(f, names, {c: m[c] for c in REQUIRED_COLUMNS})
            wanted = sorted({m[c] for c in m if m[c] in names})
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=row_groups, columns=wanted):
                yield to_parsed(pa.Table.from_batches([batch]), m)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{f.display}: cannot read Parquet file ({type(e).__name__}: {e})") from e


def _open_text(fs: pafs.FileSystem, f: InputFile):
    compression = "gzip" if f.path.endswith(".gz") else None
    return fs.open_input_stream(f.path, compression=compression)


def _csv_header(fs: pafs.FileSystem, f: InputFile, delimiter: str) -> list[str]:
    try:
        with _open_text(fs, f) as stream:
            first = stream.read(1 << 16).decode("utf-8", errors="replace").splitlines()
    except OSError as e:
        raise InputError(f"{f.display}: cannot read ({e})") from e
    return [c.strip().strip('"') for c in first[0].split(delimiter)] if first else []


def _with_malformed(parsed: pa.Table, bad_lines: list[str]) -> pa.Table:
    return pa.concat_tables([parsed, malformed_rows(bad_lines)]) if bad_lines else parsed


def _all_string_csv(fs: pafs.FileSystem, f: InputFile, delimiter: str) -> Iterator[tuple[pa.Table, list[str]]]:
    """Stream a CSV file as all-text tables (bad values are flagged per row, not fatal) plus malformed lines."""
    header = _csv_header(fs, f, delimiter)
    if not header:
        return
    bad_lines: list[str] = []

    def on_invalid(row) -> str:
        bad_lines.append(row.text)
        return "skip"

    try:
        with _open_text(fs, f) as stream:
            reader = pacsv.open_csv(
                stream, read_options=pacsv.ReadOptions(block_size=8 << 20, use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                     strings_can_be_null=True))
            for batch in reader:
                yield pa.Table.from_batches([batch]), bad_lines[:]
                bad_lines.clear()
            if bad_lines:
                yield None, bad_lines[:]
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        if "Empty CSV file" in str(e):
            return
        raise InputError(f"{f.display}: cannot read CSV ({type(e).__name__}: {e})") from e


def iter_csv(fs: pafs.FileSystem, f: InputFile, column_map: Optional[dict] = None,
             delimiter: str = ",") -> Iterator[pa.Table]:
    m = _mapping(column_map)
    header = _csv_header(fs, f, delimiter)
    if header:
        _check_columns(f, header, {c: m[c] for c in REQUIRED_COLUMNS})
    for table, bad in _all_string_csv(fs, f, delimiter):
        parsed = to_parsed(table, m) if table is not None else PARSED_SCHEMA.empty_table()
        yield _with_malformed(parsed, bad)


def iter_movielens(fs: pafs.FileSystem, f: InputFile) -> Iterator[pa.Table]:
    """``UserID::MovieID::Rating::Timestamp``: split on ':' so the empty fields between colons vanish."""
    bad_lines: list[str] = []

    def on_invalid(row) -> str:
        bad_lines.append(row.text)
        return "skip"

    names = ["user", "_a", "movie", "_b", "rating", "_c", "ts"]
    try:
        with _open_text(fs, f) as stream:
            if f.size == 0:
                return
            reader = pacsv.open_csv(
                stream, read_options=pacsv.ReadOptions(block_size=8 << 20, use_threads=False, column_names=names),
                parse_options=pacsv.ParseOptions(delimiter=":", quote_char=False, invalid_row_handler=on_invalid),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in names},
                                                     include_columns=names, strings_can_be_null=True))
            mapping = {"user_id": "user", "item_id": "movie", "ts": "ts", "eval_rating": "rating"}
            for batch in reader:
                raw = pa.Table.from_batches([batch])
                # "1:2::3::4" splits into 7 fields too; the separator fields must be empty.
                seps = np.zeros(raw.num_rows, dtype=bool)
                for c in ("_a", "_b", "_c"):
                    seps |= pc.fill_null(pc.not_equal(raw.column(c), ""), False).to_numpy(zero_copy_only=False)
                fixed = {"click": pa.array(np.ones(raw.num_rows, np.int8))}
                yield _with_malformed(to_parsed(raw.select(["user", "movie", "rating", "ts"]), mapping, fixed,
                                                [(seps, "malformed_row")]), bad_lines[:])
                bad_lines.clear()
            if bad_lines:
                yield malformed_rows(bad_lines[:])
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        if "Empty CSV file" in str(e):
            return
        raise InputError(f"{f.display}: cannot read MovieLens ratings ({type(e).__name__}: {e})") from e


RETAILROCKET_ENGAGED = ("view", "addtocart")
RETAILROCKET_PURCHASE = "transaction"


def iter_retailrocket(fs: pafs.FileSystem, f: InputFile) -> Iterator[pa.Table]:
    """RetailRocket ``events.csv``; the whole file is read (purchase labels need every row of a visitor)."""
    required = {"ts": "timestamp", "user_id": "visitorid", "item_id": "itemid", "event": "event"}
    header = _csv_header(fs, f, ",")
    if not header:
        return
    _check_columns(f, header, required)
    tables, bad = [], []
    for table, lines in _all_string_csv(fs, f, ","):
        if table is not None:
            tables.append(table)
        bad += lines
    raw = pa.concat_tables(tables) if tables else None
    if raw is None or raw.num_rows == 0:
        if bad:
            yield malformed_rows(bad)
        return
    n = raw.num_rows
    event = pc.utf8_lower(pc.utf8_trim_whitespace(raw.column("event"))).combine_chunks()
    is_purchase = pc.fill_null(pc.equal(event, RETAILROCKET_PURCHASE), False).to_numpy(zero_copy_only=False)
    is_engaged = pc.fill_null(pc.is_in(event, pa.array(RETAILROCKET_ENGAGED)), False).to_numpy(zero_copy_only=False)
    unknown_event = ~(is_purchase | is_engaged)
    ts_ms, bad_ts = coerce_column(raw.column("timestamp"), pa.int64())
    ts = pc.divide(ts_ms, 1000)  # integer division of int64 truncates toward zero
    user, _ = coerce_column(raw.column("visitorid"), pa.int64())
    item, _ = coerce_column(raw.column("itemid"), pa.int64())
    # eval_purchase: 1 where the same visitor bought the same item at or after this event.
    u = pc.fill_null(user, -1).to_numpy(zero_copy_only=False)
    it = pc.fill_null(item, -1).to_numpy(zero_copy_only=False)
    t = pc.fill_null(ts, -1).to_numpy(zero_copy_only=False)
    bought = pa.table({"u": u[is_purchase], "i": it[is_purchase], "t": t[is_purchase]})
    last_buy = bought.group_by(["u", "i"]).aggregate([("t", "max")])
    keyed = pa.table({"u": u, "i": it, "row": np.arange(n)}).join(last_buy, ["u", "i"], join_type="left outer")
    last = np.full(n, -1, dtype=np.int64)
    rows = keyed.column("row").to_numpy()
    last[rows] = pc.fill_null(keyed.column("t_max"), -1).to_numpy(zero_copy_only=False)
    purchase = ((last >= t) & (last >= 0)) | is_purchase
    fixed = {
        "ts": ts, "click": pa.array(np.where(is_purchase, 0, 1).astype(np.int8)),
        "eval_purchase": pa.array(purchase.astype(np.int8)),
    }
    mapping = {"user_id": "visitorid", "item_id": "itemid"}
    parsed = to_parsed(raw, mapping, fixed, [(bad_ts, "invalid_ts"), (unknown_event, "invalid_event")])
    yield _with_malformed(parsed, bad)


KUAIRAND_REQUIRED = {"user_id": "user_id", "item_id": "video_id", "ts": "time_ms", "click": "is_click"}


def iter_kuairand(fs: pafs.FileSystem, f: InputFile) -> Iterator[pa.Table]:
    header = _csv_header(fs, f, ",")
    if not header:
        return
    _check_columns(f, header, KUAIRAND_REQUIRED)
    for raw, bad in _all_string_csv(fs, f, ","):
        if raw is None:
            yield malformed_rows(bad)
            continue
        reasons = []
        ts_ms, bad_ts = coerce_column(raw.column("time_ms"), pa.int64())
        reasons.append((bad_ts, "invalid_ts"))
        fixed = {"ts": pc.divide(ts_ms, 1000)}
        if "play_time_ms" in raw.column_names:
            play, bad_play = coerce_column(raw.column("play_time_ms"), pa.float64())
            reasons.append((bad_play, "invalid_dwell_s"))
            fixed["dwell_s"] = pc.cast(pc.divide(play, 1000.0), pa.float32())
            if "duration_ms" in raw.column_names:
                dur, bad_dur = coerce_column(raw.column("duration_ms"), pa.float64())
                reasons.append((bad_dur, "invalid_duration_ms"))
                dur = pc.if_else(pc.greater(dur, 0), dur, pa.scalar(None, pa.float64()))
                ratio = pc.divide(play, dur)
                # replays make play > duration: cap at 1; negative values stay negative and get quarantined
                ratio = pc.if_else(pc.greater(ratio, 1.0), 1.0, ratio)
                fixed["watch_ratio"] = pc.cast(ratio, pa.float32())
        mapping = {"user_id": "user_id", "item_id": "video_id", "click": "is_click"}
        if "is_like" in raw.column_names:
            mapping["eval_like"] = "is_like"
        if "long_view" in raw.column_names:
            mapping["eval_long_view"] = "long_view"
        yield _with_malformed(to_parsed(raw, mapping, fixed, reasons), bad)


def check_input_file(fs: pafs.FileSystem, f: InputFile, fmt: str, column_map: Optional[dict] = None,
                     delimiter: str = ",") -> Optional[list[int]]:
    """Fail fast (naming the file and the column) before any row is read.

    Parquet: opens the footer and checks the required columns; returns the rows of each row group.
    Text formats with a header: checks the header.  MovieLens has no header (bad lines are rejects).
    """
    if fmt == "parquet":
        return parquet_row_groups(fs, f, column_map)
    if f.size == 0 or fmt == "movielens":
        return None
    if fmt == "csv":
        m = _mapping(column_map)
        required = {c: m[c] for c in REQUIRED_COLUMNS}
    elif fmt == "retailrocket":
        required = {"ts": "timestamp", "user_id": "visitorid", "item_id": "itemid", "event": "event"}
        delimiter = ","
    elif fmt == "kuairand":
        required, delimiter = KUAIRAND_REQUIRED, ","
    else:
        raise InputError(f"unknown input format {fmt!r}; choose from {list(FORMATS)}")
    header = _csv_header(fs, f, delimiter)
    if header:
        _check_columns(f, header, required)
    return None


def iter_file(fs: pafs.FileSystem, f: InputFile, fmt: str, column_map: Optional[dict] = None,
              delimiter: str = ",", row_groups: Optional[list[int]] = None) -> Iterator[pa.Table]:
    """Parsed tables (``PARSED_SCHEMA``) of one input file, in file order."""
    if fmt == "parquet":
        yield from iter_parquet(fs, f, column_map, row_groups)
    elif fmt == "csv":
        yield from iter_csv(fs, f, column_map, delimiter)
    elif fmt == "movielens":
        yield from iter_movielens(fs, f)
    elif fmt == "retailrocket":
        yield from iter_retailrocket(fs, f)
    elif fmt == "kuairand":
        yield from iter_kuairand(fs, f)
    else:
        raise InputError(f"unknown input format {fmt!r}; choose from {list(FORMATS)}")


# ---- whole-input convenience readers (in-process; prepare runs the same parsers on Ray Data) ----------
@dataclass
class ReadResult:
    events: pa.Table  # EVENT_SCHEMA: rows that parsed
    rejects: pa.Table  # REJECT_SCHEMA: rows that did not, with the reason and the raw text
    files: list[InputFile] = field(default_factory=list)

    @property
    def rows_in(self) -> int:
        return self.events.num_rows + self.rejects.num_rows


def parsed_to_rejects(parsed: pa.Table, source: pa.Array) -> pa.Table:
    cols = [parsed.column(f.name) for f in EVENT_SCHEMA]
    cols += [parsed.column(REASON_COLUMN), source, parsed.column(RAW_LINE_COLUMN)]
    return pa.Table.from_arrays(cols, schema=REJECT_SCHEMA)


def read_events(uri: str, fmt: str = "parquet", column_map: Optional[dict] = None,
                delimiter: str = ",") -> ReadResult:
    """Read every file of ``fmt`` under ``uri`` into memory: parsed events plus the rows that failed."""
    fs, files = list_input_files(uri, fmt)
    events, rejects = [], []
    for f in files:
        if fmt == "parquet":
            parquet_row_groups(fs, f, column_map)
        for t in iter_file(fs, f, fmt, column_map, delimiter):
            bad = pc.is_valid(t.column(REASON_COLUMN))
            events.append(t.filter(pc.invert(bad)).select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA))
            r = t.filter(bad)
            rejects.append(parsed_to_rejects(r, pa.array([f.display] * r.num_rows, pa.string())))
    ev = pa.concat_tables(events) if events else EVENT_SCHEMA.empty_table()
    rj = pa.concat_tables(rejects) if rejects else REJECT_SCHEMA.empty_table()
    return ReadResult(ev, rj, files)


def read_movielens(uri: str) -> ReadResult:
    return read_events(uri, "movielens")


def read_retailrocket(uri: str) -> ReadResult:
    return read_events(uri, "retailrocket")


def read_kuairand(uri: str) -> ReadResult:
    return read_events(uri, "kuairand")


def read_parquet_events(uri: str, column_map: Optional[dict] = None) -> ReadResult:
    return read_events(uri, "parquet", column_map)


def read_csv_events(uri: str, column_map: Optional[dict] = None, delimiter: str = ",") -> ReadResult:
    return read_events(uri, "csv", column_map, delimiter)
