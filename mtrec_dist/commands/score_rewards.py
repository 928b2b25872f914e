"""Score every logged transition (or given state/candidate rows) with a trained reward model: reward quantiles,
mean, lower-tail CVaR and the soft-policy baseline, written to Parquet (Ray Data actors, the sharded worker group,
or this process for a small set: ``train.score_runner``).
"""
from __future__ import annotations

import argparse
import json

from mtrec_dist.commands._common import add_prepared_flag, add_ray_address_flag, load_run_config, prepared_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="reward model checkpoint (default: the one named by <run_dir>/reward/reward_model.json)")
    add_prepared_flag(p, "prepared dataset whose transitions are scored")
    p.add_argument("--pairs", default=None, metavar="PATH",
                   help="instead of transitions, score this Parquet of state_items [, state_feedback], candidate rows")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory/URI (default: <run_dir>/rewards)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_ray_address_flag(p)


def run(args) -> int:
    from mtrec_dist.layout import RunLayout
    from mtrec_dist.training.reward import default_reward_checkpoint
    from mtrec_dist.training.scoring import score_rewards

    cfg = load_run_config(args)
    layout = RunLayout(cfg.run_dir)
    checkpoint = args.checkpoint or default_reward_checkpoint(layout.reward)
    prepared = None if args.pairs else prepared_dir(args, cfg)
    out = args.out or layout.rewards
    summary = score_rewards(cfg, checkpoint, prepared, out, pairs_path=args.pairs, overwrite=args.overwrite)
    how = "scoring actors, each holding the whole model"
    if summary["runner"] == "sharded":
        peaks = ", ".join(f"{r['peak_rss_mb']:,.0f}" for r in summary["ranks"])
        how = f"{len(summary['ranks'])} workers, item table sharded; peak RSS per worker {peaks} MiB"
    elif summary["runner"] == "local":
        how = "in this process, no actor to start"
    if "scoring_actor_s" in summary:  # the rest is start-up: actors, model load, Ray Data's planning, the write
        who = "process" if summary["runner"] == "local" else "actor"
        how += (f"; {summary['scoring_actor_s']:.1f} {who}-seconds in scoring batches, "
                f"{summary['rows_per_actor_s']:,} rows/s per {who}")
    print(f"scored {summary['rows']:,} {summary['mode']} rows in {summary['seconds']}s "
          f"({summary['rows_per_s']:,} rows/s; {how}) -> {summary['out_dir']}")
    print(json.dumps(summary, default=str))
    return 0
