"""Train a sequential recommender (SASRec, GRU4Rec, Caser, NextItNet) on scored transitions with Ray Train +
TorchRec, click-trained or guided by the mental reward: --guidance none|reweight|actor_critic|risk_averse.
"""
from __future__ import annotations

import argparse

from mtrec_dist.choices import BACKBONES, CLICK_TRAINED, GUIDANCE_MODES
from mtrec_dist.commands._common import add_prepared_flag, prepared_dir
from mtrec_dist.commands._training_flags import add_training_flags, apply_training_flags, print_training_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None, choices=BACKBONES,
                   help="recommender architecture (default: rec.backbone)")
    p.add_argument("--guidance", default=None, choices=GUIDANCE_MODES,
                   help="how the mental reward steers the loss (default: rec.guidance; none = click-trained)")
    p.add_argument("--scores", default=None, metavar="DIR",
                   help="scored transitions from `mtrec score-rewards` (default: <run_dir>/rewards; an unguided "
                        "recommender without them trains on the prepared transitions)")
    add_prepared_flag(p, "the prepared dataset they were scored from")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output dir (default: <run_dir>/rec/<backbone>-<guidance>)")
    add_training_flags(p)


def default_scores(rewards: str, prepared: str, guidance: str) -> str:
    """Where the training rows come from without ``--scores``: the run's scored transitions; an unguided
    recommender reads no reward, so without them it trains on the prepared transitions (as retrain does)."""
    import pyarrow.fs as pafs

    from mtrec_dist.data.dataset import TRANSITIONS_DIR
    from mtrec_dist.data.input_files import join_path, resolve_filesystem

    if guidance != CLICK_TRAINED:
        return rewards
    fs, path = resolve_filesystem(rewards)
    missing = fs.get_file_info(path).type == pafs.FileType.NotFound
    return join_path(prepared, TRANSITIONS_DIR) if missing else rewards


def run(args) -> int:
    from mtrec_dist.config import load_config
    from mtrec_dist.layout import RunLayout
    from mtrec_dist.training.recommender import train_recommender

    cfg = load_config(args.config, args.overrides)
    if args.backbone:
        cfg.rec.backbone = args.backbone
    if args.guidance:
        cfg.rec.guidance = args.guidance
    apply_training_flags(cfg, args)
    layout = RunLayout(cfg.run_dir)
    prepared = prepared_dir(args, cfg)
    scores = args.scores or default_scores(layout.rewards, prepared, cfg.rec.guidance)
    out = args.out or layout.rec(cfg.rec.backbone, cfg.rec.guidance)
    s = train_recommender(cfg, scores, prepared, out, resume=args.resume, progress=not args.quiet)
    print_training_summary(f"{s['backbone']}/{s['guidance']} trained on {s['train_rows']:,} rows", s)
    return 0
