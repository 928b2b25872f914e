"""Readers on small fixtures: MovieLens, RetailRocket, KuaiRand, generic Parquet/CSV, errors naming the file."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtrec_dist.data import readers as rd
from mtrec_dist.data.readers import InputError
from mtrec_dist.data.schema import EVENT_SCHEMA


def _by(table, col):
    return table.column(col).to_pylist()


def test_movielens_maps_rating_to_eval_only_and_keeps_bad_lines(tmp_path):
    p = tmp_path / "ratings.dat"
    p.write_text("1::1193::5::978300760\n1::661::3::978302109\n2::3408::4::978300275\n"
                 "3::10::4\n"            # too few fields
                 "x::20::4::978300000\n"  # user id not a number
                 "4:5::1::2::3\n")        # a single colon inside: wrong field count
    r = rd.read_movielens(str(p))
    assert r.events.schema == EVENT_SCHEMA
    assert _by(r.events, "user_id") == [1, 1, 2]
    assert _by(r.events, "item_id") == [1193, 661, 3408]
    assert _by(r.events, "eval_rating") == [5.0, 3.0, 4.0]
    assert _by(r.events, "click") == [1, 1, 1]
    assert _by(r.events, "watch_ratio") == [None, None, None]  # unknown, not zero
    assert sorted(_by(r.rejects, "reject_reason")) == ["invalid_user_id", "malformed_row", "malformed_row"]
    assert set(_by(r.rejects, "source_file")) == {str(p)}
    raw = " ".join(_by(r.rejects, "raw_line"))
    assert "3::10::4" in raw and "4:5::1::2::3" in raw and '"x"' in raw
    assert r.rows_in == 6


def test_retailrocket_views_are_engagement_and_purchases_are_eval_labels(tmp_path):
    p = tmp_path / "events.csv"
    p.write_text(
        "timestamp,visitorid,event,itemid,transactionid\n"
        "1433221332117,7,view,100,\n"          # viewed, bought later -> purchase 1
        "1433221400000,7,addtocart,100,\n"     # -> purchase 1
        "1433221500000,7,transaction,100,42\n"  # the purchase itself: kept, not engaged
        "1433221600000,7,view,100,\n"          # after the last purchase -> 0
        "1433221700000,7,view,200,\n"          # never bought -> 0
        "1433221800000,8,click,300,\n")        # unknown event -> rejected
    r = rd.read_retailrocket(str(p))
    assert _by(r.events, "ts") == [1433221332, 1433221400, 1433221500, 1433221600, 1433221700]
    assert _by(r.events, "click") == [1, 1, 0, 1, 1]
    assert _by(r.events, "eval_purchase") == [1, 1, 1, 0, 0]
    assert _by(r.events, "user_id") == [7] * 5
    assert _by(r.rejects, "reject_reason") == ["invalid_event"]


def test_kuairand_watch_ratio_and_eval_labels(tmp_path):
    p = tmp_path / "log_standard.csv"
    p.write_text(
        "user_id,video_id,date,hourmin,time_ms,is_click,is_like,long_view,play_time_ms,duration_ms,tab\n"
        "0,10,20220408,1200,1649412000000,1,0,0,5000,10000,1\n"
        "0,11,20220408,1201,1649412060000,1,1,1,30000,10000,1\n"   # replays: capped at 1, one play of dwell
        "0,12,20220408,1202,1649412120000,0,0,0,0,0,1\n"           # no duration: unknown ratio
        "1,13,20220408,1203,1649412180000,1,0,0,abc,10000,1\n")    # unparsable play time
    r = rd.read_kuairand(str(p))
    assert _by(r.events, "item_id") == [10, 11, 12]
    assert _by(r.events, "ts") == [1649412000, 1649412060, 1649412120]
    assert _by(r.events, "click") == [1, 1, 0]
    wr = _by(r.events, "watch_ratio")
    assert wr[0] == pytest.approx(0.5) and wr[1] == 1.0 and wr[2] is None
    assert _by(r.events, "dwell_s") == [5.0, 10.0, 0.0]  # dwell / watch ratio = the item's 10 s length
    assert _by(r.events, "eval_like") == [0, 1, 0]
    assert _by(r.events, "eval_long_view") == [0, 1, 0]
    assert _by(r.rejects, "reject_reason") == ["invalid_dwell_s"]


def test_kuairand_missing_required_column_names_column_and_file(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user_id,video_id,is_click\n1,2,1\n")
    with pytest.raises(InputError, match=r"log\.csv.*time_ms"):
        rd.read_kuairand(str(p))


def test_generic_parquet_with_column_map_and_type_coercion(tmp_path):
    d = tmp_path / "logs" / "day=2026-01-01"
    d.mkdir(parents=True)
    pq.write_table(pa.table({
        "uid": pa.array(["1", " 2 ", "abc", "3"]),  # strings: one unparsable
        "iid": pa.array([10.0, 11.0, 12.0, 12.5]),  # floats: one not integral
        "when": pa.array(np.array([1767225600, 1767225601, 1767225602, 1767225603], "datetime64[s]")),
        "wr": pa.array([0.5, None, 1.0, 0.2], pa.float64()),
        "extra": pa.array([1, 2, 3, 4]),  # ignored
    }), d / "part-0.parquet")
    (tmp_path / "logs" / "_SUCCESS").write_text("")  # marker files are skipped
    r = rd.read_parquet_events(str(tmp_path / "logs"),
                               column_map={"uid": "user_id", "iid": "item_id", "when": "ts", "wr": "watch_ratio"})
    assert _by(r.events, "user_id") == [1, 2]
    assert _by(r.events, "ts") == [1767225600, 1767225601]
    assert _by(r.events, "watch_ratio") == [0.5, None]
    assert sorted(_by(r.rejects, "reject_reason")) == ["invalid_item_id", "invalid_user_id"]
    assert r.files[0].partition_day == "2026-01-01"


def test_generic_csv_with_delimiter_and_uri(tmp_path):
    p = tmp_path / "events.csv"
    p.write_text("user;item;time;click\n1;2;100;1\n1;3;200;0\n")
    r = rd.read_csv_events(f"file://{p}", column_map={"user": "user_id", "item": "item_id", "time": "ts"},
                           delimiter=";")
    assert _by(r.events, "item_id") == [2, 3]
    assert _by(r.events, "click") == [1, 0]
    assert r.rejects.num_rows == 0


def test_missing_column_corrupt_file_and_empty_input_are_clear_errors(tmp_path):
    good = tmp_path / "a.parquet"
    pq.write_table(pa.table({"user_id": [1], "item_id": [2]}), good)
    with pytest.raises(InputError, match=r"a\.parquet.*missing required column 'ts'"):
        rd.read_parquet_events(str(good))
    bad = tmp_path / "b" / "broken.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=r"broken\.parquet.*cannot read Parquet"):
        rd.read_parquet_events(str(bad.parent))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="input is empty"):
        rd.read_parquet_events(str(empty))
    with pytest.raises(InputError, match="not found"):
        rd.read_parquet_events(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="not an event column"):
        rd.read_parquet_events(str(good), column_map={"x": "rating"})


def test_coerce_column_flags_what_does_not_fit():
    v, bad = rd.coerce_column(pa.array([1, 300, None], pa.int64()), pa.int8())
    assert v.to_pylist() == [1, None, None] and bad.tolist() == [False, True, False]
    v, bad = rd.coerce_column(pa.array(["1.5", "nan", "x", None]), pa.float32())
    assert v.to_pylist()[0] == 1.5 and np.isnan(v.to_pylist()[1]) and v.to_pylist()[2:] == [None, None]
    assert bad.tolist() == [False, False, True, False]
    v, bad = rd.coerce_column(pa.array(["99999999999999999999", "7"]), pa.int64())
    assert v.to_pylist() == [None, 7] and bad.tolist() == [True, False]


def test_partition_day_and_listing_order(tmp_path):
    for day in ("2026-01-02", "2026-01-01"):
        d = tmp_path / f"day={day}"
        d.mkdir()
        pq.write_table(pa.table({"user_id": [1], "item_id": [1], "ts": [1]}), d / "part-0.parquet")
    (tmp_path / ".hidden.parquet").write_bytes(b"x")
    fs, files = rd.list_input_files(str(tmp_path), "parquet")
    assert [f.partition_day for f in files] == ["2026-01-01", "2026-01-02"]
    assert all(f.size > 0 for f in files)
    assert rd.partition_day("s3://b/logs/day=2026-03-04/x.parquet") == "2026-03-04"
    assert rd.partition_day("/logs/x.parquet") is None


# ---- exact integers, text values, undecodable lines (issue 11) -----------------------------------------
def _coerced(values, typ=None, target=pa.int64()):
    """(values, invalid, out_of_range, float_range) of a coercion, masks as lists."""
    c = rd.coerce_checked(pa.array(values, typ), target)
    flags = lambda m: [False] * len(values) if m is None else m.tolist()  # noqa: E731
    return c.values.to_pylist(), flags(c.invalid), flags(c.out_of_range), flags(c.float_range)


def test_integers_are_exact_over_the_whole_int64_range_from_every_source_type():
    top, bottom = 2**63 - 1, -(2**63)
    values, invalid, oor, _ = _coerced([2**63, 2**64 - 1, top, 0, 5, None], pa.uint64())
    assert values == [None, None, top, 0, 5, None]  # 2^63 is not item 0, 2^64-1 is not a null id
    assert oor == [True, True, False, False, False, False] and not any(invalid)
    texts = [str(top), str(bottom), str(2**63), str(bottom - 1), str(2**62 - 1), str(10**18 + 7), "+42", "0042",
             " 7 ", "-0", "0" * 30 + "9", "9" * 40]
    values, invalid, oor, _ = _coerced(texts)
    assert values == [top, bottom, None, None, 2**62 - 1, 10**18 + 7, 42, 42, 7, 0, 9, None]
    assert oor == [False, False, True, True] + [False] * 7 + [True] and not any(invalid)


def test_integers_written_as_floats_are_exact_up_to_2_pow_53_in_every_format():
    """Beyond 2^53 a float's text and value name different integers: refused alike, never another id."""
    texts = ["1000.0", "12.5e1", "1e+3", f"{2**53}.0", "9007199254740992e0", f"{2**53 + 1}.0", "1e+18",
             "4.611686018427388e+18", "-9.223372036854776e+18", "1e999999999"]
    values, invalid, oor, far = _coerced(texts)
    assert values == [1000, 125, 1000, 2**53, 2**53] + [None] * 5
    assert far == [False] * 5 + [True] * 5 and not any(invalid) and not any(oor)
    values, invalid, oor, far = _coerced([1000.0, 2.0**53, -(2.0**53), 2.0**62, -(2.0**63), 2.0**63, 1e300, None])
    assert values == [1000, 2**53, -(2**53)] + [None] * 5
    assert far == [False] * 3 + [True] * 4 + [False] and not any(invalid) and not any(oor)


def test_what_is_not_an_integer_is_invalid_and_narrow_types_say_out_of_range():
    bad = ["1000.5", "NaN", "", "abc", "inf", "0x10", "1_000", "1e-3", "--1"]
    values, invalid, oor, far = _coerced(bad)
    assert values == [None] * len(bad) and all(invalid) and not any(oor) and not any(far)
    values, invalid, oor, _ = _coerced([1000.5, float("nan"), float("inf")])
    assert values == [None] * 3 and all(invalid) and not any(oor)
    values, invalid, oor, _ = _coerced(["1", "1.0", "300", "x"], target=pa.int8())
    assert values == [1, 1, None, None] and invalid == [False, False, False, True]
    assert oor == [False, False, True, False]
    values, invalid, oor, _ = _coerced([1, 300, None], pa.int64(), pa.int8())
    assert values == [1, None, None] and oor == [False, True, False]
    values, invalid, oor, _ = _coerced(["0.25", "NaN", "", "abc", "1e300"], target=pa.float32())
    assert values[0] == 0.25 and np.isnan(values[1]) and values[2:4] == [None, None] and values[4] == float("inf")
    assert invalid == [False, False, True, True, False]


def _csv(tmp_path, text: str, name="events.csv"):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return rd.read_csv_events(str(p))


def test_csv_nan_empty_and_text_are_rejected_naming_the_column_like_parquet_strings(tmp_path):
    header = "user_id,item_id,ts,click,watch_ratio"
    rows = ["1,2,3,NaN,0.5", "1,2,3,,0.5", "1,2,3,abc,0.5", "1,2,3,1,", "1,2,3,1,abc", ",2,3,1,0.5",
            "1,NaN,3,1,0.5", "1,2,abc,1,0.5", "1,2,3,1,0.5"]
    r = _csv(tmp_path, "\n".join([header] + rows) + "\n")
    expected = ["invalid_click", "invalid_click", "invalid_click", "invalid_watch_ratio", "invalid_watch_ratio",
                "invalid_user_id", "invalid_item_id", "invalid_ts"]
    assert _by(r.rejects, "reject_reason") == expected
    assert r.events.num_rows == 1 and r.rows_in == len(rows)
    cols = list(zip(*[row.split(",") for row in rows]))
    pq.write_table(pa.table({name: pa.array(list(v)) for name, v in zip(header.split(","), cols)}),
                   tmp_path / "s.parquet")
    p = rd.read_parquet_events(str(tmp_path / "s.parquet"))
    assert _by(p.rejects, "reject_reason") == expected and p.events.to_pylist() == r.events.to_pylist()


def test_csv_long_ids_and_integral_floats_agree_with_parquet(tmp_path):
    r = _csv(tmp_path, f"user_id,item_id,ts\n{2**62 - 1},{10**18 + 7},5\n1000.0,1000.0,6.0\n7,1000.5,7\n")
    assert _by(r.events, "user_id") == [2**62 - 1, 1000] and _by(r.events, "item_id") == [10**18 + 7, 1000]
    assert _by(r.rejects, "reject_reason") == ["invalid_item_id"]  # a fraction is not an id
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"user_id": pa.array([2**62 - 1, 1000]), "item_id": pa.array([10**18 + 7, 1000]),
                             "ts": [5, 6]}), ints)
    floats = tmp_path / "floats.parquet"
    pq.write_table(pa.table({"user_id": [1000.0, 7.0], "item_id": [1000.0, 1000.5], "ts": [6.0, 7.0]}), floats)
    assert rd.read_parquet_events(str(ints)).events.to_pylist() == r.events.to_pylist()
    f = rd.read_parquet_events(str(floats))
    assert f.events.to_pylist() == r.events.slice(1).to_pylist()
    assert _by(f.rejects, "reject_reason") == ["invalid_item_id"]


def test_float_written_ids_beyond_2_pow_53_get_the_same_reason_in_csv_and_parquet(tmp_path):
    r = _csv(tmp_path, f"user_id,item_id,ts\n1,4.611686018427388e+18,5\n1,{2**62}.0,5\n1,{2**62},5\n")
    reason = "item_id_out_of_range: beyond 2^53 as a float (write integers)"
    assert _by(r.rejects, "reject_reason") == [reason, reason] and _by(r.events, "item_id") == [2**62]
    pq.write_table(pa.table({"user_id": [1.0], "item_id": [2.0**62], "ts": [5.0]}), tmp_path / "f.parquet")
    assert _by(rd.read_parquet_events(str(tmp_path / "f.parquet")).rejects, "reject_reason") == [reason]


def test_one_undecodable_or_malformed_line_is_quarantined_and_the_rest_kept(tmp_path):
    good = [f"{u}::{100 + u}::4::{978300000 + u}".encode() for u in range(1000)]
    bad = [b"7::8::5::97830\xff0760",  # one byte that is not UTF-8
           b"1::2::3::\xfe::4",  # wrong field count *and* a bad byte
           b"2::3::4"]  # wrong field count
    p = tmp_path / "ratings.dat"
    p.write_bytes(b"\n".join(good[:500] + bad + good[500:]) + b"\n")
    r = rd.read_movielens(str(p))
    assert r.events.num_rows == 1000 and _by(r.events, "user_id") == list(range(1000))
    rejects = {(row["reject_reason"], row["raw_line"]) for row in r.rejects.to_pylist()}
    assert rejects == {("undecodable_row", "7::8::5::97830\\xff0760"), ("undecodable_row", "1::2::3::\\xfe::4"),
                       ("malformed_row", "2::3::4")}
    assert r.rows_in == 1003
    c = _csv(tmp_path, b"user_id,item_id,ts\n1,2,3\n1,\xff,3\n1,2\n1,\xc3\xa9x,4\n1,5,6\n")
    assert _by(c.events, "item_id") == [2, 5]
    assert sorted(_by(c.rejects, "reject_reason")) == ["invalid_item_id", "malformed_row", "undecodable_row"]
    assert "1,\\xff,3" in _by(c.rejects, "raw_line") and '"\\u00e9x"' in " ".join(_by(c.rejects, "raw_line"))


def test_escaped_stream_keeps_valid_utf8_split_across_chunks():
    import io

    text = "user_id,title\n1,é ∑ 😀\n".encode()
    for chunk in (1, 2, 3, 7):
        s = rd._EscapedUtf8Stream(io.BytesIO(text + b"\xff"), chunk=chunk)
        out = b"".join(iter(lambda: s.read(5), b""))
        assert out.decode()[:-1] == text.decode() and out.decode()[-1] == chr(0x10FFFF)
        assert s.escaped
    clean = rd._EscapedUtf8Stream(io.BytesIO(text), chunk=4)
    assert clean.read() == text and not clean.escaped


@pytest.mark.parametrize("id_type", ["int", "string"])
def test_a_parquet_id_column_of_an_unreadable_type_names_the_file_and_the_column(tmp_path, id_type):
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": pa.array([b"x", b"y"], pa.binary()), "ts": [1, 2]}), p)
    fs, files = rd.list_input_files(str(p), "parquet")
    with pytest.raises(InputError, match=r"bad\.parquet: column 'item_id' \(item_id\): .*binary"):
        list(rd.iter_parquet(fs, files[0], id_type=id_type))
