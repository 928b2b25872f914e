"""Fuzzing the readers and row validation (issue 11): the same logical rows give the same result in every format.

Hypothesis draws small event tables of valid rows and rows with exactly one corrupted cell (NaN, empty,
out of range, a fraction in an integer column, garbage text, a timestamp in milliseconds...) or, in the
text formats, one corrupted line (a byte that is not UTF-8, a wrong field count).  Each table is written
as CSV and as Parquet (string columns, or typed int64 / uint64 / float64 columns holding the same values),
or as MovieLens ``ratings.dat``, CSV and Parquet, and read through :func:`prepare.validate_local` -- the
work units and the UDF of prepare's read + validate stage, in this process, without Ray.  The reasons
expected are computed here from the plain Python values (an oracle written from the rules, not from
the code).  Checked for every format: every line is one row (rows_in == ok + rejected); every valid row
is kept exactly once with its exact values; every corrupted row is rejected with the right reason; and
the accepted rows and reasons are the same in every format.

Profiles: the default ``fast`` (50 examples per test, seconds); ``MTREC_FUZZ_PROFILE=deep`` runs
5,000 per test.  No example database is written (the checkout is shared); a failure prints the
falsifying example and a ``@reproduce_failure`` blob.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mtrec_dist.config import PrepareConfig
from mtrec_dist.data import prepare as prep
from mtrec_dist.data.readers import PARSED_SCHEMA, InputError

settings.register_profile("fast", max_examples=50, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", max_examples=5000, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("MTREC_FUZZ_PROFILE", "fast")
FUZZ = settings.get_profile(PROFILE)  # a decorator: leaves the global profile to other test files

MAX_ITEM, MAX_TS = PrepareConfig.max_item_id, PrepareConfig.max_ts
INT64 = (-(2**63), 2**63 - 1)
# garbage: no digits, delimiters, quotes or newlines (those are line corruptions, drawn separately)
GARBAGE = st.text(alphabet="abcxyzXYZ_#?!-.", min_size=1, max_size=6)


# ---- the oracle: what the rules say a value gives ----------------------------------------------------
def int_reason(col: str, v: int, as_float: bool = False) -> Optional[str]:
    """The reason an integer ``v`` in ``col`` is rejected for (None: accepted); ``as_float``: written
    as a float (a float column, or a text with a point or an exponent), which holds every integer only
    up to 2^53."""
    if as_float and abs(v) > 2**53:
        return f"{col}_out_of_range: beyond 2^53 as a float (write integers)"
    if not INT64[0] <= v <= INT64[1]:
        return f"{col}_out_of_range"
    if col == "click":
        return None if v in (0, 1) else "click_out_of_range"
    if v < 0:
        return f"negative_{col}"
    if col == "item_id" and v > MAX_ITEM:
        return "item_id_out_of_range"
    if col == "ts" and v > MAX_TS:
        for per_second, unit in ((1000, "milliseconds"), (10**6, "microseconds"), (10**9, "nanoseconds")):
            if 10**8 <= v // per_second <= MAX_TS:
                return f"ts_out_of_range: looks like {unit}"
        return "ts_out_of_range"
    return None


def as_float32(x: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def float_reason(col: str, x: float) -> Optional[str]:
    """The reason a number ``x`` in ``col`` is rejected for, judged on the float32 the schema keeps."""
    f = as_float32(x)
    if math.isnan(f):
        return f"nan_{col}"
    if col == "watch_ratio":
        return None if 0 <= f <= 1 else "watch_ratio_out_of_range"
    if math.isinf(f):
        return f"{col}_out_of_range"
    return "negative_eval_rating" if f < 0 else None


# ---- cells: one value as text and as a typed Parquet value, with what it must give ---------------------
@dataclass(frozen=True)
class Cell:
    text: str  # how CSV / MovieLens / a Parquet string column write it
    typed: object  # the value of a typed Parquet column (int or float)
    reason: Optional[str]  # expected reject reason (None: the cell is valid)
    value: object  # the parsed value expected when valid


INT_RANGES = {"user_id": (0, INT64[1]), "item_id": (0, MAX_ITEM), "ts": (0, MAX_TS), "click": (0, 1),
              "slate_id": (0, 10**6)}


def spellings(v: int, family: str, floats_ok: bool = True) -> st.SearchStrategy[str]:
    """Texts of the integer ``v``: as digits (what an int64 / uint64 column holds), or as a float
    (what a float64 column holds, written the way pandas writes it: ``1000.0``, ``1e+18``)."""
    sign, a = ("-" if v < 0 else ""), abs(v)
    digits = [str(v), f"{sign}00{a}", f" {v} "] + ([f"+{a}"] if v >= 0 else [])
    floats = [f"{v}.0", f"{v}.000", f"{v}e0"] + ([repr(float(v))] if float(v) == v else [])
    if family == "text" and not floats_ok:
        return st.sampled_from(digits)
    return st.sampled_from({"int64": digits, "uint64": digits, "float64": floats, "text": digits + floats}[family])


def written_as_float(text: str) -> bool:
    return any(c in text for c in ".eE")


def int_corruptions(col: str, family: str) -> list[str]:
    """The corruptions of an integer column that ``family``'s Parquet column can hold."""
    kinds = []
    if family != "uint64":
        kinds.append("negative")
    if col != "user_id":  # user ids have no maximum below int64's
        kinds.append("above")
    if family != "int64":  # an int64 column cannot hold 2^63 and beyond
        kinds.append("beyond")
    if col == "ts":
        kinds += ["ms", "us", "ns"]
    if family in ("float64", "text"):
        kinds += ["nan", "fraction", "inf"]
    if family == "text":
        kinds += ["empty", "garbage"]
    return kinds


@st.composite
def not_a_number(draw, col: str, kind: str) -> Cell:
    """A cell of an integer column that holds no integer: always ``invalid_<col>``."""
    if kind == "nan":
        text, x = draw(st.sampled_from(["NaN", "nan", "NAN"])), float("nan")
    elif kind == "inf":
        x = draw(st.sampled_from([float("inf"), float("-inf")]))
        text = draw(st.sampled_from([repr(x), repr(x).replace("inf", "Infinity")]))
    elif kind == "fraction":
        x = draw(st.integers(-10**6, 10**6)) + draw(st.sampled_from([0.5, 0.25, 0.125, 0.001]))
        text = repr(x)
    else:
        text, x = ("" if kind == "empty" else draw(GARBAGE)), None
    return Cell(text, x, f"invalid_{col}", None)


@st.composite
def int_cell(draw, col: str, family: str, corrupt: bool) -> Cell:
    """An integer column's cell; ``family`` = how typed Parquet stores it (int64, uint64, float64, text)."""
    lo, hi = INT_RANGES[col]
    if not corrupt:  # a float64 column holds every integer only up to 2^53
        v = draw(st.integers(lo, min(hi, 2**53) if family == "float64" else hi))
    else:
        kind = draw(st.sampled_from(int_corruptions(col, family)))
        if kind in ("nan", "inf", "fraction", "empty", "garbage"):
            return draw(not_a_number(col, kind))
        if kind == "above":
            v = draw(st.integers(hi + 1, 10**11 - 1 if col == "ts" else INT64[1]))
        elif kind == "beyond":
            v = draw(st.integers(2**63, 2**64 - 1) if family == "uint64" else
                     st.integers(2**63, 10**30) | st.integers(-(10**30), -(2**63) - 1))
        elif kind == "negative":
            v = draw(st.integers(INT64[0], -1) | st.integers(-(2**53), -1))
        else:
            per_second = {"ms": 1000, "us": 10**6, "ns": 10**9}[kind]
            v = draw(st.integers(10**8, MAX_TS)) * per_second + draw(st.integers(0, per_second - 1))
    if family == "float64":  # the column holds floats: the integer is the one the float holds exactly
        v = int(float(v))
    text = draw(spellings(v, family, floats_ok=corrupt or abs(v) <= 2**53))  # a valid cell stays valid
    reason = int_reason(col, v, written_as_float(text))
    return Cell(text, float(v) if family == "float64" else v, reason, None if reason else v)


@st.composite
def float_cell(draw, col: str, family: str, corrupt: bool) -> Cell:
    """A float column's cell (float64 in typed Parquet, any number text in the text formats)."""
    if not corrupt:
        x = draw(st.floats(0, 1) if col == "watch_ratio" else st.floats(0, 1e6))
    else:
        kind = draw(st.sampled_from(["nan", "big", "negative", "inf"] + (["empty", "garbage"] if family == "text"
                                                                         else [])))
        if kind in ("empty", "garbage"):
            return Cell("" if kind == "empty" else draw(GARBAGE), None, f"invalid_{col}", None)
        x = {"nan": float("nan"), "inf": draw(st.sampled_from([float("inf"), float("-inf")])),
             "big": draw(st.floats(1.5, 1e300)), "negative": draw(st.floats(-1e300, -1e-3))}[kind]
    if math.isnan(x):
        text = draw(st.sampled_from(["NaN", "nan", "-nan"]))
    else:
        text = draw(st.sampled_from([repr(x), format(x, ".17g"), f" {x!r} "]))
    reason = float_reason(col, x)
    return Cell(text, x, reason, None if reason else as_float32(x))


CELLS = {"user_id": int_cell, "item_id": int_cell, "ts": int_cell, "click": int_cell, "slate_id": int_cell,
         "watch_ratio": float_cell, "eval_rating": float_cell}
LINE_FAULTS = ("bad_byte", "extra_field", "missing_field", "bad_byte_and_extra_field")
BAD_BYTES = (b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xf0\x9f")


@dataclass
class Table:
    family: str  # int64 | uint64 | float64 | text
    columns: list[str]
    rows: list[dict[str, Cell]]
    line_faults: dict[int, tuple[str, bytes, int]]  # row -> (fault, bad bytes, position): text formats only


@st.composite
def tables(draw, columns: list[str], optional: list[str], family: Optional[str] = None,
           tag: Optional[str] = "slate_id") -> Table:
    """Up to 12 rows; each is valid or has one corrupted cell (never the tag) or, for text, one bad line."""
    family = family or draw(st.sampled_from(["int64", "uint64", "float64", "text"]))
    cols = columns + [c for c in optional if draw(st.booleans())]
    rows, faults = [], {}
    for i in range(draw(st.integers(1, 12))):
        corrupt = draw(st.sampled_from([None] * 3 + [c for c in cols if c != tag]))
        row = {c: draw(CELLS[c](c, family, c == corrupt)) for c in cols if c != tag}
        if tag:
            row[tag] = Cell(str(i), i, None, i)
        if corrupt is None and draw(st.integers(0, 4)) == 0:
            faults[i] = (draw(st.sampled_from(LINE_FAULTS)), draw(st.sampled_from(BAD_BYTES)),
                         draw(st.integers(0, 10**6)))
        rows.append(row)
    return Table(family, cols, rows, faults)


# ---- writing a table in each format --------------------------------------------------------------------
def text_line(t: Table, i: int, delimiter: str, order: list[str]) -> bytes:
    """Row ``i`` as a line of text, with its line fault (if any) applied."""
    fields = [t.rows[i][c].text for c in order]
    fault = t.line_faults.get(i)
    if fault is None:
        return delimiter.join(fields).encode()
    kind, bad, pos = fault
    if "extra_field" in kind:
        fields.append("7")
    if kind == "missing_field":
        fields = fields[:-1]
    line = delimiter.join(fields).encode()
    if "bad_byte" in kind:
        p = pos % (len(line) + 1)
        line = line[:p] + bad + line[p:]
    return line


def line_reject(t: Table, i: int, delimiter: str, order: list[str]) -> tuple[str, str]:
    """``(reason, raw_line)`` expected for row ``i``'s faulty line."""
    kind = t.line_faults[i][0]
    reason = "undecodable_row" if "bad_byte" in kind else "malformed_row"
    return reason, text_line(t, i, delimiter, order).decode("utf-8", "backslashreplace")


def write_csv(t: Table, path: Path) -> None:
    lines = [",".join(t.columns).encode()] + [text_line(t, i, ",", t.columns) for i in range(len(t.rows))]
    path.write_bytes(b"\n".join(lines) + b"\n")


MOVIELENS_ORDER = ["user_id", "item_id", "eval_rating", "ts"]


def write_movielens(t: Table, path: Path) -> None:
    path.write_bytes(b"".join(text_line(t, i, "::", MOVIELENS_ORDER) + b"\n" for i in range(len(t.rows))))


def parquet_type(t: Table, col: str) -> pa.DataType:
    if t.family == "text":
        return pa.string()
    if col in ("watch_ratio", "eval_rating"):
        return pa.float64()
    if col == "slate_id":
        return pa.int64()
    return {"int64": pa.int64(), "uint64": pa.uint64(), "float64": pa.float64()}[t.family]


def write_parquet(t: Table, path: Path) -> None:
    """The rows without a line fault (a Parquet file has no lines to break), typed per ``t.family``."""
    rows = [r for i, r in enumerate(t.rows) if i not in t.line_faults]
    columns = {}
    for c in t.columns:
        typ = parquet_type(t, c)
        columns[c] = pa.array([r[c].text if typ == pa.string() else r[c].typed for r in rows], typ)
    pq.write_table(pa.table(columns), path)


def stage1(path: Path, fmt: str) -> pa.Table:
    """prepare's read + validate stage on one file, in process; a Parquet file of 0 rows is an input
    error naming the file (as in prepare), here returned as an empty table for the checks that follow."""
    cfg = PrepareConfig(format=fmt, progress=False)
    if fmt == "parquet" and pq.ParquetFile(path).metadata.num_rows == 0:
        with pytest.raises(InputError, match=f"0 rows: .*{path.name}"):
            prep.validate_local(cfg, str(path))
        return PARSED_SCHEMA.append(pa.field(prep.ORDER_COLUMN, pa.int64())).empty_table()
    return prep.validate_local(cfg, str(path))


def outcome(out: pa.Table, columns: list[str]) -> list[tuple]:
    """Per output row: (reason, values of ``columns`` if accepted), in a canonical order."""
    rows = []
    for r in out.to_pylist():
        reason = r["reject_reason"]
        rows.append((reason, None if reason else tuple(r[c] for c in columns)))
    return sorted(rows, key=repr)


# ---- the properties -------------------------------------------------------------------------------------
def check_accounting(out: pa.Table, expected_rows: int) -> None:
    """Every line is one output row, either accepted or rejected with a reason."""
    ok = int(out.column("reject_reason").is_null().to_numpy().sum())
    assert out.num_rows == expected_rows, (out.num_rows, expected_rows)
    assert out.num_rows == ok + int(out.column("reject_reason").is_valid().to_numpy().sum())


def note_coverage(t: Table) -> None:
    """Record what this example exercises (``--hypothesis-show-statistics`` shows the mix)."""
    event(f"family {t.family}")
    for row in t.rows:
        for cell in row.values():
            if cell.reason:
                event(f"reason {cell.reason}")
    for kind, _, _ in t.line_faults.values():
        event(f"line fault {kind}")


def expected_outcome(t: Table, values: list[str]) -> list[tuple]:
    """What :func:`outcome` must give for the rows of ``t`` without a line fault, from the oracle."""
    rows = []
    for i, row in enumerate(t.rows):
        if i in t.line_faults:
            continue
        reasons = [cell.reason for cell in row.values() if cell.reason]
        rows.append((reasons[0], None) if reasons else (None, tuple(row[c].value if c in row else None
                                                                    for c in values)))
    return sorted(rows, key=repr)


def check_by_tag(out: pa.Table, t: Table, lines: list[tuple[str, str]], values: list[str]) -> dict:
    """Rows carrying the tag are compared one by one with the oracle; tagless rows must be the bad lines.

    Returns {tag: (reason, values if accepted)} for comparing formats."""
    by_tag, tagless = {}, []
    for r in out.to_pylist():
        if r["slate_id"] is None:
            tagless.append((r["reject_reason"], r["raw_line"]))
            continue
        assert r["slate_id"] not in by_tag, f"row {r['slate_id']} came out twice"
        by_tag[r["slate_id"]] = r
    assert Counter(tagless) == Counter(lines)
    assert set(by_tag) == {i for i in range(len(t.rows)) if i not in t.line_faults}
    for i, got in by_tag.items():
        reasons = [cell.reason for cell in t.rows[i].values() if cell.reason]
        assert got["reject_reason"] == (reasons[0] if reasons else None), (i, t.rows[i], got)
        if not reasons:  # kept once, with its exact values
            for c in values:
                want = t.rows[i][c].value if c in t.rows[i] else None
                assert got[c] == want, (c, got[c], want, t.rows[i])
    return {i: (r["reject_reason"], None if r["reject_reason"] else tuple(r[c] for c in values))
            for i, r in by_tag.items()}


EVENT_VALUES = ["user_id", "item_id", "ts", "click", "watch_ratio"]
RATING_VALUES = ["user_id", "item_id", "ts", "eval_rating"]
LINE_REASONS = ("malformed_row", "undecodable_row")


@FUZZ
@given(tables(["user_id", "item_id", "ts", "slate_id"], ["click", "watch_ratio"]))
def test_csv_and_parquet_agree_row_by_row_with_the_oracle(t: Table):
    """Int64 / uint64 / float64 / string Parquet columns and the CSV of the same rows, row by row."""
    note_coverage(t)
    with tempfile.TemporaryDirectory() as d:
        csv_path, pq_path = Path(d) / "events.csv", Path(d) / "events.parquet"
        write_csv(t, csv_path)
        write_parquet(t, pq_path)
        csv_out, pq_out = stage1(csv_path, "csv"), stage1(pq_path, "parquet")
    check_accounting(csv_out, len(t.rows))
    check_accounting(pq_out, len(t.rows) - len(t.line_faults))
    lines = [line_reject(t, i, ",", t.columns) for i in t.line_faults]
    from_csv = check_by_tag(csv_out, t, lines, EVENT_VALUES)
    from_parquet = check_by_tag(pq_out, t, [], EVENT_VALUES)
    assert from_csv == from_parquet  # the same answer in every format (line faults aside)


@FUZZ
@given(tables(["user_id", "item_id", "eval_rating", "ts"], [], family="text", tag=None))
def test_movielens_csv_and_parquet_agree(t: Table):
    """MovieLens ``ratings.dat``, CSV and Parquet strings of the same ratings (rows compared as multisets)."""
    note_coverage(t)
    with tempfile.TemporaryDirectory() as d:
        dat, csv_path, pq_path = Path(d) / "ratings.dat", Path(d) / "events.csv", Path(d) / "events.parquet"
        write_movielens(t, dat)
        write_csv(t, csv_path)
        write_parquet(t, pq_path)
        outs = {"movielens": stage1(dat, "movielens"), "csv": stage1(csv_path, "csv"),
                "parquet": stage1(pq_path, "parquet")}
    expected = expected_outcome(t, RATING_VALUES)
    check_accounting(outs["parquet"], len(t.rows) - len(t.line_faults))
    assert outcome(outs["parquet"], RATING_VALUES) == expected
    for fmt, delimiter, order in (("movielens", "::", MOVIELENS_ORDER), ("csv", ",", t.columns)):
        out = outs[fmt]
        check_accounting(out, len(t.rows))
        is_line = pc.is_in(pc.fill_null(out.column("reject_reason"), ""), pa.array(LINE_REASONS))
        got_lines = Counter(zip(*[out.filter(is_line).column(c).to_pylist() for c in ("reject_reason", "raw_line")]))
        assert got_lines == Counter(line_reject(t, i, delimiter, order) for i in t.line_faults), fmt
        rows = out.filter(pc.invert(is_line))
        assert outcome(rows, RATING_VALUES) == expected, fmt
        if fmt == "movielens":
            assert set(rows.filter(pc.is_null(rows.column("reject_reason"))).column("click").to_pylist()) <= {1}
