"""A catalog no process should hold (issue 9): ``score-rewards`` and offline ranking with the item table
sharded over 2 workers, on ``items``-item models.

Each checkpoint is written by 2 Ray Train workers, each initialising only its row-wise shard (so no process of
the benchmark ever builds the whole table), with the config's model; its weights are the initial ones (what is
measured is memory and throughput, not what the model knows).

* Scoring: random ``(state, candidate)`` pairs, both runners: rows/s, the peak RSS of each sharded worker
  next to the MiB of its shard, and the peak RSS of one process that does what one scoring actor does (load
  the whole model, score one batch).
* Ranking: random test rows of a SASRec, sharded only: the ranking actors would each hold the table *and*
  a ``[256, items]`` score matrix per batch (10 GB at 10^7 items), which this machine cannot hold.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtrec_dist.choices import CLICK_TRAINED
from mtrec_dist.config import PipelineConfig

WORKERS = 2
RANKING_ROWS = 1024  # test rows ranked against the whole catalog (each costs items x dim multiply-adds)


def _write_checkpoint(config: Dict[str, Any]) -> None:
    """Ray Train worker: shard the fresh model row-wise and save it (every rank writes only its shard)."""
    import numpy as np
    import ray.train
    import torch

    from mtrec_dist.training.checkpoint import save_checkpoint
    from mtrec_dist.training.sharding import shard_model

    ctx = ray.train.get_context()
    torch.manual_seed(0)
    sharded = shard_model(config["factory"](torch.device("meta")), config["train_cfg"], torch.device("cpu"),
                          ctx.get_world_size(), ctx.get_local_world_size())
    save_checkpoint(config["dir"], sharded.dmp, sharded.optimizer, rank=ctx.get_world_rank(),
                    meta={"model_spec": config["spec"], "step": 0, "epoch": 0, "rows_seen": 0,
                          "world_size": ctx.get_world_size()}, consumed_row_ids=np.zeros(0, np.int64))


def run_worker_group(fn, config: Dict[str, Any], base: PipelineConfig, name: str, storage: Path, what: str,
                     use_gpu: bool = False) -> None:
    """``fn(config)`` on :data:`WORKERS` Ray Train workers: gloo on CPUs, or NCCL with one GPU each; raises
    ``RuntimeError("<what> failed: ...")`` when the run fails.  ``storage``: Ray Train's (absolute) folder."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mtrec_dist.runtime import dist_backend

    result = TorchTrainer(
        fn, train_loop_config=config,
        torch_config=TorchConfig(backend=dist_backend(use_gpu), timeout_s=base.train.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=WORKERS, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": base.train.cpus_per_worker,
                                                           **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    ).fit()
    if result.error is not None:
        raise RuntimeError(f"{what} failed: {result.error}") from result.error


def write_sharded_checkpoint(base: PipelineConfig, spec: Dict[str, Any], factory, directory: Path) -> float:
    """A fresh checkpoint of ``factory``'s model (described by ``spec``) written by 2 workers; seconds it took."""
    t0 = time.perf_counter()
    train_cfg = dataclasses.replace(base.train, num_workers=WORKERS, sharding="row_wise")
    run_worker_group(_write_checkpoint, {"spec": spec, "factory": factory, "train_cfg": train_cfg, "dir": str(directory)},
                     base, f"bench-checkpoint-{spec['kind']}", directory.parent / "ray",
                     f"writing the {spec['num_items']:,}-item checkpoint")
    return time.perf_counter() - t0


def write_pairs(path: Path, items: int, rows: int, state_len: int, seed: int = 0) -> None:
    """``rows`` random (state, candidate) pairs over ``items`` items (one state item in 5 is padding)."""
    rng = np.random.default_rng(seed)
    states = rng.integers(1, items + 1, (rows, state_len))
    states[rng.random((rows, state_len)) < 0.2] = 0
    pq.write_table(pa.table({"query": np.arange(rows), "state_items": list(states),
                             "candidate": rng.integers(1, items + 1, rows)}), path)


_ONE_ACTOR = """
import json, sys
import pyarrow.parquet as pq
from mtrec_dist.training.checkpoint import read_checkpoint_meta
from mtrec_dist.training.scoring import RewardScorer
from mtrec_dist.training.sharded_inference import peak_rss_mb
ckpt, pairs, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
scorer = RewardScorer(ckpt, read_checkpoint_meta(ckpt)["model_spec"], candidate_column="candidate",
                      full_catalog_max=int(sys.argv[4]), num_candidates=int(sys.argv[5]))
scorer(pq.read_table(pairs).slice(0, batch))
print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
"""


def one_actor_peak_rss_mb(base: PipelineConfig, checkpoint: Path, pairs: Path) -> float:
    """Peak RSS of a fresh process doing one scoring actor's work: load the whole model, score one batch."""
    tc = base.train
    out = subprocess.run([sys.executable, "-c", _ONE_ACTOR, str(checkpoint), str(pairs), str(tc.score_batch_size),
                          str(tc.score_full_catalog_max), str(tc.score_candidates)],
                         check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def bench_sharded_scoring(base: PipelineConfig, items: int, rows: int, state_len: int, work: Path,
                          say=print) -> Dict[str, Any]:
    """Both scoring runners on ``rows`` pairs of an ``items``-item reward model; rows/s and peak RSS."""
    from mtrec_dist.training.reward import model_spec, reward_model_factory
    from mtrec_dist.training.scoring import score_rewards, table_mb

    folder = work / f"sharded_scoring_{items}"
    folder.mkdir(parents=True, exist_ok=True)
    spec = model_spec(base, {"num_items": items, "state_len": state_len})
    checkpoint = folder / "checkpoint"
    written_s = write_sharded_checkpoint(base, spec, reward_model_factory(spec, for_inference=True), checkpoint)
    pairs = folder / "pairs.parquet"
    write_pairs(pairs, items, rows, state_len)
    runs: Dict[str, Any] = {}
    for runner in ("sharded", "actors"):
        cfg = dataclasses.replace(base, train=dataclasses.replace(
            base.train, score_runner=runner, num_workers=WORKERS, sharding="row_wise", score_concurrency=1))
        t0 = time.perf_counter()
        summary = score_rewards(cfg, str(checkpoint), None, str(folder / f"scores_{runner}"),
                                pairs_path=str(pairs), overwrite=True)
        wall = time.perf_counter() - t0
        runs[runner] = {"rows": summary["rows"], "wall_s": wall, "rows_per_s": summary["rows"] / wall,
                        "baseline": summary["baseline"], "ranks": summary.get("ranks")}
        say(f"[bench] sharded scoring, {items:,} items, {runner}: {runs[runner]['rows_per_s']:,.0f} rows/s")
    actor_rss = one_actor_peak_rss_mb(base, checkpoint, pairs)
    worker_rss = max(r["peak_rss_mb"] for r in runs["sharded"]["ranks"])
    say(f"[bench] sharded scoring: peak RSS per worker {worker_rss:,.0f} MiB, one actor {actor_rss:,.0f} MiB")
    return {"items": items, "rows": rows, "table_mb": table_mb(spec), "checkpoint_written_s": written_s,
            "runs": runs, "one_actor_peak_rss_mb": actor_rss,
            "ratios": {"actor_rss_vs_worker_rss": actor_rss / worker_rss,
                       "sharded_vs_actors_speed": runs["sharded"]["rows_per_s"] / runs["actors"]["rows_per_s"]}}


def random_test_rows(items: int, rows: int, state_len: int, seed: int = 1) -> pa.Table:
    """``rows`` random test transitions (one per user) over ``items`` items."""
    rng = np.random.default_rng(seed)
    states = rng.integers(1, items + 1, (rows, state_len))
    return pa.table({"row_id": np.arange(rows), "user_idx": np.arange(rows), "state_items": list(states),
                     "state_feedback": list(np.ones((rows, state_len), np.float32)),
                     "action": rng.integers(1, items + 1, rows)})


def bench_sharded_ranking(base: PipelineConfig, items: int, rows: int, state_len: int, work: Path,
                          say=print) -> Dict[str, Any]:
    """Full-catalog and sampled ranks of ``rows`` random test rows under an ``items``-item SASRec, sharded."""
    import ray.data

    from mtrec_dist.evaluation.sharded_ranking import rank_sharded
    from mtrec_dist.training.recommender import rec_model_spec, recommender_factory
    from mtrec_dist.training.scoring import table_mb

    folder = work / f"sharded_ranking_{items}"
    folder.mkdir(parents=True, exist_ok=True)
    spec = rec_model_spec(base, {"num_items": items, "state_len": state_len}, "sasrec", CLICK_TRAINED)
    factory = recommender_factory(spec, for_inference=True)
    checkpoint = folder / "checkpoint"
    written_s = write_sharded_checkpoint(base, spec, factory, checkpoint)
    t0 = time.perf_counter()
    ranked, reports = rank_sharded(factory, str(checkpoint), ray.data.from_arrow(random_test_rows(items, rows, state_len)),
                                   dataclasses.replace(base.train, num_workers=WORKERS), num_items=items,
                                   state_len=state_len, sampled_negatives=base.eval.sampled_negatives,
                                   seed=base.eval.seed, histories={})
    wall = time.perf_counter() - t0
    if ranked.num_rows != rows:
        raise RuntimeError(f"sharded ranking returned {ranked.num_rows:,} rows for {rows:,} test rows")
    say(f"[bench] sharded ranking, {items:,} items: {rows / wall:,.1f} rows/s, peak RSS per worker "
        f"{max(r['peak_rss_mb'] for r in reports):,.0f} MiB")
    return {"items": items, "rows": rows, "table_mb": table_mb(spec), "checkpoint_written_s": written_s,
            "wall_s": wall, "rows_per_s": rows / wall, "ranks": reports,
            "median_rank_full": float(np.median(ranked.column("rank_full").to_numpy()))}
