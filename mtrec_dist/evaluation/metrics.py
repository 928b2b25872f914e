"""Ranking metrics, reward-validity statistics and confidence intervals (numpy in, Python floats out).

Rank convention: **0-based** — rank 0 is the top of the list.  ``rank_of_target`` is pessimistic about
ties (every other candidate whose score equals the target's is counted as ranked above it), so a model
that scores everything equally gets the worst rank, never a lucky one.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "rank_of_target",
    "hit_rate_at_k",
    "ndcg_at_k",
    "ranking_report",
    "sample_eval_negatives",
    "sampled_rank",
    "average_ranks",
    "spearman",
    "roc_auc",
    "t_critical_95",
    "mean_ci95",
    "bootstrap_ci95",
]


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def rank_of_target(scores, target, exclude=None) -> np.ndarray:
    """0-based rank of each row's target column among the non-excluded columns.

    scores [B, C] (higher = better), target [B] column indices, exclude [B, C] bool (True = not a
    candidate, e.g. the padding item or already-seen items; the target itself is never excluded).
    ``rank_b = #{c != t_b, not excluded: s_bc >= s_{b,t_b}}``.
    """
    s = _np(scores).astype(np.float64)
    t = _np(target).astype(np.int64).reshape(-1)
    if s.ndim != 2 or s.shape[0] != t.shape[0]:
        raise ValueError(f"scores must be [B, C] with B = len(target); got {s.shape} and {t.shape}")
    if (t < 0).any() or (t >= s.shape[1]).any():
        raise ValueError(f"target index out of range [0, {s.shape[1]})")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN/inf")
    rows = np.arange(len(t))
    target_score = s[rows, t][:, None]
    above = s >= target_score
    above[rows, t] = False
    if exclude is not None:
        ex = _np(exclude).astype(bool)
        if ex.shape != s.shape:
            raise ValueError(f"exclude has shape {ex.shape}, expected {s.shape}")
        above &= ~ex
    return above.sum(axis=1)


def optimistic_rank_of_target(scores, target) -> np.ndarray:
    """0-based rank of each row's target column, ties counted for the target (the ablation's full ranking).

    ``rank_b = #{c: s_bc > s_{b,t_b}}``; scores [B, C] (numpy or torch), target [B] column indices.
    """
    s = _np(scores)
    t = _np(target).astype(np.int64).reshape(-1)
    return (s > s[np.arange(len(t)), t][:, None]).sum(axis=1)


def hr_ndcg_all_and_satisfied(ranks, satisfied, k: int = 10) -> dict:
    """``hr@k``/``ndcg@k`` of 0-based target ranks over all rows, and ``..._satisfied`` over the rows whose target
    satisfied (``satisfied`` [B] bool)."""
    r, sat = _np(ranks), _np(satisfied).astype(bool)
    return {f"hr@{k}": hit_rate_at_k(r, k), f"ndcg@{k}": ndcg_at_k(r, k),
            f"hr@{k}_satisfied": hit_rate_at_k(r[sat], k), f"ndcg@{k}_satisfied": ndcg_at_k(r[sat], k)}


def hits_at_k(ranks, k: int) -> np.ndarray:
    """Per row ``1{rank_b < k}`` (0-based ranks): what :func:`hit_rate_at_k` averages."""
    return (_np(ranks) < k).astype(np.float64)


def ndcg_gains_at_k(ranks, k: int) -> np.ndarray:
    """Per row ``1{rank_b < k} / log2(rank_b + 2)`` (one relevant item per row): what :func:`ndcg_at_k` averages."""
    r = _np(ranks).astype(np.float64)
    return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


def hit_rate_at_k(ranks, k: int) -> float:
    """``HR@k = mean_b 1{rank_b < k}`` (0-based ranks)."""
    hits = hits_at_k(ranks, k)
    return float(np.mean(hits)) if hits.size else float("nan")


def ndcg_at_k(ranks, k: int) -> float:
    """``NDCG@k = mean_b 1{rank_b < k} / log2(rank_b + 2)`` (one relevant item per row, 0-based ranks)."""
    gains = ndcg_gains_at_k(ranks, k)
    return float(np.mean(gains)) if gains.size else float("nan")


def ranking_report(ranks, ks: Sequence[int] = (5, 10, 20), prefix: str = "") -> dict:
    """``{prefix}hr@k`` and ``{prefix}ndcg@k`` for each k, plus ``{prefix}mrr`` and ``{prefix}n``."""
    r = _np(ranks)
    out = {}
    for k in ks:
        out[f"{prefix}hr@{k}"] = hit_rate_at_k(r, k)
        out[f"{prefix}ndcg@{k}"] = ndcg_at_k(r, k)
    out[f"{prefix}mrr"] = float(np.mean(1.0 / (r + 1.0))) if r.size else float("nan")
    out[f"{prefix}n"] = int(r.size)
    return out


def sample_eval_negatives(targets, num_items: int, n: int, seed: int = 0, exclude: Optional[Sequence] = None) -> np.ndarray:
    """The sampled protocol's negatives: for each row, ``n`` distinct items drawn uniformly from 1..num_items,
    never the row's target nor any item in ``exclude[b]`` (e.g. the user's history).  -> [B, n] int64.

    Raises if a row has fewer than ``n`` eligible items.  Deterministic given ``seed``.
    """
    rng = np.random.default_rng(seed)
    t = _np(targets).astype(np.int64).reshape(-1)
    out = np.empty((len(t), n), dtype=np.int64)
    for b, target in enumerate(t):
        banned = {int(target)} | ({int(x) for x in exclude[b]} if exclude is not None else set())
        banned.discard(0)
        eligible = num_items - len({x for x in banned if 1 <= x <= num_items})
        if eligible < n:
            raise ValueError(f"row {b}: only {eligible} eligible negatives for n={n}")
        chosen: list = []
        seen = set(banned)
        while len(chosen) < n:  # rejection sampling; fine while n << num_items, exact otherwise
            draw = rng.integers(1, num_items + 1, size=2 * (n - len(chosen)) + 8)
            for x in draw.tolist():
                if x not in seen:
                    seen.add(x)
                    chosen.append(x)
                    if len(chosen) == n:
                        break
        out[b] = chosen
    return out


def sampled_rank(pos_scores, neg_scores) -> np.ndarray:
    """0-based rank of the target among itself and its sampled negatives (ties pessimistic).

    pos_scores [B], neg_scores [B, n] -> [B]: ``#{j: neg_bj >= pos_b}``."""
    p = _np(pos_scores).astype(np.float64).reshape(-1, 1)
    return (_np(neg_scores).astype(np.float64) >= p).sum(axis=1)


def average_ranks(x) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    a = _np(x).astype(np.float64).reshape(-1)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(len(a), dtype=np.float64)
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: Pearson correlation of average ranks (NaN when either side is constant)."""
    rx, ry = average_ranks(x), average_ranks(y)
    if len(rx) != len(ry):
        raise ValueError(f"spearman: lengths differ ({len(rx)} vs {len(ry)})")
    if len(rx) < 2:
        return float("nan")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties counting 1/2
    (Mann-Whitney U with average ranks).  NaN when only one class is present."""
    s = _np(scores).astype(np.float64).reshape(-1)
    lab = _np(labels).astype(bool).reshape(-1)
    if len(s) != len(lab):
        raise ValueError(f"roc_auc: {len(s)} scores vs {len(lab)} labels")
    n_pos, n_neg = int(lab.sum()), int((~lab).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = average_ranks(s)
    return float((r[lab].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# two-sided 95% Student-t critical values t_{0.975, df}
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_critical_95(df: int) -> float:
    """t_{0.975, df} from a table (next smaller tabulated df beyond 30, i.e. conservative); 1.96 past 120."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df in _T975:
        return _T975[df]
    if df > 120:
        return 1.960
    return _T975[max(k for k in _T975 if k <= df)]


def mean_ci95(values) -> Tuple[float, float]:
    """(mean, half-width) of the 95% t-interval ``mean ± t_{0.975,n-1} * sd / sqrt(n)``; half-width is NaN
    for a single value."""
    v = _np(values).astype(np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("mean_ci95 of no values")
    if v.size == 1:
        return float(v[0]), float("nan")
    sd = float(v.std(ddof=1))
    return float(v.mean()), t_critical_95(v.size - 1) * sd / math.sqrt(v.size)


def bootstrap_ci95(values, num_resamples: int = 1000, seed: int = 0, statistic=np.mean) -> Tuple[float, float, float]:
    """(statistic, 2.5th, 97.5th percentile) of the percentile bootstrap over ``values``."""
    v = _np(values).astype(np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("bootstrap_ci95 of no values")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(num_resamples, v.size))
    stats = np.array([statistic(v[i]) for i in idx])
    return float(statistic(v)), float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


RESAMPLE_CELLS = 10_000_000  # (resample, group) cells a bootstrap holds at once


def paired_relative_change_ci95(new, base, groups, num_resamples: int = 1000,
                                seed: int = 0) -> Tuple[float, float, float]:
    """``(change, 2.5th, 97.5th percentile)`` of the relative change of a per-row metric between two models
    scored on the same rows, ``sum(new) / sum(base) - 1`` (e.g. hits at 10: the relative change of HR@10), with
    a percentile bootstrap that resamples whole ``groups`` (users: one user's rows are not independent) and
    keeps each row's pair together.  NaN where ``base`` sums to 0; a resample whose ``base`` sums to 0 is left
    out (NaN bounds where every one is)."""
    new, base = _np(new).astype(np.float64).reshape(-1), _np(base).astype(np.float64).reshape(-1)
    _, g = np.unique(_np(groups).reshape(-1), return_inverse=True)
    if not (new.size == base.size == g.size) or new.size == 0:
        raise ValueError("paired_relative_change_ci95 needs the same non-zero number of new, base and group values")
    new_g, base_g = np.bincount(g, weights=new), np.bincount(g, weights=base)
    if base_g.sum() <= 0:
        return float("nan"), float("nan"), float("nan")
    change = new_g.sum() / base_g.sum() - 1.0
    rng = np.random.default_rng(seed)
    chunk = max(1, RESAMPLE_CELLS // new_g.size)  # resamples drawn at once: bounded memory for many users
    resampled = []
    for start in range(0, num_resamples, chunk):
        idx = rng.integers(0, new_g.size, size=(min(chunk, num_resamples - start), new_g.size))
        base_sums = base_g[idx].sum(1)
        ok = base_sums > 0  # a resample without any base value has no ratio: left out
        resampled.append(new_g[idx[ok]].sum(1) / base_sums[ok] - 1.0)
    resampled = np.concatenate(resampled)
    if not resampled.size:
        return float(change), float("nan"), float("nan")
    return float(change), float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))
