"""The ablation that tells whether the mental reward earns its place: train the same SASRec guided by each reward in
turn (rows A-I: clicks, supervised feedback regressors, IQ-Learn v1, QR-IQL v2, oracle, shuffled) over several
simulated worlds, or on real logs (source=logs); report reward validity, offline ranking and online
satisfaction/return with paired 95% CIs vs A and B.

On the simulator (source: simulator) it runs rows A-I over several worlds (mtrec_dist/ablation.py); on real logs
(source: logs) it prepares them (again where the prepared data are missing or of other settings) and compares
the rewards' validity against the withheld satisfaction signal and the guided recommenders offline
(mtrec_dist/real_data.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

from mtrec_dist.config import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no per-row progress lines")
    p.add_argument("--pool", nargs="+", metavar="RESULTS_JSON",
                   help="run nothing: print the table of the default-world records of these results.json files "
                        "together (runs on different worlds, e.g. a replicate with another simulator.seed)")


# settings that may differ between pooled runs (which rows and worlds ran, and where); all others must match
POOL_MAY_DIFFER = ("rows", "worlds", "train_seeds", "beta_sweep", "sweep_rows", "pipeline_rows", "out", "parallel",
                   "tilt_strengths", "validation_user_share")  # the last two: real logs only


def _ablation_results(path: str) -> dict:
    """An ``mtrec ablate`` results.json (simulator source), or an error naming the file and what is wrong."""
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"mtrec ablate --pool: cannot read {path}: {e}")
    missing = [k for k in ("settings", "records") if not isinstance(result, dict) or k not in result]
    if missing or "default" not in result["records"]:
        raise SystemExit(f"mtrec ablate --pool: {path} is not the results.json of a simulator ablation "
                         f"(no {', '.join(missing) or 'records.default'})")
    return result


def _pool(paths: list) -> int:
    from mtrec_dist.ablation import markdown_table, pool_records, summarise

    results = [_ablation_results(path) for path in paths]
    same = [{k: v for k, v in r["settings"].items() if k not in POOL_MAY_DIFFER} for r in results]
    for path, settings in zip(paths[1:], same[1:]):
        if settings != same[0]:
            diff = sorted(k for k in set(settings) | set(same[0]) if settings.get(k) != same[0].get(k))
            raise SystemExit(f"mtrec ablate --pool: {path} was run with other settings than {paths[0]} ({diff})")
    runs = [r["records"]["default"] for r in results]
    records = pool_records(runs)
    left_out = sorted({row for run in runs for row in run} - set(records))
    models = {(r["world"], r["train_seed"]) for r in records["A"]}
    print(markdown_table(summarise(records)))
    print(f"pooled {len(paths)} run(s): {len(models)} trained models in {len({w for w, _ in models})} worlds"
          + (f"; rows not in every run left out: {', '.join(left_out)}" if left_out else ""))
    return 0


def _prepared_matches(prepared: str, prep) -> bool:
    """Whether ``prepared`` holds a complete dataset of this schema version prepared with the same
    sessions, states and return window (else the logs are prepared again)."""
    from mtrec_dist.data.dataset import load_manifest
    from mtrec_dist.data.readers import InputError
    from mtrec_dist.data.schema import SCHEMA_VERSION

    try:
        m = load_manifest(prepared, any_version=True)
    except InputError:  # none there (or unreadable): prepare it
        return False
    return (m.get("schema_version"), m.get("state_len"), m.get("session_gap_s"), m.get("return_window_s")) == (
        SCHEMA_VERSION, prep.state_len, prep.session_gap_s, prep.return_window_s)


def _real_logs(cfg, say) -> dict:
    from mtrec_dist.data.prepare import default_paths, prepare_dataset
    from mtrec_dist.real_data import run_real_data
    from mtrec_dist.runtime import init_ray

    input_uri, prepared = default_paths(cfg)
    if not _prepared_matches(prepared, cfg.prepare):
        init_ray(cfg.ray_address)
        prepare_dataset(dataclasses.replace(cfg.prepare, overwrite=True), input_uri, prepared)
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
    if args.pool:
        return _pool(args.pool)
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
