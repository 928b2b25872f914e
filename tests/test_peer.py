"""`mtrec bench --peer recbole`: the RecBole input files, the report rows and the messages when the peer cannot
run.  Only the last test runs RecBole; it skips when the peer environment (scripts/peer_recbole_env.sh) is absent."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from mtrec_dist.bench import peer
from mtrec_dist.bench.report import collect_ratios, markdown

RATINGS = "\n".join([  # user::item::rating::ts, out of time order within users, one tie (user 2, ts 50)
    "2::20::4::60", "1::10::5::30", "2::21::3::50", "1::11::4::10", "2::22::2::50", "3::30::1::5",
]) + "\n"


def _ratings(tmp_path: Path) -> str:
    path = tmp_path / "ratings.dat"
    path.write_text(RATINGS)
    return str(path)


def test_inter_file_is_sorted_by_user_then_time_keeping_file_order_on_ties(tmp_path):
    rows = peer.read_ratings(_ratings(tmp_path))
    out = peer.write_inter(rows, tmp_path / "recbole")
    assert out == tmp_path / "recbole" / peer.DATASET / f"{peer.DATASET}.inter"
    lines = out.read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    body = [line.split("\t") for line in lines[1:]]
    assert [(u, i) for u, i, _, _ in body] == [("1", "11"), ("1", "10"), ("2", "21"), ("2", "22"), ("2", "20"),
                                               ("3", "30")]
    assert body[0] == ["1", "11", "4", "10"]


def test_max_users_keeps_the_smallest_user_ids(tmp_path):
    rows = peer.read_ratings(_ratings(tmp_path), max_users=2)
    assert sorted({r[0] for r in rows}) == [1, 2] and len(rows) == 5
    subset = peer.write_ratings(rows, tmp_path / "sub" / "ratings.dat")
    assert peer.read_ratings(str(subset)) == rows  # our prepare reads exactly the events RecBole reads


def test_training_input_skips_empty_states_and_validation_rows(tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "prepared" / "transitions").mkdir(parents=True)
    table = pa.table({"state_items": pa.array([[0, 0, 0], [0, 5, 7], [1, 2, 3], [0, 0, 4]], pa.list_(pa.int64())),
                      "pos_from_end": pa.array([3, 2, 1, 4], pa.int32())})
    pq.write_table(table, tmp_path / "prepared" / "transitions" / "part-0.parquet")
    out = peer.training_input(tmp_path / "prepared", tmp_path / "train_input")
    # row 0 has no real item (a user's first), row 2 is validation: both marked like test rows; the rest kept
    assert pq.read_table(out / "part-0.parquet").column("pos_from_end").to_pylist() == [0, 2, 0, 4]


def _row(model: str, ours: float, theirs: float, ndcg: float, their_ndcg: float) -> dict:
    return {"model": model, "epochs": 1, "ours_samples_per_s": ours, "recbole_samples_per_s": theirs,
            "speed_ratio": ours / theirs, "ours_ndcg10": ndcg, "recbole_ndcg10": their_ndcg, "ours_hr10": 0.1,
            "recbole_hr10": 0.1, "ours_ndcg10_unmasked": ndcg * 0.9, "ours_train_s": 10.0, "recbole_train_s": 30.0}


def _result(stage: dict) -> dict:
    return {"command": "mtrec bench --stages none --peer recbole", "started": "2026-12-02 06:00 UTC",
            "machine": {"cores": 2, "torch": "2.13.0", "ray": "2.60.0", "python": "3.11", "commit": "abc"},
            "load_before": {"1m": 1.0, "5m": 1.0, "15m": 1.0}, "load_after": {"1m": 2.0, "5m": 1.0, "15m": 1.0},
            "sizes": {}, "total_s": 100.0, "stages": {"peer": stage}}


def test_report_rows_need_speed_and_ndcg():
    settings = {**peer.PeerSettings().__dict__, "models": list(peer.PEER_MODELS)}
    stage = {"settings": settings, "data": {"events": 1000, "users": 10, "items": 50},
             "rows": [_row("sasrec", 3000, 1000, 0.10, 0.09), _row("gru4rec", 3000, 1000, 0.08, 0.09),
                      _row("caser", 1500, 1000, 0.10, 0.09)],
             "errors": {"nextitnet": "RuntimeError: boom"}}
    result = _result(stage)
    result["ratios"] = collect_ratios(result)
    met = {r["key"]: r["met"] for r in result["ratios"]}
    assert met == {"peer_sasrec_speed": True, "peer_gru4rec_speed": False, "peer_caser_speed": False,
                   "peer_nextitnet_speed": None}
    text = markdown(result)
    assert "| SASRec | 3,000 | 1,000 | **3.00x** | 0.1000 (0.0900) | 0.0900 |" in text
    assert "not measured: RuntimeError: boom" in text and "simulated events" not in text


def test_failed_peer_stage_is_one_row():
    result = _result({"error": "PeerUnavailable: no env"})
    rows = collect_ratios(result)
    assert len(rows) == 1 and rows[0]["value"] is None and "no env" in rows[0]["detail"]


def test_missing_env_names_the_command_that_builds_it(tmp_path):
    with pytest.raises(peer.PeerUnavailable, match="bash scripts/peer_recbole_env.sh"):
        peer.peer_python(str(tmp_path / "no-venv"))


def test_missing_data_is_a_message(tmp_path):
    with pytest.raises(peer.PeerUnavailable, match="not redistributed"):
        peer.check_ratings(str(tmp_path / "ratings.dat"))


def test_command_checks_the_env_before_starting(tmp_path, monkeypatch):
    from mtrec_dist.commands.bench import peer_settings

    monkeypatch.setenv("MTREC_PEER_VENV", str(tmp_path / "absent"))
    args = argparse.Namespace(peer="recbole", peer_models="sasrec,caser", peer_epochs=1, peer_users=0,
                              peer_recbole_threads=0, peer_ratings=_ratings(tmp_path))
    with pytest.raises(peer.PeerUnavailable, match="peer_recbole_env.sh"):
        peer_settings(args, 1)
    assert peer_settings(argparse.Namespace(peer=None), 1) is None
    with pytest.raises(ValueError, match="unknown"):
        peer.parse_models("sasrec,bert4rec")


def test_peer_script_imports_nothing_of_ours():
    text = Path(peer.__file__).with_name("recbole_peer_run.py").read_text()
    assert "mtrec_dist" not in text.split('"""', 2)[2]  # the docstring may name it; the code must not


@pytest.mark.slow
def test_recbole_trains_and_ranks_a_tiny_log(tmp_path):
    venv = os.environ.get("MTREC_PEER_VENV", str(peer.ROOT / ".venv-peer-recbole"))
    try:
        python = peer.peer_python(venv)
    except peer.PeerUnavailable as e:
        pytest.skip(f"RecBole peer environment absent (CI does not build it): {e}")
    rows = [(u, (u * 7 + k) % 40 + 1, 4.0, 1000 + k) for u in range(1, 31) for k in range(12)]
    peer.write_inter(rows, tmp_path / "recbole")
    s = peer.PeerSettings(epochs=1, state_len=5, dim=8, layers=1, batch_size=64, recbole_threads=1)
    result = peer.run_recbole(python, peer.recbole_params(s, "sasrec", tmp_path / "recbole"),
                              tmp_path / "out.json", say=print)
    assert result["train_samples"] == 30 * (12 - 3)  # first item no target; last two are validation and test
    assert result["samples_per_s"] > 0 and 0.0 <= result["ndcg10"] <= 1.0
    assert json.loads((tmp_path / "out.json").read_text())["model"] == "SASRec"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    peer_imports_ours = subprocess.run([str(python), "-c", "import mtrec_dist"], capture_output=True, env=env,
                                       cwd=tmp_path).returncode == 0
    assert not peer_imports_ours  # the peer venv does not hold our package
