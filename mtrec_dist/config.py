"""Typed, validated configuration.

Every section is a frozen-free dataclass; ``load_config`` reads a YAML file, applies ``key.path=value``
overrides, and builds the dataclasses field by field.  Unknown keys and values of the wrong type or out of
range raise :class:`ConfigError` naming the full dotted key, so a typo never silently falls back to a default.

This module sits at the bottom of the layering (everything may import it; it imports nothing of ours).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class SimulatorConfig:
    """The built-in user simulator (the embedded default data set)."""

    num_users: int = 2000
    num_items: int = 1000
    num_topics: int = 8
    days: int = 3
    sessions_per_user_day: float = 1.0  # Poisson mean of sessions a user starts per day
    slate_size: int = 10
    max_session_len: int = 30
    clickbait_fraction: float = 0.2  # share of items with high appeal and low satisfaction
    click_satisfaction_weight: float = 0.3  # how much expected satisfaction drives clicks (rest: appeal)
    satisfaction_noise: float = 0.5  # item-specific std of the stochastic satisfaction draw
    chunk_users: int = 50_000  # users generated per chunk (bounds memory)
    seed: int = 0

    def validate(self, key: str = "simulator") -> None:
        for name in ("num_users", "num_items", "num_topics", "days", "slate_size", "max_session_len", "chunk_users"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(self.slate_size <= self.num_items, f"{key}.slate_size", "must be <= num_items")
        _check(0.0 <= self.clickbait_fraction <= 1.0, f"{key}.clickbait_fraction", "must be in [0, 1]")
        _check(0.0 <= self.click_satisfaction_weight <= 1.0, f"{key}.click_satisfaction_weight", "must be in [0, 1]")
        _check(self.sessions_per_user_day > 0, f"{key}.sessions_per_user_day", "must be > 0")
        _check(self.satisfaction_noise >= 0, f"{key}.satisfaction_noise", "must be >= 0")


@dataclass
class PrepareConfig:
    """`mtrec prepare`: raw logs -> validated, sessionized, windowed transitions."""

    input: str = ""  # file/dir/URI of the raw logs ("" = the simulator output of the same run)
    format: Literal["parquet", "csv", "movielens", "retailrocket", "kuairand"] = "parquet"
    column_map: dict = field(default_factory=dict)  # raw column -> schema column (generic parquet/csv)
    state_len: int = 10  # L: items in a state
    session_gap_s: int = 1800  # a gap longer than this ends a session (done = 1)
    max_item_id: int = 2**62  # raw IDs above this are quarantined as out of range
    rows_per_shard: int = 250_000
    output: str = ""  # directory/URI of the prepared dataset ("" = <run_dir>/prepared)

    def validate(self, key: str = "prepare") -> None:
        _check(self.state_len >= 1, f"{key}.state_len", "must be >= 1")
        _check(self.session_gap_s >= 1, f"{key}.session_gap_s", "must be >= 1")
        _check(self.rows_per_shard >= 1, f"{key}.rows_per_shard", "must be >= 1")


@dataclass
class ModelConfig:
    """Shared architecture of state encoders and item embeddings."""

    embedding_dim: int = 32
    encoder: Literal["sasrec", "gru", "caser", "nextitnet"] = "sasrec"
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.1
    feedback_features: bool = True  # feed each state item's implicit feedback (watch ratio) to the encoder

    def validate(self, key: str = "model") -> None:
        _check(self.embedding_dim >= 2, f"{key}.embedding_dim", "must be >= 2")
        _check(self.num_layers >= 1, f"{key}.num_layers", "must be >= 1")
        _check(self.num_heads >= 1 and self.embedding_dim % self.num_heads == 0, f"{key}.num_heads",
               "must be >= 1 and divide embedding_dim")
        _check(0.0 <= self.dropout < 1.0, f"{key}.dropout", "must be in [0, 1)")


@dataclass
class RewardConfig:
    """QR-IQL mental reward model (method.md section 2)."""

    num_quantiles: int = 16
    alpha: float = 1.0  # soft-max temperature
    gamma: float = 0.9
    chi2_c: float = 0.5  # c in the (1/(4c)) r^2 chi-square regulariser
    lambda_qr: float = 1.0
    lambda_r: float = 1.0
    kappa: float = 1.0  # Huber threshold of the quantile loss
    polyak: float = 0.005  # target critic update rate
    num_negatives: int = 0  # 0 = full catalog soft value; > 0 = sampled candidates with log-q correction
    negative_sampler: Literal["uniform", "popularity"] = "uniform"
    catalog_chunk: int = 8192  # items per chunk when the soft value runs over the full catalog
    cvar_alpha: float = 0.25  # lower-tail level for CVaR

    def validate(self, key: str = "reward") -> None:
        _check(self.num_quantiles >= 2, f"{key}.num_quantiles", "must be >= 2")
        _check(self.alpha > 0, f"{key}.alpha", "must be > 0")
        _check(0.0 <= self.gamma < 1.0, f"{key}.gamma", "must be in [0, 1)")
        _check(self.chi2_c > 0, f"{key}.chi2_c", "must be > 0")
        _check(self.kappa > 0, f"{key}.kappa", "must be > 0")
        _check(0.0 < self.polyak <= 1.0, f"{key}.polyak", "must be in (0, 1]")
        _check(self.num_negatives >= 0, f"{key}.num_negatives", "must be >= 0")
        _check(0.0 < self.cvar_alpha <= 1.0, f"{key}.cvar_alpha", "must be in (0, 1]")


@dataclass
class RecConfig:
    """Guided sequential recommender (method.md section 3)."""

    backbone: Literal["sasrec", "gru4rec", "caser", "nextitnet"] = "sasrec"
    guidance: Literal["none", "reweight", "actor_critic", "risk_averse"] = "none"
    num_negatives: int = 0  # 0 = full softmax; > 0 = sampled softmax with log-q correction
    weight_temperature: float = 1.0  # beta in w = clip(exp(A / beta), w_min, w_max), batch-normalised
    weight_min: float = 0.1
    weight_max: float = 3.0
    ac_gamma: float = 0.5  # discount of the actor-critic Q head
    backbones: list = field(default_factory=lambda: ["sasrec"])  # pipeline: backbones to compare
    guidances: list = field(default_factory=lambda: ["none", "reweight"])  # pipeline: modes to compare

    def validate(self, key: str = "rec") -> None:
        _check(self.num_negatives >= 0, f"{key}.num_negatives", "must be >= 0")
        _check(self.weight_temperature > 0, f"{key}.weight_temperature", "must be > 0")
        _check(0 < self.weight_min <= 1.0 <= self.weight_max, f"{key}.weight_min/weight_max",
               "need 0 < weight_min <= 1 <= weight_max")
        allowed_b = {"sasrec", "gru4rec", "caser", "nextitnet"}
        allowed_g = {"none", "reweight", "actor_critic", "risk_averse"}
        for b in self.backbones:
            _check(b in allowed_b, f"{key}.backbones", f"unknown backbone {b!r}; choose from {sorted(allowed_b)}")
        for g in self.guidances:
            _check(g in allowed_g, f"{key}.guidances", f"unknown guidance {g!r}; choose from {sorted(allowed_g)}")


@dataclass
class TrainConfig:
    """Distributed training on Ray Train (shared by train-reward and train-rec)."""

    num_workers: int = 2
    cpus_per_worker: float = 0.5  # fractional so that Ray Data still gets CPUs on a 2-core machine
    use_gpu: Literal["auto", "true", "false"] = "auto"
    batch_size: int = 256
    epochs: int = 1
    max_steps: int = 0  # 0 = run all epochs; > 0 = stop after this many steps
    lr: float = 1e-3  # dense parameters (Adam)
    sparse_lr: float = 0.05  # sparse embedding rows (FBGEMM fused optimizer)
    sparse_optimizer: Literal["exact_rowwise_adagrad", "exact_adagrad", "exact_sgd"] = "exact_rowwise_adagrad"
    sharding: Literal["auto", "row_wise", "table_wise", "column_wise"] = "auto"
    report_every: int = 20
    checkpoint_every: int = 100
    max_failures: int = 1
    collective_timeout_s: int = 300
    storage_path: str = ""  # local dir or cloud URI ("" = <run_dir>/ray_results)
    seed: int = 0

    def validate(self, key: str = "train") -> None:
        for name in ("num_workers", "batch_size", "epochs", "report_every", "checkpoint_every", "collective_timeout_s"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(self.max_steps >= 0, f"{key}.max_steps", "must be >= 0")
        _check(self.cpus_per_worker > 0, f"{key}.cpus_per_worker", "must be > 0")
        _check(self.lr > 0 and self.sparse_lr > 0, f"{key}.lr/sparse_lr", "must be > 0")
        _check(self.max_failures >= -1, f"{key}.max_failures", "must be >= -1 (-1 = unlimited)")


@dataclass
class EvalConfig:
    """Offline ranking, reward validity and online simulator evaluation (method.md section 4)."""

    ks: list = field(default_factory=lambda: [5, 10, 20])
    sampled_negatives: int = 100
    online_seeds: int = 5
    online_users: int = 200  # simulated users per seed
    online_session_len: int = 20
    seed: int = 0

    def validate(self, key: str = "eval") -> None:
        _check(len(self.ks) > 0 and all(isinstance(k, int) and k >= 1 for k in self.ks), f"{key}.ks",
               "must be a non-empty list of positive ints")
        _check(self.sampled_negatives >= 1, f"{key}.sampled_negatives", "must be >= 1")
        _check(self.online_seeds >= 1, f"{key}.online_seeds", "must be >= 1")


@dataclass
class PipelineConfig:
    """Top-level config: one MTRec run."""

    run_dir: str = "runs/demo"
    source: Literal["simulator", "logs"] = "simulator"
    ray_address: str = ""  # "" = start/attach a local cluster; otherwise an address for ray.init
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rec: RecConfig = field(default_factory=RecConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, key: str = "") -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v.validate(f.name)
        _check(bool(self.run_dir), "run_dir", "must not be empty")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks
# --------------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and "true" in allowed:  # YAML turns `true` into a bool
            value = "true" if value else "false"
        _check(value in allowed, key, f"{value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    if tp is list or origin is list:
        _check(isinstance(value, list), key, f"expected a list, got {value!r}")
        return list(value)
    if tp is dict or origin is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, data: dict, key: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"unknown config key(s) {[where + u for u in unknown]}; known keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{key}.{name}" if key else name)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"reward.gamma=0.8"`` -> (["reward", "gamma"], 0.8); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    k, v = text.split("=", 1)
    return k.strip().split("."), yaml.safe_load(v)


def _set_path(d: dict, path: list[str], value: Any) -> None:
    for p in path[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {'.'.join(path)}: {p} is not a section")
    d[path[-1]] = value


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> PipelineConfig:
    """Load a YAML config (or the defaults), apply ``key.path=value`` overrides, and validate."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if loaded is not None:
            _check(isinstance(loaded, dict), str(p), "top level must be a mapping")
            data = loaded
    for o in overrides or []:
        k, v = parse_override(o)
        _set_path(data, k, v)
    cfg = from_dict(PipelineConfig, data)
    cfg.validate()
    return cfg


def dump_config(cfg: PipelineConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
