"""Training: distributed fits on Ray Train with TorchRec ``DistributedModelParallel``, and what surrounds them.

* :func:`train_reward_model` / :func:`train_recommender` (:func:`train_recommenders`: several in one Ray Train
  run): the two trainers, one launch path (:func:`launch_fit`, :func:`launch_fits`) around
  :func:`fit_distributed` / :func:`fit_distributed_jobs` (the driver, :mod:`.loop`; the Ray Train worker's
  steps, :mod:`.worker`; metrics.jsonl and TensorBoard, :mod:`.metrics_log`; model specs, :mod:`.specs`);
* sharding: planner, sharders, fused sparse optimizer (:mod:`.sharding`; `mtrec plan` uses the same);
* checkpoints: sharded DCP saves, resume (:mod:`.checkpoint`), safe loading (:mod:`.safe_dcp`) and warm
  start (:mod:`.warm_start`);
* :func:`score_rewards`: batch inference of the reward model on Ray Data (:mod:`.scoring`).

Names are re-exported lazily (torch, TorchRec and Ray load on first use).
"""
from mtrec_dist._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "train_reward_model": ".reward", "default_reward_checkpoint": ".reward",
    "train_recommender": ".recommender", "train_recommenders": ".recommender", "RecJob": ".recommender",
    "default_rec_checkpoint": ".recommender", "launch_fit": ".launch", "launch_fits": ".launch",
    "fit_distributed": ".loop", "fit_distributed_jobs": ".loop", "FitJob": ".loop", "FitResult": ".loop",
    "read_history": ".loop",
    "score_rewards": ".scoring",
    "shard_model": ".sharding", "plan_model": ".sharding",
    "load_checkpoint": ".checkpoint", "load_unsharded_model": ".checkpoint", "warm_start_module": ".checkpoint",
    "CheckpointError": ".checkpoint",
})
