"""String user/item ids (UUIDs, ASINs, hashes) through the generic CSV / Parquet readers (issue 11).

With ``prepare.id_type=string`` the ids are kept as text (trimmed), mapped through the vocabulary like
integer ids (the vocab keeps the raw string), and daily retraining extends that vocab keeping every old
index; an empty id or one over 256 bytes is refused with a reason.  Prepared transitions only ever hold
indices, so training is unaffected.  The default (``id_type=int``) is unchanged: a text id is
``invalid_user_id``.
"""
from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from mtrec_dist.config import ConfigError, PrepareConfig
from mtrec_dist.data import prepare as prep
from mtrec_dist.data.schema import MAX_ID_BYTES, TRANSITION_COLUMNS

AMAZON_MAP = {"user": "user_id", "item": "item_id", "rating": "eval_rating"}
T0 = 1_400_000_000  # 2014-05-13, inside the Amazon reviews years
ALPHA = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _cfg(**kw) -> PrepareConfig:
    base = dict(format="csv", column_map=dict(AMAZON_MAP), id_type="string", progress=False, rows_per_shard=1000,
                state_len=4)
    base.update(kw)
    return PrepareConfig(**base)


def _asin(rng: random.Random) -> str:
    return "B" + "".join(rng.choice(ALPHA) for _ in range(9))  # like B00004Y2UT


def _reviewer(rng: random.Random) -> str:
    return "A" + "".join(rng.choice(ALPHA) for _ in range(13))  # like A2IBPI20UZIR0U


def amazon_csv(path, rows: int = 300, seed: int = 0, users=None, items=None, t0: int = T0) -> dict:
    """An Amazon-reviews-style ``user,item,rating,ts`` file (5-core-like: each user reviews several
    items); returns the users, items and rows written."""
    rng = random.Random(seed)
    users = users or [_reviewer(rng) for _ in range(30)]
    items = items or [_asin(rng) for _ in range(40)]
    seen, lines = set(), ["user,item,rating,ts"]
    while len(lines) - 1 < rows:
        u, i, ts = rng.choice(users), rng.choice(items), t0 + rng.randrange(0, 86_400 * 30)
        if (u, i, ts) in seen:
            continue
        seen.add((u, i, ts))
        lines.append(f"{u},{i},{rng.randint(1, 5)}.0,{ts}")
    path.write_text("\n".join(lines) + "\n")
    return {"users": users, "items": items, "rows": lines[1:]}


def _table(path) -> pa.Table:
    return pds.dataset(str(path), format="parquet").to_table()


# ---- unit: readers and validation (no Ray) -------------------------------------------------------------
def test_string_ids_are_kept_trimmed_and_bad_ones_refused_with_a_reason(tmp_path):
    p = tmp_path / "reviews.csv"
    long_id = "A" * (MAX_ID_BYTES + 1)
    p.write_text("user,item,rating,ts\n"
                 "A2IBPI20UZIR0U,B00004Y2UT,5.0,1400000000\n"
                 "  A14VAT5EAX3D9S , B00004Y2UT ,4.0,1400000100\n"  # spaces around ids are trimmed
                 ",B00004Y2UT,3.0,1400000200\n"                      # empty user id
                 f"A2IBPI20UZIR0U,{long_id},3.0,1400000300\n"        # an item id over 256 bytes
                 f"A2IBPI20UZIR0U,{'é' * 128},3.0,1400000400\n"      # 128 characters, but 256 bytes: kept
                 "12345,678,2.0,1400000500\n")                       # digits are ids like any other text
    out = prep.validate_local(_cfg(), str(p))
    assert out.schema.field("user_id").type == pa.string() and out.schema.field("item_id").type == pa.string()
    assert out.num_rows == 6
    ok = out.filter(pc.is_null(out.column("reject_reason")))
    assert ok.column("user_id").to_pylist() == ["A2IBPI20UZIR0U", "A14VAT5EAX3D9S", "A2IBPI20UZIR0U", "12345"]
    assert ok.column("item_id").to_pylist() == ["B00004Y2UT", "B00004Y2UT", "é" * 128, "678"]
    bad = out.filter(pc.is_valid(out.column("reject_reason")))
    assert bad.column("reject_reason").to_pylist() == [
        "invalid_user_id", f"item_id_out_of_range: longer than {MAX_ID_BYTES} bytes"]
    assert long_id in bad.column("raw_line")[1].as_py()


def test_integer_ids_stay_as_they_are_by_default(tmp_path):
    p = tmp_path / "reviews.csv"
    p.write_text("user,item,rating,ts\nA2IBPI20UZIR0U,B00004Y2UT,5.0,1400000000\n7,8,5.0,1400000000\n")
    out = prep.validate_local(_cfg(id_type="int"), str(p))
    assert out.schema.field("user_id").type == pa.int64()
    assert out.column("reject_reason").to_pylist() == ["invalid_user_id", None]


def test_parquet_string_and_integer_columns_read_as_string_ids(tmp_path):
    pq.write_table(pa.table({"user_id": pa.array(["u-1", " u-2 ", None, ""]),
                             "item_id": pa.array([10, 2**62, 7, 8], pa.int64()),
                             "ts": pa.array([T0] * 4, pa.int64())}), tmp_path / "a.parquet")
    out = prep.validate_local(_cfg(format="parquet", column_map={}), str(tmp_path / "a.parquet"))
    assert out.column("user_id").to_pylist() == ["u-1", "u-2", None, None]
    assert out.column("item_id").to_pylist() == ["10", str(2**62), "7", "8"]  # a refused row keeps its values
    assert out.column("reject_reason").to_pylist() == [None, None, "null_user_id", "invalid_user_id"]


def test_string_ids_need_a_generic_format():
    with pytest.raises(ConfigError, match="id_type"):
        PrepareConfig(format="movielens", id_type="string").validate()


def test_a_string_vocab_extends_keeping_old_indices_and_round_trips(tmp_path):
    old = prep.extend_vocab(None, ["B0002", "B0001"], ["A9", "A1"])
    assert old.item_index(["B0001", "B0002", "nope"]).tolist() == [1, 2, 0]  # raw-id order, 0 = unknown
    new = prep.extend_vocab(old, ["B0003", "B0001", "B0000"], ["A5"], [2, 3, 1], [4])
    assert new.item_raw.tolist() == ["B0001", "B0002", "B0000", "B0003"]  # old first, new appended in order
    assert new.item_count.tolist() == [3, 0, 1, 2] and new.user_index(["A1", "A9", "A5"]).tolist() == [0, 1, 2]
    assert new.item_raw_id([0, 3]).tolist() == [None, "B0000"]
    new.save(str(tmp_path / "vocab"))
    back = prep.load_vocab(str(tmp_path / "vocab"))
    assert back.item_raw.tolist() == new.item_raw.tolist() and back.user_raw.tolist() == new.user_raw.tolist()
    assert pq.read_table(tmp_path / "vocab" / "items.parquet").schema.field("raw_id").type == pa.string()
    with pytest.raises(prep.InputError, match="integer ids"):
        prep.extend_vocab(prep.extend_vocab(None, [1], [1]), ["B0001"], ["A1"])


# ---- integration: prepare on Ray, two days ------------------------------------------------------------
@pytest.mark.integration
def test_amazon_style_reviews_prepare_and_a_second_day_extends_the_vocab(ray_cluster, tmp_path):
    day1 = amazon_csv(tmp_path / "day1.csv", rows=300, seed=1)
    m1 = prep.prepare_dataset(_cfg(), str(tmp_path / "day1.csv"), str(tmp_path / "p1"),
                              carry_out=str(tmp_path / "carry1"))
    assert m1["rows_in"] == 300 == m1["rows_ok"] + m1["rows_rejected"] and m1["rows_rejected"] == 0
    assert m1["num_transitions"] == 300 and m1["id_type"] == "string"  # every review is an engaged event
    v1 = prep.load_vocab(str(tmp_path / "p1"))
    assert set(v1.user_raw.tolist()) <= set(day1["users"]) and set(v1.item_raw.tolist()) <= set(day1["items"])
    assert v1.item_raw.tolist() == sorted(v1.item_raw.tolist())  # raw-id order
    tr = _table(tmp_path / "p1" / "transitions")
    assert tr.schema.names == TRANSITION_COLUMNS and tr.schema.field("action").type == pa.int64()
    assert 1 <= pc.min(tr.column("action")).as_py() and pc.max(tr.column("action")).as_py() == v1.num_items
    # each transition's action is its review's item, each user's sequence ordered by time
    by_key = {}
    for line in day1["rows"]:
        u, i, _, ts = line.split(",")
        by_key[(u, int(ts))] = i
    got = {(v1.user_raw[r["user_idx"]], r["ts"]): v1.item_raw[r["action"] - 1] for r in tr.to_pylist()}
    assert got == by_key
    carry = prep.load_carry(str(tmp_path / "carry1"), 4)
    assert carry.schema.field("user_id").type == pa.string() and carry.num_rows == v1.num_users

    # day 2: some old reviewers and items, new ones too, and two bad rows
    rng = random.Random(7)
    users = day1["users"][:10] + [_reviewer(rng) for _ in range(5)]
    items = day1["items"][:10] + [_asin(rng) for _ in range(8)]
    day2 = amazon_csv(tmp_path / "day2.csv", rows=150, seed=2, users=users, items=items, t0=T0 + 86_400 * 40)
    with open(tmp_path / "day2.csv", "a") as f:
        f.write(f",{items[0]},4.0,{T0 + 86_400 * 41}\n{users[0]},{'B' * 300},4.0,{T0 + 86_400 * 41}\n")
    m2 = prep.prepare_dataset(_cfg(), str(tmp_path / "day2.csv"), str(tmp_path / "p2"),
                              vocab_dir=str(tmp_path / "p1"), carry_in=str(tmp_path / "carry1"),
                              carry_out=str(tmp_path / "carry2"), row_id_offset=m1["next_row_id"])
    assert m2["rows_in"] == 152 == m2["rows_ok"] + m2["rows_rejected"] and m2["rows_rejected"] == 2
    assert m2["rejects_by_reason"] == {"invalid_user_id": 1, "item_id_out_of_range": 1}
    v2 = prep.load_vocab(str(tmp_path / "p2"))
    assert v2.item_raw[:v1.num_items].tolist() == v1.item_raw.tolist()  # old indices kept
    assert v2.user_raw[:v1.num_users].tolist() == v1.user_raw.tolist()
    new_items = {i for i in items if i not in set(v1.item_raw.tolist())} & {ln.split(",")[1] for ln in day2["rows"]}
    assert set(v2.item_raw[v1.num_items:].tolist()) == new_items and m2["vocab"]["new_items"] == len(new_items)
    tr2 = _table(tmp_path / "p2" / "transitions")
    assert tr2.num_rows == 150 and pc.min(tr2.column("row_id")).as_py() >= m1["next_row_id"]
    # a returning reviewer's first state today continues from yesterday's last items
    first = tr2.filter(pc.equal(tr2.column("user_idx"), int(v2.user_index([users[0]])[0]))).sort_by("ts")
    if first.num_rows and users[0] in set(carry.column("user_id").to_pylist()):
        carried = carry.filter(pc.equal(carry.column("user_id"), users[0])).column("state_raw")[0].as_py()
        assert [v2.item_raw_id([i])[0] for i in first.column("state_items")[0].as_py()] == carried
    rej = _table(tmp_path / "p2" / "rejects")
    assert rej.schema.field("user_id").type == pa.string()
    assert sorted(rej.column("reject_reason").to_pylist()) == [
        "invalid_user_id", f"item_id_out_of_range: longer than {MAX_ID_BYTES} bytes"]


@pytest.mark.integration
def test_duplicates_of_string_ids_are_rejected_with_their_text(ray_cluster, tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("user,item,rating,ts\n"
                 "A2IBPI20UZIR0U,B00004Y2UT,5.0,1400000000\n"
                 "A2IBPI20UZIR0U,B00004Y2UT,4.0,1400000000\n"  # duplicate (same user, item, ts)
                 "A2IBPI20UZIR0U,B00004Y2UU,4.0,1400000100\n")
    m = prep.prepare_dataset(_cfg(), str(p), str(tmp_path / "out"))
    assert m["rejects_by_reason"] == {"duplicate_event": 1} and m["num_transitions"] == 2
    rej = _table(tmp_path / "out" / "rejects").to_pylist()
    assert [(r["user_id"], r["item_id"], r["eval_rating"]) for r in rej] == [("A2IBPI20UZIR0U", "B00004Y2UT", 4.0)]


@pytest.mark.integration
def test_string_ids_read_as_integers_fail_with_a_hint(ray_cluster, tmp_path):
    amazon_csv(tmp_path / "r.csv", rows=20, seed=4)
    with pytest.raises(prep.EmptyDatasetError, match=r"invalid_user_id.*set prepare.id_type=string"):
        prep.prepare_dataset(_cfg(id_type="int"), str(tmp_path / "r.csv"), str(tmp_path / "out"))


# ---- integration, slow: the whole pipeline on string-id logs ---------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_amazon_style_reviews_train_and_score_end_to_end(ray_cluster, tmp_path, capsys):
    """`mtrec pipeline` with ``source: logs`` on string ids and configs/tiny.yaml budgets: prepare ->
    train-reward -> score-rewards -> train-rec (one SASRec guided by the scored rewards) -> evaluate
    (2-3 minutes on 2 CPUs)."""
    import json
    from pathlib import Path

    from mtrec_dist.cli import main as cli

    root = Path(__file__).resolve().parents[1]
    amazon_csv(tmp_path / "reviews.csv", rows=300, seed=3)
    run_dir = tmp_path / "run"
    sets = [f"run_dir={run_dir}", "source=logs", f"prepare.input={tmp_path / 'reviews.csv'}", "prepare.format=csv",
            "prepare.id_type=string", "prepare.column_map={user: user_id, item: item_id, rating: eval_rating}",
            "rec.guidances=[reweight]"]
    assert cli(["pipeline", "--config", str(root / "configs" / "tiny.yaml"), "--quiet"]
               + [a for s in sets for a in ("--set", s)]) == 0
    assert "report:" in capsys.readouterr().out
    m = prep.load_manifest(str(run_dir / "prepared"))
    assert m["id_type"] == "string" and m["rows_in"] == 300 == m["rows_ok"] + m["rows_rejected"]
    scored = _table(run_dir / "rewards")
    assert scored.num_rows == m["num_transitions"]
    assert all(np.isfinite(pc.min(scored.column(c)).as_py()) for c in scored.column_names
               if pa.types.is_floating(scored.schema.field(c).type))
    res = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert [(r["backbone"], r["guidance"]) for r in res["recommenders"]] == [("sasrec", "reweight")]
    for r in res["recommenders"]:
        hr = r["offline"]["all"]["HR@10"]
        assert 0.0 <= hr <= 1.0 and r["curve"] and all(np.isfinite(h["loss"]) for h in r["curve"])
