"""How Ray Data shuffles hold whole users: the one rule prepare, the slates and the reward stage share."""
from __future__ import annotations

from mtrec_dist.config import PrepareConfig


def whole_user_blocks(ds, user_column: str, rows: int, cfg: PrepareConfig):
    """``(ds repartitioned so that each block holds whole users, the number of blocks)``: a hash repartition
    on ``user_column`` into ``rows / rows_per_partition`` blocks (at most ``max_partitions``; the same
    guarantee groupby().map_groups() relies on), or one block for small inputs (no hash shuffle)."""
    parts = partitions_for(rows, cfg)
    return (ds.repartition(1) if parts == 1 else ds.repartition(parts, keys=[user_column], sort=True)), parts


def partitions_for(rows: int, cfg: PrepareConfig) -> int:
    """How many blocks a shuffle of ``rows`` rows makes: ``rows / rows_per_partition``, 1 to ``max_partitions``."""
    return max(1, min(cfg.max_partitions, -(-rows // cfg.rows_per_partition)))
