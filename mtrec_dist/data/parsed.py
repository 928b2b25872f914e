"""What every parser yields (:func:`parsed_schema`: the events plus ``reject_reason`` and ``raw_line``) and
how raw columns become it: exact casting with per-row failure masks (:func:`coerce_checked`), the
reason codes of refused values (:func:`to_parsed`), lines that did not even split
(:func:`rejected_lines`), and the required-column check every format shares."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrec_dist.data.input_files import InputError, InputFile
from mtrec_dist.data.schema import EVENT_SCHEMA, MAX_ID_BYTES, event_schema

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
        try:
            c = coerce_checked(raw.column(src), f.type)
        except InputError as e:  # a column no row of which can be read: name it
            raise InputError(f"column {src!r} ({f.name}): {e}") from e
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


# ---- shared by the per-format parsers ---------------------------------------------------------------
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


def rejected_lines(lines: list[tuple[str, str]], schema: pa.Schema = PARSED_SCHEMA) -> pa.Table:
    """Lines that could not even be split into fields (``(reason, raw text)`` pairs), kept as rejects
    (in ``schema``, a :func:`parsed_schema`)."""
    n = len(lines)
    cols = [pa.nulls(n, f.type) for f in schema][:-2]
    cols += [pa.array([r for r, _ in lines], pa.string()), pa.array([t for _, t in lines], pa.string())]
    return pa.Table.from_arrays(cols, schema=schema)
