"""Arrow schemas of interaction events and of prepared transitions, and the training-column guard.

Events carry three column groups:
* required: ``user_id, item_id, ts`` (ts in unix seconds);
* implicit feedback (optional): ``click, watch_ratio, dwell_s, session_id, slate_id``;
* evaluation-only signals, all prefixed ``eval_``: ``eval_rating, eval_purchase, eval_like,
  eval_long_view, eval_true_satisfaction``.  Training code must never read them (docs/method.md, "Shared
  conventions"):
  prepared transitions keep them in a separate ``eval/`` table, and :func:`assert_training_columns`
  refuses any request that names one.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 3  # 2: transitions carry return labels and the item's log duration; 3: and the slate_id



def typed_fields(*, nullable: bool = True, **types: pa.DataType) -> list[pa.Field]:
    """One ``pa.field`` per ``name=type``, in the order given."""
    return [pa.field(name, t, nullable=nullable) for name, t in types.items()]


REQUIRED_FIELDS = typed_fields(user_id=pa.int64(), item_id=pa.int64(), ts=pa.int64(), nullable=False)
IMPLICIT_FIELDS = typed_fields(click=pa.int8(), watch_ratio=pa.float32(), dwell_s=pa.float32(), session_id=pa.int64(),
                          slate_id=pa.int64())
EVAL_PREFIX = "eval_"
EVAL_FIELDS = typed_fields(eval_rating=pa.float32(), eval_purchase=pa.int8(), eval_like=pa.int8(),
                      eval_long_view=pa.int8(), eval_true_satisfaction=pa.float32())

REQUIRED_COLUMNS = [f.name for f in REQUIRED_FIELDS]
IMPLICIT_COLUMNS = [f.name for f in IMPLICIT_FIELDS]
EVAL_COLUMNS = [f.name for f in EVAL_FIELDS]

EVENT_SCHEMA = pa.schema(REQUIRED_FIELDS + IMPLICIT_FIELDS + EVAL_FIELDS)

# Ids are integers (the default) or, with ``prepare.id_type=string``, texts (UUIDs, ASINs, hashes) of at
# most MAX_ID_BYTES bytes in UTF-8.  Either way the vocab maps them to indices: prepared transitions only
# ever hold indices, so nothing after prepare sees the difference.
ID_COLUMNS = ("user_id", "item_id")
ID_TYPES = ("int", "string")
MAX_ID_BYTES = 256


def event_schema(id_type: str = "int") -> pa.Schema:
    """``EVENT_SCHEMA``, with ``user_id`` and ``item_id`` as strings when ``id_type == "string"``."""
    if id_type == "int":
        return EVENT_SCHEMA
    if id_type != "string":
        raise ValueError(f"id_type must be one of {ID_TYPES}, got {id_type!r}")
    return pa.schema([pa.field(f.name, pa.string(), nullable=f.nullable) if f.name in ID_COLUMNS else f
                      for f in EVENT_SCHEMA])


def is_eval_column(name: str) -> bool:
    return name.startswith(EVAL_PREFIX)


class EvalLeakError(RuntimeError):
    """Training code asked for an evaluation-only column."""


def assert_training_columns(columns) -> None:
    """Raise :class:`EvalLeakError` if any of ``columns`` is evaluation-only."""
    leaked = [c for c in columns if is_eval_column(c)]
    if leaked:
        raise EvalLeakError(
            f"evaluation-only column(s) {leaked} requested by training code; these signals are withheld "
            "from the reward model and the recommenders (see docs/method.md, 'Shared conventions')"
        )


# ---- prepared transitions ------------------------------------------------------------------------
# Item indices: 0 is padding; real items are 1..num_items (vocab/items.parquet maps raw IDs).
# User indices: 0..num_users-1 (vocab/users.parquet).

TRANSITION_COLUMNS = [
    "row_id",               # int64, unique over the prepared dataset
    "user_idx",             # int64
    "state_items",          # list<int64>, length L, left-padded with 0
    "state_feedback",       # list<float32>, length L (watch ratio of each state item; 0 for padding)
    "action",               # int64 item index
    "action_feedback",      # float32 watch ratio of the action (1.0 where the source has none)
    "next_state_items",     # list<int64>, length L  (= state_items[1:] + [action])
    "next_state_feedback",  # list<float32>, length L
    "done",                 # int8: 1 at the end of a session
    "ts",                   # int64 unix seconds of the action
    "pos_from_end",         # int32: 0 = the user's last transition (carry-over; the peer benchmark's test row)
    "returned",             # int8: 1 where the return is known and the user came back within the return window
    "return_known",         # int8: 1 where the row ends a session and the log runs long enough to tell
    "action_log_duration",  # float32 log(item length / 60 s), length = dwell / watch ratio (0 where unknown)
    "slate_id",             # int64 the event's slate_id (NO_SLATE where the event has none); with user_idx it
                            # names the row of slates/ the action was chosen from
]
NO_SLATE = -1  # slate_id of a transition whose event names no slate (never null: batches refuse nulls)
for _c in TRANSITION_COLUMNS:
    assert not is_eval_column(_c)

# The torch batch every model and loss consumes (see mtrec_dist.data.pipeline.collate_transitions):
#   state_items [B, L] long, state_feedback [B, L] float, action [B] long, action_feedback [B] float,
#   next_state_items [B, L] long, next_state_feedback [B, L] float, done [B] float, row_id [B] long,
#   user_idx [B] long, pos_from_end [B] long, returned [B] long, return_known [B] long,
#   action_log_duration [B] float, slate_id [B] long, mask [B] float (1 = real row, 0 = padding row added so
#   that every worker runs the same number of steps).
