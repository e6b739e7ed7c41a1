"""One name per source, the backend (CPU or GPU) picked behind it from ``implicit.gpu.HAS_CUDA``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from adrec.config import CandidateConfig

from .als import ALSSource
from .base import CandidateSource
from .bpr import BPRSource
from .ease import EASESource
from .itemitem import ItemItemSource
from .merge import MultiSource
from .popularity import PopularitySource
from .text import TextNeighbourSource

logger = logging.getLogger(__name__)

_BUILDERS: dict[str, Callable[..., CandidateSource]] = {
    "als": ALSSource,
    "bpr": BPRSource,
    "popularity": PopularitySource,
    "itemitem": lambda **kw: ItemItemSource(kind="cosine", **kw),
    "bm25": lambda **kw: ItemItemSource(kind="bm25", **kw),
    "text": TextNeighbourSource,
    "ease": EASESource,
}

#: The names :func:`make_source` and ``CandidateConfig.quotas`` understand.
SOURCE_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def make_source(name: str, **kwargs: Any) -> CandidateSource:
    """A new, unfitted source by name: "als", "bpr", "popularity", "itemitem" (cosine),
    "bm25", "ease" or "text" (needs ``item_embeddings=``). ``kwargs`` go to the source's constructor;
    ``use_gpu=None`` (the default for als/bpr) means ``implicit.gpu.HAS_CUDA``."""
    try:
        build = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown candidate source {name!r}; known: {', '.join(SOURCE_NAMES)}") from None
    if name == "text" and kwargs.get("item_embeddings") is None:
        raise ValueError("the 'text' source needs item_embeddings=(n_items, d) array")
    kwargs.setdefault("name", name)
    return build(**kwargs)


def source_kwargs(name: str, cfg: CandidateConfig) -> dict[str, Any]:
    """Constructor kwargs that ``cfg`` sets for the source called ``name``."""
    if name == "als":
        return dict(
            factors=cfg.factors,
            iterations=cfg.iterations,
            regularization=cfg.regularization,
            alpha=cfg.alpha,
            use_gpu=cfg.use_gpu,
            seed=cfg.seed,
        )
    if name == "bpr":  # BPR keeps its own iterations/learning rate defaults (SGD epochs, not ALS sweeps)
        return dict(factors=cfg.factors, use_gpu=cfg.use_gpu, seed=cfg.seed)
    if name in ("itemitem", "bm25"):
        return dict(K=cfg.itemitem_k)
    if name == "ease":
        return dict(l2=cfg.ease_l2)
    return {}


def make_multi_source(
    cfg: CandidateConfig,
    item_embeddings: np.ndarray | None = None,
    show_progress: bool = False,
) -> MultiSource:
    """The sources named by ``cfg.quotas`` (in that merge order), configured from ``cfg``.

    "text" needs ``item_embeddings``; without them it is left out (with a warning) and its
    share of the list goes to the rank-order fill.
    """
    sources: dict[str, CandidateSource] = {}
    quotas: dict[str, float] = {}
    for name, quota in cfg.quotas.items():
        if name not in _BUILDERS:
            raise ValueError(f"candidates.quotas names unknown source {name!r}; known: {', '.join(SOURCE_NAMES)}")
        kwargs = source_kwargs(name, cfg)
        if name == "text":
            if item_embeddings is None:
                logger.warning("candidate source 'text' skipped: no item embeddings given")
                continue
            kwargs["item_embeddings"] = item_embeddings
        if name in ("als", "bpr", "itemitem", "bm25"):
            kwargs["show_progress"] = show_progress
        sources[name] = make_source(name, **kwargs)
        quotas[name] = float(quota)
    if not sources:
        raise ValueError("candidates.quotas names no usable source")
    return MultiSource(sources, quotas)
