"""Ranking metrics, reward-validity statistics and confidence intervals against hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtrec_dist.evaluation.metrics import (
    average_ranks,
    bootstrap_ci95,
    hit_rate_at_k,
    hr_ndcg_all_and_satisfied,
    mean_ci95,
    ndcg_at_k,
    optimistic_rank_of_target,
    rank_of_target,
    ranking_report,
    roc_auc,
    sample_eval_negatives,
    sampled_rank,
    spearman,
    t_critical_95,
)


def test_optimistic_rank_counts_ties_for_the_target_and_reads_torch():
    scores = np.array([[0.1, 0.9, 0.5, 0.3],
                       [0.2, 0.2, 0.2, 0.1],   # tie: the two equal others do not count above the target
                       [0.9, 0.1, 0.8, 0.7]])
    assert optimistic_rank_of_target(scores, [1, 0, 0]).tolist() == [0, 0, 0]
    assert optimistic_rank_of_target(torch.tensor(scores), torch.tensor([3, 3, 1])).tolist() == [2, 3, 3]


def test_hr_ndcg_all_and_satisfied_hand_values():
    ranks, satisfied = np.array([0, 3, 12, 1]), np.array([True, False, True, True])
    got = hr_ndcg_all_and_satisfied(ranks, satisfied, k=10)
    gains = [1.0, 1 / math.log2(5), 0.0, 1 / math.log2(3)]
    assert got["hr@10"] == 0.75 and got["hr@10_satisfied"] == pytest.approx(2 / 3)
    assert got["ndcg@10"] == pytest.approx(sum(gains) / 4)
    assert got["ndcg@10_satisfied"] == pytest.approx((gains[0] + gains[3]) / 3)


def test_rank_of_target_zero_based_and_pessimistic_ties():
    scores = np.array([[0.1, 0.9, 0.5, 0.3],
                       [0.2, 0.2, 0.2, 0.1],   # tie: the two equal others count above the target
                       [0.9, 0.1, 0.8, 0.7]])
    assert rank_of_target(scores, [1, 0, 0]).tolist() == [0, 2, 0]
    assert rank_of_target(scores, [3, 3, 1]).tolist() == [2, 3, 3]
    # excluded columns (e.g. padding, seen items) never count
    exclude = np.zeros_like(scores, dtype=bool)
    exclude[:, 1] = True
    assert rank_of_target(scores, [2, 3, 1], exclude).tolist() == [0, 2, 3]  # the target itself stays
    assert rank_of_target(torch.tensor(scores), torch.tensor([1, 0, 0])).tolist() == [0, 2, 0]
    with pytest.raises(ValueError, match="out of range"):
        rank_of_target(scores, [4, 0, 0])
    with pytest.raises(ValueError, match="NaN"):
        rank_of_target(np.array([[np.nan, 1.0]]), [0])


def test_hit_rate_and_ndcg_hand_values():
    ranks = np.array([0, 1, 4, 10])
    assert hit_rate_at_k(ranks, 1) == 0.25
    assert hit_rate_at_k(ranks, 5) == 0.75
    assert hit_rate_at_k(ranks, 20) == 1.0
    expected5 = (1.0 + 1 / math.log2(3) + 1 / math.log2(6) + 0.0) / 4
    assert ndcg_at_k(ranks, 5) == pytest.approx(expected5)
    expected20 = (1.0 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(12)) / 4
    assert ndcg_at_k(ranks, 20) == pytest.approx(expected20)
    rep = ranking_report(ranks, ks=(5,), prefix="all/")
    assert rep["all/hr@5"] == 0.75 and rep["all/n"] == 4
    assert rep["all/mrr"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 11) / 4)


def test_sampled_protocol():
    targets = np.array([3, 7])
    neg = sample_eval_negatives(targets, num_items=20, n=10, seed=0, exclude=[[1, 2], []])
    assert neg.shape == (2, 10)
    for b in range(2):
        assert len(set(neg[b])) == 10 and targets[b] not in neg[b] and neg[b].min() >= 1 and neg[b].max() <= 20
    assert not ({1, 2} & set(neg[0]))
    assert np.array_equal(neg, sample_eval_negatives(targets, 20, 10, seed=0, exclude=[[1, 2], []]))
    with pytest.raises(ValueError, match="eligible"):
        sample_eval_negatives([1], num_items=5, n=5)
    assert sampled_rank([0.5, 0.5], [[0.1, 0.6, 0.5], [0.0, 0.1, 0.2]]).tolist() == [2, 0]


def test_average_ranks_and_spearman():
    assert average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # hand value with ties: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]; Pearson of those
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4.0])
    ref = ((rx - rx.mean()) * (ry - ry.mean())).sum() / math.sqrt(((rx - rx.mean()) ** 2).sum() * ((ry - ry.mean()) ** 2).sum())
    assert spearman([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(ref)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_roc_auc_hand_values():
    assert roc_auc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.1, 0.3, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    # pairs (pos, neg): (0.8, 0.3) win, (0.8, 0.9) lose, (0.3, 0.3) tie, (0.3, 0.9) lose -> 1.5 / 4
    assert roc_auc([0.8, 0.3, 0.3, 0.9], [1, 1, 0, 0]) == pytest.approx(0.375)
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_confidence_intervals():
    mean, half = mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))
    assert t_critical_95(1) == 12.706 and t_critical_95(35) == 2.042 and t_critical_95(1000) == 1.96
    m, h = mean_ci95([4.2])
    assert m == 4.2 and math.isnan(h)
    stat, lo, hi = bootstrap_ci95(np.arange(100.0), num_resamples=500, seed=0)
    assert stat == 49.5 and lo < 49.5 < hi and hi - lo < 25


def test_paired_relative_change_resamples_whole_users_and_keeps_pairs():
    from mtrec_dist.evaluation.metrics import paired_relative_change_ci95

    # hits at 10 of two models on 6 rows of 3 users: 2 hits against 4, so -50%
    new = [1, 0, 0, 1, 0, 0]
    base = [1, 1, 0, 1, 1, 0]
    users = [7, 7, 8, 8, 9, 9]
    change, lo, hi = paired_relative_change_ci95(new, base, users, num_resamples=2000, seed=1)
    assert change == pytest.approx(-0.5)
    # per user (new, base) sums: 7 -> (1, 2), 8 -> (1, 1), 9 -> (0, 1); a resample of users takes whole pairs,
    # so its change lies between user 9 alone (-100%) and user 8 alone (0%), and both ends are drawn
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(0.0) and lo <= change <= hi
    # the same model against itself: no change, whatever the resample
    assert paired_relative_change_ci95(base, base, users) == (0.0, 0.0, 0.0)
    # one user only: every resample is that user
    assert paired_relative_change_ci95([1, 3], [2, 2], [5, 5]) == pytest.approx((0.0, 0.0, 0.0))
    # a resample whose base sums to 0 has no ratio and is left out: users (1, 1) give 0%, (1, 2) +100%
    assert paired_relative_change_ci95([1, 1], [1, 0], [1, 2]) == pytest.approx((1.0, 0.0, 1.0))
    assert all(np.isnan(paired_relative_change_ci95([1, 1], [0, 0], [1, 2])))  # no base at all: no change
    with pytest.raises(ValueError):
        paired_relative_change_ci95([1], [1, 1], [1, 1])
