"""Merging several sources' candidate lists into one list per user, by quota."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .base import PAD_SCORE, CandidateSource, check_name, read_format_json, write_json

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "adrec.candidates.multi"
MANIFEST_VERSION = 1

Merged = list[tuple[np.ndarray, list[list[str]]]]


def quota_slots(quotas: Mapping[str, float], n: int) -> dict[str, int]:
    """Slots each source may fill first: ``floor(quota * n)`` (the rest is filled by rank)."""
    return {name: int(math.floor(float(q) * n + 1e-9)) for name, q in quotas.items()}


def merge_candidates(
    per_source: Mapping[str, tuple[np.ndarray, np.ndarray]],
    quotas: Mapping[str, float],
    n: int,
) -> Merged:
    """Merge per-source ranked lists into at most ``n`` items per user.

    ``per_source``: name -> (ids (users, k) with -1 padding, scores), every source with the
    same number of user rows. Rules, applied per user:

    1. Quota pass: for each source in the order of ``quotas``, walk its list from the top and
       add up to ``floor(quota * n)`` items not yet in the merged list (items already taken
       do not use up its quota).
    2. Fill pass: while slots remain, take rank 0 of every source, then rank 1, ... (sources
       in ``quotas`` order, then any source not named in ``quotas``), skipping items taken.
    3. Every item's ``sources`` lists every source whose list contains it, in that same source
       order: dedupe keeps every proposer.

    Returns, per user, (item ids int64 in merged order, sources per item).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for name, q in quotas.items():
        if not (float(q) >= 0 and math.isfinite(float(q))):
            raise ValueError(f"quota for {name!r} must be a finite number >= 0, got {q!r}")
    order = [s for s in quotas if s in per_source] + [s for s in per_source if s not in quotas]
    if not order:
        return []
    lists = {s: np.asarray(per_source[s][0], dtype=np.int64) for s in order}
    n_users = {s: lists[s].shape[0] for s in order}
    if len(set(n_users.values())) != 1:
        raise ValueError(f"every source must have the same number of user rows, got {n_users}")
    for s, ids in lists.items():
        if ids.ndim != 2:
            raise ValueError(f"ids of source {s!r} must be 2-D (users, k), got shape {ids.shape}")
    slots = quota_slots({s: quotas[s] for s in order if s in quotas}, n)
    rank = {s: i for i, s in enumerate(order)}
    out: Merged = []
    for u in range(next(iter(n_users.values()))):
        rows = {s: [int(i) for i in lists[s][u] if i >= 0] for s in order}
        chosen: list[int] = []
        taken: set[int] = set()
        for s in order:  # 1. quota pass
            budget = min(slots.get(s, 0), n - len(chosen))
            for item in rows[s]:
                if budget <= 0:
                    break
                if item not in taken:
                    taken.add(item)
                    chosen.append(item)
                    budget -= 1
        depth = max((len(r) for r in rows.values()), default=0)
        r = 0
        while len(chosen) < n and r < depth:  # 2. fill pass, rank by rank
            for s in order:
                if r < len(rows[s]):
                    item = rows[s][r]
                    if item not in taken:
                        taken.add(item)
                        chosen.append(item)
                        if len(chosen) >= n:
                            break
            r += 1
        proposers: dict[int, list[str]] = {i: [] for i in chosen}
        for s in order:  # 3. attribution
            for item in rows[s]:
                p = proposers.get(item)
                if p is not None and (not p or p[-1] != s):
                    p.append(s)
        for p in proposers.values():
            p.sort(key=rank.__getitem__)
        out.append((np.asarray(chosen, dtype=np.int64), [proposers[i] for i in chosen]))
    return out


def pad_merged(merged: Merged, n: int) -> tuple[np.ndarray, np.ndarray, list[list[list[str]]]]:
    """(ids (users, n) int64 padded with -1, positional scores float32, sources per user).

    The score of the item at merged position r is ``(n - r) / n`` (descending with the merged
    order; not comparable with any single source's scores); padding gets :data:`PAD_SCORE`.
    """
    ids = np.full((len(merged), n), -1, dtype=np.int64)
    scores = np.full((len(merged), n), PAD_SCORE, dtype=np.float32)
    sources: list[list[list[str]]] = []
    pos = ((n - np.arange(n)) / max(n, 1)).astype(np.float32)
    for u, (items, srcs) in enumerate(merged):
        ids[u, : len(items)] = items
        scores[u, : len(items)] = pos[: len(items)]
        sources.append(srcs)
    return ids, scores, sources


class MultiSource:
    """Several named sources plus the quotas that merge them.

    ``sources``: name -> fitted or unfitted :class:`CandidateSource` (or a list, keyed by each
    source's ``name``). ``quotas``: name -> share of the list, in merge order; a source without
    a quota only fills leftover slots.
    """

    def __init__(
        self,
        sources: Mapping[str, CandidateSource] | Sequence[CandidateSource],
        quotas: Mapping[str, float],
    ) -> None:
        if isinstance(sources, Mapping):
            items = list(sources.items())
        else:
            items = [(s.name, s) for s in sources]
        self.sources: dict[str, CandidateSource] = {}
        for name, src in items:
            check_name(name)
            if not isinstance(src, CandidateSource):
                raise TypeError(f"source {name!r} is a {type(src).__name__}, not a CandidateSource")
            if name in self.sources:
                raise ValueError(f"two sources are named {name!r}")
            if src.name != name:
                src.name = name
            self.sources[name] = src
        if not self.sources:
            raise ValueError("MultiSource needs at least one source")
        self.quotas: dict[str, float] = {}
        for name, q in quotas.items():
            q = float(q)
            if not (q >= 0 and math.isfinite(q)):
                raise ValueError(f"quota for {name!r} must be a finite number >= 0, got {q!r}")
            if name not in self.sources:
                logger.warning("quota for %r ignored: no such source (have %s)", name, sorted(self.sources))
                continue
            self.quotas[name] = q

    def __repr__(self) -> str:
        return f"MultiSource({list(self.sources)}, quotas={self.quotas})"

    def __getitem__(self, name: str) -> CandidateSource:
        return self.sources[name]

    @property
    def names(self) -> list[str]:
        """Source names in merge order."""
        return [s for s in self.quotas] + [s for s in self.sources if s not in self.quotas]

    def fit(self, user_items: sp.csr_matrix) -> MultiSource:
        for name in self.names:
            self.sources[name].fit(user_items)
        return self

    def recommend_per_source(
        self,
        user_idx: np.ndarray,
        n: int,
        exclude: sp.csr_matrix | None = None,
        context: Any = None,
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each source's own top ``n`` (``context`` goes to the popularity sources)."""
        out = {}
        for name in self.names:
            src = self.sources[name]
            if context is not None and _takes_context(src):
                out[name] = src.recommend(user_idx, n, exclude, context=context)
            else:
                out[name] = src.recommend(user_idx, n, exclude)
        return out

    def recommend(
        self,
        user_idx: np.ndarray,
        n: int,
        exclude: sp.csr_matrix | None = None,
        context: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, list[list[list[str]]]]:
        """Merged candidates: ids (users, n) int64 (-1 padded), positional scores float32 (see
        :func:`pad_merged`), and per user the list of source names behind each item."""
        per = self.recommend_per_source(user_idx, n, exclude, context)
        return pad_merged(merge_candidates(per, self.quotas, n), n)

    def recommend_for_items(
        self,
        item_ids_seen: Sequence[np.ndarray],
        n: int,
        exclude: sp.csr_matrix | None = None,
        context: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, list[list[list[str]]]]:
        """Merged candidates for new users from the items they clicked, using the sources that
        support fold-in (the others are left out of the merge)."""
        lists = list(item_ids_seen)
        per = {}
        for name in self.names:
            src = self.sources[name]
            if not src.supports_fold_in:
                continue
            if context is not None and _takes_context(src):
                per[name] = src.recommend_for_items(lists, n, exclude, context=context)
            else:
                per[name] = src.recommend_for_items(lists, n, exclude)
        if not per:
            raise NotImplementedError("none of the sources supports fold-in of new users")
        return pad_merged(merge_candidates(per, self.quotas, n), n)

    def save(self, directory: str | Path) -> Path:
        """Each source in ``directory/<name>/`` plus ``manifest.json`` (quotas, classes, order)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        entries = []
        for name in self.names:
            src = self.sources[name]
            src.save(d / name)
            entries.append({"name": name, "class": type(src).__name__, "path": name})
        write_json(
            d / MANIFEST,
            {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "quotas": self.quotas, "sources": entries},
        )
        logger.info("saved %d candidate sources to %s", len(entries), d)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> MultiSource:
        d = Path(directory)
        manifest = read_format_json(d / MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, "a saved MultiSource")
        sources = {}
        for e in manifest["sources"]:
            sub = d / e["path"]
            if sub.resolve().parent != d.resolve():
                raise ValueError(f"{d / MANIFEST}: source path {e['path']!r} must be a folder directly inside {d}")
            src = CandidateSource.load(sub)
            if type(src).__name__ != e["class"]:
                raise ValueError(f"{sub} holds a {type(src).__name__}, the manifest says {e['class']}")
            sources[e["name"]] = src
        return cls(sources, manifest.get("quotas", {}))


def _takes_context(src: CandidateSource) -> bool:
    return "context" in inspect.signature(src.recommend).parameters
