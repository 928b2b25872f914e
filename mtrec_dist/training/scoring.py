"""`mtrec score-rewards`: a Ray Data batch job that scores (state, item) pairs with a trained reward model.

Two modes:

* **transitions** (default): every logged transition of a prepared dataset, the candidate being the
  logged action; the output keeps every training column of the transition next to its scores (a
  "scored transitions" dataset that guided recommender training reads directly, no join needed);
* **pairs**: any Parquet of ``state_items`` (list<int64>, length = the model's state length),
  optional ``state_feedback`` (list<float>; default 1.0 on real items, 0 on padding, as ``prepare`` does
  for sources without feedback) and ``candidate`` (int64 item index); every other column passes through.

Output columns (besides the key / pass-through columns):

* ``reward_q``: the N reward quantiles ``R_i(s, a)`` (list<float32>), sorted ascending (monotone
  rearrangement: independently trained quantile heads can cross);
* ``reward_mean``: their mean; ``reward_cvar``: lower-tail CVaR at ``reward.cvar_alpha``;
* ``reward_baseline`` = ``E_{a'~pi(.|s)} R_mean(s, a')`` and ``reward_cvar_baseline`` = ``E_pi CVaR(s, a')``
  under the model's soft policy ``pi ∝ exp(Q/alpha)``: exact over the catalog when it has at most
  ``train.score_full_catalog_max`` items, else a self-normalised estimate over ``train.score_candidates``
  items drawn uniformly (the uniform proposal cancels in the self-normalised weights).  Over a set larger
  than ``train.score_cvar_draws`` items the CVaR baseline adds to the mean baseline an estimate of
  ``E_pi[CVaR - R_mean]`` from that many draws of ``pi`` (QRIQLModel.reward_baseline_over).  The guided
  recommender uses the advantage ``reward_mean - reward_baseline``.

Three runners (``train.score_runner``; :func:`score_runner` resolves ``auto``): scoring actors
(``train.score_concurrency`` of them, ``train.score_cpus`` each), each loading the whole model once from the
sharded checkpoint into a plain single-process model; for a catalog no process should hold, the training
worker group with the item table sharded exactly as in training (:mod:`~mtrec_dist.training.sharded_scoring`);
and for a small job, this process (``local``: the rows read with pyarrow, scored and written here, with no
actor or read task to start).  All score a batch with the same :class:`TableScorer`.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import torch

from mtrec_dist.config import PipelineConfig, TrainConfig

SCORE_COLUMNS = ["reward_mean", "reward_cvar", "reward_q", "reward_baseline", "reward_cvar_baseline"]
PAIR_CANDIDATE = "candidate"
SUMMARY_FILE = "_scores.json"


class TableScorer:
    """Scores an Arrow batch of states + candidates with a reward model: the same rows back, with scores.

    ``model`` is a plain :class:`QRIQLModel` (the scoring actors) or one whose item table is sharded in place
    under DMP (:mod:`~mtrec_dist.training.sharded_scoring`); there every call is a collective, so
    ``pad_to`` pads each call to a fixed row count on every rank (a rank with no rows left still calls).
    Inputs go to ``device`` (the model's); scores come back on the CPU.  The sampled baseline's items are
    drawn from a generator seeded once per scorer, so two runners (or worker counts) draw different items.
    """

    def __init__(self, model: torch.nn.Module, spec: Dict[str, Any], *, candidate_column: str = "action",
                 drop_columns: tuple = ("state_items", "state_feedback"), full_catalog_max: int = 50_000,
                 num_candidates: int = 1024, cvar_draws: int = 256, seed: int = 0, pad_to: Optional[int] = None,
                 device: Optional[torch.device] = None) -> None:
        self.model = model
        self.device = device or torch.device("cpu")
        self.spec = spec
        self.num_items = int(spec["num_items"])
        self.state_len = int(spec["state_len"])
        self.cvar_level = float(spec["reward"]["cvar_alpha"])
        self.candidate_column = candidate_column
        self.drop_columns = set(drop_columns)
        self.full_catalog, self.num_candidates = baseline_set(self.num_items, full_catalog_max, num_candidates)
        self.cvar_draws = cvar_draws
        self.generator = torch.Generator().manual_seed(seed)
        self.pad_to = pad_to

    def _ids(self, table: pa.Table, name: str, low: int) -> torch.Tensor:
        from mtrec_dist.data.pipeline import collate_transitions

        t = collate_transitions(table.select([name]), state_len=self.state_len if name == "state_items" else None)[name]
        bad = (t < low) | (t > self.num_items)
        if bad.any():
            row = int(bad.reshape(t.shape[0], -1).any(1).nonzero()[0])
            raise ValueError(f"column {name!r}: value {int(t[bad][0])} in row {row} is not an item index in "
                             f"[{low}, {self.num_items}] of this reward model")
        return t.long()

    def _feedback(self, table: pa.Table, states: torch.Tensor) -> torch.Tensor:
        from mtrec_dist.data.pipeline import collate_transitions

        if "state_feedback" not in table.column_names:
            return (states != 0).float()
        return collate_transitions(table.select(["state_feedback"]), state_len=self.state_len)["state_feedback"]

    def _baseline_items(self) -> torch.Tensor:
        """The whole catalog (exact baseline), or ``score_candidates`` items drawn uniformly (self-normalised)."""
        if self.full_catalog:
            return torch.arange(1, self.num_items + 1)
        return torch.randint(1, self.num_items + 1, (self.num_candidates,), generator=self.generator)

    def _padded(self, states: torch.Tensor, feedback: torch.Tensor, cand: torch.Tensor):
        n = states.shape[0]
        extra = (self.pad_to or n) - n
        if extra <= 0:
            return states, feedback, cand
        return (torch.cat([states, states.new_zeros(extra, self.state_len)]),
                torch.cat([feedback, feedback.new_zeros(extra, self.state_len)]),
                torch.cat([cand, cand.new_ones(extra)]))  # item 1: a valid index for the lookup

    @torch.no_grad()
    def score(self, states: torch.Tensor, feedback: torch.Tensor, cand: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Scores of ``n`` rows ([n] each; ``reward_q`` [n, N] sorted ascending): one lookup, same on every rank."""
        from mtrec_dist.objectives.qr_iql import cvar

        n = states.shape[0]
        states, feedback, cand = (t.to(self.device) for t in self._padded(states, feedback, cand))
        base = self.model.reward_baseline_over(states, feedback, self._baseline_items().to(self.device),
                                               candidate_items=cand.view(-1, 1), cvar_draws=self.cvar_draws)
        rq, _ = torch.sort(base["reward_q"][:n, 0], dim=-1)  # monotone rearrangement: quantile heads can cross
        out = {"reward_q": rq, "reward_mean": rq.mean(-1), "reward_cvar": cvar(rq, self.cvar_level),
               "reward_baseline": base["reward_baseline"][:n], "reward_cvar_baseline": base["reward_cvar_baseline"][:n]}
        return {k: v.cpu() for k, v in out.items()}

    def idle(self) -> None:
        """The same collectives as :meth:`score` with no rows (a sharded rank whose split has run out)."""
        empty = torch.zeros(0, self.state_len, dtype=torch.long)
        self.score(empty, empty.float(), torch.zeros(0, dtype=torch.long))

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.candidate_column not in table.column_names:
            raise ValueError(f"input has no {self.candidate_column!r} column; found {table.column_names}")
        states = self._ids(table, "state_items", 0)
        scores = self.score(states, self._feedback(table, states), self._ids(table, self.candidate_column, 1))
        rq = scores["reward_q"]
        n_q = rq.shape[1]
        flat = pa.array(rq.reshape(-1).numpy().astype(np.float32))
        offsets = pa.array(np.arange(0, rq.shape[0] * n_q + 1, n_q, dtype=np.int32))
        out = table.select([c for c in table.column_names if c not in self.drop_columns])
        for name in SCORE_COLUMNS:
            col = pa.ListArray.from_arrays(offsets, flat) if name == "reward_q" else \
                pa.array(scores[name].numpy().astype(np.float32))
            out = out.append_column(name, col)
        return out


class RewardScorer(TableScorer):
    """Ray Data ``map_batches`` callable: each scoring actor loads the whole model once, unsharded."""

    def __init__(self, checkpoint_path: str, spec: Dict[str, Any], *, threads: int = 1, malloc_trim_mb: int = 0,
                 **kwargs) -> None:
        from mtrec_dist.training.checkpoint import load_for_inference_actor
        from mtrec_dist.training.reward import reward_model_factory

        model = load_for_inference_actor(reward_model_factory(spec, for_inference=True), checkpoint_path,
                                         threads=threads, malloc_trim_mb=malloc_trim_mb)
        super().__init__(model, spec, **kwargs)


MAX_BATCHES_PER_BLOCK = 64  # a block of a large day stays a few MiB: Ray Data keeps streaming it


def rows_per_actor_block(rows: int, tc: TrainConfig) -> int:
    """Rows per block for ``train.score_concurrency`` actors: about 4 blocks per actor (so a slow one does not
    hold the rest up), whole scoring batches, at least one and at most :data:`MAX_BATCHES_PER_BLOCK`."""
    batches = math.ceil(rows / (4 * tc.score_concurrency * tc.score_batch_size))
    return min(max(1, batches), MAX_BATCHES_PER_BLOCK) * tc.score_batch_size


def baseline_set(num_items: int, full_catalog_max: int, num_candidates: int) -> tuple:
    """``(full_catalog, set_size)``: the policy baselines run over the whole catalog when it has at most
    ``full_catalog_max`` items, else over ``num_candidates`` items drawn uniformly (at most the catalog's size)."""
    full = num_items <= full_catalog_max
    return full, (num_items if full else min(num_candidates, num_items))


def baseline_kind(spec: Dict[str, Any], tc: TrainConfig) -> str:
    """Over which items the policy baselines run: ``full_catalog`` or ``sampled_<score_candidates>``."""
    full, _ = baseline_set(spec["num_items"], tc.score_full_catalog_max, tc.score_candidates)
    return "full_catalog" if full else f"sampled_{tc.score_candidates}"


def cvar_baseline_kind(spec: Dict[str, Any], tc: TrainConfig) -> str:
    """How the CVaR baseline is computed over that set: ``exact`` or ``policy_draws_<K>``
    (:meth:`~mtrec_dist.models.reward_model.QRIQLModel.reward_baseline_over`)."""
    from mtrec_dist.models.reward_model import draws_cvar_baseline

    _, size = baseline_set(spec["num_items"], tc.score_full_catalog_max, tc.score_candidates)
    return f"policy_draws_{tc.score_cvar_draws}" if draws_cvar_baseline(tc.score_cvar_draws, size) else "exact"


def rows_mb(rows: int, embedding_dim: int) -> float:
    """MiB of ``rows`` float32 rows of an item table."""
    return int(rows) * int(embedding_dim) * 4 / 2**20


def table_mb(spec: Dict[str, Any]) -> float:
    """MiB of the model's float32 item table (padding row included)."""
    return rows_mb(int(spec["num_items"]) + 1, spec["model"]["embedding_dim"])


def score_runner(tc, spec: Dict[str, Any], rows: Optional[int] = None) -> str:
    """``train.score_runner``, with ``auto`` resolved: sharded when the item table is over
    ``train.score_unsharded_max_mb`` (each scoring actor would hold all of it) and there are >= 2 workers;
    else local when the table is not over it and the ``rows`` to score or rank (None = not known) are small
    enough for the driver (:func:`~mtrec_dist.training.loop.fits_driver`); else actors."""
    from mtrec_dist.training.loop import fits_driver

    if tc.score_runner != "auto":
        return tc.score_runner
    big_table = table_mb(spec) > tc.score_unsharded_max_mb
    if big_table and tc.num_workers >= 2:
        return "sharded"
    small = not big_table and rows is not None and fits_driver(tc, rows, int(spec["state_len"]))
    return "local" if small else "actors"


def score_locally(table: pa.Table, checkpoint_path: str, scorer_kwargs: Dict[str, Any], threads: int,
                  batch_size: int, fs, base: str) -> float:
    """Score ``table`` in this process, ``batch_size`` rows at a time with ``threads`` torch threads (restored
    after), and write the scored rows to ``base`` on ``fs`` as one Parquet file; the seconds spent scoring."""
    import pyarrow.parquet as pq

    from mtrec_dist.runtime import torch_threads
    from mtrec_dist.training.checkpoint import load_unsharded_model
    from mtrec_dist.training.reward import reward_model_factory

    with torch_threads(threads):
        model = load_unsharded_model(reward_model_factory(scorer_kwargs["spec"], for_inference=True), checkpoint_path)
        scorer = TableScorer(model, **scorer_kwargs)
        t0 = time.perf_counter()
        scored = [scorer(table.slice(start, batch_size)) for start in range(0, table.num_rows, batch_size)]
        seconds = time.perf_counter() - t0
    fs.create_dir(base, recursive=True)
    if scored:
        pq.write_table(pa.concat_tables(scored), f"{base.rstrip('/')}/part-00000.parquet", filesystem=fs)
    return seconds


def _prepare_out_dir(out_dir: str, overwrite: bool):
    import pyarrow.fs as pafs

    from mtrec_dist.data.input_files import resolve_filesystem

    fs, base = resolve_filesystem(out_dir)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        raise ValueError(f"output {out_dir} is a file, not a directory")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(base)):
        if not overwrite:
            raise ValueError(f"output directory {out_dir} is not empty; pass --overwrite to replace it")
        fs.delete_dir_contents(base)
    return fs, base


def score_rewards(cfg: PipelineConfig, checkpoint_path: str, prepared_dir: Optional[str], out_dir: str, *,
                  pairs_path: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Score every transition of ``prepared_dir`` (or the rows of ``pairs_path``) and write Parquet to
    ``out_dir``; returns a summary (also written to ``<out_dir>/_scores.json``).  A non-empty ``out_dir``
    is refused unless ``overwrite``."""
    from mtrec_dist.data.pipeline import count_transitions
    from mtrec_dist.training.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(checkpoint_path)
    spec = meta.get("model_spec")
    if not spec:
        raise ValueError(f"{checkpoint_path}: checkpoint has no model_spec (not written by train-reward)")
    t0 = time.time()
    pairs = _pairs_files(pairs_path) if pairs_path else None
    if pairs is not None:
        candidate, mode, expected = PAIR_CANDIDATE, "pairs", int(pairs.count_rows())  # Parquet footers only
    else:
        if not prepared_dir:
            raise ValueError("score-rewards needs a prepared dataset (--prepared) or a pairs file (--pairs)")
        candidate, mode, expected = "action", "transitions", count_transitions(prepared_dir)
    drop = ("state_items", "state_feedback") if mode == "pairs" else ()
    tc = cfg.train
    scorer_kwargs = {"spec": spec, "candidate_column": candidate, "drop_columns": drop, "seed": tc.seed,
                     "full_catalog_max": tc.score_full_catalog_max, "num_candidates": tc.score_candidates,
                     "cvar_draws": tc.score_cvar_draws}
    runner = score_runner(tc, spec, expected)
    out_dir = out_dir if "://" in out_dir else os.path.abspath(out_dir)
    fs, base = _prepare_out_dir(out_dir, overwrite)
    ranks, scoring_s = None, None
    if runner == "local":  # every training column of a transition passes through to the output
        from mtrec_dist.data.pipeline import read_transitions_table

        table = pairs.to_table() if pairs is not None else read_transitions_table(prepared_dir)
        scoring_s = score_locally(table, checkpoint_path, scorer_kwargs, round(tc.score_concurrency * tc.score_cpus),
                                  tc.score_batch_size, fs, base)
    else:
        ds = _ray_source(cfg, prepared_dir, pairs_path)
        if runner == "sharded":
            from mtrec_dist.training.sharded_scoring import score_sharded

            ranks = score_sharded(tc, checkpoint_path, ds, out_dir, scorer_kwargs, expected)
        else:
            scoring_s = _score_with_actors(tc, ds, checkpoint_path, scorer_kwargs, expected, out_dir)
    import pyarrow.dataset as pads

    written = pads.dataset(base, filesystem=fs, format="parquet")
    rows = int(written.count_rows())
    if rows != expected:
        raise RuntimeError(f"scored {rows} rows but {pairs_path or prepared_dir} holds {expected}")
    summary = {
        "mode": mode, "rows": rows, "out_dir": out_dir, "checkpoint": checkpoint_path, "step": meta.get("step"),
        "num_quantiles": int(spec["reward"]["num_quantiles"]), "cvar_alpha": float(spec["reward"]["cvar_alpha"]),
        "baseline": baseline_kind(spec, tc), "cvar_baseline": cvar_baseline_kind(spec, tc),
        "columns": written.schema.names, "seconds": round(time.time() - t0, 2), "runner": runner,
    }
    if ranks is not None:
        summary["ranks"] = ranks  # per worker: rows scored, its shard of the item table, peak RSS
    summary["rows_per_s"] = round(rows / max(summary["seconds"], 1e-9), 1)
    # seconds in scoring batches (start-up, model load, reading and writing excluded), summed over the actors,
    # or this process's with the local runner (the keys keep their first name: bench records read them)
    if scoring_s:
        summary["scoring_actor_s"] = round(scoring_s, 3)
        summary["rows_per_actor_s"] = round(rows / scoring_s, 1)
    with fs.open_output_stream(f"{base.rstrip('/')}/{SUMMARY_FILE}") as f:
        f.write(json.dumps(summary, indent=1).encode())
    return summary


def _pairs_files(pairs_path: str):
    """The pairs Parquet as a pyarrow dataset, its required columns checked (footers only)."""
    import pyarrow.dataset as pads

    from mtrec_dist.data.input_files import resolve_filesystem

    fs, path = resolve_filesystem(pairs_path)
    files = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")  # as Ray's read_parquet
    missing = [c for c in ("state_items", PAIR_CANDIDATE) if c not in files.schema.names]
    if missing:
        raise ValueError(f"{pairs_path}: missing column(s) {missing}; need state_items, {PAIR_CANDIDATE} "
                         "[, state_feedback]")
    return files


def _ray_source(cfg: PipelineConfig, prepared_dir: Optional[str], pairs_path: Optional[str]):
    """The rows to score as a Ray Dataset (transitions: training columns only)."""
    import ray.data

    from mtrec_dist.data.pipeline import read_transitions
    from mtrec_dist.runtime import init_ray

    init_ray(cfg.ray_address)
    return ray.data.read_parquet(pairs_path) if pairs_path else read_transitions(prepared_dir)


def _score_with_actors(tc: TrainConfig, ds, checkpoint_path: str, scorer_kwargs: Dict[str, Any], rows: int,
                       out_dir: str) -> Optional[float]:
    """Score ``ds`` with ``train.score_concurrency`` Ray Data actors and write it to ``out_dir``; their
    actor-seconds in scoring batches (None where Ray Data's stats lack them)."""
    import ray.data

    if tc.score_concurrency > 1:  # a prepared day is often one file, i.e. one block: one actor would get it all
        ds = ds.repartition(target_num_rows_per_block=rows_per_actor_block(rows, tc))
    scored = ds.map_batches(
        RewardScorer, fn_constructor_kwargs=dict(scorer_kwargs, checkpoint_path=checkpoint_path,
                                                 threads=max(1, int(tc.score_cpus)),
                                                 malloc_trim_mb=tc.malloc_trim_mb),
        batch_size=tc.score_batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=tc.score_concurrency), num_cpus=tc.score_cpus,
    )
    scored.write_parquet(out_dir)
    return operator_seconds(scored, RewardScorer.__name__)


def operator_seconds(ds, udf_name: str) -> Optional[float]:
    """Seconds the blocks of ``ds``'s ``MapBatches(<udf_name>)`` operator took in all, summed over its tasks
    or actors, i.e. actor-seconds (Ray Data's execution stats, read after ``ds`` ran); None, with a warning,
    when the stats do not have it."""
    try:
        pending = [ds.get_stats_summary()]
    except Exception:  # a developer API: a scoring run never fails for want of its timing
        return None
    while pending:
        summary = pending.pop()
        for op in summary.operators_stats:
            # "in": Ray may fuse the read into the map ("ReadParquet->MapBatches(...)"); its time then counts too
            if f"MapBatches({udf_name})" in op.operator_name and op.wall_time is not None:
                return float(op.wall_time.sum)
        pending.extend(summary.parents)
    warnings.warn(f"Ray Data's stats have no MapBatches({udf_name}) operator: scoring time not reported")
    return None


def read_scores(out_dir: str) -> pa.Table:
    """All scored rows under ``out_dir`` as one Arrow table (small outputs; tests and reports)."""
    import pyarrow.dataset as pads

    return pads.dataset(out_dir, format="parquet", exclude_invalid_files=True,
                        ignore_prefixes=["_", "."]).to_table()
