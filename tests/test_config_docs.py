"""Every config field has a one-line description (issue 10, item 4), read by ``config.field_docs``."""
import dataclasses

import pytest

from mtrec_dist import config

SECTIONS = [config.PipelineConfig, config.SimulatorConfig, config.PrepareConfig, config.ModelConfig,
            config.RewardConfig, config.RecConfig, config.TrainConfig, config.StageBudget, config.EvalConfig,
            config.AblationConfig]


def test_every_section_dataclass_is_checked():
    nested = {type(getattr(config.PipelineConfig(), f.name)) for f in dataclasses.fields(config.PipelineConfig)}
    assert {t for t in nested if dataclasses.is_dataclass(t)} <= set(SECTIONS)


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_every_field_has_a_description(cls):
    docs = config.field_docs(cls)
    assert list(docs) == [f.name for f in dataclasses.fields(cls)]
    missing = [name for name, text in docs.items() if not text.strip()]
    assert not missing, f"{cls.__name__}: fields without a description: {missing}"


def test_trailing_comment_and_comment_above_are_read():
    sim = config.field_docs(config.SimulatorConfig)
    assert sim["max_session_len"] == "slates shown per session at most"
    # a trailing comment wins over the block comment above the field
    assert sim["watch_satisfaction"].startswith("beta_s:")
    prep = config.field_docs(config.PrepareConfig)
    assert prep["id_type"].startswith('user_id / item_id: "int"')
    assert "invalid_user_id" in prep["id_type"]
