"""Top-K recommendation on top of the candidate sources: the two-stage recommender
(:class:`TwoStageRecommender`: a union of sources, then a learned re-ranker), the protocol stages it
learns and is scored under, and the stage that fits it into a run (:func:`fit_topk`).

Modules, one job each: ``protocol`` (which rows a stage learns from, excludes and is scored on),
``data`` (what the recommender learns from), ``known`` (the index of a stage's known interactions),
``union`` (the sources and their candidate union), ``lm`` (the language-model ranker's features, one
stage ranker per stage), ``features`` (per-candidate features), ``gbdt``
(the LightGBM / scikit-learn re-ranker), ``recommender`` (fit, rank, save, load), ``stage`` (the run's
``topk`` folder).

Importing this package has no side effects; LightGBM is imported only when a re-ranker is built.
"""

from .data import TopKData, item_tag_matrix
from .protocol import Stage, inner_stage, make_stage
from .recommender import TwoStageRecommender, default_params
from .stage import TOPK_DIR, fit_candidate_stage, fit_topk, topk_dir
from .union import build_source

__all__ = [
    "Stage",
    "TOPK_DIR",
    "TopKData",
    "TwoStageRecommender",
    "build_source",
    "default_params",
    "fit_candidate_stage",
    "fit_topk",
    "inner_stage",
    "item_tag_matrix",
    "make_stage",
    "topk_dir",
]
