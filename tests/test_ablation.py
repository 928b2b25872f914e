"""The ablation's pieces (mtrec_dist/ablation.py): windowing by hand, paired gains, and a tiny end-to-end run."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from mtrec_dist import ablation
from mtrec_dist.config import load_config


def _events():
    # user 7: session 1 = items 3, 4 (t=0, 10); session 2 = item 5 at t=100 (within the window);
    # user 9: one session, item 1 at t=50, then the log ends.
    return pa.table({
        "user_id": [7, 9, 7, 7], "item_id": [4, 1, 3, 5], "ts": [10, 50, 0, 100],
        "watch_ratio": [0.5, 0.9, 0.2, 0.7], "session_id": [1, 5, 1, 2], "dwell_s": [60.0, 54.0, 24.0, 42.0],
        "eval_true_satisfaction": [1.0, 2.0, -1.0, 0.5],
    })


def test_log_transitions_by_hand():
    t = ablation.log_transitions(_events(), state_len=2, return_window_s=90)
    assert t["user"].tolist() == [7, 7, 7, 9]
    assert t["action"].tolist() == [4, 5, 6, 2]  # raw id + 1
    assert t["state_items"].tolist() == [[0, 0], [0, 4], [4, 5], [0, 0]]
    assert np.allclose(t["state_feedback"][2], [0.2, 0.5])
    assert t["next_state_items"].tolist() == [[0, 4], [4, 5], [5, 6], [0, 2]]
    assert t["done"].tolist() == [0, 1, 1, 1]
    # user 7 left at t=10 and came back at t=100 (gap 90 <= 90), and the log ran the whole window after t=10;
    # the log ends (t=100) less than a window after the other session ends, so their returns are unknown
    assert t["returned"].tolist() == [0, 1, 0, 0]
    assert t["return_known"].tolist() == [0, 1, 0, 0]
    assert np.allclose(t["action_log_duration"], np.log([2.0, 2.0, 1.0, 1.0]), atol=1e-6)  # dwell / watch ratio / 60 s
    assert "satisfaction" not in ablation.TRAIN_KEYS  # evaluation-only signal never reaches a batch


def test_shown_slates_follow_the_transitions_order_and_pad_clicks_without_a_slate():
    events = _events().append_column("slate_id", pa.array([11, 50, 10, 99]))
    impressions = pa.table({"user_id": [7, 7, 9, 9, 7], "slate_id": [10, 11, 50, 51, 99],
                            "items": [[3, 8], [4, 2], [1, 6], [0, 5], [5]]})  # slate 99 is too short: none
    t = ablation.log_transitions(events, state_len=2, return_window_s=90)
    slates = ablation.shown_slates(t["user"], t["slate_id"], impressions, width=2)
    # transitions order: user 7 at t=0 (slate 10), t=10 (11), t=100 (99: none), user 9 (50); index = raw id + 1
    assert slates.tolist() == [[4, 9], [5, 3], [0, 0], [2, 7]]
    assert "slate_items" in ablation.TRAIN_KEYS


def test_summary_pairs_gains_on_the_same_world_and_seeds():
    rec = lambda w, t, o, v: dict(world=w, train_seed=t, online_seed=o, **{m: v for m in ablation.ONLINE},  # noqa: E731
                                  **{"ndcg@10_satisfied": v, "hr@10": v})
    records = {"A": [rec(0, 0, 0, 1.0), rec(0, 0, 1, 3.0)], "B": [rec(0, 0, 0, 2.0), rec(0, 0, 1, 4.5)]}
    s = ablation.summarise(records)
    g = s["B"]["gain_vs_A:satisfaction_per_session"]
    assert g["mean"] == pytest.approx(1.25)  # paired per online seed: (1.0 + 1.5) / 2
    assert "gain_vs_B:return_rate" in s["A"]
    assert "| B watch-ratio regressor |" in ablation.markdown_table(s)


def test_summary_counts_trained_models_not_online_seeds_as_units():
    rec = lambda t, o, v: dict(world=0, train_seed=t, online_seed=o, **{m: v for m in ablation.ONLINE},  # noqa: E731
                               **{"ndcg@10_satisfied": v, "hr@10": v})
    # two trained models, three online seeds each: model means 2.0 and 4.0, so n = 2 units, not 6
    records = {"A": [rec(0, o, v) for o, v in enumerate((1.0, 2.0, 3.0))]
               + [rec(1, o, v) for o, v in enumerate((3.0, 4.0, 5.0))]}
    s = ablation.summarise(records)["A"]["satisfaction_per_session"]
    assert s["mean"] == pytest.approx(3.0)
    assert s["half"] == pytest.approx(12.706 * np.std([2.0, 4.0], ddof=1) / np.sqrt(2), rel=1e-3)


def test_pooled_runs_add_their_trained_models_and_refuse_a_shared_one():
    rec = lambda w, t, v: dict(world=w, train_seed=t, online_seed=0, **{m: v for m in ablation.ONLINE},  # noqa: E731
                               **{"ndcg@10_satisfied": v, "hr@10": v})
    run1 = {"A": [rec(0, 0, 1.0), rec(0, 1, 2.0)], "B": [rec(0, 0, 2.0), rec(0, 1, 2.0)], "C": [rec(0, 0, 9.0)]}
    run2 = {"A": [rec(1000, 0, 3.0)], "B": [rec(1000, 0, 5.0)]}
    pooled = ablation.pool_records([run1, run2])
    assert set(pooled) == {"A", "B"} and len(pooled["A"]) == 3  # C is in one run only
    gain = ablation.summarise(pooled)["B"]["gain_vs_A:satisfaction_per_session"]
    assert gain["mean"] == pytest.approx((1.0 + 0.0 + 2.0) / 3)  # three paired models, one per (world, seed)
    with pytest.raises(ValueError, match="world 0, training seed 1"):
        ablation.pool_records([run1, {"A": [rec(0, 1, 1.0)], "B": [rec(0, 1, 1.0)]}])
    with pytest.raises(ValueError, match="no row A"):
        ablation.pool_records([run1, {"B": [rec(7, 0, 1.0)]}])


def test_pool_names_a_file_that_is_not_an_ablation_result(tmp_path):
    from mtrec_dist.cli import main as cli

    bad, broken = tmp_path / "bad.json", tmp_path / "broken.json"
    bad.write_text('{"a": 1}')
    broken.write_text("not json")
    with pytest.raises(SystemExit, match=r"bad\.json is not the results\.json of a simulator ablation"):
        cli(["ablate", "--pool", str(bad)])
    with pytest.raises(SystemExit, match=r"cannot read .*broken\.json"):
        cli(["ablate", "--pool", str(broken)])


def test_pool_refuses_runs_whose_rewards_were_trained_otherwise(tmp_path):
    from mtrec_dist.cli import main as cli

    rec = dict(world=0, train_seed=0, online_seed=0, **{m: 1.0 for m in ablation.ONLINE})
    for name, slates in (("on.json", True), ("off.json", False)):
        settings = {"online_users": 300, "reward": {"slate_choice": slates}}
        (tmp_path / name).write_text(json.dumps({"settings": settings, "records": {"default": {"A": [rec]}}}))
    with pytest.raises(SystemExit, match=r"off\.json was run with other settings .*\['reward'\]"):
        cli(["ablate", "--pool", str(tmp_path / "on.json"), str(tmp_path / "off.json")])


def test_bad_item_aucs_split_the_two_kinds_of_bad_item():
    # rows: good 2.0, 1.0; clickbait 0.0, 1.5; compulsive 3.0
    reward = np.array([2.0, 1.0, 0.0, 1.5, 3.0])
    clickbait = np.array([False, False, True, True, False])
    compulsive = np.array([False, False, False, False, True])
    aucs = ablation.bad_item_aucs(reward, clickbait, compulsive)
    # good above bad in 3 of the 6 pairs: (2 > 0, 2 > 1.5, 1 > 0); clickbait alone 3 of 4; compulsive 0 of 2
    assert aucs == {"auc_good_vs_bad": pytest.approx(3 / 6), "auc_good_vs_clickbait": pytest.approx(3 / 4),
                    "auc_good_vs_compulsive": pytest.approx(0.0)}
    no_compulsive = ablation.bad_item_aucs(reward[:4], clickbait[:4], compulsive[:4])  # only one class left
    assert np.isnan(no_compulsive["auc_good_vs_compulsive"])


@pytest.mark.slow
def test_tiny_ablation_runs_and_the_oracle_is_valid(tmp_path):
    cfg = load_config("configs/tiny.yaml", [
        f"run_dir={tmp_path}", "ablation.rows=[A,H,F]", "ablation.worlds=1", "ablation.train_seeds=1",
        "ablation.online_seeds=2", "ablation.online_users=20", "ablation.online_days=2",
        "ablation.reward_epochs=1", "ablation.rec_epochs=1", "ablation.batch_size=128"])
    res = ablation.run_ablation(cfg, say=lambda m: None)
    d = res["default"]
    assert d["H"]["spearman_vs_satisfaction"]["mean"] > 0.99  # the oracle's reward is the truth itself
    assert np.isfinite(d["F"]["spearman_vs_satisfaction"]["mean"])
    assert d["H"]["auc_good_vs_clickbait"]["mean"] > 0.5 and d["H"]["auc_good_vs_compulsive"]["mean"] > 0.5
    assert "gain_vs_A:satisfaction_per_session" in d["F"]
    assert (tmp_path / "ablation" / "results.json").exists() and (tmp_path / "ablation" / "table.md").exists()


@pytest.mark.slow
def test_parallel_units_give_the_sequential_records(tmp_path, ray_cluster):
    """Two (world, training seed) units as Ray tasks give the records of the same units run one after another
    in this process, to the last digit (each unit seeds its own training)."""
    overrides = ["ablation.rows=[A,F]", "ablation.worlds=1", "ablation.train_seeds=2", "ablation.online_seeds=1",
                 "ablation.online_users=10", "ablation.online_days=1", "ablation.reward_epochs=1",
                 "ablation.rec_epochs=1", "ablation.batch_size=128"]
    lines = {}
    results = {}
    for parallel in (False, True):
        cfg = load_config("configs/tiny.yaml", overrides + [f"run_dir={tmp_path / str(parallel)}",
                                                            f"ablation.parallel={str(parallel).lower()}"])
        lines[parallel] = []
        results[parallel] = ablation.run_ablation(cfg, say=lines[parallel].append)["records"]["default"]
    assert results[True] == results[False]
    assert [r["train_seed"] for r in results[True]["F"]] == [0, 1]
    assert sorted(m.split(" (")[0] for m in lines[True]) == sorted(m.split(" (")[0] for m in lines[False])
