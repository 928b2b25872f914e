"""Inference with the item table sharded exactly as in training, for catalogs no process should hold (issue 9).

One harness serves `score-rewards` (:mod:`~mtrec_dist.training.sharded_scoring`) and ranking evaluation
(:mod:`~mtrec_dist.evaluation.sharded_ranking`):

* :func:`run_sharded` starts a Ray Train worker group (no checkpoints, no restarts) over one dataset split
  without dropping rows (:class:`~mtrec_dist.data.train_split.NoDropDataConfig`), and returns what each rank
  reported;
* in a worker, :func:`sharded_model` builds the model on the meta device, shards it with the training planner
  and loads *only this rank's rows* of the table from the DCP checkpoint;
* :func:`lockstep_tables` streams the rank's split: every embedding lookup is a TorchRec collective, so each
  step the ranks all-reduce "I still have rows", and a rank whose split has run out gets ``None`` (it must
  make the same calls on no rows) until every rank is done.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from mtrec_dist.config import TrainConfig
from mtrec_dist.data.input_files import resolve_filesystem

INFERENCE_DATASET = "rows"
_REPORT = "rank{rank:03d}.json"


def current_rss_mb() -> Optional[float]:
    """This process's resident memory now (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float:
    """This process's peak resident memory: ``VmHWM`` of Linux ``/proc/self/status``, which is this program's
    own; ``ru_maxrss`` (the fallback) also counts, after fork + exec, the peak of the process it was forked
    from (Linux keeps the larger across exec), which made a small child look as big as its parent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except (OSError, ValueError, IndexError):
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def reset_peak_rss() -> bool:
    """Start this process's ``VmHWM`` again from its current resident memory (Linux: writing 5 to
    ``/proc/self/clear_refs``), so that :func:`peak_rss_mb` measures from here on; ``False`` where it cannot
    (the peak then also covers what came before)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_model_shard(dmp: torch.nn.Module, checkpoint_path: str) -> None:
    """Model weights only (no optimizer state); each rank reads just the rows its shard owns."""
    from mtrec_dist.training.checkpoint import local_checkpoint_dir
    from mtrec_dist.training.safe_dcp import dcp_load

    state = {"model": dmp.state_dict()}
    with local_checkpoint_dir(checkpoint_path) as d:
        dcp_load(state, d)
    dmp.load_state_dict(state["model"])


def sharded_model(factory: Callable[[torch.device], torch.nn.Module], cfg: TrainConfig, checkpoint_path: str,
                  device: torch.device):
    """In a worker: ``factory``'s model sharded row-wise over the worker group (every rank holds a share of the
    rows, whatever the training plan was), this rank's rows loaded, in eval mode.  The fused sparse optimizer
    is plain SGD, which keeps no state: nothing table-sized besides the weights."""
    import dataclasses

    import ray.train

    from mtrec_dist.runtime import retain_freed_memory
    from mtrec_dist.training.sharding import shard_model

    retain_freed_memory(cfg.malloc_trim_mb)
    ctx = ray.train.get_context()
    torch.manual_seed(cfg.seed)
    cfg = dataclasses.replace(cfg, sharding="row_wise", sparse_optimizer="exact_sgd")
    sharded = shard_model(factory(torch.device("meta")), cfg, device, ctx.get_world_size(), ctx.get_local_world_size())
    load_model_shard(sharded.dmp, checkpoint_path)
    sharded.dmp.eval()
    return sharded


def lockstep_tables(batch_size: int, prefetch_batches: int, device: torch.device) -> Iterator[Optional[Any]]:
    """This rank's Arrow batches of the dataset (split-filler rows dropped, full batches re-formed, as
    :func:`~mtrec_dist.data.pipeline.iter_train_batches` does), then ``None`` while any other rank still has
    rows; stops on every rank at the same step.  Must be called by all ranks."""
    import ray.train

    from mtrec_dist.data.pipeline import filter_and_rebatch, max_over_ranks

    local = iter(filter_and_rebatch(ray.train.get_dataset_shard(INFERENCE_DATASET).iter_batches(
        batch_size=batch_size, batch_format="pyarrow", prefetch_batches=prefetch_batches), batch_size, None))
    while True:
        table = next(local, None)
        if not int(max_over_ranks(torch.tensor([int(table is not None)], dtype=torch.int32, device=device))[0]):
            return
        yield table


def report(config: Dict[str, Any], rank: int, sharded, **fields) -> None:
    """Write this rank's report (what it did, its shard sizes, peak and final resident memory)."""
    from mtrec_dist.training.sharding import local_shard_sizes

    body = dict(rank=rank, shard_sizes=local_shard_sizes(sharded.dmp), **fields,
                peak_rss_mb=peak_rss_mb(),  # includes loading, which reads the shard's bytes before copying them
                end_rss_mb=current_rss_mb())
    fs, base = resolve_filesystem(config["report_dir"])
    with fs.open_output_stream(f"{base}/{_REPORT.format(rank=rank)}") as f:
        f.write(json.dumps(body).encode())


def _alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive")) if ray.is_initialized() else 1


@contextlib.contextmanager
def scratch_dir(tc: TrainConfig, name: str) -> Iterator[str]:
    """A folder every worker can write to, removed afterwards: under ``train.storage_path`` (shared storage on
    a multi-node cluster) when it is set, else a temporary folder on this machine."""
    if not tc.storage_path and _alive_nodes() > 1:
        raise ValueError(f"sharded {name} on a cluster of several nodes needs train.storage_path on storage every "
                         "node can write (the workers' outputs and reports meet there)")
    with tempfile.TemporaryDirectory(prefix=f"mtrec-{name}-") as tmp:
        uri = f"{tc.storage_path.rstrip('/')}/_{name}-{os.getpid()}" if tc.storage_path else tmp
        fs, base = resolve_filesystem(uri)
        fs.create_dir(base, recursive=True)
        try:
            yield uri
        finally:
            if tc.storage_path:
                fs.delete_dir(base)


def run_sharded(worker: Callable[[Dict[str, Any]], None], tc: TrainConfig, ds, config: Dict[str, Any], name: str,
                expected_rows: Optional[int] = None) -> List[Dict[str, Any]]:
    """Run ``worker(config)`` on ``tc.num_workers`` Ray Train workers over ``ds``; every rank's report.

    ``config`` gains ``train_cfg``, ``use_gpu`` and ``report_dir`` (a :func:`scratch_dir`).
    A dataset without ``row_id`` cannot be split equally without dropping rows, so it is cut into blocks of
    one batch that go to whichever worker asks."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mtrec_dist.data.train_split import NoDropDataConfig
    from mtrec_dist.runtime import dist_backend, resolve_use_gpu, set_controller_poll

    use_gpu = resolve_use_gpu(tc.use_gpu)
    if "row_id" not in ds.schema().names:
        ds = ds.repartition(target_num_rows_per_block=tc.score_batch_size)
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    set_controller_poll(tc.controller_poll_s)
    with scratch_dir(tc, name) as report_dir, tempfile.TemporaryDirectory(prefix=f"mtrec-{name}-ray-") as tmp:
        config = dict(config, train_cfg=tc, use_gpu=use_gpu, report_dir=report_dir)
        result = TorchTrainer(
            worker, train_loop_config=config,
            torch_config=TorchConfig(backend=dist_backend(use_gpu), timeout_s=tc.collective_timeout_s),
            scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=f"{name}-{os.getpid()}", storage_path=tc.storage_path or tmp,
                                 failure_config=FailureConfig(max_failures=0)),
            datasets={INFERENCE_DATASET: ds},
            dataset_config=NoDropDataConfig(row_counts={INFERENCE_DATASET: expected_rows} if expected_rows else None),
        ).fit()
        if result.error is not None:
            raise RuntimeError(f"{name} on {tc.num_workers} sharded workers failed: {result.error}") from result.error
        fs, base = resolve_filesystem(report_dir)
        reports = []
        for rank in range(tc.num_workers):
            with fs.open_input_stream(f"{base}/{_REPORT.format(rank=rank)}") as f:
                reports.append(json.loads(f.read().decode()))
    return reports
