"""Candidate generation: implicit ALS / BPR, EASE, item-item, popularity and text-similarity sources
behind one small interface (:class:`CandidateSource`), merged by quota (:class:`MultiSource`).

Importing this package has no side effects (implicit is imported when a model is built).
"""

from .als import ALSSource
from .base import PAD_SCORE, CandidateSource, has_gpu, load_source, resolve_use_gpu, topk
from .bpr import BPRSource
from .ease import EASESource, ease_weights
from .evaluate import recall_at
from .factory import SOURCE_NAMES, make_multi_source, make_source
from .itemitem import ItemItemSource
from .merge import MultiSource, merge_candidates
from .popularity import PopularitySource
from .text import TextNeighbourSource

__all__ = [
    "ALSSource",
    "BPRSource",
    "CandidateSource",
    "EASESource",
    "ItemItemSource",
    "MultiSource",
    "PAD_SCORE",
    "PopularitySource",
    "SOURCE_NAMES",
    "TextNeighbourSource",
    "ease_weights",
    "has_gpu",
    "load_source",
    "make_multi_source",
    "make_source",
    "merge_candidates",
    "recall_at",
    "resolve_use_gpu",
    "topk",
]
