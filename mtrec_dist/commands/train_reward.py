"""Train the QR-IQL mental reward model on prepared transitions: Ray Train workers (gloo on CPU, NCCL on GPU), item
table sharded by TorchRec's planner, sharded checkpoints, --resume.
"""
from __future__ import annotations

import argparse

from mtrec_dist.commands._common import add_prepared_flag, prepared_dir
from mtrec_dist.commands._training_flags import add_training_flags, apply_training_flags, print_training_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_prepared_flag(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output dir for metrics, TensorBoard files and reward_model.json (default: <run_dir>/reward)")
    add_training_flags(p)


def run(args) -> int:
    from mtrec_dist.config import load_config
    from mtrec_dist.layout import RunLayout
    from mtrec_dist.training.reward import train_reward_model

    cfg = load_config(args.config, args.overrides)
    apply_training_flags(cfg, args)
    out = args.out or RunLayout(cfg.run_dir).reward
    summary = train_reward_model(cfg, prepared_dir(args, cfg), out, resume=args.resume, progress=not args.quiet)
    print_training_summary("reward model trained", summary)
    return 0
