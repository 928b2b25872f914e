"""Row counts and an order-independent checksum of prepared transitions.

Two ``prepare`` implementations agree when they write the same transitions, whatever their shard layout
or row order: each row is hashed from its values (by default ``user_idx``, ``action``, the ``state_items``
list, ``done``, the return labels, the item duration and the slate id) and the row hashes are summed modulo 2^64, so the
checksum does not depend on the order rows come in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CHECKSUM_COLUMNS = ("user_idx", "action", "state_items", "done", "returned", "return_known", "action_log_duration",
                    "slate_id")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective scramble of uint64 values (neighbouring ids hash far apart)."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _as_words(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column as a ``[rows, width]`` uint64 array: ints as their two's complement, floats as their bits,
    list columns (fixed length, like states) one word per element."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(col)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        values = flat.reshape(n, -1) if n else flat.reshape(0, 0)
    else:
        values = col.to_numpy(zero_copy_only=False).reshape(n, 1)
    if values.dtype.kind == "f":
        values = values.astype(np.float64).view(np.uint64)
    return values.astype(np.int64).view(np.uint64) if values.dtype.kind != "u" else values.astype(np.uint64)


def transition_checksum(table: pa.Table, columns: Sequence[str] = CHECKSUM_COLUMNS) -> str:
    """Hex checksum of ``table``'s ``columns``: the sum over rows of a hash of the row's values."""
    h = np.zeros(table.num_rows, dtype=np.uint64)
    salt = np.uint64(0)
    with np.errstate(over="ignore"):
        for name in columns:
            words = _as_words(table.column(name))
            for j in range(words.shape[1]):
                salt += _GOLDEN
                h = _mix64(h ^ _mix64(words[:, j] + salt))
        total = int(h.sum(dtype=np.uint64)) if h.size else 0
    return f"{total:016x}"


def read_transitions_table(prepared_dir: str | Path, columns: Sequence[str] = CHECKSUM_COLUMNS) -> pa.Table:
    """The ``transitions/`` shards of a prepared dataset as one Arrow table (pyarrow, no Ray)."""
    import pyarrow.dataset as pads

    from mtrec_dist.data.dataset import TRANSITIONS_DIR

    ds = pads.dataset(str(Path(prepared_dir) / TRANSITIONS_DIR), format="parquet", ignore_prefixes=["_", "."])
    return ds.to_table(columns=list(columns))


def summarize_transitions(prepared_dir: str | Path, columns: Sequence[str] = CHECKSUM_COLUMNS) -> Dict[str, object]:
    """``{"transitions": rows, "checksum": hex, "columns": [...]}`` of a prepared dataset."""
    table = read_transitions_table(prepared_dir, columns)
    return {"transitions": table.num_rows, "checksum": transition_checksum(table, columns), "columns": list(columns)}
