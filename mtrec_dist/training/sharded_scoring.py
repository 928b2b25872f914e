"""`score-rewards` for catalogs no process should hold: each worker of a Ray Train group holds its rows of the
item table (sharded exactly as in training, :mod:`~mtrec_dist.training.sharded_inference`) and scores its
split of the rows with the same :class:`~mtrec_dist.training.scoring.TableScorer` as the scoring actors,
writing its own Parquet parts.

The policy baseline looks up one item set per batch (the catalog when it is at most
``train.score_full_catalog_max`` items, else ``train.score_candidates`` drawn items), so at scale only the
drawn rows travel: no rank materialises the table.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from mtrec_dist.config import TrainConfig


def _score_worker(config: Dict[str, Any]) -> None:
    """Ray Train worker: load this rank's rows of the table, score this rank's split, write its parts."""
    import pyarrow.parquet as pq
    import ray.train

    from mtrec_dist.data.input_files import resolve_filesystem
    from mtrec_dist.training.reward import reward_model_factory
    from mtrec_dist.training.scoring import TableScorer
    from mtrec_dist.training.sharded_inference import lockstep_tables, report, sharded_model
    from mtrec_dist.training.worker import worker_device

    cfg: TrainConfig = config["train_cfg"]
    rank = ray.train.get_context().get_world_rank()
    device = worker_device(config["use_gpu"])
    scorer_kwargs = config["scorer"]
    sharded = sharded_model(reward_model_factory(scorer_kwargs["spec"], for_inference=True), cfg,
                            config["checkpoint_path"], device)
    scorer = TableScorer(sharded.model, **dict(scorer_kwargs, seed=cfg.seed + rank), pad_to=cfg.score_batch_size,
                         device=device)
    fs, base = resolve_filesystem(config["out_dir"])
    rows = parts = 0
    for table in lockstep_tables(cfg.score_batch_size, cfg.prefetch_batches, device):
        if table is None:
            scorer.idle()  # the same collectives on no rows
            continue
        out = scorer(table)
        pq.write_table(out, f"{base}/part-r{rank:03d}-{parts:05d}.parquet", filesystem=fs)
        rows, parts = rows + out.num_rows, parts + 1
    report(config, rank, sharded, rows=rows, parts=parts)


def score_sharded(tc: TrainConfig, checkpoint_path: str, ds, out_dir: str, scorer_kwargs: Dict[str, Any],
                  expected_rows: Optional[int]) -> List[Dict[str, Any]]:
    """Score ``ds`` on ``tc.num_workers`` sharded workers into ``out_dir`` (a URI or absolute path); returns
    each rank's report.  ``expected_rows`` (when known) saves a count for the no-drop split."""
    from mtrec_dist.data.input_files import resolve_filesystem
    from mtrec_dist.training.sharded_inference import run_sharded

    fs, base = resolve_filesystem(out_dir)
    fs.create_dir(base, recursive=True)  # the workers write into it (Ray Data's writer creates it itself)
    return run_sharded(_score_worker, tc, ds, {"checkpoint_path": checkpoint_path, "out_dir": out_dir,
                                               "scorer": scorer_kwargs}, "score", expected_rows)
