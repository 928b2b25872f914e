"""`mtrec train-rec`: train a sequential recommender, click-trained or guided by the mental reward."""
from __future__ import annotations

import argparse
import json
import os

from mtrec_dist.commands._training_flags import add_training_flags, apply_training_flags

NAME = "train-rec"
HELP = ("train a sequential recommender (SASRec, GRU4Rec, Caser, NextItNet) on scored transitions with "
        "Ray Train + TorchRec; --guidance none|reweight|actor_critic|risk_averse")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None, choices=["sasrec", "gru4rec", "caser", "nextitnet"],
                   help="recommender architecture (default: rec.backbone)")
    p.add_argument("--guidance", default=None, choices=["none", "reweight", "actor_critic", "risk_averse"],
                   help="how the mental reward steers the loss (default: rec.guidance; none = click-trained)")
    p.add_argument("--scores", default=None, metavar="DIR",
                   help="scored transitions from `mtrec score-rewards` (default: <run_dir>/rewards)")
    p.add_argument("--prepared", default=None, metavar="DIR",
                   help="the prepared dataset they were scored from (default: prepare.output, else <run_dir>/prepared)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output dir (default: <run_dir>/rec/<backbone>-<guidance>)")
    add_training_flags(p)


def run(args) -> int:
    from mtrec_dist.config import load_config
    from mtrec_dist.data.prepare import default_paths
    from mtrec_dist.layout import RunLayout
    from mtrec_dist.training.recommender import train_recommender

    cfg = load_config(args.config, args.overrides)
    if args.backbone:
        cfg.rec.backbone = args.backbone
    if args.guidance:
        cfg.rec.guidance = args.guidance
    apply_training_flags(cfg, args)
    prepared = args.prepared or default_paths(cfg)[1]
    layout = RunLayout(cfg.run_dir)
    scores = args.scores or layout.rewards
    out = args.out or layout.rec(cfg.rec.backbone, cfg.rec.guidance)
    s = train_recommender(cfg, scores, prepared, out, resume=args.resume, progress=not args.quiet)
    m = s["metrics"]
    print(f"{s['backbone']}/{s['guidance']} trained on {s['train_rows']:,} rows: step {m.get('step')}, "
          f"loss {m.get('loss', float('nan')):.4g}, {m.get('samples_per_s', 0.0):.0f} samples/s")
    print(f"  checkpoint: {s['checkpoint_path']}")
    print(f"  metrics:    {os.path.join(s['output_dir'], 'metrics.jsonl')} (+ tensorboard/)")
    print(json.dumps({k: v for k, v in m.items() if isinstance(v, (int, float))}, default=float))
    return 0
