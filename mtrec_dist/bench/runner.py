"""One benchmark run, in order: machine and load, the simulated world, prepare, QR-IQL, SASRec, scoring,
the load again, every ratio side by side.

A stage whose baseline does not compute the library's result (or that fails) is recorded with its error
and the run goes on: the other ratios still count, and the command exits non-zero.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from mtrec_dist.choices import BENCH_STAGES
from mtrec_dist.config import PipelineConfig

from .machine import load_average, machine_info
from .peer import PeerSettings, bench_peer
from .prepare_bench import bench_prepare
from .report import collect_ratios
from .scoring_bench import bench_scoring
from .catalog_steps import bench_catalog
from .plots import SCALE_FIGURE, plot_scale
from .sharded_bench import RANKING_ROWS, bench_sharded_ranking, bench_sharded_scoring
from .sizes import BenchSizes
from .train_bench import bench_model
from .world import ensure_prepared, simulate_world


def _attempt(name: str, fn: Callable[[], Dict[str, Any]], say) -> Dict[str, Any]:
    """``fn()``, or ``{"error": ...}`` when it raises (the traceback goes to the console)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one stage's failure must not hide the others' figures
        traceback.print_exc()
        say(f"[bench] {name} FAILED: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}


def _prepare_scale(base: PipelineConfig, sizes: BenchSizes, users: Sequence[int], work: Path, say) -> Dict[str, Any]:
    """prepare, library vs plain, on a world of each size in ``users`` (simulated users), smallest first."""
    runs = [_attempt(f"prepare at {u:,} users", lambda u=u: bench_prepare(
        base, simulate_world(base, dataclasses.replace(sizes, users=u), work / f"scale_users_{u}", say), say), say)
        for u in sorted(users)]
    return {"runs": runs, "errors": [r["error"] for r in runs if "error" in r]}


def start_ray(base: PipelineConfig, threads: int) -> None:
    """Attach to / start Ray with workers on ``threads`` torch threads, like the plain runs."""
    from mtrec_dist.runtime import init_ray

    init_ray(base.ray_address, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})


def run_bench(base: PipelineConfig, sizes: BenchSizes, work: Path, *, stages: Sequence[str] = BENCH_STAGES,
              workers: Sequence[int] = (1, 2), memory_feed: bool = True, catalog_sizes: Sequence[int] = (),
              prepare_scale: Sequence[int] = (),
              sharded_items: int = 0, sharded_rows: int = 20_000, peer: Optional[PeerSettings] = None,
              command: str = "mtrec bench", say=print) -> Dict[str, Any]:
    """Run the chosen stages; with ``catalog_sizes``, also the step time and peak memory per rank per catalog
    size; with ``prepare_scale`` (simulated users per world), also prepare against the plain script on each
    of those worlds (the scale curves are drawn into ``<work>/bench_scale.png``); with
    ``sharded_items`` > 0, also scoring ``sharded_rows`` pairs both ways and ranking with the table sharded, on
    ``sharded_items``-item models; with ``peer``, our recommenders against RecBole's on MovieLens-1M (:mod:`.peer`).
    The whole result (see :mod:`.report` for its ratios)."""
    from mtrec_dist.runtime import resolve_use_gpu

    unknown = sorted(set(stages) - set(BENCH_STAGES))
    if unknown:
        raise ValueError(f"unknown bench stage(s) {unknown}; choose from {list(BENCH_STAGES)}")
    t0 = time.time()
    work = work.resolve()  # Ray Train storage paths must be absolute (the default --work is relative)
    result: Dict[str, Any] = {"command": command, "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                              "load_before": load_average(), "machine": machine_info(),
                              "sizes": {**sizes.__dict__, "warmup_steps": sizes.warmup_steps}, "workers": list(workers),
                              "stages": {}}
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda") if resolve_use_gpu(base.train.use_gpu) else torch.device("cpu")
    done = result["stages"]
    if not (stages or catalog_sizes or prepare_scale or sharded_items):  # the peer alone reads MovieLens, not the simulated world
        start_ray(base, sizes.threads)
        return _finish(result, done, work, peer, t0, say)
    world = simulate_world(base, sizes, work, say)
    start_ray(base, sizes.threads)
    if "prepare" in stages:
        done["prepare"] = _attempt("prepare", lambda: bench_prepare(base, world, say), say)
    manifest = ensure_prepared(base, world)
    result["world"] = {"events": world.events, "transitions": manifest["num_transitions"],
                       "items": manifest["num_items"], "users": manifest["num_users"], "state_len": manifest["state_len"]}
    for model in ("qriql", "sasrec"):
        if model in stages:
            done[model] = _attempt(model, lambda m=model: bench_model(m, base, sizes, world.prepared, manifest, work,
                                                                      workers, say, device, memory_feed), say)
    if "scoring" in stages:
        checkpoint = done.get("qriql", {}).get("runs", {}).get("ray_1", {}).get("checkpoint")
        done["scoring"] = (_attempt("scoring", lambda: bench_scoring(base, checkpoint, world.prepared, work,
                                                                     sizes.threads, say=say), say)
                           if checkpoint else {"error": "needs the QR-IQL stage's 1-worker checkpoint"})
    if prepare_scale:
        done["prepare_scale"] = _prepare_scale(base, sizes, prepare_scale, work, say)
    if catalog_sizes:
        done["catalog"] = _attempt("catalog", lambda: bench_catalog(
            base, catalog_sizes, manifest["state_len"], work / "catalog", threads=sizes.threads, say=say), say)
    if sharded_items:
        done["sharded_scoring"] = _attempt("sharded_scoring", lambda: bench_sharded_scoring(
            base, sharded_items, sharded_rows, manifest["state_len"], work, say), say)
        done["sharded_ranking"] = _attempt("sharded_ranking", lambda: bench_sharded_ranking(
            base, sharded_items, RANKING_ROWS, manifest["state_len"], work, say), say)
    return _finish(result, done, work, peer, t0, say)


def _finish(result: Dict[str, Any], done: Dict[str, Any], work: Path, peer: Optional[PeerSettings], t0: float,
            say) -> Dict[str, Any]:
    """The peer comparison (when asked for), the load after, the ratios."""
    if peer is not None:
        done["peer"] = _attempt("peer", lambda: bench_peer(peer, work, say), say)
    result["load_after"] = load_average()
    result["total_s"] = time.time() - t0
    try:
        figure = plot_scale(result, work / SCALE_FIGURE)
    except Exception as e:  # noqa: BLE001 - a figure must not cost the run's figures
        traceback.print_exc()
        say(f"[bench] plotting the scale curves FAILED: {type(e).__name__}: {e}")
        figure = None
    if figure is not None:
        result["plots"] = [str(figure)]
    result["ratios"] = collect_ratios(result)
    return result


def failed_stages(result: Dict[str, Any]) -> list:
    """Names of the stages that recorded an error."""
    return [name for name, stage in result["stages"].items() if "error" in stage or stage.get("errors")]
