"""How Ray Data shuffles hold whole users: the one rule prepare, the slates and the reward stage share."""
from __future__ import annotations

from mtrec_dist.config import PrepareConfig

# Ray Data's hash shuffle gathers its input into batches of up to 1 GiB before partitioning and compresses
# every shard with zstd.  At 10^7 events (0.7 GB) that is a single map task on one CPU, then zstd on every
# shard: 64 MiB batches give each CPU map work, and lz4 costs a fraction of zstd's CPU while still shrinking
# what crosses the network on a multi-node cluster (measured at 10^7 events on 2 cores: bench/RESULTS.md).
SHUFFLE_INPUT_BATCH_BYTES = 64 << 20
SHUFFLE_COMPRESSION = "lz4"


def whole_user_blocks(ds, user_column: str, rows: int, cfg: PrepareConfig):
    """``(ds repartitioned so that each block holds whole users, the number of blocks)``: a hash repartition
    on ``user_column`` into ``rows / rows_per_partition`` blocks (at most ``max_partitions``; the same
    guarantee groupby().map_groups() relies on), or one block for small inputs (no hash shuffle)."""
    parts = partitions_for(rows, cfg)
    if parts == 1:
        return ds.repartition(1), parts
    shuffled = ds.repartition(parts, keys=[user_column], sort=True)
    shuffled.context.shuffle_input_batch_bytes = SHUFFLE_INPUT_BATCH_BYTES
    shuffled.context.shuffle_compression = SHUFFLE_COMPRESSION
    return shuffled, parts


def partitions_for(rows: int, cfg: PrepareConfig) -> int:
    """How many blocks a shuffle of ``rows`` rows makes: ``rows / rows_per_partition``, 1 to ``max_partitions``."""
    return max(1, min(cfg.max_partitions, -(-rows // cfg.rows_per_partition)))
