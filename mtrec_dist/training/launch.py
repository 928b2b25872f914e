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
from pathlib import Path
from typing import Any, Callable, Dict, Literal, Optional

from mtrec_dist.runtime import init_ray

RAY_RESULTS_DIR = "ray_results"  # checkpoints under <output_dir>/ray_results unless train.storage_path is set


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
    from mtrec_dist.training.loop import fit_distributed

    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    storage = cfg.train.storage_path or os.path.join(output_dir, RAY_RESULTS_DIR)
    init_ray(cfg.ray_address)
    run_name = f"{run_prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    train_cfg = cfg.stage_train(stage)  # train, with the stage's reward_train/rec_train budget
    # the held-out share decides which rows are trained on: a resumed run must not change it
    fingerprint = {"model_spec": spec, "train": dataclasses.asdict(train_cfg),
                   "heldout_user_share": cfg.eval.heldout_user_share}
    result = fit_distributed(
        factory, train_cfg, datasets(), run_name, storage, resume, output_dir=output_dir,
        state_len=spec["state_len"], fingerprint=fingerprint, row_counts=row_counts,
        extra_meta={"model_spec": spec}, label=label, progress=progress, warm_start=warm_start,
    )
    summary = {"metrics": result.metrics, "checkpoint_path": result.checkpoint_path, "run_name": run_name,
               "storage_path": result.storage_path, "output_dir": output_dir, **(extra or {})}
    if warm_start:
        summary["warm_start"] = warm_start
    Path(output_dir, pointer).write_text(json.dumps(summary, indent=1, default=float))
    return summary


def read_pointer(output_dir: str, pointer: str, command: str) -> str:
    """The final checkpoint named by ``<output_dir>/<pointer>`` (written by :func:`launch_fit`)."""
    path = Path(output_dir) / pointer
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `mtrec {command}` first or pass --checkpoint")
    return json.loads(path.read_text())["checkpoint_path"]
