"""`mtrec prepare`: row accounting, quarantine, sessions and windows, vocabularies, real data.

Unit tests exercise the vectorised per-user stage and the vocab directly; integration tests run the
whole Ray Data pipeline on a real local cluster (the session fixture ``ray_cluster``).
"""
import json
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrec_dist.cli import main as cli
from mtrec_dist.config import PrepareConfig
from mtrec_dist.data import prepare as prep
from mtrec_dist.data.readers import PARSED_SCHEMA, InputError
from mtrec_dist.data.schema import EVAL_COLUMNS, EVENT_SCHEMA, TRANSITION_COLUMNS
from mtrec_dist.data.dataset import AccountingError
from mtrec_dist.data.sessionize import find_ids, session_returns, sort_rows, with_returns_relabelled

DAY1, DAY2 = 1767225600, 1767312000  # 2026-01-01, 2026-01-02 (UTC)


def _table(path) -> pa.Table:
    return pds.dataset(str(path), format="parquet").to_table()


def _cfg(**kw) -> PrepareConfig:
    base = dict(progress=False, rows_per_shard=1000)
    base.update(kw)
    return PrepareConfig(**base)


def _events(rows: list[dict], user_type=pa.int64()) -> pa.Table:
    schema = pa.schema([f.with_nullable(True) if f.name != "user_id" else pa.field("user_id", user_type)
                        for f in EVENT_SCHEMA])
    return pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)


# ---- unit: the per-user stage and the vocab ---------------------------------------------------------
def _annotate(rows: list[dict], state_len=3, gap=1800, **kw):
    t = pa.Table.from_pylist([{c: r.get(c) for c in EVENT_SCHEMA.names} for r in rows], schema=EVENT_SCHEMA)
    t = t.append_column("reject_reason", pa.nulls(t.num_rows, pa.string()))
    t = t.append_column("raw_line", pa.nulls(t.num_rows, pa.string())).cast(PARSED_SCHEMA)
    t = t.append_column(prep.ORDER_COLUMN, pa.array(np.arange(t.num_rows, dtype=np.int64)))
    vocab = prep.extend_vocab(None, [r["item_id"] for r in rows], [r["user_id"] for r in rows])
    row_base = (np.sort(vocab.user_raw), np.arange(vocab.num_users) * 100)
    out = prep.annotate_users(t, state_len=state_len, session_gap_s=gap, row_base=row_base, **kw)
    tr = prep.index_transitions(out, lookup=prep.vocab_lookup(vocab))
    return out, tr, vocab


def test_windows_sessions_and_per_user_rejects():
    rows = [  # file order; user 5 is out of ts order in the file
        dict(user_id=5, item_id=30, ts=300, click=1, watch_ratio=0.3),
        dict(user_id=5, item_id=10, ts=100, click=1, watch_ratio=0.1),
        dict(user_id=5, item_id=20, ts=200, click=1),                   # no watch ratio -> feedback 1.0
        dict(user_id=5, item_id=40, ts=5000, click=1, watch_ratio=0.4),  # gap > 1800: new session
        dict(user_id=5, item_id=50, ts=5100, click=0),                  # valid, not engaged
        dict(user_id=5, item_id=10, ts=100, click=1, watch_ratio=0.9),  # duplicate of row 1
        dict(user_id=9, item_id=20, ts=50, click=1, watch_ratio=0.5, session_id=1),
        dict(user_id=9, item_id=30, ts=40, click=1, watch_ratio=0.5, session_id=1),  # earlier than a prior row
        dict(user_id=9, item_id=40, ts=60, click=1, watch_ratio=0.6, session_id=2),  # session id changes
    ]
    out, tr, vocab = _annotate(rows)
    reasons = out.column("reject_reason").to_pylist()
    assert reasons == [None, None, None, None, None, "duplicate_event", None, "ts_out_of_order", None]
    tr = tr.sort_by([("user_idx", "ascending"), ("ts", "ascending")])
    idx = lambda *raw: [int(i) for i in vocab.item_index(list(raw))]  # noqa: E731
    u5 = tr.filter(pa.compute.equal(tr.column("user_idx"), int(vocab.user_index([5])[0])))
    assert u5.column("action").to_pylist() == idx(10, 20, 30, 40)
    assert u5.column("state_items").to_pylist() == [[0, 0, 0], [0, 0] + idx(10), [0] + idx(10, 20),
                                                    idx(10, 20, 30)]
    assert u5.column("state_feedback").to_pylist()[3] == pytest.approx([0.1, 1.0, 0.3])
    assert u5.column("action_feedback").to_pylist() == pytest.approx([0.1, 1.0, 0.3, 0.4])
    assert u5.column("done").to_pylist() == [0, 0, 1, 1]
    assert u5.column("pos_from_end").to_pylist() == [3, 2, 1, 0]
    base = 100 * int(np.searchsorted(np.sort(vocab.user_raw), 5))
    assert u5.column("row_id").to_pylist() == [base, base + 1, base + 2, base + 3]
    u9 = tr.filter(pa.compute.equal(tr.column("user_idx"), int(vocab.user_index([9])[0])))
    assert u9.column("action").to_pylist() == idx(20, 40)
    assert u9.column("done").to_pylist() == [1, 1]  # the session id changed between them
    assert out.column("_first_of_user").to_pylist().count(1) == 2
    # next state = state shifted by the action; the eval table carries the same row ids
    assert tr.schema.names == TRANSITION_COLUMNS
    ev = prep.index_transitions(out, lookup=prep.vocab_lookup(vocab), part="eval")
    assert sorted(ev.column("row_id").to_pylist()) == sorted(tr.column("row_id").to_pylist())
    for r in tr.to_pylist():
        assert r["next_state_items"] == r["state_items"][1:] + [r["action"]]
        assert r["next_state_feedback"] == pytest.approx(r["state_feedback"][1:] + [r["action_feedback"]])


def test_session_ends_carry_return_labels_and_items_their_log_length():
    rows = [  # window 3000 s, the log ends at t = 20000
        dict(user_id=5, item_id=10, ts=100, click=1, watch_ratio=0.5, dwell_s=60.0),   # 2-minute item
        dict(user_id=5, item_id=20, ts=200, click=1, watch_ratio=0.25, dwell_s=30.0),  # ends a session
        dict(user_id=5, item_id=30, ts=2200, click=1),                                 # back 2000 s later
        dict(user_id=5, item_id=40, ts=9000, click=1, watch_ratio=0.0, dwell_s=5.0),   # gap 6800 > window
        dict(user_id=7, item_id=10, ts=18000, click=1, watch_ratio=1.0, dwell_s=60.0),  # 2000 s before the end
    ]
    out, tr, vocab = _annotate(rows, gap=1800, return_window_s=3000, log_end=20_000)
    tr = tr.sort_by([("user_idx", "ascending"), ("ts", "ascending")])
    assert tr.column("done").to_pylist() == [0, 1, 1, 1, 1]
    assert tr.column("returned").to_pylist() == [0, 1, 0, 0, 0]
    # known where the log runs a whole window (3000 s) after the session end, whatever happened;
    # user 7 ended 2000 s before the log did, too soon to tell
    assert tr.column("return_known").to_pylist() == [0, 1, 1, 1, 0]
    assert tr.column("action_log_duration").to_pylist() == pytest.approx([np.log(2.0), np.log(2.0), 0.0, 0.0, 0.0])
    # without log_end the rows' latest ts ends the log; a return within the last window is not known either
    returned, known = session_returns(np.array([1, 1, 1]), np.array([0, 10, 12]), np.array([1, 1, 1]), 5)
    assert returned.tolist() == [0.0, 0.0, 0.0] and known.tolist() == [1.0, 0.0, 0.0]


def test_earlier_days_get_the_return_labels_later_days_complete():
    """Two days of one user's prepared rows, out of order; window 10 s.  Day 1 alone (log end 100) knew
    no label for its session ends at 95 and 98; with day 2 (log end 200) they are known: 95 -> next event
    98 (returned), 98 -> next event 150 (not within 10 s).  Day 2's end at 195 stays unknown (195 + 10 >
    200), and user 2's end at 30 returns at 35."""
    day = pa.table({
        "row_id": pa.array([11, 10, 20, 21, 30, 31], pa.int64()),
        "user_idx": pa.array([1, 1, 1, 1, 2, 2], pa.int64()),
        "ts": pa.array([98, 95, 150, 195, 30, 35], pa.int64()),
        "done": pa.array([1, 1, 0, 1, 1, 0], pa.int8()),
        "returned": pa.array([0] * 6, pa.int8()),
        "return_known": pa.array([0] * 6, pa.int8()),
    })
    out = with_returns_relabelled(day, window_s=10, log_end=200)
    assert out.column("row_id").to_pylist() == [10, 11, 20, 21, 30, 31]  # each user's order
    assert out.column("returned").to_pylist() == [1, 0, 0, 0, 1, 0]
    assert out.column("return_known").to_pylist() == [1, 1, 0, 0, 1, 0]
    assert out.schema == day.schema


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 60), st.lists(st.sampled_from([(0, 3), (0, 2**20), (-5, 5), (0, 2**40), (0, 2**62)]),
                                    min_size=1, max_size=4), st.randoms())
def test_sort_rows_is_lexsort(n, ranges, rnd):
    """The packed sort gives np.lexsort's order: narrow keys (packed), negative keys, and keys too wide to
    pack together (the lexsort fallback), ties broken by the distinct input order."""
    order = np.array(rnd.sample(range(10 * n + 1), n), dtype=np.int64)
    keys = [np.array([rnd.randint(lo, hi) for _ in range(n)], dtype=np.int64) for lo, hi in ranges]
    assert np.array_equal(sort_rows(order, *keys), np.lexsort((order, *keys)))


@pytest.mark.parametrize("raw", [np.array([3, 7, 8, 20]), np.array([5, 10**12, 10**15])])
def test_find_ids_maps_present_ids_pads_to_zero_and_names_missing_ones(raw):
    """Both paths (direct table for compact ids, binary search for sparse ones) give the same answer."""
    values = np.arange(1, raw.size + 1)
    ids = np.array([raw[2], raw[0], -1, raw[2], -1])
    assert find_ids(raw, ids, "item", values, pad=-1).tolist() == [3, 1, 0, 3, 0]
    assert find_ids(raw, ids[:2], "item", values).tolist() == [3, 1]
    with pytest.raises(AccountingError, match=r"item raw id\(s\) \[4\] missing"):
        find_ids(raw, np.array([raw[0], 4]), "item", values)
    with pytest.raises(AccountingError, match="missing"):
        find_ids(raw, ids, "item", values)  # padding is only known as padding when it is named


def test_validate_rows_reasons_in_order():
    t = _events([
        dict(user_id=1, item_id=1, ts=DAY1 + 5, click=1, watch_ratio=0.5),
        dict(user_id=1, item_id=1, ts=DAY1 + 5, click=3),
        dict(user_id=1, item_id=1, ts=DAY1 - 5),
        dict(user_id=-1, item_id=-1, ts=DAY1),  # two problems: the first check wins
        dict(user_id=1, item_id=1, ts=DAY1, dwell_s=float("inf")),
        dict(user_id=1, item_id=1, ts=DAY1, eval_rating=float("nan")),
        dict(user_id=1, item_id=1, ts=DAY1, eval_like=2),
    ]).append_column("reject_reason", pa.array([None] * 7, pa.string()))
    out = prep.validate_rows(t, "2026-01-01", max_item_id=100, max_ts=2**33)
    assert out.column("reject_reason").to_pylist() == [
        None, "click_out_of_range", "ts_outside_partition", "negative_user_id", "dwell_s_out_of_range",
        "nan_eval_rating", "eval_like_out_of_range"]


def test_vocab_extension_keeps_old_indices(tmp_path):
    old = prep.extend_vocab(None, [30, 10, 20], [7, 3])
    assert old.item_index([10, 20, 30, 99]).tolist() == [1, 2, 3, 0]  # sorted raw ids, 0 = unknown
    new = prep.extend_vocab(old, [5, 20, 40], [3, 1], item_counts=[2, 3, 4], user_counts=[5, 6])
    assert new.item_index([10, 20, 30, 5, 40]).tolist() == [1, 2, 3, 4, 5]
    assert new.user_index([3, 7, 1]).tolist() == [0, 1, 2]
    assert new.item_count.tolist() == [0, 3, 0, 2, 4]
    assert new.item_raw_id([0, 4]).tolist() == [-1, 5]
    new.save(str(tmp_path / "vocab"))
    back = prep.load_vocab(str(tmp_path))  # a dataset dir with vocab/ inside works too
    assert back.item_raw.tolist() == new.item_raw.tolist() and back.user_raw.tolist() == new.user_raw.tolist()
    with pytest.raises(InputError, match="vocab"):
        prep.load_vocab(str(tmp_path / "nowhere"))


def test_uint64_ids_beyond_int64_are_rejected_as_out_of_range(tmp_path):
    ids = pa.array([2**63, 2**64 - 1, 2**62, 2**62 + 1, 5], pa.uint64())
    pq.write_table(pa.table({"user_id": pa.array([1] * 5, pa.uint64()), "item_id": ids,
                             "ts": [DAY1] * 5}), tmp_path / "u.parquet")
    out = prep.validate_local(_cfg(), str(tmp_path / "u.parquet"))
    assert out.column("reject_reason").to_pylist() == ["item_id_out_of_range"] * 2 + [None, "item_id_out_of_range",
                                                                                       None]
    assert out.column("item_id").to_pylist()[2:] == [2**62, 2**62 + 1, 5]  # exact, no float64 on the way
    assert 0 not in out.column("item_id").to_pylist()  # 2^63 never becomes item 0
    wide = prep.validate_local(_cfg(max_item_id=2**63 - 1), str(tmp_path / "u.parquet"))
    assert wide.column("reject_reason").to_pylist() == ["item_id_out_of_range"] * 2 + [None] * 3


def test_millisecond_timestamps_get_a_hint_and_the_manifest_counts_codes():
    t = _events([dict(user_id=1, item_id=1, ts=ts) for ts in
                 (DAY1, DAY1 * 1000 + 5, DAY1 * 10**6, DAY1 * 10**9, 5_000_000_000, 2**62)])
    t = t.append_column("reject_reason", pa.nulls(t.num_rows, pa.string()))
    reasons = prep.validate_rows(t, None, max_item_id=100, max_ts=4_102_444_800).column("reject_reason").to_pylist()
    assert reasons == [None, "ts_out_of_range: looks like milliseconds", "ts_out_of_range: looks like microseconds",
                       "ts_out_of_range: looks like nanoseconds", "ts_out_of_range", "ts_out_of_range"]
    assert {prep.reason_code(r) for r in reasons[1:]} == {"ts_out_of_range"}
    codes, hints = prep.count_reasons({"ts_out_of_range: looks like milliseconds": 3, "ts_out_of_range": 1,
                                       "invalid_click": 2})
    assert codes == {"invalid_click": 2, "ts_out_of_range": 4}
    assert hints == {"ts_out_of_range: looks like milliseconds": 3}


def test_a_zero_row_parquet_input_names_the_file(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(EVENT_SCHEMA.empty_table(), tmp_path / "in" / "empty-day.parquet")
    with pytest.raises(InputError, match=r"0 rows: .*empty-day\.parquet"):
        prep.prepare_dataset(_cfg(), str(tmp_path / "in"), str(tmp_path / "out"))


def test_unreadable_inputs_fail_before_any_work(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(InputError, match="input is empty"):
        prep.prepare_dataset(_cfg(), str(tmp_path / "in"), str(tmp_path / "out"))
    pq.write_table(EVENT_SCHEMA.empty_table(), tmp_path / "in" / "a.parquet")
    with pytest.raises(InputError, match="0 rows"):
        prep.prepare_dataset(_cfg(), str(tmp_path / "in"), str(tmp_path / "out"))
    pq.write_table(pa.table({"user_id": [1], "ts": [DAY1]}), tmp_path / "in" / "b.parquet")
    with pytest.raises(InputError, match=r"b\.parquet: missing required column 'item_id'"):
        prep.prepare_dataset(_cfg(), str(tmp_path / "in"), str(tmp_path / "out"))
    (tmp_path / "in" / "b.parquet").write_bytes(b"PAR1garbagePAR1")
    with pytest.raises(InputError, match=r"b\.parquet: cannot read Parquet"):
        prep.prepare_dataset(_cfg(), str(tmp_path / "in"), str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("{}")
    pq.write_table(_events([dict(user_id=1, item_id=1, ts=1)]), tmp_path / "in" / "b.parquet")
    with pytest.raises(InputError, match="already holds a prepared dataset"):
        prep.prepare_dataset(_cfg(), str(tmp_path / "in"), str(tmp_path / "out"))
    with pytest.raises(InputError, match="no prepared dataset"):
        prep.load_manifest(str(tmp_path / "in"))


# ---- integration: the whole pipeline on Ray Data ---------------------------------------------------
def _reference(logs: pa.Table, vocab: prep.Vocab, L: int, gap: int) -> dict:
    """Transitions computed the slow, obvious way: per user, sorted by ts."""
    by_user = defaultdict(list)
    for r in logs.to_pylist():
        by_user[r["user_id"]].append(r)
    out = {}
    for user, evs in by_user.items():
        evs.sort(key=lambda r: r["ts"])
        items = [int(vocab.item_index([r["item_id"]])[0]) for r in evs]
        for k, r in enumerate(evs):
            nxt = evs[k + 1] if k + 1 < len(evs) else None
            done = nxt is None or nxt["ts"] - r["ts"] > gap or nxt["session_id"] != r["session_id"]
            state = ([0] * L + items[:k])[-L:]
            out[(int(vocab.user_index([user])[0]), r["ts"])] = dict(
                action=items[k], state=state, done=int(done), pos_from_end=len(evs) - 1 - k,
                feedback=r["watch_ratio"], satisfaction=r["eval_true_satisfaction"])
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_simulate_prepare_inspect_end_to_end(ray_cluster, tmp_path, capsys):
    sim_dir, out = tmp_path / "sim", tmp_path / "prepared"
    sets = ["--set", "simulator.num_users=250", "--set", "simulator.num_items=150", "--set", "simulator.days=2",
            "--set", "prepare.state_len=4", "--set", "prepare.rows_per_shard=2000",
            "--set", "prepare.rows_per_partition=1000"]  # several hash partitions: users must stay whole
    assert cli(["simulate", "--out", str(sim_dir), "--quiet"] + sets) == 0
    assert "clickbait" in capsys.readouterr().out
    assert cli(["prepare", "--input", str(sim_dir / "logs"), "--out", str(out), "--no-progress"] + sets) == 0
    printed = capsys.readouterr().out
    assert "rows_in" in printed and "rows_ok" in printed

    logs = pds.dataset(str(sim_dir / "logs"), format="parquet").to_table()
    m = prep.load_manifest(str(out))
    assert m["rows_in"] == logs.num_rows == m["rows_ok"] + m["rows_rejected"]
    assert m["rows_rejected"] == 0 and m["num_transitions"] == logs.num_rows  # simulator logs are all engaged
    assert m["state_len"] == 4 and m["embedding_rows"] == m["num_items"] + 1
    assert m["shuffle_partitions"] > 1
    assert len(m["source_files"]) == 2 and all(f["bytes"] > 0 for f in m["source_files"])
    assert sum(s["rows"] for s in m["shards"]["transitions"]) == m["num_transitions"]
    assert len(m["shards"]["transitions"]) >= 2  # rows_per_shard=2000 splits the output
    # the simulator's impressions/ beside logs/ are read: every click's slate is found and clicked the action
    sl = m["slates"]
    assert sl["input"].endswith("impressions") and sl["rows_in"] == sl["rows_ok"] + sl["rows_rejected"]
    assert sl["click_matches_action"] == sl["transitions_in_slates"] == m["num_transitions"]

    tr = _table(out / "transitions")
    assert tr.schema.names == TRANSITION_COLUMNS
    assert not any(c.startswith("eval_") for c in tr.schema.names)
    row_ids = tr.column("row_id").to_numpy()
    assert len(np.unique(row_ids)) == len(row_ids)
    vocab = prep.load_vocab(str(out))
    assert vocab.num_items == m["num_items"] == len(np.unique(logs.column("item_id").to_numpy()))
    assert vocab.num_users == m["num_users"] == len(np.unique(logs.column("user_id").to_numpy()))

    ref = _reference(logs, vocab, 4, 1800)
    assert len(ref) == tr.num_rows
    for r in tr.to_pylist():
        want = ref[(r["user_idx"], r["ts"])]
        assert r["action"] == want["action"] and r["state_items"] == want["state"], r
        assert r["done"] == want["done"] and r["pos_from_end"] == want["pos_from_end"], r
        assert r["action_feedback"] == pytest.approx(want["feedback"])
        assert r["next_state_items"] == r["state_items"][1:] + [r["action"]]

    ev = _table(out / "eval")
    assert set(EVAL_COLUMNS) <= set(ev.column_names)
    sat = dict(zip(ev.column("row_id").to_pylist(), ev.column("eval_true_satisfaction").to_pylist()))
    for r in tr.slice(0, 200).to_pylist():
        assert sat[r["row_id"]] == pytest.approx(ref[(r["user_idx"], r["ts"])]["satisfaction"])

    assert cli(["inspect", str(out), "--rows", "1"]) == 0
    shown = capsys.readouterr().out
    assert "transitions/ schema" in shown and "vocab" in shown


@pytest.mark.integration
def test_bad_rows_are_quarantined_with_a_reason_and_counted(ray_cluster, tmp_path):
    d1, d2 = tmp_path / "in" / "day=2026-01-01", tmp_path / "in" / "day=2026-01-02"
    d1.mkdir(parents=True)
    d2.mkdir(parents=True)
    pq.write_table(_events([
        dict(user_id=1, item_id=10, ts=DAY1 + 100, click=1, watch_ratio=0.5, session_id=7),
        dict(user_id=1, item_id=11, ts=DAY1 + 200, click=1, watch_ratio=0.8, session_id=7),
        dict(user_id=1, item_id=10, ts=DAY1 + 100, click=1, watch_ratio=0.9, session_id=7),  # duplicate
        dict(user_id=1, item_id=12, ts=DAY1 + 150, click=1, watch_ratio=0.7, session_id=7),  # out of order
        dict(user_id=2, item_id=10, ts=DAY1 + 300, click=0),                  # valid, not engaged
        dict(user_id=2, item_id=13, ts=DAY1 + 400),                           # click unknown: engaged
        dict(user_id=None, item_id=13, ts=DAY1 + 5),
        dict(user_id=3, item_id=-5, ts=DAY1 + 10),
        dict(user_id=3, item_id=14, ts=DAY1 + 20, watch_ratio=float("nan")),
        dict(user_id=3, item_id=15, ts=DAY1 + 30, watch_ratio=1.5),
        dict(user_id=3, item_id=16, ts=DAY2 + 5),                              # outside its day
        dict(user_id=3, item_id=17, ts=DAY1 + 40, click=2),
        dict(user_id=3, item_id=2**62 + 1, ts=DAY1 + 50),
        dict(user_id=-1, item_id=18, ts=DAY1 + 60),
        dict(user_id=3, item_id=19, ts=DAY1 + 70, click=1, watch_ratio=0.25),
    ]), d1 / "part-0.parquet")
    pq.write_table(_events([
        dict(user_id="4", item_id=20, ts=DAY2 + 5, click=1),
        dict(user_id="abc", item_id=21, ts=DAY2 + 6, click=1),
        dict(user_id="4", item_id=22, ts=DAY2 + 5000, click=1),  # > session_gap_s later
    ], user_type=pa.string()), d2 / "part-0.parquet")

    m = prep.prepare_dataset(_cfg(state_len=3), f"file://{tmp_path}/in", f"file://{tmp_path}/out")  # URIs work
    expected = {"duplicate_event": 1, "ts_out_of_order": 1, "null_user_id": 1, "negative_item_id": 1,
                "nan_watch_ratio": 1, "watch_ratio_out_of_range": 1, "ts_outside_partition": 1,
                "click_out_of_range": 1, "item_id_out_of_range": 1, "negative_user_id": 1,
                "invalid_user_id": 1}
    assert m["rejects_by_reason"] == expected
    assert (m["rows_in"], m["rows_ok"], m["rows_rejected"]) == (18, 7, 11)
    assert (m["num_transitions"], m["rows_not_engaged"], m["num_users"], m["num_items"]) == (6, 1, 4, 6)

    rej = _table(tmp_path / "out" / "rejects")
    assert rej.num_rows == 11
    by_reason = {r["reject_reason"]: r for r in rej.to_pylist()}
    assert by_reason["duplicate_event"]["watch_ratio"] == pytest.approx(0.9)  # the later copy is quarantined
    assert by_reason["ts_out_of_order"]["item_id"] == 12
    assert by_reason["invalid_user_id"]["source_file"].endswith("day=2026-01-02/part-0.parquet")
    assert '"abc"' in by_reason["invalid_user_id"]["raw_line"]
    assert by_reason["nan_watch_ratio"]["source_file"].endswith("day=2026-01-01/part-0.parquet")

    vocab = prep.load_vocab(str(tmp_path / "out"))
    tr = _table(tmp_path / "out" / "transitions").sort_by([("user_idx", "ascending"), ("ts", "ascending")])
    u4 = tr.filter(pa.compute.equal(tr.column("user_idx"), int(vocab.user_index([4])[0]))).to_pylist()
    assert [r["done"] for r in u4] == [1, 1] and [r["pos_from_end"] for r in u4] == [1, 0]
    u2 = tr.filter(pa.compute.equal(tr.column("user_idx"), int(vocab.user_index([2])[0]))).to_pylist()
    assert [r["action"] for r in u2] == vocab.item_index([13]).tolist()  # the click=0 row is not an action
    assert u2[0]["action_feedback"] == 1.0  # unknown watch ratio


@pytest.mark.integration
def test_text_input_with_existing_vocab_extends_it(ray_cluster, tmp_path):
    base = prep.extend_vocab(None, [11, 12], [1])
    base.save(str(tmp_path / "old" / "vocab"))
    p = tmp_path / "log.csv"
    p.write_text("user_id,video_id,time_ms,is_click,play_time_ms,duration_ms,is_like,long_view\n"
                 "1,12,1649412000000,1,5000,10000,1,0\n"
                 "2,99,1649412060000,1,1000,10000,0,0\n"   # new user, new item
                 "2,11,1649412120000\n"                    # malformed: too few fields
                 "1,13,1649412180000,1,-5,10000,0,0\n")    # negative play time: ratio < 0
    m = prep.prepare_dataset(_cfg(format="kuairand"), str(p), str(tmp_path / "new"),
                             vocab_dir=str(tmp_path / "old"))
    assert (m["rows_in"], m["rows_ok"], m["rows_rejected"]) == (4, 2, 2)
    assert m["rejects_by_reason"] == {"malformed_row": 1, "watch_ratio_out_of_range": 1}
    assert m["vocab"]["new_items"] == 1 and m["vocab"]["new_users"] == 1
    v = prep.load_vocab(str(tmp_path / "new"))
    assert v.item_index([11, 12, 99]).tolist() == [1, 2, 3] and v.user_index([1, 2]).tolist() == [0, 1]
    ev = _table(tmp_path / "new" / "eval")
    assert sorted(ev.column("eval_like").to_pylist()) == [0, 1]
    rej = _table(tmp_path / "new" / "rejects")
    assert "2,11,1649412120000" in rej.filter(pa.compute.equal(rej.column("reject_reason"), "malformed_row")
                                              ).column("raw_line")[0].as_py()


@pytest.mark.integration
def test_all_rows_rejected_is_a_clear_error(ray_cluster, tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(_events([dict(user_id=-1, item_id=1, ts=5), dict(user_id=1, item_id=1, ts=-5)]),
                   tmp_path / "in" / "a.parquet")
    with pytest.raises(prep.EmptyDatasetError, match="no valid engaged events"):
        prep.prepare_dataset(_cfg(), str(tmp_path / "in"), str(tmp_path / "out"))
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["rows_rejected"] == 2 and m["num_transitions"] == 0


@pytest.mark.integration
def test_corrupt_data_pages_error_names_the_file(ray_cluster, tmp_path):
    (tmp_path / "in").mkdir()
    p = tmp_path / "in" / "x.parquet"
    n = 5000
    pq.write_table(pa.table({"user_id": np.arange(n) % 7, "item_id": np.arange(n) % 13, "ts": np.arange(n) + 10}),
                   p, compression="snappy")
    data = bytearray(p.read_bytes())
    data[100:2000] = bytes((b * 7 + 13) % 256 for b in data[100:2000])  # the footer stays readable
    p.write_bytes(bytes(data))
    assert pq.ParquetFile(p).metadata.num_rows == n
    with pytest.raises(InputError, match=r"x\.parquet: cannot read Parquet file") as info:
        prep.prepare_dataset(_cfg(), str(tmp_path / "in"), str(tmp_path / "out"))
    assert "Traceback" not in str(info.value)


@pytest.mark.integration
@pytest.mark.slow
def test_movielens_1m_real_data(ray_cluster, ml1m_dir, tmp_path):
    m = prep.prepare_dataset(_cfg(format="movielens", rows_per_shard=250_000),
                             str(ml1m_dir / "ratings_users0001-2999.dat"), str(tmp_path / "ml"))
    assert (m["rows_in"], m["rows_ok"], m["rows_rejected"]) == (487_650, 487_650, 0)
    assert (m["num_users"], m["num_items"], m["num_transitions"]) == (2999, 3615, 487_650)
    ev = pq.read_table(tmp_path / "ml" / "eval", columns=["eval_rating", "pos_from_end"])
    rating = ev.column("eval_rating").to_numpy()
    assert np.isclose((rating >= 4).mean(), 0.572, atol=0.001)  # the README's 57.2%
    assert (ev.column("pos_from_end").to_numpy() == 0).sum() == 2999  # one leave-last-out target per user


@pytest.mark.integration
def test_movielens_bad_bytes_and_millisecond_rows_are_quarantined_by_prepare(ray_cluster, tmp_path):
    lines = [f"{u % 50}::{u % 97}::4::{978300000 + u}".encode() for u in range(1000)]
    lines[300:300] = [b"7::8::5::97830\xff0760", b"1::2::3", b"3::4::5::978300000123"]
    (tmp_path / "ratings.dat").write_bytes(b"\n".join(lines) + b"\n")
    m = prep.prepare_dataset(_cfg(format="movielens"), str(tmp_path / "ratings.dat"), str(tmp_path / "out"))
    assert (m["rows_in"], m["rows_ok"], m["rows_rejected"]) == (1003, 1000, 3)
    assert m["rejects_by_reason"] == {"malformed_row": 1, "ts_out_of_range": 1, "undecodable_row": 1}
    assert m["reject_hints"] == {"ts_out_of_range: looks like milliseconds": 1}
    rej = {r["reject_reason"]: r["raw_line"] for r in _table(tmp_path / "out" / "rejects").to_pylist()}
    assert rej["undecodable_row"] == "7::8::5::97830\\xff0760" and rej["malformed_row"] == "1::2::3"
    assert "hints: ts_out_of_range: looks like milliseconds (1)" in prep.summarize_manifest(m)
