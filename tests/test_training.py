"""Distributed training on 2 Ray Train workers with a row-wise sharded TorchRec item table."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers_training import tiny_factory, write_prepared
from mtrec_dist.config import TrainConfig
from mtrec_dist.data.pipeline import collate_transitions, read_transitions
from mtrec_dist.runtime import init_ray
from mtrec_dist.training.checkpoint import (
    META_FILE,
    find_latest_checkpoint,
    load_unsharded_model,
    read_checkpoint_meta,
)
from mtrec_dist.training.loop import fit_distributed
from mtrec_dist.training.sharding import materialize_dense

torch.set_num_threads(1)

NUM_ITEMS, DIM, ROWS = 40, 8, 12_000  # 6000 rows per rank = 250 steps of 24 per epoch


def _plain_loss(model, root: Path) -> tuple[float, float]:
    table = pq.read_table(root / "transitions")
    batch = collate_transitions(table, state_len=4)
    with torch.no_grad():
        out = model.losses(batch)
    return float(out["loss"]), float(out["accuracy"])


@pytest.mark.integration
@pytest.mark.slow
def test_two_worker_training_shards_lowers_the_loss_checkpoints_and_resumes(ray_cluster, tmp_path):
    """One run of 200 steps (stopped mid-epoch), then a second run resumed from its latest checkpoint."""
    root = write_prepared(tmp_path / "prep", num_items=NUM_ITEMS, rows=ROWS, files=8)
    cfg = TrainConfig(num_workers=2, cpus_per_worker=0.5, batch_size=24, epochs=1, max_steps=200, report_every=25,
                      checkpoint_every=100, sharding="row_wise", lr=0.01, sparse_lr=0.1, shuffle_buffer_rows=512,
                      collective_timeout_s=120)
    init_ray()  # attaches to the session cluster
    factory = functools.partial(tiny_factory, NUM_ITEMS, DIM)
    storage = str(tmp_path / "storage")
    result = fit_distributed(factory, cfg, {"train": read_transitions(str(root))}, "first", storage,
                             state_len=4, label="test", row_counts={"train": ROWS})

    events = result.history
    start = next(e for e in events if e["event"] == "start")
    assert start["feed"] == "stream"  # train.feed auto: one pass (max_steps within the first epoch) is streamed
    # the item table (41 rows incl. padding) is really split: each rank holds only its row-wise shard
    key = "model.item_embedding.ec.embeddings.item_table.weight"
    assert start["plan"]["item_table"]["sharding_type"] == "row_wise"
    assert [r[key] for r in start["shard_sizes_by_rank"]] == [[[21, DIM]], [[20, DIM]]]

    metrics = [e for e in events if e["event"] == "metrics"]
    steps = [m["step"] for m in metrics]
    assert steps == list(range(25, 201, 25))  # a few hundred steps, reported every 25
    first, last = metrics[0], metrics[-1]
    assert last["loss"] < first["loss"] - 1.0, (first["loss"], last["loss"])  # log(40) = 3.7 at chance
    assert last["accuracy"] > 0.5 > first["accuracy"]
    assert all(m["samples_per_s"] > 0 and m["step_time_s"] > 0 for m in metrics)
    assert all(m["update_calls"] > 0 for m in metrics[1:])  # the update_target hook ran
    assert list((Path(result.output_dir) / "tensorboard").rglob("events.out.tfevents.*"))

    # the final checkpoint: every rank's DCP file merged into one directory, with our meta
    ckpt = Path(result.checkpoint_path)
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", META_FILE} <= {p.name for p in ckpt.iterdir()}
    meta = read_checkpoint_meta(str(ckpt))
    assert meta["step"] == result.metrics["step"] == 200 and meta["epoch"] == 0
    assert meta["rows_seen"] == 200 * 48

    # export: the sharded checkpoint loads into a plain single-process model that scores like the trained one
    trained = load_unsharded_model(factory, str(ckpt))
    t_loss, t_acc = _plain_loss(trained, root)
    f_loss, _ = _plain_loss(tiny_factory(NUM_ITEMS, DIM, torch.device("cpu")), root)
    assert t_loss < f_loss - 1.0 and t_acc > 0.5
    assert abs(t_loss - last["loss"]) < 0.5

    # resume from the newest checkpoint under the storage path and finish the epoch, then two more, this time
    # with each worker's rows collated in memory before its first step (train.feed=memory): the rest of the
    # resumed epoch is read once; epoch 1 is read whole and held, and epoch 2 reshuffles the held rows
    assert find_latest_checkpoint(storage) == result.checkpoint_path
    second = fit_distributed(factory, dataclasses.replace(cfg, max_steps=0, feed="memory", epochs=3),
                             {"train": read_transitions(str(root))},
                             "second", storage, resume="latest", state_len=4, row_counts={"train": ROWS},
                             progress=False)
    start2 = next(e for e in second.history if e["event"] == "start")
    assert start2["step"] == 200 and start2["restored_from"] == result.checkpoint_path and start2["feed"] == "memory"
    metrics2 = [e for e in second.history if e["event"] == "metrics"]
    assert min(m["step"] for m in metrics2) > 200
    assert metrics2[0]["loss"] < first["loss"] - 1.0  # continues from the trained state, not from scratch
    ends = [e for e in second.history if e["event"] == "epoch_end"]
    assert [e["epoch"] for e in ends] == [0, 1, 2]
    # 2400 rows were left: at least 50 more steps of 2 x 24, at most 100 (if one rank got them all)
    assert 250 <= ends[0]["step"] <= 300
    (held,) = [e for e in second.history if e["event"] == "held_shard"]  # rank 0's; not the resumed epoch's rest
    assert held["epoch"] == 1 and held["batches"] >= 250 and held["mb"] > 0
    # the held epoch runs the lock-step count of the epoch it was collected in
    assert ends[2]["step"] - ends[1]["step"] == ends[1]["step"] - ends[0]["step"] >= 250
    # every epoch trained on every row exactly once (count, sum and sum of squares of the row ids over both
    # ranks; for the resumed one, the 9600 rows consumed before the checkpoint included)
    ids = np.arange(1000, 1000 + ROWS, dtype=np.float64)
    for epoch_end in ends:
        assert (epoch_end["rows"], epoch_end["row_id_sum"], epoch_end["row_id_sqsum"]) == \
            (ROWS, ids.sum(), (ids ** 2).sum())
    assert second.metrics["rows_seen"] == 3 * ROWS
    assert read_checkpoint_meta(second.checkpoint_path)["epoch"] == 3


def test_meta_materialisation_initialises_dense_modules():
    """Dense modules built on meta get real values via reset_parameters (MultiheadAttention included)."""
    from torch import nn

    class WithAttention(nn.Module):
        def __init__(self, device):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, device=device)
            self.lin = nn.Linear(8, 8, device=device)

    torch.manual_seed(0)
    m = WithAttention(torch.device("meta"))
    materialize_dense(m, torch.device("cpu"))
    for name, p in m.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name
    assert m.attn.out_proj.bias.abs().sum() == 0  # MultiheadAttention's own init ran after its child's
    assert m.attn.in_proj_weight.std() > 0.05

    class NoReset(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(3, device="meta"))

    with pytest.raises(TypeError, match="no reset_parameters"):
        materialize_dense(NoReset(), torch.device("cpu"))


def test_the_controller_poll_reaches_ray_trains_controller(monkeypatch):
    """``train.controller_poll_s`` is set as the variable that Ray Train hands from the driver to each
    controller it launches (if a Ray upgrade stopped passing it on, the setting would silently do nothing)."""
    import os

    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    from mtrec_dist.runtime import TRAIN_POLL_ENV, set_controller_poll

    monkeypatch.delenv(TRAIN_POLL_ENV, raising=False)
    set_controller_poll(TrainConfig().controller_poll_s)
    assert float(os.environ[TRAIN_POLL_ENV]) == 0.5
    assert TRAIN_POLL_ENV in ENV_VARS_TO_PROPAGATE
    with pytest.raises(ValueError, match="controller_poll_s"):
        TrainConfig(controller_poll_s=0).validate()


def test_local_cluster_lists_parquet_with_one_footer_reader(monkeypatch):
    """A local cluster's environment asks Ray Data for one Parquet footer reader, not its pool of 32 actors, and
    a value the user set wins; Ray Data's indexer reads that variable when it is built (if a Ray upgrade renamed
    it, the setting would silently do nothing).  (Ray's default of 32 is read from the environment when Ray Data
    is imported, so in a session that started a local cluster first it is 1 too.)"""
    from ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer import FooterFileIndexer

    from mtrec_dist.runtime import FOOTER_ACTORS_ENV, set_local_cluster_env

    env = {}
    set_local_cluster_env(env)
    assert env == {FOOTER_ACTORS_ENV: "1"}
    mine = {FOOTER_ACTORS_ENV: "8"}
    set_local_cluster_env(mine)
    assert mine[FOOTER_ACTORS_ENV] == "8"
    # read when the indexer is built (in the driver, by read_parquet), not only when Ray Data is imported
    for value in (env[FOOTER_ACTORS_ENV], "3"):
        monkeypatch.setenv(FOOTER_ACTORS_ENV, value)
        assert FooterFileIndexer(ignore_missing_paths=False)._num_actors == int(value)


_FAULTS_SCRIPT = """
import resource, sys
import numpy as np
from mtrec_dist.runtime import retain_freed_memory
tuned = retain_freed_memory(int(sys.argv[1]))
for step in range(12):
    if step == 2:  # from the third step on: what each step costs once the process has warmed up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = [np.ones(1 << 17) for _ in range(40)]  # a step's 40 MiB of 1 MiB temporaries, then all freed
    del live
print(int(tuned), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(trim_mb: int):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, str(trim_mb)], capture_output=True, text=True,
                         check=True).stdout.split()
    return bool(int(out[0])), int(out[1])


def test_retained_memory_is_reused_without_page_faults():
    """``train.malloc_trim_mb``: freed tensors' memory is reused instead of being faulted in afresh each time
    (measured in fresh processes: glibc's settings are process-wide)."""
    import platform

    if platform.system() != "Linux" or not platform.libc_ver()[0].startswith("glibc"):
        pytest.skip("glibc's mallopt only")
    tuned, faults = _page_faults(TrainConfig().malloc_trim_mb)
    untouched, default_faults = _page_faults(0)
    assert tuned and not untouched
    # at glibc's defaults the freed 40 MiB is returned and faulted in again every step (10 x 10k pages; 102k
    # measured); kept, it is reused (0 measured)
    assert default_faults > 50_000 and faults < default_faults / 10, (faults, default_faults)
    with pytest.raises(ValueError, match="malloc_trim_mb"):
        TrainConfig(malloc_trim_mb=-1).validate()


@pytest.mark.integration
def test_fit_requires_a_train_dataset(ray_cluster, tmp_path):
    with pytest.raises(ValueError, match="'train'"):
        fit_distributed(functools.partial(tiny_factory, 4, 4), TrainConfig(), {}, "x", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no complete mtrec checkpoint"):
        fit_distributed(functools.partial(tiny_factory, 4, 4), TrainConfig(), {"train": None}, "x", str(tmp_path),
                        resume="latest")
