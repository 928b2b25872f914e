"""Vocabularies and carry-over: what one prepare hands to the next (daily retraining).

* **Vocabulary** -- raw id <-> index maps of a prepared dataset (``vocab/items.parquet`` and
  ``vocab/users.parquet``: ``raw_id, idx, count``).  Items get indices ``1..num_items`` (0 is padding),
  users ``0..num_users-1``, both in raw-id order.  Extending an existing vocab keeps every old index and
  appends the unseen ids, so a model trained on yesterday's indices still reads today's data.  Raw ids
  are integers (int64 ``raw_id``; numpy int64 arrays) or, with ``prepare.id_type=string``, the strings
  the logs hold (string ``raw_id``; numpy object arrays of ``str``); one vocab never mixes the two.
* **Carry-over** -- each user's last ``state_len`` engaged items (raw ids) and their feedback after a
  day (``carry/users.parquet``), so that the next day's first states continue the user's history
  instead of starting from padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mtrec_dist.data.dataset import TRANSITIONS_DIR, VOCAB_DIR, AccountingError, list_array
from mtrec_dist.data.readers import InputError, display_path, join_path, resolve_filesystem

PAD_RAW = -1  # padding in integer raw-id state lists (raw ids are >= 0; string ids pad with null); index 0


def _raw_type(id_type: str) -> pa.DataType:
    return pa.string() if id_type == "string" else pa.int64()


def vocab_schema(id_type: str = "int") -> pa.Schema:
    return pa.schema([pa.field("raw_id", _raw_type(id_type), nullable=False),
                      pa.field("idx", pa.int64(), nullable=False), pa.field("count", pa.int64())])


VOCAB_SCHEMA = vocab_schema()


def as_raw_ids(ids) -> np.ndarray:
    """Raw ids as a vocab holds them: int64, or an object array of ``str`` for string ids."""
    if isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = ids.to_numpy(zero_copy_only=False) if isinstance(ids, pa.Array) else ids.to_numpy()
    a = np.asarray(ids)
    return a.astype(object) if a.dtype.kind in "OUS" else a.astype(np.int64)


def _id_type(raw: np.ndarray) -> str:
    return "string" if raw.dtype == object else "int"


# ---- vocabularies ------------------------------------------------------------------------------------
@dataclass
class Vocab:
    """Raw id <-> index maps.  ``item_raw[k]`` has index ``k + 1`` (0 = padding); ``user_raw[k]`` index k."""

    item_raw: np.ndarray
    user_raw: np.ndarray
    item_count: np.ndarray
    user_count: np.ndarray

    def __post_init__(self):
        self._item_order = np.argsort(self.item_raw, kind="stable")
        self._user_order = np.argsort(self.user_raw, kind="stable")
        for name, raw in (("item", self.item_raw), ("user", self.user_raw)):
            srt = np.sort(raw)
            if srt.size > 1 and (srt[1:] == srt[:-1]).any():
                raise ValueError(f"vocab: duplicate {name} raw ids")

    @property
    def id_type(self) -> str:
        """``"int"`` or ``"string"``: the kind of raw ids this vocab maps."""
        return _id_type(self.item_raw) if self.item_raw.size or not self.user_raw.size else _id_type(self.user_raw)

    @property
    def num_items(self) -> int:
        return int(self.item_raw.size)

    @property
    def num_users(self) -> int:
        return int(self.user_raw.size)

    @staticmethod
    def _lookup(raw_sorted_order: np.ndarray, raw: np.ndarray, ids: np.ndarray, base: int,
                unknown: int) -> np.ndarray:
        ids = np.asarray(ids, dtype=raw.dtype)
        if raw.size == 0:
            return np.full(ids.shape, unknown, dtype=np.int64)
        sorted_raw = raw[raw_sorted_order]
        pos = np.clip(np.searchsorted(sorted_raw, ids), 0, raw.size - 1)
        found = sorted_raw[pos] == ids
        return np.where(found, raw_sorted_order[pos] + base, unknown).astype(np.int64)

    def item_index(self, raw_ids, unknown: int = 0) -> np.ndarray:
        """Item indices (1-based) of raw ids; ``unknown`` (default 0 = padding) for ids not in the vocab."""
        return self._lookup(self._item_order, self.item_raw, raw_ids, 1, unknown)

    def user_index(self, raw_ids, unknown: int = -1) -> np.ndarray:
        return self._lookup(self._user_order, self.user_raw, raw_ids, 0, unknown)

    def item_raw_id(self, idx) -> np.ndarray:
        """Raw ids of item indices (index 0, the padding, maps to -1, or None for string ids)."""
        idx = np.asarray(idx, dtype=np.int64)
        pad = None if self.id_type == "string" else PAD_RAW
        return np.where(idx > 0, self.item_raw[np.clip(idx - 1, 0, max(self.num_items - 1, 0))], pad)

    def tables(self) -> tuple[pa.Table, pa.Table]:
        schema = vocab_schema(self.id_type)
        raw = schema.field("raw_id").type
        items = pa.Table.from_arrays([pa.array(self.item_raw, raw), pa.array(np.arange(1, self.num_items + 1)),
                                      pa.array(self.item_count)], schema=schema)
        users = pa.Table.from_arrays([pa.array(self.user_raw, raw), pa.array(np.arange(self.num_users)),
                                      pa.array(self.user_count)], schema=schema)
        return items, users

    def save(self, uri: str) -> None:
        fs, root = resolve_filesystem(uri)
        fs.create_dir(root, recursive=True)
        items, users = self.tables()
        for name, t in (("items.parquet", items), ("users.parquet", users)):
            with fs.open_output_stream(join_path(root, name)) as f:
                pq.write_table(t, f)


def extend_vocab(vocab: Optional[Vocab], item_ids, user_ids, item_counts=None, user_counts=None) -> Vocab:
    """A vocab holding every id of ``vocab`` at its old index plus the new ids appended in raw-id order.

    Counts of the result are those of this data (``item_counts`` aligned with ``item_ids``), 0 for
    ids only in the old vocab.  Integer and string ids never mix (:class:`InputError`).
    """
    item_ids, user_ids = as_raw_ids(item_ids), as_raw_ids(user_ids)
    id_type = _check_id_types(vocab, item_ids, user_ids)
    item_counts = np.ones(item_ids.size, np.int64) if item_counts is None else np.asarray(item_counts, np.int64)
    user_counts = np.ones(user_ids.size, np.int64) if user_counts is None else np.asarray(user_counts, np.int64)
    empty = np.zeros(0, object if id_type == "string" else np.int64)
    item_ids, user_ids = (ids if ids.size else empty for ids in (item_ids, user_ids))
    old_items = vocab.item_raw if vocab is not None else empty
    old_users = vocab.user_raw if vocab is not None else empty
    new_items = np.setdiff1d(item_ids, old_items)  # sorted, unique
    new_users = np.setdiff1d(user_ids, old_users)
    item_raw = np.concatenate([old_items, new_items])
    user_raw = np.concatenate([old_users, new_users])
    out = Vocab(item_raw, user_raw, np.zeros(item_raw.size, np.int64), np.zeros(user_raw.size, np.int64))
    np.add.at(out.item_count, out.item_index(item_ids) - 1, item_counts)
    np.add.at(out.user_count, out.user_index(user_ids), user_counts)
    return out


def _check_id_types(vocab: Optional[Vocab], *ids: np.ndarray) -> str:
    """The one id type of ``vocab`` and the non-empty ``ids``, or :class:`InputError` if they mix."""
    kinds = {_id_type(a) for a in ids if a.size}
    if vocab is not None and (vocab.num_items or vocab.num_users):
        kinds.add(vocab.id_type)
    if len(kinds) > 1:
        old = f"the vocab holds {'integer' if vocab is not None and vocab.id_type == 'int' else 'string'} ids"
        raise InputError(f"{old} and these ids mix in the other kind: keep prepare.id_type the same from day to day")
    return kinds.pop() if kinds else "int"


def _raw_column(t: pa.Table) -> np.ndarray:
    col = t.column("raw_id").combine_chunks()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.to_numpy(zero_copy_only=False).astype(object)
    return col.to_numpy().astype(np.int64)


def load_vocab(path: str) -> Vocab:
    """Load ``<path>/items.parquet`` and ``<path>/users.parquet`` (``path`` = a vocab dir or a dataset dir)."""
    fs, root = resolve_filesystem(path)
    if fs.get_file_info(join_path(root, VOCAB_DIR, "items.parquet")).type == pafs.FileType.File:
        root = join_path(root, VOCAB_DIR)
    tables = {}
    for name in ("items", "users"):
        p = join_path(root, f"{name}.parquet")
        try:
            with fs.open_input_file(p) as f:
                tables[name] = pq.read_table(f)
        except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
            raise InputError(f"vocab: cannot read {display_path(fs, p)} ({e})") from e
        missing = [c for c in ("raw_id", "idx") if c not in tables[name].column_names]
        if missing:
            raise InputError(f"vocab: {display_path(fs, p)} lacks column(s) {missing}")
    it = tables["items"].sort_by("idx")
    us = tables["users"].sort_by("idx")
    if not np.array_equal(it.column("idx").to_numpy(), np.arange(1, it.num_rows + 1)):
        raise InputError(f"vocab: item indices in {path} are not 1..{it.num_rows}")
    if not np.array_equal(us.column("idx").to_numpy(), np.arange(us.num_rows)):
        raise InputError(f"vocab: user indices in {path} are not 0..{us.num_rows - 1}")
    cnt = lambda t: (t.column("count").to_numpy() if "count" in t.column_names  # noqa: E731
                     else np.zeros(t.num_rows, np.int64))
    return Vocab(_raw_column(it), _raw_column(us), cnt(it), cnt(us))


def vocab_lookup(vocab: Vocab, keys=None) -> tuple:
    """What :func:`mtrec_dist.data.sessionize.index_transitions` needs: raw ids in sorted order and their
    indices (items, then users); small enough to broadcast to every task once.  ``keys``: the run's
    :class:`mtrec_dist.data.ids.IdKeys` for string ids (the per-user stage's rows hold their int64 keys)."""
    items = vocab.item_raw if keys is None else keys.item_keys(vocab.item_raw)
    users = vocab.user_raw if keys is None else keys.user_keys(vocab.user_raw)
    io_ = np.argsort(items, kind="stable")
    uo = np.argsort(users, kind="stable")
    return items[io_], (io_ + 1).astype(np.int64), users[uo], uo.astype(np.int64)


# ---- carry-over between daily inputs (daily retraining) ---------------------------------------------
CARRY_FILE = "users.parquet"


def carry_schema(id_type: str = "int") -> pa.Schema:
    raw = _raw_type(id_type)
    return pa.schema([
        pa.field("user_id", raw, nullable=False),  # raw user id
        pa.field("state_raw", pa.list_(raw)),  # the user's last state_len engaged items (raw ids), -1/null = padding
        pa.field("state_feedback", pa.list_(pa.float32())),  # their feedback (0 on padding)
        pa.field("last_ts", pa.int64()),  # ts of the user's last engaged event
    ])


CARRY_SCHEMA = carry_schema()


def _carry_id_type(t: pa.Table) -> str:
    typ = t.schema.field("user_id").type
    return "string" if pa.types.is_string(typ) or pa.types.is_large_string(typ) else "int"


def load_carry(path: str, state_len: int) -> pa.Table:
    """The carry-over table under ``path`` (a dir holding ``users.parquet``, or the file), sorted by user."""
    fs, root = resolve_filesystem(path)
    p = root if root.endswith(".parquet") else join_path(root, CARRY_FILE)
    try:
        with fs.open_input_file(p) as f:
            t = pq.read_table(f)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
        raise InputError(f"carry-over: cannot read {display_path(fs, p)} ({e})") from e
    missing = [c for c in CARRY_SCHEMA.names if c not in t.column_names]
    if missing:
        raise InputError(f"carry-over {display_path(fs, p)} lacks column(s) {missing}")
    t = t.select(CARRY_SCHEMA.names).cast(carry_schema(_carry_id_type(t))).sort_by("user_id")
    lens = pc.list_value_length(t.column("state_raw")).to_numpy(zero_copy_only=False)
    if t.num_rows and not (lens == state_len).all():
        raise InputError(f"carry-over {display_path(fs, p)} holds states of length {sorted(set(lens.tolist()))}, "
                         f"prepare.state_len is {state_len}")
    return t


def check_carry_items(carried: Optional[pa.Table], vocab: Optional[Vocab], carry_in: str, vocab_dir: str) -> None:
    """Refuse a carry-over whose items are not all in the vocab it will be indexed with."""
    if carried is None or not carried.num_rows:
        return
    if vocab is None:
        raise InputError(f"carry-over {carry_in} needs the vocab its items are in (vocab_dir)")
    if _carry_id_type(carried) != vocab.id_type:
        raise InputError(f"carry-over {carry_in} holds {_carry_id_type(carried)} ids, vocab {vocab_dir} "
                         f"{vocab.id_type} ids")
    c_items = as_raw_ids(pc.drop_null(pc.list_flatten(carried.column("state_raw"))))
    unknown = np.setdiff1d(c_items[c_items != PAD_RAW] if vocab.id_type == "int" else c_items, vocab.item_raw)
    if unknown.size:
        raise InputError(f"carry-over {carry_in} holds item ids missing from vocab {vocab_dir}: "
                         f"{unknown[:5].tolist()}")


def carry_arrays(t: pa.Table, state_len: int, keys=None) -> tuple:
    """(sorted raw user ids, items [n, L], feedback [n, L]) of a carry table (what annotate_users reads);
    string ids as their int64 keys of ``keys`` (:class:`mtrec_dist.data.ids.IdKeys`), padding -1."""
    n = t.num_rows
    flat = pc.list_flatten(t.column("state_raw"))
    fb = pc.list_flatten(t.column("state_feedback")).to_numpy().astype(np.float32).reshape(n, state_len)
    if keys is None:
        return t.column("user_id").to_numpy(), flat.to_numpy().reshape(n, state_len), fb
    return keys.user_keys(t.column("user_id")), keys.item_keys(flat).reshape(n, state_len), fb


def _last_transitions(prepared_dir: str) -> pa.Table:
    """Each user's last transition (``pos_from_end == 0``) of a prepared dataset: user, next state, ts."""
    import pyarrow.dataset as pads

    fs, root = resolve_filesystem(prepared_dir)
    tdir = join_path(root, TRANSITIONS_DIR)
    if fs.get_file_info(tdir).type == pafs.FileType.Directory:
        return pads.dataset(tdir, filesystem=fs, format="parquet").to_table(
            columns=["user_idx", "next_state_items", "next_state_feedback", "ts"],
            filter=pc.field("pos_from_end") == 0)
    return pa.table({"user_idx": pa.array([], pa.int64()), "next_state_items": pa.array([], pa.list_(pa.int64())),
                     "next_state_feedback": pa.array([], pa.list_(pa.float32())), "ts": pa.array([], pa.int64())})


def update_carry(previous: Optional[pa.Table], prepared_dir: str, vocab: Vocab, state_len: int) -> pa.Table:
    """Carry-over after a prepared dataset: each user's last transition's next state (in raw ids), plus the
    carried users of ``previous`` that this data did not see (unchanged)."""
    last = _last_transitions(prepared_dir)
    n = last.num_rows
    schema = carry_schema(vocab.id_type)
    raw_type = schema.field("user_id").type
    idx = pc.list_flatten(last.column("next_state_items")).to_numpy().reshape(n, state_len)
    raw = vocab.item_raw_id(idx)  # padding: -1, or None for string ids
    users = vocab.user_raw[last.column("user_idx").to_numpy()]
    today = pa.Table.from_arrays(
        [pa.array(users, raw_type), list_array(raw, state_len, raw_type),
         last.column("next_state_feedback").combine_chunks().cast(pa.list_(pa.float32())),
         last.column("ts").combine_chunks()], schema=schema)
    if np.unique(users).size != n:
        raise AccountingError("a user has more than one last transition (pos_from_end == 0)")
    if previous is not None and previous.num_rows:
        keep = pc.invert(pc.is_in(previous.column("user_id"), value_set=pa.array(users, raw_type)))
        today = pa.concat_tables([previous.filter(keep).cast(schema), today])
    return today.sort_by("user_id")


def save_carry(t: pa.Table, path: str) -> None:
    fs, root = resolve_filesystem(path)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(join_path(root, CARRY_FILE)) as f:
        pq.write_table(t.cast(carry_schema(_carry_id_type(t))), f)
