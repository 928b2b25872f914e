"""Typed, validated configuration.

Every section is a frozen-free dataclass; ``load_config`` reads a YAML file, applies ``key.path=value``
overrides, and builds the dataclasses field by field.  Unknown keys and values of the wrong type or out of
range raise :class:`ConfigError` naming the full dotted key, so a typo never silently falls back to a default.

This module sits at the bottom of the layering (everything may import it); it imports only the leaf modules
``choices`` (the named choices) and ``config_build`` (dict -> typed dataclass, field descriptions).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from mtrec_dist.choices import (
    ABLATION_ROWS, BACKBONES, GUIDANCE_MODES, AblationRow, Backbone, GuidanceMode, ScoreRunner,
)
from mtrec_dist.config_build import (  # noqa: F401  (re-exported: the config's public face)
    ConfigError, _check, field_docs, from_dict, parse_override, set_path,
)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class SimulatorConfig:
    """The built-in user simulator (the embedded default data set); see mtrec_dist/data/simulator.py."""

    num_users: int = 2000  # users in the simulated population
    num_items: int = 1000  # items in the simulated catalog
    num_topics: int = 8  # latent topics that user tastes and items are drawn over
    days: int = 3  # days of logs to simulate
    start_ts: int = 1_767_225_600  # unix seconds of 00:00 UTC of the first log day (2026-01-01)
    sessions_per_user_day: float = 2.0  # Poisson mean of sessions a user starts per day
    slate_size: int = 10  # items the logging policy shows per slate (<= num_items)
    max_session_len: int = 30  # slates shown per session at most
    clickbait_fraction: float = 0.2  # share of items with high appeal and low satisfaction
    click_satisfaction_weight: float = 0.3  # how much expected satisfaction drives clicks (rest: appeal)
    satisfaction_noise: float = 0.8  # mean item-specific std of the stochastic satisfaction draw
    taste_strength: float = 1.0  # scale of the user-taste x item-topic relevance term
    no_click_utility: float = 2.0  # utility of clicking nothing on a slate (higher = lower CTR)
    leave_after_no_click: float = 0.15  # chance a user leaves after a slate with no click
    logging_noise: float = 1.0  # std of the noise on the logging policy's relevance estimate
    logging_explore: float = 0.3  # share of the logging policy's candidates drawn uniformly from the catalog
    compulsive_fraction: float = 0.1  # share of items watched long and then regretted (low satisfaction)
    # Watch ratio: logit(wr) = watch_satisfaction * s + user finish bias - duration bias + item pull + noise.
    watch_satisfaction: float = 0.4  # beta_s: how strongly the watch ratio reveals the realised satisfaction s
    watch_noise: float = 1.0  # std of the noise on logit(watch ratio)
    watch_duration_bias: float = 0.8  # logit(wr) lost per unit of log(duration / 60 s): long items are abandoned
    user_finish_sd: float = 0.8  # std across users of the finish propensity (some users finish everything)
    mood_carry: float = 0.6  # session mood = carry * mood + (1 - carry) * s; mood drives continuation
    return_bias: float = 0.3  # logit of returning the next day after an average (s = 0) day
    return_slope: float = 1.0  # logit of returning gained per unit of the day's mean satisfaction
    reactivation: float = 0.3  # chance an inactive user comes back on a given day
    write_exposures: bool = True  # also write impressions/ (every slate shown and its click; observable)
    chunk_users: int = 50_000  # users generated per chunk (bounds memory)
    seed: int = 0  # random seed of the simulated world and logs

    def validate(self, key: str = "simulator") -> None:
        for name in ("num_users", "num_items", "num_topics", "days", "slate_size", "max_session_len", "chunk_users"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(self.slate_size <= self.num_items, f"{key}.slate_size", "must be <= num_items")
        _check(0.0 <= self.clickbait_fraction <= 1.0, f"{key}.clickbait_fraction", "must be in [0, 1]")
        _check(0.0 <= self.compulsive_fraction <= 1.0 - self.clickbait_fraction, f"{key}.compulsive_fraction",
               "must be in [0, 1 - clickbait_fraction]")
        for name in ("watch_satisfaction", "watch_noise", "watch_duration_bias", "user_finish_sd", "return_slope"):
            _check(getattr(self, name) >= 0, f"{key}.{name}", "must be >= 0")
        _check(0.0 <= self.mood_carry < 1.0, f"{key}.mood_carry", "must be in [0, 1)")
        _check(0.0 <= self.reactivation <= 1.0, f"{key}.reactivation", "must be in [0, 1]")
        _check(0.0 <= self.click_satisfaction_weight <= 1.0, f"{key}.click_satisfaction_weight", "must be in [0, 1]")
        _check(0 < self.sessions_per_user_day <= 8, f"{key}.sessions_per_user_day", "must be in (0, 8]")
        _check(self.satisfaction_noise >= 0, f"{key}.satisfaction_noise", "must be >= 0")
        _check(self.taste_strength >= 0, f"{key}.taste_strength", "must be >= 0")
        _check(0.0 <= self.leave_after_no_click <= 1.0, f"{key}.leave_after_no_click", "must be in [0, 1]")
        _check(self.logging_noise >= 0, f"{key}.logging_noise", "must be >= 0")
        _check(0.0 <= self.logging_explore <= 1.0, f"{key}.logging_explore", "must be in [0, 1]")
        _check(self.seed >= 0, f"{key}.seed", "must be >= 0")
        _check(self.start_ts >= 0 and self.start_ts % 86_400 == 0, f"{key}.start_ts",
               "must be a non-negative multiple of 86400 (midnight UTC)")


@dataclass
class PrepareConfig:
    """`mtrec prepare`: raw logs -> validated, sessionized, windowed transitions (mtrec_dist/data/prepare.py)."""

    input: str = ""  # file/dir/URI of the raw logs ("" = <run_dir>/sim/logs, the simulator output)
    # reader for the raw logs: generic parquet/csv or a named public data set
    format: Literal["parquet", "csv", "movielens", "retailrocket", "kuairand"] = "parquet"
    column_map: dict = field(default_factory=dict)  # raw column -> schema column (generic parquet/csv)
    delimiter: str = ","  # field separator of generic csv input
    # user_id / item_id: "int" (integers, as today) or "string" (UUIDs, ASINs, hashes: kept as text and mapped
    # through the vocab like integer ids; generic csv/parquet only). A text id under "int" is invalid_user_id.
    id_type: Literal["int", "string"] = "int"
    state_len: int = 10  # L: items in a state
    session_gap_s: int = 1800  # a gap longer than this ends a session (done = 1)
    return_window_s: int = 129_600  # a session end is "returned" if the user's next event is within 36 h
    max_item_id: int = 2**62  # raw IDs above this are quarantined as out of range
    max_ts: int = 4_102_444_800  # timestamps after 2100-01-01 are quarantined as out of range
    rows_per_shard: int = 250_000  # rows per Parquet file written to the prepared dataset
    rows_per_partition: int = 500_000  # per-user stage: rows per hash partition (bounds a block's memory)
    max_partitions: int = 256  # per-user stage: upper bound on the number of hash partitions
    output: str = ""  # directory/URI of the prepared dataset ("" = <run_dir>/prepared)
    vocab_dir: str = ""  # existing vocab/ to extend (daily retraining keeps old indices); "" = fresh
    overwrite: bool = False  # replace an existing prepared dataset at `output`
    progress: bool = True  # Ray Data progress bars and stage lines on stderr
    # Parquet impressions (slates shown, EXPOSURE_SCHEMA) -> slates/: "" = auto (<sim>/impressions beside an input
    # <sim>/logs or <sim>/logs/day=..., if it exists), "none" = do not read, else a file/dir/URI that must exist
    impressions: str = ""

    def validate(self, key: str = "prepare") -> None:
        _check(self.state_len >= 1, f"{key}.state_len", "must be >= 1")
        _check(self.session_gap_s >= 1, f"{key}.session_gap_s", "must be >= 1")
        _check(self.return_window_s >= 1, f"{key}.return_window_s", "must be >= 1")
        _check(self.rows_per_shard >= 1, f"{key}.rows_per_shard", "must be >= 1")
        _check(self.rows_per_partition >= 1, f"{key}.rows_per_partition", "must be >= 1")
        _check(self.max_partitions >= 1, f"{key}.max_partitions", "must be >= 1")
        _check(self.max_item_id >= 0, f"{key}.max_item_id", "must be >= 0")
        _check(0 <= self.max_ts <= 2**35, f"{key}.max_ts", "must be in [0, 2**35] (unix seconds)")
        _check(len(self.delimiter) == 1, f"{key}.delimiter", "must be a single character")
        _check(self.id_type in ("int", "string"), f"{key}.id_type", "must be 'int' or 'string'")
        _check(self.id_type == "int" or self.format in ("csv", "parquet"), f"{key}.id_type",
               f"string ids are read by the generic csv and parquet formats, not {self.format}")
        names = {"user_id", "item_id", "ts", "click", "watch_ratio", "dwell_s", "session_id", "slate_id",
                 "eval_rating", "eval_purchase", "eval_like", "eval_long_view", "eval_true_satisfaction"}
        for raw, col in self.column_map.items():
            _check(isinstance(raw, str) and col in names, f"{key}.column_map.{raw}",
                   f"maps to {col!r}, which is not an event column; choose from {sorted(names)}")
        _check(len(set(self.column_map.values())) == len(self.column_map), f"{key}.column_map",
               "two raw columns map to the same event column")
        _check(isinstance(self.impressions, str), f"{key}.impressions",
               '"" (auto), "none" or a path/URI of Parquet impressions')


@dataclass
class ModelConfig:
    """Shared architecture of state encoders and item embeddings."""

    embedding_dim: int = 32  # size of item embeddings and encoder hidden states
    encoder: Backbone = "sasrec"  # state encoder of the reward model (the same names as rec.backbone)
    num_layers: int = 2  # encoder layers (transformer blocks / GRU layers / NextItNet block repeats)
    num_heads: int = 2  # SASRec: attention heads (must divide embedding_dim)
    dropout: float = 0.1  # dropout rate inside the encoders
    feedback_features: bool = True  # feed each state item's implicit feedback (watch ratio) to the encoder
    caser_h_filters: int = 16  # Caser: horizontal filters per height (heights 1..L)
    caser_v_filters: int = 4  # Caser: vertical filters
    nextitnet_dilations: list = field(default_factory=lambda: [1, 2, 4])  # one residual block per entry, x num_layers
    nextitnet_kernel: int = 3  # NextItNet: causal convolution width

    def validate(self, key: str = "model") -> None:
        _check(self.embedding_dim >= 2, f"{key}.embedding_dim", "must be >= 2")
        _check(self.caser_h_filters >= 1, f"{key}.caser_h_filters", "must be >= 1")
        _check(self.caser_v_filters >= 1, f"{key}.caser_v_filters", "must be >= 1")
        _check(len(self.nextitnet_dilations) > 0
               and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in self.nextitnet_dilations),
               f"{key}.nextitnet_dilations", "must be a non-empty list of positive ints")
        _check(self.nextitnet_kernel >= 2, f"{key}.nextitnet_kernel", "must be >= 2")
        _check(self.num_layers >= 1, f"{key}.num_layers", "must be >= 1")
        _check(self.num_heads >= 1 and self.embedding_dim % self.num_heads == 0, f"{key}.num_heads",
               "must be >= 1 and divide embedding_dim")
        _check(0.0 <= self.dropout < 1.0, f"{key}.dropout", "must be in [0, 1)")


@dataclass
class RewardConfig:
    """QR-IQL mental reward model (docs/method.md "QR-IQL v1")."""

    num_quantiles: int = 16  # quantiles of the distributional (QR) critic / reward head
    alpha: float = 1.0  # soft-max temperature of the soft value over items
    gamma: float = 0.9  # discount factor of the reward model's critic
    chi2_c: float = 0.5  # c in the (1/(4c)) r^2 chi-square regulariser
    lambda_qr: float = 1.0  # weight of the quantile-regression loss
    lambda_r: float = 1.0  # weight of the reward-head (realised reward) loss
    kappa: float = 1.0  # Huber threshold of the quantile loss
    polyak: float = 0.005  # target critic update rate
    num_negatives: int = 0  # 0 = full catalog soft value; > 0 = sampled candidates with log-q correction
    # proposal q of the sampled candidates (num_negatives > 0)
    negative_sampler: Literal["uniform", "popularity"] = "uniform"
    catalog_chunk: int = 8192  # items per chunk when the soft value runs over the full catalog
    cvar_alpha: float = 0.25  # lower-tail level for CVaR
    chi2_debias: bool = False  # chi-square term on E_s'[r] via the reward head's mean (docs/method.md)
    # What the reward-quantile head regresses (docs/method.md, "Grounding the reward in consumption"):
    # choice_weight * r(s,a,s') [the spec] + consumption_weight * alpha * logit(watch ratio).
    choice_weight: float = 1.0  # weight of the spec's r(s,a,s') in the reward-quantile target
    consumption_weight: float = 0.0  # weight of alpha * logit(watch ratio) in the reward-quantile target
    # "v2" (docs/method.md "QR-IQL v2: the mental reward as built"): decision utility fitted to choices, mental
    # reward fitted to consequences (watch, continue vs leave, return) with the outside option at 0, and a
    # critic whose targets contain the observed outcome.  "v1": the IQ-Learn form of sections 2 (ablation D).
    objective: Literal["v1", "v2"] = "v2"
    prior_sd: float = 1.0  # v2: prior std of one event's mental reward around its mean (realised-reward step)
    # v2: give each item its own watch offset b_y(a) = <v, e_a> (duration, "can't stop watching"); not used where
    # the item prior is (it sets the watch offset per item itself).
    watch_item_offset: bool = True
    # v2 with watch and continue among the consequences: the mental reward's item level counted from the training
    # rows before training (objectives.item_prior): each item's continuation rate and mean watch logit read
    # together, an item's watch level far from what its continuation implies read as a pull ("can't stop
    # watching", abandoned early) rather than as satisfaction.  Fixed during training; the network adds what
    # varies with the state.
    item_prior: bool = True
    item_prior_watch_slope: float = 1.0  # k: watch logit per unit of mental reward (continuation-logit units)
    # v2: the post-consumption outcomes the mental reward is fitted to (consumption depth, continuing the session,
    # coming back).  A log of judgements (ratings of films seen long before) records no consequences: use [].
    consequences: list[Literal["watch", "continue", "return"]] = field(
        default_factory=lambda: ["watch", "continue", "return"])
    # v2, logs whose users chose the order of a session's items themselves (ratings, search; not a feed): how many
    # later choices of the session each choice is ranked against by a per-item level of the mental reward
    # (objectives.mental_reward.order_nll); 0 = no order term.
    order_items: int = 0
    # v2, prepared data with a slates/ table (impressions): fit the decision utility to the click among the slate
    # the user was shown (R2) rather than among the whole catalog, which the logging policy never showed
    slate_choice: bool = True

    @property
    def uses_item_prior(self) -> bool:
        """Whether the reward model carries the item prior: ``item_prior`` on, v2, and both signals it reads
        (the watch ratio and continuation) among the consequences."""
        return (self.item_prior and self.objective == "v2"
                and {"watch", "continue"} <= set(self.consequences))

    def validate(self, key: str = "reward") -> None:
        _check(self.num_quantiles >= 1, f"{key}.num_quantiles", "must be >= 1")
        _check(self.item_prior_watch_slope > 0, f"{key}.item_prior_watch_slope", "must be > 0")
        _check(self.prior_sd > 0, f"{key}.prior_sd", "must be > 0")
        _check(self.order_items >= 0, f"{key}.order_items", "must be >= 0")
        _check(self.objective != "v2" or bool(self.consequences) or self.order_items > 0, f"{key}.consequences",
               "is empty and order_items is 0: the v2 mental reward would have nothing to be fitted to")
        _check(self.alpha > 0, f"{key}.alpha", "must be > 0")
        _check(0.0 <= self.gamma < 1.0, f"{key}.gamma", "must be in [0, 1)")
        _check(self.chi2_c > 0, f"{key}.chi2_c", "must be > 0")
        _check(self.kappa > 0, f"{key}.kappa", "must be > 0")
        _check(0.0 < self.polyak <= 1.0, f"{key}.polyak", "must be in (0, 1]")
        _check(self.num_negatives >= 0, f"{key}.num_negatives", "must be >= 0")
        _check(0.0 < self.cvar_alpha <= 1.0, f"{key}.cvar_alpha", "must be in (0, 1]")
        _check(self.choice_weight >= 0 and self.consumption_weight >= 0
               and self.choice_weight + self.consumption_weight > 0, f"{key}.choice_weight/consumption_weight",
               "must be >= 0 and not both 0")


@dataclass
class RecConfig:
    """Guided sequential recommender (docs/method.md "Recommenders and guidance")."""

    backbone: Backbone = "sasrec"  # sequence model of a single train-rec run
    # how the learned reward guides a single train-rec run
    guidance: GuidanceMode = "none"
    num_negatives: int = 0  # 0 = full softmax; > 0 = sampled softmax with log-q correction
    weight_temperature: float = 1.0  # beta in w = clip(exp(A / beta), w_min, w_max), batch-normalised
    weight_min: float = 0.1  # w_min: lower clip of the reweighting weight (<= 1)
    weight_max: float = 3.0  # w_max: upper clip of the reweighting weight (>= 1)
    ac_gamma: float = 0.5  # discount of the actor-critic Q head
    td_weight: float = 1.0  # weight of the actor-critic TD loss next to the weighted cross-entropy
    negative_sampler: Literal["uniform", "popularity"] = "uniform"  # proposal q of sampled softmax negatives
    backbones: list[Backbone] = field(default_factory=lambda: ["sasrec"])  # pipeline: backbones to compare
    guidances: list[GuidanceMode] = field(default_factory=lambda: ["none", "reweight"])  # pipeline: modes to compare

    def validate(self, key: str = "rec") -> None:
        _check(self.num_negatives >= 0, f"{key}.num_negatives", "must be >= 0")
        _check(self.weight_temperature > 0, f"{key}.weight_temperature", "must be > 0")
        _check(0.0 <= self.ac_gamma < 1.0, f"{key}.ac_gamma", "must be in [0, 1)")
        _check(self.td_weight >= 0, f"{key}.td_weight", "must be >= 0")
        _check(0 < self.weight_min <= 1.0 <= self.weight_max, f"{key}.weight_min/weight_max",
               "need 0 < weight_min <= 1 <= weight_max")
        for b in self.backbones:
            _check(b in BACKBONES, f"{key}.backbones", f"unknown backbone {b!r}; choose from {list(BACKBONES)}")
        for g in self.guidances:
            _check(g in GUIDANCE_MODES, f"{key}.guidances", f"unknown guidance {g!r}; choose from {list(GUIDANCE_MODES)}")


@dataclass
class TrainConfig:
    """Distributed training on Ray Train (shared by train-reward and train-rec)."""

    num_workers: int = 2  # Ray Train workers (data-parallel ranks)
    cpus_per_worker: float = 0.5  # fractional so that Ray Data still gets CPUs on a 2-core machine
    use_gpu: Literal["auto", "true", "false"] = "auto"  # train on GPUs ("auto" = if this machine has CUDA)
    batch_size: int = 256  # samples per worker per step
    epochs: int = 1  # passes over the training rows
    max_steps: int = 0  # 0 = run all epochs; > 0 = stop after this many steps
    lr: float = 1e-3  # learning rate of the dense parameters (Adam)
    sparse_lr: float = 0.05  # learning rate of the sparse embedding rows (FBGEMM fused optimizer)
    # FBGEMM fused optimizer of the sparse embedding rows
    sparse_optimizer: Literal["exact_rowwise_adagrad", "exact_adagrad", "exact_sgd"] = "exact_rowwise_adagrad"
    # TorchRec sharding of embedding tables ("auto" = planner chooses)
    sharding: Literal["auto", "row_wise", "table_wise", "column_wise"] = "auto"
    report_every: int = 20  # steps between metric reports (metrics.jsonl)
    checkpoint_every: int = 100  # steps between checkpoints
    max_failures: int = 1  # worker-group restarts Ray Train allows from the last checkpoint (-1 = unlimited)
    collective_timeout_s: int = 300  # timeout of torch.distributed collectives, seconds
    storage_path: str = ""  # local dir or cloud URI ("" = <run_dir>/ray_results)
    ray_report_min_interval_s: float = 3.0  # Ray gets a result at most this often (metrics.jsonl: every report_every)
    # how often Ray Train's controller polls its workers, in seconds (sets RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, which
    # Ray Train hands to the controller); the poll also collects reported results, and at Ray's default of 2 s every
    # checkpoint report and every run's end waited for it (the demo's train-rec stage: 35-36 s -> 29-34 s at 0.5 s)
    controller_poll_s: float = 0.5
    # MiB of freed memory each training / scoring process keeps for reuse instead of returning it to the OS after
    # every step (glibc; runtime.retain_freed_memory); 0 = glibc's defaults, which page-fault each step's tensors in again
    malloc_trim_mb: int = 256
    checkpoints_to_keep: int = 0  # 0 = keep every checkpoint; > 0 = Ray Train keeps the newest N
    prefetch_batches: int = 2  # batches Ray Data prepares ahead of each worker
    # "stream": Ray Data feeds each step while the worker trains; "memory": each worker first collates its
    # whole shard of the epoch into torch batches in host memory, then trains with no data work beside the
    # steps, and later epochs reshuffle the rows it holds (the shard stays in the worker's RAM: for training
    # sets that fit); "auto": memory where training reads its data more than once and it has at most
    # cache_rows rows, else stream (training.loop.resolve_feed)
    feed: Literal["auto", "stream", "memory"] = "auto"
    # feed: auto holds a worker's shard only if it is at most this many MiB (estimated from the rows and the
    # state length: 24 bytes per state position and 128 per row)
    memory_feed_max_mb: float = 1024.0
    shuffle_buffer_rows: int = 4096  # local shuffle buffer per worker (0 = stream order); logs are time-ordered
    # training sets of at most this many rows that are read more than once: streamed (feed: stream), they are
    # read once into Ray's object store and every later epoch splits the cached blocks instead of reading the
    # Parquet files again; with feed: auto each worker holds its shard instead (0 = always stream, no cache)
    cache_rows: int = 2_000_000
    # a training set estimated at most this many MiB (as memory_feed_max_mb estimates it) is read by the driver in
    # one pyarrow call and handed to Ray Data as in-memory blocks: each epoch then starts without listing files,
    # footer-reader and read tasks, and the reward's slate join and per-user steps run there with no actors to
    # start (docs/cluster.md "Feeding the workers"); with score_runner auto,
    # score-rewards and offline ranking run a set this small in the driver process itself (no actor to start); 0 =
    # always read the Parquet files with Ray Data (training.recommender.read_training_rows,
    # training.reward.training_transitions, training.scoring.score_runner)
    driver_read_mb: float = 256.0
    fail_at_step: int = 0  # fault injection for tests: the last rank exits once after the first checkpoint at/after this step
    score_batch_size: int = 512  # score-rewards: rows per map_batches call
    score_concurrency: int = 1  # score-rewards: scoring actors (each loads the model once)
    score_cpus: float = 1.0  # score-rewards: CPUs per scoring actor
    score_full_catalog_max: int = 50_000  # score-rewards: catalogs up to this size get the exact policy baseline
    score_candidates: int = 1024  # score-rewards: sampled candidates for the baseline on larger catalogs
    # score-rewards: over a baseline set larger than this, E_pi CVaR = the exact mean baseline + E_pi[CVaR - mean]
    # from this many items drawn from pi at evenly spaced points of its CDF (0 = exact; docs/method.md "Scoring")
    score_cvar_draws: int = 256
    # score-rewards and offline ranking: "actors" each load the whole model; "sharded" runs in num_workers
    # workers with the item table sharded as in training (no process holds all of it); "local" scores / ranks in
    # the driver process; "auto" shards a table over score_unsharded_max_mb when there are >= 2 workers, else
    # runs locally a set (transitions to score, test rows to rank) of at most driver_read_mb, else uses actors
    score_runner: ScoreRunner = "auto"  # score-rewards / ranking: actors | sharded | local | auto (by size)
    score_unsharded_max_mb: float = 1024.0  # score-rewards / ranking: auto shards an item table over this (MiB)
    seed: int = 0  # random seed of model initialisation and data shuffling

    def validate(self, key: str = "train") -> None:
        for name in ("num_workers", "batch_size", "epochs", "report_every", "checkpoint_every", "collective_timeout_s",
                     "score_batch_size", "score_concurrency", "score_full_catalog_max", "score_candidates"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(self.max_steps >= 0, f"{key}.max_steps", "must be >= 0")
        _check(self.cpus_per_worker > 0, f"{key}.cpus_per_worker", "must be > 0")
        _check(self.ray_report_min_interval_s >= 0, f"{key}.ray_report_min_interval_s", "must be >= 0")
        _check(self.controller_poll_s > 0, f"{key}.controller_poll_s", "must be > 0")
        _check(self.malloc_trim_mb >= 0, f"{key}.malloc_trim_mb", "must be >= 0")
        _check(self.score_cpus > 0, f"{key}.score_cpus", "must be > 0")
        _check(self.score_unsharded_max_mb > 0, f"{key}.score_unsharded_max_mb", "must be > 0")
        _check(self.memory_feed_max_mb >= 0, f"{key}.memory_feed_max_mb", "must be >= 0")
        _check(self.driver_read_mb >= 0, f"{key}.driver_read_mb", "must be >= 0 (0 = never)")
        _check(self.lr > 0 and self.sparse_lr > 0, f"{key}.lr/sparse_lr", "must be > 0")
        _check(self.max_failures >= -1, f"{key}.max_failures", "must be >= -1 (-1 = unlimited)")
        for name in ("checkpoints_to_keep", "shuffle_buffer_rows", "fail_at_step", "prefetch_batches", "cache_rows",
                     "score_cvar_draws"):
            _check(getattr(self, name) >= 0, f"{key}.{name}", "must be >= 0")


@dataclass
class StageBudget:
    """Training budget of one stage (sections ``reward_train`` and ``rec_train``).

    A field left unset (null) takes its value from the shared ``train`` section; read the effective settings
    with :meth:`PipelineConfig.stage_train`, never these fields directly.
    """

    epochs: Optional[int] = None  # passes over the stage's training rows (>= 1); null = train.epochs
    max_steps: Optional[int] = None  # stop after this many steps (0 = run all epochs); null = train.max_steps
    batch_size: Optional[int] = None  # samples per worker per step (>= 1); null = train.batch_size
    lr: Optional[float] = None  # dense-parameter learning rate (> 0); null = train.lr

    def validate(self, key: str) -> None:
        for name in ("epochs", "batch_size"):
            _check(getattr(self, name) is None or getattr(self, name) >= 1, f"{key}.{name}",
                   "must be >= 1 (or null: use the train section)")
        _check(self.max_steps is None or self.max_steps >= 0, f"{key}.max_steps",
               "must be >= 0 (or null: use the train section)")
        _check(self.lr is None or self.lr > 0, f"{key}.lr", "must be > 0 (or null: use the train section)")

    def overrides(self) -> dict:
        """The fields that are set, as TrainConfig keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass
class AblationConfig:
    """`mtrec ablate` (mtrec_dist/ablation.py): one SASRec, one budget, guided by each reward in turn.

    Rows: A none (clicks) · B watch-ratio regressor · C leave/return classifier · D QR-IQL v1 (choices
    only) · E QR-IQL v2 with one quantile · F QR-IQL v2, mean guidance · G F with CVaR guidance · H oracle
    expected satisfaction · I shuffled F reward (control).
    """

    rows: list[AblationRow] = field(default_factory=lambda: list(ABLATION_ROWS))  # rows to run (A is always run: gains are vs A)
    worlds: int = 3  # simulated worlds (item truths): simulator seeds seed, seed+1, ...
    train_seeds: int = 2  # training seeds per world, or on real logs (the CIs include their variation)
    online_seeds: int = 5  # simulator seeds per trained model for online evaluation
    online_users: int = 300  # held-out users (never in the logs) per online seed
    online_days: int = 7  # days each online user is followed (return rate, cumulative satisfaction)
    reward_epochs: int = 2  # epochs of every reward model an ablation trains
    rec_epochs: int = 2  # epochs of every recommender an ablation trains
    batch_size: int = 256  # training batch size of every ablation run
    lr: float = 1e-3  # dense-parameter learning rate in every ablation run
    beta_sweep: list[float] = field(default_factory=list)  # watch_satisfaction values for the sweep ([] = none)
    # rows run at each beta_sweep value (A always)
    sweep_rows: list[AblationRow] = field(default_factory=lambda: ["A", "B", "F", "G"])
    out: str = ""  # output directory ("" = <run_dir>/ablation)
    pipeline_rows: list[AblationRow] = field(default_factory=list)  # rows `mtrec pipeline` runs after evaluate (simulator only)
    # each (world, training seed) as a Ray task of one CPU, as many at once as the cluster holds (false: one after
    # another in this process); the records are the same either way
    parallel: bool = True
    # real logs only: also rank with A's SASRec tilted by F's reward at serving, s + beta z(R) (row "F tilt",
    # mtrec_dist/serving_tilt.py), beta chosen from 0 and these on validation users ([] = no such row)
    tilt_strengths: list[float] = field(default_factory=list)
    # share of all users, taken from those not held out, on which the tilt's strength is chosen (never trained on
    # by the models that choose it; the reported models train on them as on every training user)
    validation_user_share: float = 0.15

    def validate(self, key: str = "ablation") -> None:
        for name in ("rows", "sweep_rows", "pipeline_rows"):
            bad = [r for r in getattr(self, name) if r not in ABLATION_ROWS]
            _check(not bad, f"{key}.{name}", f"unknown rows {bad}; choose from {list(ABLATION_ROWS)}")
        for name in ("worlds", "train_seeds", "online_seeds", "online_users", "online_days", "reward_epochs",
                     "rec_epochs", "batch_size"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(self.lr > 0, f"{key}.lr", "must be > 0")
        _check(all(isinstance(b, (int, float)) and b >= 0 for b in self.beta_sweep), f"{key}.beta_sweep",
               "must be a list of numbers >= 0")
        _check(all(isinstance(b, (int, float)) and b > 0 for b in self.tilt_strengths), f"{key}.tilt_strengths",
               "must be a list of numbers > 0 (0, no tilt, is always a candidate)")
        _check(0 < self.validation_user_share < 1, f"{key}.validation_user_share", "must be in (0, 1)")


@dataclass
class EvalConfig:
    """Offline ranking, reward validity and online simulator evaluation (docs/method.md "Metrics")."""

    ks: list = field(default_factory=lambda: [5, 10, 20])  # cut-offs K of the offline ranking metrics (HR@K, NDCG@K)
    sampled_negatives: int = 100  # offline sampled protocol: negatives the target is ranked among
    online_seeds: int = 5  # online evaluation: simulator seeds per recommender
    online_users: int = 200  # simulated users per seed
    online_session_len: int = 20  # online evaluation: slates per session at most (simulator max_session_len)
    seed: int = 0  # seed of the sampled negatives and the online simulator seeds
    # share of logged users (by a hash of the user, mtrec_dist/data/heldout.py) whose rows no stage trains on:
    # reward validity and offline ranking are measured on them, in the pipeline and the ablation alike.
    # 0: every user is trained on (daily retraining in production) and the offline evaluation is skipped
    heldout_user_share: float = 0.2
    # offline ranking ranks at most about this many held-out rows (0 = every one): beyond it, the rows of a subset of
    # the held-out users picked by the same hash (data.heldout.ranked_share), so that evaluating a large log costs a
    # bounded time (reward validity scores one action per row and reads its own, larger cap of held-out rows)
    max_ranked_rows: int = 500_000

    def validate(self, key: str = "eval") -> None:
        _check(len(self.ks) > 0 and all(isinstance(k, int) and k >= 1 for k in self.ks), f"{key}.ks",
               "must be a non-empty list of positive ints")
        _check(self.sampled_negatives >= 1, f"{key}.sampled_negatives", "must be >= 1")
        _check(self.online_seeds >= 1, f"{key}.online_seeds", "must be >= 1")
        _check(0.0 <= self.heldout_user_share < 1.0, f"{key}.heldout_user_share", "must be in [0, 1)")
        _check(self.max_ranked_rows >= 0, f"{key}.max_ranked_rows", "must be >= 0 (0 = rank every held-out row)")


@dataclass
class PipelineConfig:
    """Top-level config: one MTRec run."""

    run_dir: str = "runs/demo"  # folder holding every output of the run
    source: Literal["simulator", "logs"] = "simulator"  # data: the built-in simulator or your own logs (prepare.input)
    ray_address: str = ""  # "" = start/attach a local cluster; otherwise an address for ray.init
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)  # built-in user simulator
    prepare: PrepareConfig = field(default_factory=PrepareConfig)  # raw logs -> prepared transitions
    model: ModelConfig = field(default_factory=ModelConfig)  # shared encoder / embedding architecture
    reward: RewardConfig = field(default_factory=RewardConfig)  # QR-IQL mental reward model
    rec: RecConfig = field(default_factory=RecConfig)  # guided recommenders
    train: TrainConfig = field(default_factory=TrainConfig)  # distributed training settings shared by both stages
    reward_train: StageBudget = field(default_factory=StageBudget)  # reward model's budget (unset = train)
    rec_train: StageBudget = field(default_factory=StageBudget)  # every recommender's budget (unset = train)
    eval: EvalConfig = field(default_factory=EvalConfig)  # offline and online evaluation
    ablation: AblationConfig = field(default_factory=AblationConfig)  # `mtrec ablate` study

    def validate(self, key: str = "") -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v.validate(f.name)
        _check(bool(self.run_dir), "run_dir", "must not be empty")
        _check(not self.ablation.pipeline_rows or self.eval.heldout_user_share > 0, "eval.heldout_user_share",
               "must be > 0 when ablation.pipeline_rows is set: the ablation measures on held-out users")
        if self.ablation.tilt_strengths:
            _check(self.source == "logs", "ablation.tilt_strengths",
                   "the tilt row runs on real logs only (source: logs)")
            from mtrec_dist.data.heldout import validation_buckets  # the split's one definition (a pure hash)

            try:
                validation_buckets(self.eval.heldout_user_share, self.ablation.validation_user_share)
            except ValueError as e:
                _check(False, "ablation.validation_user_share", str(e))

    def stage_train(self, stage: Literal["reward", "rec"]) -> TrainConfig:
        """The effective training settings of ``stage``: ``train`` with the stage's budget fields that are set."""
        budgets = {"reward": self.reward_train, "rec": self.rec_train}
        if stage not in budgets:
            raise ValueError(f"unknown training stage {stage!r}; choose from {sorted(budgets)}")
        return dataclasses.replace(self.train, **budgets[stage].overrides())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def samples_by_popularity(section: "RewardConfig | RecConfig") -> bool:
    """Whether a reward or recommender section draws sampled negatives by item popularity (and so needs item
    counts): ``negative_sampler: popularity`` with ``num_negatives`` > 0."""
    return section.num_negatives > 0 and section.negative_sampler == "popularity"


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
        set_path(data, k, v)
    cfg = from_dict(PipelineConfig, data)
    cfg.validate()
    return cfg


def dump_config(cfg: PipelineConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
