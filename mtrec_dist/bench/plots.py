"""The benchmark's scale curves as one figure (``<work>/bench_scale.png``): QR-IQL step time and peak memory per
rank against catalog size (``--catalog-sizes``), and prepare time against events (``--prepare-scale``), the
library next to the plain pandas/pyarrow script.  Drawn from the run's JSON result, so a saved result can be
plotted again (:func:`plot_scale`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import matplotlib

matplotlib.use("Agg")  # headless: the figure is written to a file
import matplotlib.pyplot as plt  # noqa: E402

SCALE_FIGURE = "bench_scale.png"


def _catalog_step_panel(ax, catalog: Dict[str, Any]) -> None:
    for soft_value in sorted({r["soft_value"] for r in catalog["runs"]}):
        runs = [r for r in catalog["runs"] if r["soft_value"] == soft_value]
        ax.plot([r["items"] for r in runs], [r["step_s_median"] * 1e3 for r in runs], marker="o", label=soft_value)
    ax.set(xscale="log", yscale="log", xlabel="items in the catalog", ylabel="ms per step",
           title=f"QR-IQL step, table row-wise over {catalog['workers']} workers ({catalog.get('device', 'cpu')})")
    ax.legend()


def _catalog_memory_panel(ax, catalog: Dict[str, Any]) -> None:
    sampled = [r for r in catalog["runs"] if r["soft_value"].startswith("sampled")]
    items = [r["items"] for r in sampled]
    gpu = catalog.get("device") == "cuda"  # on CUDA the shard lives in GPU memory: plot that peak
    key, what = ("peak_gpu_mb", "peak GPU memory") if gpu else ("peak_rss_mb", "peak RSS")
    for rank in range(catalog["workers"]):
        ax.plot(items, [r["ranks"][rank][key] for r in sampled], marker="o", label=f"rank {rank} {what}")
    ax.plot(items, [r["ranks"][0]["shard_mb"] for r in sampled], linestyle="--", color="grey",
            label="its shard's weights")
    ax.set(xscale="log", xlabel="items in the catalog", ylabel="MiB", title=f"{what} per rank (sampled soft value)")
    ax.legend()


def _prepare_panel(ax, runs: List[Dict[str, Any]]) -> None:
    events = [r["events"] for r in runs]
    ax.plot(events, [r["library"]["wall_s"] for r in runs], marker="o", label="library (Ray Data)")
    ax.plot(events, [r["ratios"]["plain_s"] for r in runs], marker="o", label="plain pandas+pyarrow")
    ax.set(xscale="log", yscale="log", xlabel="events", ylabel="seconds", title="prepare")
    ax.legend()


def plot_scale(result: Dict[str, Any], path: Path) -> Optional[Path]:
    """Draw every scale curve the result holds into ``path``; ``None`` (nothing written) when it holds none."""
    stages = result["stages"]
    panels: List[Callable[[Any], None]] = []
    catalog = stages.get("catalog", {})
    if catalog.get("runs"):
        panels += [lambda ax: _catalog_step_panel(ax, catalog), lambda ax: _catalog_memory_panel(ax, catalog)]
    prepare_runs = [r for r in stages.get("prepare_scale", {}).get("runs", []) if "error" not in r]
    if prepare_runs:
        panels.append(lambda ax: _prepare_panel(ax, prepare_runs))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for draw, ax in zip(panels, axes[0]):
        draw(ax)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{result['command']} ({result['started']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
