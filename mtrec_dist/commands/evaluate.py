"""Evaluate a run's reward model and recommenders: full-ranking and 100-negative HR/NDCG on all and satisfied
targets, reward validity (Spearman/AUC), online simulator metrics with 95% CIs; writes the report (HTML, PNGs,
metrics.json, TensorBoard).
"""
from __future__ import annotations

import argparse
import glob
import json
import os

from mtrec_dist.commands._common import add_prepared_flag, add_ray_address_flag, load_run_config, prepared_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_prepared_flag(p)
    p.add_argument("--scores", default=None, metavar="DIR", help="scored transitions (default: <run_dir>/rewards)")
    p.add_argument("--reward-dir", default=None, metavar="DIR", help="train-reward output (default: <run_dir>/reward)")
    p.add_argument("--rec", action="append", default=[], metavar="DIR",
                   help="a train-rec output dir (repeatable; default: every <run_dir>/rec/*/ with recommender.json)")
    p.add_argument("--sim", default=None, metavar="DIR",
                   help="simulator output with truth/ for online evaluation (default: <run_dir>/sim if present)")
    p.add_argument("--out", default=None, metavar="DIR", help="report directory (default: <run_dir>/report)")
    add_ray_address_flag(p)


def run(args) -> int:
    from mtrec_dist.data.simulator import default_sim_dir
    from mtrec_dist.evaluation.evaluate import evaluate_run, headline
    from mtrec_dist.evaluation.report import write_report
    from mtrec_dist.layout import RunLayout
    from mtrec_dist.runtime import init_ray
    from mtrec_dist.training.recommender import POINTER_FILE

    cfg = load_run_config(args)
    layout = RunLayout(cfg.run_dir)
    prepared = prepared_dir(args, cfg)
    rec_dirs = args.rec or sorted(os.path.dirname(p) for p in glob.glob(os.path.join(layout.rec_root, "*", POINTER_FILE)))
    if not rec_dirs:
        raise FileNotFoundError(f"no trained recommenders under {layout.rec_root}; run `mtrec train-rec` or pass --rec")
    summaries = []
    for d in rec_dirs:
        path = os.path.join(d, POINTER_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: {d} is not a finished train-rec output")
        with open(path) as f:
            summaries.append(json.load(f))
    sim = args.sim or default_sim_dir(cfg.run_dir)
    init_ray(cfg.ray_address)
    results = evaluate_run(cfg, prepared, args.scores or layout.rewards, args.reward_dir or layout.reward, summaries,
                           sim_dir=sim if os.path.isdir(sim) else None)
    report = write_report(results, args.out or layout.report, cfg.eval.ks)
    for line in headline(results):
        print(line)
    print(f"report: {report}")
    return 0
