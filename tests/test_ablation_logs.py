"""`mtrec ablate` on real-style logs (``source: logs``): a generic ``user,item,rating,ts`` CSV through the same
command and config as MovieLens (configs/ml1m.yaml), with Ray Data's prepare in front.

The world: each user rates items in sessions, reaching for the items they like first (a Plackett-Luce order
of a hidden per-item quality), and the rating follows the same quality. Items are drawn uniformly, so
popularity says nothing; the mental reward's order term must find the quality from the order alone."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mtrec_dist.cli import main as cli
from mtrec_dist.evaluation.metrics import mean_ci95

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _rating_log(path, users: int = 120, items: int = 40, sessions: int = 3, per_session: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    quality = rng.normal(size=items)
    lines, t0 = ["user,item,rating,ts"], 1_000_000_000
    for u in range(users):
        for s in range(sessions):
            chosen = rng.choice(items, per_session, replace=False)
            order = chosen[np.argsort(-(quality[chosen] + rng.gumbel(size=per_session)))]
            start = t0 + u * 10**6 + s * 86_400
            for k, i in enumerate(order):
                rating = int(np.clip(np.round(3 + 1.2 * quality[i] + rng.normal(scale=0.7)), 1, 5))
                lines.append(f"u{u},i{i},{rating},{start + 30 * k}")
    path.write_text("\n".join(lines) + "\n")
    return len(lines) - 1


def test_ablate_on_a_rating_csv_reads_satisfaction_from_the_order_of_choices(tmp_path, capsys):
    rows = _rating_log(tmp_path / "ratings.csv")
    sets = [f"run_dir={tmp_path / 'run'}", f"prepare.input={tmp_path / 'ratings.csv'}", "prepare.format=csv",
            "prepare.id_type=string", "prepare.column_map={user: user_id, item: item_id, rating: eval_rating}",
            "ablation.rows=[A,F,G,H]", "ablation.reward_epochs=3", "ablation.rec_epochs=1", "ablation.batch_size=64",
            "eval.heldout_user_share=0.3", "ablation.train_seeds=2"]
    assert cli(["ablate", "--config", "configs/ml1m.yaml", "--quiet"] + [a for s in sets for a in ("--set", s)]) == 0
    res = json.loads((tmp_path / "run" / "ablation" / "results.json").read_text())
    validity = res["validity"]
    assert abs(validity["popularity"]["auc_satisfied"]["mean"] - 0.5) < 0.1  # uniform draws: popularity is noise
    # the order of choices tells which items satisfy, at each of the two training seeds
    assert res["seeds"] == [0, 1] and min(r["auc_satisfied"] for r in res["records"]["validity"]["F"]) > 0.65
    # H reads the signal: no validity; G guides by F's reward (its lower tail): F's validity, its own SASRec
    assert set(res["offline"]) == {"A", "F", "G", "H", "F tilt"} and "H" not in validity and "G" not in validity
    offline = {row: {r["train_seed"]: r for r in recs} for row, recs in res["records"]["offline"].items()}
    assert sorted(offline["G"]) == [0, 1]  # G ranks at every seed (it was left out on logs before session 25)
    for row in ("F", "H"):  # gains over A paired by seed: the interval is that of the per-seed differences
        gain = res["offline"][row]["gain_vs_A:ndcg@10_satisfied"]
        diffs = [offline[row][k]["ndcg@10_satisfied"] - offline["A"][k]["ndcg@10_satisfied"] for k in (0, 1)]
        assert np.allclose([gain["mean"], gain["half"]], mean_ci95(diffs))
        assert offline[row][0] != offline["A"][0]  # the row's weights changed the SASRec it guides
    assert "| H oracle: the withheld signal of the logged item |" in res["table"]
    # the tilt row (configs/ml1m.yaml's tilt_strengths): A's own SASRec tilted at the strength validation chose;
    # here the reward knows what popularity does not, so validation keeps a tilt at some seed
    tilt = offline["F tilt"]
    assert sorted(tilt) == [0, 1] and all(r["tilt_strength"] in (0, 0.025, 0.05, 0.1, 0.2, 0.3) for r in tilt.values())
    assert max(r["tilt_strength"] for r in tilt.values()) > 0
    for k, r in tilt.items():  # the chosen strength ranks validation's satisfied targets at least as well as none
        on_validation = {key.rsplit(" ", 1)[1]: v for key, v in r.items() if key.startswith("validation ")}
        assert on_validation[f"{r['tilt_strength']:g}"] >= on_validation["0"]
        if r["tilt_strength"] == 0:  # no tilt: A's ranking itself
            assert r["ndcg@10_satisfied"] == offline["A"][k]["ndcg@10_satisfied"]
    assert "| F tilt (A's SASRec, its scores tilted by F's reward" in res["table"]
    manifest = json.loads((tmp_path / "run" / "prepared" / "manifest.json").read_text())
    assert manifest["rows_in"] == rows == manifest["rows_ok"] + manifest["rows_rejected"]


def test_seeds_as_parallel_tasks_give_the_sequential_records(tmp_path, ray_cluster):
    """On logs, each training seed is one job: as Ray tasks they give the records of the same seeds run one
    after another in this process (the prepared data is reused by the second run)."""
    _rating_log(tmp_path / "ratings.csv", users=60)
    sets = [f"run_dir={tmp_path / 'run'}", f"prepare.input={tmp_path / 'ratings.csv'}", "prepare.format=csv",
            "prepare.id_type=string", "prepare.column_map={user: user_id, item: item_id, rating: eval_rating}",
            "ablation.rows=[A,F]", "ablation.reward_epochs=1", "ablation.rec_epochs=1", "ablation.batch_size=64",
            "eval.heldout_user_share=0.3", "ablation.train_seeds=2"]
    records = {}
    for parallel in ("false", "true"):
        args = sets + [f"ablation.parallel={parallel}"]
        assert cli(["ablate", "--config", "configs/ml1m.yaml", "--quiet"] + [a for s in args for a in ("--set", s)]) == 0
        records[parallel] = json.loads((tmp_path / "run" / "ablation" / "results.json").read_text())["records"]
    assert records["true"] == records["false"]
    assert [r["train_seed"] for r in records["true"]["offline"]["F"]] == [0, 1]


def test_the_distributed_reward_training_reads_the_same_later_choices(ray_cluster, tmp_path):
    """The Ray Train path (`mtrec train-reward`) adds ``later_items`` on the cluster, hash-partitioned by
    user; the strata are drawn from each row's id, so it must equal the in-process :func:`with_later_items`
    over the whole table, row by row (sessions of 8 choices, 3 compared: a real draw)."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import ray

    from mtrec_dist.config import load_config
    from mtrec_dist.data.sessionize import with_later_items
    from mtrec_dist.training.reward import training_transitions

    _rating_log(tmp_path / "ratings.csv", users=30)
    sets = [f"run_dir={tmp_path / 'run'}", "prepare.format=csv", "prepare.id_type=string",
            "prepare.column_map={user: user_id, item: item_id, rating: eval_rating}", "reward.order_items=3",
            "prepare.rows_per_partition=200"]  # several hash partitions
    assert cli(["prepare", "--config", "configs/ml1m.yaml", "--input", str(tmp_path / "ratings.csv")]
               + [a for s in sets for a in ("--set", s)]) == 0
    cfg = load_config("configs/ml1m.yaml", sets + ["eval.heldout_user_share=0"])  # every user's rows compared
    prepared = str(tmp_path / "run" / "prepared")
    table = pads.dataset(f"{prepared}/transitions", format="parquet").to_table()
    want = with_later_items(table, k=3).sort_by("row_id")
    for driver_read_mb in (0.0, 256.0):  # Ray Data's user blocks, then the whole table in the driver
        train = dataclasses.replace(cfg.train, driver_read_mb=driver_read_mb)
        ds = training_transitions(dataclasses.replace(cfg, train=train), prepared, table.num_rows)
        got = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("row_id")
        assert got.num_rows == table.num_rows
        assert got.column("later_items").to_pylist() == want.column("later_items").to_pylist(), driver_read_mb
    # per session of 8: 3 later choices for the first 5, then 2, 1, 0
    assert sum(len([i for i in r if i]) for r in got.column("later_items").to_pylist()) == 30 * 3 * (5 * 3 + 3)
