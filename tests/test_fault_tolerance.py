"""A worker that dies after a checkpoint: FailureConfig restarts the group and training finishes."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_training import tiny_factory, write_prepared
from mtrec_dist.config import TrainConfig
from mtrec_dist.data.pipeline import read_transitions
from mtrec_dist.training.checkpoint import read_checkpoint_meta
from mtrec_dist.training.loop import FAULT_MARKER, fit_distributed

torch.set_num_threads(1)

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a Ray Train run with a restart


@pytest.mark.parametrize("held", [False, True], ids=["streamed", "held"])
def test_run_recovers_from_a_killed_worker(ray_cluster, tmp_path, held):
    """Streamed: one epoch, killed at step 20.  Held (train.feed auto, three epochs): killed at step 70, in the
    second epoch, which reshuffles the shard held since the first; the restart streams the rest of that epoch
    and holds the third afresh."""
    rows = 2400  # 1200 rows per rank = 50 steps of 24
    root = write_prepared(tmp_path / "prep", num_items=40, rows=rows, files=4)
    epochs, fail_at = (3, 70) if held else (1, 20)
    cfg = TrainConfig(num_workers=2, batch_size=24, epochs=epochs, report_every=10, checkpoint_every=10,
                      fail_at_step=fail_at, max_failures=1, sharding="row_wise", lr=0.01, sparse_lr=0.1,
                      collective_timeout_s=60)
    result = fit_distributed(functools.partial(tiny_factory, 40, 8), cfg, {"train": read_transitions(str(root))},
                             "faulty", str(tmp_path / "storage"), state_len=4, row_counts={"train": rows},
                             progress=False)
    marker = Path(result.output_dir) / f"{FAULT_MARKER}_faulty"
    assert marker.exists()  # rank 1 really exited once (os._exit after the checkpoint at fail_at)

    starts = [e for e in result.history if e["event"] == "start"]
    assert len(starts) == 2 and starts[0]["restored_from"] is None
    assert [s["feed"] for s in starts] == ["memory" if held else "stream"] * 2
    # restored from the checkpoint at fail_at (or the one before if the dying worker's last report was not
    # registered: at most one checkpoint interval is redone)
    assert starts[1]["restored_from"] is not None and starts[1]["step"] in (fail_at - 10, fail_at)
    assert result.metrics["step"] >= 50 * epochs
    assert read_checkpoint_meta(result.checkpoint_path)["step"] == result.metrics["step"]
    if held:  # the first attempt held epoch 0's shard; the restart streamed the rest of epoch 1, held epoch 2
        assert [e["epoch"] for e in result.history if e["event"] == "held_shard"] == [0, 2]

    # across the crash, every epoch still trained on every row exactly once (rows trained after the last
    # checkpoint were rolled back with the model state and redone)
    ends = [e for e in result.history if e["event"] == "epoch_end"]
    assert [e["epoch"] for e in ends] == list(range(epochs))
    ids = np.arange(1000, 1000 + rows, dtype=np.float64)
    for epoch_end in ends:
        assert (epoch_end["rows"], epoch_end["row_id_sum"], epoch_end["row_id_sqsum"]) == \
            (rows, ids.sum(), (ids ** 2).sum())
    assert result.metrics["rows_seen"] == epochs * rows
