"""The whole MTRec run, stage by stage (the README's main command, `mtrec pipeline`):

    simulate (or read real logs) -> prepare -> train-reward -> score-rewards
        -> train-rec (every backbone x guidance mode of the config) -> evaluate [-> ablate rows] -> report

Every stage is the same library call the single-stage commands make, writing under ``cfg.run_dir`` in the
layout of :mod:`mtrec_dist.layout` (``sim/``, ``prepared/``, ``reward/``, ``rewards/``,
``rec/<backbone>-<guidance>/``, ``report/``, ``ablation/``, ``stages/``, ``pipeline.json``, ``config.yaml``).
The stages run through :class:`~mtrec_dist.stages.StageRunner`, which records each finished stage under
``stages/``.

The pipeline owns its run directory: a re-run replaces the previous outputs there.  ``resume=True``
(`mtrec pipeline --resume`) instead continues from the first stage that is not done with the same inputs
(a stage whose config or inputs changed reruns, and so does everything after it).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from mtrec_dist.config import PipelineConfig, dump_config
from mtrec_dist.layout import RunLayout, prepare_paths
from mtrec_dist.stages import (Outputs, RunContext, Stage, StageRunner, config_sections, model_stages, prepare_stage,
                               rec_stage_name, rec_variants, say_stderr, whole_config)


def run_pipeline(cfg: PipelineConfig, *, progress: bool = True, worker_logs: bool = False,
                 say: Callable[[str], None] = say_stderr, resume: bool = False) -> Dict[str, Any]:
    """Run every stage; return ``{"report": path, "results": ..., "timings_s": ..., "paths": ...}``.

    ``progress``: per-report training lines; ``worker_logs``: also Ray's own output (workers, actors, Ray
    Data's INFO lines) on the console, which otherwise stays in Ray's session logs (see ``init_ray``).
    ``resume``: skip the stages an earlier run of this folder finished with the same inputs."""
    from mtrec_dist.evaluation.evaluate import headline
    from mtrec_dist.evaluation.report import write_report
    from mtrec_dist.runtime import init_ray, ray_log_dir

    cfg.validate()
    cfg = dataclasses.replace(cfg, run_dir=os.path.abspath(cfg.run_dir))
    layout = RunLayout(cfg.run_dir)
    os.makedirs(layout.root, exist_ok=True)
    dump_config(cfg, layout.config_yaml)
    ctx = RunContext(cfg, progress=progress, say=say)
    runner = StageRunner(ctx, resume=resume)
    t_all = time.time()
    init_ray(cfg.ray_address, log_to_driver=worker_logs)
    log_dir = ray_log_dir()
    if not worker_logs and log_dir:
        ctx.line(f"Ray's own logs: {log_dir} (--verbose prints them here)")
    done = runner.run(pipeline_stages(ctx))
    results = dict(done["evaluate"])
    ablate = next((name for name in done if name.startswith("ablate ")), None)
    if ablate:
        results["ablation"] = done[ablate]
    timings = {**runner.timings, "total": round(time.time() - t_all, 1)}
    results["timings_s"] = timings
    report = write_report(results, layout.report, cfg.eval.ks)
    recs = [done[rec_stage_name(b, g)] for b, g in rec_variants(cfg)]
    summary = {"report": str(report), "run_dir": layout.root, "timings_s": timings, "skipped": runner.skipped,
               "headline": headline(results),
               "paths": {"sim": layout.sim if cfg.source == "simulator" else None,
                         "prepared": done["prepare"]["prepared"], "reward": layout.reward,
                         "rewards": layout.rewards, "recommenders": [r["output_dir"] for r in recs],
                         "reward_checkpoint": done["train-reward"]["checkpoint_path"],
                         "stages": layout.stages}}
    Path(layout.pipeline_json).write_text(json.dumps(summary, indent=1))
    return {**summary, "results": results}


def pipeline_stages(ctx: RunContext) -> List[Stage]:
    """simulate (simulator runs) -> prepare -> the model stages -> evaluate [-> ablate rows]."""
    cfg = ctx.cfg
    simulated = cfg.source == "simulator"
    if not simulated and not cfg.prepare.input:
        raise ValueError("source: logs needs prepare.input (the raw logs to prepare)")
    input_uri, prepared = prepare_paths(cfg)
    stages = [_simulate_stage(ctx)] if simulated else []
    stages.append(prepare_stage(ctx, input_uri, prepared, inputs=["simulate"] if simulated else []))
    stages += model_stages(ctx, prepared)
    stages.append(_evaluate_stage(ctx, prepared, [s.name for s in stages]))
    if simulated and cfg.ablation.pipeline_rows:
        stages.append(_ablation_stage(ctx))
    return stages


def _simulate_stage(ctx: RunContext) -> Stage:
    """The simulator's logs and hidden truth under ``sim/``."""
    cfg, layout = ctx.cfg, ctx.layout

    def run(done: Dict[str, Outputs]) -> Outputs:
        from mtrec_dist.data.simulator import simulate_logs

        sim = simulate_logs(cfg.simulator, layout.sim, progress=None if ctx.progress else (lambda m: None))
        ctx.line(f"{sim['events']:,} events, CTR {sim['ctr']:.3f}; clickbait items: CTR "
                 f"{sim['clickbait']['ctr']:.3f}, satisfaction {sim['clickbait']['mean_satisfaction']:.3f}; "
                 f"other items: CTR {sim['other']['ctr']:.3f}, satisfaction {sim['other']['mean_satisfaction']:.3f}")
        return sim

    return Stage("simulate", run, config=config_sections(cfg, "simulator"), paths=lambda out: [layout.sim])


def _evaluate_stage(ctx: RunContext, prepared: str, inputs: List[str]) -> Stage:
    """Offline ranking, reward validity and (simulator) online results: the report's ``results``."""
    cfg, layout = ctx.cfg, ctx.layout

    def run(done: Dict[str, Outputs]) -> Outputs:
        from mtrec_dist.evaluation.evaluate import evaluate_run

        recs = [done[rec_stage_name(b, g)] for b, g in rec_variants(cfg)]
        return evaluate_run(cfg, prepared, layout.rewards, layout.reward, recs,
                            sim_dir=layout.sim if cfg.source == "simulator" else None, progress=ctx.say)

    return Stage("evaluate", run, config=whole_config(cfg, "ablation"), inputs=inputs)


def _ablation_stage(ctx: RunContext) -> Stage:
    """The ablation rows of ``ablation.pipeline_rows`` (e.g. A, B, F) on the configured world: the same
    SASRec guided by clicks, by a supervised watch-ratio regressor and by the mental reward."""
    cfg, layout = ctx.cfg, ctx.layout
    rows = list(cfg.ablation.pipeline_rows)

    def run(done: Dict[str, Outputs]) -> Outputs:
        from mtrec_dist.ablation import run_ablation

        ab = dataclasses.replace(cfg.ablation, rows=rows, worlds=1, beta_sweep=[], out=layout.ablation)
        result = run_ablation(dataclasses.replace(cfg, ablation=ab), say=ctx.say if ctx.progress else (lambda m: None))
        return {"rows": result["default"], "table": result["table"], "settings": result["settings"]}

    return Stage("ablate " + "/".join(rows), run, config=whole_config(cfg), inputs=["evaluate"],
                 paths=lambda out: [layout.ablation])
