"""The simulated logs every stage of a benchmark run is measured on, cached in the work folder.

Simulating is not what is benchmarked, so a second run with the same sizes and simulator settings reuses
the logs (the key is stored beside them).  The prepared dataset the trainers read is the library's
``prepare`` output of those logs (:mod:`.prepare_bench` writes it; :func:`ensure_prepared` makes it when
the prepare comparison is skipped).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mtrec_dist.config import PipelineConfig, PrepareConfig, SimulatorConfig
from mtrec_dist.layout import RunLayout

from .sizes import BenchSizes

KEY_FILE = "world_key.json"


@dataclass(frozen=True)
class World:
    """Where one benchmark run's data lives."""

    work: Path
    logs: Path  # simulated event logs (day-partitioned Parquet)
    events: int

    @property
    def prepared(self) -> Path:
        """The library's prepared dataset (what every trainer reads): the work folder is laid out as a run's."""
        return Path(RunLayout(str(self.work)).prepared)

    @property
    def plain_prepared(self) -> Path:
        """The plain pandas/pyarrow prepare's output."""
        return self.work / "plain_prepared"


def simulator_config(base: PipelineConfig, sizes: BenchSizes) -> SimulatorConfig:
    """The config's simulator at the benchmark's size, without impressions: the single-process prepare it is
    timed against reads only the event logs, so the library's prepare must not read more."""
    return dataclasses.replace(base.simulator, num_users=sizes.users, num_items=sizes.items, days=sizes.days,
                               write_exposures=False, seed=sizes.seed)


def prepare_config(base: PipelineConfig) -> PrepareConfig:
    """The config's prepare settings (state length, session gap, limits) for a quiet overwrite run."""
    return dataclasses.replace(base.prepare, format="parquet", column_map={}, input="", output="", vocab_dir="",
                               overwrite=True, progress=False)


def simulate_world(base: PipelineConfig, sizes: BenchSizes, work: Path, say=print) -> World:
    """Simulated logs under ``<work>/sim`` for these sizes, reused when a previous run made the same ones."""
    from mtrec_dist.data.simulator import simulate_logs

    sim_cfg = simulator_config(base, sizes)
    key = dataclasses.asdict(sim_cfg)
    sim = Path(RunLayout(str(work)).sim)
    stamp = work / KEY_FILE
    summary_file = sim / "truth" / "summary.json"
    if stamp.exists() and json.loads(stamp.read_text()) == key and summary_file.exists():
        return World(work, sim / "logs", int(json.loads(summary_file.read_text())["events"]))
    for old in (sim, Path(RunLayout(str(work)).prepared), work / "plain_prepared"):  # made from other logs
        shutil.rmtree(old, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    summary = simulate_logs(sim_cfg, str(sim), progress=lambda m: None)
    say(f"[bench] simulated {summary['events']:,} events ({summary['users']:,} users, {sizes.items:,} items, "
        f"{sizes.days} day(s)) in {summary['seconds']:.1f}s")
    stamp.write_text(json.dumps(key))
    return World(work, sim / "logs", int(summary["events"]))


def ensure_prepared(base: PipelineConfig, world: World) -> dict:
    """The library's prepared dataset of the world's logs (made now, untimed, if missing); its manifest."""
    from mtrec_dist.data.dataset import load_manifest
    from mtrec_dist.data.prepare import prepare_dataset

    cfg = prepare_config(base)
    if (world.prepared / "manifest.json").exists():
        manifest = load_manifest(str(world.prepared))
        same = (manifest.get("rows_in") == world.events and manifest.get("state_len") == cfg.state_len
                and manifest.get("session_gap_s") == cfg.session_gap_s)
        if same:
            return manifest
    return prepare_dataset(cfg, str(world.logs), str(world.prepared), progress=lambda m: None)
