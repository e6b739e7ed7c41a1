"""What the two-stage recommender learns from: the prepared interactions, the index sizes and the
items' tags (genres, categories) as a 0/1 matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .exposure import provider_codes

__all__ = ["TopKData", "item_tag_matrix"]


def item_tag_matrix(items: pd.DataFrame, n_items: int) -> sp.csr_matrix:
    """(n_items, n_tags) 0/1 matrix from an items frame's ``c:*`` code columns (categorical codes
    and multi-valued code lists; code 0 = unknown/padding is dropped). Each (column, code) pair
    is one tag."""
    rows, cols = [], []
    offset = 0
    idx = items["item_idx"].to_numpy(np.int64) if "item_idx" in items else np.arange(len(items))
    for c in [c for c in items.columns if str(c).startswith("c:")]:
        vals = items[c].to_numpy()
        if len(vals) and isinstance(vals[0], (list, np.ndarray)):
            lens = np.fromiter((len(v) for v in vals), dtype=np.int64, count=len(vals))
            codes = np.concatenate([np.asarray(v, np.int64) for v in vals]) if lens.sum() else np.zeros(0, np.int64)
            r = np.repeat(idx, lens)
        else:
            codes = pd.to_numeric(pd.Series(vals), errors="coerce").fillna(0).to_numpy(np.int64)
            r = idx
        keep = codes > 0
        if not keep.any():
            continue
        rows.append(r[keep])
        cols.append(codes[keep] + offset)
        offset += int(codes[keep].max()) + 1
    if not rows:
        return sp.csr_matrix((n_items, 0), dtype=np.float32)
    m = sp.csr_matrix((np.ones(sum(len(r) for r in rows), np.float32), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n_items, offset))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


@dataclass
class TopKData:
    """What the two-stage recommender learns from: the prepared interactions (``user_idx``,
    ``item_idx``, ``ts``, ``label``, ``split``), the index sizes and, optionally, item tags."""

    interactions: pd.DataFrame
    n_users: int
    n_items: int
    n_catalog: int
    item_tags: sp.csr_matrix | None = None
    # Per item index its provider's code (adrec.topk.exposure.provider_codes), for exposure-aware re-ranking.
    item_provider: np.ndarray | None = None
    # The prepared rows (``spec``, ``interactions`` with ``f:*`` codes and ``hist``, ``items``, ``users``: the
    # prepare stage's Features) that the language-model ranker features (topk.ranker_features) train on.
    features: Any = None

    @classmethod
    def from_features(cls, features: Any) -> TopKData:
        """From :class:`adrec.features.pipeline.Features` (the prepare stage's outputs)."""
        spec = features.spec
        return cls(features.interactions, int(spec.n_users), int(spec.n_items), int(spec.n_catalog),
                   item_tag_matrix(features.items, int(spec.n_items)), provider_codes(features.items, int(spec.n_items)),
                   features)
