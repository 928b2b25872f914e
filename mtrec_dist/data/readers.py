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
  at 1 (replays), null where the duration is unknown; ``dwell_s = play_time_ms / 1000``, one play (the
  duration) for a replayed item, so that dwell / watch ratio is the item's length;
  ``is_like`` / ``long_view`` become ``eval_like`` / ``eval_long_view``.
* ``parquet`` / ``csv`` -- any table whose columns are the schema's names, or are renamed to them by
  ``column_map`` (raw name -> schema name).  Columns the schema does not know are ignored.  (MovieLens
  "latest" CSVs read this way: ``userId=user_id, movieId=item_id, timestamp=ts, rating=eval_rating``.)
  With ``id_type="string"`` (``prepare.id_type``) ``user_id`` / ``item_id`` are kept as text: UUIDs,
  ASINs (Amazon reviews' ``user,item,rating,ts``), hashes; trimmed, at most 256 bytes, never empty.

Paths may be local paths or any URI pyarrow understands (``s3://``, ``gs://``, ``file://``...); a
directory is searched recursively (hidden and ``_``-prefixed files are skipped), and a Hive
partition ``day=YYYY-MM-DD`` in a file's path is recorded so that events outside their day can be
quarantined.

Bad input: an unreadable file or a file without a required column raises :class:`InputError` naming the
file (and the column).  Rows that cannot be parsed are *not* dropped: they come back with a
``reject_reason`` and the offending text in ``raw_line``: ``malformed_row`` (a line that does not split
into the expected fields), ``undecodable_row`` (a line holding bytes that are not UTF-8, shown as
``\\xNN``), ``invalid_<column>`` (not a value of the column's kind: ``abc``, an empty field, ``NaN`` or a
fraction in an integer column), ``<column>_out_of_range`` (a number the column's type cannot hold, such
as a uint64 id of 2^63), ``invalid_event``.  Text formats keep every field as text, so an empty field is
refused like any other text, never read as "unknown" (leave the column out, or use Parquet nulls, for
that).  Integers are exact: digits over the whole int64 range, integers written as floats (``1000.0``,
``1e+3``, float columns) up to 2^53, where a float stops holding every integer (beyond, ``<column>_out_of_range:
beyond 2^53 as a float``); floats go through float64.  So the same values give the same rows and the
same reasons in CSV, Parquet (string, int64, uint64, float64 columns) and MovieLens.  Value checks
(negative ids, NaN, ranges, duplicates, order) belong to :mod:`mtrec_dist.data.validate` and
:mod:`mtrec_dist.data.sessionize`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# The readers are split by idea: input files (.input_files), the parsed rows and their casting (.parsed),
# the text formats (.text_formats); every name stays importable from here.
from mtrec_dist.data.input_files import (  # noqa: F401  (re-exported)
    FORMATS, display_path, InputError, InputFile, join_path, list_input_files, partition_day,
    resolve_filesystem,
)
from mtrec_dist.data.parsed import (  # noqa: F401  (re-exported)
    HINT_SEPARATOR, PARSED_SCHEMA, RAW_LINE_COLUMN, REASON_COLUMN, REJECT_SCHEMA, SOURCE_COLUMN, _check_columns,
    coerce_checked, coerce_column, id_type_of, _mapping, parsed_schema, reject_schema, to_parsed,
)
from mtrec_dist.data.text_formats import (  # noqa: F401  (re-exported)
    KUAIRAND_REQUIRED, _csv_header, _EscapedUtf8Stream, iter_csv, iter_kuairand, iter_movielens, iter_retailrocket,
)
from mtrec_dist.data.schema import EVENT_SCHEMA, REQUIRED_COLUMNS, event_schema  # noqa: F401


# ---- Parquet -------------------------------------------------------------------------------------------
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
                 row_groups: Optional[list[int]] = None, batch_rows: int = 262_144,
                 id_type: str = "int") -> Iterator[pa.Table]:
    m = _mapping(column_map)
    try:
        with fs.open_input_file(f.path) as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            _check_columns(f, names, {c: m[c] for c in REQUIRED_COLUMNS})
            wanted = sorted({m[c] for c in m if m[c] in names})
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=row_groups, columns=wanted):
                try:
                    parsed = to_parsed(pa.Table.from_batches([batch]), m, id_type=id_type)
                except InputError as e:  # a column of a type no reader converts: name the file too
                    raise InputError(f"{f.display}: {e}") from e
                yield parsed
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{f.display}: cannot read Parquet file ({type(e).__name__}: {e})") from e


# ---- any format ----------------------------------------------------------------------------------------
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
              delimiter: str = ",", row_groups: Optional[list[int]] = None, id_type: str = "int") -> Iterator[pa.Table]:
    """Parsed tables (``parsed_schema(id_type)``) of one input file, in file order; string ids
    (``id_type="string"``) are read by the generic formats only."""
    if id_type != "int" and fmt not in ("parquet", "csv"):
        raise InputError(f"{fmt} logs have integer ids; string ids (id_type={id_type!r}) need format csv or parquet")
    if fmt == "parquet":
        yield from iter_parquet(fs, f, column_map, row_groups, id_type=id_type)
    elif fmt == "csv":
        yield from iter_csv(fs, f, column_map, delimiter, id_type=id_type)
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
    schema = reject_schema(id_type_of(parsed.schema))
    cols = [parsed.column(f.name) for f in schema if f.name not in (REASON_COLUMN, SOURCE_COLUMN, RAW_LINE_COLUMN)]
    cols += [parsed.column(REASON_COLUMN), source, parsed.column(RAW_LINE_COLUMN)]
    return pa.Table.from_arrays(cols, schema=schema)


def read_events(uri: str, fmt: str = "parquet", column_map: Optional[dict] = None,
                delimiter: str = ",", id_type: str = "int") -> ReadResult:
    """Read every file of ``fmt`` under ``uri`` into memory: parsed events plus the rows that failed."""
    fs, files = list_input_files(uri, fmt)
    schema = event_schema(id_type)
    events, rejects = [], []
    for f in files:
        if fmt == "parquet":
            parquet_row_groups(fs, f, column_map)
        for t in iter_file(fs, f, fmt, column_map, delimiter, id_type=id_type):
            bad = pc.is_valid(t.column(REASON_COLUMN))
            events.append(t.filter(pc.invert(bad)).select(schema.names).cast(schema))
            r = t.filter(bad)
            rejects.append(parsed_to_rejects(r, pa.array([f.display] * r.num_rows, pa.string())))
    ev = pa.concat_tables(events) if events else schema.empty_table()
    rj = pa.concat_tables(rejects) if rejects else reject_schema(id_type).empty_table()
    return ReadResult(ev, rj, files)


def read_movielens(uri: str) -> ReadResult:
    return read_events(uri, "movielens")


def read_retailrocket(uri: str) -> ReadResult:
    return read_events(uri, "retailrocket")


def read_kuairand(uri: str) -> ReadResult:
    return read_events(uri, "kuairand")


def read_parquet_events(uri: str, column_map: Optional[dict] = None, id_type: str = "int") -> ReadResult:
    return read_events(uri, "parquet", column_map, id_type=id_type)


def read_csv_events(uri: str, column_map: Optional[dict] = None, delimiter: str = ",",
                    id_type: str = "int") -> ReadResult:
    return read_events(uri, "csv", column_map, delimiter, id_type=id_type)
