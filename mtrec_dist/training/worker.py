"""One Ray Train worker of :func:`~mtrec_dist.training.loop.fit_distributed`: :func:`train_worker`.

The worker's life is a few named steps around two small objects: :class:`_Worker` (what is fixed once the
worker is set up: rank, device, sharded model, optimizer, metrics writer) and :class:`_RunState` (what
training moves forward: step, epoch, rows seen, the row ids consumed in the epoch in progress, and the
bookkeeping of checkpoints and Ray reports).

1. :func:`_set_up` builds and shards the model and its combined optimizer;
2. :func:`_restore` loads ``ray.train.get_checkpoint()`` (a restart; :func:`_first_job` says whose) or the
   explicit ``resume`` checkpoint,
   or else :func:`_warm_start` copies an earlier run's weights;
3. :func:`_train_epoch` streams the rank's dataset shard: :func:`_train_step` per batch, then
   :func:`_report_if_due` (metrics every ``report_every`` steps, a checkpoint every ``checkpoint_every``);
   :func:`_end_epoch` logs the epoch's row-id checksum;
4. :func:`_finish` checkpoints the final state unless it was just checkpointed.

A run may hold several *jobs* (:func:`~mtrec_dist.training.loop.fit_distributed_jobs`: models trained one
after another on the same rows, e.g. a pipeline's recommender variants): steps 1-4 run per job in the same
worker group, which then starts, joins its process group and reads its data once; a job after the first
starts from the shard the ranks already hold (``train.feed: memory``).
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import torch

from mtrec_dist.config import TrainConfig
from mtrec_dist.training.metrics_log import IntervalStats, MetricsWriter

TRAIN_DATASET = "train"
FAULT_MARKER = ".fault_injected"


def _empty_ids() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass
class _Worker:
    """What stays fixed for the life of one worker once it is set up."""

    config: Dict[str, Any]            # the run's worker_config with this job's entries (fit_distributed_jobs)
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    sharded: Any                      # sharding.ShardedModel: .dmp, .optimizer, .plan, .call_hook
    writer: MetricsWriter

    @property
    def dmp(self):
        return self.sharded.dmp

    @property
    def opt(self):
        return self.sharded.optimizer


@dataclass
class _RunState:
    """What training moves forward, and what a checkpoint must record to resume it."""

    step: int = 0
    epoch: int = 0
    rows_seen: int = 0                # global: summed over ranks
    carried: np.ndarray = field(default_factory=_empty_ids)  # rows of this epoch trained on before a restore
    consumed: List[torch.Tensor] = field(default_factory=list)  # row ids trained on in this epoch (this attempt)
    last_ckpt: Tuple[int, int] = (-1, -1)  # (step, epoch) of this attempt's last checkpoint
    last_metrics: Dict[str, Any] = field(default_factory=dict)
    stats: IntervalStats = field(default_factory=IntervalStats)
    held: Any = None                  # train.feed=memory: this rank's collated shard of a whole epoch (HeldShard)
    held_epoch: int = -1              # the epoch it was collected in (trained in its stored order)
    last_ray_report: float = 0.0      # time.monotonic() of the last ray.train.report
    confirm_checkpoint: bool = False  # identical on every rank: set at the same checkpoint steps


# --------------------------------------------------------------------------------------------------
# Small collectives
# --------------------------------------------------------------------------------------------------


def _row_checksum(parts: List[np.ndarray], device: torch.device, world_size: int) -> Dict[str, float]:
    import torch.distributed as dist

    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    ids_f = ids.astype(np.float64)
    vec = torch.tensor([float(ids.size), ids_f.sum(), (ids_f ** 2).sum()], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(vec)
    return {"rows": int(vec[0]), "row_id_sum": float(vec[1]), "row_id_sqsum": float(vec[2])}


def _agree_on_rank0(flag: bool, device: torch.device, world_size: int) -> bool:
    """Rank 0's ``flag`` on every rank (one tiny broadcast), for decisions that must be identical."""
    if world_size <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def _wait_for_every_rank(device: torch.device, world_size: int) -> None:
    """Return only once every rank has got here (a one-element all-reduce: nobody finishes it alone)."""
    if world_size <= 1:
        return
    import torch.distributed as dist

    t = torch.zeros(1, device=device)
    dist.all_reduce(t)
    t.item()  # on NCCL the all-reduce is only queued: wait for it on the host


def _quiet_library_loggers() -> None:
    """FBGEMM/TorchRec log every kernel's full argument list at INFO and Ray Train logs every report: on a
    console that buries the progress lines.  ``MTREC_WORKER_LOG_LEVEL=INFO`` brings them back."""
    import logging

    level = getattr(logging, os.environ.get("MTREC_WORKER_LOG_LEVEL", "WARNING").upper(), logging.WARNING)
    for name in ("", "fbgemm_gpu", "torchrec", "ray.train"):
        logging.getLogger(name).setLevel(level)


# --------------------------------------------------------------------------------------------------
# Setup and restore
# --------------------------------------------------------------------------------------------------


def worker_device(use_gpu: bool) -> torch.device:
    """This Ray Train worker's device (its GPU, made the current CUDA device, or the CPU)."""
    import ray.train.torch

    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _set_up(config: Dict[str, Any]) -> _Worker:
    """Seed, pick the device, build ``model_factory`` on the meta device and shard it with its optimizer."""
    import ray.train

    from mtrec_dist.training.sharding import shard_model

    cfg: TrainConfig = config["train_cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(config["use_gpu"])
    torch.manual_seed(cfg.seed)  # identical dense initialisation on every rank (DDP also syncs it)
    np.random.seed(cfg.seed + rank)

    writer = MetricsWriter(config["output_dir"], config["run_name"], enabled=(rank == 0))
    model = config["model_factory"](torch.device("meta"))
    sharded = shard_model(model, cfg, device, world, ctx.get_local_world_size())
    sharded.dmp.train()
    return _Worker(config=config, cfg=cfg, rank=rank, world=world, device=device, sharded=sharded, writer=writer)


def _restore(w: _Worker, s: _RunState, ckpt: Any) -> Any:
    """Load ``ckpt`` (this job's own checkpoint after a restart: :func:`_first_job`) or else the ``resume`` one
    into ``s``; return where it came from (``None`` when the job starts fresh)."""
    from mtrec_dist.training.checkpoint import load_checkpoint, local_checkpoint_dir

    source = ckpt if ckpt is not None else (w.config["resume_path"] or None)
    if source is None:
        return None
    ctx_dir = source.as_directory() if ckpt is not None else local_checkpoint_dir(source)
    with ctx_dir as d:
        meta = load_checkpoint(d, w.dmp, w.opt)
    s.step, s.epoch, s.rows_seen = int(meta["step"]), int(meta["epoch"]), int(meta["rows_seen"])
    s.carried = meta["skip_row_ids"]
    if meta.get("config_hash") != w.config["config_hash"]:
        w.writer.event("warning", message=f"config hash {w.config['config_hash']} differs from the checkpoint's "
                       f"{meta.get('config_hash')}: the run continues with the new config")
    return ckpt.path if ckpt is not None else source


def _warm_start(w: _Worker) -> Any:
    """Copy the ``warm_start`` checkpoint's weights into a fresh run (every rank fills its own shards)."""
    from mtrec_dist.training.checkpoint import warm_start_module

    if not w.config.get("warm_start"):
        return None
    report = warm_start_module(w.dmp, w.config["warm_start"])
    if report["max_abs_diff"] != 0.0:
        raise RuntimeError(f"warm start from {w.config['warm_start']} did not copy the weights exactly "
                           f"(max |diff| {report['max_abs_diff']})")
    # what the model computed from this run's data (the reward model's item prior) is this run's, not the
    # earlier checkpoint's: the model puts it back
    w.sharded.call_hook("after_warm_start")
    return report


def _log_start(w: _Worker, s: _RunState, restored_from: Any, warm_report: Any, t_enter: float) -> None:
    """The ``start`` event: where the run resumed from, the plan and every rank's shard sizes."""
    import torch.distributed as dist

    from mtrec_dist.training.sharding import local_shard_sizes, plan_summary

    shard_sizes: List[Any] = [local_shard_sizes(w.dmp)]
    if w.world > 1:
        shard_sizes = [None] * w.world
        dist.all_gather_object(shard_sizes, local_shard_sizes(w.dmp))
    w.writer.event("start", step=s.step, epoch=s.epoch, restored_from=restored_from, warm_start=warm_report,
                   world_size=w.world, device=str(w.device), feed=w.cfg.feed, plan=plan_summary(w.sharded.plan),
                   shard_sizes_by_rank=shard_sizes, worker_entered=t_enter, setup_s=time.time() - t_enter)


# --------------------------------------------------------------------------------------------------
# Metrics and checkpoints
# --------------------------------------------------------------------------------------------------


def _consumed_ids(s: _RunState) -> np.ndarray:
    return torch.cat(s.consumed).cpu().numpy() if s.consumed else _empty_ids()


def _for_ray(w: _Worker, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """What Ray Train gets of an interval's metrics: they and the index of the run's job that reported them
    (the driver's progress lines and its choice of each job's final checkpoint read it)."""
    return {**metrics, "job": w.config["job"]}


def _checkpoint_and_report(w: _Worker, s: _RunState, metrics: Dict[str, Any]) -> None:
    """Save a DCP checkpoint of the current state and hand it to Ray Train with ``metrics``."""
    import ray.train

    from mtrec_dist.training.checkpoint import save_checkpoint
    from mtrec_dist.training.sharding import plan_summary

    mine = _consumed_ids(s)
    if w.rank == 0 and s.carried.size:  # rank 0 records the rows the restored checkpoint had consumed
        mine = np.concatenate([s.carried, mine])
    meta = {**w.config["extra_meta"], "step": s.step, "epoch": s.epoch, "rows_seen": s.rows_seen,
            "world_size": w.world, "config_hash": w.config["config_hash"], "run_name": w.config["run_name"],
            "plan": plan_summary(w.sharded.plan), "metrics": metrics}
    tmp = tempfile.mkdtemp(prefix=f"mtrec-ckpt-r{w.rank}-")
    try:
        save_checkpoint(tmp, w.dmp, w.opt, rank=w.rank, meta=meta, consumed_row_ids=mine)
        ray.train.report(_for_ray(w, metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step{s.step:08d}_{int(time.time() * 1000)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    s.last_ckpt = (s.step, s.epoch)
    w.writer.event("checkpoint", step=s.step, epoch=s.epoch)


def _interval_metrics(w: _Worker, s: _RunState) -> Dict[str, Any]:
    """The interval's metrics reduced over ranks (``rows_seen`` advanced); starts the next interval."""
    m = s.stats.reduce(w.device, w.world)
    if "loss" in m and not np.isfinite(m["loss"]):
        raise FloatingPointError(f"non-finite loss {m['loss']} at step {s.step}")
    s.rows_seen += int(m["interval_rows"])  # global: summed over ranks
    m.update(step=s.step, epoch=s.epoch, rows_seen=s.rows_seen)
    s.stats.reset()
    return m


def _maybe_inject_fault(w: _Worker, s: _RunState) -> None:
    """``train.fail_at_step``: the last rank exits once after a checkpoint, so FailureConfig must recover."""
    cfg = w.cfg
    if not (cfg.fail_at_step and s.step >= cfg.fail_at_step and w.rank == w.world - 1):
        return
    marker = Path(w.config["output_dir"]) / f"{FAULT_MARKER}_{w.config['run_name']}"
    if not marker.exists():
        marker.write_text(f"rank {w.rank} exits after the checkpoint of step {s.step}\n")
        # Ray Train's controller collects reported checkpoints when it polls the workers: exiting at once could
        # beat every poll since the last registered checkpoint (10 tiny steps take less than one poll), and the
        # restart would then begin from scratch instead of from a checkpoint, which is what this simulates
        time.sleep(3 * cfg.controller_poll_s)
        os._exit(1)


def _report_if_due(w: _Worker, s: _RunState) -> None:
    """Every ``report_every`` steps write the metrics (and give Ray some of them); every
    ``checkpoint_every`` steps also checkpoint."""
    cfg = w.cfg
    do_ckpt = s.step % cfg.checkpoint_every == 0
    if not (s.step % cfg.report_every == 0 or do_ckpt):
        return
    import ray.train
    s.last_metrics = _interval_metrics(w, s)
    if do_ckpt:
        _checkpoint_and_report(w, s, s.last_metrics)
        s.last_ray_report = time.monotonic()
        s.confirm_checkpoint = True
    elif s.confirm_checkpoint or _agree_on_rank0(
            time.monotonic() - s.last_ray_report >= cfg.ray_report_min_interval_s, w.device, w.world):
        # Ray Train V2 keeps one pending result per worker and drains it every ~2 s: reporting more often
        # blocks the step (measured 4-5x slower), so Ray gets at most one result per interval while
        # metrics.jsonl / TensorBoard get every one.  Rank 0 decides for all, so every rank makes the same
        # number of report() calls.
        # The first report after a checkpoint always goes out: it waits until the controller has taken the
        # checkpoint's result, so a failure from here on restores at least that checkpoint (steps redone
        # stay within one checkpoint interval).
        ray.train.report(_for_ray(w, s.last_metrics))
        if s.confirm_checkpoint:
            # Each rank's report returns once the controller has taken *that rank's* checkpoint result, and
            # Ray registers the checkpoint only when it holds every rank's.  Until all ranks are past this
            # point, killing one can still lose the checkpoint (rank 0 would already have logged the step).
            _wait_for_every_rank(w.device, w.world)
        s.last_ray_report = time.monotonic()
        s.confirm_checkpoint = False
    w.writer.metrics(s.last_metrics)
    if do_ckpt:
        _maybe_inject_fault(w, s)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _train_step(w: _Worker, s: _RunState, batch: Dict[str, torch.Tensor]) -> None:
    """One optimizer step on ``batch``; its real (unpadded) rows count towards the interval and the epoch."""
    out = w.dmp(batch)
    w.opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    w.opt.step()
    w.sharded.call_hook("update_target")
    s.stats.add(out, batch["mask"].sum())
    ids = batch["row_id"][batch["mask"] > 0]
    s.consumed.append(ids)
    s.stats.rows += int(ids.numel())
    s.stats.steps += 1
    s.step += 1


def _reached_max_steps(cfg: TrainConfig, s: _RunState) -> bool:
    return bool(cfg.max_steps) and s.step >= cfg.max_steps


def _epoch_batches(w: _Worker, s: _RunState, shard: Any) -> Iterator[Dict[str, torch.Tensor]]:
    """This epoch's batches: streamed by Ray Data (``train.feed: stream``), or from the shard this rank holds
    in host memory (``memory``: collected in the first whole epoch, before its first step; every later epoch
    reshuffles the held rows unless ``shuffle_buffer_rows`` is 0; on a GPU only the batch being trained on is on
    the device)."""
    from mtrec_dist.data.pipeline import HeldShard, iter_train_batches

    cfg, rank = w.cfg, w.rank
    seed = cfg.seed * 1009 + s.epoch * 17 + rank
    if cfg.feed == "memory" and s.held is not None:  # shuffle_buffer_rows 0 keeps the stored order
        # the epoch the shard was collected in keeps its stored order in a later job of the run too, so every
        # job trains on the same batches in the same order
        reshuffle = cfg.shuffle_buffer_rows and s.epoch != s.held_epoch
        return s.held.epoch(w.device, seed=seed if reshuffle else None)
    batches = iter_train_batches(
        shard, cfg.batch_size, w.device, state_len=w.config["state_len"], skip_row_ids=s.carried,
        prefetch_batches=cfg.prefetch_batches, local_shuffle_buffer_size=cfg.shuffle_buffer_rows or None,
        local_shuffle_seed=seed if cfg.shuffle_buffer_rows else None,
    )
    # "auto" is resolved before the workers start (training.loop.resolve_feed); the rest of an epoch that a
    # checkpoint resumed is streamed: it is not whole, so it is not held (the next whole epoch is)
    if cfg.feed != "memory" or s.carried.size:
        return batches
    s.held, s.held_epoch = HeldShard([{k: v.cpu() for k, v in b.items()} for b in batches]), s.epoch
    w.writer.event("held_shard", epoch=s.epoch, batches=s.held.num_batches, mb=round(s.held.nbytes / 2**20, 1))
    return s.held.epoch(w.device)


def _train_epoch(w: _Worker, s: _RunState, shard: Any) -> bool:
    """Train on the rank's shard for the rest of the epoch; ``True`` when ``max_steps`` stopped it early."""
    cfg = w.cfg
    t_data = time.perf_counter()
    batches = _epoch_batches(w, s, shard)  # with feed=memory the collection counts as the first data wait
    for batch in batches:
        t0 = time.perf_counter()
        s.stats.data_s += t0 - t_data
        _train_step(w, s, batch)
        s.stats.compute_s += time.perf_counter() - t0
        _report_if_due(w, s)
        if _reached_max_steps(cfg, s):
            return True
        t_data = time.perf_counter()
    return False


def _end_epoch(w: _Worker, s: _RunState) -> None:
    """Log the epoch's row-id checksum (all ranks; rank 0 adds the rows a restored checkpoint had consumed)
    and start the next epoch."""
    # the epoch is complete on every rank (iter_train_batches stops all ranks at the same step)
    parts = [s.carried] + ([_consumed_ids(s)] if s.consumed else [])
    checksum = _row_checksum(parts if w.rank == 0 else parts[1:], w.device, w.world)
    w.writer.event("epoch_end", epoch=s.epoch, step=s.step, **checksum)
    s.epoch += 1
    s.carried = _empty_ids()
    s.consumed = []


def _finish(w: _Worker, s: _RunState) -> None:
    """Checkpoint the final state unless it was just checkpointed, then log the end."""
    if s.last_ckpt != (s.step, s.epoch):
        if s.stats.steps:
            final = _interval_metrics(w, s)
            w.writer.metrics(final)
        else:  # the last interval was just written: report it again to Ray, but do not repeat it in metrics.jsonl
            final = dict(s.last_metrics, step=s.step, epoch=s.epoch, rows_seen=s.rows_seen)
        _checkpoint_and_report(w, s, final)
    w.writer.event("end", step=s.step, epoch=s.epoch, rows_seen=s.rows_seen)
    w.writer.close()


def _checkpoint_run_name(ckpt: Any) -> Any:
    """The job (its ``run_name``) that wrote a Ray Train checkpoint, from its meta file alone (nothing else of a
    checkpoint on cloud storage is downloaded for it)."""
    import json

    from mtrec_dist.training.checkpoint import META_FILE

    with ckpt.filesystem.open_input_stream(f"{ckpt.path.rstrip('/')}/{META_FILE}") as f:
        return json.loads(f.read()).get("run_name")


def _first_job(jobs: List[Dict[str, Any]], restart: Any) -> int:
    """Where a (re)started worker group begins: the job that wrote the run's latest checkpoint (the jobs before
    it had finished, final checkpoint included), or the first job."""
    if restart is None or len(jobs) == 1:
        return 0
    name = _checkpoint_run_name(restart)
    for i, job in enumerate(jobs):
        if job["run_name"] == name:
            return i
    raise RuntimeError(f"the run's latest checkpoint {restart.path} was written by {name!r}, none of its jobs "
                       f"{[job['run_name'] for job in jobs]}")


def _train_job(config: Dict[str, Any], shard: Any, restart: Any, held: Tuple[Any, int],
               t_enter: float) -> Tuple[Any, int]:
    """One model from setup to its final checkpoint; returns the shard this rank holds (``train.feed: memory``)
    and the epoch it was collected in, for the next job of the run."""
    w = _set_up(config)
    s = _RunState()
    restored_from = _restore(w, s, restart)
    if restart is not None:
        # the state is the run's own registered checkpoint: a job restarted after its final one (a failure in the
        # next job before that one checkpointed) finishes without saving it again
        s.last_ckpt = (s.step, s.epoch)
    warm_report = _warm_start(w) if restored_from is None else None
    # a held shard is a whole epoch: a job resumed mid-epoch streams the rest of that epoch first
    if restored_from is None:
        s.held, s.held_epoch = held
    _log_start(w, s, restored_from, warm_report, t_enter)

    s.stats = IntervalStats()  # the first interval starts here, not at setup
    s.last_ray_report = time.monotonic()
    stop = _reached_max_steps(w.cfg, s)
    while not stop and s.epoch < w.cfg.epochs:
        stop = _train_epoch(w, s, shard)
        if not stop:
            _end_epoch(w, s)
    _finish(w, s)
    return s.held, s.held_epoch


def train_worker(config: Dict[str, Any]) -> None:
    """The Ray Train worker function: for each of the run's jobs (models trained one after another on the same
    rows by the same worker group: :func:`~mtrec_dist.training.loop.fit_distributed_jobs`) set up, restore or
    warm-start, train the epochs, checkpoint the end.  After a restart the jobs that had finished are skipped."""
    import ray.train
    import torch.distributed as dist

    from mtrec_dist.runtime import retain_freed_memory

    t_enter = time.time()
    _quiet_library_loggers()
    retain_freed_memory(config["train_cfg"].malloc_trim_mb)
    shard = ray.train.get_dataset_shard(TRAIN_DATASET)
    jobs = config["jobs"]
    restart = ray.train.get_checkpoint()
    first = _first_job(jobs, restart)
    shared = {k: v for k, v in config.items() if k != "jobs"}
    held: Tuple[Any, int] = (None, -1)
    for i in range(first, len(jobs)):
        held = _train_job({**shared, **jobs[i], "job": i}, shard, restart if i == first else None, held, t_enter)
        gc.collect()  # the job's model and optimizer go before the next job builds its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        t_enter = time.time()
        if dist.is_initialized():
            dist.barrier()
