"""`mtrec train-reward`: learn the mental reward model (QR-IQL) with Ray Train + TorchRec."""
from __future__ import annotations

import argparse
import json
import os

from mtrec_dist.commands._training_flags import add_training_flags, apply_training_flags

NAME = "train-reward"
HELP = ("train the QR-IQL mental reward model on prepared transitions: Ray Train workers (gloo on CPU, "
        "NCCL on GPU), item table sharded by TorchRec's planner, sharded checkpoints, --resume")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prepared", default=None, metavar="DIR",
                   help="prepared dataset (default: prepare.output, else <run_dir>/prepared)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output dir for metrics, TensorBoard files and reward_model.json (default: <run_dir>/reward)")
    add_training_flags(p)


def run(args) -> int:
    from mtrec_dist.config import load_config
    from mtrec_dist.data.prepare import default_paths
    from mtrec_dist.layout import RunLayout
    from mtrec_dist.training.reward import train_reward_model

    cfg = load_config(args.config, args.overrides)
    apply_training_flags(cfg, args)
    prepared = args.prepared or default_paths(cfg)[1]
    out = args.out or RunLayout(cfg.run_dir).reward
    summary = train_reward_model(cfg, prepared, out, resume=args.resume, progress=not args.quiet)
    m = summary["metrics"]
    print(f"reward model trained: step {m.get('step')}, loss {m.get('loss', float('nan')):.4g}, "
          f"{m.get('samples_per_s', 0.0):.0f} samples/s")
    print(f"  checkpoint: {summary['checkpoint_path']}")
    print(f"  metrics:    {os.path.join(summary['output_dir'], 'metrics.jsonl')} (+ tensorboard/)")
    print(json.dumps({k: v for k, v in m.items() if isinstance(v, (int, float))}, default=float))
    return 0
