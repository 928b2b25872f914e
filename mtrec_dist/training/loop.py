"""Generic distributed training on Ray Train + TorchRec DMP: :func:`fit_distributed`.

The driver builds a ``TorchTrainer`` (gloo on CPU, NCCL on GPU; workers with fractional CPUs so Ray Data
keeps CPUs for reading on small machines) that streams the ``train`` dataset through
:class:`~mtrec_dist.data.pipeline.NoDropDataConfig`.  Each worker:

1. builds ``model_factory(meta)``, shards it with a planner-made plan (:mod:`.sharding`), and builds the
   combined optimizer (FBGEMM fused sparse optimizer + Adam on dense parameters);
2. restores state from ``ray.train.get_checkpoint()`` (a FailureConfig restart, or a re-used run name) or
   else from an explicit checkpoint (``resume``): same step, same optimizer state, same epoch; the rows of
   the epoch in progress that the checkpoint had already trained on are skipped, so the resumed epoch sees
   every other row exactly once (rows trained on after the last checkpoint are redone, since their updates
   were lost with the crash);
3. trains: ``loss = model.losses(batch)["loss"]``, backward, optimizer step, then ``model.update_target()``
   if the model has it; every ``report_every`` steps the metrics (row-weighted means over the interval and
   over ranks, samples/s, step time, data-wait share) go to ``ray.train.report`` and, from rank 0, to
   TensorBoard event files and ``metrics.jsonl`` under the output dir; every ``checkpoint_every`` steps
   and at the end a DCP checkpoint (:mod:`.checkpoint`) is reported.

Per-epoch integrity: at the end of each epoch the ranks all-reduce the count, sum and sum of squares of
the row ids trained on in that epoch (including, after a restore, the rows the checkpoint had consumed)
and rank 0 logs them (``event: epoch_end``), so tests can check that each row was used exactly once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from mtrec_dist.config import TrainConfig
from mtrec_dist.runtime import dist_backend, resolve_use_gpu

TRAIN_DATASET = "train"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
FAULT_MARKER = ".fault_injected"


@dataclass
class FitResult:
    metrics: Dict[str, Any]           # rank 0's metrics of the last checkpoint report
    checkpoint_path: str              # the final checkpoint (local path or URI)
    run_name: str
    storage_path: str
    output_dir: str                   # metrics.jsonl, tensorboard/
    history: List[Dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl events of this run


# --------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------


def _progress_callback(label: str, lines):
    """A callback that puts one line per report into ``lines`` (a ``ray.util.queue.Queue``) for the driver
    to print: it runs in the Ray Train controller, whose own output stays in Ray's logs (``init_ray``)."""
    from ray.train.v2.api.callback import UserCallback

    class ProgressCallback(UserCallback):
        """One line per report (step, epoch, loss, throughput, checkpoint), sent to the driver."""

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0] if metrics else {}
            if "step" not in m:
                return
            parts = [f"[{label}] step {m['step']}", f"epoch {m.get('epoch', 0)}"]
            for k in ("loss", "samples_per_s", "step_time_s"):
                if k in m and isinstance(m[k], (int, float)):
                    parts.append(f"{k} {m[k]:.4g}")
            if checkpoint is not None:
                parts.append(f"checkpoint {checkpoint.path}")
            try:
                lines.put_nowait(" | ".join(parts))
            except Exception:  # a full or closed queue costs a progress line, never the run
                pass

    return ProgressCallback()


@contextlib.contextmanager
def _printing_progress(progress: bool):
    """Yield a queue whose lines the driver prints while the block runs (``None`` when not ``progress``)."""
    if not progress:
        yield None
        return
    from ray.util.queue import Empty, Queue

    lines, stop = Queue(maxsize=1000, actor_options={"num_cpus": 0}), threading.Event()

    def pump() -> None:
        while True:
            try:
                print(lines.get(timeout=0.5), flush=True)
            except Empty:
                if stop.is_set():  # drained after the run ended
                    return
            except Exception:  # the queue is gone: nothing more to print
                return

    thread = threading.Thread(target=pump, name="mtrec-progress", daemon=True)
    thread.start()
    try:
        yield lines
    finally:
        stop.set()
        thread.join(timeout=30)
        lines.shutdown()


def _storage_uri(storage_path: str) -> str:
    return storage_path if "://" in storage_path else os.path.abspath(storage_path)


def resolve_resume(resume: Optional[str], storage_path: str) -> Optional[str]:
    """``None`` | ``"latest"`` (newest complete checkpoint under ``storage_path``) | a checkpoint path."""
    from mtrec_dist.training.checkpoint import find_latest_checkpoint, read_checkpoint_meta

    if not resume:
        return None
    if resume == "latest":
        return find_latest_checkpoint(storage_path)
    read_checkpoint_meta(resume)  # raises a clear error if it is not an mtrec checkpoint
    return resume if "://" in resume else os.path.abspath(resume)


def fit_distributed(
    model_factory: Callable[[torch.device], nn.Module],
    train_cfg: TrainConfig,
    datasets: Dict[str, Any],
    run_name: str,
    storage_path: str,
    resume: Optional[str] = None,
    *,
    output_dir: Optional[str] = None,
    state_len: Optional[int] = None,
    fingerprint: Optional[Dict[str, Any]] = None,
    row_counts: Optional[Dict[str, int]] = None,
    extra_meta: Optional[Dict[str, Any]] = None,
    label: str = "train",
    progress: bool = True,
    warm_start: Optional[str] = None,
) -> FitResult:
    """Train ``model_factory(device)`` (a module with ``losses(batch) -> {"loss": ..., ...}``) on Ray Train.

    ``datasets["train"]``: a Ray Dataset of transitions (see :func:`mtrec_dist.data.pipeline.read_transitions`).
    ``run_name``/``storage_path``: where Ray Train keeps the run (local dir or cloud URI); re-using a run name
    under the same storage continues that run from its latest checkpoint.  ``resume``: ``None``, ``"latest"``
    (newest complete checkpoint under ``storage_path``) or a checkpoint path/URI.  ``output_dir``: local dir
    for metrics.jsonl and TensorBoard files (default ``<storage_path>/<run_name>`` when local).
    ``fingerprint``: JSON-able config whose hash is stored in each checkpoint (a mismatch on resume is logged).
    ``row_counts``: rows per dataset if known (saves a ``Dataset.count()`` when splitting).
    ``extra_meta``: JSON-able fields stored in every checkpoint's meta (e.g. what is needed to rebuild the
    model for inference).
    ``warm_start``: a checkpoint path/URI of an earlier run (e.g. yesterday's model) whose weights
    initialise this run's model when it starts fresh (no checkpoint of its own to restore and no
    ``resume``): see :func:`~mtrec_dist.training.checkpoint.warm_start_module` (the item table may have
    grown: old rows copied, new rows freshly initialised).  Step, epoch and the optimizer state start
    fresh (Adam moments and the sparse Adagrad accumulators are not carried over).  A restart after a
    failure restores this run's own checkpoint, never the warm-start weights again.
    The factory must be picklable (e.g. ``functools.partial`` of a class).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mtrec_dist.data.pipeline import NoDropDataConfig
    from mtrec_dist.training.checkpoint import config_hash

    if TRAIN_DATASET not in datasets:
        raise ValueError(f"datasets must contain {TRAIN_DATASET!r}; got {sorted(datasets)}")
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised; call mtrec_dist.runtime.init_ray() first")
    storage = _storage_uri(storage_path)
    if output_dir is None:
        if "://" in storage:
            raise ValueError("output_dir is required when storage_path is a URI (metrics are written locally)")
        output_dir = os.path.join(storage, run_name)
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    resume_path = resolve_resume(resume, storage)
    warm_path = None
    if warm_start:
        from mtrec_dist.training.checkpoint import read_checkpoint_meta

        read_checkpoint_meta(warm_start)  # a clear error if it is not an mtrec checkpoint
        warm_path = warm_start if "://" in warm_start else os.path.abspath(warm_start)
    use_gpu = resolve_use_gpu(train_cfg.use_gpu)
    fingerprint = fingerprint if fingerprint is not None else {"train": dataclasses.asdict(train_cfg)}

    resources = {"CPU": train_cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    worker_config = {
        "model_factory": model_factory,
        "train_cfg": train_cfg,
        "use_gpu": use_gpu,
        "resume_path": resume_path,
        "warm_start": warm_path,
        "output_dir": output_dir,
        "run_name": run_name,
        "state_len": state_len,
        "config_hash": config_hash(fingerprint),
        "extra_meta": dict(extra_meta or {}),
    }
    with _printing_progress(progress) as lines:  # the controller's report lines, printed here
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config=worker_config,
            torch_config=TorchConfig(backend=dist_backend(use_gpu), timeout_s=train_cfg.collective_timeout_s),
            scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=run_name,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=train_cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.checkpoints_to_keep or None),
                callbacks=[_progress_callback(label, lines)] if progress else [],
            ),
            datasets=datasets,
            dataset_config=NoDropDataConfig(row_counts=row_counts),
        )
        result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run {run_name!r} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name!r} finished without a checkpoint")
    ckpt_path = result.checkpoint.path
    if "://" in storage and "://" not in ckpt_path:
        ckpt_path = storage.split("://", 1)[0] + "://" + ckpt_path.lstrip("/")
    return FitResult(
        metrics=dict(result.metrics or {}),
        checkpoint_path=ckpt_path,
        run_name=run_name,
        storage_path=storage,
        output_dir=output_dir,
        history=read_history(output_dir, run_name),
    )


def read_history(output_dir: str, run_name: Optional[str] = None) -> List[Dict[str, Any]]:
    """Events of ``<output_dir>/metrics.jsonl`` (optionally of one run)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if run_name is None or e.get("run") == run_name]


# --------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------


class MetricsWriter:
    """Rank 0's JSON-lines and TensorBoard output (no-op on other ranks)."""

    def __init__(self, output_dir: str, run_name: str, enabled: bool) -> None:
        self.enabled = enabled
        self.run_name = run_name
        self.tb = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            self.path = os.path.join(output_dir, METRICS_FILE)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=os.path.join(output_dir, TENSORBOARD_DIR, run_name))

    def event(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": kind, "run": self.run_name, "time": time.time(), **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def metrics(self, metrics: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.event("metrics", **metrics)
        step = int(metrics["step"])
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _IntervalStats:
    """Row-weighted sums of a model's scalar outputs over a report interval, reduced over ranks."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.rows = 0.0
        self.steps = 0
        self.data_s = 0.0
        self.compute_s = 0.0
        self.start = time.perf_counter()

    def add(self, out: Dict[str, torch.Tensor], real_rows: torch.Tensor) -> None:
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                w = v.detach().float().reshape(()) * real_rows
                self.sums[k] = self.sums[k] + w if k in self.sums else w

    def reduce(self, device: torch.device, world_size: int) -> Dict[str, float]:
        import torch.distributed as dist

        keys = sorted(self.sums)
        if world_size > 1:
            all_keys: List[Any] = [None] * world_size
            dist.all_gather_object(all_keys, keys)
            if any(k != keys for k in all_keys):
                raise RuntimeError(f"ranks returned different loss/diagnostic keys: {all_keys}")
        elapsed = time.perf_counter() - self.start
        vec = torch.stack([self.sums[k] for k in keys] + [torch.tensor(float(self.rows), device=device)]) \
            if keys else torch.tensor([float(self.rows)], device=device)
        vec = vec.to(device=device, dtype=torch.float64)
        timing = torch.tensor([elapsed, self.data_s, self.compute_s], dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(vec)
            dist.all_reduce(timing, op=dist.ReduceOp.MAX)
        rows = float(vec[-1])
        out = {k: float(vec[i]) / max(rows, 1.0) for i, k in enumerate(keys)}
        elapsed = float(timing[0])
        out["samples_per_s"] = rows / elapsed if elapsed > 0 else 0.0
        out["step_time_s"] = elapsed / max(self.steps, 1)
        out["data_wait_frac"] = float(timing[1]) / elapsed if elapsed > 0 else 0.0
        out["interval_rows"] = rows
        return out


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


def _quiet_library_loggers() -> None:
    """FBGEMM/TorchRec log every kernel's full argument list at INFO and Ray Train logs every report: on a
    console that buries the progress lines.  ``MTREC_WORKER_LOG_LEVEL=INFO`` brings them back."""
    import logging

    level = getattr(logging, os.environ.get("MTREC_WORKER_LOG_LEVEL", "WARNING").upper(), logging.WARNING)
    for name in ("", "fbgemm_gpu", "torchrec", "ray.train"):
        logging.getLogger(name).setLevel(level)


def _train_worker(config: Dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from mtrec_dist.data.pipeline import consumed_row_ids, iter_train_batches
    from mtrec_dist.training.checkpoint import (load_checkpoint, local_checkpoint_dir, save_checkpoint,
                                                warm_start_module)
    from mtrec_dist.training.sharding import local_shard_sizes, plan_summary, shard_model

    t_enter = time.time()
    _quiet_library_loggers()
    cfg: TrainConfig = config["train_cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)  # identical dense initialisation on every rank (DDP also syncs it)
    np.random.seed(cfg.seed + rank)

    writer = MetricsWriter(config["output_dir"], config["run_name"], enabled=(rank == 0))
    model = config["model_factory"](torch.device("meta"))
    sharded = shard_model(model, cfg, device, world, ctx.get_local_world_size())
    dmp, opt = sharded.dmp, sharded.optimizer
    dmp.train()

    # ---- restore ----
    step, epoch, rows_seen = 0, 0, 0
    carried = np.zeros(0, dtype=np.int64)  # rows of the epoch in progress trained on before the restore
    restored_from = None
    ckpt = ray.train.get_checkpoint()
    source = None
    if ckpt is not None:
        source = ckpt
    elif config["resume_path"]:
        source = config["resume_path"]
    if source is not None:
        ctx_dir = source.as_directory() if ckpt is not None else local_checkpoint_dir(source)
        with ctx_dir as d:
            meta = load_checkpoint(d, dmp, opt)
        step, epoch, rows_seen = int(meta["step"]), int(meta["epoch"]), int(meta["rows_seen"])
        carried = meta["skip_row_ids"]
        restored_from = ckpt.path if ckpt is not None else source
        if meta.get("config_hash") != config["config_hash"]:
            writer.event("warning", message=f"config hash {config['config_hash']} differs from the checkpoint's "
                         f"{meta.get('config_hash')}: the run continues with the new config")
    warm_report = None
    if source is None and config.get("warm_start"):
        warm_report = warm_start_module(dmp, config["warm_start"])  # every rank fills its own shards
        if warm_report["max_abs_diff"] != 0.0:
            raise RuntimeError(f"warm start from {config['warm_start']} did not copy the weights exactly "
                               f"(max |diff| {warm_report['max_abs_diff']})")
    shard_sizes: List[Any] = [local_shard_sizes(dmp)]
    if world > 1:
        shard_sizes = [None] * world
        dist.all_gather_object(shard_sizes, local_shard_sizes(dmp))
    writer.event("start", step=step, epoch=epoch, restored_from=restored_from, warm_start=warm_report, world_size=world,
                 device=str(device), plan=plan_summary(sharded.plan), shard_sizes_by_rank=shard_sizes,
                 worker_entered=t_enter, setup_s=time.time() - t_enter)

    shard = ray.train.get_dataset_shard(TRAIN_DATASET)
    stats = _IntervalStats()
    consumed: List[torch.Tensor] = []
    last_ckpt = (-1, -1)  # (step, epoch) of this attempt's last checkpoint
    last_metrics: Dict[str, Any] = {}

    def checkpoint_and_report(metrics: Dict[str, Any]) -> None:
        nonlocal last_ckpt
        mine = torch.cat(consumed).cpu().numpy() if consumed else np.zeros(0, dtype=np.int64)
        if rank == 0 and carried.size:
            mine = np.concatenate([carried, mine])
        meta = {**config["extra_meta"], "step": step, "epoch": epoch, "rows_seen": rows_seen, "world_size": world,
                "config_hash": config["config_hash"], "run_name": config["run_name"],
                "plan": plan_summary(sharded.plan), "metrics": metrics}
        tmp = tempfile.mkdtemp(prefix=f"mtrec-ckpt-r{rank}-")
        try:
            save_checkpoint(tmp, dmp, opt, rank=rank, meta=meta, consumed_row_ids=mine)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_step{step:08d}_{int(time.time() * 1000)}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        last_ckpt = (step, epoch)
        writer.event("checkpoint", step=step, epoch=epoch)

    def interval_metrics() -> Dict[str, Any]:
        nonlocal rows_seen
        m = stats.reduce(device, world)
        if "loss" in m and not np.isfinite(m["loss"]):
            raise FloatingPointError(f"non-finite loss {m['loss']} at step {step}")
        rows_seen += int(m["interval_rows"])  # global: summed over ranks
        m.update(step=step, epoch=epoch, rows_seen=rows_seen)
        stats.reset()
        return m

    last_ray_report = time.monotonic()
    confirm_checkpoint = False  # identical on every rank: set at the same checkpoint steps
    stop = cfg.max_steps > 0 and step >= cfg.max_steps
    while not stop and epoch < cfg.epochs:
        batches = iter_train_batches(
            shard, cfg.batch_size, device, state_len=config["state_len"], skip_row_ids=carried,
            prefetch_batches=cfg.prefetch_batches, local_shuffle_buffer_size=cfg.shuffle_buffer_rows or None,
            local_shuffle_seed=(cfg.seed * 1009 + epoch * 17 + rank) if cfg.shuffle_buffer_rows else None,
        )
        t_data = time.perf_counter()
        for batch in batches:
            t0 = time.perf_counter()
            stats.data_s += t0 - t_data
            out = dmp(batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            sharded.call_hook("update_target")
            real = batch["mask"].sum()
            stats.add(out, real)
            ids = batch["row_id"][batch["mask"] > 0]
            consumed.append(ids)
            stats.rows += int(ids.numel())
            stats.steps += 1
            step += 1
            stats.compute_s += time.perf_counter() - t0
            do_ckpt = step % cfg.checkpoint_every == 0
            if step % cfg.report_every == 0 or do_ckpt:
                last_metrics = interval_metrics()
                if do_ckpt:
                    checkpoint_and_report(last_metrics)
                    last_ray_report = time.monotonic()
                    confirm_checkpoint = True
                elif confirm_checkpoint or _agree_on_rank0(
                        time.monotonic() - last_ray_report >= cfg.ray_report_min_interval_s, device, world):
                    # Ray Train V2 keeps one pending result per worker and drains it every ~2 s: reporting
                    # more often blocks the step (measured 4-5x slower), so Ray gets at most one result per
                    # interval while metrics.jsonl / TensorBoard get every one.  Rank 0 decides for all, so
                    # every rank makes the same number of report() calls.
                    # The first report after a checkpoint always goes out: it waits until the controller
                    # has taken the checkpoint's result, so a failure from here on restores at least that
                    # checkpoint (steps redone stay within one checkpoint interval).
                    ray.train.report(last_metrics)
                    last_ray_report = time.monotonic()
                    confirm_checkpoint = False
                writer.metrics(last_metrics)
                if do_ckpt and cfg.fail_at_step and step >= cfg.fail_at_step and rank == world - 1:
                    marker = Path(config["output_dir"]) / f"{FAULT_MARKER}_{config['run_name']}"
                    if not marker.exists():
                        marker.write_text(f"rank {rank} exits after the checkpoint of step {step}\n")
                        os._exit(1)  # fault injection (train.fail_at_step): FailureConfig must recover
            if cfg.max_steps and step >= cfg.max_steps:
                stop = True
                break
            t_data = time.perf_counter()
        if stop:
            break
        # the epoch is complete on every rank (iter_train_batches stops all ranks at the same step)
        parts = [carried] + ([torch.cat(consumed).cpu().numpy()] if consumed else [])
        writer.event("epoch_end", epoch=epoch, step=step, **_row_checksum(parts if rank == 0 else parts[1:], device, world))
        epoch += 1
        carried = np.zeros(0, dtype=np.int64)
        consumed = []

    if last_ckpt != (step, epoch):  # unless the final state was just checkpointed, save it
        if stats.steps:
            final = interval_metrics()
            writer.metrics(final)
        else:  # the last interval was just written: report it again to Ray, but do not repeat it in metrics.jsonl
            final = dict(last_metrics, step=step, epoch=epoch, rows_seen=rows_seen)
        checkpoint_and_report(final)
    writer.event("end", step=step, epoch=epoch, rows_seen=rows_seen)
    writer.close()
    if dist.is_initialized():
        dist.barrier()
