"""Exposure-aware re-ranking: trade a little relevance for more even exposure of item providers.

``topk.exposure_weight`` (w, 0 = off, the default) re-ranks each served list greedily, in the manner of
maximal marginal relevance (Carbonell & Goldstein), with the provider's exposure already given out in
the same list as the redundancy term. From a user's pool (the best ``topk.exposure_pool`` candidates by
the re-ranker's score s), position r = 1, 2, ... takes the remaining item i that maximises

    gain(i) = (1 - w) * s~(i)  -  w * E(provider(i))

where s~ is s min-max scaled to [0, 1] over the pool (a pool of equal scores scales to 1), and E(p) the
position-weighted exposure provider p already received in this list: the sum of 1/log2(1 + r') over the
positions r' < r holding one of its items (the exposure weight of the fairness metrics,
:func:`adrec.metrics.exposure_to_merit`). Ties go to the item earlier in the pool (higher score, then
lower item index). w = 0 is the re-ranker's order; w = 1 ignores relevance beyond the pool and spreads
the list over providers. Greedy choice makes the lists prefix-consistent: the first k items do not
depend on how long a list is asked for, so a stored list cut to k is the list ranked for k.

Each list is re-ranked on its own (the served lists are independent and a request needs no shared
state); a provider that fills many lists is held back in each, so its share of all exposure falls.
The provider is the fairness report's (:func:`provider_column`): the advertiser, else the primary genre.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["exposure_rerank", "provider_codes", "provider_column"]


def provider_column(items: pd.DataFrame) -> tuple[pd.Series | None, str]:
    """(provider label per item row, what it is) -- the advertiser, or the primary genre as a stand-in."""
    if "item.advertiser" in items:
        return items["item.advertiser"].fillna("").astype(str), "the item's advertiser (`item.advertiser`)"
    if "item.genre" in items:
        primary = items["item.genre"].fillna("").astype(str).str.split("|").str[0]
        return primary, ("a stand-in: the data has no advertisers, so the item's primary genre (the first "
                         "value of `item.genre`) plays the provider")
    return None, "none (the items have neither `item.advertiser` nor `item.genre`)"


def provider_codes(items: pd.DataFrame, n_items: int) -> np.ndarray | None:
    """Per item index, an integer code of its provider (equal labels, equal codes), or None when the
    items have no provider column. Items missing from ``items`` share one code of their own."""
    labels, _ = provider_column(items)
    if labels is None:
        return None
    idx = items["item_idx"].to_numpy(np.int64) if "item_idx" in items else np.arange(len(items))
    _, codes = np.unique(labels.to_numpy(), return_inverse=True)
    out = np.full(n_items, codes.max() + 1 if len(codes) else 0, np.int64)
    keep = idx < n_items
    out[idx[keep]] = codes[keep]
    return out


def exposure_rerank(ids: np.ndarray, scores: np.ndarray, provider: np.ndarray, weight: float,
                    n: int) -> np.ndarray:
    """Positions into each pool row of the re-ranked list of ``n`` items (the module's algorithm).

    ``ids`` (users, pool) item indices, best first by ``scores`` (-1 padding), ``provider`` the code of
    every item index. Returns (users, n) int64 positions into the rows, -1 where a pool runs out.
    Vectorised over users: one step per list position.
    """
    ids = np.asarray(ids, np.int64)
    users, pool = ids.shape
    n = min(int(n), pool)
    valid = ids >= 0
    if weight <= 0 or pool == 0:
        return np.where(valid[:, :n], np.arange(n)[None, :], -1)
    s = np.where(valid, np.asarray(scores, np.float64), np.nan)
    lo, hi = np.nanmin(np.where(valid, s, np.inf), axis=1), np.nanmax(np.where(valid, s, -np.inf), axis=1)
    span = hi - lo
    scaled = np.where(span[:, None] > 0, (s - lo[:, None]) / np.where(span > 0, span, 1.0)[:, None], 1.0)
    prov = np.where(valid, np.asarray(provider, np.int64)[np.maximum(ids, 0)], 0)
    n_prov = int(prov.max()) + 1
    exposure = np.zeros((users, n_prov), np.float64)
    taken = ~valid
    rows = np.arange(users)
    out = np.full((users, n), -1, np.int64)
    for r in range(n):
        gain = (1.0 - weight) * scaled - weight * exposure[rows[:, None], prov]
        gain[taken] = -np.inf
        best = np.argmax(gain, axis=1)  # the first maximum: the earlier pool position wins a tie
        ok = ~taken[rows, best]
        out[ok, r] = best[ok]
        taken[rows[ok], best[ok]] = True
        exposure[rows[ok], prov[rows[ok], best[ok]]] += 1.0 / np.log2(2.0 + r)
    return out
