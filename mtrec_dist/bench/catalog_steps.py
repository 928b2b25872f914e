"""Step time against catalog size: the real ``QRIQLModel`` under TorchRec DMP with one in-process gloo
rank (forward, backward, fused sparse optimizer, target update; no Ray, no data pipeline) on synthetic
batches, with the sampled soft value (``reward.num_negatives``) and with the full-catalog one.

This isolates what the catalog costs a step: with sampled candidates the step should stay flat as the
table grows (issue 9: at most 1.3x from 10^4 to 10^7 items); the full-catalog soft value grows with it.
Moved here from the former ``bench/bench_train.py`` part (c); ``mtrec bench --catalog-sizes`` runs it.
"""
from __future__ import annotations

import dataclasses
import gc
import socket
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from mtrec_dist.config import PipelineConfig


def init_single_rank() -> None:
    """A one-rank gloo process group in this process (DMP needs one), once."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


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


def step_time(cfg: PipelineConfig, num_items: int, negatives: int, state_len: int, budget_s: float,
              min_steps: int = 3, max_steps: int = 200) -> Dict[str, Any]:
    """Median seconds per step over the steps that fit in ``budget_s`` (at least ``min_steps``) after one
    warm-up step."""
    from mtrec_dist.models.reward_model import QRIQLModel
    from mtrec_dist.training.sharding import shard_model

    init_single_rank()
    reward = dataclasses.replace(cfg.reward, num_negatives=negatives)
    torch.manual_seed(0)
    model = QRIQLModel(num_items, cfg.model, reward, state_len, device=torch.device("meta"))
    sharded = shard_model(model, dataclasses.replace(cfg.train, num_workers=1), torch.device("cpu"), 1, 1)
    dmp, opt = sharded.dmp, sharded.optimizer
    dmp.train()
    batches = [synthetic_batch(num_items, cfg.train.batch_size, state_len, seed=i) for i in range(4)]

    def one(i: int) -> float:
        t = time.perf_counter()
        out = dmp(batches[i % len(batches)])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sharded.call_hook("update_target")
        return time.perf_counter() - t

    warmup = one(0)
    times: List[float] = []
    t0 = time.perf_counter()
    while len(times) < max_steps and (len(times) < min_steps or time.perf_counter() - t0 < budget_s):
        times.append(one(len(times) + 1))
    del dmp, opt, sharded, model
    gc.collect()
    return {"items": num_items, "soft_value": f"sampled {negatives}" if negatives else "full catalog",
            "step_s_median": float(np.median(times)), "steps": len(times), "warmup_s": warmup}


DEFAULT_NEGATIVES = 256  # sampled candidates when the config uses the full catalog (reward.num_negatives 0)


def bench_catalog(base: PipelineConfig, sizes: Sequence[int], state_len: int, negatives: Optional[int] = None,
                  full_max: int = 1_000_000, budget_s: float = 15.0, say=print) -> Dict[str, Any]:
    """Sampled (``negatives``, default the config's ``reward.num_negatives`` or 256) and full-catalog step
    times for each catalog size (full catalog only up to ``full_max`` items: beyond that one step takes
    minutes on a CPU)."""
    negatives = negatives or base.reward.num_negatives or DEFAULT_NEGATIVES
    runs = []
    for n in sorted(sizes):
        for neg in (negatives, 0):
            if neg == 0 and n > full_max:
                continue
            runs.append(step_time(base, n, neg, state_len, budget_s))
            say(f"[bench] catalog {n:,} items, {runs[-1]['soft_value']}: {runs[-1]['step_s_median'] * 1e3:.1f} ms/step")
    sampled = [r for r in runs if r["soft_value"].startswith("sampled")]
    return {"runs": runs, "ratios": {"sampled_speed_largest_vs_smallest":
                                     sampled[0]["step_s_median"] / sampled[-1]["step_s_median"],
                                     "smallest": sampled[0]["items"], "largest": sampled[-1]["items"]}}
