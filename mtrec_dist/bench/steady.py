"""Steady-state throughput and where the time went, read from a training run's ``metrics.jsonl`` events.

The library's loop already measures itself per report interval (``samples_per_s``, ``step_time_s``,
``data_wait_frac``, reduced over ranks) and logs ``start`` (``worker_entered``, ``setup_s``) and ``end``
events; with the driver's wall clock around the call that is enough to split a run into start-up,
training and shutdown without touching the loop.
"""
from __future__ import annotations

from typing import Any, Dict, List


def metric_intervals(history: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The run's report intervals in order, each once (the final report can repeat the last interval)."""
    seen, out = set(), []
    for event in history:
        if event.get("event") == "metrics" and event.get("interval_rows", 0) > 0 and event["step"] not in seen:
            seen.add(event["step"])
            out.append(event)
    return out


def _interval_seconds(event: Dict[str, Any]) -> float:
    return event["interval_rows"] / event["samples_per_s"] if event["samples_per_s"] > 0 else 0.0


def steady_state(history: List[Dict[str, Any]], warmup_intervals: int) -> Dict[str, Any]:
    """Rows / seconds pooled over the intervals after the first ``warmup_intervals`` (all of them when the
    run had no more), the mean step time and data-wait share over the same intervals."""
    intervals = metric_intervals(history)
    if not intervals:
        raise ValueError("the run logged no metrics intervals")
    steps_before = [0] + [e["step"] for e in intervals[:-1]]
    pairs = list(zip(intervals, steps_before))
    pairs = pairs[warmup_intervals:] or pairs[-1:]
    rows = sum(e["interval_rows"] for e, _ in pairs)
    secs = sum(_interval_seconds(e) for e, _ in pairs)
    steps = sum(e["step"] - before for e, before in pairs)
    wait = sum(e["data_wait_frac"] * _interval_seconds(e) for e, _ in pairs)
    return {"samples_per_s": rows / secs, "step_time_s": secs / steps, "data_wait_frac": wait / secs,
            "steady_steps": steps, "final_loss": intervals[-1].get("loss")}


def time_breakdown(history: List[Dict[str, Any]], call_start: float, call_end: float) -> Dict[str, float]:
    """Where the driver's wall time went (seconds, from epoch timestamps):

    * ``launch_s``: call -> worker function entered (Ray Train controller, worker group, process group);
    * ``setup_s``: model build, TorchRec sharding plan and DMP wrap (the ``start`` event);
    * ``first_interval_s`` / ``first_data_wait_s``: the first report interval and its wait for batches
      (Ray Data planning and the pipeline filling);
    * ``train_s``: ``start`` -> the last interval (every step);
    * ``final_s``: the last interval -> ``end`` (the final checkpoint);
    * ``shutdown_s``: ``end`` -> the call returns (worker group teardown, result).
    """
    start = next(e for e in history if e.get("event") == "start")
    end = next(e for e in history if e.get("event") == "end")
    intervals = metric_intervals(history)
    first, last = intervals[0], intervals[-1]
    first_s = _interval_seconds(first)
    return {
        "wall_s": call_end - call_start,
        "launch_s": start["worker_entered"] - call_start,
        "setup_s": start["setup_s"],
        "first_interval_s": first_s,
        "first_data_wait_s": first["data_wait_frac"] * first_s,
        "train_s": last["time"] - start["time"],
        "final_s": end["time"] - last["time"],
        "shutdown_s": call_end - end["time"],
    }


def fed_runs(runs: Dict[str, Any]) -> tuple:
    """``(streamed, from memory)``: the two 1-worker runs of the same training (either may be missing)."""
    one = runs.get("ray_1") or {}
    streamed = one if one.get("feed", "stream") == "stream" else runs.get("ray_1_stream")
    memory = one if one.get("feed") == "memory" else runs.get("ray_1_memory")
    return streamed, memory


def same_feed_one_worker(runs: Dict[str, Any]) -> Dict[str, Any]:
    """The 1-worker run fed as the 2-worker run was (the default may stream one worker and hold two workers'
    shards): scaling is measured feed for feed; ``ray_1`` when the runs recorded no feed."""
    streamed, memory = fed_runs(runs)
    feed = (runs.get("ray_2") or {}).get("feed")
    return {"stream": streamed, "memory": memory}.get(feed) or runs.get("ray_1") or {}
