"""Guidance at serving time on real logs (`mtrec ablate`, ``ablation.tilt_strengths``): the click-trained
SASRec's catalog scores tilted by the mental reward, ``s + beta z(R)``
(:func:`~mtrec_dist.objectives.guidance.reward_tilt`), with the strength ``beta`` chosen on validation users.

Why a tilt, and why validated: on a rating log the mental reward is an item level read from the order of choices
(docs/method.md).  Reweighting the training loss by it moves the next-item model toward liked items in general and,
at the strength that helps in the simulator, costs more than it gains (bench/RESULTS.md, MovieLens-1M).  A tilt of
a fitted click model gains in the first order of ``beta`` wherever the reward tells liked targets from others, and
costs in the second (the click model is at its optimum), so the right strength is small and depends on how much the
reward knows.  It is chosen from ``{0} + ablation.tilt_strengths`` by NDCG@10 on the satisfied targets of
validation users (:func:`~mtrec_dist.data.heldout.split_validation`: training users, never the held-out ones)
with a click model and a reward fitted without them.  That choice is the one place a withheld label is read
outside the oracle row: one number, on users no reported metric is measured on.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import torch

from mtrec_dist.ablation import click_sasrec, fit, reward_model
from mtrec_dist.data.heldout import split_validation
from mtrec_dist.evaluation.metrics import hr_ndcg_all_and_satisfied, optimistic_rank_of_target
from mtrec_dist.models.recommender import SequentialRecommender
from mtrec_dist.objectives.guidance import reward_tilt

TILTED_REWARD = "F"  # the ablation row whose reward tilts row A's model

ROWS_PER_CHUNK = 256  # the reward's quantiles over the catalog: [rows, catalog, quantiles] floats at once


@torch.no_grad()
def tilted_ranks(rec: SequentialRecommender, reward: Callable, data, rows: np.ndarray, num_items: int,
                 strengths: Sequence[float]) -> Dict[float, np.ndarray]:
    """Per strength, the 0-based rank of each row's logged item under ``reward_tilt(rec's scores, mean reward,
    strength)`` over the whole catalog; ``reward(states, feedback, candidates [B, C], row ids) -> [B, C, N]``."""
    ranks = {b: np.zeros(len(rows), np.int64) for b in strengths}
    catalog = torch.arange(1, num_items + 1)
    for start in range(0, len(rows), ROWS_PER_CHUNK):
        idx = rows[start:start + ROWS_PER_CHUNK]
        s, fb = torch.from_numpy(data["state_items"][idx]), torch.from_numpy(data["state_feedback"][idx])
        scores = rec.score_catalog(s, fb, catalog)
        mean_reward = reward(s, fb, catalog.expand(len(idx), -1), idx).mean(-1)
        for b in strengths:
            tilted = reward_tilt(scores, mean_reward, b)
            ranks[b][start:start + len(idx)] = optimistic_rank_of_target(tilted, data["action"][idx] - 1)
    return ranks


def choose_strength(cfg, data, train: np.ndarray, num_items: int, seed: int) -> Tuple[float, Dict[str, float]]:
    """``(beta, {str(beta): validation NDCG@10 on satisfied targets})``: the strength in ``{0} +
    ablation.tilt_strengths`` whose tilt ranks the validation users' satisfied targets best (the smaller on a tie),
    with a click SASRec and a QR-IQL v2 reward fitted on the other training users at ``seed``."""
    ab = cfg.ablation
    fit_rows, validation = split_validation(data["user"][train], cfg.eval.heldout_user_share, ab.validation_user_share)
    fit_rows, validation = train[fit_rows], train[validation]
    if not len(validation) or not data["satisfied"][validation].any():
        raise ValueError(f"no validation rows with a satisfied target (ablation.validation_user_share "
                         f"{ab.validation_user_share}): too few users to choose the tilt's strength")
    rec = fit(click_sasrec(cfg, num_items, data["state_items"].shape[1]), data, fit_rows, ab, seed, ab.rec_epochs)
    reward = reward_model(TILTED_REWARD, cfg, num_items, data, fit_rows, seed)
    strengths = sorted({0.0, *map(float, ab.tilt_strengths)})
    ranks = tilted_ranks(rec, reward, data, validation, num_items, strengths)
    sat = data["satisfied"][validation]
    ndcg = {b: hr_ndcg_all_and_satisfied(r, sat)["ndcg@10_satisfied"] for b, r in ranks.items()}
    best = max(strengths, key=lambda b: (ndcg[b], -b))
    return best, {f"{b:g}": v for b, v in ndcg.items()}


def tilt_ranking(cfg, data, train: np.ndarray, test: np.ndarray, num_items: int, seed: int,
                 click_model: SequentialRecommender, click_ranking: dict, reward: Callable) -> dict:
    """The tilt row's offline record at ``seed``: the held-out rows ranked by ``click_model`` (row A's SASRec, whose
    own ranking is ``click_ranking``) tilted by ``reward`` (row F's) at the strength chosen on validation users, with
    that strength and the validation NDCG@10 (satisfied) of each candidate strength (flat keys: the summary averages
    them over seeds)."""
    beta, on_validation = choose_strength(cfg, data, train, num_items, seed)
    if beta == 0:  # no tilt: the click model's own ranking, already measured (no catalog-wide reward to score)
        ranking = click_ranking
    else:
        ranking = hr_ndcg_all_and_satisfied(tilted_ranks(click_model, reward, data, test, num_items, [beta])[beta],
                                            data["satisfied"][test])
    return {**ranking, "tilt_strength": beta,
            **{f"validation ndcg@10_satisfied, beta {b}": v for b, v in on_validation.items()}}
