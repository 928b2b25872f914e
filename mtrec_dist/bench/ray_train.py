"""The library's own training entry points (``train_reward_model``, ``train_recommender``) run with N Ray
Train workers and timed from the driver, exactly as ``mtrec train-reward`` / ``train-rec`` run them.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Literal, Optional

from mtrec_dist.choices import CLICK_TRAINED
from mtrec_dist.config import PipelineConfig

from .sizes import BenchSizes, bench_config
from .steady import steady_state, time_breakdown

Model = Literal["qriql", "sasrec"]
MODELS = ("qriql", "sasrec")


def _train(model: Model, cfg: PipelineConfig, prepared: Path, out: Path) -> Dict[str, Any]:
    """One training run through the command's entry point; its summary."""
    from mtrec_dist.data.dataset import TRANSITIONS_DIR

    if model == "qriql":
        from mtrec_dist.training.reward import train_reward_model

        return train_reward_model(cfg, str(prepared), str(out), progress=False)
    from mtrec_dist.training.recommender import train_recommender

    # The click-trained SASRec reads only transition columns, so the prepared transitions serve as its
    # "scored" input: no reward model is needed to benchmark it.  skip_last: the plain loop's rows
    # (plain_train.load_transitions(drop_test_rows=True)).
    return train_recommender(cfg, str(prepared / TRANSITIONS_DIR), str(prepared), str(out), backbone="sasrec",
                             guidance=CLICK_TRAINED, progress=False, skip_last=True)


def run_library_training(model: Model, base: PipelineConfig, sizes: BenchSizes, prepared: Path, out: Path,
                         workers: int, feed: Optional[str] = None) -> Dict[str, Any]:
    """Train ``model`` for ``sizes.steps`` steps on ``workers`` workers, fed as ``feed`` says (default: the
    config's ``train.feed``, as a user runs it); steady-state figures, the feed it resolved to, the time
    breakdown, end-to-end samples/s (rows / wall time of the call) and the final checkpoint."""
    from mtrec_dist.training.loop import read_history

    shutil.rmtree(out, ignore_errors=True)
    cfg = bench_config(base, sizes, workers)
    if feed is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, feed=feed))
    t0 = time.time()
    summary = _train(model, cfg, prepared, out)
    t1 = time.time()
    history = read_history(str(out), summary["run_name"])
    end = next(e for e in history if e.get("event") == "end")
    start = next(e for e in history if e.get("event") == "start")
    breakdown = time_breakdown(history, t0, t1)
    return {"workers": workers, "feed": start.get("feed"), **steady_state(history, sizes.warmup_intervals),
            "rows": end["rows_seen"],
            "end_to_end_samples_per_s": end["rows_seen"] / breakdown["wall_s"], "breakdown": breakdown,
            "checkpoint": summary["checkpoint_path"]}
