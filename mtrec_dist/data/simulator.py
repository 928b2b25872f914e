"""The built-in user simulator: the project's embedded default data set (this module, the offline logger)
and its online test bed (:class:`~mtrec_dist.data.sim_env.SimulatorEnv`).  The world model, its
counter-based randomness and the behaviour functions both use are in :mod:`.sim_world`; their names stay
importable from here.

Output layout of :func:`simulate_logs` (``out`` may be a local path or a pyarrow filesystem URI):
``logs/day=YYYY-MM-DD/part-NNNNN.parquet`` (engaged events only, ``EVENT_SCHEMA``),
``impressions/day=.../part-NNNNN.parquet`` (optional but on by default: every slate shown and its click
index; observable, as in real feeds), ``truth/items.parquet``, ``truth/users.parquet`` and
``truth/summary.json`` (hidden: satisfaction, quality and appeal stay in ``truth/``).
"""
from __future__ import annotations

import datetime as dt
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mtrec_dist.config import SimulatorConfig
from mtrec_dist.data.readers import join_path, resolve_filesystem
from mtrec_dist.data.schema import EVENT_SCHEMA
from mtrec_dist.data.sim_env import SimulatorEnv  # noqa: F401  (re-exported)
# The world model is sim_world's; every name of it stays importable from here.
from mtrec_dist.data.sim_world import (  # noqa: F401
    CANDIDATES_PER_SLOT, CLICKBAIT_PULL, COMPULSIVE_PULL, CONTINUE_BIAS, CONTINUE_SLOPE, DAY_S,
    FIRST_SESSION_WINDOW_S, ITEM_TRUTH_SCHEMA, LIKE_SATISFACTION, LONG_VIEW_SATISFACTION,
    MAX_SESSIONS_PER_DAY, MEAN_BROWSE_S, MEAN_EXTRA_SESSION_GAP_S, MIN_BROWSE_S, MIN_SESSION_GAP_S,
    POSITION_BIAS, REFERENCE_DURATION_S, S_BROWSE, S_CAND_EXPLORE, S_CAND_ITEM, S_CAND_TOPIC, S_CLICK,
    S_CONTINUE, S_FINISH, S_FIRST_START, S_LOG_GUMBEL, S_LOG_NOISE, S_RETURN, S_SAT, S_SESSIONS,
    S_SESSION_GAP, S_TASTE, S_WATCH, WATCH_BIAS, GeneratorDraws, HashDraws, ItemTruth, SlateResponse,
    TopicIndex, click_utility, expected_satisfaction, hash_keys, hash_uniform,
    logging_policy_slates, make_item_truth, relevance, respond_to_slates, return_probability,
    user_finish_bias, user_tastes, watch_ratio,
)

USER_TRUTH_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("taste", pa.list_(pa.float32())),
    pa.field("favourite_topic", pa.int32()),
])
# the run folder of the simulator: observable logs/ and impressions/, hidden truth/
LOGS_DIR, IMPRESSIONS_DIR, TRUTH_DIR = "logs", "impressions", "truth"
EXPOSURE_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("session_id", pa.int64()),
    pa.field("slate_id", pa.int64()),
    pa.field("ts", pa.int64()),
    pa.field("items", pa.list_(pa.int64())),
    pa.field("click_index", pa.int8()),  # -1 = no click
])



# ---- offline logger -----------------------------------------------------------------------------------
def day_start_ts(cfg: SimulatorConfig, day: int) -> int:
    return cfg.start_ts + DAY_S * day


def day_label(cfg: SimulatorConfig, day: int) -> str:
    """``YYYY-MM-DD`` of a simulated day (the Hive partition value)."""
    return dt.datetime.fromtimestamp(day_start_ts(cfg, day), tz=dt.timezone.utc).date().isoformat()


def _poisson_from_uniform(u: np.ndarray, lam: float, cap: int) -> np.ndarray:
    k = np.zeros(u.shape, dtype=np.int64)
    p = math.exp(-lam)
    cdf = p
    for i in range(1, cap + 1):
        k += u > cdf
        p *= lam / i
        cdf += p
    return k


@dataclass
class _Stats:
    impressions: np.ndarray
    clicks: np.ndarray
    sat_sum: np.ndarray
    watch_sum: np.ndarray
    sessions: int = 0
    slates: int = 0
    return_chances: int = 0  # user-days after a day with consumption (that could be followed by a return)
    returns: int = 0  # ... of which the user came back the next day


def next_day_active(cfg: SimulatorConfig, users: np.ndarray, day: int, day_sat_sum: np.ndarray,
                    day_clicks: np.ndarray, stats: Optional[_Stats] = None) -> np.ndarray:
    """Which users have sessions on ``day + 1`` (retention: satisfied days bring users back)."""
    consumed = day_clicks > 0
    p = return_probability(cfg, day_sat_sum / np.maximum(day_clicks, 1), consumed)
    back = hash_uniform(cfg.seed, S_RETURN, users, day) < p
    if stats is not None:
        stats.return_chances += int(consumed.sum())
        stats.returns += int((back & consumed).sum())
    return back


class _DayLog:
    """One day's engaged events and (when ``cfg.write_exposures``) the slates shown, gathered slate step by
    slate step and turned into the ``logs/`` and ``impressions/`` tables at the end of the day."""

    def __init__(self, cfg: SimulatorConfig):
        self.cfg = cfg
        self.ev: dict[str, list] = {k: [] for k in ("user", "item", "ts", "wr", "dwell", "sess", "slate", "sat")}
        self.ex: dict[str, list] = {k: [] for k in ("user", "sess", "slate", "ts", "items", "click")}

    def add(self, u, sess, slate_id, ts, slates, resp, clicked: np.ndarray, shown: np.ndarray) -> None:
        """Rows ``clicked`` become events; with exposures, rows ``shown`` become impressions."""
        ev, c = self.ev, clicked
        ev["user"].append(u[c]); ev["item"].append(resp.item_id[c]); ev["ts"].append(ts[c])
        ev["wr"].append(resp.watch_ratio[c]); ev["dwell"].append(resp.dwell_s[c])
        ev["sess"].append(sess[c]); ev["slate"].append(slate_id[c]); ev["sat"].append(resp.satisfaction[c])
        if self.cfg.write_exposures:
            ex, s = self.ex, shown
            ex["user"].append(u[s]); ex["sess"].append(sess[s]); ex["slate"].append(slate_id[s])
            ex["ts"].append(ts[s]); ex["items"].append(slates[s]); ex["click"].append(resp.click_index[s])

    def tables(self) -> tuple[pa.Table, Optional[pa.Table]]:
        """(events ordered by user and time, impressions in the same order or None)."""
        ev, ex, size = self.ev, self.ex, self.cfg.slate_size
        cat = lambda k, d=ev: np.concatenate(d[k]) if d[k] else np.zeros(0)  # noqa: E731
        user, ts = cat("user").astype(np.int64), cat("ts").astype(np.int64)
        order = np.lexsort((ts, user))
        sat = cat("sat")[order]
        wr = cat("wr")[order]
        n = len(order)
        null_f = pa.nulls(n, pa.float32())
        null_i8 = pa.nulls(n, pa.int8())
        events = pa.Table.from_arrays([
            pa.array(user[order]), pa.array(cat("item").astype(np.int64)[order]), pa.array(ts[order]),
            pa.array(np.ones(n, np.int8)), pa.array(wr.astype(np.float32)),
            pa.array(cat("dwell")[order].astype(np.float32)), pa.array(cat("sess").astype(np.int64)[order]),
            pa.array(cat("slate").astype(np.int64)[order]),
            null_f, null_i8, pa.array((sat > LIKE_SATISFACTION).astype(np.int8)),
            pa.array((sat > LONG_VIEW_SATISFACTION).astype(np.int8)), pa.array(sat.astype(np.float32)),
        ], schema=EVENT_SCHEMA)
        if not self.cfg.write_exposures:
            return events, None
        eu, ets = cat("user", ex).astype(np.int64), cat("ts", ex).astype(np.int64)
        eorder = np.lexsort((ets, eu))
        m = len(eorder)
        flat = (np.concatenate(ex["items"]) if ex["items"] else np.zeros((0, size), np.int64))[eorder]
        exposures = pa.Table.from_arrays([
            pa.array(eu[eorder]), pa.array(cat("sess", ex).astype(np.int64)[eorder]),
            pa.array(cat("slate", ex).astype(np.int64)[eorder]), pa.array(ets[eorder]),
            pa.ListArray.from_arrays(pa.array(np.arange(0, (m + 1) * size, size, dtype=np.int32)),
                                     pa.array(flat.reshape(-1).astype(np.int64))),
            pa.array(cat("click", ex).astype(np.int8)[eorder]),
        ], schema=EXPOSURE_SCHEMA)
        return events, exposures


@dataclass
class _Day:
    """One chunk of users on one day: the world, who they are, and what the day accumulates."""

    cfg: SimulatorConfig
    items: ItemTruth
    index: TopicIndex
    users: np.ndarray
    taste: np.ndarray
    finish: np.ndarray  # each user's finish propensity
    day: int
    t_end: int  # the day's end: nothing is logged from then on
    stats: _Stats
    log: _DayLog
    day_sat: np.ndarray  # per user: satisfaction summed over the day's clicks
    day_clicks: np.ndarray  # per user: clicks of the day


def _count_slates(d: _Day, slates: np.ndarray, resp, shown: np.ndarray, c: np.ndarray, rows: np.ndarray) -> None:
    """Add one slate step to the item statistics and to the users' day totals (``c``: clicked in the day)."""
    st, n_items = d.stats, d.items.num_items
    st.slates += int(shown.sum())
    st.impressions += np.bincount(slates[shown].ravel(), minlength=n_items)
    np.add.at(d.day_sat, rows[c], resp.satisfaction[c])
    np.add.at(d.day_clicks, rows[c], 1.0)
    st.clicks += np.bincount(resp.item_id[c], minlength=n_items)
    st.sat_sum += np.bincount(resp.item_id[c], resp.satisfaction[c], minlength=n_items)
    st.watch_sum += np.bincount(resp.item_id[c], resp.watch_ratio[c], minlength=n_items)


def _play_sessions(d: _Day, j: int, sel: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The ``j``-th session of the day of users ``sel`` (rows of ``d.users``) from ``start``: slate after
    slate under the logging policy until each user leaves, the session hits its length or the day ends.
    Returns when each user's session ended."""
    cfg, seed, day = d.cfg, d.cfg.seed, d.day
    u, tz, now = d.users[sel], d.taste[sel], start.copy()
    sess = (day * cfg.num_users + u) * MAX_SESSIONS_PER_DAY + j
    d.stats.sessions += sel.size
    alive = np.ones(sel.size, dtype=bool)
    mood = np.zeros(sel.size)
    for t in range(cfg.max_session_len):
        a = np.flatnonzero(alive)
        if a.size == 0:
            break
        draws = HashDraws(seed, hash_keys(seed, 0, u[a], day, j, t))
        slates = logging_policy_slates(cfg, tz[a], d.items, d.index, draws)
        resp = respond_to_slates(cfg, tz[a], d.items, slates, draws, d.finish[sel[a]], mood[a])
        mood[a] = resp.mood
        browse = MIN_BROWSE_S - MEAN_BROWSE_S * np.log(draws.uniform(S_BROWSE))
        ts = np.floor(now[a] + browse)
        in_day = ts < d.t_end
        c = np.flatnonzero((resp.click_index >= 0) & in_day)
        slate_id = sess[a] * cfg.max_session_len + t
        _count_slates(d, slates, resp, in_day, c, sel[a])
        d.log.add(u[a], sess[a], slate_id, ts, slates, resp, c, np.flatnonzero(in_day))
        now[a] = ts + resp.dwell_s
        alive[a] = in_day & ~resp.leaves
    return now


def _simulate_user_day(cfg: SimulatorConfig, items: ItemTruth, index: TopicIndex, users: np.ndarray,
                       taste: np.ndarray, day: int, stats: _Stats, active: np.ndarray):
    """All sessions of the ``active`` ``users`` on ``day``.

    Returns (events table, exposures table or None, the day's satisfaction sum and click count per user).
    """
    seed = cfg.seed
    t0 = day_start_ts(cfg, day)
    d = _Day(cfg, items, index, users, taste, user_finish_bias(cfg, users), day, t0 + DAY_S, stats, _DayLog(cfg),
             np.zeros(len(users)), np.zeros(len(users)))
    n_sessions = _poisson_from_uniform(hash_uniform(seed, S_SESSIONS, users, day),
                                       cfg.sessions_per_user_day, MAX_SESSIONS_PER_DAY)
    # an active user has at least one session; an inactive one none
    n_sessions = np.where(active, np.maximum(n_sessions, 1), 0)
    start = t0 + hash_uniform(seed, S_FIRST_START, users, day) * FIRST_SESSION_WINDOW_S
    for j in range(int(n_sessions.max(initial=0))):
        sel = np.flatnonzero((n_sessions > j) & (start < d.t_end - 60))
        if sel.size == 0:
            break
        now = _play_sessions(d, j, sel, start[sel])
        # the next session starts at least an hour after this one ended
        gap = MIN_SESSION_GAP_S - MEAN_EXTRA_SESSION_GAP_S * np.log(hash_uniform(seed, S_SESSION_GAP, users[sel],
                                                                                 day, j))
        start[sel] = now + gap
    events, exposures = d.log.tables()
    return events, exposures, d.day_sat, d.day_clicks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (ties broken by order; fine for continuous draws)."""
    if len(x) < 3:
        return float("nan")
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def _write_table(fs, path: str, table: pa.Table) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f)


def simulate_logs(cfg: SimulatorConfig, out_dir: str,
                  progress: Optional[Callable[[str], None]] = None) -> dict:
    """Generate the offline logs and the ground truth under ``out_dir``; return a summary dict.

    Users are generated ``cfg.chunk_users`` at a time (one Parquet part per chunk and day), so memory is
    bounded by the chunk, not the data set.  The content does not depend on ``chunk_users``.  Existing
    ``logs/`` and ``truth/`` under ``out_dir`` are replaced.
    """
    cfg.validate()
    t_start = time.time()
    fs, root = resolve_filesystem(out_dir)
    fs.create_dir(root, recursive=True)
    for sub in (LOGS_DIR, IMPRESSIONS_DIR, TRUTH_DIR):  # a re-run replaces the previous output instead of mixing with it
        if fs.get_file_info(join_path(root, sub)).type == pafs.FileType.Directory:
            fs.delete_dir(join_path(root, sub))
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    items = make_item_truth(cfg)
    index = TopicIndex(items, cfg.num_topics)
    _write_table(fs, join_path(root, TRUTH_DIR, "items.parquet"), items.to_table())
    zeros = lambda dt_: np.zeros(cfg.num_items, dtype=dt_)  # noqa: E731
    stats = _Stats(zeros(np.int64), zeros(np.int64), zeros(np.float64), zeros(np.float64))
    n_events, users_with_events, sizes = 0, 0, {}
    wr_sample: list = []
    sat_sample: list = []
    n_chunks = math.ceil(cfg.num_users / cfg.chunk_users)
    users_path = join_path(root, TRUTH_DIR, "users.parquet")
    fs.create_dir(join_path(root, TRUTH_DIR), recursive=True)
    with fs.open_output_stream(users_path) as uf, pq.ParquetWriter(uf, USER_TRUTH_SCHEMA) as users_writer:
        for chunk in range(n_chunks):
            users = np.arange(chunk * cfg.chunk_users, min((chunk + 1) * cfg.chunk_users, cfg.num_users),
                              dtype=np.int64)
            taste = user_tastes(cfg, users)
            k = cfg.num_topics
            users_writer.write_table(pa.Table.from_arrays([
                pa.array(users),
                pa.ListArray.from_arrays(pa.array(np.arange(0, (len(users) + 1) * k, k, dtype=np.int32)),
                                         pa.array(taste.reshape(-1))),
                pa.array(taste.argmax(1).astype(np.int32)),
            ], schema=USER_TRUTH_SCHEMA))
            active = np.zeros(len(users), dtype=bool)
            today = np.ones(len(users), dtype=bool)  # everybody is active on the first day
            for day in range(cfg.days):
                events, exposures, day_sat, day_clicks = _simulate_user_day(
                    cfg, items, index, users, taste, day, stats, today)
                today = next_day_active(cfg, users, day, day_sat, day_clicks,
                                        stats if day + 1 < cfg.days else None)
                part = f"part-{chunk:05d}.parquet"
                day_dir = f"day={day_label(cfg, day)}"
                path = join_path(root, LOGS_DIR, day_dir, part)
                _write_table(fs, path, events)
                sizes[path] = events.num_rows
                if exposures is not None:
                    _write_table(fs, join_path(root, IMPRESSIONS_DIR, day_dir, part), exposures)
                n_events += events.num_rows
                if len(wr_sample) < 50:  # Spearman(watch ratio, satisfaction) over (a bounded share of) the logs
                    wr_sample.append(events.column("watch_ratio").to_numpy(zero_copy_only=False))
                    sat_sample.append(events.column("eval_true_satisfaction").to_numpy(zero_copy_only=False))
                active[np.searchsorted(users, events.column("user_id").to_numpy())] = True
            users_with_events += int(active.sum())
            if n_chunks > 1:  # one chunk: the summary line that follows says it all
                say(f"[simulate] chunk {chunk + 1}/{n_chunks}: users {users[0]}..{users[-1]}, "
                    f"{n_events:,} events so far ({time.time() - t_start:.1f}s)")
    summary = _summarise(cfg, items, stats, n_events, users_with_events)
    summary.update(out_dir=out_dir, files=len(sizes), seconds=round(time.time() - t_start, 3))
    if wr_sample:
        summary["watch_ratio_vs_satisfaction_spearman"] = spearman(np.concatenate(wr_sample), np.concatenate(sat_sample))
    with fs.open_output_stream(join_path(root, TRUTH_DIR, "summary.json")) as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary


def _summarise(cfg: SimulatorConfig, items: ItemTruth, st: _Stats, n_events: int, n_users: int) -> dict:
    def group(mask):
        imp, clk = st.impressions[mask].sum(), st.clicks[mask].sum()
        return dict(items=int(mask.sum()), impressions=int(imp), clicks=int(clk),
                    ctr=float(clk / imp) if imp else float("nan"),
                    mean_satisfaction=float(st.sat_sum[mask].sum() / clk) if clk else float("nan"),
                    mean_watch_ratio=float(st.watch_sum[mask].sum() / clk) if clk else float("nan"))

    shown = st.impressions > 0
    item_ctr = np.where(shown, st.clicks / np.maximum(st.impressions, 1), np.nan)
    clicked = st.clicks > 0
    item_sat = np.where(clicked, st.sat_sum / np.maximum(st.clicks, 1), np.nan)
    both = shown & clicked
    corr = float(np.corrcoef(item_ctr[both], item_sat[both])[0, 1]) if both.sum() > 2 else float("nan")
    return dict(
        events=int(n_events), users=int(n_users), num_users=cfg.num_users, num_items=cfg.num_items,
        items_engaged=int(clicked.sum()), items_shown=int(shown.sum()), days=cfg.days,
        sessions=int(st.sessions), slates=int(st.slates),
        ctr=float(st.clicks.sum() / max(st.impressions.sum(), 1)),
        clickbait=group(items.is_clickbait), compulsive=group(items.is_compulsive),
        other=group(~items.is_clickbait & ~items.is_compulsive),
        item_ctr_vs_satisfaction_corr=corr, seed=cfg.seed,
        next_day_return_rate=float(st.returns / st.return_chances) if st.return_chances else float("nan"),
    )


def default_sim_dir(run_dir: str) -> str:
    """Where `mtrec simulate` writes by default (and `mtrec prepare` reads ``logs/`` from)."""
    from mtrec_dist.layout import RunLayout

    return RunLayout(run_dir).sim
