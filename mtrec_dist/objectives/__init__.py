"""Objectives: the losses as pure tensor functions (no modules, no state), each tested on its own.

* :mod:`.qr_iql`: QR-IQL -- soft values, the chi^2 inverse-soft-Q loss, quantile Huber regression,
  distributional targets, CVaR;
* :mod:`.mental_reward`: the consequence likelihood and the realised mental reward (QR-IQL v2);
* :mod:`.ranking`: full and sampled softmax cross-entropy for next-item ranking;
* :mod:`.guidance`: how the mental reward steers a recommender (weights, TD/actor-critic).

Names are re-exported lazily.
"""
from mtrec_dist._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "qr_iql_loss": ".qr_iql", "quantile_huber_loss": ".qr_iql", "soft_value": ".qr_iql", "cvar": ".qr_iql",
    "consequence_nll": ".mental_reward", "realised_mental_reward": ".mental_reward", "choice_nll": ".mental_reward",
    "ConsequenceModel": ".mental_reward",
    "full_softmax_ce": ".ranking", "sampled_softmax_ce": ".ranking",
    "guidance_weights": ".guidance", "td_loss": ".guidance",
})
