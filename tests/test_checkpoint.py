"""Sharded DCP checkpoints: bit-exact round trips (also across sharding layouts), safe loading, resume."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from helpers_training import tiny_factory
from mtrec_dist.config import TrainConfig
from mtrec_dist.training.checkpoint import (
    META_FILE,
    SafeFileSystemReader,
    UnsafeCheckpointError,
    find_latest_checkpoint,
    list_checkpoints,
    load_unsharded_model,
)

torch.set_num_threads(1)

NUM_ITEMS, DIM = 40, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(seed: int, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(1, NUM_ITEMS + 1, (n, 4), generator=g)
    return {"state_items": s, "action": torch.randint(1, NUM_ITEMS + 1, (n,), generator=g),
            "mask": torch.ones(n)}


def _flatten(obj, prefix=""):
    """Leaves of a nested state dict; ShardedTensors become their local shards."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}/{i}"))
        return out
    if isinstance(obj, ShardedTensor):
        return {f"{prefix}#{i}": s.tensor.detach().clone() for i, s in enumerate(obj.local_shards())}
    if isinstance(obj, torch.Tensor):
        return {prefix: obj.detach().clone()}
    return {prefix: obj}


def _tensor_lists(state) -> dict:
    return {k: v.tolist() for k, v in _flatten(state).items() if isinstance(v, torch.Tensor)}


def _identical(a, b) -> list:
    fa, fb = _flatten(a), _flatten(b)
    if fa.keys() != fb.keys():
        return [f"keys differ: {sorted(set(fa) ^ set(fb))}"]
    bad = []
    for k in fa:
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                bad.append(k)
        elif x != y:
            bad.append(k)
    return bad


def _step(sharded, batch) -> float:
    out = sharded.dmp(batch)
    sharded.optimizer.zero_grad()
    out["loss"].backward()
    sharded.optimizer.step()
    return float(out["loss"])


def _roundtrip_worker(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist

    from mtrec_dist.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from mtrec_dist.training.sharding import plan_summary, shard_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    row = TrainConfig(sharding="row_wise", lr=0.01, sparse_lr=0.1)
    table = dataclasses.replace(row, sharding="table_wise")
    build = lambda cfg: shard_model(tiny_factory(NUM_ITEMS, DIM, torch.device("meta")), cfg,  # noqa: E731
                                    torch.device("cpu"), world, world)
    torch.manual_seed(0)
    a = build(row)
    for i in range(3):
        _step(a, _batch(100 * rank + i))
    ck1, ck2 = os.path.join(root, "ck1"), os.path.join(root, "ck2")
    save_checkpoint(ck1, a.dmp, a.optimizer, rank=rank, meta={"step": 3, "epoch": 0, "rows_seen": 96,
                                                              "world_size": world}, consumed_row_ids=np.array([rank, 7]),
                    chunk_rows=7)  # the table's 41 rows saved in pieces of at most 7 rows
    saved_optim = _tensor_lists(a.optimizer.state_dict())  # as in ck1: this rank's shards, the dense state whole
    b = build(table)  # another layout: the whole table on one rank
    load_checkpoint(ck1, b.dmp, b.optimizer)
    save_checkpoint(ck2, b.dmp, b.optimizer, rank=rank, meta={"step": 3, "epoch": 0, "rows_seen": 96,
                                                              "world_size": world}, consumed_row_ids=np.zeros(0))
    torch.manual_seed(123)  # a different initialisation, overwritten by the load
    c = build(row)
    meta = load_checkpoint(ck1, c.dmp, c.optimizer)
    before = _identical(a.dmp.state_dict(), c.dmp.state_dict()) + \
        _identical(a.optimizer.state_dict(), c.optimizer.state_dict())
    loss_a, loss_c = _step(a, _batch(999 + rank)), _step(c, _batch(999 + rank))
    after = _identical(a.dmp.state_dict(), c.dmp.state_dict()) + \
        _identical(a.optimizer.state_dict(), c.optimizer.state_dict())
    # a sharded model of another catalog size is refused before DCP reads anything (same error on every rank)
    bigger = shard_model(tiny_factory(NUM_ITEMS + 8, DIM, torch.device("meta")), row, torch.device("cpu"),
                         world, world)
    try:
        load_checkpoint(ck1, bigger.dmp, bigger.optimizer)
        refused = ""
    except CheckpointError as e:
        refused = str(e)
    Path(root, f"rank{rank}.json").write_text(json.dumps({
        "refused": refused,
        "before": before, "after": after, "loss_a": loss_a, "loss_c": loss_c,
        "skip": meta["skip_row_ids"].tolist(), "step": meta["step"],
        "plan_b": plan_summary(b.plan)["item_table"]["sharding_type"],
        "optim_keys": sorted(_flatten(a.optimizer.state_dict())),
        "optim_ck1": saved_optim,
        "pieces": {name: [len(m.chunks) for k, m in SafeFileSystemReader(os.path.join(root, name)).read_metadata()
                          .state_dict_metadata.items() if k.startswith("model.") and k.endswith("item_table.weight")]
                   for name in ("ck1", "ck2")},
    }))
    dist.destroy_process_group()


def _single_rank_worker(rank: int, port: int, root: str) -> None:
    """One rank loads the 2-rank checkpoint: no DDP around the dense part (a single rank has nothing to
    all-reduce), the same state-dict keys, and a step still trains."""
    import torch.distributed as dist

    from mtrec_dist.training.checkpoint import load_checkpoint
    from mtrec_dist.training.sharding import shard_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    one = shard_model(tiny_factory(NUM_ITEMS, DIM, torch.device("meta")), TrainConfig(sharding="row_wise"),
                      torch.device("cpu"), 1, 1)
    load_checkpoint(os.path.join(root, "ck1"), one.dmp, one.optimizer)
    state = {k: (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v).tolist()  # one rank: one shard
             for k, v in one.dmp.state_dict().items()}
    optim = _tensor_lists(one.optimizer.state_dict())
    loss = _step(one, _batch(5))
    Path(root, "single.json").write_text(json.dumps({"wrapped": type(one.dmp._dmp_wrapped_module).__name__,
                                                     "state": state, "optim": optim, "loss": loss}))
    dist.destroy_process_group()


def test_checkpoint_round_trip_is_bit_exact_across_layouts(tmp_path):
    mp.spawn(_roundtrip_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["before"] == [] and r["after"] == []  # model + optimizer state identical, before and after a step
        assert r["loss_a"] == r["loss_c"]
        assert r["skip"] == [0, 1, 7] and r["step"] == 3
        assert r["plan_b"] == "table_wise"
        assert r["pieces"] == {"ck1": [6], "ck2": [1]}  # 21 + 20 rows in pieces of 7 rows; one table-wise piece
        assert f"[{NUM_ITEMS + 1}, {DIM}] there, [{NUM_ITEMS + 9}, {DIM}] in the model" in r["refused"]
        # the fused sparse optimizer state (row-wise Adagrad) and Adam's state are in the checkpoint
        assert any("item_table.momentum1" in k for k in r["optim_keys"])
        assert any("proj.weight/exp_avg_sq" in k for k in r["optim_keys"])
    # the same weights come out of the row-wise and the table-wise checkpoint, as a plain model
    factory = functools.partial(tiny_factory, NUM_ITEMS, DIM)
    m1 = load_unsharded_model(factory, str(tmp_path / "ck1"))
    m2 = load_unsharded_model(factory, str(tmp_path / "ck2"))
    fresh = factory(torch.device("cpu"))
    for (k, v1), v2, v0 in zip(m1.state_dict().items(), m2.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(v1, v2), k
        assert not torch.equal(v1, v0), k  # really loaded, not the fresh initialisation
    # one worker resumes what two wrote; its dense part is not wrapped in DDP
    mp.spawn(_single_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=1, join=True)
    single = json.loads((tmp_path / "single.json").read_text())
    assert single["wrapped"] == "TrainingModule" and np.isfinite(single["loss"])
    assert single["state"].keys() == {f"model.{k}" for k in m1.state_dict()}  # TrainingModule's prefix
    for k, v in m1.state_dict().items():
        assert torch.equal(torch.tensor(single["state"][f"model.{k}"], dtype=v.dtype), v), k
    # and the optimizer state: Adam's (the same on both ranks) and the row-wise Adagrad momentum, whose two
    # row-wise shards (rank 0's rows first) are one shard on a single rank
    saved = [r["optim_ck1"] for r in results]
    assert single["optim"].keys() == saved[0].keys() and any(k.endswith("#0") for k in saved[0])
    for k, v in single["optim"].items():
        want = saved[0][k] + saved[1][k] if k.endswith("#0") and "momentum" in k else saved[0][k]
        assert v == want, k


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loading_refuses_arbitrary_pickled_objects(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    def fake(name, step, saved_at, files):
        d = tmp_path / "run" / name
        d.mkdir(parents=True)
        (d / META_FILE).write_text(json.dumps({"step": step, "saved_at": saved_at, "world_size": 2}))
        for f in files:
            (d / f).write_bytes(b"")
        return d

    fake("a", 10, 1.0, [".metadata", "__0_0.distcp", "__1_0.distcp"])
    good = fake("b", 20, 2.0, [".metadata", "__0_0.distcp", "__1_0.distcp"])
    fake("c", 30, 3.0, [".metadata", "__0_0.distcp"])  # rank 1's file never arrived
    assert [m["step"] for m in list_checkpoints(str(tmp_path))] == [10, 20]
    assert find_latest_checkpoint(str(tmp_path)) == str(good)
    with pytest.raises(FileNotFoundError):
        find_latest_checkpoint(str(tmp_path / "nothing"))
