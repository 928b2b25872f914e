"""Flags shared by the commands that launch Ray Train runs (train-reward, train-rec, retrain)."""
from __future__ import annotations

import argparse


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
    p.add_argument("--ray-address", default=None, help="Ray cluster to use (default: ray_address, else a local one)")
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
