"""``prepare`` as a user would write it instead: one process, pyarrow to read, pandas and numpy to
transform, pyarrow to write (the baseline the library's ``prepare_dataset`` is measured against).

Same transformation as :mod:`mtrec_dist.data.prepare` on clean Parquet logs: row checks (nulls, negative
ids, out-of-range ids / timestamps / clicks / watch ratios / dwell, ts outside the file's day partition),
duplicate (user, item, ts) events dropped keeping the first, events earlier than an earlier event of the
same session dropped, engaged events (click 1 or missing) sorted per user, sessions cut at gaps over
``session_gap_s`` or session-id changes, vocabularies in raw-id order (items 1.., users 0..), states of
the last ``state_len`` items with their watch ratios, the event's slate id (-1 where none), and the
``transitions/`` and ``eval/`` tables.
What it leaves out, because a user's script would: the rejects table, the slates of impressions, readers
for other formats, the reasons' hints, bounded memory (everything is in memory at once), and the
distinction between a null and a NaN watch ratio (pandas reads both as NaN; both mean "no signal" here).

:mod:`.prepare_bench` checks that its transitions match the library's (row count and checksum) before
the two are timed against each other.
"""
from __future__ import annotations

import datetime as dt
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mtrec_dist.config import PrepareConfig
from mtrec_dist.data.dataset import EVAL_DIR, EVAL_SCHEMA, TRANSITION_SCHEMA, TRANSITIONS_DIR, list_array
from mtrec_dist.data.schema import EVAL_COLUMNS, NO_SLATE

DAY_PARTITION = re.compile(r"day=(\d{4}-\d{2}-\d{2})")


def log_files(logs_dir: str | Path) -> List[Path]:
    """The Parquet files under ``logs_dir`` in path order (hidden ``_``/``.`` names skipped), as prepare orders them."""
    root = Path(logs_dir)
    return sorted(p for p in root.rglob("*.parquet")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(root).parts))


def read_logs(logs_dir: str | Path) -> pd.DataFrame:
    """Every event, in input order, with the start of its file's day partition (``-1`` when none)."""
    frames = []
    for path in log_files(logs_dir):
        df = pq.read_table(path).to_pandas()
        day = DAY_PARTITION.findall(str(path))
        start = dt.datetime.fromisoformat(day[-1]).replace(tzinfo=dt.timezone.utc).timestamp() if day else -1
        df["day_start"] = np.int64(start)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def valid_rows(df: pd.DataFrame, cfg: PrepareConfig) -> np.ndarray:
    """Bool mask of the rows that pass the row checks."""
    bad = df[["user_id", "item_id", "ts"]].isna().any(axis=1)
    bad |= (df.user_id < 0) | (df.item_id < 0) | (df.ts < 0) | (df.item_id > cfg.max_item_id) | (df.ts > cfg.max_ts)
    bad |= (df.day_start >= 0) & ((df.ts < df.day_start) | (df.ts >= df.day_start + 86_400))
    bad |= df.click.notna() & ~df.click.isin([0, 1])
    bad |= (df.watch_ratio < 0) | (df.watch_ratio > 1)
    bad |= (df.dwell_s < 0) | np.isinf(df.dwell_s)
    bad |= (df.session_id < 0) | (df.slate_id < 0)
    bad |= np.isinf(df.eval_rating) | (df.eval_rating < 0) | np.isinf(df.eval_true_satisfaction)
    for c in ("eval_purchase", "eval_like", "eval_long_view"):
        bad |= df[c].notna() & ~df[c].isin([0, 1])
    return ~bad.to_numpy()


def drop_user_rejects(df: pd.DataFrame) -> pd.DataFrame:
    """Without duplicate (user, item, ts) events (the first in input order stays) and without events
    earlier than an earlier event of the same (user, session)."""
    df = df[~df.duplicated(["user_id", "item_id", "ts"], keep="first")]
    with_sid = df[df.session_id.notna()]
    keys = [with_sid.user_id, with_sid.session_id]
    running_max = with_sid.groupby(keys, sort=False).ts.cummax()
    before = running_max.groupby(keys, sort=False).shift(1)
    return df.drop(with_sid.index[with_sid.ts < before])


def sessionize(events: pd.DataFrame, session_gap_s: int, return_window_s: int, log_end: int) -> pd.DataFrame:
    """Engaged events sorted per user by time, with ``k`` (position in the user's sequence),
    ``pos_from_end``, ``done`` (a session's last event, or the user's last) and, at session ends,
    ``returned`` (the user's next event within ``return_window_s``) and ``return_known``."""
    ev = events.sort_values(["user_id", "ts"], kind="stable")  # stable: equal times keep input order
    by_user = ev.groupby("user_id", sort=False)
    ev = ev.assign(k=by_user.cumcount(), pos_from_end=by_user.cumcount(ascending=False))
    next_ts, next_sid = ev.ts.shift(-1), ev.session_id.shift(-1)
    last_of_user = (ev.pos_from_end == 0).to_numpy()
    gap = (next_ts - ev.ts > session_gap_s).to_numpy()
    sid_change = (ev.session_id.notna() & next_sid.notna() & (ev.session_id != next_sid)).to_numpy()
    done = last_of_user | gap | sid_change
    known = done & (ev.ts + return_window_s <= log_end).to_numpy()
    returned = known & ~last_of_user & (next_ts - ev.ts <= return_window_s).to_numpy()
    return ev.assign(done=done.astype(np.int8), returned=returned.astype(np.int8), return_known=known.astype(np.int8))


def windows(k: np.ndarray, action: np.ndarray, feedback: np.ndarray, state_len: int):
    """States (the user's previous ``state_len`` actions, left-padded with 0) and their feedback."""
    state = np.zeros((k.size, state_len), dtype=np.int64)
    state_fb = np.zeros((k.size, state_len), dtype=np.float32)
    for j in range(1, state_len + 1):
        rows = np.flatnonzero(k >= j)
        state[rows, state_len - j] = action[rows - j]
        state_fb[rows, state_len - j] = feedback[rows - j]
    return state, state_fb


def log_duration(dwell_s: np.ndarray, watch_ratio: np.ndarray) -> np.ndarray:
    """log(item length in minutes), length = dwell / watch ratio; 0 where either is missing or not positive."""
    with np.errstate(divide="ignore", invalid="ignore"):
        minutes = dwell_s / (watch_ratio * 60.0)
        return np.where(np.isfinite(minutes) & (dwell_s > 0) & (watch_ratio > 0), np.log(minutes), 0.0).astype(np.float32)


def transitions_table(ev: pd.DataFrame, items: np.ndarray, users: np.ndarray, row_base: pd.Series,
                      state_len: int) -> tuple[pa.Table, pa.Table]:
    """The ``transitions/`` and ``eval/`` tables of the sessionized events, in vocab indices."""
    k = ev.k.to_numpy()
    action = np.searchsorted(items, ev.item_id.to_numpy()) + 1
    user_idx = np.searchsorted(users, ev.user_id.to_numpy())
    fb = ev.watch_ratio.fillna(1.0).to_numpy(np.float32)
    state, state_fb = windows(k, action, fb, state_len)
    row_id = row_base.reindex(ev.user_id).to_numpy() + k
    pos = ev.pos_from_end.to_numpy(np.int32)
    cols = {"row_id": row_id, "user_idx": user_idx, "state_items": list_array(state, state_len, pa.int64()),
            "state_feedback": list_array(state_fb, state_len, pa.float32()), "action": action,
            "action_feedback": fb,
            "next_state_items": list_array(np.c_[state[:, 1:], action], state_len, pa.int64()),
            "next_state_feedback": list_array(np.c_[state_fb[:, 1:], fb], state_len, pa.float32()),
            "done": ev.done.to_numpy(), "ts": ev.ts.to_numpy(), "pos_from_end": pos,
            "returned": ev.returned.to_numpy(), "return_known": ev.return_known.to_numpy(),
            "action_log_duration": log_duration(ev.dwell_s.to_numpy(np.float64), ev.watch_ratio.to_numpy(np.float64)),
            "slate_id": ev.slate_id.fillna(NO_SLATE).to_numpy(np.int64)}
    transitions = pa.Table.from_arrays([pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array)
                                        else cols[f.name] for f in TRANSITION_SCHEMA], schema=TRANSITION_SCHEMA)
    eval_cols = {"row_id": row_id, "user_idx": user_idx, "pos_from_end": pos, "action": action,
                 **{c: ev[c].to_numpy() for c in EVAL_COLUMNS}}
    evals = pa.Table.from_arrays([pa.array(eval_cols[f.name], f.type, from_pandas=True) for f in EVAL_SCHEMA],
                                 schema=EVAL_SCHEMA)
    return transitions, evals


def write_tables(out: Path, tables: Dict[str, pa.Table], rows_per_file: int) -> None:
    """Each table as Parquet files of at most ``rows_per_file`` rows under ``<out>/<name>/``."""
    shutil.rmtree(out, ignore_errors=True)
    for name, table in tables.items():
        (out / name).mkdir(parents=True)
        for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
            pq.write_table(table.slice(start, rows_per_file), out / name / f"part-{i:05d}.parquet")


def plain_prepare(cfg: PrepareConfig, logs_dir: str | Path, out_dir: str | Path) -> Dict[str, object]:
    """Read, validate, sessionize, window and write; returns counts and the seconds of each step."""
    t0 = last = time.perf_counter()
    seconds: Dict[str, float] = {}

    def lap(name: str) -> None:
        """Seconds since the previous lap, under ``name``."""
        nonlocal last
        now = time.perf_counter()
        seconds[name] = round(now - last, 3)
        last = now

    df = read_logs(logs_dir)
    lap("read")
    ok = df[valid_rows(df, cfg)]
    counts = ok.groupby("user_id").size()  # row ids: each user's block of row-checked events, in raw-id order
    row_base = counts.cumsum() - counts
    accepted = drop_user_rejects(ok)
    lap("validate")
    engaged = accepted[accepted.click.isna() | (accepted.click == 1)]
    ev = sessionize(engaged, cfg.session_gap_s, cfg.return_window_s, int(ok.ts.max()))
    lap("sessionize")
    items, users = np.unique(accepted.item_id.to_numpy()), np.unique(accepted.user_id.to_numpy())
    transitions, evals = transitions_table(ev, items, users, row_base, cfg.state_len)
    lap("window")
    write_tables(Path(out_dir), {TRANSITIONS_DIR: transitions, EVAL_DIR: evals}, cfg.rows_per_shard)
    lap("write")
    return {"rows_in": len(df), "rows_ok": len(accepted), "rows_rejected": len(df) - len(accepted),
            "transitions": transitions.num_rows, "num_items": int(items.size), "num_users": int(users.size),
            "seconds": seconds, "total_s": round(time.perf_counter() - t0, 3)}
