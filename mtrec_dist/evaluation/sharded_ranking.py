"""Full-catalog ranking of the test rows with the item table sharded as in training (issue 9): no process
holds the whole table; only the rows the states and candidates look up travel, and the catalog is scored where
it lies.

A recommender scores ``<h(s), e_a>``.  Each worker encodes its own rows (the state lookups are collectives),
then the ranks all-gather the user vectors ``h``, the targets and their scores, and each rank counts, on its
own rows of the table, the items that score at least as high as each target (the pessimistic tie rule of
:class:`~mtrec_dist.evaluation.offline.RankingScorer`: every *other* item scoring >= the target ranks above
it; the padding item never counts).  Summing the counts over ranks gives every row's full-catalog rank; a
chunk of ``chunk`` table rows at a time bounds the buffer.  The sampled protocol looks its negatives up like
the target.  Results equal the ranking actors' (:func:`~mtrec_dist.evaluation.offline.rank_test_rows`) up to
floating-point near-ties: the target's score and the catalog's are summed in different orders here.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import pyarrow as pa
import torch

RANK_BATCH = 256  # test rows per step and rank (as the ranking actors' batches)


def local_item_rows(dmp: torch.nn.Module) -> List[Tuple[int, torch.Tensor]]:
    """``(first row, weights [n, D])`` of each piece of the item table this rank holds (row-wise / table-wise)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    pieces = []
    for key, value in dmp.state_dict().items():
        if "item_table" in key and isinstance(value, ShardedTensor):
            width = value.size(1)
            for shard in value.local_shards():
                row, col = shard.metadata.shard_offsets
                if col != 0 or shard.tensor.shape[1] != width:
                    raise ValueError(f"{key}: ranking needs whole rows of the table on each rank (row-wise or "
                                     "table-wise sharding), not a column-wise shard")
                pieces.append((int(row), shard.tensor))
    return pieces


def count_at_least(h: torch.Tensor, target_score: torch.Tensor, target: torch.Tensor,
                   pieces: List[Tuple[int, torch.Tensor]], chunk: int) -> torch.Tensor:
    """Per row b, how many items of ``pieces`` other than ``target[b]`` (and never the padding row 0) score
    ``<h_b, e> >= target_score[b]``.  h [R, D], target_score / target [R] -> [R] int64."""
    counts = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
    for first, weights in pieces:
        for lo in range(0, weights.shape[0], chunk):
            block = weights[lo: lo + chunk]
            ids = torch.arange(first + lo, first + lo + block.shape[0], device=h.device)
            above = (h @ block.T) >= target_score.unsqueeze(1)
            above &= (ids != 0).unsqueeze(0) & (ids.unsqueeze(0) != target.unsqueeze(1))
            counts += above.sum(1)
    return counts


def _gathered(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _rank_worker(config: Dict[str, Any]) -> None:
    """Ray Train worker: rank this rank's test rows against the whole catalog, counting on its own rows."""
    import pyarrow.parquet as pq
    import ray
    import ray.train
    import torch.distributed as dist

    from mtrec_dist.data.pipeline import collate_transitions
    from mtrec_dist.evaluation.offline import sampled_negatives
    from mtrec_dist.data.input_files import resolve_filesystem
    from mtrec_dist.training.sharded_inference import lockstep_tables, report, sharded_model
    from mtrec_dist.training.worker import worker_device

    cfg = config["train_cfg"]
    rank = ray.train.get_context().get_world_rank()
    device = worker_device(config["use_gpu"])
    sharded = sharded_model(config["factory"], cfg, config["checkpoint_path"], device)
    model, pieces = sharded.model, local_item_rows(sharded.dmp)
    held = torch.tensor([sum(w.shape[0] for _, w in pieces)], device=device)
    dist.all_reduce(held)
    if int(held.item()) != config["num_items"] + 1:  # else some rows would never be counted: ranks look too good
        raise RuntimeError(f"the ranks hold {int(held.item()):,} rows of the item table, not {config['num_items'] + 1:,}")
    fs, base = resolve_filesystem(config["out_dir"])
    histories = ray.get(config["histories_ref"][0])
    L, K, B = config["state_len"], config["negatives"], RANK_BATCH
    written = 0
    for table in lockstep_tables(B, cfg.prefetch_batches, device):
        n = 0 if table is None else table.num_rows
        s = torch.zeros(B, L, dtype=torch.long)
        fb = torch.zeros(B, L)
        cand = torch.ones(B, 1 + K, dtype=torch.long)  # item 1: a valid index for the padding rows' lookups
        if n:
            t = collate_transitions(table.select(["state_items", "state_feedback"]), state_len=L)
            s[:n], fb[:n] = t["state_items"].long(), t["state_feedback"]
            action = table.column("action").to_numpy().astype(np.int64)
            users = table.column("user_idx").to_numpy() if "user_idx" in table.column_names else np.full(n, -1)
            cand[:n, 0] = torch.from_numpy(action)
            cand[:n, 1:] = torch.from_numpy(sampled_negatives(table.column("row_id").to_numpy(), s[:n].numpy(),
                                                              action, users, K, config["num_items"],
                                                              config["seed"], histories))
        with torch.no_grad():
            emb = model.item_embedding({"state": s.to(device), "candidates": cand.to(device)})
            h = model.encode(s.to(device), fb.to(device), emb["state"])
            cand_scores = torch.einsum("bd,bcd->bc", h, emb["candidates"])
            target_score = cand_scores[:, 0]
            rank_sampled = (cand_scores[:, 1:] >= target_score.unsqueeze(1)).sum(1)
            counts = count_at_least(_gathered(h), _gathered(target_score), _gathered(cand[:, 0].to(device)),
                                    pieces, config["chunk"])
            dist.all_reduce(counts)
        if n:
            mine = counts[rank * B: rank * B + n]
            pq.write_table(pa.table({"row_id": table.column("row_id"), "rank_full": mine.cpu().numpy(),
                                     "rank_sampled": rank_sampled[:n].cpu().numpy(),
                                     "score_target": target_score[:n].cpu().numpy()}),
                           f"{base}/part-r{rank:03d}-{written:05d}.parquet", filesystem=fs)
            written += 1
    report(config, rank, sharded, parts=written)


def rank_sharded(factory, checkpoint_path: str, ds, train_cfg, *, num_items: int, state_len: int,
                 sampled_negatives: int, seed: int, histories: Dict[int, np.ndarray],
                 chunk: int = 65_536) -> Tuple[pa.Table, List[Dict[str, Any]]]:
    """Rank the rows of ``ds`` (test transitions) on ``train_cfg.num_workers`` sharded workers;
    (ranked rows as :func:`~mtrec_dist.evaluation.offline.rank_test_rows` returns them, each rank's report).
    The ranked rows (the held-out users' rows) go through a :func:`~mtrec_dist.training.sharded_inference.scratch_dir`."""
    import pyarrow.dataset as pads
    import ray

    from mtrec_dist.data.input_files import resolve_filesystem
    from mtrec_dist.training.sharded_inference import run_sharded, scratch_dir

    tc = train_cfg
    with scratch_dir(tc, "ranked") as out_dir:
        config = {"factory": factory, "checkpoint_path": checkpoint_path, "out_dir": out_dir, "chunk": chunk,
                  "state_len": state_len, "num_items": num_items, "seed": seed,
                  "negatives": min(sampled_negatives, max(num_items - 1, 1)), "histories_ref": [ray.put(histories)]}
        reports = run_sharded(_rank_worker, tc, ds, config, "rank")
        fs, base = resolve_filesystem(out_dir)
        ranked = pads.dataset(base, filesystem=fs, format="parquet").to_table()
    return ranked, reports
