"""Candidate recall, as the evaluation protocol in docs/design.md defines it."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def recall_at(
    ids: np.ndarray,
    test_items: Sequence[set[int]],
    ks: Iterable[int] = (50, 100, 200),
) -> dict[str, float]:
    """Mean over users with test positives of |top-K ∩ T| / |T|.

    ``ids``: (users, N) candidate ids in rank order (-1 = padding), row u for ``test_items[u]``.
    Users whose set is empty are not evaluated. A K above N uses the whole list (a list of N
    cannot hold more). Returns ``{"recall@K": value}`` (NaN when no user has a test positive).
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be 2-D (users, N), got shape {ids.shape}")
    if ids.shape[0] != len(test_items):
        raise ValueError(f"ids has {ids.shape[0]} rows for {len(test_items)} users' test sets")
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be >= 1, got {ks}")
    if ks and max(ks) > ids.shape[1]:
        logger.warning("recall@%d asked of lists of %d candidates", max(ks), ids.shape[1])
    n_rows, width = ids.shape
    sizes = np.fromiter((len(t) for t in test_items), dtype=np.int64, count=n_rows)
    evaluated = sizes > 0
    if not evaluated.any():
        return {f"recall@{k}": float("nan") for k in ks}
    # hit[u, r]: is ids[u, r] one of user u's test items? Encode (user, item) pairs as one int.
    t_users = np.repeat(np.arange(n_rows, dtype=np.int64), sizes)
    t_items = np.fromiter((int(i) for t in test_items for i in t), dtype=np.int64, count=int(sizes.sum()))
    span = int(max(ids.max(initial=-1), t_items.max(initial=-1))) + 1
    test_codes = t_users * span + t_items
    valid = ids >= 0
    codes = np.arange(n_rows, dtype=np.int64)[:, None] * span + np.where(valid, ids, 0)
    hit = valid & np.isin(codes, test_codes)
    cum = np.cumsum(hit, axis=1)
    out = {}
    for k in ks:
        kk = min(k, width)
        hits = cum[:, kk - 1] if kk else np.zeros(n_rows)
        out[f"recall@{k}"] = float(np.mean(hits[evaluated] / sizes[evaluated]))
    return out
