"""The text formats (``csv``, ``movielens``, ``retailrocket``, ``kuairand``): every field read as text, every
line accounted for (a line that does not split, or holds bytes that are not UTF-8, becomes a reject), then
cast by :func:`~mtrec_dist.data.parsed.to_parsed`.  See :mod:`mtrec_dist.data.readers` for the formats."""
from __future__ import annotations

import codecs
import re
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from mtrec_dist.data.input_files import InputError, InputFile
from mtrec_dist.data.parsed import _check_columns, _mapping, coerce_column, parsed_schema, rejected_lines, to_parsed
from mtrec_dist.data.schema import REQUIRED_COLUMNS

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
            dwell_ms = play
            if "duration_ms" in raw.column_names:
                dur, bad_dur = coerce_column(raw.column("duration_ms"), pa.float64())
                reasons.append((bad_dur, "invalid_duration_ms"))
                dur = pc.if_else(pc.greater(dur, 0), dur, pa.scalar(None, pa.float64()))
                ratio = pc.divide(play, dur)
                # replays make play > duration: cap at 1; negative values stay negative and get quarantined
                replayed = pc.fill_null(pc.greater(ratio, 1.0), False)
                ratio = pc.if_else(replayed, 1.0, ratio)
                fixed["watch_ratio"] = pc.cast(ratio, pa.float32())
                # ...and count one play in the dwell, so dwell / watch ratio stays the item's length (prepare's
                # duration covariate): with the replays' play time it would be the outcome itself
                dwell_ms = pc.if_else(replayed, dur, play)
            fixed["dwell_s"] = pc.cast(pc.divide(dwell_ms, 1000.0), pa.float32())
        mapping = {"user_id": "user_id", "item_id": "video_id", "click": "is_click"}
        if "is_like" in raw.column_names:
            mapping["eval_like"] = "is_like"
        if "long_view" in raw.column_names:
            mapping["eval_long_view"] = "long_view"
        yield _with_rejected(to_parsed(raw, mapping, fixed, reasons), bad)
