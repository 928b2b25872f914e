"""`mtrec simulate`: generate the built-in simulator's logs and ground truth."""
from __future__ import annotations

import argparse

from mtrec_dist.config import load_config

NAME = "simulate"
HELP = ("generate simulated behaviour logs (day-partitioned Parquet, engaged events only) plus ground truth "
        "(items, users, exposures) in a separate truth/ table")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory or URI (default: <run_dir>/sim)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def format_summary(s: dict) -> str:
    cb, ot = s["clickbait"], s["other"]
    return "\n".join([
        f"simulated {s['events']:,} events: {s['users']:,} active users of {s['num_users']:,}, "
        f"{s['items_engaged']:,} engaged items of {s['num_items']:,}, {s['days']} day(s), "
        f"{s['sessions']:,} sessions, {s['slates']:,} slates (CTR {s['ctr']:.3f}) in {s['seconds']:.1f}s",
        f"  {'':10s} {'items':>7s} {'CTR':>7s} {'mean satisfaction':>18s} {'mean watch ratio':>17s}",
        f"  {'clickbait':10s} {cb['items']:7d} {cb['ctr']:7.3f} {cb['mean_satisfaction']:18.3f} "
        f"{cb['mean_watch_ratio']:17.3f}",
        f"  {'other':10s} {ot['items']:7d} {ot['ctr']:7.3f} {ot['mean_satisfaction']:18.3f} "
        f"{ot['mean_watch_ratio']:17.3f}",
        f"  per-item corr(CTR, mean satisfaction) = {s['item_ctr_vs_satisfaction_corr']:.3f}",
        f"  logs: {s['out_dir']}/logs  truth: {s['out_dir']}/truth",
    ])


def run(args) -> int:
    from mtrec_dist.data.simulator import default_sim_dir, simulate_logs

    cfg = load_config(args.config, args.overrides)
    out = args.out or default_sim_dir(cfg.run_dir)
    summary = simulate_logs(cfg.simulator, out, progress=(lambda m: None) if args.quiet else None)
    print(format_summary(summary))
    return 0
