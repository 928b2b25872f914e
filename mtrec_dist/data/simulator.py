"""The built-in user simulator: the project's embedded default data set and its online test bed.

World model (one set of functions drives both the offline logger and the online :class:`SimulatorEnv`):

* **Items** have a topic (and a unit topic vector), a hidden ``quality``, a visible ``appeal``, an
  item-specific satisfaction noise std, a duration and a ``watch_pull``.  Two kinds of bad items:
  *clickbait* (``clickbait_fraction``: high appeal, low quality, abandoned early: negative watch pull, so
  the watch ratio exposes it) and *compulsive* items (``compulsive_fraction``: fair appeal, low quality,
  positive watch pull: watched long, then regretted; the regret shows only later, as leaving and not
  returning).  Noise stds are Gamma-distributed, so some items are reliably OK and some are a gamble.
* **Users** have a latent taste vector ``z_u ~ N(0, I_K)``; relevance ``rel(u, i) = taste_strength *
  <z_u, v_i>``.
* **Expected satisfaction** ``mu(u, i) = rel(u, i) + quality_i``.
* **Clicks**: on a slate the user picks at most one item by a multinomial logit over
  ``util_i = rel + (1 - w) * appeal_i + w * quality_i - position_bias * pos`` (``w`` =
  ``click_satisfaction_weight``) against a no-click option.  Clicks follow appeal and only partly the
  expected satisfaction, so clickbait has a high CTR and a low satisfaction.
* **Consumption**: ``s = mu + sigma_i * eps`` (the realised, stochastic satisfaction).  The watch ratio
  is a biased, partial signal of it (v2 world, method.md section 5):
  ``logit(wr) = beta_s s + 0.3 + f_u - duration_bias log(duration / 60) + pull_i + watch_noise eps'``
  with ``beta_s = watch_satisfaction`` and ``f_u`` the user's finish propensity.  ``long_view = s > 0.5``,
  ``like = s > 1.5`` (evaluation-only labels).
* **Later behaviour carries the satisfaction**: a session mood ``m <- carry m + (1 - carry) s`` drives
  continuation, ``P(continue) = sigmoid(1.0 + 1.2 m)``; after a day with consumption the user returns the
  next day with probability ``sigmoid(return_bias + return_slope * mean s of the day)`` (retention,
  KuaiSim-style); an inactive user comes back on a day with probability ``reactivation``.
* **Logging policy** (offline only): candidates from the user's favourite topics (softmax of the
  taste) mixed with a ``logging_explore`` share drawn uniformly from the catalog; the slate is a
  sample without replacement from ``softmax(rel + logging_noise * N(0, 1))`` over the candidates
  (Gumbel top-k).  Exploratory, so logs cover the catalog, yet informative about tastes.

Randomness of the offline logger is a counter-based hash of ``(seed, stream, user, day, session,
step, slot)``, so every user's behaviour is independent of how users are grouped into chunks: chunked
generation writes the same events as one-shot generation, and the same seed gives the same bytes.

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
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mtrec_dist.config import SimulatorConfig
from mtrec_dist.data.schema import EVENT_SCHEMA
from mtrec_dist.data.readers import join_path, resolve_filesystem

# ---- behaviour constants (the shape of the world; the knobs users tune are in SimulatorConfig) ------
POSITION_BIAS = 0.1  # utility lost per slate position
WATCH_BIAS = 0.3
CLICKBAIT_PULL, COMPULSIVE_PULL = -1.0, 1.5  # logit(watch ratio) added by the item kind
REFERENCE_DURATION_S = 60.0
CONTINUE_BIAS, CONTINUE_SLOPE = 1.0, 1.2
LONG_VIEW_SATISFACTION = 0.5
LIKE_SATISFACTION = 1.5
CANDIDATES_PER_SLOT = 4  # the logging policy scores slate_size * 4 candidates
MAX_SESSIONS_PER_DAY = 16
DAY_S = 86_400
FIRST_SESSION_WINDOW_S = 43_200  # first session of a day starts in its first 12 hours
MIN_SESSION_GAP_S = 3_600  # sessions of a user are at least an hour apart
MEAN_EXTRA_SESSION_GAP_S = 3 * 3_600
MIN_BROWSE_S, MEAN_BROWSE_S = 3.0, 12.0  # time spent on a slate before the click

ITEM_TRUTH_SCHEMA = pa.schema([
    pa.field("item_id", pa.int64(), nullable=False),
    pa.field("topic", pa.int32()),
    pa.field("topic_vector", pa.list_(pa.float32())),
    pa.field("quality", pa.float32()),
    pa.field("appeal", pa.float32()),
    pa.field("is_clickbait", pa.bool_()),
    pa.field("is_compulsive", pa.bool_()),
    pa.field("watch_pull", pa.float32()),
    pa.field("mean_satisfaction", pa.float32()),
    pa.field("satisfaction_noise_std", pa.float32()),
    pa.field("duration_s", pa.float32()),
])
USER_TRUTH_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("taste", pa.list_(pa.float32())),
    pa.field("favourite_topic", pa.int32()),
])
EXPOSURE_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("session_id", pa.int64()),
    pa.field("slate_id", pa.int64()),
    pa.field("ts", pa.int64()),
    pa.field("items", pa.list_(pa.int64())),
    pa.field("click_index", pa.int8()),  # -1 = no click
])

# Random streams: one id per random quantity, so draws never alias.
(S_TASTE, S_SESSIONS, S_FIRST_START, S_SESSION_GAP, S_CAND_TOPIC, S_CAND_ITEM, S_CAND_EXPLORE,
 S_LOG_NOISE, S_LOG_GUMBEL, S_CLICK, S_SAT, S_WATCH, S_CONTINUE, S_BROWSE, S_FINISH, S_RETURN) = range(1, 17)


# ---- counter-based random numbers --------------------------------------------------------------------
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (bijective on uint64, good avalanche)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hash_keys(seed: int, stream: int, *keys) -> np.ndarray:
    """Mix integer key arrays (broadcast together) into one uint64 hash per element."""
    with np.errstate(over="ignore"):
        h = _mix64(np.atleast_1d(np.uint64((seed * 0x100000001B3 + stream * 0x2545F491) % 2**64)))
        for k in keys:
            k = np.asarray(k)
            k = k.astype(np.uint64) if k.dtype != np.uint64 else k
            h = _mix64(h ^ (k + _GOLDEN))
    return h


def hash_uniform(seed: int, stream: int, *keys) -> np.ndarray:
    """Uniform(0, 1) (open interval) draws that are a pure function of ``(seed, stream, *keys)``."""
    h = hash_keys(seed, stream, *keys)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2**53)


def _box_muller(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


class HashDraws:
    """Random draws for a batch of rows, each row keyed by one uint64 (used by the offline logger)."""

    def __init__(self, seed: int, row_keys: np.ndarray):
        self.seed, self.row_keys = seed, row_keys

    def uniform(self, stream: int, width: Optional[int] = None) -> np.ndarray:
        if width is None:
            return hash_uniform(self.seed, stream, self.row_keys)
        return hash_uniform(self.seed, stream, self.row_keys[:, None], np.arange(width)[None, :])

    def normal(self, stream: int, width: Optional[int] = None) -> np.ndarray:
        return _box_muller(self.uniform(stream, width), self.uniform(stream + 1000, width))


class GeneratorDraws:
    """The same interface over a ``numpy.random.Generator`` (used by the online environment)."""

    def __init__(self, rng: np.random.Generator, n: int):
        self.rng, self.n = rng, n

    def uniform(self, stream: int, width: Optional[int] = None) -> np.ndarray:
        shape = (self.n,) if width is None else (self.n, width)
        return np.clip(self.rng.random(shape), 1e-300, None)

    def normal(self, stream: int, width: Optional[int] = None) -> np.ndarray:
        return self.rng.standard_normal((self.n,) if width is None else (self.n, width))


# ---- ground truth -------------------------------------------------------------------------------------
@dataclass
class ItemTruth:
    """Hidden properties of every item (index = raw item id)."""

    topic: np.ndarray  # int32 [I]
    vectors: np.ndarray  # float32 [I, K], unit norm
    quality: np.ndarray  # float32 [I]
    appeal: np.ndarray  # float32 [I]
    is_clickbait: np.ndarray  # bool [I]
    noise_std: np.ndarray  # float32 [I]
    duration_s: np.ndarray  # float32 [I]
    is_compulsive: np.ndarray  # bool [I]
    watch_pull: np.ndarray  # float32 [I]: logit(watch ratio) added by the item kind

    @property
    def num_items(self) -> int:
        return len(self.topic)

    def to_table(self) -> pa.Table:
        k = self.vectors.shape[1]
        vec = pa.ListArray.from_arrays(pa.array(np.arange(0, (self.num_items + 1) * k, k, dtype=np.int32)),
                                       pa.array(self.vectors.reshape(-1)))
        return pa.Table.from_arrays([
            pa.array(np.arange(self.num_items, dtype=np.int64)), pa.array(self.topic), vec,
            pa.array(self.quality), pa.array(self.appeal), pa.array(self.is_clickbait),
            pa.array(self.is_compulsive), pa.array(self.watch_pull),
            pa.array(self.quality),  # an average user's taste term has mean 0, so E[s] = quality
            pa.array(self.noise_std), pa.array(self.duration_s),
        ], schema=ITEM_TRUTH_SCHEMA)

    @classmethod
    def from_table(cls, table: pa.Table) -> "ItemTruth":
        ids = table.column("item_id").to_numpy()
        if not np.array_equal(ids, np.arange(len(ids))):
            raise ValueError("item truth table: item_id must be 0..num_items-1 in order")
        vecs = np.stack(table.column("topic_vector").to_pylist()).astype(np.float32)
        col = lambda n, t: table.column(n).to_numpy(zero_copy_only=False).astype(t)  # noqa: E731
        return cls(col("topic", np.int32), vecs, col("quality", np.float32), col("appeal", np.float32),
                   col("is_clickbait", bool), col("satisfaction_noise_std", np.float32),
                   col("duration_s", np.float32), col("is_compulsive", bool), col("watch_pull", np.float32))


def make_item_truth(cfg: SimulatorConfig) -> ItemTruth:
    """Draw every item's hidden properties (deterministic in ``cfg.seed``)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 7919]))
    n, k = cfg.num_items, cfg.num_topics
    topic = rng.integers(0, k, n).astype(np.int32)
    vec = np.eye(k, dtype=np.float64)[topic] + 0.35 * rng.standard_normal((n, k))
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    is_cb = np.zeros(n, dtype=bool)
    order = rng.permutation(n)
    n_cb = int(round(cfg.clickbait_fraction * n))
    is_cb[order[:n_cb]] = True
    quality = np.where(is_cb, rng.normal(-1.0, 0.3, n), rng.normal(0.3, 0.6, n))
    appeal = np.where(is_cb, rng.normal(2.0, 0.4, n), rng.normal(0.0, 0.5, n))
    noise_std = cfg.satisfaction_noise * rng.gamma(2.0, 0.5, n)  # mean = satisfaction_noise, wide spread
    duration = np.clip(rng.lognormal(math.log(60.0), 0.6, n), 10.0, 600.0)
    # Drawn after the v1 quantities so that the v1 items keep their values.
    is_comp = np.zeros(n, dtype=bool)
    is_comp[order[n_cb: n_cb + int(round(cfg.compulsive_fraction * n))]] = True
    quality = np.where(is_comp, rng.normal(-0.8, 0.3, n), quality)
    appeal = np.where(is_comp, rng.normal(1.0, 0.4, n), appeal)
    pull = np.where(is_cb, CLICKBAIT_PULL, np.where(is_comp, COMPULSIVE_PULL, 0.0))
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    return ItemTruth(topic, f32(vec), f32(quality), f32(appeal), is_cb, f32(noise_std), f32(duration),
                     is_comp, f32(pull))


def user_tastes(cfg: SimulatorConfig, user_ids: np.ndarray) -> np.ndarray:
    """Latent taste ``z_u ~ N(0, I_K)`` of each user, a pure function of (seed, user id)."""
    u = np.asarray(user_ids, dtype=np.int64)
    topics = np.arange(cfg.num_topics)[None, :]
    return _box_muller(hash_uniform(cfg.seed, S_TASTE, u[:, None], topics),
                       hash_uniform(cfg.seed, S_TASTE + 1000, u[:, None], topics)).astype(np.float32)


def user_finish_bias(cfg: SimulatorConfig, user_ids: np.ndarray) -> np.ndarray:
    """Each user's finish propensity ``f_u ~ N(0, user_finish_sd^2)`` (logit of the watch ratio)."""
    u = np.asarray(user_ids, dtype=np.int64)
    return cfg.user_finish_sd * _box_muller(hash_uniform(cfg.seed, S_FINISH, u), hash_uniform(cfg.seed, S_FINISH + 1000, u))


def return_probability(cfg: SimulatorConfig, day_satisfaction: np.ndarray, consumed: np.ndarray) -> np.ndarray:
    """Chance of a session the next day: ``sigmoid(return_bias + return_slope * mean s of the day)`` after a
    day with consumption, ``reactivation`` otherwise."""
    p = 1.0 / (1.0 + np.exp(-(cfg.return_bias + cfg.return_slope * np.nan_to_num(day_satisfaction))))
    return np.where(consumed, p, cfg.reactivation)


def watch_ratio(cfg: SimulatorConfig, items: ItemTruth, item_ids: np.ndarray, satisfaction: np.ndarray,
                finish_bias: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The watch ratio: a biased, partial, noisy signal of the realised satisfaction (module docstring)."""
    logit = (cfg.watch_satisfaction * satisfaction + WATCH_BIAS + finish_bias
             - cfg.watch_duration_bias * np.log(items.duration_s[item_ids] / REFERENCE_DURATION_S)
             + items.watch_pull[item_ids] + cfg.watch_noise * noise)
    return 1.0 / (1.0 + np.exp(-logit))


# ---- the behaviour model (shared by the logger and the environment) -----------------------------------
def relevance(cfg: SimulatorConfig, taste: np.ndarray, items: ItemTruth, item_ids: np.ndarray) -> np.ndarray:
    """``rel[u, j] = taste_strength * <z_u, v_{item_ids[u, j]}>`` for item_ids of shape [n, m]."""
    dots = np.matmul(items.vectors[item_ids], taste.astype(np.float32)[:, :, None])[..., 0]
    return cfg.taste_strength * dots.astype(np.float64)


def expected_satisfaction(cfg: SimulatorConfig, taste: np.ndarray, items: ItemTruth,
                          item_ids: np.ndarray) -> np.ndarray:
    """``mu(u, i) = rel(u, i) + quality_i`` for item_ids of shape [n, m]."""
    return relevance(cfg, taste, items, item_ids) + items.quality[item_ids]


def click_utility(cfg: SimulatorConfig, rel: np.ndarray, items: ItemTruth, slates: np.ndarray) -> np.ndarray:
    """What drives a click: relevance, appeal and (weight ``w``) the hidden quality, minus position bias."""
    w = cfg.click_satisfaction_weight
    pos = np.arange(slates.shape[1], dtype=np.float64)[None, :]
    return rel + (1.0 - w) * items.appeal[slates] + w * items.quality[slates] - POSITION_BIAS * pos


@dataclass
class SlateResponse:
    click_index: np.ndarray  # int64 [n], -1 = no click
    item_id: np.ndarray  # int64 [n], -1 = no click
    satisfaction: np.ndarray  # float64 [n], NaN = no click
    watch_ratio: np.ndarray  # float64 [n], 0 = no click
    dwell_s: np.ndarray  # float64 [n], 0 = no click
    leaves: np.ndarray  # bool [n]: the user ends the session after this slate
    mood: np.ndarray  # float64 [n]: the session mood after this slate


def respond_to_slates(cfg: SimulatorConfig, taste: np.ndarray, items: ItemTruth, slates: np.ndarray,
                      draws, finish_bias: np.ndarray, mood: np.ndarray) -> SlateResponse:
    """One slate per user: choose a click, draw the satisfaction, the watch ratio, the new session mood
    and whether to leave (which depends on the mood, not on this item alone)."""
    n, size = slates.shape
    rel = relevance(cfg, taste, items, slates)
    util = np.concatenate([np.full((n, 1), cfg.no_click_utility), click_utility(cfg, rel, items, slates)], 1)
    gumbel = -np.log(-np.log(draws.uniform(S_CLICK, size + 1)))
    choice = np.argmax(util + gumbel, axis=1) - 1  # -1 = the no-click option won
    clicked = choice >= 0
    rows = np.arange(n)
    col = np.maximum(choice, 0)
    item = np.where(clicked, slates[rows, col], -1)
    mu = rel[rows, col] + items.quality[slates[rows, col]]
    picked = slates[rows, col]
    sat = mu + items.noise_std[picked] * draws.normal(S_SAT)
    wr = watch_ratio(cfg, items, picked, sat, finish_bias, draws.normal(S_WATCH))
    new_mood = np.where(clicked, cfg.mood_carry * mood + (1.0 - cfg.mood_carry) * sat, mood)
    p_continue = np.where(clicked, 1.0 / (1.0 + np.exp(-(CONTINUE_BIAS + CONTINUE_SLOPE * new_mood))),
                          1.0 - cfg.leave_after_no_click)
    leaves = draws.uniform(S_CONTINUE) >= p_continue
    dwell = wr * items.duration_s[picked]
    return SlateResponse(choice.astype(np.int64), item.astype(np.int64), np.where(clicked, sat, np.nan),
                         np.where(clicked, wr, 0.0), np.where(clicked, dwell, 0.0), leaves, new_mood)


class TopicIndex:
    """Items grouped by topic, for drawing candidates of a given topic in O(1)."""

    def __init__(self, items: ItemTruth, num_topics: int):
        self.order = np.argsort(items.topic, kind="stable")
        self.counts = np.bincount(items.topic, minlength=num_topics)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]])


def logging_policy_slates(cfg: SimulatorConfig, taste: np.ndarray, items: ItemTruth, index: TopicIndex,
                          draws) -> np.ndarray:
    """The logging policy's slates ``[n, slate_size]`` (raw item ids, no duplicates within a slate)."""
    n, num_items, size = taste.shape[0], items.num_items, cfg.slate_size
    n_cand = size * CANDIDATES_PER_SLOT
    if num_items <= n_cand:  # tiny catalog: every item is a candidate
        cands = np.broadcast_to(np.arange(num_items), (n, num_items))
        dup = np.zeros(cands.shape, dtype=bool)
    else:
        logits = taste.astype(np.float64)
        logits = logits - logits.max(1, keepdims=True)
        cdf = np.cumsum(np.exp(logits), 1)
        cdf /= cdf[:, -1:]
        topic = (draws.uniform(S_CAND_TOPIC, n_cand)[:, :, None] > cdf[:, None, :]).sum(2)
        topic = np.minimum(topic, cfg.num_topics - 1)
        within = np.floor(draws.uniform(S_CAND_ITEM, n_cand) * index.counts[topic]).astype(np.int64)
        by_topic = index.order[np.minimum(index.offsets[topic] + within, num_items - 1)]
        uniform_item = np.floor(draws.uniform(S_CAND_ITEM + 500, n_cand) * num_items).astype(np.int64)
        explore = (draws.uniform(S_CAND_EXPLORE, n_cand) < cfg.logging_explore) | (index.counts[topic] == 0)
        cands = np.where(explore, uniform_item, by_topic)
        srt = np.argsort(cands, axis=1, kind="stable")
        sorted_c = np.take_along_axis(cands, srt, 1)
        dup_sorted = np.concatenate([np.zeros((n, 1), bool), sorted_c[:, 1:] == sorted_c[:, :-1]], 1)
        dup = np.empty_like(dup_sorted)
        np.put_along_axis(dup, srt, dup_sorted, 1)
    width = cands.shape[1]
    score = relevance(cfg, taste, items, cands) + cfg.logging_noise * draws.normal(S_LOG_NOISE, width)
    score = score - np.log(-np.log(draws.uniform(S_LOG_GUMBEL, width)))  # Gumbel top-k = sampling w/o replacement
    score = np.where(dup, -np.inf, score)
    top = np.argpartition(-score, size - 1, axis=1)[:, :size]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(score, top, 1), axis=1, kind="stable"), 1)
    slates = np.take_along_axis(cands, top, 1)
    if np.isneginf(np.take_along_axis(score, top, 1)).any():  # fewer distinct candidates than slots
        raise RuntimeError("logging policy drew fewer distinct candidates than slate_size; raise num_items")
    return slates.astype(np.int64)


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


def _simulate_user_day(cfg: SimulatorConfig, items: ItemTruth, index: TopicIndex, users: np.ndarray,
                       taste: np.ndarray, day: int, stats: _Stats, active: np.ndarray):
    """All sessions of the ``active`` ``users`` on ``day``.

    Returns (events table, exposures table or None, the day's satisfaction sum and click count per user).
    """
    seed, size = cfg.seed, cfg.slate_size
    t0, t_end = day_start_ts(cfg, day), day_start_ts(cfg, day) + DAY_S
    finish = user_finish_bias(cfg, users)
    day_sat, day_clicks = np.zeros(len(users)), np.zeros(len(users))
    n_sessions = _poisson_from_uniform(hash_uniform(seed, S_SESSIONS, users, day),
                                       cfg.sessions_per_user_day, MAX_SESSIONS_PER_DAY)
    # an active user has at least one session; an inactive one none
    n_sessions = np.where(active, np.maximum(n_sessions, 1), 0)
    start = t0 + hash_uniform(seed, S_FIRST_START, users, day) * FIRST_SESSION_WINDOW_S
    ev: dict[str, list] = {k: [] for k in ("user", "item", "ts", "wr", "dwell", "sess", "slate", "sat")}
    ex: dict[str, list] = {k: [] for k in ("user", "sess", "slate", "ts", "items", "click")}
    for j in range(int(n_sessions.max(initial=0))):
        sel = np.flatnonzero((n_sessions > j) & (start < t_end - 60))
        if sel.size == 0:
            break
        u, tz, now = users[sel], taste[sel], start[sel].copy()
        sess = (day * cfg.num_users + u) * MAX_SESSIONS_PER_DAY + j
        stats.sessions += sel.size
        alive = np.ones(sel.size, dtype=bool)
        mood = np.zeros(sel.size)
        for t in range(cfg.max_session_len):
            a = np.flatnonzero(alive)
            if a.size == 0:
                break
            keys = hash_keys(seed, 0, u[a], day, j, t)
            draws = HashDraws(seed, keys)
            slates = logging_policy_slates(cfg, tz[a], items, index, draws)
            resp = respond_to_slates(cfg, tz[a], items, slates, draws, finish[sel[a]], mood[a])
            mood[a] = resp.mood
            browse = MIN_BROWSE_S - MEAN_BROWSE_S * np.log(draws.uniform(S_BROWSE))
            ts = np.floor(now[a] + browse)
            in_day = ts < t_end
            clicked = (resp.click_index >= 0) & in_day
            slate_id = sess[a] * cfg.max_session_len + t
            shown = in_day
            stats.slates += int(shown.sum())
            n_items = items.num_items
            stats.impressions += np.bincount(slates[shown].ravel(), minlength=n_items)
            c = np.flatnonzero(clicked)
            np.add.at(day_sat, sel[a][c], resp.satisfaction[c])
            np.add.at(day_clicks, sel[a][c], 1.0)
            stats.clicks += np.bincount(resp.item_id[c], minlength=n_items)
            stats.sat_sum += np.bincount(resp.item_id[c], resp.satisfaction[c], minlength=n_items)
            stats.watch_sum += np.bincount(resp.item_id[c], resp.watch_ratio[c], minlength=n_items)
            ev["user"].append(u[a][c]); ev["item"].append(resp.item_id[c]); ev["ts"].append(ts[c])
            ev["wr"].append(resp.watch_ratio[c]); ev["dwell"].append(resp.dwell_s[c])
            ev["sess"].append(sess[a][c]); ev["slate"].append(slate_id[c]); ev["sat"].append(resp.satisfaction[c])
            if cfg.write_exposures:
                s = np.flatnonzero(shown)
                ex["user"].append(u[a][s]); ex["sess"].append(sess[a][s]); ex["slate"].append(slate_id[s])
                ex["ts"].append(ts[s]); ex["items"].append(slates[s]); ex["click"].append(resp.click_index[s])
            now[a] = ts + resp.dwell_s
            alive[a] = in_day & ~resp.leaves
        # the next session starts at least an hour after this one ended
        gap = MIN_SESSION_GAP_S - MEAN_EXTRA_SESSION_GAP_S * np.log(hash_uniform(seed, S_SESSION_GAP, u, day, j))
        start[sel] = now + gap
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
    exposures = None
    if cfg.write_exposures:
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
    return events, exposures, day_sat, day_clicks


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
    for sub in ("logs", "impressions", "truth"):  # a re-run replaces the previous output instead of mixing with it
        if fs.get_file_info(join_path(root, sub)).type == pafs.FileType.Directory:
            fs.delete_dir(join_path(root, sub))
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    items = make_item_truth(cfg)
    index = TopicIndex(items, cfg.num_topics)
    _write_table(fs, join_path(root, "truth", "items.parquet"), items.to_table())
    zeros = lambda dt_: np.zeros(cfg.num_items, dtype=dt_)  # noqa: E731
    stats = _Stats(zeros(np.int64), zeros(np.int64), zeros(np.float64), zeros(np.float64))
    n_events, users_with_events, sizes = 0, 0, {}
    wr_sample: list = []
    sat_sample: list = []
    n_chunks = math.ceil(cfg.num_users / cfg.chunk_users)
    users_path = join_path(root, "truth", "users.parquet")
    fs.create_dir(join_path(root, "truth"), recursive=True)
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
                path = join_path(root, "logs", day_dir, part)
                _write_table(fs, path, events)
                sizes[path] = events.num_rows
                if exposures is not None:
                    _write_table(fs, join_path(root, "impressions", day_dir, part), exposures)
                n_events += events.num_rows
                if len(wr_sample) < 50:  # Spearman(watch ratio, satisfaction) over (a bounded share of) the logs
                    wr_sample.append(events.column("watch_ratio").to_numpy(zero_copy_only=False))
                    sat_sample.append(events.column("eval_true_satisfaction").to_numpy(zero_copy_only=False))
                active[np.searchsorted(users, events.column("user_id").to_numpy())] = True
            users_with_events += int(active.sum())
            say(f"[simulate] chunk {chunk + 1}/{n_chunks}: users {users[0]}..{users[-1]}, "
                f"{n_events:,} events so far ({time.time() - t_start:.1f}s)")
    summary = _summarise(cfg, items, stats, n_events, users_with_events)
    summary.update(out_dir=out_dir, files=len(sizes), seconds=round(time.time() - t_start, 3))
    if wr_sample:
        summary["watch_ratio_vs_satisfaction_spearman"] = spearman(np.concatenate(wr_sample), np.concatenate(sat_sample))
    with fs.open_output_stream(join_path(root, "truth", "summary.json")) as f:
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


# ---- online environment -------------------------------------------------------------------------------
class SimulatorEnv:
    """Online test bed: a recommender shows slates, simulated users respond (vectorised over users).

    ``reset`` starts one session per user, after a warm-up of ``warmup_items`` engaged items drawn
    under the logging policy (so a sequential recommender has a history to condition on); ``step``
    takes one slate per user and returns what each user did.  Users whose session ended are ignored
    (click_index -1, done True).  Uses exactly the behaviour functions of the offline logger.
    """

    def __init__(self, cfg: SimulatorConfig, item_truth: Optional[ItemTruth] = None, seed: int = 0):
        cfg.validate()
        self.cfg = cfg
        self.items = item_truth if item_truth is not None else make_item_truth(cfg)
        if self.items.vectors.shape[1] != cfg.num_topics:
            raise ValueError(f"item truth has {self.items.vectors.shape[1]} topics, config says {cfg.num_topics}")
        self.index = TopicIndex(self.items, cfg.num_topics)
        self.rng = np.random.default_rng(seed)
        self.user_ids = np.zeros(0, dtype=np.int64)
        self.done = np.zeros(0, dtype=bool)

    @property
    def num_items(self) -> int:
        return self.items.num_items

    def reset(self, users: int | Sequence[int] | np.ndarray, warmup_items: int = 5) -> dict:
        """Start a session for ``users`` (ids, or a count of ids drawn from 0..num_users-1)."""
        if isinstance(users, (int, np.integer)):
            if users < 1:
                raise ValueError(f"reset: need at least one user, got {users}")
            users = self.rng.choice(self.cfg.num_users, size=int(users), replace=users > self.cfg.num_users)
        self.user_ids = np.asarray(users, dtype=np.int64).reshape(-1)
        if self.user_ids.size == 0 or (self.user_ids < 0).any():
            raise ValueError("reset: user ids must be a non-empty array of non-negative ints")
        n = self.user_ids.size
        self.taste = user_tastes(self.cfg, self.user_ids)
        self.finish = user_finish_bias(self.cfg, self.user_ids)
        self.history_items = [[] for _ in range(n)]
        self.history_watch = [[] for _ in range(n)]
        self.steps = np.zeros(n, dtype=np.int64)
        self.done = np.zeros(n, dtype=bool)
        self.mood = np.zeros(n)
        for _ in range(10 * warmup_items):
            need = np.flatnonzero([len(h) < warmup_items for h in self.history_items])
            if need.size == 0:
                break
            draws = GeneratorDraws(self.rng, need.size)
            slates = logging_policy_slates(self.cfg, self.taste[need], self.items, self.index, draws)
            resp = respond_to_slates(self.cfg, self.taste[need], self.items, slates, draws, self.finish[need],
                                     np.zeros(need.size))
            for r in np.flatnonzero(resp.click_index >= 0):
                self.history_items[need[r]].append(int(resp.item_id[r]))
                self.history_watch[need[r]].append(float(resp.watch_ratio[r]))
        return self.observation()

    def new_session(self, active: np.ndarray) -> dict:
        """Start the next session (e.g. the next day) for the ``active`` users, keeping every history;
        the others sit it out (done).  The mood starts afresh."""
        active = np.asarray(active, dtype=bool)
        if active.shape != self.user_ids.shape:
            raise ValueError(f"new_session: active must have shape {self.user_ids.shape}, got {active.shape}")
        self.steps[:] = 0
        self.mood[:] = 0.0
        self.done = ~active
        return self.observation()

    def next_day_returns(self, day_satisfaction_sum: np.ndarray, day_clicks: np.ndarray) -> np.ndarray:
        """Which users come back the next day, by the same retention rule as the logger."""
        p = return_probability(self.cfg, day_satisfaction_sum / np.maximum(day_clicks, 1), day_clicks > 0)
        return self.rng.random(p.shape) < p

    def observation(self) -> dict:
        return dict(user_id=self.user_ids.copy(),
                    history_items=[np.asarray(h, dtype=np.int64) for h in self.history_items],
                    history_watch_ratio=[np.asarray(h, dtype=np.float32) for h in self.history_watch],
                    done=self.done.copy())

    def logging_policy(self) -> np.ndarray:
        """The logging policy's slates for the current users (a baseline policy)."""
        draws = GeneratorDraws(self.rng, self.user_ids.size)
        return logging_policy_slates(self.cfg, self.taste, self.items, self.index, draws)

    def expected_satisfaction(self, item_ids: np.ndarray) -> np.ndarray:
        """True ``mu(u, i)`` of each current user for ``item_ids`` ([m] or [n, m])."""
        ids = np.asarray(item_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = np.broadcast_to(ids, (self.user_ids.size, ids.size))
        return expected_satisfaction(self.cfg, self.taste, self.items, ids)

    def step(self, slates: np.ndarray) -> dict:
        """Show ``slates[u]`` (raw item ids, [n_users, slate_size]) to user u; return the responses."""
        slates = np.asarray(slates)
        n = self.user_ids.size
        if n == 0:
            raise RuntimeError("step before reset")
        if slates.ndim != 2 or slates.shape[0] != n or slates.shape[1] < 1:
            raise ValueError(f"step: slates must have shape [{n}, slate_size], got {slates.shape}")
        if not np.issubdtype(slates.dtype, np.integer):
            raise ValueError(f"step: slates must hold integer item ids, got dtype {slates.dtype}")
        if (slates < 0).any() or (slates >= self.num_items).any():
            bad = slates[(slates < 0) | (slates >= self.num_items)][0]
            raise ValueError(f"step: item id {bad} is not in the catalog 0..{self.num_items - 1}")
        slates = slates.astype(np.int64)
        resp = respond_to_slates(self.cfg, self.taste, self.items, slates, GeneratorDraws(self.rng, n),
                                 self.finish, self.mood)
        was_done = self.done.copy()
        self.mood = np.where(was_done, self.mood, resp.mood)
        for f in ("click_index", "item_id"):
            getattr(resp, f)[was_done] = -1
        resp.satisfaction[was_done] = np.nan
        resp.watch_ratio[was_done] = 0.0
        resp.dwell_s[was_done] = 0.0
        live = ~was_done
        self.steps[live] += 1
        for r in np.flatnonzero(resp.click_index >= 0):
            self.history_items[r].append(int(resp.item_id[r]))
            self.history_watch[r].append(float(resp.watch_ratio[r]))
        self.done = was_done | resp.leaves | (self.steps >= self.cfg.max_session_len)
        return dict(click_index=resp.click_index, item_id=resp.item_id, satisfaction=resp.satisfaction,
                    watch_ratio=resp.watch_ratio, dwell_s=resp.dwell_s, done=self.done.copy())


def default_sim_dir(run_dir: str) -> str:
    """Where `mtrec simulate` writes by default (and `mtrec prepare` reads ``logs/`` from)."""
    from mtrec_dist.layout import RunLayout

    return RunLayout(run_dir).sim
