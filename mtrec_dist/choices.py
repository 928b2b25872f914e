"""The named choices of the project, each defined once as a ``Literal``: configs type their fields with
these, and the modules that dispatch on a name iterate the tuple derived from the same ``Literal``.

A leaf module (it imports nothing from the package), so every layer may read it.
"""
from __future__ import annotations

from typing import Literal, get_args

# Sequence models: the recommender's backbone and the reward model's state encoder share these names.
Backbone = Literal["sasrec", "gru4rec", "caser", "nextitnet"]
# How the learned reward guides recommender training (objectives/guidance.py).
GuidanceMode = Literal["none", "reweight", "actor_critic", "risk_averse"]
# How `mtrec score-rewards` and offline ranking run: actors that each load the whole model, a worker group
# with the item table sharded as in training (training/sharded_inference.py), or the driver process itself for
# a small job; auto picks by the table's size, then the rows' size.
ScoreRunner = Literal["auto", "actors", "sharded", "local"]
# Rows of `mtrec ablate` (docs/method.md, "The ablation").
AblationRow = Literal["A", "B", "C", "D", "E", "F", "G", "H", "I"]
# Stages of `mtrec bench` (bench/runner.py), in the order they run.
BenchStage = Literal["prepare", "qriql", "sasrec", "scoring"]

BACKBONES: tuple[str, ...] = get_args(Backbone)
GUIDANCE_MODES: tuple[str, ...] = get_args(GuidanceMode)
# The guidance mode of the click-trained recommender (no reward read): every guided model is compared with it.
CLICK_TRAINED: str = "none"
assert CLICK_TRAINED in GUIDANCE_MODES
ABLATION_ROWS: tuple[str, ...] = get_args(AblationRow)
BENCH_STAGES: tuple[str, ...] = get_args(BenchStage)
