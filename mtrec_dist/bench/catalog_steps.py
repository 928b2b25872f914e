"""Step time and peak memory per rank against catalog size: the real ``QRIQLModel`` with its item table
sharded row-wise over 2 Ray Train workers (gloo or NCCL; forward, backward, fused sparse optimizer, target
update; no data pipeline) on synthetic batches, with the sampled soft value (``reward.num_negatives``) and
with the full-catalog one.

This isolates what the catalog costs a step and a process: with sampled candidates the step should stay flat
as the table grows (issue 9: at most 1.3x from 10^4 to 10^7 items), and each rank should hold its half of the
table plus a part that does not grow with it; the full-catalog soft value grows with the table.
``mtrec bench --catalog-sizes`` runs it; :mod:`.plots` draws the curves.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mtrec_dist.config import PipelineConfig

from .sharded_bench import WORKERS, run_worker_group

DEFAULT_NEGATIVES = 256  # sampled candidates when the config uses the full catalog (reward.num_negatives 0)
_RESULT = "catalog_steps.json"


def synthetic_batch(num_items: int, batch_size: int, state_len: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Ids uniform over the catalog (1 pad in 5, 10% done): every row of a big table is equally likely hit."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(1, num_items + 1, (batch_size, state_len), generator=g)
    s[torch.rand(batch_size, state_len, generator=g) < 0.2] = 0
    a = torch.randint(1, num_items + 1, (batch_size,), generator=g)
    s2 = torch.cat([s[:, 1:], a.view(-1, 1)], dim=1)
    return {"state_items": s, "state_feedback": (s != 0).float(), "next_state_items": s2,
            "next_state_feedback": (s2 != 0).float(), "action": a, "action_feedback": torch.full((batch_size,), 0.5),
            "done": (torch.rand(batch_size, generator=g) < 0.1).float(), "mask": torch.ones(batch_size)}


def agreed_steps(first_step_s: float, budget_s: float, min_steps: int, max_steps: int,
                 device: torch.device = torch.device("cpu")) -> int:
    """Steps that fit in ``budget_s`` at this rank's pace, the largest over ranks: every rank must make the
    same number of steps (each is a round of collectives), so they agree before timing."""
    from mtrec_dist.data.pipeline import max_over_ranks

    mine = int(np.clip(budget_s / max(first_step_s, 1e-9), min_steps, max_steps))
    return int(max_over_ranks(torch.tensor([mine], dtype=torch.int64, device=device))[0])


def step_time(cfg: PipelineConfig, num_items: int, negatives: int, state_len: int, budget_s: float, *,
              rank: int = 0, world_size: int = 1, local_world_size: int = 1, device: torch.device = torch.device("cpu"),
              min_steps: int = 3, max_steps: int = 200) -> Dict[str, Any]:
    """On every rank of the default process group together: this rank's median seconds per step over the
    steps that fit in ``budget_s`` (at least ``min_steps``) after two warm-up steps, its peak resident
    memory while the model existed and the MiB of table rows it holds."""
    from mtrec_dist.models.reward_model import QRIQLModel
    from mtrec_dist.training.scoring import rows_mb
    from mtrec_dist.training.sharded_inference import peak_rss_mb, reset_peak_rss
    from mtrec_dist.training.sharding import local_shard_sizes, shard_model

    gc.collect()
    peak_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reward = dataclasses.replace(cfg.reward, num_negatives=negatives)
    torch.manual_seed(0)
    model = QRIQLModel(num_items, cfg.model, reward, state_len, device=torch.device("meta"))
    train = dataclasses.replace(cfg.train, num_workers=world_size, sharding="row_wise")
    sharded = shard_model(model, train, device, world_size, local_world_size)
    dmp, opt = sharded.dmp, sharded.optimizer
    dmp.train()
    batches = [{k: v.to(device) for k, v in synthetic_batch(num_items, cfg.train.batch_size, state_len,
                                                           seed=1000 * rank + i).items()} for i in range(4)]

    def one(i: int) -> float:
        t = time.perf_counter()
        out = dmp(batches[i % len(batches)])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sharded.call_hook("update_target")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    warmup = one(0)
    steps = agreed_steps(one(1), budget_s, min_steps, max_steps, device)
    times: List[float] = [one(i + 2) for i in range(steps)]
    shard_rows = sum(s[0] for shapes in local_shard_sizes(dmp).values() for s in shapes)
    out = {"items": num_items, "soft_value": f"sampled {negatives}" if negatives else "full catalog",
           "rank": rank, "step_s_median": float(np.median(times)), "steps": len(times), "warmup_s": warmup,
           # peak_reset False: the peak also covers the runs before this one (smaller catalogs)
           "peak_rss_mb": peak_rss_mb(), "peak_reset": peak_reset, "shard_rows": shard_rows,
           "shard_mb": rows_mb(shard_rows, cfg.model.embedding_dim),  # the rows' float32 weights
           "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    del dmp, opt, sharded, model, batches
    gc.collect()
    return out


def _catalog_worker(config: Dict[str, Any]) -> None:
    """Ray Train worker: every (items, negatives) run in order, all ranks together; rank 0 writes them all."""
    import ray.train
    import torch.distributed as dist

    from mtrec_dist.training.worker import worker_device

    ctx = ray.train.get_context()
    torch.set_num_threads(config["threads"])
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(config["use_gpu"])
    runs = []
    for items, negatives in config["runs"]:
        mine = step_time(config["base"], items, negatives, config["state_len"], config["budget_s"], rank=rank,
                         world_size=world, local_world_size=ctx.get_local_world_size(), device=device)
        ranks: List[Optional[Dict[str, Any]]] = [None] * world
        dist.all_gather_object(ranks, mine)
        runs.append(ranks)
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(runs))


def plan_runs(sizes: Sequence[int], negatives: int, full_max: int) -> List[Tuple[int, int]]:
    """``(items, negatives)`` per run, smallest catalog first: sampled for every size, the full catalog
    (negatives 0) up to ``full_max`` items (beyond that one step takes minutes on a CPU)."""
    return [(n, neg) for n in sorted(sizes) for neg in (negatives, 0) if neg or n <= full_max]


def merge_ranks(ranks: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One run's figures from every rank's: the slowest rank's median step (the ranks step together) and
    each rank's peak memory next to its shard."""
    first = ranks[0]
    return {"items": first["items"], "soft_value": first["soft_value"], "workers": len(ranks),
            "step_s_median": max(r["step_s_median"] for r in ranks), "steps": first["steps"],
            "warmup_s": max(r["warmup_s"] for r in ranks),
            "ranks": [{k: r.get(k) for k in ("rank", "peak_rss_mb", "peak_reset", "peak_gpu_mb", "shard_rows", "shard_mb",
                                         "step_s_median")} for r in ranks]}


def bench_catalog(base: PipelineConfig, sizes: Sequence[int], state_len: int, work: Path,
                  negatives: Optional[int] = None, full_max: int = 1_000_000, budget_s: float = 15.0,
                  threads: int = 1, say=print) -> Dict[str, Any]:
    """Sampled (``negatives``, default the config's ``reward.num_negatives`` or 256) and full-catalog step
    times and peak memory per rank for each catalog size, on :data:`WORKERS` Ray Train workers."""
    import ray

    from mtrec_dist.runtime import resolve_use_gpu

    # one GPU per worker: with fewer GPUs than workers in the cluster the run stays on the CPU (gloo)
    use_gpu = resolve_use_gpu(base.train.use_gpu) and ray.cluster_resources().get("GPU", 0) >= WORKERS
    work = work.resolve()  # Ray Train wants an absolute storage path, and workers run in their own folders
    negatives = negatives or base.reward.num_negatives or DEFAULT_NEGATIVES
    runs = plan_runs(sizes, negatives, full_max)
    work.mkdir(parents=True, exist_ok=True)
    out = work / _RESULT
    out.unlink(missing_ok=True)
    run_worker_group(_catalog_worker, {"base": base, "runs": runs, "state_len": state_len, "budget_s": budget_s,
                                       "threads": threads, "use_gpu": use_gpu, "out": str(out)},
                     base, "bench-catalog", work / "ray", f"catalog step times on {WORKERS} workers", use_gpu=use_gpu)
    merged = [merge_ranks(ranks) for ranks in json.loads(out.read_text())]
    for r in merged:
        peaks = ", ".join(f"{k['peak_rss_mb']:,.0f}" for k in r["ranks"])
        say(f"[bench] catalog {r['items']:,} items, {r['soft_value']}: {r['step_s_median'] * 1e3:.1f} ms/step, "
            f"peak RSS per rank {peaks} MiB")
    sampled = [r for r in merged if r["soft_value"].startswith("sampled")]
    return {"runs": merged, "workers": WORKERS, "sharding": "row_wise", "device": "cuda" if use_gpu else "cpu",
            "ratios": {"sampled_speed_largest_vs_smallest": sampled[0]["step_s_median"] / sampled[-1]["step_s_median"],
                       "smallest": sampled[0]["items"], "largest": sampled[-1]["items"]}}
