"""Per-stage training budgets: ``reward_train`` / ``rec_train`` override the shared ``train`` section."""
from __future__ import annotations

import argparse

import pytest

from mtrec_dist.commands._training_flags import add_training_flags, apply_training_flags
from mtrec_dist.config import ConfigError, load_config


def test_unset_budgets_use_the_train_section():
    cfg = load_config(overrides=["train.epochs=4", "train.max_steps=7"])
    assert cfg.stage_train("reward") == cfg.train
    assert cfg.stage_train("rec") == cfg.train


def test_each_stage_gets_its_own_budget():
    cfg = load_config(overrides=["train.epochs=1", "train.lr=0.01", "train.max_steps=50",
                                 "reward_train.epochs=3", "rec_train.epochs=10", "rec_train.batch_size=64",
                                 "rec_train.max_steps=0", "reward_train.lr=0.002"])
    reward, rec = cfg.stage_train("reward"), cfg.stage_train("rec")
    assert (reward.epochs, reward.max_steps, reward.batch_size, reward.lr) == (3, 50, cfg.train.batch_size, 0.002)
    assert (rec.epochs, rec.max_steps, rec.batch_size, rec.lr) == (10, 0, 64, 0.01)
    assert cfg.train.epochs == 1  # the shared section itself is untouched
    assert rec.num_workers == cfg.train.num_workers and rec.sharding == cfg.train.sharding
    with pytest.raises(ValueError, match="unknown training stage"):
        cfg.stage_train("eval")


@pytest.mark.parametrize("override, key", [
    ("rec_train.epochs=0", "rec_train.epochs"),
    ("reward_train.batch_size=-2", "reward_train.batch_size"),
    ("reward_train.lr=0", "reward_train.lr"),
    ("rec_train.max_steps=-1", "rec_train.max_steps"),
    ("rec_train.epochs=three", "rec_train.epochs"),
    ("reward_train.lr=fast", "reward_train.lr"),
    ("rec_train.epoch=3", "rec_train.epoch"),
])
def test_a_bad_budget_names_its_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_max_steps_flag_wins_over_the_stage_budgets():
    cfg = load_config(overrides=["reward_train.max_steps=100", "rec_train.max_steps=200"])
    p = argparse.ArgumentParser()
    add_training_flags(p)
    apply_training_flags(cfg, p.parse_args(["--max-steps", "5"]))
    assert cfg.stage_train("reward").max_steps == cfg.stage_train("rec").max_steps == 5
