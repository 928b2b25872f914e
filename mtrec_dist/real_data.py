"""`mtrec ablate` on real logs (``source: logs``): reward validity and guidance without a simulator.

Real logs have no hidden truth, only a withheld satisfaction signal (ratings, likes, long views: the
``eval/`` table of a prepared dataset, which training never reads).  On a held-out share of the users
(never fitted on), we compare how well each candidate reward predicts that signal:

* item popularity (training-row frequency), the click model's own score (SASRec trained on clicks),
* B: a supervised watch-ratio regressor (only where the logs carry a watch signal),
* C: a supervised leave/return classifier, D: IQ-Learn v1, F: QR-IQL v2 (the mental reward),

and whether guidance by F (and B; G guides by F's lower tail, I by F's advantages shuffled) keeps or improves the
satisfied targets offline (HR/NDCG@10 on the
held-out users' rows, all and satisfied).  Row H guides by the withheld signal itself (the training users'
ratings of their logged items, which no other row reads): the ceiling of what reweighting by a reward can do
on these logs.  With ``ablation.tilt_strengths``, row "F tilt" ranks with A's SASRec tilted by F's reward at serving
(:mod:`mtrec_dist.serving_tilt`).  The logs go through ``mtrec prepare`` first (the same readers,
validation and windowing as the pipeline), so any format prepare reads runs here, e.g. a generic CSV
with ``user,item,rating,ts`` columns.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import pyarrow.dataset as pads
import torch

from mtrec_dist.ablation import (
    ROW_NAMES, fit, format_ci, guidance_columns, map_units, offline_ranking, reward_key, row_guidance, row_scorer,
    score_reward, summarise, v_full,
)
from mtrec_dist.config import PipelineConfig
from mtrec_dist.data.dataset import load_manifest
from mtrec_dist.data.heldout import split_rows
from mtrec_dist.data.pipeline import collate_transitions
from mtrec_dist.data.sessionize import with_later_items
from mtrec_dist.evaluation.metrics import roc_auc, spearman
from mtrec_dist.evaluation.offline import eval_rows, read_eval_table, satisfied_labels
from mtrec_dist.models.recommender import SequentialRecommender
from mtrec_dist.serving_tilt import TILTED_REWARD, tilt_ranking


# the row of ablation.tilt_strengths (real logs only): A's SASRec, F's reward, no training of its own
TILT_ROW = "F tilt"
# rows whose meaning on real logs differs from the simulator's (ROW_NAMES), and the rows only logs have
LOG_ROW_NAMES = {"H": "oracle: the withheld signal of the logged item",
                 TILT_ROW: "(A's SASRec, its scores tilted by F's reward at serving; "
                           "strength chosen on validation users)"}


def prepared_data(prepared_dir: str, order_items: int = 0) -> Dict[str, np.ndarray]:
    """Prepared transitions (with their return labels) as numpy columns in each user's order, a sample of each
    choice's later choices in its session (``later_items``, where ``order_items`` > 0) and the withheld
    satisfaction (``satisfaction`` graded, ``satisfied`` bool) aligned by row id.

    Real logs are self-directed (they come without impressions, so prepare writes no slates/: the user, not
    a feed, chose what came next), so the order of a session's choices is the user's own and the order term
    may read it."""
    load_manifest(prepared_dir)  # refuses a dataset of another schema version, naming it
    table = pads.dataset(os.path.join(prepared_dir, "transitions"), format="parquet").to_table()
    if order_items > 0:
        table = with_later_items(table, k=order_items)
    batch = {k: v.numpy() for k, v in collate_transitions(table).items()}
    order = np.lexsort((batch["row_id"], batch["user_idx"]))  # each user's sequence
    data = {k: v[order] for k, v in batch.items()}
    data["user"] = data.pop("user_idx")
    ev = read_eval_table(prepared_dir)
    satisfied, graded, _ = satisfied_labels(ev)
    idx = eval_rows(ev, data["row_id"])
    data["satisfied"], data["satisfaction"] = satisfied[idx], graded[idx]
    return data


def _validity(scores: np.ndarray, data, rows) -> dict:
    return {"auc_satisfied": roc_auc(scores, data["satisfied"][rows].astype(int)),
            "spearman_vs_signal": spearman(scores, data["satisfaction"][rows])}


def _row_label(row: str) -> str:
    return f"{row} {LOG_ROW_NAMES[row] if row in LOG_ROW_NAMES else ROW_NAMES[row]}"


def run_real_data(cfg: PipelineConfig, prepared_dir: str, say: Callable[[str], None] | None = None) -> dict:
    """Validity of every reward on held-out users' rows, and offline ranking of the guided SASRecs, for
    ``ablation.train_seeds`` training seeds ``train.seed, train.seed + 1, ...``: means with 95% t-intervals over
    the seeds, and each guided row's gains over A paired by seed (the seed sets the initial weights and the batch
    order).  The held-out users are the same at every seed, so the intervals cover training randomness only."""
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    ab, t0 = cfg.ablation, time.time()
    data = prepared_data(prepared_dir, cfg.reward.order_items)
    num_items = int(data["action"].max())
    train, test = split_rows(data["user"], cfg.eval.heldout_user_share)
    has_watch = bool((data["action_feedback"][train] < 1.0).any())
    say(f"[ablate] {len(data['action']):,} transitions, {num_items:,} items; {len(test):,} held-out rows "
        f"({len(test) / len(data['action']):.0%}); satisfied share {data['satisfied'][test].mean():.3f}; "
        f"watch signal: {has_watch}")
    rows = [r for r in ["A"] + list(ab.rows) if r in ROWS_ON_LOGS]
    rows = [r for i, r in enumerate(rows) if r not in rows[:i] and (r != "B" or has_watch)]
    left_out = [r for r in ab.rows if r not in rows]
    if left_out:
        say(f"[ablate] rows {left_out} left out on logs: {'B needs a watch signal; ' if 'B' in left_out else ''}"
            f"these logs run {list(ROWS_ON_LOGS)}")
    if "H" in rows and np.isnan(data["satisfaction"][train]).any():
        raise ValueError("ablation row H guides by the withheld signal, which is missing on some training rows of "
                         f"{prepared_dir} (eval/): leave H out of ablation.rows for these logs")
    pop = np.bincount(data["action"][train], minlength=num_items + 1).astype(np.float64)
    popularity = _validity(pop[data["action"][test]], data, test)  # fitted to no seed: one value for every seed
    seeds = list(range(cfg.train.seed, cfg.train.seed + ab.train_seeds))
    shared = {"data": data, "train": train, "test": test, "rows": rows, "num_items": num_items}
    validity: Dict[str, list] = {}
    offline: Dict[str, list] = {}
    for seed, (scores, rankings) in zip(seeds, map_units(cfg, _rows_at_seed, [(0, s) for s in seeds], [shared], say)):
        validity.setdefault("popularity", []).append({"train_seed": seed, **popularity})
        for name, v in scores.items():
            validity.setdefault(name, []).append(v)
        for row, r in rankings.items():
            offline.setdefault(row, []).append(r)
    summary = {"validity": summarise(validity), "offline": summarise(offline)}
    table = real_data_table(**summary, tilt_strengths=[r["tilt_strength"] for r in offline.get(TILT_ROW, [])])
    return {**summary, "records": {"validity": validity, "offline": offline}, "seeds": seeds,
            "seconds": round(time.time() - t0, 1), "table": table, "has_watch": has_watch}


def _rows_at_seed(cfg: PipelineConfig, shared: dict, seed: int, say: Callable[[str], None]):
    """Every row at one training seed: ``({reward name: validity record}, {row: offline ranking record})``,
    in row order (one job of :func:`~mtrec_dist.ablation.map_units`)."""
    data, train, test, num_items = shared["data"], shared["train"], shared["test"], shared["num_items"]
    validity: Dict[str, dict] = {}
    offline: Dict[str, dict] = {}
    cache: dict = {}
    for row in shared["rows"]:
        t = time.time()
        scores, ranking = _ablation_row_at_seed(row, cfg, data, train, test, num_items, seed, cache)
        validity.update({name: {"train_seed": seed, **v} for name, v in scores.items()})
        if ranking is not None:
            offline[row] = {"train_seed": seed, **ranking}
        say(f"[ablate] seed {seed} row {_row_label(row)}: "
            + json.dumps({"validity": scores, "offline": ranking}) + f" ({time.time() - t:.0f}s)")
    if cfg.ablation.tilt_strengths:
        t = time.time()
        reward = row_scorer(TILTED_REWARD, cfg, None, None, data, train, num_items, seed, cache)
        click_ranking = {k: v for k, v in offline["A"].items() if k != "train_seed"}
        ranking = tilt_ranking(cfg, data, train, test, num_items, seed, cache[("rec", "A")], click_ranking, reward)
        offline[TILT_ROW] = {"train_seed": seed, **ranking}
        say(f"[ablate] seed {seed} row {_row_label(TILT_ROW)}: {json.dumps(ranking)} ({time.time() - t:.0f}s)")
    return validity, offline


# the rows `mtrec ablate` runs on logs, and those of them that train a SASRec (C and D only fit a reward, whose
# validity is measured)
ROWS_ON_LOGS = ("A", "B", "C", "D", "F", "G", "H", "I")
GUIDED_ON_LOGS = ("A", "B", "F", "G", "H", "I")


def _ablation_row_at_seed(row: str, cfg: PipelineConfig, data, train, test, num_items: int, seed: int,
                          cache: dict) -> Tuple[Dict[str, dict], Optional[dict]]:
    """One ablation row at one training seed: ``(validity by reward name, offline ranking)``.  The validity is
    that of the row's fitted reward on the held-out rows (named by the row); row A's is the click model's own
    score of the logged item (``click model``).  The ranking is that of the SASRec the row guides (None for
    rows that guide none here)."""
    scores: Dict[str, dict] = {}
    scorer = None if row == "H" else row_scorer(row, cfg, None, None, data, train, num_items, seed, cache)
    if scorer is not None and reward_key(row) == row:  # G and I read F's reward: its validity is F's
        scores[row] = _validity(score_reward(scorer, data, test, num_items)["reward_mean"], data, test)
    if row not in GUIDED_ON_LOGS:
        return scores, None
    scored = ("scores", reward_key(row))  # F, G and I guide by the same scores of the training rows
    if scorer is not None and scored not in cache:
        cache[scored] = score_reward(scorer, data, train, num_items)
    cols = withheld_signal_columns(data, train) if row == "H" else guidance_columns(row, cache.get(scored), seed)
    extra = None if cols is None else {k: v_full(v, train, len(data["action"])) for k, v in cols.items()}
    rec_cfg = dataclasses.replace(cfg.rec, guidance=row_guidance(row))
    rec = fit(lambda: SequentialRecommender(num_items, "sasrec", cfg.model, rec_cfg, data["state_items"].shape[1]),
              data, train, cfg.ablation, seed, cfg.ablation.rec_epochs, extra)
    if row == "A":
        scores["click model"] = _validity(_logged_scores(rec, data, test), data, test)
        cache[("rec", "A")] = rec  # the tilt row (ablation.tilt_strengths) ranks with it
    return scores, offline_ranking(rec, data, test, num_items)


def withheld_signal_columns(data, train: np.ndarray) -> Dict[str, np.ndarray]:
    """Row H's guidance on real logs: the withheld graded signal of each training row's logged item (a rating,
    else the satisfied label: ``evaluation.offline.satisfied_labels``) as the reward, against a constant
    baseline (the weights standardise it over each batch)."""
    signal = data["satisfaction"][train].astype(np.float32)
    zero = np.zeros_like(signal)
    return dict(reward_mean=signal, reward_baseline=zero, reward_cvar=signal, reward_cvar_baseline=zero)


@torch.no_grad()
def _logged_scores(rec: SequentialRecommender, data, rows) -> np.ndarray:
    out = []
    for start in range(0, len(rows), 2048):
        idx = rows[start:start + 2048]
        sc = rec.score_items(torch.from_numpy(data["state_items"][idx]), torch.from_numpy(data["state_feedback"][idx]),
                             torch.from_numpy(data["action"][idx]).view(-1, 1))
        out.append(sc[:, 0].numpy())
    return np.concatenate(out)


def real_data_table(validity: Dict[str, dict], offline: Dict[str, dict], tilt_strengths: Sequence[float] = ()) -> str:
    """Markdown: the rewards' validity, then the guided SASRecs with their gains over A (95% CIs over seeds), and
    the tilt row's strength at each seed."""
    lines = ["| reward | AUC (satisfied) | Spearman (signal) |", "|---|---|---|"]
    for name, v in validity.items():
        label = _row_label(name) if name in ROW_NAMES or name in LOG_ROW_NAMES else name
        lines.append(f"| {label} | {format_ci(v['auc_satisfied'], 4)} | {format_ci(v['spearman_vs_signal'], 4)} |")
    lines += ["", "| SASRec guided by | HR@10 | NDCG@10 | HR@10 satisfied | NDCG@10 satisfied | "
                  "ΔNDCG@10 satisfied vs A | ΔHR@10 vs A |", "|---|---|---|---|---|---|---|"]
    for name, r in offline.items():
        cells = [r.get(k) for k in ("hr@10", "ndcg@10", "hr@10_satisfied", "ndcg@10_satisfied",
                                    "gain_vs_A:ndcg@10_satisfied", "gain_vs_A:hr@10")]
        lines.append(f"| {_row_label(name)} | " + " | ".join(format_ci(c, 4) for c in cells) + " |")
    if tilt_strengths:
        lines += ["", f"{TILT_ROW}: strength chosen on validation users, seed by seed: "
                      + ", ".join(f"{b:g}" for b in tilt_strengths)]
    return "\n".join(lines)
