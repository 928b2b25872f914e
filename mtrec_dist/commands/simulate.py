"""Generate simulated behaviour logs (day-partitioned Parquet, engaged events only) plus ground truth (items, users:
satisfaction, quality, appeal) in a separate truth/ folder; impressions (every slate shown) in impressions/.
"""
from __future__ import annotations

import argparse

from mtrec_dist.config import load_config
from mtrec_dist.data.summaries import format_simulation_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory or URI (default: <run_dir>/sim)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args) -> int:
    from mtrec_dist.data.simulator import default_sim_dir, simulate_logs

    cfg = load_config(args.config, args.overrides)
    out = args.out or default_sim_dir(cfg.run_dir)
    summary = simulate_logs(cfg.simulator, out, progress=(lambda m: None) if args.quiet else None)
    print(format_simulation_summary(summary))
    return 0
