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
        "0,11,20220408,1201,1649412060000,1,1,1,30000,10000,1\n"   # replays: capped at 1
        "0,12,20220408,1202,1649412120000,0,0,0,0,0,1\n"           # no duration: unknown ratio
        "1,13,20220408,1203,1649412180000,1,0,0,abc,10000,1\n")    # unparsable play time
    r = rd.read_kuairand(str(p))
    assert _by(r.events, "item_id") == [10, 11, 12]
    assert _by(r.events, "ts") == [1649412000, 1649412060, 1649412120]
    assert _by(r.events, "click") == [1, 1, 0]
    wr = _by(r.events, "watch_ratio")
    assert wr[0] == pytest.approx(0.5) and wr[1] == 1.0 and wr[2] is None
    assert _by(r.events, "dwell_s") == [5.0, 30.0, 0.0]
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
