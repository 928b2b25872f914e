"""`score-rewards` picks its runner: scoring actors that each hold the model, the sharded worker group, or
the driver process for a small set."""
from __future__ import annotations

import pytest

from mtrec_dist.config import ConfigError, load_config
from mtrec_dist.training.scoring import score_runner, table_mb


def test_score_runner_auto_shards_only_a_big_table_over_several_workers():
    spec = {"num_items": 10_000_000, "model": {"embedding_dim": 32}}
    assert round(table_mb(spec)) == 1221  # (10^7 + 1) x 32 float32
    big = load_config(None, ["train.num_workers=2"]).train
    assert score_runner(big, spec) == "sharded"
    assert score_runner(big, dict(spec, num_items=1_000_000)) == "actors"  # 122 MiB: every actor can hold it
    one = load_config(None, ["train.num_workers=1"]).train
    assert score_runner(one, spec) == "actors"  # one worker would hold it all anyway
    forced = load_config(None, ["train.num_workers=1", "train.score_runner=sharded"]).train
    assert score_runner(forced, spec) == "sharded"
    with pytest.raises(ConfigError, match="score_unsharded_max_mb"):
        load_config(None, ["train.score_unsharded_max_mb=0"])


def test_score_runner_auto_scores_a_small_set_in_the_driver():
    spec = {"num_items": 1_000, "state_len": 10, "model": {"embedding_dim": 32}}
    auto = load_config(None, ["train.num_workers=2", "train.driver_read_mb=1.5"]).train
    assert score_runner(auto, spec, rows=4201) == "local"  # 4,201 x (24 x 10 + 128) bytes = 1.47 MiB
    assert score_runner(auto, spec, rows=4300) == "actors"  # 1.51 MiB: over driver_read_mb
    assert score_runner(auto, spec) == "actors"  # rows not known
    never = load_config(None, ["train.driver_read_mb=0"]).train
    assert score_runner(never, spec, rows=1) == "actors" == score_runner(never, spec, rows=0)
    forced = load_config(None, ["train.score_runner=actors"]).train
    assert score_runner(forced, spec, rows=1) == "actors"
    big = dict(spec, num_items=10_000_000)  # a table to shard wins over a small set
    assert score_runner(auto, big, rows=1) == "sharded"
    one = load_config(None, ["train.num_workers=1"]).train  # nothing to shard it over: actors, not the driver
    assert score_runner(one, big, rows=1) == "actors"
