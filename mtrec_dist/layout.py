"""The run folder, named once: every path a run writes under ``run_dir`` comes from :class:`RunLayout`.

    <run_dir>/sim/            simulator logs (sim/logs) + hidden truth (source: simulator)
    <run_dir>/prepared/       transitions, eval/, rejects/, vocab/, manifest.json
    <run_dir>/reward/         reward model metrics, TensorBoard, reward_model.json (+ ray_results/)
    <run_dir>/rewards/        scored transitions (reward quantiles, mean, CVaR, baselines)
    <run_dir>/rec/<backbone>-<guidance>/   each recommender's metrics and recommender.json (`mtrec train-rec`
                              alone: also its checkpoints, under ray_results/)
    <run_dir>/rec/ray_results/  the Ray Train run(s) of the pipeline's and retrain's recommenders, their checkpoints
    <run_dir>/report/         report.html, PNG figures, metrics.json, tensorboard/
    <run_dir>/ablation/       the ablation's results.json and table.md
    <run_dir>/stages/         one record per finished stage (what `mtrec pipeline --resume` reads)
    <run_dir>/pipeline.json   stage timings and where everything is
    <run_dir>/config.yaml     the config the run used
    <run_dir>/retrain/        default root of `mtrec retrain`'s versions (each a run folder of its own, with
                              carry/ and retrain.json besides the folders above)

Why one place: the pipeline, retrain, the single-stage commands, training and evaluation all read and
write these folders; spelling them out in each file let them drift (``reward/`` beside ``rewards/``).
This module sits at the bottom of the dependency chain (standard library only), so data, training and
evaluation may import it without importing upward.  Paths are strings joined with ``/``, so a run folder
may be a local path or a URI (``s3://bucket/run``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

SIM, SIM_LOGS, PREPARED, REWARD, REWARDS, REC, REPORT, ABLATION, STAGES = (
    "sim", "logs", "prepared", "reward", "rewards", "rec", "report", "ablation", "stages")
PIPELINE_FILE, CONFIG_FILE = "pipeline.json", "config.yaml"
RAY_RESULTS = "ray_results"  # Ray Train's storage folder (its runs and their checkpoints) inside a model's folder
CARRY, CARRY_PREVIOUS, RETRAIN_FILE, RETRAIN_ROOT, VERSIONS_FILE = (
    "carry", "carry_previous", "retrain.json", "retrain", "versions.json")


def join(root: str, *parts: str) -> str:
    """``root/part/...`` with single slashes; works for local paths and URIs alike (no ``os.path``)."""
    head = [root.rstrip("/")] if root else []
    return "/".join(head + [p.strip("/") for p in parts])


def rec_name(backbone: str, guidance: str) -> str:
    """``<backbone>-<guidance>``: a recommender's folder under ``rec/`` and its key in retrain's records."""
    return f"{backbone}-{guidance}"


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run folder.  ``RunLayout(cfg.run_dir).rewards`` is ``<run_dir>/rewards``."""

    root: str

    @property
    def sim(self) -> str:
        return join(self.root, SIM)

    @property
    def sim_logs(self) -> str:
        """The simulator's logs: what prepare reads when ``prepare.input`` is unset."""
        return join(self.root, SIM, SIM_LOGS)

    @property
    def prepared(self) -> str:
        return join(self.root, PREPARED)

    @property
    def reward(self) -> str:
        """train-reward's output (metrics, TensorBoard, reward_model.json); not to be confused with ``rewards``."""
        return join(self.root, REWARD)

    @property
    def rewards(self) -> str:
        """score-rewards' output: the scored transitions the recommenders train on."""
        return join(self.root, REWARDS)

    @property
    def rec_root(self) -> str:
        return join(self.root, REC)

    def rec(self, backbone: str, guidance: str) -> str:
        return join(self.root, REC, rec_name(backbone, guidance))

    @property
    def rec_runs(self) -> str:
        """Ray Train's storage for the recommenders a run trains together (``train_recommenders``)."""
        return join(self.root, REC, RAY_RESULTS)

    @property
    def report(self) -> str:
        return join(self.root, REPORT)

    @property
    def ablation(self) -> str:
        return join(self.root, ABLATION)

    @property
    def stages(self) -> str:
        return join(self.root, STAGES)

    @property
    def pipeline_json(self) -> str:
        return join(self.root, PIPELINE_FILE)

    @property
    def config_yaml(self) -> str:
        return join(self.root, CONFIG_FILE)

    @property
    def carry(self) -> str:
        """A retrain version's carry-over (every user's last items after its day)."""
        return join(self.root, CARRY)

    @property
    def carry_previous(self) -> str:
        """Carry-over derived from a previous `mtrec pipeline` run (which writes none of its own)."""
        return join(self.root, CARRY_PREVIOUS)

    @property
    def retrain_json(self) -> str:
        return join(self.root, RETRAIN_FILE)

    @property
    def retrain_root(self) -> str:
        """Default root of `mtrec retrain`'s versioned runs."""
        return join(self.root, RETRAIN_ROOT)


def prepare_paths(cfg) -> Tuple[str, str]:
    """(input, output) of prepare for a PipelineConfig: ``prepare.input``/``prepare.output`` when set, else
    the run folder's ``sim/logs`` and ``prepared``."""
    layout = RunLayout(cfg.run_dir)
    return cfg.prepare.input or layout.sim_logs, cfg.prepare.output or layout.prepared
