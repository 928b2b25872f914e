"""Several models trained one after another in one Ray Train run (``fit_distributed_jobs``): each trains on every
row of every epoch, keeps its own metrics and final checkpoint, and a failure in either restarts the run at the
job that failed, not before it."""
from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers_training import exits_once_factory, tiny_factory, write_prepared
from mtrec_dist.config import TrainConfig
from mtrec_dist.data.pipeline import read_transitions
from mtrec_dist.training.checkpoint import read_checkpoint_meta
from mtrec_dist.training.loop import FAULT_MARKER, FitJob, JobsFailed, _final_checkpoints, fit_distributed_jobs

torch.set_num_threads(1)


def _ckpt(path: str) -> SimpleNamespace:
    return SimpleNamespace(path=path)


def test_each_job_gets_its_highest_step_checkpoint():
    """The table of kept checkpoints, as Ray Train's result lists them, read per job."""
    kept = [(_ckpt("/s/a10"), {"job": 0, "step": 10}), (_ckpt("/s/a20"), {"job": 0, "step": 20}),
            (_ckpt("/s/b10"), {"job": 1, "step": 10}), (_ckpt("/s/b30"), {"job": 1, "step": 30}),
            (_ckpt("/s/b20"), {"job": 1, "step": 20})]
    result = SimpleNamespace(error=None, checkpoint=_ckpt("/s/b30"), metrics={"job": 1, "step": 30},
                             best_checkpoints=kept)
    finals = _final_checkpoints(result, 2, "run", "/s")
    assert [p for p, _ in finals] == ["/s/a20", "/s/b30"]
    assert finals[0][1]["step"] == 20
    # a cloud storage's scheme is put back on each path
    assert _final_checkpoints(result, 2, "run", "s3://s")[1][0] == "s3://s/b30"
    with pytest.raises(RuntimeError, match=r"kept no checkpoint of job\(s\) \[2\]"):
        _final_checkpoints(result, 3, "run", "/s")


def test_jobs_refuse_what_would_lose_a_checkpoint(tmp_path):
    job = functools.partial(FitJob, functools.partial(tiny_factory, 4, 4), str(tmp_path))
    with pytest.raises(ValueError, match="checkpoints_to_keep 0, not 2"):
        fit_distributed_jobs([job("a"), job("b")], TrainConfig(checkpoints_to_keep=2), {"train": None}, "r",
                             str(tmp_path))
    with pytest.raises(ValueError, match="distinct run names"):
        fit_distributed_jobs([job("a"), job("a")], TrainConfig(), {"train": None}, "r", str(tmp_path))


@pytest.mark.integration
@pytest.mark.slow
def test_two_jobs_train_whole_and_each_recovers_where_it_failed(ray_cluster, tmp_path):
    """Two models, two epochs each (a held shard), the last rank killed once in each job at step 30 (inside the
    first epoch).  The first job restarts from its own checkpoint; the second from its own, without training the
    first again; every epoch of each trains on every row exactly once."""
    rows = 2400  # 1200 rows per rank = 50 steps of 24
    root = write_prepared(tmp_path / "prep", num_items=40, rows=rows, files=4)
    cfg = TrainConfig(num_workers=2, batch_size=24, epochs=2, report_every=10, checkpoint_every=10,
                      fail_at_step=30, max_failures=2, sharding="row_wise", lr=0.01, sparse_lr=0.1,
                      collective_timeout_s=60)
    jobs = [FitJob(functools.partial(tiny_factory, 40, 8), str(tmp_path / name), name, label=name)
            for name in ("first", "second")]
    results = fit_distributed_jobs(jobs, cfg, {"train": read_transitions(str(root))}, "both",
                                   str(tmp_path / "storage"), state_len=4, row_counts={"train": rows},
                                   progress=False)
    assert [r.run_name for r in results] == ["first", "second"]
    ids = np.arange(1000, 1000 + rows, dtype=np.float64)
    for result in results:
        assert (Path(result.output_dir) / f"{FAULT_MARKER}_{result.run_name}").exists()
        starts = [e for e in result.history if e["event"] == "start"]
        # one start, one restart from this job's own checkpoint: the second job's failure did not rerun the first
        assert len(starts) == 2 and starts[0]["restored_from"] is None
        assert starts[1]["restored_from"] is not None and starts[1]["step"] in (20, 30)
        assert read_checkpoint_meta(starts[1]["restored_from"])["run_name"] == result.run_name
        ends = [e for e in result.history if e["event"] == "epoch_end"]
        assert [e["epoch"] for e in ends] == [0, 1]
        for epoch_end in ends:
            assert (epoch_end["rows"], epoch_end["row_id_sum"], epoch_end["row_id_sqsum"]) == \
                (rows, ids.sum(), (ids ** 2).sum())
        meta = read_checkpoint_meta(result.checkpoint_path)
        # the rest of an epoch resumed mid-way may take a step more than a whole epoch's share (as in the
        # fault-tolerance test)
        assert meta["run_name"] == result.run_name and meta["step"] == result.metrics["step"] >= 100
        assert "job" not in result.metrics
    assert results[0].checkpoint_path != results[1].checkpoint_path
    assert Path(results[0].checkpoint_path).parent == Path(results[1].checkpoint_path).parent  # one run's storage


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("final_registered", [True, False], ids=["final-registered", "worker-dies-at-once"])
def test_a_job_lost_before_its_first_checkpoint_restarts_after_the_job_before(ray_cluster, tmp_path, final_registered):
    """A worker dies while the second job builds its model, before that job has any checkpoint.  The restart begins
    at the job that wrote the run's latest registered checkpoint, the first one:
    * its final checkpoint registered (the worker died after the controller's poll): the first job is passed
      without training or saving again;
    * the worker died at once, often before the poll that would have registered that final report: the first job
      then resumes from its last registered checkpoint, which may leave nothing, or a few steps, to train again
      (this case accepts either restart point).
    Either way each job trains every row of every epoch exactly once and ends at its full step count, and the
    second job trains from scratch."""
    rows = 1200  # 600 rows per rank = 25 steps of 24
    root = write_prepared(tmp_path / "prep", num_items=40, rows=rows, files=2)
    cfg = TrainConfig(num_workers=2, batch_size=24, epochs=2, report_every=10, checkpoint_every=10,
                      max_failures=1, sharding="row_wise", lr=0.01, sparse_lr=0.1, collective_timeout_s=60)
    marker = tmp_path / "lost-while-building"
    # ten polls: on a busy 2-core box a poll can come late, and the strict checks below need the final registered
    wait_s = 10 * cfg.controller_poll_s if final_registered else 0.0
    jobs = [FitJob(functools.partial(tiny_factory, 40, 8), str(tmp_path / "a"), "a"),
            FitJob(functools.partial(exits_once_factory, str(marker), wait_s, 40, 8), str(tmp_path / "b"), "b")]
    a, b = fit_distributed_jobs(jobs, cfg, {"train": read_transitions(str(root))}, "ab", str(tmp_path / "storage"),
                                state_len=4, row_counts={"train": rows}, progress=False)
    assert marker.exists()
    ids = np.arange(1000, 1000 + rows, dtype=np.float64)
    whole = (rows, ids.sum(), (ids ** 2).sum())
    for result in (a, b):
        ends = [e for e in result.history if e["event"] == "epoch_end"]
        assert all((e["rows"], e["row_id_sum"], e["row_id_sqsum"]) == whole for e in ends)
        assert sorted({e["epoch"] for e in ends}) == [0, 1]
        meta = read_checkpoint_meta(result.checkpoint_path)
        assert (meta["run_name"], meta["step"], meta["epoch"]) == (result.run_name, 50, 2) == \
            (result.run_name, result.metrics["step"], result.metrics["epoch"])
    a_starts = [e for e in a.history if e["event"] == "start"]
    assert [s["restored_from"] is None for s in a_starts] == [True, False]
    assert read_checkpoint_meta(a_starts[1]["restored_from"])["run_name"] == "a"
    if final_registered:
        assert (a_starts[1]["step"], a_starts[1]["epoch"]) == (50, 2)  # its final checkpoint: two whole epochs
        assert a.checkpoint_path == a_starts[1]["restored_from"]  # not saved a second time
        assert [e["epoch"] for e in a.history if e["event"] == "epoch_end"] == [0, 1]
    assert [s["restored_from"] for s in b.history if s["event"] == "start"] == [None]


@pytest.mark.integration
@pytest.mark.slow
def test_jobs_of_a_run_train_on_the_same_batches(ray_cluster, tmp_path):
    """Two identical jobs (same model, same seed) over a held shard: the second starts from the shard the first
    collected, in the same order every epoch, so both report the same losses at every interval."""
    rows = 1200
    root = write_prepared(tmp_path / "prep", num_items=40, rows=rows, files=2)
    cfg = TrainConfig(num_workers=2, batch_size=24, epochs=3, report_every=5, checkpoint_every=1000,
                      sharding="row_wise", lr=0.01, sparse_lr=0.1, collective_timeout_s=60)
    jobs = [FitJob(functools.partial(tiny_factory, 40, 8), str(tmp_path / name), name) for name in ("a", "b")]
    a, b = fit_distributed_jobs(jobs, cfg, {"train": read_transitions(str(root))}, "ab", str(tmp_path / "storage"),
                                state_len=4, row_counts={"train": rows}, progress=False)
    losses = [[e["loss"] for e in r.history if e["event"] == "metrics"] for r in (a, b)]
    assert len(losses[0]) == 3 * 25 // 5 and losses[0] == losses[1]
    # only the first job collected the shard; the second read nothing
    assert [e["epoch"] for e in a.history if e["event"] == "held_shard"] == [0]
    assert not [e for e in b.history if e["event"] == "held_shard"]
    assert [s["feed"] for s in a.history + b.history if s["event"] == "start"] == ["memory", "memory"]


@pytest.mark.integration
@pytest.mark.slow
def test_a_failed_run_hands_back_the_jobs_that_finished(ray_cluster, tmp_path):
    """No restarts allowed and the second job's last rank killed: the run fails, and the first job's result (its
    final checkpoint) comes back with the failure, so that it need not train again."""
    rows = 1200
    root = write_prepared(tmp_path / "prep", num_items=40, rows=rows, files=2)
    cfg = TrainConfig(num_workers=2, batch_size=24, epochs=1, report_every=5, checkpoint_every=10,
                      fail_at_step=10, max_failures=0, sharding="row_wise", lr=0.01, sparse_lr=0.1,
                      collective_timeout_s=60)
    jobs = [FitJob(functools.partial(tiny_factory, 40, 8), str(tmp_path / name), name) for name in ("a", "b")]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / f"{FAULT_MARKER}_a").write_text("the first job has had its failure: it does not fail")
    with pytest.raises(JobsFailed, match="after 1 of its 2 jobs had finished") as failed:
        fit_distributed_jobs(jobs, cfg, {"train": read_transitions(str(root))}, "ab", str(tmp_path / "storage"),
                             state_len=4, row_counts={"train": rows}, progress=False)
    (first,) = failed.value.finished
    assert first.run_name == "a" and (tmp_path / "b" / f"{FAULT_MARKER}_b").exists()
    meta = read_checkpoint_meta(first.checkpoint_path)
    assert meta["run_name"] == "a" and meta["step"] == first.metrics["step"] == 25
    assert [e["event"] for e in first.history][-1] == "end"
