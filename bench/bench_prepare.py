"""Benchmark of `mtrec prepare` on simulated logs (>= 1M events by default).

Measures, in one run on the same files:
* a plain pyarrow read of the logs (``pyarrow.dataset(...).to_table()``, warm page cache) -- the baseline;
* the pipeline's read-and-validate stage (Ray Data: parse + row checks + materialise);
* the whole pipeline (read/validate, per-user shuffle + sessionize + windows, vocab, writes).
Prints events/s of each and the ratios to the pyarrow read as JSON (goal for later: read-and-validate
>= 0.5x the pyarrow read).  Ray worker start-up is excluded by a warm-up before timing.

    .venv/bin/python bench/bench_prepare.py [--events 1000000] [--work /tmp/mtrec-bench-prepare]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import pyarrow.dataset as pds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtrec_dist.config import PrepareConfig, SimulatorConfig  # noqa: E402
from mtrec_dist.data.prepare import prepare_dataset  # noqa: E402
from mtrec_dist.data.simulator import simulate_logs  # noqa: E402

EVENTS_PER_USER_DAY = 9.0  # of the default world; sizes the simulated population


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="at least this many simulated events")
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--work", default="/tmp/mtrec-bench-prepare", help="scratch directory (kept for reuse)")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--progress", action="store_true", help="show Ray Data progress bars")
    args = ap.parse_args()

    work = Path(args.work)
    sim_dir, out_dir = work / "sim", work / "prepared"
    users = math.ceil(args.events / (EVENTS_PER_USER_DAY * args.days) * 1.1)
    sim_cfg = SimulatorConfig(num_users=users, num_items=args.items, days=args.days, write_exposures=False,
                              chunk_users=20_000, seed=0)
    summary_file = sim_dir / "truth" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    if summary is None or summary["num_users"] != users or summary["num_items"] != args.items:
        shutil.rmtree(sim_dir, ignore_errors=True)
        t = time.time()
        summary = simulate_logs(sim_cfg, str(sim_dir))
        print(f"[bench] simulated {summary['events']:,} events in {time.time() - t:.1f}s", file=sys.stderr)
    events = summary["events"]
    if events < args.events:
        raise SystemExit(f"simulated only {events:,} events (< {args.events:,}); raise EVENTS_PER_USER_DAY margin")
    logs = sim_dir / "logs"
    files = sorted(logs.rglob("*.parquet"))

    def pyarrow_read() -> float:
        t = time.perf_counter()
        n = pds.dataset(str(logs), format="parquet").to_table().num_rows
        assert n == events
        return time.perf_counter() - t

    pyarrow_read()  # warm the page cache for both contenders
    pa_s = min(pyarrow_read() for _ in range(3))

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = args.progress
    ray.data.range(1000, override_num_blocks=args.num_cpus).map_batches(lambda b: b).materialize()  # warm-up

    cfg = PrepareConfig(overwrite=True, progress=args.progress)
    t = time.perf_counter()
    m = prepare_dataset(cfg, str(logs), str(out_dir), progress=lambda msg: print(msg, file=sys.stderr))
    total_s = time.perf_counter() - t
    rv_s = m["seconds"]["read_validate"]
    result = dict(
        events=events, files=len(files), bytes=sum(f.stat().st_size for f in files),
        users=summary["users"], items=args.items, days=args.days,
        pyarrow_read_s=round(pa_s, 3), pyarrow_events_per_s=round(events / pa_s),
        read_validate_s=rv_s, read_validate_events_per_s=round(events / rv_s),
        read_validate_vs_pyarrow=round(pa_s / rv_s, 3),
        pipeline_s=round(total_s, 3), pipeline_events_per_s=round(events / total_s),
        pipeline_vs_pyarrow=round(pa_s / total_s, 4),
        stages_s=m["seconds"], transitions=m["num_transitions"], rows_rejected=m["rows_rejected"],
        machine=dict(cpus=os.cpu_count(), ray_cpus=args.num_cpus, load_avg_1m=round(os.getloadavg()[0], 2),
                     python=platform.python_version()),
    )
    print(json.dumps(result, indent=2))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
