"""`mtrec ablate`: the ablation that tells whether the mental reward earns its place (mtrec_dist/ablation.py)."""
from __future__ import annotations

import argparse

from mtrec_dist.config import load_config

NAME = "ablate"
HELP = ("train the same SASRec guided by each reward in turn (rows A-I: clicks, supervised feedback regressors, "
        "IQ-Learn v1, QR-IQL v2, oracle, shuffled) over several simulated worlds; report reward validity, "
        "offline ranking and online satisfaction/return with paired 95%% CIs vs A and B")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no per-row progress lines")


def run(args) -> int:
    from mtrec_dist.ablation import run_ablation

    cfg = load_config(args.config, args.overrides)
    result = run_ablation(cfg, say=(lambda m: None) if args.quiet else None)
    print(result["table"])
    print(f"ablation: {result['seconds']:.0f}s; results in {result['out_dir']}/ (results.json, table.md"
          + (", gain_vs_beta.png)" if result["sweep"] else ")"))
    return 0
