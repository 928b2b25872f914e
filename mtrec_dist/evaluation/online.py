"""Online evaluation: a recommender acts in the simulator; we measure what users really got.

For each seed a fresh :class:`~mtrec_dist.data.simulator.SimulatorEnv` starts one session for each of
``num_users`` users (the same users for every policy under the same seed, so policies are compared on
paired draws).  Each step the policy scores the catalog from the user's history and shows its top
``slate_size`` items not yet consumed in the session.  Per seed we record

* ``ctr``: clicks / slates shown,
* ``satisfaction``: mean true satisfaction of consumed items,
* ``satisfaction_per_session``: total true satisfaction per session,
* ``watch_time``: total watch time (seconds) per session,
* ``session_length``: slates shown per session,

and report mean and 95% t-interval over seeds (:func:`mtrec_dist.evaluation.metrics.mean_ci95`).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from mtrec_dist.config import SimulatorConfig
from mtrec_dist.data.simulator import ItemTruth, SimulatorEnv
from mtrec_dist.evaluation.metrics import mean_ci95

# score_fn(state_items [n, L] long, state_feedback [n, L] float) -> scores [n, num_items + 1] over vocab indices
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

ONLINE_METRICS = ("ctr", "satisfaction", "satisfaction_per_session", "watch_time", "session_length")


def histories_to_state(histories: Sequence[np.ndarray], watch: Sequence[np.ndarray], raw_to_idx: np.ndarray,
                       state_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last ``state_len`` items of each history as vocab indices, left-padded with 0 (unknown items -> 0)."""
    n = len(histories)
    items = np.zeros((n, state_len), dtype=np.int64)
    fb = np.zeros((n, state_len), dtype=np.float32)
    for u, (h, w) in enumerate(zip(histories, watch)):
        h, w = h[-state_len:], w[-state_len:]
        if len(h):
            idx = raw_to_idx[h]
            items[u, state_len - len(h):] = idx
            fb[u, state_len - len(h):] = np.where(idx > 0, w, 0.0)
    return torch.from_numpy(items), torch.from_numpy(fb)


def play_session(env: SimulatorEnv, obs: dict, policy: Callable[[dict], np.ndarray]) -> Dict[str, np.ndarray]:
    """Run the users' current sessions to their end under ``policy``; per user: slates shown, clicks, total
    true satisfaction and watch time (seconds)."""
    n = obs["user_id"].size
    out = {k: np.zeros(n) for k in ("slates", "clicks", "satisfaction", "watch")}
    while not obs["done"].all():
        live = ~obs["done"]
        resp = env.step(policy(obs))
        clicked = resp["click_index"] >= 0
        out["slates"] += live
        out["clicks"] += clicked
        out["satisfaction"] += np.where(clicked, np.nan_to_num(resp["satisfaction"]), 0.0)
        out["watch"] += np.where(live, resp["dwell_s"], 0.0)
        obs = env.observation()
    return out


def run_episode(env: SimulatorEnv, policy: Callable[[dict], np.ndarray], num_users: int) -> Dict[str, float]:
    """One session per user under ``policy`` (obs -> slates of raw ids); returns this seed's metrics."""
    s = play_session(env, env.reset(num_users), policy)
    total_clicks = s["clicks"].sum()
    return {
        "ctr": float(total_clicks / max(s["slates"].sum(), 1)),
        "satisfaction": float(s["satisfaction"].sum() / max(total_clicks, 1)),
        "satisfaction_per_session": float(s["satisfaction"].mean()),
        "watch_time": float(s["watch"].mean()),
        "session_length": float(s["slates"].mean()),
    }


def run_days(env: SimulatorEnv, policy: Callable[[dict], np.ndarray], users: np.ndarray, days: int) -> Dict[str, float]:
    """Follow ``users`` for ``days`` days under ``policy``: one session a day while they keep returning
    (the simulator's retention rule).  Satisfaction and watch time per session, cumulative satisfaction per
    user, next-day return rate (returns / days with consumption that a next day follows), CTR."""
    obs = env.reset(users)
    n = len(users)
    active = np.ones(n, bool)
    tot = dict(sat=0.0, watch=0.0, clicks=0.0, slates=0.0, sessions=0.0, chances=0.0, returns=0.0)
    for day in range(days):
        if day:
            obs = env.new_session(active)
        s = play_session(env, obs, policy)
        for k, v in (("sat", "satisfaction"), ("watch", "watch"), ("clicks", "clicks"), ("slates", "slates")):
            tot[k] += s[v].sum()
        tot["sessions"] += active.sum()
        if day + 1 < days:
            consumed = s["clicks"] > 0
            back = env.next_day_returns(s["satisfaction"], s["clicks"])
            tot["chances"] += consumed.sum()
            tot["returns"] += (back & consumed).sum()
            active = back
    return {"satisfaction_per_session": tot["sat"] / tot["sessions"], "cumulative_satisfaction": tot["sat"] / n,
            "return_rate": tot["returns"] / max(tot["chances"], 1), "watch_time": tot["watch"] / tot["sessions"],
            "ctr": tot["clicks"] / max(tot["slates"], 1)}


def catalog_score_fn(model, num_items: int) -> ScoreFn:
    """A recommender's scores over the whole catalog as a :data:`ScoreFn` (the padding index 0 gets -inf)."""
    catalog = torch.arange(1, num_items + 1)

    @torch.no_grad()
    def score_fn(items: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        scores = model.score_catalog(items, fb, catalog)
        return torch.cat([torch.full((scores.shape[0], 1), -torch.inf), scores], dim=1)
    return score_fn


def recommender_policy(score_fn: ScoreFn, raw_to_idx: np.ndarray, idx_to_raw: np.ndarray, state_len: int,
                       slate_size: int, session_start_len: Optional[np.ndarray] = None):
    """Wrap a scoring function as a slate policy over raw simulator item ids.

    Items the recommender never saw in training (no vocab index) cannot be recommended; the padding index is
    never recommended; items the user already consumed in the current history are not shown again.
    """
    def policy(obs: dict) -> np.ndarray:
        items, fb = histories_to_state(obs["history_items"], obs["history_watch_ratio"], raw_to_idx, state_len)
        with torch.no_grad():
            scores = score_fn(items, fb).float().clone()
        scores[:, 0] = -torch.inf
        for u, h in enumerate(obs["history_items"]):
            seen = raw_to_idx[h]
            scores[u, torch.from_numpy(seen[seen > 0])] = -torch.inf
        top = torch.topk(scores, slate_size, dim=1).indices.numpy()
        return idx_to_raw[top]

    return policy


def vocab_maps(raw_ids: np.ndarray, idx: np.ndarray, num_raw_items: int) -> tuple[np.ndarray, np.ndarray]:
    """``raw_to_idx`` (0 = unknown) over simulator ids and ``idx_to_raw`` over vocab indices."""
    raw_to_idx = np.zeros(num_raw_items, dtype=np.int64)
    ok = (raw_ids >= 0) & (raw_ids < num_raw_items)
    raw_to_idx[raw_ids[ok]] = idx[ok]
    idx_to_raw = np.zeros(int(idx.max()) + 1, dtype=np.int64)
    idx_to_raw[idx] = raw_ids
    return raw_to_idx, idx_to_raw


def evaluate_online(policies: Dict[str, Callable[[dict], np.ndarray]], sim_cfg: SimulatorConfig,
                    item_truth: Optional[ItemTruth], seeds: Sequence[int], num_users: int) -> Dict[str, dict]:
    """Every policy on every seed; per policy: per-seed values and mean/95% CI of each online metric.

    Also, for every policy after the first, ``paired_gain`` over the first policy: per-seed differences
    (same users and same seeds), mean and 95% CI.
    """
    per_seed: Dict[str, Dict[str, list]] = {name: {m: [] for m in ONLINE_METRICS} for name in policies}
    for seed in seeds:
        for name, policy in policies.items():
            env = SimulatorEnv(sim_cfg, item_truth=item_truth, seed=int(seed))
            for m, v in run_episode(env, policy, num_users).items():
                per_seed[name][m].append(v)
    out: Dict[str, dict] = {}
    names = list(policies)
    for name in names:
        res = {}
        for m, vals in per_seed[name].items():
            mean, half = mean_ci95(vals)
            res[m] = {"mean": mean, "lo": mean - half, "hi": mean + half, "per_seed": vals}
        if name != names[0]:
            res["paired_gain"] = {}
            for m in ONLINE_METRICS:
                diff = np.asarray(per_seed[name][m]) - np.asarray(per_seed[names[0]][m])
                mean, half = mean_ci95(diff)
                res["paired_gain"][m] = {"mean": mean, "lo": mean - half, "hi": mean + half, "vs": names[0]}
        out[name] = res
    return out
