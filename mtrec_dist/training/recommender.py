"""`mtrec train-rec`: a sequential recommender (SASRec / GRU4Rec / Caser / NextItNet) trained with
:func:`fit_distributed`, optionally guided by the mental reward (docs/method.md "Recommenders and guidance").

Input is the *scored transitions* dataset written by `mtrec score-rewards` (every training column of a
transition plus ``reward_mean``, ``reward_cvar``, ``reward_baseline``, ``reward_cvar_baseline``), so the
guided losses need no join.  The click-trained baseline (``guidance: none``) reads the same rows and
ignores the reward columns, so baseline and guided models see exactly the same examples.

The rows of held-out users (``eval.heldout_user_share``, :mod:`mtrec_dist.data.heldout`) are the offline
test cases and are never trained on.  Each checkpoint carries a ``model_spec`` so evaluation rebuilds the
exact model.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from mtrec_dist.choices import CLICK_TRAINED
from mtrec_dist.config import PipelineConfig, RecConfig, samples_by_popularity
from mtrec_dist.data.heldout import column_expr, training_expr
from mtrec_dist.training.launch import read_pointer
from mtrec_dist.training.specs import configs_from_spec

REC_RUN_PREFIX = "rec"
POINTER_FILE = "recommender.json"  # <output_dir>/recommender.json -> the final checkpoint
REWARD_COLUMNS = ("reward_mean", "reward_cvar", "reward_baseline", "reward_cvar_baseline")


def rec_model_spec(cfg: PipelineConfig, manifest: dict, backbone: str, guidance: str) -> Dict[str, Any]:
    """JSON-able description of one recommender (stored in every checkpoint)."""
    rec = dataclasses.replace(cfg.rec, backbone=backbone, guidance=guidance)
    return {
        "kind": "sequential_recommender",
        "num_items": int(manifest["num_items"]),
        "state_len": int(manifest["state_len"]),
        "backbone": backbone,
        "guidance": guidance,
        "model": dataclasses.asdict(cfg.model),
        "rec": dataclasses.asdict(rec),
    }


def recommender_factory(spec: Dict[str, Any], item_counts: Optional[np.ndarray] = None, *,
                        for_inference: bool = False) -> Callable[[torch.device], torch.nn.Module]:
    """Picklable ``device -> SequentialRecommender`` for a :func:`rec_model_spec`."""
    from mtrec_dist.models.recommender import SequentialRecommender

    model_cfg, rec_cfg, counts = configs_from_spec(spec, "sequential_recommender", "a sequential recommender",
                                                   "rec", RecConfig, item_counts, for_inference)
    return functools.partial(SequentialRecommender, spec["num_items"], spec["backbone"], model_cfg, rec_cfg,
                             spec["state_len"], item_counts=counts)


def _scored_files(scored_dir: str):
    """The Parquet files of a scored-transitions directory as a pyarrow dataset (footers only), skipping the
    names Ray Data's reader skips too (``_SUCCESS``, dot-files)."""
    import pyarrow.dataset as pads

    from mtrec_dist.data.readers import resolve_filesystem

    fs, root = resolve_filesystem(scored_dir)
    return pads.dataset(root, filesystem=fs, format="parquet", ignore_prefixes=["_", "."])


def _training_filter(heldout_share: float, kind: str = "arrow", skip_last: bool = False):
    """The rows a recommender trains on: those of users not held out; with ``skip_last`` not each user's last
    transition either (``pos_from_end == 0``: the leave-last-out protocol of the peer benchmark, where
    :mod:`mtrec_dist.bench.peer` ranks those rows).  ``kind``: as :func:`~mtrec_dist.data.heldout.training_expr`."""
    keep = training_expr(heldout_share, kind)
    return keep & (column_expr("pos_from_end", kind) != 0) if skip_last else keep


def _count_training_rows(scored_dir: str, heldout_share: float, skip_last: bool = False) -> tuple[int, int]:
    """(training rows as :func:`_training_filter` keeps them, all rows) of a scored-transitions directory, from
    Parquet metadata and the columns the filter reads."""
    ds = _scored_files(scored_dir)
    total = int(ds.count_rows())
    train = int(ds.count_rows(filter=_training_filter(heldout_share, skip_last=skip_last)))
    return train, total


def read_training_rows(scored_dir: str, guidance: str, heldout_share: float, in_memory: bool = False,
                       skip_last: bool = False):
    """Ray Dataset of the scored transitions a recommender trains on (:func:`_training_filter`: the held-out
    users' rows filtered out).

    ``in_memory``: this process reads the rows with pyarrow and hands them to Ray Data as in-memory blocks
    (``train.driver_read_mb``: a small set), else Ray Data reads the Parquet files in its own tasks."""
    import ray.data

    from mtrec_dist.data.pipeline import in_memory_dataset
    from mtrec_dist.data.schema import TRANSITION_COLUMNS, assert_training_columns

    files = _scored_files(scored_dir)
    names = files.schema.names
    need = list(TRANSITION_COLUMNS) + (list(REWARD_COLUMNS) if guidance != CLICK_TRAINED else [])
    missing = [c for c in need if c not in names]
    if missing:
        raise ValueError(f"{scored_dir}: column(s) {missing} missing; guidance {guidance!r} needs a scored-"
                         "transitions dataset written by `mtrec score-rewards` (transitions mode)")
    keep = [c for c in names if c in need]
    assert_training_columns(keep)
    if in_memory:
        rows = files.to_table(columns=keep, filter=_training_filter(heldout_share, "arrow", skip_last))
        return in_memory_dataset(rows)
    return ray.data.read_parquet(scored_dir).select_columns(keep).filter(
        expr=_training_filter(heldout_share, "ray", skip_last))


@dataclasses.dataclass
class RecJob:
    """One recommender of :func:`train_recommenders`: its backbone x guidance, its output folder and (daily
    retraining) the checkpoint its weights start from."""

    backbone: str
    guidance: str
    output_dir: str
    warm_start: Optional[str] = None


def train_recommender(cfg: PipelineConfig, scored_dir: str, prepared_dir: str, output_dir: str, *,
                      backbone: Optional[str] = None, guidance: Optional[str] = None,
                      resume: Optional[str] = None, progress: bool = True,
                      warm_start: Optional[str] = None, skip_last: bool = False) -> Dict[str, Any]:
    """Train one recommender (``backbone`` x ``guidance``, default ``cfg.rec``) on Ray Train + TorchRec.

    ``scored_dir``: output of `mtrec score-rewards` for ``prepared_dir``.  Writes metrics and TensorBoard
    files under ``output_dir`` and ``<output_dir>/recommender.json`` naming the final checkpoint.
    ``warm_start``: an earlier checkpoint of the same backbone whose weights initialise a fresh run (daily
    retraining; the catalog may have grown, see :func:`~mtrec_dist.training.loop.fit_distributed`).
    ``skip_last``: each user's last transition is not trained on either (:func:`_training_filter`).
    Returns ``{"metrics", "checkpoint_path", "run_name", "storage_path", "output_dir", "backbone",
    "guidance", "train_rows", "read_by_driver"}`` (``read_by_driver``: see ``train.driver_read_mb``).
    """
    job = RecJob(backbone or cfg.rec.backbone, guidance or cfg.rec.guidance, output_dir, warm_start)
    return train_recommenders(cfg, scored_dir, prepared_dir, [job], resume=resume, progress=progress,
                              skip_last=skip_last)[0]


def train_recommenders(cfg: PipelineConfig, scored_dir: str, prepared_dir: str, jobs: List[RecJob], *,
                       resume: Optional[str] = None, progress: bool = True, skip_last: bool = False,
                       storage: Optional[str] = None) -> List[Dict[str, Any]]:
    """:func:`train_recommender` for several recommenders trained one after another by one Ray Train worker
    group on the same rows (:func:`~mtrec_dist.training.launch.launch_fits`: one start-up and one read of the
    rows for all; a pipeline's backbone x guidance variants).  ``storage``: where the run of several keeps its
    checkpoints (unless ``train.storage_path`` is set).  ``resume`` applies to a single job only.  Returns each
    job's summary, in order."""
    from mtrec_dist.training.loop import fits_driver
    from mtrec_dist.data.pipeline import action_counts
    from mtrec_dist.training.launch import LaunchJob, launch_fits
    from mtrec_dist.training.reward import load_training_manifest

    if resume and len(jobs) > 1:
        raise ValueError("resume names one run's checkpoint: train one recommender at a time to resume")
    cfg.validate()
    manifest = load_training_manifest(prepared_dir)
    train_rows, total = _count_training_rows(scored_dir, cfg.eval.heldout_user_share, skip_last)
    if total != manifest["num_transitions"]:
        raise ValueError(f"{scored_dir} holds {total} scored rows but {prepared_dir} has "
                         f"{manifest['num_transitions']} transitions: score-rewards output is stale or partial")
    if train_rows == 0:
        raise ValueError(f"{scored_dir}: no training rows (every user is held out; eval.heldout_user_share is "
                         f"{cfg.eval.heldout_user_share})")
    share = cfg.eval.heldout_user_share
    counts = action_counts([scored_dir], manifest["num_items"], _training_filter(share, skip_last=skip_last)) \
        if samples_by_popularity(cfg.rec) else None
    in_memory = fits_driver(cfg.stage_train("rec"), train_rows, manifest["state_len"])

    def launch_job(job: RecJob) -> LaunchJob:
        spec = rec_model_spec(cfg, manifest, job.backbone, job.guidance)
        return LaunchJob(recommender_factory(spec, counts), spec, job.output_dir,
                         f"{REC_RUN_PREFIX}-{job.backbone}-{job.guidance}", f"train-rec {job.backbone}/{job.guidance}",
                         resume=resume, warm_start=job.warm_start,
                         extra={"backbone": job.backbone, "guidance": job.guidance, "train_rows": train_rows,
                                "heldout_user_share": share, "read_by_driver": in_memory})

    # the click-trained models read the rows without the reward columns; a run that also trains guided ones
    # reads them with (its click-trained models ignore them)
    reads = next((j.guidance for j in jobs if j.guidance != CLICK_TRAINED), CLICK_TRAINED)
    return launch_fits(cfg, "rec", [launch_job(j) for j in jobs],
                       lambda: {"train": read_training_rows(scored_dir, reads, share, in_memory, skip_last)},
                       pointer=POINTER_FILE, row_counts={"train": train_rows}, progress=progress,
                       run_prefix=f"{REC_RUN_PREFIX}-{len(jobs)}-models" if len(jobs) > 1 else None, storage=storage)


def default_rec_checkpoint(output_dir: str) -> str:
    """The final checkpoint named by ``<output_dir>/recommender.json`` (written by train-rec)."""
    return read_pointer(output_dir, POINTER_FILE, "train-rec")
