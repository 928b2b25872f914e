"""How score-rewards cuts its input for several scoring actors (pure arithmetic; the run itself is in
tests/test_score_rewards.py)."""
from __future__ import annotations

from mtrec_dist.config import TrainConfig
from mtrec_dist.training.scoring import rows_per_actor_block


def test_blocks_hold_whole_batches_about_four_per_actor():
    tc = TrainConfig(score_concurrency=2, score_batch_size=512)
    assert rows_per_actor_block(49_344, tc) == 13 * 512  # 49,344 / 8 blocks = 6,168 rows -> 13 batches of 512
    assert rows_per_actor_block(100, tc) == 512  # never less than one batch
    assert rows_per_actor_block(0, tc) == 512
    assert rows_per_actor_block(49_344, TrainConfig(score_concurrency=4, score_batch_size=512)) == 7 * 512
    assert rows_per_actor_block(10 ** 8, tc) == 64 * 512  # a large day: blocks stay small enough to stream
