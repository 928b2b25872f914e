"""Run MTRec end to end (the README's main command): simulate (or read logs) -> prepare -> train-reward ->
score-rewards -> train-rec (every backbone x guidance) -> evaluate -> report; prints where the report is.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=None, metavar="DIR", help="output directory (default: run_dir of the config)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to use (default: ray_address, else a local one)")
    p.add_argument("--quiet", action="store_true", help="stage lines only, no per-report progress")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in the same run directory: skip the stages it finished "
                        "with the same config and inputs (records in <run_dir>/stages/) and start at the first "
                        "one that is not done; a stage whose config or inputs changed reruns, with every stage "
                        "after it (without --resume the run replaces the directory's outputs)")
    p.add_argument("--verbose", "--worker-logs", dest="worker_logs", action="store_true",
                   help="also print Ray's own output (workers, actors, Ray Data's INFO lines), which otherwise "
                        "stays in Ray's session logs (set MTREC_WORKER_LOG_LEVEL=INFO for FBGEMM/TorchRec set-up "
                        "logs of the training workers)")


def run(args) -> int:
    from mtrec_dist.config import load_config
    from mtrec_dist.pipeline import run_pipeline

    cfg = load_config(args.config, args.overrides)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    if args.ray_address:
        cfg.ray_address = args.ray_address
    cfg.validate()
    out = run_pipeline(cfg, progress=not args.quiet, worker_logs=args.worker_logs, resume=args.resume)
    print("MTRec pipeline finished in {:.0f}s".format(out["timings_s"]["total"])
          + (f" (resumed: {len(out['skipped'])} finished stage(s) skipped)" if out["skipped"] else ""))
    for line in out["headline"]:
        print("  " + line)
    print(f"report: {out['report']}")
    return 0
