"""Ray Data -> Ray Train streaming: collation, padding, no dropped rows, lock-step ranks."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers_training import ship_by_value, write_prepared
from mtrec_dist.data.pipeline import (
    HeldShard,
    filter_and_rebatch,
    collate_transitions,
    iter_train_batches,
    masked_like,
    pad_batch,
    read_transitions,
    transitions_path,
)
from mtrec_dist.data.schema import TRANSITION_COLUMNS, EvalLeakError
from mtrec_dist.data.train_split import filler_rows

torch.set_num_threads(1)
ship_by_value(__name__)  # the Ray Train workers run _stream_worker from this file


def _table(n=5, L=3, extra=True):
    cols = {
        "row_id": pa.array(np.arange(n), pa.int64()),
        "user_idx": pa.array(np.zeros(n), pa.int64()),
        "state_items": pa.array([[0] * (L - 1) + [i + 1] for i in range(n)], pa.list_(pa.int64())),
        "state_feedback": pa.array([[0.0] * (L - 1) + [0.5] for _ in range(n)], pa.list_(pa.float32())),
        "action": pa.array(np.arange(n) + 2, pa.int64()),
        "action_feedback": pa.array(np.full(n, 0.25), pa.float32()),
        "next_state_items": pa.array([[0] * (L - 2) + [i + 1, i + 2] for i in range(n)], pa.list_(pa.int64())),
        "next_state_feedback": pa.array([[0.0] * (L - 2) + [0.5, 0.25] for _ in range(n)], pa.list_(pa.float32())),
        "done": pa.array(np.arange(n) % 2, pa.int8()),
        "ts": pa.array(np.arange(n), pa.int64()),
        "pos_from_end": pa.array(np.arange(n), pa.int32()),
    }
    if extra:
        cols["reward_mean"] = pa.array(np.linspace(0, 1, n), pa.float64())
        cols["reward_q"] = pa.array([[0.1, 0.2, 0.3, 0.4]] * n, pa.list_(pa.float32()))
    return pa.table(cols)


def test_collate_follows_the_batch_contract_and_passes_extra_columns():
    b = collate_transitions(_table(), state_len=3)
    assert b["state_items"].shape == (5, 3) and b["state_items"].dtype == torch.long
    assert b["state_feedback"].dtype == torch.float32 and b["done"].dtype == torch.float32
    assert b["pos_from_end"].dtype == torch.long and b["action"].tolist() == [2, 3, 4, 5, 6]
    assert b["next_state_items"][4].tolist() == [0, 5, 6]
    assert b["mask"].tolist() == [1.0] * 5
    # joined-in columns pass through as tensors
    assert b["reward_mean"].dtype == torch.float32 and b["reward_mean"].shape == (5,)
    assert b["reward_q"].shape == (5, 4) and b["reward_q"].dtype == torch.float32


def test_collate_rejects_ragged_states_and_non_numeric_columns():
    t = _table(extra=False)
    bad = t.set_column(t.column_names.index("state_items"), "state_items",
                       pa.array([[1, 2, 3]] * 4 + [[1, 2]], pa.list_(pa.int64())))
    with pytest.raises(ValueError, match="state_items.*row 4 has 2 values, expected 3"):
        collate_transitions(bad, state_len=3)
    with pytest.raises(ValueError, match="state_items.*expected 4"):
        collate_transitions(t, state_len=4)
    with pytest.raises(ValueError, match="'note'.*non-numeric"):
        collate_transitions(t.append_column("note", pa.array(["x"] * 5)))


def test_split_filler_rows_are_dropped():
    t = _table(n=4, extra=False)
    filler = filler_rows(t.schema, 2)
    assert filler.column("row_id").to_pylist() == [-1, -1] and filler.column("action").null_count == 2
    out = list(filter_and_rebatch([pa.concat_tables([t, filler])], 3, None))
    assert [c.column("row_id").to_pylist() for c in out] == [[0, 1, 2], [3]]


def test_pad_and_masked_batches():
    b = collate_transitions(_table(n=3), state_len=3)
    p = pad_batch(b, 8)
    assert all(v.shape[0] == 8 for v in p.values())
    assert p["mask"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert p["action"][3:].tolist() == [2] * 5  # padding repeats a real row: ids stay valid table indices
    m = masked_like(b, 4)
    assert m["mask"].sum() == 0 and m["state_items"].shape == (4, 3)


def test_a_held_shard_gives_every_row_once_per_epoch_in_the_same_number_of_batches():
    """train.feed=memory: the first epoch in the stored order, each later one a seeded permutation of the same
    rows (padding rows included), cut into as many batches as the lock-step epoch had."""
    batches = [collate_transitions(_table(n=4, extra=False), state_len=3) for _ in range(2)]
    batches.append(pad_batch(collate_transitions(_table(n=2, extra=False), state_len=3), 4))
    for i, b in enumerate(batches):
        b["row_id"] = b["row_id"] + 10 * i
    stored = [b["row_id"].tolist() for b in batches]
    real = sorted(int(r) for b in batches for r in b["row_id"][b["mask"] > 0])
    nbytes = sum(t.numpy().nbytes for b in batches for t in b.values())
    held = HeldShard(batches)
    assert held.num_batches == 3 and held.nbytes == nbytes
    assert batches == [{}, {}, {}]  # let go as they were copied
    first = list(held.epoch(torch.device("cpu")))
    assert [b["row_id"].tolist() for b in first] == stored
    assert real == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21]
    shuffled = [list(held.epoch(torch.device("cpu"), seed=s)) for s in (7, 7, 8)]
    for epoch in shuffled:
        assert [b["mask"].shape[0] for b in epoch] == [4, 4, 4]
        assert sorted(int(r) for b in epoch for r in b["row_id"][b["mask"] > 0]) == real
        # a row keeps its own columns when it moves
        assert all(torch.equal(b["action"], b["row_id"] % 10 + 2) for b in epoch)
    order = [[b["row_id"].tolist() for b in epoch] for epoch in shuffled]
    assert order[0] == order[1] != order[2]  # seeded: the same seed, the same order
    assert order[0] != stored
    assert list(HeldShard([]).epoch(torch.device("cpu"), seed=1)) == []


def test_skip_rows_and_rebatch():
    t = _table(n=10, extra=False)
    chunks = [t.slice(0, 4), t.slice(4, 4), t.slice(8, 2)]
    out = list(filter_and_rebatch(chunks, 3, np.array([1, 2, 5, 9])))
    ids = [r for c in out for r in c.column("row_id").to_pylist()]
    assert ids == [0, 3, 4, 6, 7, 8]
    assert [c.num_rows for c in out] == [3, 3]


@pytest.mark.integration
def test_filler_rows_in_a_streamed_shard_are_dropped_and_the_rest_rebatched(ray_cluster):
    """Split filler rows (nulls) never reach collation; full batches are re-formed, every real row once."""
    import ray

    t = _table(n=10, extra=False)
    ds = ray.data.from_arrow([t.slice(0, 5), filler_rows(t.schema, 2), t.slice(5, 5)])
    batches = list(iter_train_batches(ds.iterator(), 4, torch.device("cpu"), state_len=3))
    assert all(b["state_items"].shape == (4, 3) for b in batches)
    assert [int(b["mask"].sum()) for b in batches] == [4, 4, 2]
    ids = torch.cat([b["row_id"][b["mask"] > 0] for b in batches]).tolist()
    assert sorted(ids) == list(range(10))


@pytest.mark.integration
def test_single_process_iteration_pads_last_batch(ray_cluster, tmp_path):
    root = write_prepared(tmp_path / "prep", rows=37, files=2)
    ds = read_transitions(str(root))
    batches = list(iter_train_batches(ds.iterator(), 16, torch.device("cpu"), state_len=4))
    assert [int(b["mask"].sum()) for b in batches] == [16, 16, 5]
    assert all(b["state_items"].shape == (16, 4) for b in batches)
    ids = torch.cat([b["row_id"][b["mask"] > 0] for b in batches]).tolist()
    assert sorted(ids) == list(range(1000, 1037))


@pytest.mark.integration
def test_training_never_reads_eval(ray_cluster, tmp_path):
    root = write_prepared(tmp_path / "prep", rows=20, files=1)
    with pytest.raises(EvalLeakError):
        read_transitions(str(root), columns=["row_id", "eval_true_satisfaction"])
    with pytest.raises(EvalLeakError):
        transitions_path(str(root / "eval"))
    ds = read_transitions(str(root))
    assert ds.schema().names == TRANSITION_COLUMNS
    with pytest.raises(FileNotFoundError):
        read_transitions(str(tmp_path / "missing"))


def _stream_worker(config):
    import ray.train
    import torch.distributed as dist

    from mtrec_dist.data.pipeline import iter_train_batches

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    log = {"epochs": []}
    for epoch in range(config["epochs"]):
        # last epoch: pretend a restored checkpoint had trained on every row but the first, so one rank
        # has one row and the other none (it needs a template from its peer and yields a masked batch)
        skip = np.arange(1001, 1000 + config["rows"]) if epoch == config["epochs"] - 1 else None
        ids, steps, masked_steps = [], 0, 0
        for batch in iter_train_batches(shard, config["batch_size"], torch.device("cpu"), state_len=4,
                                        skip_row_ids=skip):
            assert batch["state_items"].shape[0] == config["batch_size"]
            ids += batch["row_id"][batch["mask"] > 0].tolist()
            steps += 1
            masked_steps += int(batch["mask"].sum() == 0)
            dist.barrier()  # a rank that ran more steps than another would hang here (timeout fails the test)
        log["epochs"].append({"ids": ids, "steps": steps, "masked_steps": masked_steps})
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(log))


def test_training_caches_its_data_only_where_it_reads_them_twice():
    from mtrec_dist.config import TrainConfig
    from mtrec_dist.training.loop import _reads_twice

    three = TrainConfig(epochs=3, max_steps=40, batch_size=128, num_workers=2)  # 40 steps = 10,240 rows
    assert _reads_twice(three, {"train": 4201})  # the tiny pipeline: 2.4 passes
    assert not _reads_twice(three, {"train": 20_000})  # stops within the first epoch
    assert _reads_twice(three, None)  # rows unknown: more than one epoch is the best guess
    assert not _reads_twice(TrainConfig(epochs=1), {"train": 10})
    assert _reads_twice(TrainConfig(epochs=1), {"train": 10}, jobs=2)  # several models of one run read it again


def test_auto_feed_holds_in_memory_only_what_is_read_twice_and_fits():
    from mtrec_dist.config import TrainConfig
    from mtrec_dist.training.loop import held_shard_mb, resolve_feed

    three = TrainConfig(epochs=3, max_steps=40, batch_size=128, num_workers=2, cache_rows=5000)
    assert three.feed == "auto"
    assert resolve_feed(three, {"train": 4201}, 10) == "memory"  # 2.4 passes over rows that fit
    assert resolve_feed(three, {"train": 20_000}, 10) == "stream"  # one pass
    assert resolve_feed(dataclasses.replace(three, max_steps=0), {"train": 20_000}, 10) == "stream"  # > cache_rows
    assert resolve_feed(three, None, 10) == "stream"  # rows unknown: no promise that they fit
    assert resolve_feed(three, {"train": 4201}, None) == "stream"
    # 2,101 rows per worker of 24 * 10 + 128 bytes: 0.74 MiB
    assert held_shard_mb(4201, 10, 2) == pytest.approx(2101 * 368 / 2**20)
    assert resolve_feed(dataclasses.replace(three, memory_feed_max_mb=0.7), {"train": 4201}, 10) == "stream"
    assert resolve_feed(dataclasses.replace(three, memory_feed_max_mb=0.8), {"train": 4201}, 10) == "memory"
    for chosen in ("stream", "memory"):  # what the user chose stands
        assert resolve_feed(dataclasses.replace(three, feed=chosen), {"train": 20_000}, None) == chosen


def test_the_driver_reads_a_recommender_training_set_only_where_it_is_small():
    from mtrec_dist.config import TrainConfig
    from mtrec_dist.training.loop import fits_driver

    # 4,201 rows of 24 * 10 + 128 bytes: 1.47 MiB, estimated as a one-worker held shard
    assert fits_driver(TrainConfig(driver_read_mb=1.5), 4201, 10)
    assert not fits_driver(TrainConfig(driver_read_mb=1.4), 4201, 10)
    assert not fits_driver(TrainConfig(driver_read_mb=0), 1, 10)  # 0: Ray Data always reads the files
    assert TrainConfig().driver_read_mb > 0


@pytest.mark.integration
def test_an_in_memory_dataset_keeps_every_row_in_order_in_bounded_blocks(ray_cluster):
    from mtrec_dist.data.pipeline import in_memory_dataset

    table = _table(n=1000, L=8)
    block_mb = table.nbytes / 2**20 / 7.5  # about 133 rows per block: 8 blocks
    ds = in_memory_dataset(table, block_mb=block_mb)
    assert ds.materialize().num_blocks() == 8
    assert [r["row_id"] for r in ds.take_all()] == list(range(1000))
    assert in_memory_dataset(table.slice(0, 0)).count() == 0


@pytest.mark.integration
@pytest.mark.parametrize("guidance", ["none", "reweight"])
def test_recommender_rows_read_by_the_driver_equal_ray_datas_read(ray_cluster, tmp_path, guidance):
    import pyarrow.parquet as pq
    import ray

    from mtrec_dist.data.heldout import heldout_mask
    from mtrec_dist.training.recommender import REWARD_COLUMNS, read_training_rows

    share = 0.3

    root = write_prepared(tmp_path / "prep", rows=61, files=3)
    scored = root / "transitions"
    if guidance != "none":  # a scored-transitions dataset: the reward columns beside every transition column
        for f in sorted(scored.glob("*.parquet")):
            t = pq.read_table(f)
            for c in REWARD_COLUMNS:
                t = t.append_column(c, pa.array(np.linspace(0, 1, t.num_rows), pa.float32()))
            pq.write_table(t, f)
    (scored / "_SUCCESS").write_text("")  # what writers leave beside the data: both readers skip it
    pq.write_table(pq.read_table(next(scored.glob("*.parquet"))), scored / ".stale-copy.parquet")

    def rows(in_memory: bool, skip_last: bool = False) -> pa.Table:
        from ray.data.dataset import MaterializedDataset

        ds = read_training_rows(str(scored), guidance, share, in_memory=in_memory, skip_last=skip_last)
        assert isinstance(ds, MaterializedDataset) == in_memory  # blocks already in the object store, or a read
        return pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("row_id")

    driver_table = rows(in_memory=True)
    assert driver_table.equals(rows(in_memory=False))
    written = pa.concat_tables(pq.read_table(f) for f in sorted(scored.glob("part-*.parquet")))
    kept = ~heldout_mask(written.column("user_idx").to_numpy(), share)  # every row of a user not held out
    assert 0 < (~kept).sum() and driver_table.num_rows == int(kept.sum()) < 61
    want_rows = sorted(written.column("row_id").to_numpy()[kept].tolist())
    assert sorted(driver_table.column("row_id").to_pylist()) == want_rows
    assert not heldout_mask(driver_table.column("user_idx").to_numpy(), share).any()
    assert (set(REWARD_COLUMNS) <= set(driver_table.column_names)) == (guidance != "none")
    # skip_last (the peer benchmark's leave-last-out): each user's last transition is left out as well
    last = rows(in_memory=True, skip_last=True)
    assert last.equals(rows(in_memory=False, skip_last=True))
    pos = written.column("pos_from_end").to_numpy()
    assert last.num_rows == int((kept & (pos != 0)).sum()) < driver_table.num_rows
    assert 0 not in last.column("pos_from_end").to_pylist()


@pytest.mark.integration
def test_only_a_training_set_that_fits_is_cached(ray_cluster, tmp_path):
    from ray.data.dataset import MaterializedDataset

    from mtrec_dist.data.train_split import NoDropDataConfig

    ds = read_transitions(str(write_prepared(tmp_path / "prep", rows=50, files=2)))
    config = NoDropDataConfig(cache_rows=50)
    cached = config.cached(ds, 50)
    assert isinstance(cached, MaterializedDataset) and cached.count() == 50
    assert not isinstance(config.cached(ds, 51), MaterializedDataset)  # too many rows
    assert not isinstance(config.cached(ds, 0), MaterializedDataset)  # rows not known
    assert not isinstance(NoDropDataConfig().cached(ds, 50), MaterializedDataset)  # caching off


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True], ids=["streamed", "cached"])
def test_two_workers_see_every_row_once_per_epoch_in_lock_step(ray_cluster, tmp_path, cached):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mtrec_dist.data.train_split import NoDropDataConfig

    rows = 333  # odd, and not a multiple of the batch size
    root = write_prepared(tmp_path / "prep", rows=rows, files=5)
    ds = read_transitions(str(root))
    out = tmp_path / "out"
    out.mkdir()
    trainer = TorchTrainer(
        _stream_worker,
        train_loop_config={"epochs": 3, "batch_size": 32, "out": str(out), "rows": rows},
        torch_config=TorchConfig(backend="gloo", timeout_s=120),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="stream", storage_path=str(tmp_path / "ray")),
        datasets={"train": ds},
        # cached: the topped-up dataset is materialised once and every epoch splits the cached blocks
        dataset_config=NoDropDataConfig(row_counts={"train": rows}, cache_rows=rows if cached else 0),
    )
    trainer.fit()
    logs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        a, b = logs[0]["epochs"][epoch], logs[1]["epochs"][epoch]
        assert a["steps"] == b["steps"] > 0
        all_ids = a["ids"] + b["ids"]
        assert len(all_ids) == rows and sorted(all_ids) == list(range(1000, 1000 + rows))
        # equal shares: ceil(333 / 2) = 167 rows and 166 rows (+ one filler row), 6 steps of 32 each
        assert sorted([len(a["ids"]), len(b["ids"])]) == [166, 167]
        assert a["steps"] == 6 and a["masked_steps"] == b["masked_steps"] == 0
    a, b = logs[0]["epochs"][2], logs[1]["epochs"][2]
    assert a["ids"] + b["ids"] == [1000]
    assert a["steps"] == b["steps"] == 1 and a["masked_steps"] + b["masked_steps"] == 1
