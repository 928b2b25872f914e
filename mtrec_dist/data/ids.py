"""String ids (``prepare.id_type=string``) as int64 keys for the per-user stage, and back.

Real logs often key users and items by strings (UUIDs, ASINs, hashes).  The per-user stage sorts, groups
and searches ids with numpy, which is fast on int64 and slow (or unsupported) on text, so right after
read + validate the driver collects every distinct string id of the run (the accepted rows', the base
vocab's and the carry-over's), sorts them, and each id's *key* is its position in that sorted list.  Keys
keep equality and order, so the per-user stage and the indexing run unchanged on them; the vocab (built
in raw-id order, as for integers) and the rejects table turn keys back into the strings.  Nothing
downstream of prepare sees a key: transitions hold vocab indices, the vocab and the carry-over hold the
strings.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrec_dist.data.dataset import AccountingError, resolve_broadcast
# a null id (the padding of a carried state) keys as the integer padding, which sessionize tests for
from mtrec_dist.data.vocab import PAD_RAW



@dataclass
class IdKeys:
    """The sorted distinct string ids of one prepare run; an id's int64 key is its position."""

    users: pa.Array
    items: pa.Array

    @staticmethod
    def build(users: list, items: list) -> "IdKeys":
        """Keys for every id in ``users`` / ``items`` (lists of string arrays; nulls are ignored)."""
        return IdKeys(_sorted_unique(users), _sorted_unique(items))

    def user_keys(self, ids) -> np.ndarray:
        return _keys(self.users, ids, "user")

    def item_keys(self, ids) -> np.ndarray:
        return _keys(self.items, ids, "item")

    def user_text(self, keys) -> pa.Array:
        return _text(self.users, keys)

    def item_text(self, keys) -> pa.Array:
        return _text(self.items, keys)


def _sorted_unique(parts: list) -> pa.Array:
    arrays = [p.combine_chunks() if isinstance(p, pa.ChunkedArray) else pa.array(p, pa.string()) for p in parts]
    ids = pc.unique(pc.drop_null(pa.concat_arrays([a.cast(pa.string()) for a in arrays]) if arrays
                                 else pa.array([], pa.string())))
    return ids.take(pc.sort_indices(ids))


def _keys(table: pa.Array, ids, what: str) -> np.ndarray:
    """int64 keys of ``ids`` (``PAD_RAW`` for nulls); every non-null id must be in ``table``."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    elif not isinstance(ids, pa.Array):
        ids = pa.array(ids, pa.string())
    pos = pc.index_in(ids, value_set=table)
    unknown = pc.and_(pc.is_valid(ids), pc.is_null(pos))
    if pc.any(unknown).as_py():
        raise AccountingError(f"{what} id(s) {ids.filter(unknown)[:5].to_pylist()} missing from the run's id keys")
    return pc.fill_null(pos.cast(pa.int64()), PAD_RAW).to_numpy(zero_copy_only=False)


def _text(table: pa.Array, keys) -> pa.Array:
    """The string ids of ``keys`` (null for ``PAD_RAW``)."""
    keys = np.asarray(keys, dtype=np.int64)
    return table.take(pa.array(keys, mask=keys == PAD_RAW))


def intern_ids(batch: pa.Table, *, keys) -> pa.Table:
    """Ray Data UDF: ``batch`` with its string ``user_id`` / ``item_id`` columns replaced by their keys."""
    k = resolve_broadcast(keys)
    for name, to_keys in (("user_id", k.user_keys), ("item_id", k.item_keys)):
        i = batch.schema.get_field_index(name)
        batch = batch.set_column(i, pa.field(name, pa.int64(), nullable=False), pa.array(to_keys(batch.column(name))))
    return batch


def restore_ids(batch: pa.Table, *, keys) -> pa.Table:
    """Ray Data UDF (and helper): the inverse of :func:`intern_ids`."""
    k = resolve_broadcast(keys)
    for name, to_text in (("user_id", k.user_text), ("item_id", k.item_text)):
        i = batch.schema.get_field_index(name)
        batch = batch.set_column(i, pa.field(name, pa.string()), to_text(batch.column(name).to_numpy()))
    return batch
