"""Several rounds of the same timed runs, one after another: each ratio is judged on its median round.

On a shared 2-core machine one round's ratio moves by 10% or more with the load; the median of a few rounds,
every round's value shown beside it, tells a ratio's distance from its goal from that noise.
"""
from __future__ import annotations

from typing import Dict, Sequence


def median_round(values: Sequence[float]) -> int:
    """Index of the median of ``values``; of an even count, the lower of the two middle ones (a goal is then
    judged on the less flattering of them)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    return order[(len(values) - 1) // 2]


def median_ratios(rounds: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Each ratio's median over the rounds that measured it (:func:`median_round`)."""
    keys = [k for k in rounds[0] if all(k in r for r in rounds)] if rounds else []
    return {k: rounds[median_round([r[k] for r in rounds])][k] for k in keys}
