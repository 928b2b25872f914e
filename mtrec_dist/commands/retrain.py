"""Daily retraining: prepare one new day's log partition (states carried over from the previous run, ID dictionaries
extended), warm-start the reward model and the recommenders from the previous version, and write a new version
<out>/vNNNN-<day>/ (re-running a day is idempotent).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from mtrec_dist.commands._training_flags import add_training_flags, apply_training_flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--logs", required=True, metavar="PATH",
                   help="the new day's log partition (.../day=YYYY-MM-DD), or the logs root with --day")
    p.add_argument("--day", default=None, metavar="YYYY-MM-DD", help="pick this day's partition under --logs")
    p.add_argument("--previous", default="auto", metavar="auto|none|DIR",
                   help="the run to continue: auto (default) = the newest complete version under --out with an "
                        "earlier day (none there = bootstrap); none = bootstrap a new chain cold; DIR = a version "
                        "or a `mtrec pipeline` run dir")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="root of the versioned runs (default: <run_dir>/retrain; a path every node can reach)")
    p.add_argument("--force", action="store_true",
                   help="rebuild the day's version even if an identical complete one exists")
    add_training_flags(p, resume=False)


def run(args) -> int:
    from mtrec_dist.config import load_config
    from mtrec_dist.layout import RunLayout
    from mtrec_dist.retrain import RetrainError, retrain_day

    cfg = load_config(args.config, args.overrides)
    apply_training_flags(cfg, args)
    out = args.out or RunLayout(cfg.run_dir).retrain_root
    try:
        s = retrain_day(cfg, args.logs, out, args.previous, day=args.day, force=args.force,
                        progress=not args.quiet)
    except RetrainError as e:
        print(f"mtrec retrain: {e}", file=sys.stderr)
        return 2
    vdir = RunLayout(os.path.join(os.path.abspath(out), s["name"]))
    print(f"{'reused' if s['reused'] else 'wrote'} {s['name']} (day {s['day']}; previous: {s['previous'] or 'none'})")
    print(f"  rows in {s['rows']['rows_in']:,} = ok {s['rows']['rows_ok']:,} + rejected {s['rows']['rows_rejected']:,};"
          f" transitions {s['rows']['num_transitions']:,}; row ids [{s['row_ids'][0]:,}, {s['row_ids'][1]:,})")
    v = s["vocab"]
    print(f"  vocab: {v['items']:,} items ({v['new_items']:,} new), {v['users']:,} users ({v['new_users']:,} new); "
          f"carried-over users: {s['carry'].get('users_in', 0):,}")
    print(f"  reward model: {s['reward']['warm_start_reason']} -> {s['reward']['checkpoint_path']}")
    for r in s["recommenders"]:
        print(f"  {r['name']}: {r['warm_start_reason']} -> {r['checkpoint_path']}")
    print(f"  run: {vdir.root} ({vdir.retrain_json})")
    print(json.dumps({"name": s["name"], "reused": s["reused"], "timings_s": s.get("timings_s")}))
    return 0
