"""Models (torch modules; TorchRec for the item table so it can be sharded across ranks).

* :class:`ItemEmbedding`: the one item table, a TorchRec ``EmbeddingCollection`` serving every lookup;
* sequence encoders (SASRec, GRU4Rec, Caser, NextItNet) over a user's recent items and feedback;
* :class:`QRIQLModel`: the mental reward model (quantile critic, decision utility, mental reward);
* :class:`SequentialRecommender`: next-item recommenders, click-trained or reward-guided;
* :class:`FeedbackRegressor`: the supervised baseline reward of the ablation.

Every model is built on the ``meta`` device for sharding and exposes ``losses(batch)``; the losses
themselves live in :mod:`mtrec_dist.objectives`.  Names are re-exported lazily.
"""
from mtrec_dist._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "ItemEmbedding": ".embeddings", "ITEM_TABLE": ".embeddings", "build_encoder": ".encoders",
    "QRIQLModel": ".reward_model", "SequentialRecommender": ".recommender",
    "FeedbackRegressor": ".feedback_regressor",
})
