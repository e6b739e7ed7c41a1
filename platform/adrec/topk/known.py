"""The index of one stage's known interactions that the two-stage recommender's features read.

Built once per stage (the train split while the re-ranker learns, train + valid afterwards) from
every known interaction whatever its label: the seen and positive matrices, per-user and per-item
counts, sorted (item, time) keys for counts in time windows, the user's most recent items, item-item
cosine and the "what comes next" transition matrix, and the users' tag profiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from adrec.candidates.base import binary_matrix

__all__ = ["KnownIndex"]


class KnownIndex:
    """Everything the features read, built once from one stage's known interactions."""

    def __init__(self, users: np.ndarray, items: np.ndarray, ts: np.ndarray, labels: np.ndarray, n_users: int,
                 n_items: int, item_tags: sp.csr_matrix | None, last_n: Sequence[int], windows: Sequence[int],
                 transition_span: int) -> None:
        order = np.lexsort((items, ts, users))
        self.u = np.asarray(users, np.int64)[order]
        self.i = np.asarray(items, np.int64)[order]
        self.t = np.asarray(ts, np.int64)[order]
        self.y = np.asarray(labels, np.int8)[order]
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.last_n = tuple(int(n) for n in last_n)
        self.windows = tuple(int(w) for w in windows)
        frame = pd.DataFrame({"user_idx": self.u, "item_idx": self.i})
        self.seen = binary_matrix(frame, n_users, n_items)
        self.positives = binary_matrix(frame[self.y == 1], n_users, n_items)
        # per user
        self.user_n = np.bincount(self.u, minlength=n_users).astype(np.float32)
        self.user_pos = np.bincount(self.u, weights=self.y, minlength=n_users).astype(np.float32)
        self.cutoff = np.full(n_users, -1, np.int64)
        self.user_first = np.full(n_users, -1, np.int64)
        if len(self.u):
            starts = np.r_[0, np.flatnonzero(np.diff(self.u)) + 1]
            ends = np.r_[starts[1:], len(self.u)]
            self.cutoff[self.u[starts]] = self.t[ends - 1]
            self.user_first[self.u[starts]] = self.t[starts]
        # per item: sorted (item, time) keys for window counts
        self.t0 = int(self.t.min()) if len(self.t) else 0
        self.span = int(self.t.max() - self.t0 + 2) if len(self.t) else 2
        korder = np.lexsort((self.t, self.i))
        self.keys_any = self.i[korder] * self.span + (self.t[korder] - self.t0)
        pos = self.y[korder] == 1
        self.keys_pos = self.keys_any[pos]
        self.item_n = np.bincount(self.i, minlength=n_items).astype(np.float32)
        self.item_pos = np.bincount(self.i, weights=self.y, minlength=n_items).astype(np.float32)
        # all activity over time, for window shares
        self.all_t = np.sort(self.t)
        # recency matrices: the user's last N positives / last N interactions
        self.last_pos = {n: self._last_rows(self.y == 1, n) for n in self.last_n}
        self.last_any = {n: self._last_rows(np.ones(len(self.u), bool), n) for n in self.last_n}
        self.cosine = _cosine(self.positives)
        self.transitions = _transitions(self.u, self.i, n_items, transition_span)
        # tag affinity: the user's positive tag profile (L1-normalised) x item tags
        self.item_tags = item_tags if item_tags is not None and item_tags.shape[1] else None
        if self.item_tags is not None:
            prof = np.asarray((self.positives @ self.item_tags).todense(), np.float32)
            self.user_tags = prof / np.maximum(prof.sum(axis=1, keepdims=True), 1.0)
            self.tag_count = np.asarray(self.item_tags.sum(axis=1)).ravel().astype(np.float32)

    @classmethod
    def from_frame(cls, known: pd.DataFrame, n_users: int, n_items: int, item_tags: sp.csr_matrix | None,
                   last_n: Sequence[int], windows: Sequence[int], transition_span: int) -> KnownIndex:
        """From a frame of known interactions (``user_idx``, ``item_idx``, ``ts``, ``label``)."""
        return cls(known["user_idx"].to_numpy(np.int64), known["item_idx"].to_numpy(np.int64),
                   known["ts"].to_numpy(np.int64), known["label"].to_numpy(np.int8), n_users, n_items, item_tags,
                   last_n, windows, transition_span)

    def _last_rows(self, mask: np.ndarray, n: int) -> sp.csr_matrix:
        u, i = self.u[mask], self.i[mask]
        if len(u) == 0:
            return sp.csr_matrix((self.n_users, self.n_items), dtype=np.float32)
        # position from the end within each user's (already time-sorted) rows
        starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
        counts = np.diff(np.r_[starts, len(u)])
        from_end = np.repeat(starts + counts, counts) - np.arange(len(u))  # 1 = the last one
        keep = from_end <= n
        m = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (u[keep], i[keep])),
                          shape=(self.n_users, self.n_items))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    # -- window helpers ---------------------------------------------------------------
    def _rel(self, t: np.ndarray) -> np.ndarray:
        return np.clip(t - self.t0, -1, self.span - 1)

    def item_count_between(self, keys: np.ndarray, items: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Per pair: events of ``items`` with lo < t <= hi."""
        base = items * self.span
        a = np.searchsorted(keys, base + self._rel(lo), side="right")
        b = np.searchsorted(keys, base + self._rel(hi), side="right")
        return (b - a).astype(np.float32)

    def item_last_before(self, items: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Per pair: time of the item's last event at or before t (NaN when none)."""
        base = items * self.span
        idx = np.searchsorted(self.keys_any, base + self._rel(t), side="right") - 1
        ok = idx >= 0
        k = self.keys_any[np.maximum(idx, 0)]
        ok &= (k // self.span) == items
        return np.where(ok, (k % self.span) + self.t0, np.nan)

    def item_first(self, items: np.ndarray) -> np.ndarray:
        base = items * self.span
        idx = np.searchsorted(self.keys_any, base, side="left")
        ok = idx < len(self.keys_any)
        k = self.keys_any[np.minimum(idx, max(len(self.keys_any) - 1, 0))] if len(self.keys_any) else np.zeros(len(items), np.int64)
        ok &= (k // self.span) == items
        return np.where(ok, (k % self.span) + self.t0, np.nan)


def _cosine(x: sp.csr_matrix) -> sp.csr_matrix:
    """Item-item cosine of the columns of x (diagonal zeroed)."""
    xc = sp.csc_matrix(x, dtype=np.float32)
    norms = np.sqrt(np.asarray(xc.multiply(xc).sum(axis=0)).ravel())
    inv = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
    xn = sp.csr_matrix(xc @ sp.diags(inv))
    sim = (xn.T @ xn).tocsr()
    sim.setdiag(0.0)
    sim.eliminate_zeros()
    return sim.astype(np.float32)


def _transitions(u: np.ndarray, i: np.ndarray, n_items: int, span: int) -> sp.csr_matrix:
    """P(j among the next ``span`` interactions | i), from time-sorted per-user sequences,
    with each later position weighted 1/distance; rows normalised by the item's count."""
    rows, cols, vals = [], [], []
    for d in range(1, span + 1):
        same = u[d:] == u[:-d] if len(u) > d else np.zeros(0, bool)
        rows.append(i[:-d][same])
        cols.append(i[d:][same])
        vals.append(np.full(int(same.sum()), 1.0 / d, np.float32))
    if not rows or sum(len(r) for r in rows) == 0:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    m = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_items, n_items))
    m.sum_duplicates()
    cnt = np.bincount(i, minlength=n_items).astype(np.float32)
    m = sp.diags(1.0 / np.maximum(cnt, 1.0)) @ m
    m.setdiag(0.0)
    m.eliminate_zeros()
    return sp.csr_matrix(m, dtype=np.float32)
