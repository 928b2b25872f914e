"""Flags shared by the commands that launch Ray Train runs (train-reward, train-rec, retrain)."""
from __future__ import annotations

import argparse
import json
import os

from mtrec_dist.commands._common import add_ray_address_flag


def add_training_flags(p: argparse.ArgumentParser, resume: bool = True) -> None:
    """``--resume`` (optional), ``--workers``, ``--max-steps``, ``--ray-address``, ``--quiet``."""
    if resume:
        p.add_argument("--resume", default=None, metavar="PATH|latest",
                       help="continue from a checkpoint directory/URI, or 'latest' (newest complete checkpoint "
                            "under train.storage_path, default <out>/ray_results): same step, optimizer state "
                            "and epoch position")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: train.num_workers)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop every stage after this many steps (default: train.max_steps, or the stage's "
                        "reward_train/rec_train.max_steps)")
    add_ray_address_flag(p)
    p.add_argument("--quiet", action="store_true", help="no per-report progress lines")


def apply_training_flags(cfg, args) -> None:
    """Write the flags into ``cfg`` (a PipelineConfig) and re-validate it."""
    if args.workers is not None:
        cfg.train.num_workers = args.workers
    if args.max_steps is not None:  # the flag wins over the per-stage budgets too
        cfg.train.max_steps = args.max_steps
        cfg.reward_train.max_steps = cfg.rec_train.max_steps = None
    if args.ray_address:
        cfg.ray_address = args.ray_address
    cfg.validate()


def print_training_summary(headline: str, summary: dict) -> None:
    """What train-reward and train-rec print once a run is done: ``headline`` with the last step, loss
    and throughput, where the checkpoint and the metrics are, and the numeric metrics as JSON."""
    m = summary["metrics"]
    print(f"{headline}: step {m.get('step')}, loss {m.get('loss', float('nan')):.4g}, "
          f"{m.get('samples_per_s', 0.0):.0f} samples/s")
    print(f"  checkpoint: {summary['checkpoint_path']}")
    from mtrec_dist.training.metrics_log import METRICS_FILE

    print(f"  metrics:    {os.path.join(summary['output_dir'], METRICS_FILE)} (+ tensorboard/)")
    print(json.dumps({k: v for k, v in m.items() if isinstance(v, (int, float))}, default=float))
