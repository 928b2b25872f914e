"""The mental reward's item level from counts of the logs: an empirical-Bayes prior with a sparse watch pull
(docs/method.md "The item prior"): pure numpy functions.

Why: an item's mean watch logit mixes its mental reward with a *pull* on watching ("can't stop watching",
or abandoned early) that says nothing about satisfaction; continuing the session is a choice against the
outside option and has no such pull, but one item's continuation rate is a noisy count. Fitted row by row,
the watch term wins (it is the sharper signal), so items watched long and then regretted come out on top.
Here both item-level signals are pooled per item and read under one model:

* ``C_a = logit(stay rate)`` (smoothed), ``C_a - C ~ N(lam_a M_a, vc_a)``: continuation follows the item
  level ``M_a`` (in the continuation logit's units, the units of ``Mbar``; ``lam_a < 1`` is the smoothing's
  shrinkage);
* ``W_a - W ~ N(k M_a + p_a, vw_a)``: the item's mean watch logit (duration removed) follows ``k M_a`` and
  a pull ``p_a``;
* ``M_a ~ N(0, s_M)``; ``p_a = 0`` with probability ``1 - pi`` and ``p_a ~ N(0, t)`` with probability ``pi``
  (most items are watched as they satisfy; a few have a pull of either sign).

An item whose watch level agrees with its continuation is read through both; one whose watch level is far
from what its continuation implies is read as pulled and its level comes mostly from continuation.  ``k``
(watch logit per unit of ``M``) is a setting (``reward.item_prior_watch_slope``): across items it is not
identified, because a pull that goes with low satisfaction (clickbait) looks like a steeper ``k``.
"""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, Sequence

import numpy as np

__all__ = ["ItemStats", "ItemSums", "SparsePullFit", "item_stats", "fit_sparse_pull", "sparse_pull_posterior",
           "item_prior", "item_prior_from_sums", "add_rows", "item_prior_of_rows", "STAY_PSEUDO_ROWS", "PRIOR_COLUMNS"]

PRIOR_COLUMNS = ("action", "done", "action_feedback", "action_log_duration")  # what the prior reads of each row

STAY_PSEUDO_ROWS = 5.0  # each item's stay rate is smoothed with this many rows at the overall rate
# Grid of the marginal likelihood (s_M, pi, t).  pi stops at 0.5 by the model's definition: a pull is the
# exception.  (Left free, the fit takes pi 0.9: then nearly every item "has a pull" and the model turns into
# a Gaussian one, which splits a compulsive item's pull between its level and its pull; bench/RESULTS.md.)
S_M_GRID = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64)
PI_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
T_GRID = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
NO_WATCH_VARIANCE = 1e6
MAX_FIT_ITEMS = 50_000  # the grid is fitted on at most this many items (a fixed sample), applied to all


class ItemStats(NamedTuple):
    """Per-item statistics, index = item index (0 = padding): rows ``n``, mean watch logit ``w_raw``, the same
    with the duration term removed ``w`` and its sampling variance ``vw``, the smoothed stay logit ``c``, its
    loading on the level ``lam = n / (n + 5)`` (smoothing shrinks it) and its sampling variance ``vc``."""

    n: np.ndarray
    w_raw: np.ndarray
    w: np.ndarray
    vw: np.ndarray
    c: np.ndarray
    lam: np.ndarray
    vc: np.ndarray


class SparsePullFit(NamedTuple):
    s_m: float  # prior variance of the item level M
    pi: float  # share of items with a pull
    t: float  # variance of a pull
    k: float  # watch logit per unit of M
    log_lik: float  # marginal log-likelihood at the fit (items with rows)


class ItemSums:
    """Sufficient statistics of :func:`item_stats`, added up one batch of rows at a time (O(items) memory:
    the rows themselves are never held)."""

    PER_ITEM = ("n", "z", "zz", "d", "dd", "zd", "stay")

    def __init__(self, num_items: int) -> None:
        self.num_items = int(num_items)
        self.sums = {k: np.zeros(num_items + 1) for k in self.PER_ITEM}

    def add(self, action: np.ndarray, stay: np.ndarray, watch_logit: np.ndarray, log_duration: np.ndarray) -> None:
        a = np.asarray(action, np.int64)
        z, ld, st = (np.asarray(x, np.float64) for x in (watch_logit, log_duration, stay))
        size = self.num_items + 1
        for key, w in (("n", None), ("z", z), ("zz", z * z), ("d", ld), ("dd", ld * ld), ("zd", z * ld),
                       ("stay", st)):
            self.sums[key] += np.bincount(a, w, size)

    def stats(self) -> ItemStats:
        """``r = z - b log_duration`` with ``b`` the least-squares slope over all rows (a long item is abandoned
        whatever it is worth); ``w_a = mean_a r``; ``vw_a = var_within(r) / n_a`` (the pooled within-item
        variance; a source whose watch logit never varies, one without a watch signal, gets a within-item
        variance of 1e6: its watch level then says nothing and the level comes from continuation alone);
        ``p_a = (sum_a stay + 5 pbar) / (n_a + 5)``, ``c_a = logit p_a``, ``lam_a = n_a / (n_a + 5)``, ``vc_a = n_a / ((n_a + 5)^2 p_a (1 - p_a))`` (delta method).  Items
        without rows get ``n = 0`` and the overall means."""
        s = self.sums
        n, total = s["n"], float(s["n"].sum())
        if total == 0:
            raise ValueError("item prior: no rows to count")
        mz, md = s["z"].sum() / total, s["d"].sum() / total
        var_d = s["dd"].sum() - total * md * md
        b = float((s["zd"].sum() - total * mz * md) / var_d) if var_d > 1e-9 * total else 0.0
        seen = n > 0
        safe_n = np.maximum(n, 1.0)
        r_sum = s["z"] - b * s["d"]
        rr_sum = s["zz"] - 2 * b * s["zd"] + b * b * s["dd"]
        w_raw = np.where(seen, s["z"] / safe_n, mz)
        w = np.where(seen, r_sum / safe_n, mz - b * md)
        within = float(np.maximum(rr_sum - r_sum * r_sum / safe_n, 0.0).sum() / max(total - seen.sum(), 1.0))
        within = within if within > 1e-9 else NO_WATCH_VARIANCE  # no watch signal: its level says nothing
        pbar = float(s["stay"].sum() / total)
        p = np.clip((s["stay"] + STAY_PSEUDO_ROWS * pbar) / (n + STAY_PSEUDO_ROWS), 1e-4, 1 - 1e-4)
        lam = n / (n + STAY_PSEUDO_ROWS)
        vc = np.maximum(n, 1e-3) / ((n + STAY_PSEUDO_ROWS) ** 2 * p * (1 - p))
        return ItemStats(n=n, w_raw=w_raw, w=w, vw=within / safe_n, c=np.log(p / (1 - p)), lam=lam, vc=vc)


def item_stats(action: np.ndarray, stay: np.ndarray, watch_logit: np.ndarray, log_duration: np.ndarray,
               num_items: int) -> ItemStats:
    """:meth:`ItemSums.stats` of one set of rows (``action`` in 1..num_items)."""
    sums = ItemSums(num_items)
    sums.add(action, stay, watch_logit, log_duration)
    return sums.stats()


def _covariances(stats: ItemStats, idx, s_m: float, k: float, t: float):
    """Marginal covariances of ``x = (w, c)`` without and with a pull, each as (s11, s12, s22) arrays:
    ``S0 = [[k^2 s_M + vw, k lam s_M], [k lam s_M, lam^2 s_M + vc]]``, ``S1 = S0 + t e1 e1^T``."""
    vw, vc, lam = stats.vw[idx], stats.vc[idx], stats.lam[idx]
    s11, s12, s22 = k * k * s_m + vw, k * lam * s_m, lam * lam * s_m + vc
    return (s11, s12, s22), (s11 + t, s12, s22)


def _log_normal2(x1, x2, s11, s12, s22):
    det = s11 * s22 - s12 * s12
    quad = (s22 * x1 * x1 - 2 * s12 * x1 * x2 + s11 * x2 * x2) / det
    return -0.5 * (quad + np.log(det)) - np.log(2 * np.pi)


def _centred(stats: ItemStats):
    seen = stats.n > 0
    wts = stats.n[seen]
    return stats.w - np.average(stats.w[seen], weights=wts), stats.c - np.average(stats.c[seen], weights=wts), seen


def fit_sparse_pull(stats: ItemStats, k: float, grid: Sequence[Sequence[float]] = (S_M_GRID, PI_GRID, T_GRID),
                    max_items: int = MAX_FIT_ITEMS) -> SparsePullFit:
    """Maximise the marginal likelihood ``sum_a log((1-pi) N(x_a; 0, S0_a) + pi N(x_a; 0, S1_a))`` over the
    grid of ``(s_M, pi, t)``, where ``x_a = (w_a - w., c_a - c.)`` (count-weighted means over items with
    rows) and ``S0_a``, ``S1_a`` are :func:`_covariances`."""
    x1, x2, seen = _centred(stats)
    idx = np.flatnonzero(seen)
    if len(idx) > max_items:  # a fixed sample: the same items every time
        idx = np.sort(np.random.default_rng(0).choice(idx, max_items, replace=False))
    x1, x2 = x1[idx], x2[idx]
    best = None
    for s_m in grid[0]:
        for t in grid[2]:
            c0, c1 = _covariances(stats, idx, s_m, k, t)
            l0, l1 = _log_normal2(x1, x2, *c0), _log_normal2(x1, x2, *c1)
            for pi in grid[1]:
                ll = float(np.logaddexp(l0 + np.log1p(-pi), l1 + np.log(pi)).sum())
                if best is None or ll > best.log_lik:
                    best = SparsePullFit(float(s_m), float(pi), float(t), float(k), ll)
    return best


def sparse_pull_posterior(stats: ItemStats, fit: SparsePullFit) -> Dict[str, np.ndarray]:
    """Posterior of each item's level and pull under ``fit``:

    ``P(pull | x) = pi N(x; S1) / ((1-pi) N(x; S0) + pi N(x; S1))``;
    ``E[M | x, j] = (k s_M, lam s_M) S_j^-1 x``;  ``level = (1 - P) E[M | x, 0] + P E[M | x, 1]``
    (0 for items without rows: the prior mean).  Returns ``{"level", "p_pull"}`` indexed by item.
    """
    x1, x2, seen = _centred(stats)
    k, s_m = fit.k, fit.s_m
    out_m, out_p = np.zeros_like(x1), np.zeros_like(x1)
    g1, g2 = k * s_m, stats.lam * s_m  # Cov(M, x)
    logs, means = [], []
    for s11, s12, s22 in _covariances(stats, slice(None), s_m, k, fit.t):
        det = s11 * s22 - s12 * s12
        means.append((g1 * (s22 * x1 - s12 * x2) + g2 * (-s12 * x1 + s11 * x2)) / det)
        logs.append(_log_normal2(x1, x2, s11, s12, s22))
    l0, l1 = logs[0] + np.log1p(-fit.pi), logs[1] + np.log(fit.pi)
    p = np.exp(l1 - np.logaddexp(l0, l1))
    out_m[seen] = ((1 - p) * means[0] + p * means[1])[seen]
    out_p[seen] = p[seen]
    return {"level": out_m, "p_pull": out_p}


def item_prior(action: np.ndarray, stay: np.ndarray, watch_logit: np.ndarray, log_duration: np.ndarray,
               num_items: int, k: float) -> Dict[str, Any]:
    """:func:`item_prior_from_sums` of one set of rows."""
    sums = ItemSums(num_items)
    sums.add(action, stay, watch_logit, log_duration)
    return item_prior_from_sums(sums, k)


def item_prior_from_sums(sums: ItemSums, k: float) -> Dict[str, Any]:
    """Everything the reward model needs: ``level`` (added to ``Mbar``) and ``watch_level`` (the item's mean
    watch logit: the watch link's per-item offset is ``watch_level - k_y level``, so the watch term adds only
    what varies within an item), with ``p_pull`` and the fit's parameters."""
    stats = sums.stats()
    fit = fit_sparse_pull(stats, k)
    post = sparse_pull_posterior(stats, fit)
    level = post["level"]
    level[0] = 0.0
    return {"level": level.astype(np.float32), "watch_level": stats.w_raw.astype(np.float32),
            "p_pull": post["p_pull"].astype(np.float32), "fit": fit._asdict()}


def add_rows(sums: ItemSums, rows: Dict[str, np.ndarray]) -> None:
    """Add transition rows given as arrays of the schema's :data:`PRIOR_COLUMNS` to ``sums``: stay is
    ``1 - done``, the watch logit that of ``action_feedback`` (the consequence model's own clipping)."""
    import torch

    from .mental_reward import watch_logit

    z = watch_logit(torch.from_numpy(np.asarray(rows["action_feedback"], np.float64))).numpy()
    sums.add(rows["action"], 1.0 - np.asarray(rows["done"], np.float64), z, rows["action_log_duration"])


def item_prior_of_rows(rows: Dict[str, np.ndarray], num_items: int, k: float) -> Dict[str, Any]:
    """:func:`item_prior_from_sums` of one set of transition rows (:func:`add_rows`)."""
    sums = ItemSums(num_items)
    add_rows(sums, rows)
    return item_prior_from_sums(sums, k)
