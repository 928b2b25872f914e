"""`score-rewards` for catalogs no process should hold: score inside a Ray Train worker group with the item
table sharded exactly as in training (issue 9, "sharded inference").

Each worker builds the reward model on the meta device, shards it with the training planner
(:func:`~mtrec_dist.training.sharding.shard_model`), and loads *only its own shard* of the table from the
DCP checkpoint (DCP reads the rows a rank's sharded tensor owns).  It then scores its split of the rows with
the same :class:`~mtrec_dist.training.scoring.TableScorer` as the scoring actors; every embedding lookup is
a TorchRec collective, so the ranks go in lock step: each step they all-reduce "I still have rows", and a
rank whose split has run out makes the same calls on no rows until every rank is done.  Each worker writes
its own Parquet parts and a one-line report (rows, shard sizes, peak RSS) that the driver collects.

The policy baseline looks up one item set per batch (the catalog when it is at most
``train.score_full_catalog_max`` items, else ``train.score_candidates`` drawn items), so at scale only the
drawn rows travel: no rank materialises the table.
"""
from __future__ import annotations

import json
import os
import resource
import tempfile
from typing import Any, Dict, List, Optional

import torch

from mtrec_dist.config import TrainConfig

SCORE_DATASET = "score"
RANK_REPORT = "_rank{rank:03d}.json"


def _local_rows(table):
    """Drop the split's filler rows (``row_id`` -1, see NoDropDataConfig)."""
    import pyarrow.compute as pc

    if "row_id" not in table.column_names:
        return table
    return table.filter(pc.greater_equal(table.column("row_id"), 0))


def _load_own_shard(dmp: torch.nn.Module, checkpoint_path: str) -> None:
    """Model weights only (no optimizer state); each rank reads just the rows its shard owns."""
    from mtrec_dist.training.checkpoint import local_checkpoint_dir
    from mtrec_dist.training.safe_dcp import dcp_load

    state = {"model": dmp.state_dict()}
    with local_checkpoint_dir(checkpoint_path) as d:
        dcp_load(state, d)
    dmp.load_state_dict(state["model"])


def _any_rank_has_rows(has_rows: bool, device: torch.device) -> bool:
    import torch.distributed as dist

    flag = torch.tensor([int(has_rows)], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _current_rss_mb() -> Optional[float]:
    """This process's resident memory now (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def _score_worker(config: Dict[str, Any]) -> None:
    """Ray Train worker: shard, load this rank's rows of the table, score this rank's split, write parts."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    import ray.train
    import ray.train.torch

    from mtrec_dist.training.reward import reward_model_factory
    from mtrec_dist.training.scoring import TableScorer
    from mtrec_dist.training.sharding import local_shard_sizes, shard_model

    cfg: TrainConfig = config["train_cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    torch.manual_seed(cfg.seed)
    spec = config["scorer"]["spec"]
    sharded = shard_model(reward_model_factory(spec, for_inference=True)(torch.device("meta")), cfg, device, world,
                          ctx.get_local_world_size())
    _load_own_shard(sharded.dmp, config["checkpoint_path"])
    sharded.dmp.eval()
    scorer = TableScorer(sharded.model, **dict(config["scorer"], seed=cfg.seed + rank), pad_to=cfg.score_batch_size)

    fs, base = pafs.FileSystem.from_uri(config["out_dir"])
    batches = iter(ray.train.get_dataset_shard(SCORE_DATASET).iter_batches(
        batch_size=cfg.score_batch_size, batch_format="pyarrow", prefetch_batches=cfg.prefetch_batches))
    rows = parts = 0
    while True:
        table = next(batches, None)
        if not _any_rank_has_rows(table is not None, device):
            break
        table = None if table is None else _local_rows(table)
        if table is None or table.num_rows == 0:
            scorer.idle()
            continue
        out = scorer(table)
        pq.write_table(out, f"{base}/part-r{rank:03d}-{parts:05d}.parquet", filesystem=fs)
        rows, parts = rows + out.num_rows, parts + 1
    report = {"rank": rank, "rows": rows, "parts": parts, "shard_sizes": local_shard_sizes(sharded.dmp),
              # ru_maxrss is in KiB on Linux; the peak includes loading, which reads the shard's bytes first
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "end_rss_mb": _current_rss_mb()}
    with fs.open_output_stream(f"{base}/{RANK_REPORT.format(rank=rank)}") as f:
        f.write(json.dumps(report).encode())


def _collect_reports(out_dir: str, world: int) -> List[Dict[str, Any]]:
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(out_dir)
    reports = []
    for rank in range(world):
        path = f"{base}/{RANK_REPORT.format(rank=rank)}"
        with fs.open_input_stream(path) as f:
            reports.append(json.loads(f.read().decode()))
        fs.delete_file(path)
    return reports


def score_sharded(tc: TrainConfig, checkpoint_path: str, ds, out_dir: str, scorer_kwargs: Dict[str, Any],
                  expected_rows: Optional[int]) -> List[Dict[str, Any]]:
    """Score ``ds`` on ``tc.num_workers`` Ray Train workers into ``out_dir`` (a URI or absolute path);
    returns each rank's report.  ``expected_rows`` (when known) saves a count for the no-drop split."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mtrec_dist.data.pipeline import NoDropDataConfig
    from mtrec_dist.runtime import dist_backend, resolve_use_gpu

    import pyarrow.fs as pafs

    use_gpu = resolve_use_gpu(tc.use_gpu)
    uri = out_dir if "://" in out_dir else f"file://{out_dir}"
    fs, base = pafs.FileSystem.from_uri(uri)
    fs.create_dir(base, recursive=True)
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    if "row_id" not in ds.schema().names:
        # no row ids, so no equal split (NoDropDataConfig): whole blocks go to whichever worker asks, and a
        # single-file input is a single block; blocks of one batch each spread it over the workers
        ds = ds.repartition(target_num_rows_per_block=tc.score_batch_size)
    config = {"train_cfg": tc, "use_gpu": use_gpu, "checkpoint_path": checkpoint_path, "out_dir": uri,
              "scorer": scorer_kwargs}
    with tempfile.TemporaryDirectory(prefix="mtrec-score-") as storage:  # Ray Train's run state; no checkpoints
        result = TorchTrainer(
            _score_worker, train_loop_config=config,
            torch_config=TorchConfig(backend=dist_backend(use_gpu), timeout_s=tc.collective_timeout_s),
            scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=f"score-{os.getpid()}", storage_path=tc.storage_path or storage,
                                 failure_config=FailureConfig(max_failures=0)),
            datasets={SCORE_DATASET: ds},
            dataset_config=NoDropDataConfig(row_counts={SCORE_DATASET: expected_rows} if expected_rows else None),
        ).fit()
    if result.error is not None:
        raise RuntimeError(f"sharded scoring failed: {result.error}") from result.error
    return _collect_reports(uri, tc.num_workers)
