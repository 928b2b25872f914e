"""The counting step of sharded ranking (evaluation/sharded_ranking.py), against full-catalog ranks."""
from __future__ import annotations

import torch

from mtrec_dist.evaluation.sharded_ranking import count_at_least


def test_counts_over_row_shards_sum_to_the_pessimistic_full_rank():
    torch.manual_seed(0)
    # small integers: every dot product is exact whatever the summation order, so ties are real ties
    table = torch.randint(-3, 4, (11, 4)).float()  # row 0 is the padding item, rows 1..10 the catalog
    h = torch.randint(-3, 4, (6, 4)).float()
    target = torch.tensor([1, 5, 10, 3, 3, 7])
    table[7] = table[3]  # a tie with the target of rows 3 and 4: ties rank above it (pessimistic)
    scores = h @ table[1:].T  # column j is item j + 1
    target_score = scores.gather(1, (target - 1).view(-1, 1)).squeeze(1)
    expected = (scores >= target_score.view(-1, 1)).sum(1) - 1  # offline.RankingScorer's rule

    pieces = [(0, table[:4]), (4, table[4:9]), (9, table[9:])]  # three ranks' row-wise shards
    per_rank = [count_at_least(h, target_score, target, [p], chunk=2) for p in pieces]
    assert torch.equal(sum(per_rank), expected)
    assert torch.equal(count_at_least(h, target_score, target, [(0, table)], chunk=100), expected)
    assert expected[3] >= 1  # the tie counted
