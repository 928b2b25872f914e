"""`score-rewards` picks its runner: scoring actors that each hold the model, or the sharded worker group."""
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
