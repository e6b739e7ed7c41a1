"""Popularity candidates: global, and optionally per context (slot, device, hour, ...)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from .base import CandidateSource, as_user_items, lists_to_csr, mask_rows, pack_csr, unpack_csr

logger = logging.getLogger(__name__)

ContextArg = int | np.integer | Sequence[int] | np.ndarray | None


class PopularitySource(CandidateSource):
    """Most popular items first; items nobody interacted with are never proposed.

    Popularity is the number of users who interacted with the item (``weighted=False``) or
    the sum of their weights (``weighted=True``). With :meth:`fit_context`, ``recommend(...,
    context=code)`` ranks by the item's share in that context shrunk toward its global share
    with ``context_smoothing`` pseudo-interactions, so sparse contexts fall back to global
    popularity and an unknown code (or -1) gives the global ranking.
    """

    name = "popularity"
    supports_fold_in = True

    def __init__(self, weighted: bool = False, context_smoothing: float = 10.0, name: str | None = None) -> None:
        super().__init__(name)
        if context_smoothing < 0:
            raise ValueError("context_smoothing must be >= 0")
        self.weighted = bool(weighted)
        self.context_smoothing = float(context_smoothing)
        self.popularity: np.ndarray | None = None  # (n_items,) float32
        self.context_counts: sp.csr_matrix | None = None  # (n_contexts, n_items)

    def fit(self, user_items: sp.csr_matrix) -> PopularitySource:
        x = as_user_items(user_items)
        if self.weighted:
            pop = np.asarray(x.sum(axis=0)).ravel()
        else:
            pop = np.diff(x.tocsc().indptr)
        self.popularity = pop.astype(np.float32)
        self.n_users, self.n_items = x.shape
        self.context_counts = None
        logger.info("%s: popularity over %d items from %d users", self.name, self.n_items, self.n_users)
        return self

    def fit_context(
        self,
        ctx_codes: np.ndarray,
        item_idx: np.ndarray,
        weights: np.ndarray | None = None,
        n_contexts: int | None = None,
    ) -> PopularitySource:
        """Per-context popularity from one (context code, item, weight) per interaction.

        Codes are non-negative integers (a vocabulary index); ``n_contexts`` defaults to
        max code + 1. Call after :meth:`fit`. Weights default to 1 (a count).
        """
        self._check_fitted()
        ctx = np.asarray(ctx_codes).ravel()
        items = np.asarray(item_idx).ravel()
        if len(ctx) != len(items):
            raise ValueError(f"ctx_codes ({len(ctx)}) and item_idx ({len(items)}) must have one entry per interaction")
        w = np.ones(len(items), np.float32) if weights is None else np.asarray(weights, np.float32).ravel()
        if len(w) != len(items):
            raise ValueError(f"weights ({len(w)}) must have one entry per interaction ({len(items)})")
        if len(items) and (not np.issubdtype(ctx.dtype, np.integer) or not np.issubdtype(items.dtype, np.integer)):
            raise TypeError("ctx_codes and item_idx must be integer arrays")
        if len(items) and (ctx.min() < 0):
            raise ValueError(f"context codes must be >= 0, got {int(ctx.min())}")
        if len(items) and (items.min() < 0 or items.max() >= self.n_items):
            raise ValueError(f"item_idx must lie in 0..{self.n_items - 1}, got {int(items.min())}..{int(items.max())}")
        if len(w) and (not np.isfinite(w).all() or (w < 0).any()):
            raise ValueError("weights must be finite and >= 0")
        n_ctx = int(ctx.max()) + 1 if len(ctx) else 0
        if n_contexts is not None:
            if n_contexts < n_ctx:
                raise ValueError(f"n_contexts={n_contexts} but codes go up to {n_ctx - 1}")
            n_ctx = int(n_contexts)
        m = sp.csr_matrix((w, (ctx.astype(np.int64), items.astype(np.int64))), shape=(n_ctx, self.n_items), dtype=np.float32)
        m.sum_duplicates()
        m.eliminate_zeros()
        self.context_counts = m
        logger.info("%s: context popularity for %d contexts", self.name, n_ctx)
        return self

    # -- scoring ------------------------------------------------------------------------
    def _global_share(self) -> np.ndarray:
        total = float(self.popularity.sum())
        share = self.popularity / total if total > 0 else self.popularity.copy()
        return np.where(self.popularity > 0, share, -np.inf).astype(np.float32)

    def _context_rows(self, contexts: np.ndarray) -> np.ndarray:
        """One score row per code (codes without data -> the global row)."""
        glob = self._global_share()
        out = np.broadcast_to(glob, (len(contexts), self.n_items)).copy()
        cc = self.context_counts
        if cc is None:
            return out
        known = (contexts >= 0) & (contexts < cc.shape[0])
        if not known.any():
            return out
        total = float(self.popularity.sum())
        gshare = (self.popularity / total) if total > 0 else np.zeros_like(self.popularity)
        m = self.context_smoothing
        rows = np.flatnonzero(known)
        counts = cc[contexts[rows]].toarray().astype(np.float32)
        ctx_total = counts.sum(axis=1, keepdims=True)
        has_data = ctx_total[:, 0] > 0
        denom = ctx_total + m
        safe = np.where(denom > 0, denom, 1.0)
        score = (counts + m * gshare[None, :]) / safe
        avail = (counts > 0) | (self.popularity[None, :] > 0)
        score = np.where(avail, score, -np.inf).astype(np.float32)
        out[rows[has_data]] = score[has_data]
        return out

    def _scores_for(self, n_rows: int, context: ContextArg) -> np.ndarray:
        if context is None:
            return np.broadcast_to(self._global_share(), (n_rows, self.n_items)).copy()
        ctx = np.asarray(context)
        if ctx.ndim == 0:
            row = self._context_rows(ctx.reshape(1).astype(np.int64))
            return np.broadcast_to(row[0], (n_rows, self.n_items)).copy()
        if len(ctx) != n_rows:
            raise ValueError(f"context has {len(ctx)} codes for {n_rows} users")
        return self._context_rows(ctx.astype(np.int64))

    def _score_users(self, users: np.ndarray, history: sp.csr_matrix | None, context: ContextArg = None) -> np.ndarray:
        return self._scores_for(len(users), context)

    def recommend(
        self,
        user_idx: np.ndarray,
        n: int,
        exclude: sp.csr_matrix | None = None,
        context: ContextArg = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`CandidateSource.recommend`; ``context`` is one code for every user or one
        code per user (None = global popularity)."""
        users = self._check_users(user_idx)
        exclude = self._check_exclude(exclude, len(users))
        ctx = _per_row_context(context, len(users))
        return self._rank(
            len(users), n, exclude, lambda sl, ex: self._scores_for(sl.stop - sl.start, _slice_context(ctx, sl))
        )

    def fold_in(
        self,
        item_lists: Sequence[np.ndarray],
        weights: Sequence[np.ndarray] | None = None,
        context: ContextArg = None,
    ) -> np.ndarray:
        self._check_fitted()
        lists_to_csr(item_lists, self.n_items, weights)  # validates the lists
        return self._scores_for(len(item_lists), _per_row_context(context, len(item_lists)))

    def recommend_for_items(
        self,
        item_ids_seen: Sequence[np.ndarray],
        n: int,
        exclude: sp.csr_matrix | None = None,
        weights: Sequence[np.ndarray] | None = None,
        context: ContextArg = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        lists = list(item_ids_seen)
        ctx = _per_row_context(context, len(lists))
        self._check_fitted()
        exclude = self._check_exclude(exclude, len(lists))
        seen = lists_to_csr(lists, self.n_items)

        def block(sl: slice, ex: sp.csr_matrix | None) -> np.ndarray:
            s = self._scores_for(sl.stop - sl.start, _slice_context(ctx, sl))
            mask_rows(s, seen[sl])
            return s

        return self._rank(len(lists), n, exclude, block)

    # -- persistence ----------------------------------------------------------------------
    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays: dict[str, np.ndarray] = {"popularity": self.popularity}
        pack_csr("context_counts", self.context_counts, arrays)
        return {"weighted": self.weighted, "context_smoothing": self.context_smoothing}, arrays

    def _set_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.popularity = np.asarray(arrays["popularity"], dtype=np.float32)
        cc = unpack_csr("context_counts", arrays)
        self.context_counts = None if cc is None else cc.astype(np.float32)


def _per_row_context(context: ContextArg, n_rows: int) -> ContextArg:
    if context is None:
        return None
    ctx = np.asarray(context)
    if ctx.ndim == 0:
        return int(ctx)
    if ctx.ndim != 1 or len(ctx) != n_rows:
        raise ValueError(f"context must be one code or one code per user ({n_rows}), got shape {ctx.shape}")
    return ctx.astype(np.int64)


def _slice_context(ctx: ContextArg, sl: slice) -> ContextArg:
    if ctx is None or np.ndim(ctx) == 0:
        return ctx
    return ctx[sl]
