"""The training progress line's share done and ETA (training/loop.py)."""
from mtrec_dist.config import TrainConfig
from mtrec_dist.training.loop import eta_text, expected_steps


def test_expected_steps_from_rows_workers_and_batch():
    # 1,001 rows over 2 workers: 501 rows each at most -> 2 batches of 256 per epoch
    assert expected_steps(TrainConfig(epochs=3, num_workers=2, batch_size=256), 1001) == 6
    cfg = dict(epochs=3, num_workers=2, batch_size=256)
    assert expected_steps(TrainConfig(**cfg, max_steps=4), 1001) == 4  # max_steps stops the run first
    assert expected_steps(TrainConfig(**cfg, max_steps=7), 1001) == 6  # the epochs end first
    assert expected_steps(TrainConfig(**cfg, max_steps=7), None) == 7  # rows unknown: max_steps alone
    assert expected_steps(TrainConfig(), None) is None  # neither known: no ETA


def test_eta_text():
    assert [eta_text(s) for s in (0, 59.6, 185, 3725)] == ["0s", "1m00s", "3m05s", "1h02m"]
