"""What a training run writes about itself: rank 0's ``metrics.jsonl`` and TensorBoard files
(:class:`MetricsWriter`, read back by :func:`read_history`) and the row-weighted interval statistics that
go into them (:class:`IntervalStats`), reduced over ranks.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_history(output_dir: str, run_name: Optional[str] = None) -> List[Dict[str, Any]]:
    """Events of ``<output_dir>/metrics.jsonl`` (optionally of one run)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if run_name is None or e.get("run") == run_name]


class MetricsWriter:
    """Rank 0's JSON-lines and TensorBoard output (no-op on other ranks)."""

    def __init__(self, output_dir: str, run_name: str, enabled: bool) -> None:
        self.enabled = enabled
        self.run_name = run_name
        self.tb = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            self.path = os.path.join(output_dir, METRICS_FILE)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=os.path.join(output_dir, TENSORBOARD_DIR, run_name))

    def event(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": kind, "run": self.run_name, "time": time.time(), **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def metrics(self, metrics: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.event("metrics", **metrics)
        step = int(metrics["step"])
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class IntervalStats:
    """Row-weighted sums of a model's scalar outputs over a report interval, reduced over ranks."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.rows = 0.0
        self.steps = 0
        self.data_s = 0.0
        self.compute_s = 0.0
        self.start = time.perf_counter()

    def add(self, out: Dict[str, torch.Tensor], real_rows: torch.Tensor) -> None:
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                w = v.detach().float().reshape(()) * real_rows
                self.sums[k] = self.sums[k] + w if k in self.sums else w

    def reduce(self, device: torch.device, world_size: int) -> Dict[str, float]:
        import torch.distributed as dist

        keys = sorted(self.sums)
        if world_size > 1:
            all_keys: List[Any] = [None] * world_size
            dist.all_gather_object(all_keys, keys)
            if any(k != keys for k in all_keys):
                raise RuntimeError(f"ranks returned different loss/diagnostic keys: {all_keys}")
        elapsed = time.perf_counter() - self.start
        vec = torch.stack([self.sums[k] for k in keys] + [torch.tensor(float(self.rows), device=device)]) \
            if keys else torch.tensor([float(self.rows)], device=device)
        vec = vec.to(device=device, dtype=torch.float64)
        timing = torch.tensor([elapsed, self.data_s, self.compute_s], dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(vec)
            dist.all_reduce(timing, op=dist.ReduceOp.MAX)
        rows = float(vec[-1])
        out = {k: float(vec[i]) / max(rows, 1.0) for i, k in enumerate(keys)}
        elapsed = float(timing[0])
        out["samples_per_s"] = rows / elapsed if elapsed > 0 else 0.0
        out["step_time_s"] = elapsed / max(self.steps, 1)
        out["data_wait_frac"] = float(timing[1]) / elapsed if elapsed > 0 else 0.0
        out["interval_rows"] = rows
        return out
