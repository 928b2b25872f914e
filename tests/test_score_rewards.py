"""End to end on simulated data: `mtrec train-reward` (2 workers) then `mtrec score-rewards`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import torch

from mtrec_dist.cli import main as cli
from mtrec_dist.config import load_config
from mtrec_dist.training.checkpoint import read_checkpoint_meta
from mtrec_dist.training.reward import default_reward_checkpoint
from mtrec_dist.training.scoring import RewardScorer, read_scores, score_rewards

torch.set_num_threads(1)

N_QUANTILES = 8

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a Ray Train run, then Ray Data scoring


def test_train_reward_then_score_every_transition(ray_cluster, tmp_path, capsys):
    run = tmp_path / "run"
    sets = []
    for kv in [f"run_dir={run}", "simulator.num_users=150", "simulator.num_items=60", "simulator.days=1",
               "prepare.state_len=4", "prepare.rows_per_shard=800", "model.embedding_dim=8", "model.num_layers=1",
               "model.encoder=gru4rec", f"reward.num_quantiles={N_QUANTILES}", "train.batch_size=32",
               "train.max_steps=40", "train.epochs=5", "train.report_every=10", "train.checkpoint_every=20",
               "train.score_batch_size=200", "train.collective_timeout_s=120",
               # sampled soft value, drawn by popularity counted over the training users' rows
               "reward.num_negatives=16", "reward.negative_sampler=popularity"]:
        sets += ["--set", kv]
    assert cli(["simulate", "--quiet"] + sets) == 0
    assert cli(["prepare", "--no-progress"] + sets) == 0
    capsys.readouterr()

    assert cli(["train-reward", "--quiet", "--workers", "2"] + sets) == 0
    assert "reward model trained: step 40" in capsys.readouterr().out
    checkpoint = default_reward_checkpoint(str(run / "reward"))
    meta = read_checkpoint_meta(checkpoint)
    assert meta["step"] == 40 and meta["world_size"] == 2
    assert meta["model_spec"]["kind"] == "qr_iql_reward_model" and meta["model_spec"]["state_len"] == 4
    events = [json.loads(line) for line in (run / "reward" / "metrics.jsonl").read_text().splitlines()]
    reported = [e for e in events if e["event"] == "metrics"]
    assert [e["step"] for e in reported] == [10, 20, 30, 40]
    assert all(np.isfinite(e["loss"]) and "reward_spread" in e and "consequence" in e for e in reported)  # v2 terms

    # scored in the driver (a small set) with 2 torch threads, restored after
    assert cli(["score-rewards", "--set", "train.score_cpus=2"] + sets) == 0
    assert torch.get_num_threads() == 1
    scores = read_scores(str(run / "rewards"))
    transitions = pds.dataset(str(run / "prepared" / "transitions"), format="parquet").to_table()
    # every logged transition scored exactly once, keyed by row_id, candidate = the logged action
    assert sorted(scores.column("row_id").to_pylist()) == sorted(transitions.column("row_id").to_pylist())
    # a "scored transitions" dataset: every transition column passes through, then the scores (what
    # guided recommender training reads without a join); nothing evaluation-only
    assert scores.schema.names == transitions.schema.names + ["reward_mean", "reward_cvar", "reward_q",
                                                              "reward_baseline", "reward_cvar_baseline"]
    assert not any(n.startswith("eval_") for n in scores.schema.names)
    by_row = dict(zip(transitions.column("row_id").to_pylist(), transitions.column("action").to_pylist()))
    assert all(by_row[r] == a for r, a in zip(scores.column("row_id").to_pylist(), scores.column("action").to_pylist()))
    q = np.stack(scores.column("reward_q").to_numpy(zero_copy_only=False))
    mean = scores.column("reward_mean").to_numpy()
    cvar = scores.column("reward_cvar").to_numpy()
    assert q.shape == (transitions.num_rows, N_QUANTILES) and np.isfinite(q).all()
    assert (np.diff(q, axis=1) >= 0).all()  # quantiles are sorted
    np.testing.assert_allclose(mean, q.mean(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cvar, q[:, : N_QUANTILES // 4].mean(1), rtol=1e-5, atol=1e-5)  # CVaR at 0.25
    base = scores.column("reward_baseline").to_numpy()
    assert np.isfinite(base).all() and base.std() > 0  # the policy baseline depends on the state
    summary = json.loads((run / "rewards" / "_scores.json").read_text())
    assert summary["rows"] == transitions.num_rows and summary["baseline"] == "full_catalog"
    assert summary["cvar_baseline"] == "exact"  # 60 items, under train.score_cvar_draws
    assert summary["runner"] == "local"  # a small set (train.driver_read_mb) is scored in the driver
    assert 0 < summary["scoring_actor_s"] < summary["seconds"]

    # the sharded runner (2 workers, each loading only its rows of the item table) writes the same scores;
    # the catalog (60 items) is under score_full_catalog_max, so the baseline is exact in both runners
    assert cli(["score-rewards", "--out", str(tmp_path / "sharded"), "--set", "train.score_runner=sharded",
                "--set", "train.sharding=row_wise"] + sets) == 0
    printed = capsys.readouterr().out
    assert "2 workers, item table sharded; peak RSS per worker" in printed
    sharded = read_scores(str(tmp_path / "sharded")).sort_by("row_id")
    ref = scores.sort_by("row_id")
    assert sharded.schema.names == ref.schema.names
    assert sharded.column("row_id").to_pylist() == ref.column("row_id").to_pylist()
    for name in ("reward_mean", "reward_cvar", "reward_baseline", "reward_cvar_baseline"):
        np.testing.assert_allclose(sharded.column(name).to_numpy(), ref.column(name).to_numpy(), rtol=1e-4, atol=1e-5)
    ranks = json.loads((tmp_path / "sharded" / "_scores.json").read_text())["ranks"]
    assert sum(r["rows"] for r in ranks) == transitions.num_rows and all(r["rows"] > 0 for r in ranks)
    rows_held = [sum(shape[0] for key, shapes in r["shard_sizes"].items() if "item_table" in key for shape in shapes)
                 for r in ranks]
    assert sum(rows_held) == 61 and max(rows_held) < 61  # each worker holds part of the table, not all of it

    # two scoring actors: the one-file day is cut into blocks, so both get rows; the same scores as the driver's.
    # With the CVaR baseline drawn (16 of 60 items) it is an estimate near the exact one; the rest is unchanged
    assert cli(["score-rewards", "--out", str(tmp_path / "two_actors"), "--set", "train.score_runner=actors",
                "--set", "train.score_concurrency=2", "--set", "train.score_cpus=0.5",
                "--set", "train.score_cvar_draws=16"] + sets) == 0
    assert "actor-seconds in scoring batches" in capsys.readouterr().out
    summary = json.loads((tmp_path / "two_actors" / "_scores.json").read_text())
    # Ray Data's stats time the scoring batches apart from start-up: less than the wall time
    assert 0 < summary["scoring_actor_s"] < summary["seconds"] and summary["runner"] == "actors"
    two = read_scores(str(tmp_path / "two_actors")).sort_by("row_id")
    assert two.schema == ref.schema  # the same columns, in the same order, of the same types
    assert two.column("row_id").to_pylist() == ref.column("row_id").to_pylist()
    for name in ("reward_mean", "reward_cvar", "reward_baseline"):
        np.testing.assert_allclose(two.column(name).to_numpy(), ref.column(name).to_numpy(), rtol=1e-5, atol=1e-6)
    drawn, exact = two.column("reward_cvar_baseline").to_numpy(), ref.column("reward_cvar_baseline").to_numpy()
    mean_base = ref.column("reward_baseline").to_numpy()
    assert 0 < np.abs(drawn - exact).mean() < 0.25 * np.abs(exact - mean_base).mean()  # vs its distance to the mean
    assert json.loads((tmp_path / "two_actors" / "_scores.json").read_text())["cvar_baseline"] == "policy_draws_16"
    capsys.readouterr()

    # a second run refuses to mix with existing output unless told to replace it
    assert cli(["score-rewards"] + sets) == 1
    assert "--overwrite" in capsys.readouterr().err

    # pairs mode, in process: given (state, candidate) rows score like the same transitions
    cfg = load_config(None, sets[1::2])
    scorer = RewardScorer(checkpoint, meta["model_spec"], candidate_column="candidate")
    head = transitions.slice(0, 5)
    pairs = pa.table({"query": pa.array(range(5)), "state_items": head.column("state_items"),
                      "state_feedback": head.column("state_feedback"), "candidate": head.column("action")})
    out = scorer(pairs)
    assert out.column_names[:2] == ["query", "candidate"] and "state_items" not in out.column_names
    ref = {r: m for r, m in zip(scores.column("row_id").to_pylist(), mean)}
    np.testing.assert_allclose(out.column("reward_mean").to_numpy(),
                               [ref[r] for r in head.column("row_id").to_pylist()], rtol=1e-5, atol=1e-6)
    bad = pairs.set_column(3, "candidate", pa.array([1, 2, 3, 4, 10_000], pa.int64()))
    with pytest.raises(ValueError, match="'candidate': value 10000 in row 4"):
        scorer(bad)
    pq.write_table(pairs, tmp_path / "pairs.parquet")  # pairs mode through score_rewards, in the driver
    summary = score_rewards(cfg, checkpoint, None, str(tmp_path / "pairs_out"), pairs_path=str(tmp_path / "pairs.parquet"))
    assert summary["mode"] == "pairs" and summary["runner"] == "local" and summary["rows"] == 5
    assert read_scores(str(tmp_path / "pairs_out")).column_names == out.column_names  # query, candidate, scores
    np.testing.assert_allclose(read_scores(str(tmp_path / "pairs_out")).column("reward_mean").to_numpy(),
                               out.column("reward_mean").to_numpy(), rtol=1e-5, atol=1e-6)
    pq.write_table(pairs.drop(["candidate"]), tmp_path / "pairs.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['candidate'\]"):
        score_rewards(cfg, checkpoint, None, str(tmp_path / "pairs_out2"), pairs_path=str(tmp_path / "pairs.parquet"))
    assert Path(checkpoint).exists()
