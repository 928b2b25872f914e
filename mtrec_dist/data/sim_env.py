"""The online test bed: :class:`SimulatorEnv`, where a recommender shows slates and simulated users respond
with exactly the behaviour functions of the offline logger (:mod:`.sim_world`)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mtrec_dist.config import SimulatorConfig
from mtrec_dist.data.sim_world import (GeneratorDraws, ItemTruth, TopicIndex, expected_satisfaction,
                                       logging_policy_slates, make_item_truth, respond_to_slates,
                                       return_probability, user_finish_bias, user_tastes)


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
