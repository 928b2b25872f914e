"""Generic distributed training on Ray Train + TorchRec DMP: :func:`fit_distributed`.

The driver builds a ``TorchTrainer`` (gloo on CPU, NCCL on GPU; workers with fractional CPUs so Ray Data
keeps CPUs for reading on small machines) that streams the ``train`` dataset through
:class:`~mtrec_dist.data.train_split.NoDropDataConfig`.  Each worker (:mod:`.worker`; its metrics files and
interval statistics are :mod:`.metrics_log`):

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
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from mtrec_dist.config import TrainConfig
from mtrec_dist.runtime import dist_backend, resolve_use_gpu, set_controller_poll
# The worker side lives in .worker and .metrics_log; the names callers read from here stay importable.
from mtrec_dist.training.metrics_log import read_history  # noqa: F401
from mtrec_dist.training.worker import FAULT_MARKER, TRAIN_DATASET  # noqa: F401
from mtrec_dist.training.worker import train_worker as _train_worker


@dataclass
class FitResult:
    metrics: Dict[str, Any]           # rank 0's metrics of the last checkpoint report
    checkpoint_path: str              # the final checkpoint (local path or URI)
    run_name: str
    storage_path: str
    output_dir: str                   # metrics.jsonl, tensorboard/
    history: List[Dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl events of this run


def expected_steps(train_cfg: TrainConfig, train_rows: Optional[int]) -> Optional[int]:
    """Optimizer steps the run will take: epochs x the steps of one epoch when the training rows are known
    (each worker reads an equal share in batches), capped by ``max_steps`` where set; ``None`` if neither
    is known."""
    by_epochs = (train_cfg.epochs * math.ceil(train_rows / train_cfg.num_workers / train_cfg.batch_size)
                 if train_rows else None)
    if train_cfg.max_steps > 0:
        return train_cfg.max_steps if by_epochs is None else min(train_cfg.max_steps, by_epochs)
    return by_epochs


def eta_text(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h02m``."""
    s = max(0, int(round(seconds)))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def _progress_callback(labels: List[str], lines, total_steps: Optional[int] = None):
    """A callback that puts one line per report into ``lines`` (a ``ray.util.queue.Queue``) for the driver
    to print: it runs in the Ray Train controller, whose own output stays in Ray's logs (``init_ray``).
    With ``total_steps`` known, a line shows the share done and an ETA from the pace since the first report.
    Each item is ``(milestone, text)``: the first report and those that pass a quarter of the run are
    milestones, which are all a log file gets (:func:`_printing_progress`); a terminal sees every report
    rewrite one line.  metrics.jsonl and TensorBoard keep every interval either way.  ``labels``: one per job
    of the run (a report names its job), each with its own share done and pace."""
    from ray.train.v2.api.callback import UserCallback

    class ProgressCallback(UserCallback):
        """Progress lines (step, epoch, share done, ETA, loss, throughput, checkpoint), sent to the driver."""

        first: Optional[tuple] = None  # (wall time, step) of the job's first report: the pace excludes start-up
        next_share = 0  # the share done (%) that prints the next line
        job = 0  # the job the last report came from

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0] if metrics else {}
            if "step" not in m:
                return
            if int(m.get("job", 0)) != self.job:  # the next job: its own share and pace
                self.job, self.first, self.next_share = int(m.get("job", 0)), None, 0
            label = labels[min(self.job, len(labels) - 1)]
            parts = [f"[{label}] step {m['step']}", f"epoch {m.get('epoch', 0)}"]
            now, step = time.time(), int(m["step"])
            milestone = True
            if total_steps:
                share = min(100, 100 * step // total_steps)
                milestone = share >= self.next_share
                if milestone:
                    self.next_share = (share // 25 + 1) * 25
                parts.append(f"{share}%")
                if self.first is None:
                    self.first = (now, step)
                elif step > self.first[1]:
                    pace = (now - self.first[0]) / (step - self.first[1])
                    parts.append(f"eta {eta_text(pace * max(0, total_steps - step))}")
            for k in ("loss", "samples_per_s", "step_time_s"):
                if k in m and isinstance(m[k], (int, float)):
                    parts.append(f"{k} {m[k]:.4g}")
            if checkpoint is not None:
                parts.append(f"checkpoint {checkpoint.path}")
            try:
                lines.put_nowait((milestone, " | ".join(parts)))
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

    tty = sys.stdout.isatty()

    def pump() -> None:
        bar_open = False  # a terminal line being rewritten in place
        while True:
            try:
                milestone, text = lines.get(timeout=0.5)
            except Empty:
                if not stop.is_set():
                    continue
                break  # drained after the run ended
            except Exception:  # the queue is gone: nothing more to print
                break
            if tty:
                sys.stdout.write("\r\033[K" + text)
                sys.stdout.flush()
                bar_open = True
            elif milestone:
                print(text, flush=True)
        if bar_open:
            sys.stdout.write("\n")
            sys.stdout.flush()

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


def _resolve_output_dir(output_dir: Optional[str], storage: str, run_name: str) -> str:
    """``output_dir`` made absolute and created (default ``<storage>/<run_name>``, which must be local)."""
    if output_dir is None:
        if "://" in storage:
            raise ValueError("output_dir is required when storage_path is a URI (metrics are written locally)")
        output_dir = os.path.join(storage, run_name)
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    return output_dir


def _resolve_warm_start(warm_start: Optional[str]) -> Optional[str]:
    """The warm-start checkpoint as an absolute path or URI, after checking it is an mtrec checkpoint."""
    if not warm_start:
        return None
    from mtrec_dist.training.checkpoint import read_checkpoint_meta

    read_checkpoint_meta(warm_start)  # a clear error if it is not an mtrec checkpoint
    return warm_start if "://" in warm_start else os.path.abspath(warm_start)


def _reads_twice(train_cfg: TrainConfig, row_counts: Optional[Dict[str, int]], jobs: int = 1) -> bool:
    """Whether training reads its data more than once (caching it then pays): several jobs in the run
    (:func:`fit_distributed_jobs`), or more than one epoch and no ``max_steps`` that ends within the first (where
    the rows are known; :func:`expected_steps`)."""
    if jobs > 1:
        return True
    if train_cfg.epochs <= 1:
        return False
    rows = (row_counts or {}).get(TRAIN_DATASET)
    one_epoch = expected_steps(dataclasses.replace(train_cfg, epochs=1, max_steps=0), rows)
    return one_epoch is None or expected_steps(train_cfg, rows) > one_epoch


HELD_BYTES_PER_STATE_POSITION = 24  # two int64 item lists and two float32 feedback lists (state, next state)
HELD_BYTES_PER_ROW = 128  # the scalar columns


def held_shard_mb(rows: int, state_len: int, num_workers: int) -> float:
    """Estimated MiB of one worker's held shard (``train.feed: memory``) of a ``rows``-row training set."""
    per_row = HELD_BYTES_PER_STATE_POSITION * state_len + HELD_BYTES_PER_ROW
    return math.ceil(rows / max(num_workers, 1)) * per_row / 2**20


def fits_driver(train_cfg: TrainConfig, rows: int, state_len: int) -> bool:
    """Whether the driver process handles a ``rows``-row set itself (``train.driver_read_mb``, estimated as
    a held shard is; 0 = never): a recommender's or the reward model's training read, score-rewards'
    scoring, offline ranking, reward validity's click-model scores of the logged actions."""
    return train_cfg.driver_read_mb > 0 and held_shard_mb(rows, state_len, 1) <= train_cfg.driver_read_mb


def resolve_feed(train_cfg: TrainConfig, row_counts: Optional[Dict[str, int]], state_len: Optional[int],
                 jobs: int = 1) -> str:
    """``train.feed`` with ``auto`` resolved: ``memory`` where training reads its data more than once
    (:func:`_reads_twice`), has at most ``train.cache_rows`` rows and each worker's shard is estimated at most
    ``train.memory_feed_max_mb`` (each worker then holds its shard from the first whole epoch on: later epochs
    read, split and collate nothing, and never wait for data), else ``stream`` (one pass, a set too large, or
    rows or state length not known in advance: no epoch's collection before the first step)."""
    if train_cfg.feed != "auto":
        return train_cfg.feed
    rows = (row_counts or {}).get(TRAIN_DATASET)
    if rows is None or state_len is None or rows > train_cfg.cache_rows:
        return "stream"
    fits = held_shard_mb(rows, state_len, train_cfg.num_workers) <= train_cfg.memory_feed_max_mb
    return "memory" if fits and _reads_twice(train_cfg, row_counts, jobs) else "stream"


def _make_trainer(worker_config: Dict[str, Any], train_cfg: TrainConfig, use_gpu: bool, datasets: Dict[str, Any],
                  run_name: str, storage: str, row_counts: Optional[Dict[str, int]], callbacks: List[Any]):
    """The ``TorchTrainer`` that runs :func:`~mtrec_dist.training.worker.train_worker` on every worker."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mtrec_dist.data.train_split import NoDropDataConfig

    jobs = len(worker_config["jobs"])

    resources = {"CPU": train_cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    set_controller_poll(train_cfg.controller_poll_s)
    return TorchTrainer(
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
            callbacks=callbacks,
        ),
        datasets=datasets,
        # the object-store cache serves streamed epochs; a memory feed reads each row once (twice after a resume)
        dataset_config=NoDropDataConfig(row_counts=row_counts, cache_rows=train_cfg.cache_rows if (
            train_cfg.feed == "stream" and _reads_twice(train_cfg, row_counts, jobs)) else 0),
    )


def _checkpoint_uri(ckpt: Any, storage: str) -> str:
    """A checkpoint's path with the storage's URI scheme put back."""
    path = ckpt.path
    if "://" in storage and "://" not in path:
        path = storage.split("://", 1)[0] + "://" + path.lstrip("/")
    return path


def _final_checkpoints(result: Any, jobs: int, run_name: str, storage: str) -> List[tuple]:
    """``(checkpoint path, its metrics)`` of each job's last checkpoint, or a clear error.  One job: the run's
    last checkpoint; several: for each job, its highest-step checkpoint among those the run kept (all of them:
    :func:`fit_distributed_jobs` refuses ``checkpoints_to_keep``)."""
    if result.error is not None:
        raise RuntimeError(f"training run {run_name!r} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name!r} finished without a checkpoint")
    if jobs == 1:
        return [(_checkpoint_uri(result.checkpoint, storage), dict(result.metrics or {}))]
    finals: Dict[int, tuple] = {}
    for ckpt, metrics in result.best_checkpoints or []:
        job, step = int(metrics.get("job", 0)), int(metrics.get("step", 0))
        if job not in finals or step >= finals[job][0]:
            finals[job] = (step, _checkpoint_uri(ckpt, storage), dict(metrics))
    missing = [j for j in range(jobs) if j not in finals]
    if missing:
        raise RuntimeError(f"training run {run_name!r} kept no checkpoint of job(s) {missing}")
    return [finals[j][1:] for j in range(jobs)]


class JobsFailed(RuntimeError):
    """A run of several jobs (:func:`fit_distributed_jobs`) failed; ``finished`` holds what the jobs that had
    finished before the failure produced (their :class:`FitResult`, in order), so that they need not train again."""

    def __init__(self, message: str, finished: List[Any]) -> None:
        super().__init__(message)
        self.finished = finished


def _kept_result(storage: str, run_name: str, error: Exception) -> Any:
    """What a failed run kept (its checkpoints and their metrics), as Ray Train's ``Result``, with ``error`` set;
    no checkpoint at all if it registered none."""
    from types import SimpleNamespace

    from ray.train import Result

    try:
        kept = Result.from_path(f"{storage.rstrip('/')}/{run_name}")
    except Exception:  # the run registered no checkpoint
        return SimpleNamespace(error=error, checkpoint=None, metrics={}, best_checkpoints=[])
    kept.error = error
    return kept


def _finished_before_failure(result: Any, histories: List[List[Dict[str, Any]]], storage: str) -> List[tuple]:
    """``(checkpoint path, its metrics)`` of each job of a failed run that had finished: in order, each whose
    ``end`` event is logged and whose checkpoint at that step the run kept (the first without both ends the list)."""
    done: List[tuple] = []
    for job, history in enumerate(histories):
        ends = [e["step"] for e in history if e["event"] == "end"]
        kept = [(_checkpoint_uri(c, storage), dict(m)) for c, m in result.best_checkpoints or []
                if ends and int(m.get("job", 0)) == job and int(m.get("step", -1)) == ends[-1]]
        if not kept:
            break
        done.append(kept[-1])
    return done


@dataclass
class FitJob:
    """One model of a run (:func:`fit_distributed_jobs`); the arguments of :func:`fit_distributed` that differ
    from model to model."""

    model_factory: Callable[[torch.device], nn.Module]
    output_dir: str                   # metrics.jsonl and TensorBoard files
    run_name: str                     # names its metrics, TensorBoard run and checkpoints (meta ``run_name``)
    resume: Optional[str] = None
    warm_start: Optional[str] = None
    fingerprint: Optional[Dict[str, Any]] = None
    extra_meta: Optional[Dict[str, Any]] = None
    label: str = "train"


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
    job = FitJob(model_factory, output_dir, run_name, resume=resume, warm_start=warm_start,
                 fingerprint=fingerprint, extra_meta=extra_meta, label=label)
    return fit_distributed_jobs([job], train_cfg, datasets, run_name, storage_path, state_len=state_len,
                                row_counts=row_counts, progress=progress)[0]


def fit_distributed_jobs(jobs: List[FitJob], train_cfg: TrainConfig, datasets: Dict[str, Any], run_name: str,
                         storage_path: str, *, state_len: Optional[int] = None,
                         row_counts: Optional[Dict[str, int]] = None, progress: bool = True) -> List[FitResult]:
    """Train several models one after another in one Ray Train run (:func:`fit_distributed`'s arguments, the
    per-model ones in each :class:`FitJob`): the worker group starts, joins its process group and reads
    ``datasets`` once for all of them, and each later job starts from the shard the ranks hold.  All jobs share
    ``train_cfg`` and the rows; each has its own metrics, TensorBoard run and checkpoints (in the run's
    storage).  After a failure the run restarts at the job that wrote the latest checkpoint (the ones before
    it had finished).  Several jobs need every checkpoint kept (``train.checkpoints_to_keep`` 0): Ray Train
    would otherwise delete an earlier job's final one.  Returns one :class:`FitResult` per job, in order."""
    import ray

    from mtrec_dist.training.checkpoint import config_hash

    if TRAIN_DATASET not in datasets:
        raise ValueError(f"datasets must contain {TRAIN_DATASET!r}; got {sorted(datasets)}")
    if not jobs:
        raise ValueError("fit_distributed_jobs needs at least one job")
    if len(jobs) > 1 and train_cfg.checkpoints_to_keep:
        raise ValueError(f"{len(jobs)} jobs in one run need every checkpoint kept (train.checkpoints_to_keep 0, "
                         f"not {train_cfg.checkpoints_to_keep}): Ray Train would delete earlier jobs' final ones")
    if len({j.run_name for j in jobs}) != len(jobs):
        raise ValueError(f"the jobs of a run need distinct run names: {[j.run_name for j in jobs]}")
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised; call mtrec_dist.runtime.init_ray() first")
    storage = _storage_uri(storage_path)
    use_gpu = resolve_use_gpu(train_cfg.use_gpu)
    fingerprint_default = {"train": dataclasses.asdict(train_cfg)}
    train_cfg = dataclasses.replace(train_cfg, feed=resolve_feed(train_cfg, row_counts, state_len, len(jobs)))
    job_configs = [{
        "model_factory": job.model_factory,
        "resume_path": resolve_resume(job.resume, storage),
        "warm_start": _resolve_warm_start(job.warm_start),
        "output_dir": _resolve_output_dir(job.output_dir, storage, job.run_name),
        "run_name": job.run_name,
        "config_hash": config_hash(job.fingerprint if job.fingerprint is not None else fingerprint_default),
        "extra_meta": dict(job.extra_meta or {}),
    } for job in jobs]
    worker_config = {"train_cfg": train_cfg, "use_gpu": use_gpu, "state_len": state_len, "jobs": job_configs}
    with _printing_progress(progress) as lines:  # the controller's report lines, printed here
        total = expected_steps(train_cfg, (row_counts or {}).get(TRAIN_DATASET))
        callbacks = [_progress_callback([j.label for j in jobs], lines, total)] if progress else []
        try:
            result = _make_trainer(worker_config, train_cfg, use_gpu, datasets, run_name, storage, row_counts,
                                   callbacks).fit()
        except Exception as error:  # Ray Train raises when the run failed for good
            if len(jobs) == 1:
                raise
            result = _kept_result(storage, run_name, error)

    histories = [read_history(c["output_dir"], c["run_name"]) for c in job_configs]

    def fit_results(finals: List[tuple]) -> List[FitResult]:
        """A result for each ``(checkpoint path, metrics)`` of ``finals``, the first jobs' in order."""
        return [FitResult(metrics={k: v for k, v in metrics.items() if k != "job"}, checkpoint_path=ckpt_path,
                          run_name=job.run_name, storage_path=storage, output_dir=conf["output_dir"],
                          history=history)
                for job, conf, history, (ckpt_path, metrics) in zip(jobs, job_configs, histories, finals)]

    if result.error is not None and len(jobs) > 1:
        finished = fit_results(_finished_before_failure(result, histories, storage))
        raise JobsFailed(f"training run {run_name!r} failed after {len(finished)} of its {len(jobs)} jobs had "
                         f"finished: {result.error}", finished) from result.error
    return fit_results(_final_checkpoints(result, len(jobs), run_name, storage))
