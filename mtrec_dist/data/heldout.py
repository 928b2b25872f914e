"""Held-out users: the logged users whose rows no model trains on, so that reward validity and offline ranking
are measured on rows training never saw (docs/method.md "Metrics").

A user is held out by a hash of its index, the same rule wherever rows are split: the pipeline's training
stages, its evaluation, the ablation and the real-data ablation.  One formula serves numpy arrays, pyarrow
dataset expressions and Ray Data expressions, so every reader keeps the same users out:

    held out  <=>  ((user mod 1000) * 2654435761) mod 1000  <  share * 1000

(``(u mod m) c mod m = u c mod m``, so this is the multiplicative hash ``u c mod 1000``, reduced first so that
the product never overflows int64.)  Whole users are held out, not each user's last event: in logs where
sessions end after unsatisfying items, every user's last event is the one that ended a session, a biased
sample of what users chose (bench/RESULTS.md, session 24).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

__all__ = ["USER_HASH", "BUCKETS", "is_heldout", "heldout_mask", "column_expr", "heldout_expr", "training_expr",
           "require_heldout", "ranked_share", "split_rows", "split_validation",
           "user_bucket", "validation_buckets"]

USER_HASH = 2654435761  # Knuth's multiplicative hash constant
BUCKETS = 1000


def is_heldout(user: Any, share: float, mod: Callable[[Any, int], Any] = operator.mod) -> Any:
    """The held-out test of ``user`` (a numpy array or a column expression); ``mod`` is the modulo of that
    kind of value (``operator.mod`` for numpy and Ray Data, ``pyarrow.compute.modulo`` for pyarrow)."""
    return user_bucket(user, mod) < share * BUCKETS


def heldout_mask(user, share: float):
    """Boolean numpy mask of the held-out users' rows, for an array of user indices."""
    import numpy as np

    return np.asarray(is_heldout(np.asarray(user, dtype=np.int64), share), dtype=bool)


def ranked_share(share: float, heldout_rows: int, max_rows: int) -> float:
    """The share whose users an evaluation ranks when it wants at most about ``max_rows`` of the ``heldout_rows``
    rows held out at ``share`` (``max_rows`` 0: all of them).  It is a smaller share under the same hash, so its
    users are a subset of the held-out ones (a user whose hash is ``h`` is held out at every share above
    ``h / BUCKETS``); whole users, so about ``max_rows`` rows; at least one bucket of users."""
    if max_rows <= 0 or heldout_rows <= max_rows or share * BUCKETS <= 1:  # no cap, under it, or one bucket already
        return share
    return max(1, int(share * BUCKETS * max_rows / heldout_rows)) / BUCKETS


def column_expr(name: str, kind: str = "arrow"):
    """Column ``name`` in a filter expression of ``kind``: ``"arrow"`` (a pyarrow dataset expression) or
    ``"ray"`` (a Ray Data expression)."""
    if kind == "arrow":
        import pyarrow.compute as pc

        return pc.field(name)
    from ray.data.expressions import col

    return col(name)


def heldout_expr(share: float, kind: str = "arrow", column: str = "user_idx"):
    """The held-out rows as a filter expression on ``column``, of ``kind`` (:func:`column_expr`)."""
    if kind == "arrow":
        import pyarrow.compute as pc

        return is_heldout(column_expr(column, kind), share, pc.modulo)
    return is_heldout(column_expr(column, kind), share)


def training_expr(share: float, kind: str = "arrow", column: str = "user_idx"):
    """The training rows (every row of a user who is not held out) as a filter expression, as
    :func:`heldout_expr`."""
    return ~heldout_expr(share, kind, column)


def require_heldout(share: float) -> None:
    """Raise where ``share`` holds no user out: an evaluation that measures on held-out users' rows needs some."""
    if share <= 0:
        raise ValueError("eval.heldout_user_share is 0: this evaluation measures on held-out users' rows; "
                         "set it in (0, 1)")


def split_rows(user, share: float):
    """``(training rows, held-out rows)``: positions of the rows of users trained on and of held-out users, for
    an array of user indices (:func:`require_heldout` first)."""
    import numpy as np

    require_heldout(share)
    mask = heldout_mask(user, share)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def split_validation(user, heldout_share: float, validation_share: float):
    """``(fit rows, validation rows)``: the training users' rows split again by the same hash, for choosing a
    setting on users that neither the fitted models nor the held-out measurement see.  Validation users are those
    of the :func:`validation_buckets` right after the held-out ones (``validation_share * 1000`` of them): never a
    held-out user, and the same users at every seed."""
    import numpy as np

    require_heldout(heldout_share)
    lo, hi = validation_buckets(heldout_share, validation_share)
    bucket = user_bucket(np.asarray(user, dtype=np.int64))
    return np.flatnonzero(bucket >= hi), np.flatnonzero((bucket >= lo) & (bucket < hi))


def user_bucket(user: Any, mod: Callable[[Any, int], Any] = operator.mod) -> Any:
    """The hash bucket in ``[0, 1000)`` of each user: held out where it is below ``share * 1000``."""
    return mod(mod(user, BUCKETS) * USER_HASH, BUCKETS)


def validation_buckets(heldout_share: float, validation_share: float) -> tuple[int, int]:
    """``[lo, hi)``: the hash buckets of the validation users (:func:`split_validation`).  ``lo`` is the first
    bucket not held out; the count is the validation share in whole buckets, at least one, leaving at least one
    bucket to fit on, else ValueError."""
    import math

    lo = math.ceil(heldout_share * BUCKETS)  # the first bucket that is_heldout's float comparison keeps in
    hi = lo + round(validation_share * BUCKETS)
    if not lo < hi < BUCKETS:
        raise ValueError(f"validation share {validation_share:g} must hold at least one of the {BUCKETS} hash buckets "
                         f"and leave at least one to fit on (eval.heldout_user_share {heldout_share:g} holds {lo})")
    return lo, hi
