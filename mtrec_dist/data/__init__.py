"""Data: raw behaviour logs in, prepared transitions out.

* readers (CSV, Parquet, MovieLens, RetailRocket, KuaiRand) that map every format to one event schema and
  refuse bad rows with a reason instead of dropping or corrupting them (:mod:`.readers` with Parquet and the
  dispatch, :mod:`.text_formats`, :mod:`.input_files` for listing, :mod:`.parsed` for exact casts and shared
  column checks, :mod:`.schema`);
* the built-in simulator: logs plus the hidden truth (satisfaction, return) they were drawn from
  (:mod:`.simulator` the logger, :mod:`.sim_world` the world model, :mod:`.sim_env` the online environment);
* `prepare` on Ray Data: validation, vocabularies, sessions, windowed transitions, manifest
  (:mod:`.prepare` and the modules it drives);
* reading transitions back for training (:mod:`.pipeline`).

Public names are re-exported lazily (torch/pyarrow/Ray load on first use).
"""
from mtrec_dist._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "prepare_dataset": ".prepare", "default_paths": ".prepare", "summarize_manifest": ".prepare",
    "load_manifest": ".prepare", "load_vocab": ".prepare", "Vocab": ".prepare",
    "simulate_logs": ".simulator", "SimulatorEnv": ".simulator", "ItemTruth": ".simulator",
    "default_sim_dir": ".simulator",
    "read_events": ".readers", "list_input_files": ".readers", "InputError": ".readers",
    "EVENT_SCHEMA": ".schema", "TRANSITION_COLUMNS": ".schema",
    "read_transitions": ".pipeline", "count_transitions": ".pipeline",
})
