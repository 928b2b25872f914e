"""Prepare's per-user stage: per-user rejects, sessions and state windows; then indexing for the writes.

:func:`annotate_users` runs on blocks that hold whole users (the driver hash-partitions by ``user_id``)
and is vectorised over all users of a block:

* ``duplicate_event`` -- same user, item and ts; the first in input order is kept;
* ``ts_out_of_order`` -- ts earlier than an earlier-in-file event of the same user and ``session_id``;
* engaged events (``click == 1`` or ``click`` null: logs that record only consumption) become actions;
  rows with ``click == 0`` are valid but are not transitions;
* sessions are cut between consecutive engaged events of a user when the gap exceeds ``session_gap_s``
  or when both carry a ``session_id`` and it changes; ``done = 1`` on a session's last transition and
  on the user's last;
* the state is the user's last ``state_len`` engaged items across sessions, left-padded (with the
  carried-over items of earlier days where there are some); ``state_feedback`` is their watch ratio
  (1.0 where the source has none, 0 for padding); ``pos_from_end`` counts back from the user's last
  transition (0 = last); ``row_id`` = the user's base offset + the position in the user's sequence;
* the consequences QR-IQL v2 reads: ``returned`` / ``return_known`` at session ends
  (:func:`session_returns`: did the user come back within ``return_window_s``, and does the log run long
  enough to tell) and ``action_log_duration``, the item's observable length (:func:`item_log_duration`).

The transition fields stay in *raw* ids until the vocabulary of the accepted rows is known;
:func:`index_transitions` then maps them to indices and builds the ``transitions/`` and ``eval/`` rows
(``slate_id`` is the event's own, ``NO_SLATE`` where it has none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrec_dist.data.dataset import EVAL_SCHEMA, TRANSITION_SCHEMA, AccountingError, list_array
from mtrec_dist.data.dataset import resolve_broadcast as _get
from mtrec_dist.data.readers import RAW_LINE_COLUMN, REASON_COLUMN
from mtrec_dist.data.schema import NO_SLATE, TRANSITION_COLUMNS
from mtrec_dist.data.validate import ORDER_COLUMN
from mtrec_dist.data.vocab import PAD_RAW


def segment_starts(*keys: np.ndarray) -> np.ndarray:
    """Bool mask: row k starts a new run of equal keys (keys already sorted)."""
    n = keys[0].size
    start = np.ones(n, dtype=bool)
    if n > 1:
        same = np.ones(n - 1, dtype=bool)
        for k in keys:
            same &= k[1:] == k[:-1]
        start[1:] = ~same
    return start


def find_ids(sorted_raw: np.ndarray, ids: np.ndarray, what: str, values: np.ndarray, pad=None) -> np.ndarray:
    """``values[k]`` where ``sorted_raw[k] == ids``; every id must be present (they come from the same rows),
    except ``pad`` (the padding of state lists, not a raw id), which maps to 0."""
    if ids.size == 0:
        return np.zeros(0, dtype=values.dtype)
    keys = sorted_raw if pad is None else np.append(sorted_raw, pad)
    pos = _direct_positions(keys, ids)
    if pos is None:
        pos = np.clip(np.searchsorted(sorted_raw, ids), 0, max(sorted_raw.size - 1, 0))
        pos[sorted_raw[pos] != ids] = -1
        if pad is not None:
            pos[ids == pad] = sorted_raw.size
    if (pos < 0).any():
        raise AccountingError(f"{what} raw id(s) {ids[pos < 0][:5].tolist()} missing from the map built from the same rows")
    return (values if pad is None else np.append(values, np.zeros(1, values.dtype)))[pos]


def _direct_positions(keys: np.ndarray, ids: np.ndarray) -> Optional[np.ndarray]:
    """Position of each id in ``keys`` (-1 where absent) through a direct-address table, or None where the
    ids are not integers in a compact range.  Why: indexing the states is 10 lookups per transition, and
    a binary search over the catalog took a quarter of the write stage at 10^7 events."""
    if keys.size == 0 or keys.dtype.kind != "i" or ids.dtype.kind != "i":  # signed: offsets stay int64
        return None
    lo = int(keys.min())
    span = int(keys.max()) - lo + 1
    if span > max(4 * keys.size, 1 << 16):
        return None
    table = np.full(span, -1, dtype=np.int64)
    table[keys - lo] = np.arange(keys.size)
    offset = ids.astype(np.int64, copy=False) - lo
    if offset.min() >= 0 and offset.max() < span:  # the usual case: every id inside the table
        return table[offset]
    inside = (offset >= 0) & (offset < span)
    return np.where(inside, table[np.where(inside, offset, 0)], -1)


def sort_rows(order: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Rows sorted by ``keys`` (the last key first), ties broken by ``order`` (distinct values: the input
    order): ``np.lexsort((order, *keys))``, about 7x faster where it can be.  One argsort by ``order``, then
    one stable argsort of the keys packed into a single int64 (each as its offset from its minimum).  Why:
    the lexsorts were half the per-user stage.  Keys that are not signed integers, or whose ranges do not
    fit in 63 bits together, fall back to ``np.lexsort``."""
    if order.size == 0 or not keys or any(k.dtype.kind != "i" for k in keys):  # signed: packs as int64
        return np.lexsort((order, *keys))
    lows = [int(k.min()) for k in keys]
    bits = [(int(k.max()) - lo).bit_length() for k, lo in zip(keys, lows)]
    if sum(bits) > 63:
        return np.lexsort((order, *keys))
    p = np.argsort(order)  # distinct values: any sort is the stable one
    packed = np.zeros(order.size, dtype=np.int64)
    shift = 0
    for k, lo, b in zip(keys, lows, bits):
        packed |= (k[p].astype(np.int64) - lo) << shift
        shift += b
    return p[np.argsort(packed, kind="stable")]


# ---- per-user rejects ------------------------------------------------------------------------------
def _duplicates(u: np.ndarray, it: np.ndarray, ts: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Bool mask of ``duplicate_event`` rows: same (user, item, ts) as an earlier row in input order."""
    p = sort_rows(order, ts, it, u)
    dup = np.zeros(u.size, dtype=bool)
    dup[p] = ~segment_starts(u[p], it[p], ts[p])
    return dup


def _out_of_order(u, ts, order, sid, sid_null, skip: np.ndarray) -> np.ndarray:
    """Bool mask of ``ts_out_of_order`` rows: ts earlier than an earlier-in-file event of the same
    (user, session_id); rows without a session id and ``skip`` rows are never flagged."""
    ooo = np.zeros(u.size, dtype=bool)
    cand = np.flatnonzero(~sid_null & ~skip)
    if cand.size:
        q = cand[sort_rows(order[cand], sid[cand], u[cand])]
        starts = segment_starts(u[q], sid[q])
        seg = np.cumsum(starts) - 1
        big = np.int64(1) << 36  # ts < 2^33 (max_ts); segment ids stay below 2^26 per block
        running = np.maximum.accumulate(ts[q] + seg * big) - seg * big  # cummax within each segment
        prev_max = np.concatenate([[np.iinfo(np.int64).min], running[:-1]])
        prev_max[starts] = np.iinfo(np.int64).min
        ooo[q] = ts[q] < prev_max
    return ooo


# ---- timelines of engaged events, sessions and windows -------------------------------------------------
@dataclass
class Timeline:
    """A block's engaged events, sorted by (user, ts, input order): ``rows`` indexes the block."""

    rows: np.ndarray  # block row of each event
    users: np.ndarray  # raw user id of each event
    k: np.ndarray  # position in the user's sequence (0 = first)
    done: np.ndarray  # int8: 1 on a session's last event and on the user's last
    pos_from_end: np.ndarray  # int32: 0 = the user's last event


def _timeline(engaged: np.ndarray, u, user_rank, ts, order, sid, sid_null, session_gap_s: int) -> Timeline:
    """Order the engaged events per user and cut them into sessions (gap or session id change);
    ``user_rank`` orders the users as ``u`` does, in a compact range."""
    e = np.flatnonzero(engaged)
    e = e[sort_rows(order[e], ts[e], user_rank[e])]
    m = e.size
    eu, ets = u[e], ts[e]
    new_user = segment_starts(eu)
    if m == 0:
        return Timeline(e, eu, np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int32))
    user_first = np.maximum.accumulate(np.where(new_user, np.arange(m), 0))
    k = np.arange(m) - user_first
    last_of_user = np.ones(m, dtype=bool)
    last_of_user[:-1] = new_user[1:]
    gap_cut = np.ones(m, dtype=bool)
    if m > 1:
        esid, esnull = sid[e], sid_null[e]
        sid_change = ~esnull[1:] & ~esnull[:-1] & (esid[1:] != esid[:-1])
        gap_cut[:-1] = (ets[1:] - ets[:-1] > session_gap_s) | sid_change
    user_of = np.cumsum(new_user) - 1
    user_len = np.bincount(user_of, minlength=int(new_user.sum()))
    pos_from_end = (user_len[user_of] - 1 - k).astype(np.int32)
    return Timeline(e, eu, k, (last_of_user | gap_cut).astype(np.int8), pos_from_end)


def _windows(tl: Timeline, action: np.ndarray, fb: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """States (raw item ids, PAD_RAW-padded, [m, L]) and their feedback: the user's previous L actions."""
    m, k = tl.k.size, tl.k
    state = np.full((m, L), PAD_RAW, dtype=np.int64)
    state_fb = np.zeros((m, L), dtype=np.float32)
    for j in range(1, L + 1):
        src = np.flatnonzero(k >= j)
        state[src, L - j] = action[src - j]
        state_fb[src, L - j] = fb[src - j]
    return state, state_fb


def _apply_carry(tl: Timeline, state: np.ndarray, state_fb: np.ndarray, carry, L: int) -> None:
    """Fill the padding of the first states of carried users from their carried last L items (in place).

    History before the first event of this input = the carried items: the item j steps back from
    event k (k < j) is carried item ``L - (j - k)``."""
    if not tl.k.size:
        return
    c_users, c_items, c_fb = _get(carry)
    if c_items.shape[1] != L:
        raise ValueError(f"carry-over state has {c_items.shape[1]} items per user, state_len is {L}")
    if not c_users.size:
        return
    k = tl.k
    pos = np.clip(np.searchsorted(c_users, tl.users), 0, c_users.size - 1)
    has = c_users[pos] == tl.users
    for j in range(1, L + 1):
        src = np.flatnonzero((k < j) & has)
        state[src, L - j] = c_items[pos[src], L - j + k[src]]
        state_fb[src, L - j] = c_fb[pos[src], L - j + k[src]]


def _first_of_user(u: np.ndarray) -> np.ndarray:
    """int8 1 on one row of each user of the block (the driver counts them to detect split users)."""
    first = np.zeros(u.size, dtype=np.int8)
    first[np.unique(u, return_index=True)[1]] = 1
    return first


def session_returns(user: np.ndarray, ts: np.ndarray, done: np.ndarray, window_s: int,
                    log_end: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by (user, ts): ``returned`` = the return is known and the same user's next engaged
    event is within ``window_s``; ``return_known`` = the row ends a session and the log runs the whole
    window after it (``ts + window_s <= log_end``; ``log_end`` defaults to the rows' latest ts).  Whether
    a return is known never depends on whether it happened: counting early returns near the log's end as
    known would keep only the positive labels there.  float32 0/1 columns."""
    ts = np.asarray(ts, dtype=np.int64)
    if log_end is None:
        log_end = int(ts.max()) if ts.size else 0
    same_next = np.append(user[1:] == user[:-1], False)
    gap = np.append(ts[1:] - ts[:-1], np.iinfo(np.int64).max)
    done = np.asarray(done).astype(bool)
    known = done & (ts + window_s <= log_end)
    returned = known & same_next & (gap <= window_s)  # a label only where it is known
    return returned.astype(np.float32), known.astype(np.float32)


def item_log_duration(dwell_s: np.ndarray, watch_ratio: np.ndarray) -> np.ndarray:
    """``log(length / 60 s)`` of each consumed item, its length read off the log as dwell / watch ratio
    (the watch link's duration covariate); 0 (a one-minute item) where either is missing or not positive."""
    dwell = np.asarray(dwell_s, dtype=np.float64)
    wr = np.asarray(watch_ratio, dtype=np.float64)
    ok = np.isfinite(dwell) & np.isfinite(wr) & (dwell > 0) & (wr > 0)
    minutes = np.divide(dwell, wr * 60.0, out=np.ones_like(dwell), where=ok)
    return np.log(minutes).astype(np.float32)


def _spread(block: pa.Table, tl: Timeline, reason: np.ndarray, fields: dict, L: int) -> pa.Table:
    """One output row per input row: the block's columns, the per-user reason, and ``fields`` (one value
    per engaged event; 2-D arrays become state lists) on the engaged rows only."""
    n, m = block.num_rows, tl.rows.size
    pos_in_e = np.full(n, -1, dtype=np.int64)
    pos_in_e[tl.rows] = np.arange(m)
    is_tr = pos_in_e >= 0
    take = np.where(is_tr, pos_in_e, 0)
    out = block.drop_columns([c for c in (REASON_COLUMN, RAW_LINE_COLUMN) if c in block.column_names])
    out = out.append_column(REASON_COLUMN, pa.array(reason, pa.string()))
    out = out.append_column("_is_transition", pa.array(is_tr.astype(np.int8)))
    out = out.append_column("_first_of_user", pa.array(_first_of_user(block.column("user_id").to_numpy())))
    for name, (values, typ) in fields.items():
        if values.ndim == 2:
            full = np.full((n, L), PAD_RAW if values.dtype == np.int64 else 0, dtype=values.dtype)
            if m:
                full[is_tr] = values[take[is_tr]]
            arr = list_array(full, L, typ)
        else:
            arr = pa.array(values[take], typ, mask=~is_tr) if m else pa.nulls(n, typ)
        out = out.append_column(name, arr)
    return out


def annotate_users(block: pa.Table, *, state_len: int, session_gap_s: int, row_base, carry=None,
                   return_window_s: int = 129_600, log_end: int | None = None) -> pa.Table:
    """Ray Data UDF over a block holding whole users: per-user rejects, sessions and state windows.

    Returns one row per input row: the event columns, ``reject_reason`` (``duplicate_event`` /
    ``ts_out_of_order`` or null), and for engaged rows the transition fields (``_is_transition`` = 1)
    in *raw* ids (``state_raw`` padded with -1); :func:`index_transitions` maps them to indices once the
    vocab of the accepted rows is known.  ``row_base`` = (sorted raw user ids, first row_id of each).
    ``carry`` (daily retraining) = (sorted raw user ids, their last ``state_len`` items in raw ids [n, L]
    padded with -1, the items' feedback [n, L]): a carried user's first states start from those items
    instead of padding (see :func:`mtrec_dist.data.vocab.load_carry`); ``None`` = every user starts empty.
    ``log_end`` = the input's latest ts (a session end within ``return_window_s`` of it has an unknown
    return); ``None`` = the block's latest transition.
    """
    user_sorted_raw, user_row_base = _get(row_base)
    u = block.column("user_id").to_numpy()
    it = block.column("item_id").to_numpy()
    ts = block.column("ts").to_numpy()
    order = block.column(ORDER_COLUMN).to_numpy()
    click = pc.fill_null(block.column("click"), 1).to_numpy()  # null click = engaged
    sid_null = block.column("session_id").is_null().to_numpy()
    sid = pc.fill_null(block.column("session_id"), -1).to_numpy()
    wr = block.column("watch_ratio").to_numpy(zero_copy_only=False).astype(np.float32)  # null -> NaN
    dwell = block.column("dwell_s").to_numpy(zero_copy_only=False).astype(np.float32)  # null -> NaN

    reason = np.full(block.num_rows, None, dtype=object)
    # the users' places among all users: the same order as their raw ids, in a range small enough to pack
    # into one sort key with the times (sort_rows)
    user_rank = find_ids(user_sorted_raw, u, "user", np.arange(user_sorted_raw.size))
    dup = _duplicates(user_rank, it, ts, order)
    reason[dup] = "duplicate_event"
    reason[_out_of_order(user_rank, ts, order, sid, sid_null, skip=dup)] = "ts_out_of_order"
    engaged = np.equal(reason, None) & (click == 1)

    tl = _timeline(engaged, u, user_rank, ts, order, sid, sid_null, session_gap_s)
    action = it[tl.rows]
    fb = np.where(np.isnan(wr[tl.rows]), np.float32(1.0), wr[tl.rows]).astype(np.float32)
    state, state_fb = _windows(tl, action, fb, state_len)
    if carry is not None:
        _apply_carry(tl, state, state_fb, carry, state_len)
    row_id = user_row_base[user_rank[tl.rows]] + tl.k  # tl.users = u[tl.rows]: their places are known
    returned, known = session_returns(tl.users, ts[tl.rows], tl.done, return_window_s, log_end)
    return _spread(block, tl, reason, {
        "row_id": (row_id, pa.int64()),
        "state_raw": (state, pa.int64()), "state_feedback": (state_fb, pa.float32()),
        "action_feedback": (fb, pa.float32()),
        "done": (tl.done, pa.int8()), "pos_from_end": (tl.pos_from_end, pa.int32()),
        "returned": (returned.astype(np.int8), pa.int8()), "return_known": (known.astype(np.int8), pa.int8()),
        "action_log_duration": (item_log_duration(dwell[tl.rows], wr[tl.rows]), pa.float32()),
    }, state_len)


def _transition_rows(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """The transition rows of ``batch`` with only the columns ``schema``'s table is built from (filtering
    copies every column kept, and most blocks hold transitions only: then nothing is copied)."""
    sources = {"user_idx": "user_id", "action": "item_id", "state_items": "state_raw", "next_state_items": None,
               "next_state_feedback": None}
    keep = {sources.get(c, c) for c in schema.names} - {None} | {"user_id", "item_id", "_is_transition"}
    t = batch.select([c for c in batch.column_names if c in keep])
    is_transition = pc.equal(t.column("_is_transition"), 1)
    return t if pc.all(is_transition).as_py() else t.filter(is_transition)


def index_transitions(batch: pa.Table, *, lookup, part: str = "transitions") -> pa.Table:
    """Transition rows of annotated events in indices: the ``transitions/`` table (``part`` =
    "transitions", with ``next_state = state[1:] + [action]``) or the ``eval/`` table (``part`` = "eval")."""
    item_raw, item_idx, user_raw, user_idx = _get(lookup)
    schema = TRANSITION_SCHEMA if part == "transitions" else EVAL_SCHEMA
    t = _transition_rows(batch, schema)
    n = t.num_rows
    if n == 0:
        return schema.empty_table()
    uidx = pa.array(find_ids(user_raw, t.column("user_id").to_numpy(), "user", user_idx))
    action = find_ids(item_raw, t.column("item_id").to_numpy(), "item", item_idx)
    if part == "eval":
        cols = {"row_id": t.column("row_id"), "user_idx": uidx, "pos_from_end": t.column("pos_from_end"),
                "action": pa.array(action)}
        return pa.Table.from_arrays([cols.get(c) if c in cols else t.column(c) for c in EVAL_SCHEMA.names],
                                    schema=EVAL_SCHEMA)
    raw_state = pc.list_flatten(t.column("state_raw")).to_numpy()
    L = raw_state.size // n
    state = find_ids(item_raw, raw_state, "item", item_idx, pad=PAD_RAW).reshape(n, L)
    sfb = pc.list_flatten(t.column("state_feedback")).to_numpy().reshape(n, L)
    afb = t.column("action_feedback").to_numpy()
    nxt = np.concatenate([state[:, 1:], action[:, None]], 1)
    nfb = np.concatenate([sfb[:, 1:], afb[:, None]], 1)
    cols = {
        "row_id": t.column("row_id"), "user_idx": uidx,
        "state_items": list_array(state, L, pa.int64()), "state_feedback": t.column("state_feedback"),
        "action": pa.array(action), "action_feedback": t.column("action_feedback"),
        "next_state_items": list_array(nxt, L, pa.int64()), "next_state_feedback": list_array(nfb, L, pa.float32()),
        "done": t.column("done"), "ts": t.column("ts"), "pos_from_end": t.column("pos_from_end"),
        "returned": t.column("returned"), "return_known": t.column("return_known"),
        "action_log_duration": t.column("action_log_duration"),
        "slate_id": pc.fill_null(t.column("slate_id"), NO_SLATE),
    }
    return pa.Table.from_arrays([cols[c] for c in TRANSITION_COLUMNS], schema=TRANSITION_SCHEMA)


# ---- the order of a self-directed session's choices (QR-IQL v2's order term) --------------------------------
def _row_uniforms(row_id: np.ndarray, k: int) -> np.ndarray:
    """``[N, k]`` uniforms in [0, 1) that depend only on (row id, column): a row gets the same draw
    whichever block it lands in (SplitMix64 of the pair)."""
    with np.errstate(over="ignore"):
        x = (np.asarray(row_id).astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
             + (np.arange(k, dtype=np.uint64) + np.uint64(1))[None, :] * np.uint64(0xBF58476D1CE4E5B9))
        x ^= x >> np.uint64(31)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(29)
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def later_in_session(action: np.ndarray, ts: np.ndarray, done: np.ndarray, k: int,
                     row_id: np.ndarray | None = None) -> np.ndarray:
    """For transitions sorted by (user, ts) with ``done`` = 1 on each session's last row: ``k`` of the actions
    that come strictly later (a larger ts) in the same session, ``[N, k]``, 0-padded (0 is never an item
    index).  All of them where there are at most ``k``; else one from each of ``k`` equal strata of the rest
    of the session, so that an early choice is ranked against the whole session, not only its neighbours.
    Choices with the same ts have no order, so they are never compared.

    In a self-directed log (ratings, search) the user, not a feed, sets the order in which a session's items
    are chosen; the order term of QR-IQL v2 (objectives.mental_reward.order_nll) reads it.  The strata are
    drawn from each row's id (``row_id``; default: its position), so the sample does not depend on which
    rows share the call."""
    n = len(action)
    later = np.zeros((n, k), dtype=np.asarray(action).dtype)
    if n == 0 or k == 0:
        return later
    done = np.asarray(done) > 0
    done[-1] = True  # the log's last row ends its session
    session = np.concatenate([[0], np.cumsum(done[:-1])])
    ends = np.flatnonzero(done)
    last = ends[session]  # each row's session end
    t = np.asarray(ts, dtype=np.int64)
    key = session.astype(np.int64) * (int(t.max() - t.min()) + 1) + (t - t.min())  # sorted: (session, ts)
    first = np.searchsorted(key, key, side="right")  # the session's first row with a larger ts (or past it)
    rest = last - first + 1  # how many later choices
    strata = np.arange(k) + _row_uniforms(np.arange(n) if row_id is None else row_id, k)
    offset = np.where(rest[:, None] <= k, np.arange(k)[None, :], np.floor(strata / k * rest[:, None]).astype(np.int64))
    valid = offset < rest[:, None]
    later[valid] = np.asarray(action)[(first[:, None] + offset)[valid]]
    return later


def with_returns_relabelled(block: pa.Table, *, window_s: int, log_end: int) -> pa.Table:
    """Ray Data UDF over prepared transitions whose blocks hold whole users (several days' prepared data
    together): ``returned`` / ``return_known`` computed again over the whole block (:func:`session_returns`
    with ``log_end``), so that a session end near the end of its own day gets the label the following days'
    events give it.  The block comes back in each user's order (``ts``, then ``row_id``)."""
    block = block.sort_by([("user_idx", "ascending"), ("ts", "ascending"), ("row_id", "ascending")])
    returned, known = session_returns(block.column("user_idx").to_numpy(), block.column("ts").to_numpy(),
                                      block.column("done").to_numpy(), window_s, log_end)
    for name, values in (("returned", returned), ("return_known", known)):
        i = block.schema.get_field_index(name)
        block = block.set_column(i, block.schema.field(i), pa.array(values.astype(np.int8)).cast(block.schema.field(i).type))
    return block


def with_later_items(block: pa.Table, *, k: int) -> pa.Table:
    """Ray Data UDF over prepared transitions whose blocks hold whole users: the block in each user's order
    (``row_id``) with a ``later_items`` column (list<int64> of ``k``, :func:`later_in_session`), which the
    order term of the mental reward reads.  Runs where training needs it, so prepared data stay independent
    of the reward's settings."""
    block = block.sort_by([("user_idx", "ascending"), ("row_id", "ascending")])
    later = later_in_session(block.column("action").to_numpy(), block.column("ts").to_numpy(),
                             block.column("done").to_numpy(), k, row_id=block.column("row_id").to_numpy())
    return block.append_column("later_items", list_array(later, k, pa.int64()))
