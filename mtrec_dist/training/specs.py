"""Rebuilding a model's configs from the ``model_spec`` every checkpoint carries (shared by the reward model
and the recommenders, :mod:`.reward` and :mod:`.recommender`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence

from mtrec_dist.config import ModelConfig, from_dict


# Settings added after checkpoints were written, with the value that reproduces those checkpoints' models: a
# spec without the key was trained without the feature (the reward model's item prior adds buffers that an
# older checkpoint does not hold, so its strict load would fail).
SETTINGS_BEFORE_THEY_EXISTED = {"reward": {"item_prior": False}}


def configs_from_spec(spec: Dict[str, Any], kind: str, what: str, section: str, section_cls: type,
                      item_counts: Optional[Sequence[float]], for_inference: bool):
    """``(ModelConfig, <section> config, item counts as floats or None)`` of a spec of ``kind``, validated.

    ``for_inference``: the uniform negative sampler and no counts (scoring never samples negatives).
    A spec of another kind is refused: "checkpoint holds a <kind>, not <what>".
    """
    if spec.get("kind") != kind:
        raise ValueError(f"checkpoint holds a {spec.get('kind')!r}, not {what}")
    model_cfg = from_dict(ModelConfig, spec["model"], "model_spec.model")
    section_spec = dict(spec[section])
    for key, before in SETTINGS_BEFORE_THEY_EXISTED.get(section, {}).items():
        section_spec.setdefault(key, before)
    section_cfg = from_dict(section_cls, section_spec, f"model_spec.{section}")
    model_cfg.validate("model_spec.model")
    section_cfg.validate(f"model_spec.{section}")
    if for_inference:
        section_cfg = dataclasses.replace(section_cfg, negative_sampler="uniform")
        item_counts = None
    counts = None if item_counts is None else [float(c) for c in item_counts]
    return model_cfg, section_cfg, counts
