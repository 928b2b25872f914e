"""`mtrec ablate`: does the mental reward earn its place? (issue "The mental reward must earn its place").

The same SASRec, same budget, guided by each reward in turn (rows A-I, config.AblationConfig), paired on
the same held-out users and seeds, in several simulated worlds.  Each model trains in one process on
in-memory tensors: the ablation trains dozens of small models, where Ray Train's worker start-up would
cost more than the training (the distributed path is the pipeline's; the models and losses are the same).
Each (world, training seed) is a :class:`SeedUnit`; with ``ablation.parallel`` units run as Ray tasks.

Per world: simulate logs -> transitions (users split into training and held-out) -> fit every reward model
on the training users -> score the training rows -> train one guided SASRec per row -> measure reward
validity (held-out users' rows), offline ranking (held-out users' rows) and online behaviour (users who
never appear in the logs, followed for ``online_days`` days).  Gains are paired differences per (world,
training seed, online seed) against row A and row B; their 95% CIs take the trained model (world, training
seed) as the unit, so they include training-seed and world variation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Dict, List

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mtrec_dist.choices import CLICK_TRAINED
from mtrec_dist.config import PipelineConfig, SimulatorConfig
from mtrec_dist.data.simulator import (
    IMPRESSIONS_DIR, LOGS_DIR, LONG_VIEW_SATISFACTION, ItemTruth, SimulatorEnv, expected_satisfaction, make_item_truth, simulate_logs,
    user_tastes,
)
from mtrec_dist.data.heldout import require_heldout, split_rows
from mtrec_dist.data.schema import NO_SLATE
from mtrec_dist.data.sessionize import item_log_duration, session_returns
from mtrec_dist.evaluation.metrics import (
    hr_ndcg_all_and_satisfied, mean_ci95, optimistic_rank_of_target, roc_auc, spearman,
)
from mtrec_dist.evaluation.online import catalog_score_fn, recommender_policy, run_days
from mtrec_dist.layout import RunLayout
from mtrec_dist.models.feedback_regressor import FeedbackRegressor
from mtrec_dist.models.recommender import SequentialRecommender
from mtrec_dist.models.reward_model import QRIQLModel
from mtrec_dist.objectives.item_prior import PRIOR_COLUMNS, item_prior_of_rows
from mtrec_dist.objectives.qr_iql import cvar

ROW_NAMES = {"A": "none (clicks)", "B": "watch-ratio regressor", "C": "leave/return classifier",
             "D": "IQ-Learn v1 (choices)", "E": "QR-IQL v2, 1 quantile", "F": "QR-IQL v2, mean",
             "G": "QR-IQL v2, CVaR", "H": "oracle satisfaction", "I": "shuffled F (control)"}
ONLINE = ("satisfaction_per_session", "cumulative_satisfaction", "return_rate", "watch_time", "ctr")
HELDOUT_USER_OFFSET = 10_000_000  # online users' ids: never in the logs


# ---- data ------------------------------------------------------------------------------------------------
def log_transitions(events, state_len: int, return_window_s: int) -> Dict[str, np.ndarray]:
    """Windowed transitions of simulator events sorted by (user, ts): states of the last ``state_len``
    items (index = raw id + 1) with watch ratios, ``done`` at session ends, and whether the user came
    back within ``return_window_s`` of a session end (``return_known`` is 0 where the log ends too early), and
    each event's ``slate_id`` (-1 where none), as prepared transitions carry them."""
    col = lambda n: events.column(n).to_numpy(zero_copy_only=False)  # noqa: E731
    user, ts, item, wr, sess = col("user_id"), col("ts"), col("item_id") + 1, col("watch_ratio"), col("session_id")
    order = np.lexsort((ts, user))
    user, ts, item, wr, sess = user[order], ts[order], item[order], wr[order].astype(np.float32), sess[order]
    # the item's length is observable (dwell / watch ratio): the watch link's duration covariate
    dwell = col("dwell_s")[order] if "dwell_s" in events.column_names else np.full(len(order), np.nan)
    slate = (pc.fill_null(events.column("slate_id"), NO_SLATE).to_numpy()[order]
             if "slate_id" in events.column_names else np.full(len(order), NO_SLATE, np.int64))
    sat = col("eval_true_satisfaction")[order]
    n, L = len(user), state_len
    s_items, s_fb = np.zeros((n, L), np.int64), np.zeros((n, L), np.float32)
    for k in range(1, L + 1):
        same = np.zeros(n, bool)
        same[k:] = user[k:] == user[:-k]
        s_items[k:, L - k] = np.where(same[k:], item[:-k], 0)
        s_fb[k:, L - k] = np.where(same[k:], wr[:-k], 0.0)
    done = ~np.append(user[1:] == user[:-1], False) | np.append(sess[1:] != sess[:-1], True)
    returned, known = session_returns(user, ts, done, return_window_s)
    return dict(user=user, state_items=s_items, state_feedback=s_fb, action=item, action_feedback=wr,
                next_state_items=np.concatenate([s_items[:, 1:], item[:, None]], 1),
                next_state_feedback=np.concatenate([s_fb[:, 1:], wr[:, None]], 1),
                done=done.astype(np.float32), returned=returned, return_known=known, satisfaction=sat,
                action_log_duration=item_log_duration(dwell, wr), slate_id=slate,
                satisfied=sat > LONG_VIEW_SATISFACTION)


def shown_slates(user: np.ndarray, slate_id: np.ndarray, impressions, width: int) -> np.ndarray:
    """``[n, width]`` item indices (raw id + 1) of the slate each transition's click was shown in
    (``user``, ``slate_id``: the columns of :func:`log_transitions`); 0 where ``impressions`` lack the slate
    or hold it at another length (the reward model then fits the click over the catalog)."""
    import pyarrow as pa

    from mtrec_dist.data.slate_join import matched_rows

    keys = pa.table({"user_id": user, "slate_id": slate_id})
    joined = matched_rows(keys, impressions, ["user_id", "slate_id"], join_type="inner")
    items = impressions.column("items").combine_chunks().take(joined.column("__right").to_numpy())
    whole = pc.equal(pc.list_value_length(items), width).to_numpy(zero_copy_only=False)  # others stay 0
    out = np.zeros((len(user), width), np.int64)
    out[joined.column("__left").to_numpy()[whole]] = (
        pc.list_flatten(items.filter(pa.array(whole))).to_numpy().reshape(-1, width) + 1)
    return out


TRAIN_KEYS = ("state_items", "state_feedback", "action", "action_feedback", "next_state_items",
              "next_state_feedback", "done", "returned", "return_known", "action_log_duration", "later_items",
              "slate_items")


def batches(data: Dict[str, np.ndarray], rows: np.ndarray, batch_size: int, epochs: int, seed: int,
            extra: Dict[str, np.ndarray] | None = None):
    """Shuffled torch batches of ``rows`` (training columns only: never ``satisfaction``)."""
    rng = np.random.default_rng(seed)
    cols = {k: data[k] for k in TRAIN_KEYS if k in data} | (extra or {})
    for _ in range(epochs):
        perm = rows[rng.permutation(len(rows))]
        for start in range(0, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            yield {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in cols.items()}


def fit(make_model: Callable[[], torch.nn.Module], data, rows, cfg, seed: int, epochs: int, extra=None) -> torch.nn.Module:
    """Plain Adam on ``model.losses(batch)["loss"]`` (+ Polyak target updates where the model has them).

    The model is built here, after seeding, so that its initial weights depend on ``seed`` alone."""
    torch.manual_seed(seed)
    model = make_model()
    # foreach: the same updates with one call per step over all parameters (less Python dispatch on a CPU);
    # 3-4 s less per SASRec fit of the demo (bench/RESULTS.md, session 20)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, foreach=True)
    model.train()
    for batch in batches(data, rows, cfg.batch_size, epochs, seed, extra):
        loss = model.losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(model, "update_target"):
            model.update_target()
    return model.eval()


# ---- rewards per row ---------------------------------------------------------------------------------------
@torch.no_grad()
def score_reward(score: Callable, data, rows: np.ndarray, num_items: int, chunk: int = 512,
                 baseline_items: int = 128) -> Dict[str, np.ndarray]:
    """``score(states, fb, candidates [B, C], row indices) -> quantiles [B, C, N]`` -> reward mean / CVaR of the logged
    action and their means over the catalog (the baseline) for ``rows``."""
    out = {k: np.zeros(len(rows), np.float32) for k in ("reward_mean", "reward_baseline", "reward_cvar",
                                                         "reward_cvar_baseline")}
    # The baseline is the mean over a fixed uniform sample of the catalog (the same items for every row):
    # an unbiased estimate of the catalog mean at a fraction of the cost of scoring every item.
    gen = torch.Generator().manual_seed(0)
    sample = torch.randperm(num_items, generator=gen)[:baseline_items] + 1
    for start in range(0, len(rows), chunk):
        idx = rows[start:start + chunk]
        s, fb = torch.from_numpy(data["state_items"][idx]), torch.from_numpy(data["state_feedback"][idx])
        a = torch.from_numpy(data["action"][idx]).view(-1, 1)
        q = score(s, fb, torch.cat([a, sample.expand(len(idx), -1)], 1), idx)  # [b, 1 + S, N]
        mean, tail = q.mean(-1), cvar(q, 0.25)
        sl = slice(start, start + len(idx))
        out["reward_mean"][sl] = mean[:, 0].numpy()
        out["reward_cvar"][sl] = tail[:, 0].numpy()
        out["reward_baseline"][sl] = mean[:, 1:].mean(1).numpy()
        out["reward_cvar_baseline"][sl] = tail[:, 1:].mean(1).numpy()
    return out


def reward_model(row: str, cfg: PipelineConfig, num_items: int, data, rows, seed: int):
    """Fit the reward of ``row`` on training ``rows``; return a quantile scorer (states, fb, cands) -> [B, C, N]."""
    ab, L = cfg.ablation, data["state_items"].shape[1]
    if row in ("B", "C"):
        m = fit(lambda: FeedbackRegressor(num_items, cfg.model, L, "watch" if row == "B" else "leave_return"),
                data, rows, ab, seed, ab.reward_epochs)
        return lambda s, fb, c, idx: m.predict(s, fb, c).unsqueeze(-1)
    rc = {"D": dict(objective="v1", choice_weight=1.0, consumption_weight=0.0),
          "E": dict(objective="v2", num_quantiles=1)}.get(row, dict(objective="v2"))
    reward_cfg = dataclasses.replace(cfg.reward, **rc)
    prior = (item_prior_of_rows({c: data[c][rows] for c in PRIOR_COLUMNS}, num_items, reward_cfg.item_prior_watch_slope)
             if reward_cfg.uses_item_prior else None)
    m = fit(lambda: QRIQLModel(num_items, cfg.model, reward_cfg, L, item_prior=prior), data, rows, ab, seed,
            ab.reward_epochs)
    return lambda s, fb, c, idx: m.reward_quantiles(s, fb, c)


def oracle_scorer(sim: SimulatorConfig, truth: ItemTruth, data):
    """Row H: the true expected satisfaction ``mu(u, a)`` of the logged user (an upper bound)."""
    def score(s, fb, cands, idx):
        mu = expected_satisfaction(sim, user_tastes(sim, data["user"][idx]), truth, cands.numpy() - 1)
        return torch.from_numpy(mu).float().unsqueeze(-1)
    return score


def reward_key(row: str) -> str:
    """Which fitted reward a row reads: rows F, G and I share one QR-IQL v2 model."""
    return "F" if row in ("F", "G", "I") else row


def row_guidance(row: str) -> str:
    """The guidance mode of the SASRec a row trains: clicks only for A, the reward's lower tail for G (CVaR),
    reweighting by the row's reward for every other row."""
    return {"A": CLICK_TRAINED, "G": "risk_averse"}.get(row, "reweight")


def row_scorer(row: str, cfg, sim, truth, data, rows, num_items, seed, cache):
    """The fitted reward of ``row`` (fitted once per :func:`reward_key`); None for A."""
    if row == "A":
        return None
    key = reward_key(row)
    if key not in cache:
        cache[key] = (oracle_scorer(sim, truth, data) if key == "H" else
                      reward_model(key, cfg, num_items, data, rows, seed))
    return cache[key]


def guidance_columns(row: str, cols: Dict[str, np.ndarray] | None, seed) -> Dict[str, np.ndarray] | None:
    """Guidance columns of the training rows from their scores (:func:`score_reward`; None for A);
    row I gets F's advantages shuffled across rows."""
    if cols is None:
        return None
    if row == "I":
        adv = np.random.default_rng(seed).permutation(cols["reward_mean"] - cols["reward_baseline"])
        z = np.zeros_like(adv)
        cols = dict(reward_mean=adv, reward_baseline=z, reward_cvar=adv, reward_cvar_baseline=z)
    return cols


# ---- measuring ---------------------------------------------------------------------------------------------
def reward_validity(scorer, sim, truth, data, rows, num_items) -> dict:
    """Spearman of the reward vs true expected satisfaction, and AUC for telling bad items from good ones, on
    held-out users' rows: both kinds of bad item together, then each kind alone against the good items
    (clickbait is exposed by its short watch, compulsive items are watched long: a reward can tell one and
    not the other; NaN where a kind has no row)."""
    r = score_reward(scorer, data, rows, num_items)["reward_mean"]
    a = data["action"][rows] - 1
    mu = expected_satisfaction(sim, user_tastes(sim, data["user"][rows]), truth, a[:, None])[:, 0]
    return {"spearman_vs_satisfaction": spearman(r, mu), **bad_item_aucs(r, truth.is_clickbait[a], truth.is_compulsive[a])}


def bad_item_aucs(reward: np.ndarray, clickbait: np.ndarray, compulsive: np.ndarray) -> Dict[str, float]:
    """AUC of ``reward`` for telling the rows of good items (neither kind) from those of bad ones: both kinds
    together (``auc_good_vs_bad``), then each kind alone against the good rows (NaN where a kind has none)."""
    good = ~(clickbait | compulsive)
    out = {"auc_good_vs_bad": roc_auc(reward, good.astype(int))}
    for name, bad in (("clickbait", clickbait), ("compulsive", compulsive)):
        pair = good | bad
        out[f"auc_good_vs_{name}"] = roc_auc(reward[pair], good[pair].astype(int))
    return out


@torch.no_grad()
def offline_ranking(rec: SequentialRecommender, data, rows, num_items, k: int = 10) -> dict:
    """Full-ranking HR/NDCG@k of the logged next item on held-out rows, all and satisfied targets."""
    ranks = np.zeros(len(rows), np.int64)
    catalog = torch.arange(1, num_items + 1)
    for start in range(0, len(rows), 1024):
        idx = rows[start:start + 1024]
        sc = rec.score_catalog(torch.from_numpy(data["state_items"][idx]), torch.from_numpy(data["state_feedback"][idx]), catalog)
        ranks[start:start + len(idx)] = optimistic_rank_of_target(sc, data["action"][idx] - 1)
    return hr_ndcg_all_and_satisfied(ranks, data["satisfied"][rows], k)


def click_sasrec(cfg, num_items: int, state_len: int) -> Callable[[], SequentialRecommender]:
    """Row A's model: a SASRec trained on clicks alone (whatever ``rec.guidance`` says)."""
    rec_cfg = dataclasses.replace(cfg.rec, guidance=row_guidance("A"))
    return lambda: SequentialRecommender(num_items, "sasrec", cfg.model, rec_cfg, state_len)


# ---- one world ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SeedUnit:
    """One training seed in one simulated world: every row's reward and SASRec, trained and measured.  Units
    share nothing but their world's data (read-only), so they run in parallel (``ablation.parallel``)."""

    sim: SimulatorConfig
    world: int  # index of its world in run_ablation's plan
    rows: tuple
    train_seed: int  # the index t; the seed itself is train.seed + 1000 t


def simulate_world(cfg: PipelineConfig, sim: SimulatorConfig, work_dir: str) -> dict:
    """Simulate ``sim``'s logs into ``work_dir``; its item truth and logged transitions, users split into
    training and held-out rows."""
    simulate_logs(sim, work_dir, progress=lambda m: None)
    truth = make_item_truth(sim)
    events = pq.read_table(os.path.join(work_dir, LOGS_DIR))
    data = log_transitions(events, cfg.prepare.state_len, cfg.prepare.return_window_s)
    if cfg.reward.slate_choice and sim.write_exposures:  # the v2 rewards fit clicks over the slates shown (R2)
        data["slate_items"] = shown_slates(data["user"], data["slate_id"],
                                           pq.read_table(os.path.join(work_dir, IMPRESSIONS_DIR)), sim.slate_size)
    train_rows, test_rows = split_rows(data["user"], cfg.eval.heldout_user_share)
    return {"truth": truth, "data": data, "train_rows": train_rows, "test_rows": test_rows}


def _run_rows(cfg: PipelineConfig, world: dict, unit: SeedUnit, say: Callable[[str], None]) -> Dict[str, list]:
    """Every row of ``unit`` on its ``world``; per-row lists of per-online-seed records."""
    ab, sim, t = cfg.ablation, unit.sim, unit.train_seed
    truth, data, train_rows, test_rows = world["truth"], world["data"], world["train_rows"], world["test_rows"]
    num_items = sim.num_items
    online_cfg = dataclasses.replace(sim, max_session_len=cfg.eval.online_session_len)
    out: Dict[str, list] = {r: [] for r in unit.rows}
    seed = cfg.train.seed + 1000 * t
    cache: dict = {}
    for row in unit.rows:
        t0 = time.time()
        scorer = row_scorer(row, cfg, sim, truth, data, train_rows, num_items, seed, cache)
        key = reward_key(row)
        if scorer is not None and ("scores", key) not in cache:  # F, G and I share the scoring work
            cache[("scores", key)] = score_reward(scorer, data, train_rows, num_items)
            cache[("validity", key)] = reward_validity(scorer, sim, truth, data, test_rows, num_items)
        cols = guidance_columns(row, cache.get(("scores", key)), seed)
        validity = {} if row in ("A", "I") else cache[("validity", key)]
        rec_cfg = dataclasses.replace(cfg.rec, guidance=row_guidance(row))
        extra = None if cols is None else {k: v_full(v, train_rows, len(data["action"])) for k, v in cols.items()}
        rec = fit(lambda: SequentialRecommender(num_items, "sasrec", cfg.model, rec_cfg, cfg.prepare.state_len),
                  data, train_rows, ab, seed, ab.rec_epochs, extra)
        offline = offline_ranking(rec, data, test_rows, num_items)
        policy = recommender_policy(catalog_score_fn(rec, num_items), np.arange(num_items) + 1,
                                    np.arange(num_items + 1) - 1, cfg.prepare.state_len, sim.slate_size)
        for o in range(ab.online_seeds):
            users = HELDOUT_USER_OFFSET + np.arange(ab.online_users) + o * ab.online_users
            env = SimulatorEnv(online_cfg, item_truth=truth, seed=o)
            rec_online = run_days(env, policy, users, days=ab.online_days)
            out[row].append(dict(world=sim.seed, train_seed=t, online_seed=o, **rec_online, **offline,
                                 **validity))
        say(f"[ablate] world {sim.seed} seed {t} row {row} ({ROW_NAMES[row]}): "
            f"sat/session {np.mean([r['satisfaction_per_session'] for r in out[row][-ab.online_seeds:]]):.3f} "
            f"return {np.mean([r['return_rate'] for r in out[row][-ab.online_seeds:]]):.3f} "
            f"ndcg@10 sat {offline['ndcg@10_satisfied']:.4f} "
            + (f"spearman {validity['spearman_vs_satisfaction']:.3f} " if validity else "")
            + f"({time.time() - t0:.0f}s)")
    return out


def map_units(cfg: PipelineConfig, fn: Callable, jobs: List[tuple], shared: List, say: Callable[[str], None]) -> list:
    """``fn(cfg, shared[i], unit, say)`` for each ``(i, unit)`` of ``jobs``, results in the jobs' order: one after
    another in this process, or with ``ablation.parallel`` (and more than one job) as Ray tasks of one CPU each,
    as many at once as the cluster holds, each ``shared`` item put once in the object store (any node runs any
    job).  A job's progress lines are printed when it ends; if one fails, the others are cancelled.  Every job
    trains with one torch thread either way and seeds its own training, so both ways give the same results."""
    if not cfg.ablation.parallel or len(jobs) < 2:
        return [_one_thread(fn, cfg, shared[i], unit, say) for i, unit in jobs]
    import ray

    from mtrec_dist.runtime import init_ray

    init_ray(cfg.ray_address)
    task = ray.remote(num_cpus=1)(_job_task)
    refs = [ray.put(item) for item in shared]
    pending = {task.remote(fn, cfg, refs[i], unit): k for k, (i, unit) in enumerate(jobs)}
    results: list = [None] * len(jobs)
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(ref)
            results[k], lines = ray.get(ref)
            for line in lines:
                say(line)
    finally:
        for ref in pending:  # a job failed (or the driver was interrupted): free the cluster's CPUs
            ray.cancel(ref)
    return results


def _one_thread(fn: Callable, cfg, shared, unit, say):
    """``fn`` with one torch thread, as in a one-CPU task, so that its results do not depend on where it ran."""
    from mtrec_dist.runtime import torch_threads

    with torch_threads(1):
        return fn(cfg, shared, unit, say)


def _job_task(fn: Callable, cfg, shared, unit):
    lines: List[str] = []
    return _one_thread(fn, cfg, shared, unit, lines.append), lines


def merge_records(rows: List[str], unit_records: List[Dict[str, list]]) -> Dict[str, list]:
    return {r: [rec for recs in unit_records for rec in recs[r]] for r in rows}


def v_full(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Scatter per-training-row values into a full-length column (other rows are never batched)."""
    full = np.zeros(n, np.float32)
    full[rows] = values
    return full


# ---- summary ------------------------------------------------------------------------------------------------
def summarise(records: Dict[str, list]) -> Dict[str, dict]:
    """Per row: mean and 95% CI of every metric, and paired gains vs A and vs B (same world, training seed
    and online seed).  The unit of the interval is the trained model (world, training seed): online seeds
    of one model share its training draw, so they are averaged first instead of being counted as
    independent, and the intervals carry training-seed and world variation."""
    out: Dict[str, dict] = {}
    for row, recs in records.items():
        res: Dict[str, dict] = {}
        for m in recs[0]:
            if m in ("train_seed", "online_seed", "world"):
                continue
            mean, half = mean_ci95(list(_model_means(recs, m).values()))
            res[m] = {"mean": mean, "half": half}
        for base in ("A", "B"):
            if base in records and base != row:
                for m in ONLINE + ("ndcg@10_satisfied", "hr@10"):
                    if m not in recs[0] or m not in records[base][0]:  # not measured here (real logs: no online)
                        continue
                    mine, ref = _model_means(recs, m), _model_means(records[base], m)
                    mean, half = mean_ci95([v - ref[k] for k, v in mine.items() if k in ref])
                    res[f"gain_vs_{base}:{m}"] = {"mean": mean, "half": half}
        out[row] = res
    return out


def _model_means(recs: list, metric: str) -> Dict[tuple, float]:
    """``metric`` per trained model, keyed (world, training seed): the mean over its online seeds (offline
    and validity metrics repeat across them, so their mean is the one value)."""
    by_model: Dict[tuple, list] = {}
    for r in recs:
        if metric in r:
            by_model.setdefault((r.get("world"), r["train_seed"]), []).append(r[metric])
    return {k: float(np.mean(v)) for k, v in by_model.items()}


def pool_records(runs: List[Dict[str, list]]) -> Dict[str, list]:
    """The default-world records of several ablation runs (e.g. a replicate on other worlds) as one set, for
    :func:`summarise`.  Rows missing from any run are left out; a trained model (world, training seed) that
    two runs share would be counted twice, so that is an error.  (Runs before session 6 recorded a world by
    its index, which is its simulator seed only where ``simulator.seed`` was 0.)"""
    rows = [r for r in runs[0] if all(r in run for run in runs[1:])]
    if "A" not in rows:
        raise ValueError("the runs share no row A (the click model every gain is paired with): nothing to pool")
    seen: Dict[tuple, int] = {}
    for k, run in enumerate(runs):
        for key in {(r["world"], r["train_seed"]) for r in run[rows[0]]}:
            if key in seen:
                raise ValueError(f"runs {seen[key]} and {k} both hold world {key[0]}, training seed {key[1]}: "
                                 "pool runs of different worlds (simulator.seed) only")
            seen[key] = k
    return {row: [rec for run in runs for rec in run[row]] for row in rows}


def format_ci(v: Dict[str, float] | None, digits: int) -> str:
    """``mean ±half`` of a :func:`summarise` entry with ``digits`` decimals: the mean alone where the half-width is
    NaN (one model), an empty cell where there is no entry or no mean."""
    if v is None or v["mean"] != v["mean"]:
        return ""
    return f"{v['mean']:.{digits}f}" + ("" if v["half"] != v["half"] else f" ±{v['half']:.{digits}f}")


def markdown_table(summary: Dict[str, dict]) -> str:
    cols = [("spearman_vs_satisfaction", "Spearman"), ("auc_good_vs_bad", "AUC bad"),
            ("auc_good_vs_clickbait", "AUC clickbait"), ("auc_good_vs_compulsive", "AUC compulsive"),
            ("satisfaction_per_session", "sat/session"), ("cumulative_satisfaction", "7-day sat"),
            ("return_rate", "return"), ("watch_time", "watch s"), ("ctr", "CTR"), ("hr@10", "HR@10"),
            ("ndcg@10_satisfied", "NDCG@10 sat"), ("gain_vs_A:satisfaction_per_session", "Δsat vs A"),
            ("gain_vs_B:satisfaction_per_session", "Δsat vs B"), ("gain_vs_A:return_rate", "Δreturn vs A"),
            ("gain_vs_B:return_rate", "Δreturn vs B")]
    lines = ["| row | " + " | ".join(c for _, c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row, res in summary.items():
        cells = [format_ci(res.get(key), 3) for key, _ in cols]
        lines.append(f"| {row} {ROW_NAMES[row]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_ablation(cfg: PipelineConfig, say: Callable[[str], None] | None = None) -> dict:
    """The whole ablation; writes ``results.json``, ``table.md`` (and ``gain_vs_beta.png`` with a sweep)."""
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    require_heldout(cfg.eval.heldout_user_share)
    ab = cfg.ablation
    out_dir = ab.out or RunLayout(cfg.run_dir).ablation
    os.makedirs(out_dir, exist_ok=True)
    rows = ["A"] + [r for r in ab.rows if r != "A"]
    sweep_rows = ["A"] + [r for r in ab.sweep_rows if r != "A"]
    t0 = time.time()
    # the default worlds, then one world per beta_s of the sweep: (simulator, rows, folder)
    plan = [(dataclasses.replace(cfg.simulator, seed=cfg.simulator.seed + w), rows, f"world{w}")
            for w in range(ab.worlds)]
    plan += [(dataclasses.replace(cfg.simulator, watch_satisfaction=float(b)), sweep_rows, f"beta{b}")
             for b in ab.beta_sweep]
    worlds = [simulate_world(cfg, sim, os.path.join(out_dir, folder)) for sim, _, folder in plan]
    units = [[SeedUnit(sim, w, tuple(r), t) for t in range(ab.train_seeds)] for w, (sim, r, _) in enumerate(plan)]
    done = iter(map_units(cfg, _run_rows, [(u.world, u) for group in units for u in group], worlds, say))
    by_group = [merge_records(list(group[0].rows), [next(done) for _ in group]) for group in units]
    records = merge_records(rows, by_group[:ab.worlds])
    # the models' settings too: pooled runs (commands/ablate.py) must have trained the same rows
    # heldout_user_share beside the ablation's own settings, under its old name: runs pool only with the same split
    settings = dataclasses.asdict(ab) | {"heldout_user_share": cfg.eval.heldout_user_share} \
        | {k: dataclasses.asdict(getattr(cfg, k)) for k in ("reward", "model", "rec")}
    result = {"default": summarise(records), "settings": settings, "sweep": {},
              "records": {"default": records}}
    for beta, recs in zip(ab.beta_sweep, by_group[ab.worlds:]):
        result["sweep"][str(beta)] = summarise(recs)
        result["records"][f"beta={beta}"] = recs
    result["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    table = markdown_table(result["default"])
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    if result["sweep"]:
        from mtrec_dist.evaluation.report import plot_gain_vs_beta

        plot_gain_vs_beta(result["sweep"], ROW_NAMES, os.path.join(out_dir, "gain_vs_beta.png"))
    result["table"] = table
    result["out_dir"] = out_dir
    return result
