"""Stage 2's inputs: the features of every candidate of the union, computed from one stage's known
interactions at each user's cutoff (the time of their last known interaction).

- each source's score and rank for the user;
- item popularity overall (positives, interactions, positive rate) and RECENT popularity at the
  user's cutoff (interactions and positives in the last 1/7/30 days before it, also as a share of
  all activity in that window), time since the item's first and last interaction;
- the user's activity (interactions, positive rate, span);
- similarity of the candidate to the user's most recent items (item-item cosine with the last N
  positives), "what people interact with next" (the transition matrix read from the user's last N
  interactions), and tag/genre affinity with the user's positives (item categorical and
  multi-valued fields, e.g. MovieLens genres);
- the language-model ranker's calibrated click probability and the text similarity of the candidate to
  the user's recent positives (``lm.*``, :mod:`.lm`), from the ranker fitted on the stage's known rows;
- optional extra scores: named callables added as features.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from adrec.candidates.base import CandidateSource

from .known import KnownIndex
from .union import candidate_union

__all__ = ["ExtraScore", "candidate_features"]

DAY = 86400

#: extra_scores callables: (user_idx, item_idx, known interactions frame) -> one score per pair.
ExtraScore = Callable[[np.ndarray, np.ndarray, pd.DataFrame], np.ndarray]


def candidate_features(users: np.ndarray, sources: Mapping[str, CandidateSource], top_n: Mapping[str, int],
                       index: KnownIndex, known: pd.DataFrame, n_catalog: int, rank_depth: int,
                       next_candidates: int, extra_scores: Mapping[str, ExtraScore],
                       frame: bool = True, lm: Any = None) -> tuple[np.ndarray, np.ndarray, Any]:
    """(candidate users, candidate items, features) of the union for ``users`` (sorted, unique): a
    DataFrame, or with ``frame=False`` the name -> column dict (scoring skips pandas: a quarter of a
    one-user request's CPU). The column order is the re-ranker's feature order. ``lm``: the stage's
    :class:`~adrec.topk.lm.LMScorer` (the ``lm.*`` features), or None."""
    cu, ci, score, rank = candidate_union(users, sources, top_n, index, n_catalog, rank_depth, next_candidates)
    f: dict[str, np.ndarray] = {}
    for name in sources:
        s = score[name]
        f[f"{name}.score"] = np.where(np.isfinite(s), s, np.nan).astype(np.float32)
        f[f"{name}.rank"] = rank[name]
    t = index.cutoff[cu]  # the user's cutoff: their last known interaction
    # item popularity, overall and recent (windows ending at the user's cutoff)
    f["item.n"] = index.item_n[ci]
    f["item.pos"] = index.item_pos[ci]
    f["item.pos_rate"] = (index.item_pos[ci] + 1.0) / (index.item_n[ci] + 2.0)
    for w in index.windows:
        lo = t - w * DAY
        n_any = index.item_count_between(index.keys_any, ci, lo, t)
        n_pos = index.item_count_between(index.keys_pos, ci, lo, t)
        tot = (np.searchsorted(index.all_t, t, side="right") - np.searchsorted(index.all_t, lo, side="right"))
        f[f"item.recent_n@{w}d"] = n_any
        f[f"item.recent_pos@{w}d"] = n_pos
        f[f"item.recent_share@{w}d"] = n_any / np.maximum(tot, 1).astype(np.float32) * 1000.0
    first = index.item_first(ci)
    last = index.item_last_before(ci, t)
    f["item.age_d"] = ((t - first) / DAY).astype(np.float32)
    f["item.since_last_d"] = ((t - last) / DAY).astype(np.float32)
    # the user
    f["user.n"] = index.user_n[cu]
    f["user.pos_rate"] = (index.user_pos[cu] + 1.0) / (index.user_n[cu] + 2.0)
    f["user.span_d"] = ((index.cutoff[cu] - index.user_first[cu]) / DAY).astype(np.float32)
    # the candidate against the user's recent items
    for n in index.last_n:
        f[f"ui.cos_last{n}"] = _pair_product(index.last_pos[n], index.cosine, cu, ci, users) / float(n)
        f[f"ui.next_last{n}"] = _pair_product(index.last_any[n], index.transitions, cu, ci, users)
    if index.item_tags is not None:
        prof = index.user_tags[cu]
        tags = index.item_tags[ci]
        f["ui.tag_aff"] = np.asarray(tags.multiply(prof).sum(axis=1)).ravel().astype(np.float32) / np.maximum(
            index.tag_count[ci], 1.0)
    if lm is not None:
        f.update(lm.features(cu, ci, index))
    for name, fn in extra_scores.items():
        f[f"extra.{name}"] = np.asarray(fn(cu, ci, known), dtype=np.float32).ravel()
    return cu, ci, (pd.DataFrame(f) if frame else f)


def _pair_product(left: sp.csr_matrix, right: sp.spmatrix, cu: np.ndarray, ci: np.ndarray, users: np.ndarray) -> np.ndarray:
    """(left @ right)[cu, ci] computed only for the batch's users."""
    prod = left[users] @ right
    prod = prod.toarray() if sp.issparse(prod) else np.asarray(prod)
    return prod[np.searchsorted(users, cu), ci].astype(np.float32)
