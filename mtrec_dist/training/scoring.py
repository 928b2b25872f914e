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
  items drawn uniformly (the uniform proposal cancels in the self-normalised weights).  The guided
  recommender uses the advantage ``reward_mean - reward_baseline``.

Each scoring actor (``train.score_concurrency`` of them, ``train.score_cpus`` each) loads the model once
from the sharded checkpoint into a plain single-process model.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import torch

from mtrec_dist.config import PipelineConfig

SCORE_COLUMNS = ["reward_mean", "reward_cvar", "reward_q", "reward_baseline", "reward_cvar_baseline"]
PAIR_CANDIDATE = "candidate"
SUMMARY_FILE = "_scores.json"


class RewardScorer:
    """Ray Data ``map_batches`` callable: Arrow batch of states + candidates -> the same rows with scores."""

    def __init__(self, checkpoint_path: str, spec: Dict[str, Any], *, candidate_column: str = "action",
                 drop_columns: tuple = ("state_items", "state_feedback"), full_catalog_max: int = 50_000,
                 num_candidates: int = 1024, seed: int = 0, threads: int = 1) -> None:
        from mtrec_dist.training.checkpoint import load_unsharded_model
        from mtrec_dist.training.reward import reward_model_factory

        torch.set_num_threads(max(1, threads))
        self.spec = spec
        self.num_items = int(spec["num_items"])
        self.state_len = int(spec["state_len"])
        self.cvar_level = float(spec["reward"]["cvar_alpha"])
        self.alpha = float(spec["reward"]["alpha"])
        self.candidate_column = candidate_column
        self.drop_columns = set(drop_columns)
        self.full_catalog = self.num_items <= full_catalog_max
        self.num_candidates = num_candidates
        self.generator = torch.Generator().manual_seed(seed)
        self.model = load_unsharded_model(reward_model_factory(spec, for_inference=True), checkpoint_path)

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

    @torch.no_grad()
    def _baseline(self, states: torch.Tensor, feedback: torch.Tensor) -> Dict[str, torch.Tensor]:
        from mtrec_dist.objectives.qr_iql import cvar

        if self.full_catalog:
            out = self.model.catalog_reward_baseline(states, feedback)
            return {"reward_baseline": out["reward_baseline"], "reward_cvar_baseline": out["reward_cvar_baseline"]}
        m = min(self.num_candidates, self.num_items)
        cands = torch.randint(1, self.num_items + 1, (m,), generator=self.generator)
        scored = self.model.score(states, feedback, cands.expand(states.shape[0], m))
        pi = torch.softmax(scored["q"] / self.alpha, dim=1)  # self-normalised: the uniform q cancels
        rq = scored["reward_q"]
        return {"reward_baseline": (pi * rq.mean(-1)).sum(1),
                "reward_cvar_baseline": (pi * cvar(rq, self.cvar_level)).sum(1)}

    @torch.no_grad()
    def __call__(self, table: pa.Table) -> pa.Table:
        from mtrec_dist.objectives.qr_iql import cvar

        if self.candidate_column not in table.column_names:
            raise ValueError(f"input has no {self.candidate_column!r} column; found {table.column_names}")
        states = self._ids(table, "state_items", 0)
        feedback = self._feedback(table, states)
        cand = self._ids(table, self.candidate_column, 1)
        rq = self.model.reward_quantiles(states, feedback, cand.view(-1, 1))[:, 0]  # [B, N]
        rq, _ = torch.sort(rq, dim=-1)
        base = self._baseline(states, feedback)
        n_q = rq.shape[1]
        flat = pa.array(rq.reshape(-1).numpy().astype(np.float32))
        offsets = pa.array(np.arange(0, rq.shape[0] * n_q + 1, n_q, dtype=np.int32))
        keep = [c for c in table.column_names if c not in self.drop_columns]
        out = table.select(keep)
        for name, values in (("reward_mean", rq.mean(-1)), ("reward_cvar", cvar(rq, self.cvar_level)),
                             ("reward_q", None), ("reward_baseline", base["reward_baseline"]),
                             ("reward_cvar_baseline", base["reward_cvar_baseline"])):
            col = pa.ListArray.from_arrays(offsets, flat) if values is None else \
                pa.array(values.numpy().astype(np.float32))
            out = out.append_column(name, col)
        return out


def _prepare_out_dir(out_dir: str, overwrite: bool):
    import pyarrow.fs as pafs

    fs, base = (pafs.FileSystem.from_uri(out_dir) if "://" in out_dir else (pafs.LocalFileSystem(), out_dir))
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
    import ray.data

    from mtrec_dist.data.pipeline import count_transitions, read_transitions
    from mtrec_dist.runtime import init_ray
    from mtrec_dist.training.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(checkpoint_path)
    spec = meta.get("model_spec")
    if not spec:
        raise ValueError(f"{checkpoint_path}: checkpoint has no model_spec (not written by train-reward)")
    t0 = time.time()
    init_ray(cfg.ray_address)
    if pairs_path:
        ds = ray.data.read_parquet(pairs_path)
        names = ds.schema().names
        missing = [c for c in ("state_items", PAIR_CANDIDATE) if c not in names]
        if missing:
            raise ValueError(f"{pairs_path}: missing column(s) {missing}; need state_items, {PAIR_CANDIDATE} "
                             "[, state_feedback]")
        candidate, mode, expected = PAIR_CANDIDATE, "pairs", None
    else:
        if not prepared_dir:
            raise ValueError("score-rewards needs a prepared dataset (--prepared) or a pairs file (--pairs)")
        ds = read_transitions(prepared_dir)  # every training column passes through to the output
        candidate, mode, expected = "action", "transitions", count_transitions(prepared_dir)
    drop = ("state_items", "state_feedback") if mode == "pairs" else ()
    tc = cfg.train
    scored = ds.map_batches(
        RewardScorer,
        fn_constructor_kwargs={"checkpoint_path": checkpoint_path, "spec": spec, "candidate_column": candidate,
                               "full_catalog_max": tc.score_full_catalog_max, "num_candidates": tc.score_candidates,
                               "seed": tc.seed, "threads": max(1, int(tc.score_cpus)), "drop_columns": drop},
        batch_size=tc.score_batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=tc.score_concurrency),
        num_cpus=tc.score_cpus,
    )
    import pyarrow.dataset as pads

    out_dir = out_dir if "://" in out_dir else os.path.abspath(out_dir)
    fs, base = _prepare_out_dir(out_dir, overwrite)
    scored.write_parquet(out_dir)
    written = pads.dataset(base, filesystem=fs, format="parquet")
    rows = int(written.count_rows())
    if expected is not None and rows != expected:
        raise RuntimeError(f"scored {rows} rows but {prepared_dir} holds {expected} transitions")
    summary = {
        "mode": mode, "rows": rows, "out_dir": out_dir, "checkpoint": checkpoint_path, "step": meta.get("step"),
        "num_quantiles": int(spec["reward"]["num_quantiles"]), "cvar_alpha": float(spec["reward"]["cvar_alpha"]),
        "baseline": ("full_catalog" if spec["num_items"] <= tc.score_full_catalog_max
                     else f"sampled_{tc.score_candidates}"),
        "columns": written.schema.names, "seconds": round(time.time() - t0, 2),
    }
    summary["rows_per_s"] = round(rows / max(summary["seconds"], 1e-9), 1)
    with fs.open_output_stream(f"{base.rstrip('/')}/{SUMMARY_FILE}") as f:
        f.write(json.dumps(summary, indent=1).encode())
    return summary


def read_scores(out_dir: str) -> pa.Table:
    """All scored rows under ``out_dir`` as one Arrow table (small outputs; tests and reports)."""
    import pyarrow.dataset as pads

    return pads.dataset(out_dir, format="parquet", exclude_invalid_files=True,
                        ignore_prefixes=["_", "."]).to_table()
