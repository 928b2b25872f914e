"""Evaluation: everything the report shows, measured from a run's trained artefacts (nothing here trains).

* :func:`evaluate_run`: reward validity, offline ranking (full catalog and sampled negatives, all and
  satisfied targets) and, on simulator data, online results with paired gains (:mod:`.evaluate`,
  :mod:`.offline`, :mod:`.online`);
* :mod:`.metrics`: HR/NDCG, Spearman, ROC-AUC, confidence intervals;
* :func:`write_report`: HTML, PNG figures, metrics.json, TensorBoard (:mod:`.report`).

Names are re-exported lazily.
"""
from mtrec_dist._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "evaluate_run": ".evaluate", "headline": ".evaluate", "write_report": ".report",
    "evaluate_online": ".online", "hit_rate_at_k": ".metrics", "ndcg_at_k": ".metrics", "mean_ci95": ".metrics",
    "spearman": ".metrics", "roc_auc": ".metrics",
})
