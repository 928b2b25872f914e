"""mtrec-dist: distributed MTRec -- learn users' mental reward from behaviour logs (QR-IQL) and train
reward-guided sequential recommenders, on Ray (Data, Train) + TorchRec.

The packages, bottom to top (each imports only from those before it)::

    choices, config, layout, runtime   named choices, settings, the run folder's paths, Ray/device helpers
    data                         readers, validation, the simulator, `prepare` (logs -> transitions)
    models                       item embeddings (TorchRec), encoders, the reward model, recommenders
    objectives                   the losses: QR-IQL, mental reward, ranking, guidance
    training                     Ray Train + TorchRec DMP fits, checkpoints, scoring, sharding
    evaluation                   offline/online metrics and the report
    commands, cli                the `mtrec` command line (also `python -m mtrec_dist`)
    stages, pipeline, retrain, ablation, planning   whole runs built from the above

Main entry points (imported lazily, so ``import mtrec_dist`` stays fast)::

    from mtrec_dist import load_config, run_pipeline
    out = run_pipeline(load_config("configs/tiny.yaml"))     # what `mtrec pipeline` does
"""
import logging

from mtrec_dist._lazy import lazy_exports

# TorchRec asks torch.fx whether it is tracing; torch answers once per process with a warning meant for
# torch's own developers ("is_fx_tracing will return true for both ..."), which says nothing to our users.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "PipelineConfig": ".config", "load_config": ".config", "ConfigError": ".config",
    "RunLayout": ".layout",
    "run_pipeline": ".pipeline", "retrain_day": ".retrain", "run_ablation": ".ablation",
    "StageRunner": ".stages", "plan_capacity": ".planning", "main": ".cli",
})
