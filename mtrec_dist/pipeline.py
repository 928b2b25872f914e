"""The whole MTRec run, stage by stage (the README's main command, `mtrec pipeline`):

    simulate (or read real logs) -> prepare -> train-reward -> score-rewards
        -> train-rec (every backbone x guidance mode of the config) -> evaluate -> report

Every stage is the same library call the single-stage commands make, writing under ``cfg.run_dir``:

    <run_dir>/sim/            simulator logs + hidden truth (source: simulator)
    <run_dir>/prepared/       transitions, eval/, rejects/, vocab/, manifest.json
    <run_dir>/reward/         reward model metrics, TensorBoard, reward_model.json (+ ray_results/)
    <run_dir>/rewards/        scored transitions (reward quantiles, mean, CVaR, baselines)
    <run_dir>/rec/<backbone>-<guidance>/   each recommender's metrics and checkpoints
    <run_dir>/report/         report.html, PNG figures, metrics.json, tensorboard/
    <run_dir>/pipeline.json   stage timings and where everything is

The pipeline owns its run directory: a re-run replaces the previous outputs there.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from mtrec_dist.config import PipelineConfig, dump_config


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_pipeline(cfg: PipelineConfig, *, progress: bool = True, worker_logs: bool = False,
                 say: Callable[[str], None] = _say) -> Dict[str, Any]:
    """Run every stage; return ``{"report": path, "results": ..., "timings": ..., "paths": ...}``.

    ``progress``: per-report training lines; ``worker_logs``: also Ray's own output (workers, actors, Ray
    Data's INFO lines) on the console, which otherwise stays in Ray's session logs (see ``init_ray``)."""
    from mtrec_dist.data.prepare import default_paths, prepare_dataset, summarize_manifest
    from mtrec_dist.data.simulator import default_sim_dir, simulate_logs
    from mtrec_dist.evaluation.evaluate import evaluate_run, headline
    from mtrec_dist.evaluation.report import write_report
    from mtrec_dist.runtime import init_ray, ray_log_dir
    from mtrec_dist.training.recommender import train_recommender
    from mtrec_dist.training.reward import train_reward_model
    from mtrec_dist.training.scoring import score_rewards

    cfg.validate()
    run_dir = os.path.abspath(cfg.run_dir)
    cfg = dataclasses.replace(cfg, run_dir=run_dir)
    os.makedirs(run_dir, exist_ok=True)
    dump_config(cfg, os.path.join(run_dir, "config.yaml"))
    timings: Dict[str, float] = {}
    t_all = time.time()

    def stage(name: str):
        say(f"[pipeline] === {name} ===")
        return time.time()

    def done(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 1)
        say(f"[pipeline] {name} done in {timings[name]}s")

    init_ray(cfg.ray_address, log_to_driver=worker_logs)
    log_dir = ray_log_dir()
    if not worker_logs and log_dir:
        say(f"[pipeline] Ray's own logs: {log_dir} (--verbose prints them here)")
    sim_dir = None
    if cfg.source == "simulator":
        sim_dir = default_sim_dir(run_dir)
        t0 = stage("simulate")
        sim = simulate_logs(cfg.simulator, sim_dir, progress=None if progress else (lambda m: None))
        say(f"[pipeline] {sim['events']:,} events, CTR {sim['ctr']:.3f}; clickbait items: CTR "
            f"{sim['clickbait']['ctr']:.3f}, satisfaction {sim['clickbait']['mean_satisfaction']:.3f}; "
            f"other items: CTR {sim['other']['ctr']:.3f}, satisfaction {sim['other']['mean_satisfaction']:.3f}")
        done("simulate", t0)
    elif not cfg.prepare.input:
        raise ValueError("source: logs needs prepare.input (the raw logs to prepare)")

    t0 = stage("prepare")
    input_uri, prepared = default_paths(cfg)
    prep_cfg = dataclasses.replace(cfg.prepare, overwrite=True, progress=cfg.prepare.progress and progress)
    manifest = prepare_dataset(prep_cfg, input_uri, prepared)
    say(summarize_manifest(manifest))
    done("prepare", t0)

    t0 = stage("train-reward")
    reward_dir = os.path.join(run_dir, "reward")
    reward = train_reward_model(cfg, prepared, reward_dir, progress=progress)
    say(f"[pipeline] reward model: step {reward['metrics'].get('step')}, loss "
        f"{reward['metrics'].get('loss', float('nan')):.4g}")
    done("train-reward", t0)

    t0 = stage("score-rewards")
    scored_dir = os.path.join(run_dir, "rewards")
    scores = score_rewards(cfg, reward["checkpoint_path"], prepared, scored_dir, overwrite=True)
    say(f"[pipeline] scored {scores['rows']:,} transitions ({scores['rows_per_s']:,} rows/s)")
    done("score-rewards", t0)

    recs: List[Dict[str, Any]] = []
    for backbone in cfg.rec.backbones:
        for guidance in cfg.rec.guidances:
            name = f"train-rec {backbone}/{guidance}"
            t0 = stage(name)
            out = os.path.join(run_dir, "rec", f"{backbone}-{guidance}")
            recs.append(train_recommender(cfg, scored_dir, prepared, out, backbone=backbone, guidance=guidance,
                                          progress=progress))
            done(name, t0)

    t0 = stage("evaluate")
    results = evaluate_run(cfg, prepared, scored_dir, reward_dir, recs, sim_dir=sim_dir, progress=say)
    done("evaluate", t0)
    timings["total"] = round(time.time() - t_all, 1)
    results["timings_s"] = timings
    report = write_report(results, os.path.join(run_dir, "report"), cfg.eval.ks)
    lines = headline(results)
    summary = {"report": str(report), "run_dir": run_dir, "timings_s": timings, "headline": lines,
               "paths": {"sim": sim_dir, "prepared": prepared, "reward": reward_dir, "rewards": scored_dir,
                         "recommenders": [r["output_dir"] for r in recs],
                         "reward_checkpoint": reward["checkpoint_path"]}}
    Path(run_dir, "pipeline.json").write_text(json.dumps(summary, indent=1))
    return {**summary, "results": results}
