"""The ablation that tells whether the mental reward earns its place: train the same SASRec guided by each reward in
turn (rows A-I: clicks, supervised feedback regressors, IQ-Learn v1, QR-IQL v2, oracle, shuffled) over several
simulated worlds, or on real logs (source=logs); report reward validity, offline ranking and online
satisfaction/return with paired 95% CIs vs A and B.

On the simulator (source: simulator) it runs rows A-I over several worlds (mtrec_dist/ablation.py); on real logs
(source: logs) it prepares them (if not prepared yet) and compares the rewards' validity against the withheld
satisfaction signal and the guided recommenders offline (mtrec_dist/real_data.py).
"""
from __future__ import annotations

import argparse
import json
import os

from mtrec_dist.config import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no per-row progress lines")


def _real_logs(cfg, say) -> dict:
    from mtrec_dist.data.prepare import default_paths, prepare_dataset
    from mtrec_dist.real_data import run_real_data
    from mtrec_dist.runtime import init_ray

    input_uri, prepared = default_paths(cfg)
    if not os.path.exists(os.path.join(prepared, "manifest.json")):
        init_ray(cfg.ray_address)
        prepare_dataset(cfg.prepare, input_uri, prepared)
    result = run_real_data(cfg, prepared, say=say)
    from mtrec_dist.layout import RunLayout

    out_dir = cfg.ablation.out or RunLayout(cfg.run_dir).ablation
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(result["table"] + "\n")
    return dict(result, out_dir=out_dir, sweep={})


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    say = (lambda m: None) if args.quiet else None
    if cfg.source == "logs":
        result = _real_logs(cfg, say)
    else:
        from mtrec_dist.ablation import run_ablation

        result = run_ablation(cfg, say=say)
    print(result["table"])
    print(f"ablation: {result['seconds']:.0f}s; results in {result['out_dir']}/ (results.json, table.md"
          + (", gain_vs_beta.png)" if result["sweep"] else ")"))
    return 0
