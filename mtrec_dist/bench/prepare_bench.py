"""``prepare``: the library's ``prepare_dataset`` (Ray Data) vs the plain pandas/pyarrow script on the same
simulated logs, with identical output (transition rows and checksum) required for the ratio to count.

Both sides start warm: the logs are read once before timing (page cache) and Ray's workers have run a
task, so neither pays for a cold disk or for starting worker processes.  The plain script runs before
and after the library and the ratio uses the mean of its two times.
"""
from __future__ import annotations

import time
from typing import Any, Dict

import numpy as np

from mtrec_dist.config import PipelineConfig

from .checksum import summarize_transitions
from .plain_prepare import plain_prepare, read_logs
from .world import World, prepare_config


class OutputMismatch(AssertionError):
    """The baseline and the library computed different results: the timing would compare different work."""


def warm_up_ray(blocks: int = 2) -> None:
    """Run one small Ray Data job so worker processes exist before anything is timed."""
    import ray.data

    ray.data.range(1000, override_num_blocks=blocks).map_batches(lambda b: b).materialize()


def same_transitions(library: Dict[str, Any], plain: Dict[str, Any]) -> None:
    """Raise :class:`OutputMismatch` unless both datasets hold the same transitions."""
    if library["transitions"] != plain["transitions"] or library["checksum"] != plain["checksum"]:
        raise OutputMismatch(f"plain prepare wrote {plain['transitions']:,} transitions (checksum {plain['checksum']}), "
                             f"the library {library['transitions']:,} (checksum {library['checksum']})")


def bench_prepare(base: PipelineConfig, world: World, say=print) -> Dict[str, Any]:
    """Time both on ``world``'s logs (the library's output is the dataset the trainers then read)."""
    from mtrec_dist.data.prepare import prepare_dataset

    cfg = prepare_config(base)
    read_logs(world.logs)  # page cache
    warm_up_ray()
    plain_before = plain_prepare(cfg, world.logs, world.plain_prepared)
    t0 = time.perf_counter()
    manifest = prepare_dataset(cfg, str(world.logs), str(world.prepared), progress=lambda m: None)
    library_s = time.perf_counter() - t0
    plain_after = plain_prepare(cfg, world.logs, world.plain_prepared)
    check = {"library": summarize_transitions(world.prepared), "plain": summarize_transitions(world.plain_prepared)}
    same_transitions(check["library"], check["plain"])
    plain_s = float(np.mean([plain_before["total_s"], plain_after["total_s"]]))
    plain_rv_s = float(np.mean([p["seconds"]["read"] + p["seconds"]["validate"] for p in (plain_before, plain_after)]))
    say(f"[bench] prepare: {world.events:,} events, library {library_s:.2f}s, plain {plain_s:.2f}s, "
        f"same {check['library']['transitions']:,} transitions (checksum {check['library']['checksum']})")
    return {"events": world.events, "check": check,
            "library": {"wall_s": library_s, "events_per_s": world.events / library_s, "stages_s": manifest["seconds"],
                        "shuffle_partitions": manifest.get("shuffle_partitions")},
            "plain_before": plain_before, "plain_after": plain_after,
            "ratios": {"plain_s": plain_s, "library_vs_plain": plain_s / library_s, "plain_read_validate_s": plain_rv_s,
                       "read_validate_vs_plain": plain_rv_s / manifest["seconds"]["read_validate"]}}
