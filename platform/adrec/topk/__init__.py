"""Top-K recommendation beyond the candidate sources: the EASE peer, the two-stage re-ranker
(:class:`TwoStageRecommender`) and the split-and-evaluate protocol (:mod:`.protocol`). The benchmark
that compares this full path with the classic peers is ``benchmarks/topk.py``, outside the library.

Importing this package has no side effects; LightGBM is imported only when a re-ranker is built.
"""

from .ease import EASESource, ease_weights
from .protocol import Stage, evaluate_lists, inner_stage, make_stage
from .rerank import DEFAULT_SOURCES, TopKData, TwoStageRecommender, item_tag_matrix

__all__ = [
    "DEFAULT_SOURCES",
    "EASESource",
    "Stage",
    "TopKData",
    "TwoStageRecommender",
    "ease_weights",
    "evaluate_lists",
    "inner_stage",
    "item_tag_matrix",
    "make_stage",
]
