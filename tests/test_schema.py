"""The event schema's column groups, and the guard that keeps evaluation-only signals out of training."""
import pyarrow as pa
import pytest

from mtrec_dist.data import schema
from mtrec_dist.data.prepare import EVAL_SCHEMA, TRANSITION_SCHEMA
from mtrec_dist.data.readers import REJECT_SCHEMA
from mtrec_dist.data.schema import (EVAL_COLUMNS, EVENT_SCHEMA, IMPLICIT_COLUMNS, REQUIRED_COLUMNS,
                                    TRANSITION_COLUMNS, EvalLeakError, assert_training_columns, is_eval_column)


def test_event_schema_has_three_disjoint_groups():
    assert REQUIRED_COLUMNS == ["user_id", "item_id", "ts"]
    assert set(IMPLICIT_COLUMNS) == {"click", "watch_ratio", "dwell_s", "session_id", "slate_id"}
    assert set(EVAL_COLUMNS) == {"eval_rating", "eval_purchase", "eval_like", "eval_long_view",
                                 "eval_true_satisfaction"}
    assert EVENT_SCHEMA.names == REQUIRED_COLUMNS + IMPLICIT_COLUMNS + EVAL_COLUMNS
    for c in REQUIRED_COLUMNS:
        assert not EVENT_SCHEMA.field(c).nullable, c
    for c in IMPLICIT_COLUMNS + EVAL_COLUMNS:
        assert EVENT_SCHEMA.field(c).nullable, c


def test_only_eval_columns_carry_the_eval_prefix():
    assert all(is_eval_column(c) for c in EVAL_COLUMNS)
    assert not any(is_eval_column(c) for c in REQUIRED_COLUMNS + IMPLICIT_COLUMNS + TRANSITION_COLUMNS)


def test_training_guard_refuses_eval_columns():
    assert_training_columns(TRANSITION_COLUMNS)  # fine
    for c in EVAL_COLUMNS:
        with pytest.raises(EvalLeakError, match=c):
            assert_training_columns(["state_items", c])


def test_prepared_tables_keep_eval_signals_out_of_transitions():
    assert TRANSITION_SCHEMA.names == TRANSITION_COLUMNS
    assert not any(is_eval_column(c) for c in TRANSITION_SCHEMA.names)
    # the eval table is keyed by row_id and holds every eval column
    assert EVAL_SCHEMA.names[:4] == ["row_id", "user_idx", "pos_from_end", "action"]
    assert set(EVAL_COLUMNS) <= set(EVAL_SCHEMA.names)
    # rejects keep every original column plus why and where
    assert set(EVENT_SCHEMA.names) <= set(REJECT_SCHEMA.names)
    assert {"reject_reason", "source_file", "raw_line"} <= set(REJECT_SCHEMA.names)


def test_state_lists_are_typed_as_the_batch_contract_says():
    assert TRANSITION_SCHEMA.field("state_items").type == pa.list_(pa.int64())
    assert TRANSITION_SCHEMA.field("state_feedback").type == pa.list_(pa.float32())
    assert TRANSITION_SCHEMA.field("next_state_items").type == pa.list_(pa.int64())
    assert TRANSITION_SCHEMA.field("done").type == pa.int8()
    assert schema.SCHEMA_VERSION >= 1
