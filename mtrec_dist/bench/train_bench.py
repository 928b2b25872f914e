"""One model's training throughput: the plain single-process loop vs the library on 1 and 2 Ray Train
workers, after checking that the plain model computes the library's loss on a batch.

The plain run goes once before and once after the Ray runs and the ratios use the mean of the two: the
load of a shared machine drifts during a run, and bracketing spreads that drift over both sides.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from mtrec_dist.choices import CLICK_TRAINED
from mtrec_dist.config import PipelineConfig

from .plain_models import check_same_loss, plain_copy
from .plain_train import iter_batches, load_transitions, train_plain
from .ray_train import Model, run_library_training
from .rounds import median_ratios
from .sizes import BenchSizes, bench_config, stage_of
from .steady import fed_runs, same_feed_one_worker


def library_model(model: Model, cfg: PipelineConfig, manifest: dict) -> nn.Module:
    """The unsharded library model (TorchRec table on CPU) exactly as training builds it."""
    if model == "qriql":
        from mtrec_dist.training.reward import model_spec, reward_model_factory

        return reward_model_factory(model_spec(cfg, manifest))(torch.device("cpu"))
    from mtrec_dist.training.recommender import rec_model_spec, recommender_factory

    return recommender_factory(rec_model_spec(cfg, manifest, "sasrec", CLICK_TRAINED))(torch.device("cpu"))


def _data(model: Model, prepared: Path, manifest: dict) -> Dict[str, torch.Tensor]:
    """The rows ``model`` trains on (the recommender leaves each user's test row out, as train-rec does)."""
    return load_transitions(prepared, manifest["state_len"], drop_test_rows=(model == "sasrec"))


def check_model(model: Model, base: PipelineConfig, sizes: BenchSizes, prepared: Path, manifest: dict) -> Dict[str, Any]:
    """Same loss on one training batch: library model vs its plain copy with the same weights."""
    cfg = bench_config(base, sizes)
    torch.manual_seed(sizes.seed)
    lib = library_model(model, cfg, manifest)
    batch = next(iter_batches(_data(model, prepared, manifest), cfg.stage_train(stage_of(model)).batch_size, sizes.seed))
    return check_same_loss(lib, plain_copy(lib), batch)


def plain_run(model: Model, base: PipelineConfig, sizes: BenchSizes, prepared: Path, manifest: dict,
              device: Optional[torch.device] = None) -> Dict[str, Any]:
    """The plain loop's run: read + build + ``sizes.steps`` steps, with ``sizes.threads`` torch threads."""
    cfg = bench_config(base, sizes)
    tc = cfg.stage_train(stage_of(model))
    threads = torch.get_num_threads()
    torch.set_num_threads(sizes.threads)
    try:
        t0 = time.perf_counter()
        data = _data(model, prepared, manifest)
        t_read = time.perf_counter()
        torch.manual_seed(sizes.seed)
        plain = plain_copy(library_model(model, cfg, manifest))
        t_build = time.perf_counter()
        res = train_plain(plain, data, steps=sizes.steps, batch_size=tc.batch_size, lr=tc.lr, sparse_lr=tc.sparse_lr,
                          warmup_steps=sizes.warmup_steps, seed=sizes.seed, device=device)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    res.update(read_s=round(t_read - t0, 3), build_s=round(t_build - t_read, 3), wall_s=wall,
               rows=sizes.steps * tc.batch_size, end_to_end_samples_per_s=sizes.steps * tc.batch_size / wall)
    return res


def bench_model(model: Model, base: PipelineConfig, sizes: BenchSizes, prepared: Path, manifest: dict, work: Path,
                workers: Sequence[int] = (1, 2), say=print, device: Optional[torch.device] = None,
                memory_feed: bool = True) -> Dict[str, Any]:
    """Check, then time ``sizes.rounds`` rounds of the runs (:func:`_timed_round`), one after another.  Returns the
    last round's runs (the scoring stage scores with its 1-worker checkpoint), every round's runs and ratios
    (``rounds``, when there are several) and each ratio's median over them (:func:`median_ratios`, key by key: the
    medians may come from different rounds)."""
    check = check_model(model, base, sizes, prepared, manifest)
    say(f"[bench] {model}: plain model's loss = library's ({check['plain_loss']:.6g}; max |diff| "
        f"{check['max_abs_diff']:.2g} over {check['terms_compared']} terms)")
    rounds = []
    for r in range(sizes.rounds):
        runs = _timed_round(model, base, sizes, prepared, manifest, work / f"round{r}" if r else work, workers, say,
                            device, memory_feed, f" (round {r + 1} of {sizes.rounds})" if sizes.rounds > 1 else "")
        rounds.append({"runs": runs, "ratios": training_ratios(runs)})
    out = {"check": check, "runs": rounds[-1]["runs"], "ratios": median_ratios([r["ratios"] for r in rounds])}
    if len(rounds) > 1:
        out["rounds"] = rounds
    return out


def _timed_round(model: Model, base: PipelineConfig, sizes: BenchSizes, prepared: Path, manifest: dict, work: Path,
                 workers: Sequence[int], say, device: Optional[torch.device], memory_feed: bool,
                 which: str) -> Dict[str, Any]:
    """Plain, 1 worker, the same worker fed the other way (streamed when ``train.feed`` resolved to memory,
    from memory when it resolved to streaming), 2 workers, plain again."""
    runs: Dict[str, Any] = {"plain_before": plain_run(model, base, sizes, prepared, manifest, device)}
    say(f"[bench] {model}{which}: plain {runs['plain_before']['samples_per_s']:,.0f} samples/s")
    for w in workers:
        runs[f"ray_{w}"] = run_library_training(model, base, sizes, prepared, work / f"train_{model}_w{w}", w)
        say(f"[bench] {model}{which}: Ray Train {w} worker(s) {runs[f'ray_{w}']['samples_per_s']:,.0f} samples/s "
            f"(train.feed {runs[f'ray_{w}']['feed']}; wall {runs[f'ray_{w}']['breakdown']['wall_s']:.1f}s)")
        if memory_feed and w == 1:  # right after: the same worker fed the other way, for streamed / from memory
            other = "stream" if runs["ray_1"]["feed"] == "memory" else "memory"
            runs[f"ray_1_{other}"] = run_library_training(model, base, sizes, prepared,
                                                          work / f"train_{model}_w1_{other}", 1, feed=other)
            say(f"[bench] {model}{which}: Ray Train 1 worker, train.feed {other}, "
                f"{runs[f'ray_1_{other}']['samples_per_s']:,.0f} samples/s")
    runs["plain_after"] = plain_run(model, base, sizes, prepared, manifest, device)
    say(f"[bench] {model}{which}: plain again {runs['plain_after']['samples_per_s']:,.0f} samples/s")
    return runs


def _mean(runs: Dict[str, Any], key: str) -> float:
    return float(np.mean([runs[k][key] for k in ("plain_before", "plain_after") if k in runs]))


def training_ratios(runs: Dict[str, Any]) -> Dict[str, float]:
    """``1 worker / plain``, ``2 workers / 1 worker`` (the 1-worker run fed as the 2 workers were) and
    ``streamed / fed from memory`` (1 worker), steady state, and the first two end to end (rows / wall time)."""
    out: Dict[str, float] = {"plain_samples_per_s": _mean(runs, "samples_per_s")}
    one, two = runs.get("ray_1"), runs.get("ray_2")
    if one:
        out["one_worker_vs_plain"] = one["samples_per_s"] / out["plain_samples_per_s"]
        out["one_worker_vs_plain_end_to_end"] = one["end_to_end_samples_per_s"] / _mean(runs, "end_to_end_samples_per_s")
    streamed, memory = fed_runs(runs)
    if streamed and memory:
        out["streaming_vs_memory"] = streamed["samples_per_s"] / memory["samples_per_s"]
    if one and two:  # feed for feed
        base = same_feed_one_worker(runs)
        out["two_workers_vs_one"] = two["samples_per_s"] / base["samples_per_s"]
        out["two_workers_vs_one_end_to_end"] = two["end_to_end_samples_per_s"] / base["end_to_end_samples_per_s"]
    return out
