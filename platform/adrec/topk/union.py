"""Stage 1 of the two-stage recommender: fit the candidate sources of one stage and take, per user,
the union of their top lists, with every source's score and rank at every candidate.

A source spec is the flat form of :class:`adrec.config.TopKSourceConfig`: ``{"kind": ..., "n": how
many of its top items join the union, "data": "positives" or "seen" (what it is fitted on),
**constructor kwargs}``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from adrec.candidates.base import CandidateSource, check_name, topk
from adrec.candidates.factory import make_source

from .known import KnownIndex

__all__ = ["build_source", "candidate_union", "fit_sources"]

#: A user whose union holds fewer items than this takes every returnable item of the catalog.
MIN_UNION = 50


def build_source(spec: Mapping[str, object], name: str) -> CandidateSource:
    """An unfitted source from a spec (the keys other than kind, n and data go to its constructor)."""
    kw = {k: v for k, v in spec.items() if k not in ("kind", "n", "data")}
    src = make_source(str(spec["kind"]), **kw)  # (make_source's first argument is the kind, called name)
    src.name = check_name(name)
    return src


def fit_sources(specs: Mapping[str, Mapping[str, object]], index: KnownIndex) -> dict[str, CandidateSource]:
    """Every source of ``specs``, fitted on the stage's positives or on every seen pair."""
    sources = {}
    for name, spec in specs.items():
        src = build_source(spec, name)
        src.fit(index.positives if spec["data"] == "positives" else index.seen)
        sources[name] = src
    return sources


def candidate_union(users: np.ndarray, sources: Mapping[str, CandidateSource], top_n: Mapping[str, int],
                    index: KnownIndex, n_catalog: int, rank_depth: int, next_candidates: int,
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Union of the sources' top ``top_n[name]`` lists for ``users`` -> (candidate users, candidate
    items, per source the score and rank at each candidate), grouped by user in ``users``' order.

    Ranks count among the user's returnable items (1 = best; ties to the lower item index) and are
    capped at ``rank_depth + 1``; ``next_candidates`` > 0 also adds the top items by transition
    score from the user's last interactions.
    """
    seen = index.seen[users]
    seen_rows = np.repeat(np.arange(len(users)), np.diff(seen.indptr))
    blocks, ranks = {}, {}
    member = np.zeros((len(users), index.n_items), bool)
    for name, src in sources.items():
        s = np.array(src._score_users(users, seen), dtype=np.float32, copy=True)
        s[:, n_catalog:] = -np.inf
        s[seen_rows, seen.indices] = -np.inf
        order = np.argsort(-s, axis=1, kind="stable")
        n = int(top_n[name])
        depth = max(rank_depth, n)
        rank = np.empty(s.shape, np.float32)
        np.put_along_axis(rank, order, np.arange(1, s.shape[1] + 1, dtype=np.float32)[None, :], axis=1)
        rank[~np.isfinite(s) | (rank > depth)] = depth + 1
        member |= rank <= n
        blocks[name], ranks[name] = s, rank
    if next_candidates > 0:  # "what people interact with next" after the user's last items
        s = np.asarray((index.last_any[max(index.last_n)][users] @ index.transitions).todense(), dtype=np.float32)
        s[s <= 0] = -np.inf
        s[:, n_catalog:] = -np.inf
        s[seen_rows, seen.indices] = -np.inf
        ids, _ = topk(s, next_candidates)
        ok = ids >= 0
        member[np.repeat(np.arange(len(users))[:, None], ids.shape[1], axis=1)[ok], ids[ok]] = True
    # never fewer than the catalog allows: tiny catalogs take every unseen item
    allowed = np.ones((len(users), index.n_items), bool)
    allowed[:, n_catalog:] = False
    allowed[seen_rows, seen.indices] = False
    short = member.sum(axis=1) < min(MIN_UNION, n_catalog)
    member[short] = allowed[short]
    member &= allowed
    ru, ci = np.nonzero(member)
    score = {n: b[ru, ci] for n, b in blocks.items()}
    rank = {n: r[ru, ci] for n, r in ranks.items()}
    return users[ru], ci.astype(np.int64), score, rank
