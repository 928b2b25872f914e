"""Splitting a dataset over Ray Train workers in equal shares without dropping the remainder rows that Ray
Train's default split truncates (our rule: no row is silently lost).  Its own module because it imports
Ray Train, which reading and scoring in one process (:mod:`mtrec_dist.data.pipeline`) never need.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
from ray.train import DataConfig

__all__ = ["NoDropDataConfig", "filler_rows"]


class NoDropDataConfig(DataConfig):
    """Ray Train DataConfig that splits every row to some worker, in equal shares.

    Ray Train's default ``streaming_split(equal=True)`` truncates the ``N mod world_size`` remainder rows,
    and ``equal=False`` hands out whole blocks (a small dataset read as one block feeds one worker only).
    Here the dataset is first topped up with ``(-N) mod world_size`` *filler rows* (``row_id = -1``, every
    other column null) so that the equal split has no remainder: each worker gets exactly
    ``ceil(N / world_size)`` rows, split at row granularity, and nothing real is dropped.
    :func:`~mtrec_dist.data.pipeline.iter_train_batches` discards the filler rows.  ``row_counts`` (dataset
    name -> rows, e.g. from :func:`~mtrec_dist.data.pipeline.count_transitions`, read from Parquet footers)
    saves a ``Dataset.count()``.  A dataset without a ``row_id`` column cannot carry filler rows and is split
    with ``equal=False`` instead.

    ``cache_rows``: a dataset of at most this many rows (as counted for the top-up; one without ``row_id``
    is never counted, so never cached) is materialised once into the object store, so that each epoch's
    split starts from cached blocks instead of reading and decoding the Parquet files again (Ray Data's
    advice for data that fits in memory); 0 never caches.  The read happens in ``configure`` (again after a
    worker-group restart).
    """

    def __init__(self, *args, row_counts: Optional[Dict[str, int]] = None, cache_rows: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._row_counts = dict(row_counts or {})
        self._cache_rows = int(cache_rows)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        counts = dict(self._row_counts)  # this call's datasets only: a count is never reused for another one
        output: List[Dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
        to_split = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        locality_hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if name in to_split:
                ds, equal = self._top_up(name, ds, world_size, counts)
                ds = self.cached(ds, counts.get(name, 0))
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=equal, locality_hints=locality_hints)):
                    output[i][name] = split
            else:
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i in range(world_size):
                    output[i][name] = ds.iterator()
        return output

    def cached(self, ds, rows: int):
        """``ds`` materialised in the object store when its ``rows`` (0 = not known) are at most ``cache_rows``."""
        return ds.materialize() if 0 < rows <= self._cache_rows else ds

    def _top_up(self, name: str, ds, world_size: int, counts: Dict[str, int]):
        import ray.data

        schema = ds.schema().base_schema
        if "row_id" not in schema.names:
            return ds, False
        if name not in counts:  # from the Parquet footers where the caller gave them, else counted once
            counts[name] = int(ds.count())
        missing = (-counts[name]) % world_size
        if missing == 0:
            return ds, True
        return ds.union(ray.data.from_arrow(filler_rows(schema, missing))), True


def filler_rows(schema: pa.Schema, n: int) -> pa.Table:
    """``n`` rows of ``schema`` with ``row_id = -1`` and every other column null (split padding)."""
    cols = [pa.array(np.full(n, -1), type=f.type) if f.name == "row_id" else pa.nulls(n, type=f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)
