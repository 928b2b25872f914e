"""One launch path for both trainers: output folder -> Ray -> :func:`fit_distributed` -> summary -> pointer file.

`train-reward` and `train-rec` differ in their model, their rows and their budget section; everything
around the fit (where checkpoints go, the run's name, the checkpoint fingerprint, the JSON pointer a
later stage reads to find the final checkpoint) is the same and lives here, so the two cannot drift.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional

from mtrec_dist.layout import RAY_RESULTS
from mtrec_dist.runtime import init_ray

# checkpoints under <output_dir>/ray_results unless train.storage_path (or launch_fits' storage) says otherwise
RAY_RESULTS_DIR = RAY_RESULTS


@dataclass
class LaunchJob:
    """One model of :func:`launch_fits`: its factory, ``spec`` (the model_spec, stored in every checkpoint and,
    with the stage's train section, the fingerprint ``--resume`` checks), output folder, run-name prefix,
    progress label and what its pointer file adds (``extra``)."""

    factory: Callable
    spec: Dict[str, Any]
    output_dir: str
    run_prefix: str
    label: str
    resume: Optional[str] = None
    warm_start: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def launch_fit(cfg, stage: Literal["reward", "rec"], factory: Callable, datasets: Callable[[], Dict[str, Any]], *,
               spec: Dict[str, Any], output_dir: str, run_prefix: str, pointer: str, label: str,
               row_counts: Dict[str, int], resume: Optional[str] = None, progress: bool = True,
               warm_start: Optional[str] = None, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Fit ``factory``'s model on ``datasets()`` with the ``stage``'s budget; write ``<output_dir>/<pointer>``.

    ``datasets`` is called after Ray is up (Ray Data reads need it).  ``spec`` (the model_spec) is stored
    in every checkpoint and, with the stage's train section, forms the fingerprint ``--resume`` checks.
    Returns ``{"metrics", "checkpoint_path", "run_name", "storage_path", "output_dir", **extra}`` (+
    ``warm_start`` when given): the same dict the pointer file holds.
    """
    job = LaunchJob(factory, spec, output_dir, run_prefix, label, resume=resume, warm_start=warm_start,
                    extra=dict(extra or {}))
    return launch_fits(cfg, stage, [job], datasets, pointer=pointer, row_counts=row_counts, progress=progress)[0]


def launch_fits(cfg, stage: Literal["reward", "rec"], jobs: List[LaunchJob], datasets: Callable[[], Dict[str, Any]],
                *, pointer: str, row_counts: Dict[str, int], progress: bool = True,
                run_prefix: Optional[str] = None, storage: Optional[str] = None) -> List[Dict[str, Any]]:
    """:func:`launch_fit` for several models trained one after another in one Ray Train run on the same rows
    (:func:`~mtrec_dist.training.loop.fit_distributed_jobs`).  The run is named ``run_prefix`` (default: the
    only job's prefix) and keeps its checkpoints under ``train.storage_path``, else ``storage``, else the first
    job's ``<output_dir>/ray_results``.  Returns each job's summary (its pointer file's content), in order."""
    from mtrec_dist.training.loop import FitJob, JobsFailed, fit_distributed_jobs

    if len(jobs) > 1 and not run_prefix:
        raise ValueError("a run of several jobs needs its own run_prefix")
    jobs = [dataclasses.replace(job, output_dir=os.path.abspath(job.output_dir)) for job in jobs]
    for job in jobs:
        os.makedirs(job.output_dir, exist_ok=True)
    storage = cfg.train.storage_path or storage or os.path.join(jobs[0].output_dir, RAY_RESULTS_DIR)
    init_ray(cfg.ray_address)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    train_cfg = cfg.stage_train(stage)  # train, with the stage's reward_train/rec_train budget

    def fit_job(job: LaunchJob) -> FitJob:
        # the held-out share decides which rows are trained on: a resumed run must not change it
        fingerprint = {"model_spec": job.spec, "train": dataclasses.asdict(train_cfg),
                       "heldout_user_share": cfg.eval.heldout_user_share}
        return FitJob(job.factory, job.output_dir, f"{job.run_prefix}-{stamp}", resume=job.resume,
                      warm_start=job.warm_start, fingerprint=fingerprint, extra_meta={"model_spec": job.spec},
                      label=job.label)

    fit_jobs = [fit_job(job) for job in jobs]
    run_name = f"{run_prefix}-{stamp}" if run_prefix else fit_jobs[0].run_name

    def summarise(job: LaunchJob, result) -> Dict[str, Any]:
        """The job's summary, also written to its pointer file."""
        summary = {"metrics": result.metrics, "checkpoint_path": result.checkpoint_path, "run_name": result.run_name,
                   "storage_path": result.storage_path, "output_dir": job.output_dir, **job.extra}
        if job.warm_start:
            summary["warm_start"] = job.warm_start
        Path(job.output_dir, pointer).write_text(json.dumps(summary, indent=1, default=float))
        return summary

    try:
        results = fit_distributed_jobs(fit_jobs, train_cfg, datasets(), run_name, storage,
                                       state_len=jobs[0].spec["state_len"], row_counts=row_counts, progress=progress)
    except JobsFailed as failed:  # the jobs that finished keep their pointer files: summaries in ``finished``
        raise JobsFailed(str(failed), [summarise(j, r) for j, r in zip(jobs, failed.finished)]) from failed
    return [summarise(job, result) for job, result in zip(jobs, results)]


def read_pointer(output_dir: str, pointer: str, command: str) -> str:
    """The final checkpoint named by ``<output_dir>/<pointer>`` (written by :func:`launch_fit`)."""
    path = Path(output_dir) / pointer
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `mtrec {command}` first or pass --checkpoint")
    return json.loads(path.read_text())["checkpoint_path"]
