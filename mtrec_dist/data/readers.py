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

import codecs
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

from mtrec_dist.data.schema import EVENT_SCHEMA, MAX_ID_BYTES, REQUIRED_COLUMNS, event_schema

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


def parsed_schema(id_type: str = "int") -> pa.Schema:
    """What every parser yields: the events (ids of ``id_type``), the reason and the raw text."""
    return pa.schema(list(event_schema(id_type)) + [pa.field(REASON_COLUMN, pa.string()),
                                                    pa.field(RAW_LINE_COLUMN, pa.string())])


def reject_schema(id_type: str = "int") -> pa.Schema:
    """The rejects table: every event column (nullable), the reason, the source file, the raw text."""
    return pa.schema([f.with_nullable(True) for f in event_schema(id_type)]
                     + [pa.field(REASON_COLUMN, pa.string(), nullable=False),
                        pa.field(SOURCE_COLUMN, pa.string()), pa.field(RAW_LINE_COLUMN, pa.string())])


def id_type_of(schema: pa.Schema) -> str:
    """``"string"`` when a parsed / event / reject schema holds string ids, else ``"int"``."""
    return "string" if pa.types.is_string(schema.field("user_id").type) else "int"


PARSED_SCHEMA, REJECT_SCHEMA = parsed_schema(), reject_schema()


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
# Integers are exact: a float64 round trip would silently turn ids above 2^53 into neighbours (and 2^63
# into 0).  An integer written as an integer (int64 / uint64 columns, digit texts) is exact over the
# whole int64 range.  An integer written as a float (float columns; texts with a point or an exponent,
# such as pandas' "1000.0" or "1e+18") is accepted up to 2^53, below which a float holds every integer:
# beyond, a float's text and its value name different integers ("4.611686018427388e+18" is not 2^62),
# so such values are refused alike in every format, with a hint, rather than read as some other id.
HINT_SEPARATOR = ": "  # a reason is "<code>" or "<code>: <hint for the reader>"
FLOAT_EXACT_LIMIT = 2**53
FLOAT_RANGE_HINT = "beyond 2^53 as a float (write integers)"
ID_LENGTH_HINT = f"longer than {MAX_ID_BYTES} bytes"  # a string id's out_of_range
_DIGITS_RE = r"^[+-]?\d+$"
_POINT_ZEROS_RE = r"^[+-]?\d+\.0*$"  # integral decimals as pandas writes floats ("1000.0")
_FLOAT_RE = r"^[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|nan|inf|infinity)$"
_INT64_MAX_DIGITS = str(2**63 - 1)
_INT64_MIN_DIGITS = str(2**63)  # magnitude of int64's minimum


@dataclass
class Coerced:
    """A column cast to its schema type, and why the values that did not make it were refused.

    ``invalid``: not a value of the column's kind (text, NaN or a fraction in an integer column);
    ``out_of_range``: a number the column's type cannot hold; ``float_range``: an integer written as a
    float beyond 2^53 (see above).  Bool masks or None (none); the refused values are null in
    ``values``; nulls of the source stay null and are not flagged.
    """

    values: pa.Array
    invalid: Optional[np.ndarray] = None
    out_of_range: Optional[np.ndarray] = None
    float_range: Optional[np.ndarray] = None

    def bad(self) -> Optional[np.ndarray]:
        masks = [m for m in (self.invalid, self.out_of_range, self.float_range) if m is not None]
        return np.logical_or.reduce(masks) if masks else None


def coerce_column(arr: pa.Array, target: pa.DataType) -> tuple[pa.Array, Optional[np.ndarray]]:
    """Cast ``arr`` to ``target``; values that cannot be represented become null and are flagged.

    Returns ``(values, bad)`` where ``bad`` is a bool mask of refused values (None if all fit);
    :func:`coerce_checked` tells unparsable values from out-of-range ones.
    """
    c = coerce_checked(arr, target)
    return c.values, c.bad()


def coerce_checked(arr: pa.Array, target: pa.DataType) -> Coerced:
    """Cast ``arr`` to ``target`` exactly, keeping apart unparsable and out-of-range values."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_timestamp(arr.type) and pa.types.is_integer(target):
        arr = pc.cast(arr, pa.timestamp("s"), safe=False).cast(pa.int64())
    if pa.types.is_decimal(arr.type):  # exact digits: the text path handles them like CSV
        arr = pc.cast(arr, pa.string())
    if pa.types.is_string(target):  # string ids (prepare.id_type=string)
        return _to_id_text(arr)
    if arr.type == target:
        return Coerced(arr)
    if pa.types.is_null(arr.type):
        return Coerced(pa.nulls(len(arr), target))
    if pa.types.is_large_string(arr.type):
        arr = pc.cast(arr, pa.string())
    if pa.types.is_string(arr.type):
        text = pc.utf8_trim_whitespace(arr)
        if pa.types.is_integer(target):
            return _narrow(_text_to_int64(text), target)
        if pa.types.is_floating(target):
            return _text_to_float(text, target)
    elif pa.types.is_integer(target):
        if pa.types.is_floating(arr.type):
            return _narrow(_float_to_int64(arr), target)
        if pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type):
            return _narrow(_int_to_int64(arr), target)
    elif pa.types.is_floating(target) and (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)
                                           or pa.types.is_boolean(arr.type)):
        return Coerced(pc.cast(arr, target, safe=False))  # float32 precision is what the schema keeps
    raise InputError(f"cannot convert a column of type {arr.type} to {target}")


def _to_id_text(arr: pa.Array) -> Coerced:
    """Ids as text: strings trimmed as written, integers as their exact digits, integral floats (up to
    2^53) as the integer's digits.  An empty id is invalid; one over MAX_ID_BYTES bytes of UTF-8 is out
    of range (a bound, so that one runaway field cannot blow up the vocab)."""
    if pa.types.is_null(arr.type):
        return Coerced(pa.nulls(len(arr), pa.string()))
    if pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type):
        return Coerced(pc.cast(pc.cast(arr, pa.int64()) if pa.types.is_boolean(arr.type) else arr, pa.string()))
    if pa.types.is_floating(arr.type):
        c = _float_to_int64(arr)
        return Coerced(pc.cast(c.values, pa.string()), invalid=c.invalid, float_range=c.float_range)
    if pa.types.is_large_string(arr.type):
        arr = pc.cast(arr, pa.string())
    if not pa.types.is_string(arr.type):
        raise InputError(f"cannot read a column of type {arr.type} as string ids")
    text = pc.utf8_trim_whitespace(arr)
    valid = _mask(text)
    nbytes = pc.fill_null(pc.binary_length(text), 0).to_numpy(zero_copy_only=False)
    empty, too_long = valid & (nbytes == 0), valid & (nbytes > MAX_ID_BYTES)
    if not (empty.any() or too_long.any()):
        return Coerced(text)
    return Coerced(pc.if_else(pa.array(empty | too_long), pa.scalar(None, pa.string()), text),
                   invalid=empty, out_of_range=too_long)


def _mask(arr: pa.Array) -> np.ndarray:
    """Bool mask of the non-null values of ``arr``."""
    return arr.is_valid().to_numpy(zero_copy_only=False)


def _matches(text: pa.Array, pattern: str) -> np.ndarray:
    return pc.fill_null(pc.match_substring_regex(text, pattern, ignore_case=True), False).to_numpy(
        zero_copy_only=False)


def _int_to_int64(arr: pa.Array) -> Coerced:
    """Any integer (or bool) column as int64; uint64 values above 2^63 - 1 are out of range.

    The comparison is done in uint64, never through float64 (where 2^63 - 1 rounds to 2^63)."""
    if arr.type != pa.uint64():
        return Coerced(pc.cast(arr, pa.int64()))
    x = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)
    big = x > np.uint64(2**63 - 1)
    if not big.any():
        return Coerced(pc.cast(arr, pa.int64(), safe=False))
    valid = _mask(arr)
    return Coerced(pa.array(np.where(big, 0, x).astype(np.int64), mask=~valid | big), out_of_range=big & valid)


def _float_to_int64(arr: pa.Array) -> Coerced:
    """Integral floats up to 2^53 in magnitude as int64 (every such float is an exact integer)."""
    valid = _mask(arr)
    x = pc.fill_null(pc.cast(arr, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        integral = np.isfinite(x) & (np.floor(x) == x)
        exact = integral & (np.abs(x) <= float(FLOAT_EXACT_LIMIT))
    ints = np.where(exact, x, 0).astype(np.int64)
    return Coerced(pa.array(ints, mask=~(valid & exact)), invalid=valid & ~integral,
                   float_range=valid & integral & ~exact)


def _text_to_int64(text: pa.Array) -> Coerced:
    """Trimmed texts as int64: digits exact over the whole int64 range, float spellings up to 2^53.

    Digits (``42``, ``+42``, ``0042``) and point-zeros (``42.000``) are parsed without any float;
    other number texts (``4.2e1``, ``1e+3``, ``NaN``) go through :mod:`decimal` one by one (rare).
    """
    try:  # plain digits within int64 (the usual file): Arrow parses them exactly, or fails on anything else
        return Coerced(pc.cast(text, pa.int64()))
    except pa.ArrowInvalid:
        pass
    valid = _mask(text)
    is_digits, is_point = _matches(text, _DIGITS_RE), _matches(text, _POINT_ZEROS_RE)
    integer = is_digits | is_point
    digits = pc.replace_substring_regex(text, r"\.0*$", "")
    negative_arr = pc.fill_null(pc.starts_with(digits, "-"), False)
    magnitude = pc.utf8_ltrim(pc.utf8_ltrim(digits, characters="+-"), characters="0")
    length = pc.fill_null(pc.utf8_length(magnitude), 0).to_numpy(zero_copy_only=False)
    # 19 digits may or may not fit: same-length digit strings compare like the numbers they spell
    below = pc.if_else(negative_arr, pc.less_equal(magnitude, _INT64_MIN_DIGITS),
                       pc.less_equal(magnitude, _INT64_MAX_DIGITS))
    fits = integer & ((length < 19) | ((length == 19) & pc.fill_null(below, False).to_numpy(zero_copy_only=False)))
    # the magnitude fits uint64 (<= 2^63); int64 arithmetic wraps -2^63 exactly onto itself
    mag_text = pc.if_else(pa.array(fits), pc.if_else(pc.equal(magnitude, ""), "0", magnitude),
                          pa.scalar(None, pa.string()))
    mag = pc.fill_null(pc.cast(mag_text, pa.uint64()), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = np.where(negative_arr.to_numpy(zero_copy_only=False), -mag, mag)
    small = fits & (values >= -FLOAT_EXACT_LIMIT) & (values <= FLOAT_EXACT_LIMIT)
    ok = (is_digits & fits) | (is_point & small)
    out_of_range, float_range = is_digits & ~fits, is_point & ~small
    invalid = valid & ~integer
    for i in np.flatnonzero(invalid & _matches(text, _FLOAT_RE)):  # exact decimal arithmetic, never a float
        value, why = _decimal_to_int(text[int(i)].as_py())
        if why != "invalid":
            invalid[i] = False
            values[i], ok[i], float_range[i] = value, why is None, why == "float_range"
    return Coerced(pa.array(values, mask=~ok), invalid=invalid, out_of_range=out_of_range, float_range=float_range)


def _decimal_to_int(text: str) -> tuple[int, Optional[str]]:
    """``(value, None)`` for a float spelling of an integer up to 2^53 in magnitude, else
    ``(0, "invalid" | "float_range")``.  ``adjusted()`` bounds the magnitude before ``int()``, so
    ``1e999999999`` costs nothing."""
    import decimal

    try:
        d = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return 0, "invalid"
    if not d.is_finite() or d != d.to_integral_value():
        return 0, "invalid"
    if d.adjusted() > 16 or abs(int(d)) > FLOAT_EXACT_LIMIT:  # 10^17 > 2^53
        return 0, "float_range"
    return int(d), None


def _text_to_float(text: pa.Array, target: pa.DataType) -> Coerced:
    """Number texts (``0.5``, ``1e-3``, ``NaN``, ``inf``) as float64 first, then ``target``, exactly as a
    float64 Parquet column of the same values is cast; anything else (``""``, ``abc``) is invalid."""
    ok = pc.fill_null(pc.match_substring_regex(text, _FLOAT_RE, ignore_case=True), True)
    numbers = pc.if_else(ok, text, pa.scalar(None, pa.string()))
    try:
        values = pc.cast(numbers, pa.float64(), safe=False)
    except pa.ArrowInvalid:  # a spelling Arrow does not know: Python's parser, one value at a time
        values = pa.array([None if v is None else float(v) for v in numbers.to_pylist()], pa.float64())
    return Coerced(pc.cast(values, target, safe=False), invalid=~ok.to_numpy(zero_copy_only=False))


def _narrow(c: Coerced, target: pa.DataType) -> Coerced:
    """An int64 :class:`Coerced` as ``target`` (int8 clicks...): values outside the type are out of range."""
    if target == pa.int64():
        return c
    info = np.iinfo(target.to_pandas_dtype())
    valid = _mask(c.values)
    x = pc.fill_null(c.values, 0).to_numpy(zero_copy_only=False)
    outside = valid & ((x < info.min) | (x > info.max))
    oor = outside if c.out_of_range is None else (c.out_of_range | outside)
    values = pa.array(np.where(outside, 0, x).astype(target.to_pandas_dtype()), mask=~valid | outside)
    return Coerced(values, c.invalid, oor if oor.any() else None, c.float_range)


def _describe_rows(raw: pa.Table, mask: np.ndarray) -> pa.Array:
    """JSON text of the raw values of rows in ``mask`` (null elsewhere): what the reject table keeps."""
    out = np.full(raw.num_rows, None, dtype=object)
    idx = np.flatnonzero(mask)
    if idx.size:
        sub = raw.take(pa.array(idx)).to_pylist()
        out[idx] = [json.dumps(r, default=str) for r in sub]
    return pa.array(out, pa.string())


def to_parsed(raw: pa.Table, mapping: dict[str, str], fixed: Optional[dict[str, pa.Array]] = None,
              reasons: Optional[list[tuple[np.ndarray, str]]] = None, id_type: str = "int") -> pa.Table:
    """Build a ``parsed_schema(id_type)`` table from ``raw`` columns renamed by ``mapping`` (schema <- raw).

    ``fixed`` supplies ready columns (schema name -> array); ``reasons`` are extra (mask, reason)
    pairs found by the caller.  Unparsable values become ``invalid_<column>``, numbers the column's type
    cannot hold (a uint64 id of 2^63, a click of 300) ``<column>_out_of_range``, the reason the value
    checks of :mod:`mtrec_dist.data.prepare` give a number that fits the type but not the range, and
    integers written as floats beyond 2^53 ``<column>_out_of_range: beyond 2^53 as a float...``.  String
    ids: empty is ``invalid_<column>``, over 256 bytes ``<column>_out_of_range: longer than 256 bytes``.
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
    for f in event_schema(id_type):
        if fixed and f.name in fixed:
            cols.append(fixed[f.name])
            continue
        src = mapping.get(f.name)
        if src is None or src not in raw.column_names:
            cols.append(pa.nulls(n, f.type))
            continue
        c = coerce_checked(raw.column(src), f.type)
        flag(c.invalid, f"invalid_{f.name}")
        flag(c.out_of_range, f"{f.name}_out_of_range"
             + (f"{HINT_SEPARATOR}{ID_LENGTH_HINT}" if pa.types.is_string(f.type) else ""))
        flag(c.float_range, f"{f.name}_out_of_range{HINT_SEPARATOR}{FLOAT_RANGE_HINT}")
        cols.append(c.values)
    bad_any = reason_code > 0
    if labels:
        reason = pa.DictionaryArray.from_arrays(
            pa.array(reason_code.astype(np.int32) - 1, mask=~bad_any), pa.array(labels)).cast(pa.string())
    else:
        reason = pa.nulls(n, pa.string())
    cols += [reason, _describe_rows(raw, bad_any) if bad_any.any() else pa.nulls(n, pa.string())]
    return pa.Table.from_arrays(cols, schema=parsed_schema(id_type))


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
                yield to_parsed(pa.Table.from_batches([batch]), m, id_type=id_type)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{f.display}: cannot read Parquet file ({type(e).__name__}: {e})") from e


def rejected_lines(lines: list[tuple[str, str]], schema: pa.Schema = PARSED_SCHEMA) -> pa.Table:
    """Lines that could not even be split into fields (``(reason, raw text)`` pairs), kept as rejects
    (in ``schema``, a :func:`parsed_schema`)."""
    n = len(lines)
    cols = [pa.nulls(n, f.type) for f in schema][:-2]
    cols += [pa.array([r for r, _ in lines], pa.string()), pa.array([t for _, t in lines], pa.string())]
    return pa.Table.from_arrays(cols, schema=schema)


# ---- text formats: every field read as text, every line accounted for ----------------------------------
MALFORMED_ROW = "malformed_row"  # the line does not split into the expected number of fields
UNDECODABLE_ROW = "undecodable_row"  # the line holds bytes that are not UTF-8

# pyarrow's CSV reader fails a whole file at the first byte that is not UTF-8 (it cannot even hand such a
# line to invalid_row_handler), so the bytes are escaped before it sees them: undecodable byte b becomes
# the character U+10FF00 + b (the end of plane 16, private use, never in real logs), the line still splits
# into fields, and the lines holding such characters are quarantined with the bytes shown as ``\xNN``.
_ESCAPE_ERRORS = "mtrec-escape-bytes"
_ESCAPE_BASE = 0x10FF00
_ESCAPED_RE = "[\U0010FF00-\U0010FFFF]"
_UNESCAPE = {_ESCAPE_BASE + b: f"\\x{b:02x}" for b in range(256)}
_escapes_seen = [0]  # bumped by the error handler: lets a stream notice that it escaped something


def _escape_bytes(err: UnicodeDecodeError) -> tuple[str, int]:
    _escapes_seen[0] += 1
    return "".join(chr(_ESCAPE_BASE + b) for b in err.object[err.start:err.end]), err.end


codecs.register_error(_ESCAPE_ERRORS, _escape_bytes)


def unescape_bytes(text: str) -> str:
    """Text with escaped undecodable bytes shown as ``\\xNN`` (what a reject's ``raw_line`` keeps)."""
    return text.translate(_UNESCAPE)


class _EscapedUtf8Stream:
    """A read-only byte stream over ``raw`` that is always valid UTF-8 (see ``_ESCAPE_BASE``).

    Valid UTF-8 passes through unchanged (decoding and re-encoding it is a copy); ``escaped`` tells
    whether any byte had to be escaped, so clean files skip the per-row search for escapes.
    """

    def __init__(self, raw, chunk: int = 1 << 20):
        self._raw, self._chunk = raw, chunk
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=_ESCAPE_ERRORS)
        self._out = bytearray()
        self._eof = False
        self.escaped = False
        self.closed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: Optional[int] = -1) -> bytes:
        """Exactly ``n`` bytes unless the file ends first (a short read would mean EOF to pyarrow)."""
        while not self._eof and (n is None or n < 0 or len(self._out) < n):
            chunk = self._raw.read(self._chunk)
            self._eof = not chunk
            before = _escapes_seen[0]
            text = self._decoder.decode(chunk, final=self._eof)
            self.escaped |= _escapes_seen[0] != before
            self._out += text.encode("utf-8")
        n = len(self._out) if n is None or n < 0 else min(n, len(self._out))
        data = bytes(self._out[:n])
        del self._out[:n]
        return data

    def close(self) -> None:
        self.closed = True
        self._raw.close()


def _open_text(fs: pafs.FileSystem, f: InputFile):
    compression = "gzip" if f.path.endswith(".gz") else None
    return fs.open_input_stream(f.path, compression=compression)


def _csv_header(fs: pafs.FileSystem, f: InputFile, delimiter: str) -> list[str]:
    try:
        with _open_text(fs, f) as stream:
            first = stream.read(1 << 16).decode("utf-8", errors=_ESCAPE_ERRORS).splitlines()
    except OSError as e:
        raise InputError(f"{f.display}: cannot read ({e})") from e
    return [c.strip().strip('"') for c in first[0].split(delimiter)] if first else []


def _with_rejected(parsed: pa.Table, lines: list[tuple[str, str]]) -> pa.Table:
    return pa.concat_tables([parsed, rejected_lines(lines, parsed.schema)]) if lines else parsed


def _split_undecodable(table: pa.Table, delimiter: str, rejected: list[tuple[str, str]]) -> pa.Table:
    """``table`` without its rows holding escaped bytes; those rows go to ``rejected`` as their line text
    (the fields joined by ``delimiter``: quoting is not restored)."""
    mask = np.zeros(table.num_rows, dtype=bool)
    for column in table.columns:
        mask |= pc.fill_null(pc.match_substring_regex(column, _ESCAPED_RE), False).to_numpy(zero_copy_only=False)
    if not mask.any():
        return table
    for row in table.filter(pa.array(mask)).to_pylist():
        line = delimiter.join("" if v is None else str(v) for v in row.values())
        rejected.append((UNDECODABLE_ROW, unescape_bytes(line)))
    return table.filter(pa.array(~mask))


def _text_batches(fs: pafs.FileSystem, f: InputFile, what: str, delimiter: str, column_names: list[str],
                  header: bool = True, quote_char="\"") -> Iterator[tuple[Optional[pa.Table], list[tuple[str, str]]]]:
    """Stream a delimited text file as all-text tables plus its rejected lines, ``(reason, raw text)``.

    Every field stays text (an empty field is ``""``, never null: validation decides what it means), and
    a line that does not split into ``column_names`` or holds bytes that are not UTF-8 becomes a rejected
    line; only a file that cannot be read at all raises :class:`InputError`.
    """
    rejected: list[tuple[str, str]] = []

    def on_invalid(row) -> str:
        reason = UNDECODABLE_ROW if re.search(_ESCAPED_RE, row.text) else MALFORMED_ROW
        rejected.append((reason, unescape_bytes(row.text)))
        return "skip"

    try:
        with _open_text(fs, f) as raw:
            stream = _EscapedUtf8Stream(raw)
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=8 << 20, use_threads=False,
                                               column_names=None if header else column_names),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=quote_char,
                                                 invalid_row_handler=on_invalid),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in column_names},
                                                     strings_can_be_null=False))
            for batch in reader:
                table = pa.Table.from_batches([batch])
                if stream.escaped:
                    table = _split_undecodable(table, delimiter, rejected)
                yield table, rejected[:]
                rejected.clear()
            if rejected:
                yield None, rejected[:]
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        if "Empty CSV file" in str(e):
            return
        raise InputError(f"{f.display}: cannot read {what} ({type(e).__name__}: {e})") from e


def _all_string_csv(fs: pafs.FileSystem, f: InputFile, delimiter: str
                    ) -> Iterator[tuple[Optional[pa.Table], list[tuple[str, str]]]]:
    """A CSV file with a header line, through :func:`_text_batches`."""
    header = _csv_header(fs, f, delimiter)
    if header:
        yield from _text_batches(fs, f, "CSV", delimiter, header)


def iter_csv(fs: pafs.FileSystem, f: InputFile, column_map: Optional[dict] = None,
             delimiter: str = ",", id_type: str = "int") -> Iterator[pa.Table]:
    m = _mapping(column_map)
    header = _csv_header(fs, f, delimiter)
    if header:
        _check_columns(f, header, {c: m[c] for c in REQUIRED_COLUMNS})
    for table, rejected in _all_string_csv(fs, f, delimiter):
        parsed = to_parsed(table, m, id_type=id_type) if table is not None else parsed_schema(id_type).empty_table()
        yield _with_rejected(parsed, rejected)


def iter_movielens(fs: pafs.FileSystem, f: InputFile) -> Iterator[pa.Table]:
    """``UserID::MovieID::Rating::Timestamp``: split on ':' so the empty fields between colons vanish."""
    if f.size == 0:
        return
    names = ["user", "_a", "movie", "_b", "rating", "_c", "ts"]
    mapping = {"user_id": "user", "item_id": "movie", "ts": "ts", "eval_rating": "rating"}
    for raw, rejected in _text_batches(fs, f, "MovieLens ratings", ":", names, header=False, quote_char=False):
        if raw is None:
            yield rejected_lines(rejected)
            continue
        # "1:2::3::4" splits into 7 fields too; the separator fields must be empty.
        seps = np.zeros(raw.num_rows, dtype=bool)
        for c in ("_a", "_b", "_c"):
            seps |= pc.not_equal(raw.column(c), "").to_numpy(zero_copy_only=False)
        fixed = {"click": pa.array(np.ones(raw.num_rows, np.int8))}
        yield _with_rejected(to_parsed(raw.select(["user", "movie", "rating", "ts"]), mapping, fixed,
                                       [(seps, MALFORMED_ROW)]), rejected)


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
            yield rejected_lines(bad)
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
    yield _with_rejected(parsed, bad)


KUAIRAND_REQUIRED = {"user_id": "user_id", "item_id": "video_id", "ts": "time_ms", "click": "is_click"}


def iter_kuairand(fs: pafs.FileSystem, f: InputFile) -> Iterator[pa.Table]:
    header = _csv_header(fs, f, ",")
    if not header:
        return
    _check_columns(f, header, KUAIRAND_REQUIRED)
    for raw, bad in _all_string_csv(fs, f, ","):
        if raw is None:
            yield rejected_lines(bad)
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
        yield _with_rejected(to_parsed(raw, mapping, fixed, reasons), bad)


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
