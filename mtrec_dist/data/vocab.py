"""Vocabularies and carry-over: what one prepare hands to the next (daily retraining).

* **Vocabulary** -- raw id <-> index maps of a prepared dataset (``vocab/items.parquet`` and
  ``vocab/users.parquet``: ``raw_id, idx, count``).  Items get indices ``1..num_items`` (0 is padding),
  users ``0..num_users-1``, both in raw-id order.  Extending an existing vocab keeps every old index and
  appends the unseen ids, so a model trained on yesterday's indices still reads today's data.
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

VOCAB_SCHEMA = pa.schema([pa.field("raw_id", pa.int64(), nullable=False), pa.field("idx", pa.int64(), nullable=False),
                          pa.field("count", pa.int64())])
PAD_RAW = -1  # padding in raw-id state lists (raw ids are >= 0); becomes index 0


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
    def num_items(self) -> int:
        return int(self.item_raw.size)

    @property
    def num_users(self) -> int:
        return int(self.user_raw.size)

    @staticmethod
    def _lookup(raw_sorted_order: np.ndarray, raw: np.ndarray, ids: np.ndarray, base: int,
                unknown: int) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
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
        """Raw ids of item indices (index 0, the padding, maps to -1)."""
        idx = np.asarray(idx, dtype=np.int64)
        return np.where(idx > 0, self.item_raw[np.clip(idx - 1, 0, max(self.num_items - 1, 0))], -1)

    def tables(self) -> tuple[pa.Table, pa.Table]:
        items = pa.Table.from_arrays([pa.array(self.item_raw), pa.array(np.arange(1, self.num_items + 1)),
                                      pa.array(self.item_count)], schema=VOCAB_SCHEMA)
        users = pa.Table.from_arrays([pa.array(self.user_raw), pa.array(np.arange(self.num_users)),
                                      pa.array(self.user_count)], schema=VOCAB_SCHEMA)
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
    ids only in the old vocab.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    user_ids = np.asarray(user_ids, dtype=np.int64)
    item_counts = np.ones(item_ids.size, np.int64) if item_counts is None else np.asarray(item_counts, np.int64)
    user_counts = np.ones(user_ids.size, np.int64) if user_counts is None else np.asarray(user_counts, np.int64)
    old_items = vocab.item_raw if vocab is not None else np.zeros(0, np.int64)
    old_users = vocab.user_raw if vocab is not None else np.zeros(0, np.int64)
    new_items = np.setdiff1d(item_ids, old_items)  # sorted, unique
    new_users = np.setdiff1d(user_ids, old_users)
    item_raw = np.concatenate([old_items, new_items])
    user_raw = np.concatenate([old_users, new_users])
    out = Vocab(item_raw, user_raw, np.zeros(item_raw.size, np.int64), np.zeros(user_raw.size, np.int64))
    np.add.at(out.item_count, out.item_index(item_ids) - 1, item_counts)
    np.add.at(out.user_count, out.user_index(user_ids), user_counts)
    return out


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
    return Vocab(it.column("raw_id").to_numpy().astype(np.int64), us.column("raw_id").to_numpy().astype(np.int64),
                 cnt(it), cnt(us))


def vocab_lookup(vocab: Vocab) -> tuple:
    """What :func:`mtrec_dist.data.sessionize.index_transitions` needs: raw ids in sorted order and their
    indices (items, then users); small enough to broadcast to every task once."""
    io_ = np.argsort(vocab.item_raw, kind="stable")
    uo = np.argsort(vocab.user_raw, kind="stable")
    return vocab.item_raw[io_], (io_ + 1).astype(np.int64), vocab.user_raw[uo], uo.astype(np.int64)


# ---- carry-over between daily inputs (daily retraining) ---------------------------------------------
CARRY_FILE = "users.parquet"
CARRY_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False),  # raw user id
    pa.field("state_raw", pa.list_(pa.int64())),  # the user's last state_len engaged items (raw ids), -1 = padding
    pa.field("state_feedback", pa.list_(pa.float32())),  # their feedback (0 on padding)
    pa.field("last_ts", pa.int64()),  # ts of the user's last engaged event
])


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
    t = t.select(CARRY_SCHEMA.names).cast(CARRY_SCHEMA).sort_by("user_id")
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
    c_items = pc.list_flatten(carried.column("state_raw")).to_numpy()
    unknown = np.setdiff1d(c_items[c_items != PAD_RAW], vocab.item_raw)
    if unknown.size:
        raise InputError(f"carry-over {carry_in} holds item ids missing from vocab {vocab_dir}: "
                         f"{unknown[:5].tolist()}")


def carry_arrays(t: pa.Table, state_len: int) -> tuple:
    """(sorted raw user ids, items [n, L], feedback [n, L]) of a carry table (what annotate_users reads)."""
    n = t.num_rows
    items = pc.list_flatten(t.column("state_raw")).to_numpy().reshape(n, state_len)
    fb = pc.list_flatten(t.column("state_feedback")).to_numpy().astype(np.float32).reshape(n, state_len)
    return t.column("user_id").to_numpy(), items, fb


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
    idx = pc.list_flatten(last.column("next_state_items")).to_numpy().reshape(n, state_len)
    raw = np.where(idx > 0, vocab.item_raw_id(idx), PAD_RAW).astype(np.int64)
    users = vocab.user_raw[last.column("user_idx").to_numpy()]
    today = pa.Table.from_arrays(
        [pa.array(users, pa.int64()), list_array(raw, state_len, pa.int64()),
         last.column("next_state_feedback").combine_chunks().cast(pa.list_(pa.float32())),
         last.column("ts").combine_chunks()], schema=CARRY_SCHEMA)
    if np.unique(users).size != n:
        raise AccountingError("a user has more than one last transition (pos_from_end == 0)")
    if previous is not None and previous.num_rows:
        keep = pc.invert(pc.is_in(previous.column("user_id"), value_set=pa.array(users, pa.int64())))
        today = pa.concat_tables([previous.filter(keep).cast(CARRY_SCHEMA), today])
    return today.sort_by("user_id")


def save_carry(t: pa.Table, path: str) -> None:
    fs, root = resolve_filesystem(path)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(join_path(root, CARRY_FILE)) as f:
        pq.write_table(t.cast(CARRY_SCHEMA), f)
