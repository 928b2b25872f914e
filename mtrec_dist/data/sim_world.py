"""The simulated world: items, users and how users respond to slates (:mod:`.simulator`'s logger and
:mod:`.sim_env`'s online environment both drive these functions).

World model:

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
  is a biased, partial signal of it (docs/method.md "The simulated world"):
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
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from mtrec_dist.config import SimulatorConfig
from mtrec_dist.data.schema import typed_fields

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

ITEM_TRUTH_SCHEMA = pa.schema(typed_fields(item_id=pa.int64(), nullable=False) + typed_fields(
    topic=pa.int32(), topic_vector=pa.list_(pa.float32()), quality=pa.float32(), appeal=pa.float32(),
    is_clickbait=pa.bool_(), is_compulsive=pa.bool_(), watch_pull=pa.float32(), mean_satisfaction=pa.float32(),
    satisfaction_noise_std=pa.float32(), duration_s=pa.float32()))
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

