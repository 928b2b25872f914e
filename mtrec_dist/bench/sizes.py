"""The benchmark's sizes (``--quick`` and the default, each field overridable by a flag) and the
training config every contender runs with.

Model, objective and optimiser settings come from the user's config (``--config`` / ``--set``), so the
benchmark measures what the pipeline would run; the benchmark only fixes the budget (steps) and turns off
what is not throughput (mid-run checkpoints), for the library and the baselines alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from mtrec_dist.config import PipelineConfig

NO_CHECKPOINTS = 10 ** 9  # train.checkpoint_every: only the final checkpoint (score-rewards needs one)
MANY_EPOCHS = 1000  # epochs never end a benchmark run: max_steps does


@dataclass(frozen=True)
class BenchSizes:
    """How big one benchmark run is."""

    users: int  # simulated users (about 12 engaged events per user and day)
    items: int  # simulated catalog
    days: int
    steps: int  # training steps of every contender (plain, 1 worker, 2 workers)
    report_every: int  # steps per metrics interval (the Ray runs' train.report_every; the plain run's too)
    warmup_intervals: int  # leading intervals left out of steady-state figures (start-up, first batches)
    threads: int = 1  # torch threads of the plain runs: one, like each Ray Train worker (OMP_NUM_THREADS=1)
    seed: int = 0
    rounds: int = 1  # rounds of each model's training runs, one after another; training ratios are their medians

    @property
    def warmup_steps(self) -> int:
        """Steps left out of the steady-state figures."""
        return self.report_every * self.warmup_intervals


QUICK = BenchSizes(users=2_000, items=5_000, days=2, steps=120, report_every=20, warmup_intervals=2)
DEFAULT = BenchSizes(users=12_000, items=20_000, days=2, steps=300, report_every=25, warmup_intervals=2)


def choose_sizes(quick: bool, **overrides) -> BenchSizes:
    """The preset (``--quick`` or the default) with the flags that were given (``None`` = keep)."""
    base = QUICK if quick else DEFAULT
    given = {k: v for k, v in overrides.items() if v is not None}
    sizes = dataclasses.replace(base, **given)
    for name in ("users", "items", "days", "steps", "report_every", "threads", "rounds"):
        if getattr(sizes, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(sizes, name)}")
    if sizes.warmup_steps >= sizes.steps:
        raise ValueError(f"--steps {sizes.steps} leaves no steady-state steps after {sizes.warmup_steps} warm-up "
                         f"steps ({sizes.warmup_intervals} intervals of {sizes.report_every})")
    return sizes


def bench_config(base: PipelineConfig, sizes: BenchSizes, workers: int = 1) -> PipelineConfig:
    """``base`` with the benchmark's budget for both training stages and ``workers`` Ray Train workers.

    The stage budgets (``reward_train`` / ``rec_train``) are set too, because they override ``train``: a
    config with its own budget would otherwise train a different number of steps than the baseline.  No user
    is held out (``eval.heldout_user_share`` 0): the plain loops train on every user's rows.
    """
    train = dataclasses.replace(base.train, num_workers=workers, max_steps=sizes.steps, epochs=MANY_EPOCHS,
                                report_every=sizes.report_every, checkpoint_every=NO_CHECKPOINTS,
                                seed=sizes.seed)
    budget = dict(max_steps=sizes.steps, epochs=MANY_EPOCHS)
    # every user trains, as in the plain loops (bench/plain_train.py), so both read the same rows
    return dataclasses.replace(base, train=train, eval=dataclasses.replace(base.eval, heldout_user_share=0.0),
                               reward_train=dataclasses.replace(base.reward_train, **budget),
                               rec_train=dataclasses.replace(base.rec_train, **budget))


def stage_of(model: str) -> Literal["reward", "rec"]:
    """The training stage (budget section) of a benchmarked model: QR-IQL's, or a recommender's for any other."""
    return "reward" if model == "qriql" else "rec"
