"""`mtrec prepare` with impressions: the ``slates/`` table, its rejects and accounting, ``slate_id`` in transitions.

Unit tests call the slates UDFs and the path resolution directly; integration tests run the whole Ray Data
pipeline on the session's local cluster (``ray_cluster``), as tests/test_prepare.py does.
"""
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

import ray

from mtrec_dist.config import EvalConfig, PipelineConfig, PrepareConfig, RewardConfig, TrainConfig
from mtrec_dist.data import prepare as prep
from mtrec_dist.data import slates as sl
from mtrec_dist.data.dataset import SLATE_REJECTS_DIR, SLATE_SCHEMA, SLATES_DIR
from mtrec_dist.data.readers import InputError
from mtrec_dist.data.schema import EVENT_SCHEMA, NO_SLATE, TRANSITION_COLUMNS
from mtrec_dist.data.simulator import EXPOSURE_SCHEMA
from mtrec_dist.data.summaries import manifest_line, summarize_manifest
from mtrec_dist.data.vocab import extend_vocab
from mtrec_dist.training.reward import training_transitions

DAY1 = 1767225600  # 2026-01-01 (UTC)
DAY_DIR = "day=2026-01-01"


def _cfg(**kw) -> PrepareConfig:
    return PrepareConfig(**{**dict(progress=False, rows_per_shard=1000, state_len=3), **kw})


def _events(rows: list[dict]) -> pa.Table:
    schema = pa.schema([f.with_nullable(True) for f in EVENT_SCHEMA])
    return pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)


def _impressions(rows: list[tuple]) -> pa.Table:
    """Rows of (user_id, slate_id, items, click_index) as the simulator writes them."""
    schema = pa.schema([f.with_nullable(True) for f in EXPOSURE_SCHEMA])
    return pa.Table.from_pylist([dict(user_id=u, session_id=1, slate_id=s, ts=DAY1, items=items, click_index=c)
                                 for u, s, items, c in rows], schema=schema)


def _write_sim(root, logs="logs", impressions="impressions"):
    """A tiny simulator-like layout: ``<root>/<logs>/day=.../part-0.parquet`` and two impression files.

    Item 20, 21 and 22 are shown but never engaged; user 9 is shown a slate but has no event; one event has
    no slate_id; user 1's slate 100 is logged twice (the copy in part-1 must be refused)."""
    (root / logs / DAY_DIR).mkdir(parents=True)
    (root / impressions / DAY_DIR).mkdir(parents=True)
    pq.write_table(_events([
        dict(user_id=1, item_id=10, ts=DAY1 + 100, click=1, session_id=1, slate_id=100),
        dict(user_id=1, item_id=11, ts=DAY1 + 200, click=1, session_id=1, slate_id=101),
        dict(user_id=1, item_id=12, ts=DAY1 + 300, click=1, session_id=1),  # no slate_id
        dict(user_id=2, item_id=10, ts=DAY1 + 400, click=1, session_id=2, slate_id=200),
        dict(user_id=3, item_id=13, ts=DAY1 + 500, click=0, session_id=3, slate_id=300),  # valid, not engaged
    ]), root / logs / DAY_DIR / "part-0.parquet")
    pq.write_table(_impressions([
        (1, 100, [10, 20, 11], 0),
        (1, 101, [11, 10, 12], 0),
        (2, 200, [21, 10, 22], 1),
        (3, 300, [13, 10, 11], -1),
        (9, 900, [10, 11, 12], -1),    # no event of user 9
        (1, None, [10, 11, 12], -1),   # null slate_id
        (2, 201, None, -1),            # null items
        (2, 202, [10, 11], -1),        # shorter than the others
    ]), root / impressions / DAY_DIR / "part-0.parquet")
    pq.write_table(_impressions([(1, 100, [10, 11, 12], -1)]), root / impressions / DAY_DIR / "part-1.parquet")
    return root


def _table(path) -> pa.Table:
    return pds.dataset(str(path), format="parquet").to_table()


# ---- unit: the UDFs and the path resolution ---------------------------------------------------------------
def test_index_slates_maps_ids_and_gives_each_refused_row_its_first_reason():
    vocab = extend_vocab(None, [10, 11, 12], [1, 2])
    batch = pa.table({
        "user_id": pa.array([1, 3, None, 1, 1, 1, 2, 1], pa.int64()),
        "slate_id": pa.array([5, 7, 8, None, 9, 10, 11, 5], pa.int64()),
        "items": pa.array([[10, 99, 12], [10, 11, 12], [10, 11, 12], [10, 11, 12], [10, None, 12], [10, 11],
                           [10, 11, 12], [12, 11, 10]], pa.list_(pa.int64())),
        "click_index": pa.array([2, 0, 0, 0, 0, 0, 3, 0], pa.int8()),
        "path": pa.array(["b"] * 7 + ["a"]),
    })
    assert sl.common_length(sl.length_counts(batch)) == (8, 3)
    out = sl.refuse_duplicates(sl.index_slates(batch, vocab=vocab, slate_len=3, id_type="int"))
    assert out.column("reject_reason").to_pylist() == [
        sl.DUPLICATE, sl.UNKNOWN_USER, sl.MISSING_USER, sl.MISSING_SLATE, sl.MISSING_ITEMS, sl.BAD_LENGTH,
        sl.BAD_CLICK, None]  # of the two (user 1, slate 5) rows, the one from file "a" stays
    kept = sl.slate_rows(out.filter(pc.is_null(out.column("reject_reason"))))
    assert kept.schema == SLATE_SCHEMA
    assert kept.to_pylist() == [dict(user_idx=0, slate_id=5, slate_items=[3, 2, 1], click_index=0)]
    first = sl.index_slates(batch.slice(0, 1), vocab=vocab, slate_len=3, id_type="int")
    assert first.column("slate_items").to_pylist() == [[1, 0, 3]] and first.column("_unknown").to_pylist() == [1]
    rejects = sl.reject_rows(out.filter(pc.is_valid(out.column("reject_reason"))))
    assert rejects.column_names == ["user_id", "slate_id", "items", "click_index", "reject_reason", "source_file"]
    assert rejects.column("click_index").to_pylist()[6] == 3  # as read, not clipped


def test_string_ids_are_looked_up_in_the_vocab_strings():
    vocab = extend_vocab(None, np.array(["a", "b"], object), np.array(["u1", "u2"], object))
    batch = pa.table({"user_id": ["u2", "nobody"], "slate_id": pa.array([1, 2], pa.int64()),
                      "items": [["b", "x"], ["a", "b"]], "click_index": pa.array([0, -1], pa.int8())})
    out = sl.index_slates(batch, vocab=vocab, slate_len=2, id_type="string")
    assert out.column("user_idx").to_pylist() == [1, -1]
    assert out.column("slate_items").to_pylist()[0] == [2, 0]
    assert out.column("reject_reason").to_pylist() == [None, sl.UNKNOWN_USER]
    with pytest.raises(InputError, match="user_id .* cannot be read as int64"):
        sl.index_slates(batch, vocab=vocab, slate_len=2, id_type="int")


def test_match_counts_join_transitions_to_their_slates():
    tr = pa.table({"user_idx": pa.array([0, 0, 1], pa.int64()), "slate_id": pa.array([5, 6, 5], pa.int64()),
                   "action": pa.array([3, 1, 2], pa.int64())})
    slates = pa.table({"user_idx": pa.array([0, 1], pa.int64()), "slate_id": pa.array([5, 7], pa.int64()),
                       "slate_items": pa.array([[1, 2, 3], [2, 1, 0]], pa.list_(pa.int64())),
                       "click_index": pa.array([2, -1], pa.int8())})
    both = pa.concat_tables([sl.clicked_keys(tr, side=0), sl.clicked_keys(slates, side=1)])
    assert sl.match_counts(both).to_pylist() == [dict(transitions_with_slate_id=3, transitions_in_slates=1,
                                                      slates_with_click_in_transitions=1, click_matches_action=1)]


def test_the_driver_join_keeps_row_order_pads_missing_slates_and_copies_a_twice_seen_key():
    from mtrec_dist.data.slate_join import with_slates_table

    tr = pa.table({"user_idx": [1, 2, 3, 1], "slate_id": [0, 1, NO_SLATE, 5], "row_id": [7, 3, 9, 1]})
    slates = pa.table({"user_idx": [2, 1], "slate_id": [1, 0],
                       "slate_items": pa.array([[3, 4], [1, 2]], pa.list_(pa.int64()))})
    joined = with_slates_table(tr, slates, width=2)
    assert joined.column("row_id").to_pylist() == [7, 3, 9, 1]  # the transitions' order
    assert joined.column("slate_items").to_pylist() == [[1, 2], [3, 4], [0, 0], [0, 0]]  # no slate: padding
    twice = pa.concat_tables([slates, slates.slice(0, 1)])
    assert with_slates_table(tr, twice, width=2).column("row_id").to_pylist() == [7, 3, 3, 9, 1]  # the caller counts


def test_a_day_without_slates_gets_padding_and_days_of_other_lengths_are_refused():
    from mtrec_dist.data.slate_join import no_slates
    from mtrec_dist.training.reward import _one_slate_length

    padded = no_slates(pa.table({"user_idx": [1, 2]}), width=3)
    assert padded.column("slate_items").to_pylist() == [[0, 0, 0], [0, 0, 0]]
    assert _one_slate_length({"d1": ("s1", 3), "d2": None}) == 3 and _one_slate_length({"d1": None}) is None
    with pytest.raises(ValueError, match="slates of different lengths"):
        _one_slate_length({"d1": ("s1", 3), "d2": ("s2", 4)})


def test_impressions_beside_the_logs_are_found_and_an_explicit_path_must_exist(tmp_path):
    sim = _write_sim(tmp_path / "sim")
    assert sl.beside_logs(str(sim / "logs")) == str(sim / "impressions")
    assert sl.beside_logs(str(sim / "logs") + "/") == str(sim / "impressions")
    assert sl.beside_logs(str(sim / "logs" / DAY_DIR)) == str(sim / "impressions" / DAY_DIR)  # one day
    assert sl.beside_logs(str(sim / "logs" / DAY_DIR / "part-0.parquet")) == ""
    assert sl.beside_logs(str(tmp_path / "elsewhere" / "logs")) == ""  # no impressions/ there
    assert sl.find_impressions("none", str(sim / "logs")) is None
    assert sl.find_impressions("", str(sim / "logs")).uri == str(sim / "impressions")
    assert len(sl.find_impressions(str(sim / "impressions"), str(tmp_path)).files) == 2
    missing = tmp_path / "no" / "such" / "impressions"
    with pytest.raises(InputError, match=f"prepare.impressions: {missing} not found"):
        prep.prepare_dataset(_cfg(impressions=str(missing)), str(sim / "logs"), str(tmp_path / "out"))
    pq.write_table(pa.table({"user_id": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad\.parquet lacks column\(s\) \['slate_id', 'items', 'click_index'\]"):
        prep.prepare_dataset(_cfg(impressions=str(tmp_path / "bad.parquet")), str(sim / "logs"),
                             str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # refused before anything was written


# ---- integration: the whole pipeline on Ray Data ----------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("read_by", ["driver", "ray_data"])
def test_prepare_writes_slates_rejects_and_their_accounting(ray_cluster, tmp_path, monkeypatch, read_by):
    if read_by == "ray_data":  # impressions over sl.DRIVER_READ_BYTES are read by Ray Data's Parquet reader
        monkeypatch.setattr(sl, "DRIVER_READ_BYTES", 0)
    sim, out, lines = _write_sim(tmp_path / "sim"), tmp_path / "prepared", []
    m = prep.prepare_dataset(_cfg(), str(sim / "logs"), str(out), progress=lines.append)
    vocab = prep.load_vocab(str(out))
    item = lambda *raw: [int(i) for i in vocab.item_index(list(raw))]  # noqa: E731  (0 = not in the vocab)
    user = lambda raw: int(vocab.user_index([raw])[0])  # noqa: E731

    slates = _table(out / SLATES_DIR).sort_by([("user_idx", "ascending"), ("slate_id", "ascending")])
    assert slates.schema == SLATE_SCHEMA
    assert slates.to_pylist() == [
        dict(user_idx=user(1), slate_id=100, slate_items=item(10, 20, 11), click_index=0),  # part-0's copy
        dict(user_idx=user(1), slate_id=101, slate_items=item(11, 10, 12), click_index=0),
        dict(user_idx=user(2), slate_id=200, slate_items=item(21, 10, 22), click_index=1),
        dict(user_idx=user(3), slate_id=300, slate_items=item(13, 10, 11), click_index=-1),
    ]
    assert item(20, 21, 22) == [0, 0, 0]
    rejects = {r["reject_reason"]: r for r in _table(out / SLATE_REJECTS_DIR).to_pylist()}
    assert rejects[sl.UNKNOWN_USER]["user_id"] == 9 and rejects[sl.BAD_LENGTH]["items"] == [10, 11]
    assert rejects[sl.DUPLICATE]["source_file"].endswith("part-1.parquet")

    entry = m["slates"]
    assert entry["input"] == str(sim / "impressions") and entry["slate_len"] == 3
    assert (entry["rows_in"], entry["rows_ok"], entry["rows_rejected"]) == (9, 4, 5)
    assert entry["rejects_by_reason"] == {sl.BAD_LENGTH: 1, sl.DUPLICATE: 1, sl.MISSING_ITEMS: 1,
                                          sl.MISSING_SLATE: 1, sl.UNKNOWN_USER: 1}
    assert entry["items_unknown"] == 3 and entry["items_unknown_share"] == pytest.approx(0.25)
    assert (entry["transitions_with_slate_id"], entry["transitions_in_slates"],
            entry["slates_with_click_in_transitions"], entry["click_matches_action"]) == (3, 3, 3, 3)
    assert sum(s["rows"] for s in entry["shards"][SLATES_DIR]) == 4
    assert prep.load_manifest(str(out))["slates"] == entry
    assert "  slates: 9 impressions in = 4 ok + 5 rejected" in summarize_manifest(m)  # `mtrec inspect`
    assert "; 4 slates shown (impressions in 9 = ok 4 + rejected 5)" in manifest_line(m)  # `mtrec pipeline`
    assert any(line.startswith("[prepare] slates: 9 impressions in = 4 ok + 5 rejected") and "25.0%" in line
               for line in lines), lines

    tr = _table(out / "transitions").sort_by([("user_idx", "ascending"), ("ts", "ascending")])
    assert tr.schema.names == TRANSITION_COLUMNS and tr.column("slate_id").null_count == 0
    assert tr.column("slate_id").to_pylist() == [100, 101, NO_SLATE, 200]

    if read_by == "ray_data":
        return  # the join below reads prepare's output, the same either way: checked once
    # the reward stage joins each click's slate onto its transition (padding where it has none): in the driver
    # for a small set (train.driver_read_mb), else with Ray Data's join
    everyone = EvalConfig(heldout_user_share=0.0)  # four rows of two users: none held out
    for driver_read_mb in (256.0, 0.0):
        cfg = PipelineConfig(prepare=_cfg(), train=TrainConfig(driver_read_mb=driver_read_mb), eval=everyone)
        joined = training_transitions(cfg, str(out), tr.num_rows).to_arrow_refs()
        joined = pa.concat_tables([ray.get(r) for r in joined]).sort_by([("user_idx", "ascending"), ("ts", "ascending")])
        assert joined.column("row_id").to_pylist() == tr.column("row_id").to_pylist()
        assert joined.column("slate_items").to_pylist() == [item(10, 20, 11), item(11, 10, 12), [0, 0, 0],
                                                            item(21, 10, 22)], driver_read_mb
    for driver_read_mb in (256.0, 0.0):
        off = PipelineConfig(prepare=_cfg(), reward=RewardConfig(slate_choice=False),
                             train=TrainConfig(driver_read_mb=driver_read_mb), eval=everyone)
        assert "slate_items" not in training_transitions(off, str(out), tr.num_rows).schema().names


@pytest.mark.integration
def test_explicit_impressions_then_none_on_overwrite(ray_cluster, tmp_path):
    """An input not named logs finds no impressions by itself; a path given is read; "none" reads none and,
    overwriting, leaves no slates of the previous run behind."""
    sim, out = _write_sim(tmp_path / "sim", logs="events", impressions="shown"), tmp_path / "prepared"
    m = prep.prepare_dataset(_cfg(), str(sim / "events"), str(out))
    assert m["slates"] is None and not (out / SLATES_DIR).exists()
    m = prep.prepare_dataset(_cfg(impressions=str(sim / "shown"), overwrite=True), str(sim / "events"), str(out))
    assert m["slates"]["rows_ok"] == 4 and (out / SLATES_DIR).is_dir() and (out / SLATE_REJECTS_DIR).is_dir()
    m = prep.prepare_dataset(_cfg(impressions="none", overwrite=True), str(sim / "events"), str(out))
    assert m["slates"] is None and not (out / SLATES_DIR).exists() and not (out / SLATE_REJECTS_DIR).exists()
    assert _table(out / "transitions").column("slate_id").to_pylist().count(NO_SLATE) == 1


@pytest.mark.integration
def test_string_ids_slates(ray_cluster, tmp_path):
    """``prepare.id_type=string``: the impressions' text ids are looked up in the vocab's strings."""
    logs, shown = tmp_path / "sim" / "logs", tmp_path / "sim" / "impressions"
    logs.mkdir(parents=True)
    shown.mkdir()
    pq.write_table(pa.table({"user_id": ["ua", "ua", "ub"], "item_id": ["x", "y", "x"],
                             "ts": [DAY1, DAY1 + 60, DAY1 + 120], "slate_id": pa.array([1, None, 2], pa.int64())}),
                   logs / "part-0.parquet")
    pq.write_table(pa.table({"user_id": ["ua", "ub", "uc"], "slate_id": pa.array([1, 2, 3], pa.int64()),
                             "items": [["x", "z"], ["y", "x"], ["x", "y"]],
                             "click_index": pa.array([0, 1, 0], pa.int8())}),
                   shown / "part-0.parquet")
    out = tmp_path / "prepared"
    m = prep.prepare_dataset(_cfg(id_type="string"), str(logs), str(out))
    vocab = prep.load_vocab(str(out))
    assert m["slates"]["rejects_by_reason"] == {sl.UNKNOWN_USER: 1} and m["slates"]["items_unknown"] == 1
    assert m["slates"]["click_matches_action"] == m["slates"]["transitions_with_slate_id"] == 2
    rows = _table(out / SLATES_DIR).sort_by("slate_id").to_pylist()
    assert [r["user_idx"] for r in rows] == vocab.user_index(["ua", "ub"]).tolist()
    assert rows[0]["slate_items"] == [int(vocab.item_index(["x"])[0]), 0]
    assert sorted(_table(out / "transitions").column("slate_id").to_pylist()) == [NO_SLATE, 1, 2]


def test_the_order_term_on_logs_with_impressions_gets_a_note():
    import dataclasses

    from mtrec_dist.training.reward import order_term_note

    cfg = PipelineConfig()
    with_slates = {"slates": {"rows_ok": 1200}}
    assert order_term_note(cfg, with_slates) is None  # the order term is off by default
    cfg.reward = dataclasses.replace(cfg.reward, order_items=8)
    assert "1,200 slates" in order_term_note(cfg, with_slates)
    assert order_term_note(cfg, {"slates": {"rows_ok": 0}}) is None and order_term_note(cfg, {}) is None
