"""Scoring a catalog no process should hold (issue 9): ``score-rewards`` with the item table sharded over 2
workers against the scoring actors, which each load the whole model, on the same reward checkpoint.

The checkpoint is written by 2 Ray Train workers, each initialising only its row-wise shard (so no process of
the benchmark ever builds the whole table), with the config's model at ``items`` items; its weights are the
initial ones (what is measured is memory and throughput, not what the model knows).  The rows are random
``(state, candidate)`` pairs.  Figures: rows/s of each runner, the peak RSS of each sharded worker next to
the MiB of its shard, and the peak RSS of one process that does what one scoring actor does (load the whole
model, score one batch).
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

from mtrec_dist.config import PipelineConfig

WORKERS = 2


def _write_checkpoint(config: Dict[str, Any]) -> None:
    """Ray Train worker: shard the fresh model row-wise and save it (every rank writes only its shard)."""
    import numpy as np
    import ray.train
    import torch

    from mtrec_dist.training.checkpoint import save_checkpoint
    from mtrec_dist.training.reward import reward_model_factory
    from mtrec_dist.training.sharding import shard_model

    ctx = ray.train.get_context()
    torch.manual_seed(0)
    model = reward_model_factory(config["spec"], for_inference=True)(torch.device("meta"))
    sharded = shard_model(model, config["train_cfg"], torch.device("cpu"), ctx.get_world_size(),
                          ctx.get_local_world_size())
    save_checkpoint(config["dir"], sharded.dmp, sharded.optimizer, rank=ctx.get_world_rank(),
                    meta={"model_spec": config["spec"], "step": 0, "epoch": 0, "rows_seen": 0,
                          "world_size": ctx.get_world_size()}, consumed_row_ids=np.zeros(0, np.int64))


def write_sharded_checkpoint(base: PipelineConfig, spec: Dict[str, Any], directory: Path) -> float:
    """A fresh reward checkpoint of ``spec`` written by 2 workers; seconds it took."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.perf_counter()
    train_cfg = dataclasses.replace(base.train, num_workers=WORKERS, sharding="row_wise")
    result = TorchTrainer(
        _write_checkpoint, train_loop_config={"spec": spec, "train_cfg": train_cfg, "dir": str(directory)},
        torch_config=TorchConfig(backend="gloo", timeout_s=base.train.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": base.train.cpus_per_worker}),
        run_config=RunConfig(name="bench-sharded-checkpoint", storage_path=str(directory.parent / "ray")),
    ).fit()
    if result.error is not None:
        raise RuntimeError(f"writing the {spec['num_items']:,}-item checkpoint failed: {result.error}")
    return time.perf_counter() - t0


def write_pairs(path: Path, items: int, rows: int, state_len: int, seed: int = 0) -> None:
    """``rows`` random (state, candidate) pairs over ``items`` items (one state item in 5 is padding)."""
    rng = np.random.default_rng(seed)
    states = rng.integers(1, items + 1, (rows, state_len))
    states[rng.random((rows, state_len)) < 0.2] = 0
    pq.write_table(pa.table({"query": np.arange(rows), "state_items": list(states),
                             "candidate": rng.integers(1, items + 1, rows)}), path)


_ONE_ACTOR = """
import json, resource, sys
import pyarrow.parquet as pq
from mtrec_dist.training.checkpoint import read_checkpoint_meta
from mtrec_dist.training.scoring import RewardScorer
ckpt, pairs, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
scorer = RewardScorer(ckpt, read_checkpoint_meta(ckpt)["model_spec"], candidate_column="candidate",
                      full_catalog_max=int(sys.argv[4]), num_candidates=int(sys.argv[5]))
scorer(pq.read_table(pairs).slice(0, batch))
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
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
    """Both runners on ``rows`` pairs of an ``items``-item model; rows/s and peak RSS per process."""
    from mtrec_dist.training.reward import model_spec
    from mtrec_dist.training.scoring import score_rewards, table_mb

    folder = work / f"sharded_scoring_{items}"
    folder.mkdir(parents=True, exist_ok=True)
    spec = model_spec(base, {"num_items": items, "state_len": state_len})
    checkpoint = folder / "checkpoint"
    written_s = write_sharded_checkpoint(base, spec, checkpoint)
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
