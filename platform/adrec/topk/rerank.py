"""Two-stage top-K recommendation: a union of candidate sources, then a learned re-ranker.

Stage 1 proposes, per user, the union of several sources' top lists (EASE, ALS, item-item
cosine, popularity by default). Stage 2 scores every candidate with a gradient-boosted model
(LightGBM lambdarank when LightGBM is installed, scikit-learn's pointwise
HistGradientBoostingClassifier otherwise) over per-candidate features:

- each source's score and rank for the user;
- item popularity overall (positives, interactions, positive rate) and RECENT popularity at
  the user's cutoff (interactions and positives in the last 1/7/30 days before it, also as a
  share of all activity in that window), time since the item's first and last interaction;
- the user's activity (interactions, positives, positive rate, span, activity in the last day);
- similarity of the candidate to the user's most recent items (item-item cosine with the last
  N positives), "what people interact with next" (a transition matrix over the interaction
  sequences, read from the user's last N interactions), and tag/genre affinity with the user's
  positives (any item categorical/multi-valued fields, e.g. MovieLens genres);
- optional ``extra_scores``: named callables (e.g. a CTR ranker's probability) added as features.

Training follows DESIGN.md's protocol: sources are fitted on the train split only and the
re-ranker learns to put the *valid* positives first among their candidates (optionally also on
an "inner" stage carved from train by the same tail rule); then the sources are refitted on
train + valid and the re-ranker is applied as is. Test rows are never read.

Every feature at a user's prediction time is computed from the known interactions (all labels)
of that stage and the user's cutoff = time of their last known interaction.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from adrec.candidates.base import CandidateSource, check_name, load_source, topk
from adrec.candidates.factory import make_source

from .ease import EASESource
from .protocol import Stage, binary_matrix, inner_stage, make_stage

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SOURCES", "TopKData", "TwoStageRecommender", "ExtraScore", "build_source", "item_tag_matrix"]

DAY = 86400

#: name -> {"kind": source kind, "n": how many of its top items join the union, "data":
#: "positives" (default) or "seen" (every known interaction), other keys: constructor kwargs}.
#: One thread each: on a shared 2-core machine OpenMP/BLAS spin-waits made two threads 3-5x slower.
DEFAULT_SOURCES: dict[str, dict[str, Any]] = {
    "ease": {"kind": "ease", "l2": 200.0, "num_threads": 1, "n": 100},
    "als": {"kind": "als", "factors": 32, "regularization": 1.0, "alpha": 1.0, "num_threads": 1, "n": 50},
    "itemitem": {"kind": "itemitem", "K": 100, "num_threads": 1, "n": 50},
    "popularity": {"kind": "popularity", "n": 30},
}

#: extra_scores callables: (user_idx, item_idx, known interactions frame) -> one score per pair.
ExtraScore = Callable[[np.ndarray, np.ndarray, pd.DataFrame], np.ndarray]

FORMAT = "adrec.topk.two_stage"
FORMAT_VERSION = 1


def build_source(spec: Mapping[str, Any], name: str) -> CandidateSource:
    """An unfitted source from a :data:`DEFAULT_SOURCES`-style spec."""
    kw = {k: v for k, v in spec.items() if k not in ("kind", "n", "data")}
    kind = spec["kind"]
    if kind == "ease":
        return EASESource(name=name, **kw)
    if kind in ("als", "bpr"):
        kw.setdefault("use_gpu", None)
    src = make_source(kind, **kw)
    src.name = check_name(name)
    return src


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

    @classmethod
    def from_features(cls, features: Any) -> TopKData:
        """From :class:`adrec.features.pipeline.Features` (the prepare stage's outputs)."""
        spec = features.spec
        return cls(features.interactions, int(spec.n_users), int(spec.n_items), int(spec.n_catalog),
                   item_tag_matrix(features.items, int(spec.n_items)))


# --------------------------------------------------------------------------- known-data index
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


# --------------------------------------------------------------------------- the recommender
class TwoStageRecommender:
    """Candidate union + learned re-ranker for top-K lists under DESIGN.md's protocol.

    - ``sources``: name -> spec (see :data:`DEFAULT_SOURCES`); each source's top ``n`` join the
      union, and every source's score and rank are features of every candidate.
    - ``train_stages``: where the re-ranker's examples come from: "valid" (sources fitted on
      train, labels = valid positives) and "inner" (the same one step earlier, carved from train
      by the split's tail rule). Both by default: on MovieLens-100k halving the examples cost
      about 0.01 NDCG@10 on the dev protocol.
    - ``last_n``: the "user's most recent items" windows (cosine with the last N positives,
      transitions from the last N interactions); ``windows_days``: recent-popularity windows
      ending at the user's cutoff; ``transition_span``: how many later interactions count as
      "next"; ``next_candidates``: also add the top N items by transition score to the union
      (0 = off; it raised candidate recall but not NDCG@10 on the dev protocol).
    - ``rank_depth``: source ranks beyond it are reported as ``rank_depth + 1``.
    - ``ranker``: "lightgbm", "sklearn" or "auto" (LightGBM when importable, else scikit-learn's
      HistGradientBoostingClassifier); ``ranker_params`` override :data:`LGBM_DEFAULTS` /
      :data:`SKLEARN_DEFAULTS` (e.g. ``{"objective": "lambdarank"}``).
    - ``extra_scores``: name -> :data:`ExtraScore`, extra features such as a CTR ranker's
      probability. The callable receives the stage's known interactions (the train split while
      the re-ranker learns, train + valid afterwards); a model behind it must not have seen the
      valid split's labels, or the re-ranker learns to trust a leaked feature. Not saved: pass
      them again to :meth:`load`.

    Serving: :meth:`save` writes a self-contained folder; :meth:`load` + :meth:`recommend` answer
    for users known at fit time (index ``0..n_users-1``).
    """

    def __init__(
        self,
        sources: Mapping[str, Mapping[str, Any]] | None = None,
        train_stages: Sequence[str] = ("valid", "inner"),
        last_n: Sequence[int] = (1, 5, 20),
        windows_days: Sequence[int] = (1, 7, 30),
        transition_span: int = 10,
        next_candidates: int = 0,
        rank_depth: int = 500,
        ranker: str = "auto",
        ranker_params: Mapping[str, Any] | None = None,
        extra_scores: Mapping[str, ExtraScore] | None = None,
        batch_users: int = 512,
        seed: int = 0,
    ) -> None:
        self.source_specs = {k: dict(v) for k, v in (sources or DEFAULT_SOURCES).items()}
        for name, spec in self.source_specs.items():
            if "kind" not in spec:
                raise ValueError(f"source {name!r} needs a 'kind'")
            spec.setdefault("n", 50)
            spec.setdefault("data", "positives")
            if spec["data"] not in ("positives", "seen"):
                raise ValueError(f"source {name!r}: data must be 'positives' or 'seen', got {spec['data']!r}")
        bad = [s for s in train_stages if s not in ("valid", "inner")]
        if bad or not train_stages:
            raise ValueError(f"train_stages must be a non-empty subset of ('valid', 'inner'), got {train_stages!r}")
        if ranker not in ("auto", "lightgbm", "sklearn"):
            raise ValueError(f"ranker must be 'auto', 'lightgbm' or 'sklearn', got {ranker!r}")
        self.train_stages = tuple(train_stages)
        self.last_n = tuple(int(n) for n in last_n)
        self.windows_days = tuple(int(w) for w in windows_days)
        self.transition_span = int(transition_span)
        self.next_candidates = int(next_candidates)
        self.rank_depth = int(rank_depth)
        self.ranker = _resolve_ranker(ranker)
        self.ranker_params = dict(ranker_params or {})
        self.extra_scores = dict(extra_scores or {})
        self.batch_users = int(batch_users)
        self.seed = int(seed)
        # fitted state
        self.model: Any = None
        self.feature_names: list[str] | None = None
        self.sources: dict[str, CandidateSource] | None = None
        self.index: KnownIndex | None = None
        self.known: pd.DataFrame | None = None
        self.item_tags: sp.csr_matrix | None = None
        self.n_users = self.n_items = self.n_catalog = None
        self.fit_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ fit
    def fit(self, data: Any) -> TwoStageRecommender:
        """Learn the re-ranker on the train-side stages, then refit the sources on train + valid.

        ``data``: :class:`TopKData` or :class:`adrec.features.pipeline.Features`.
        """
        data = data if isinstance(data, TopKData) else TopKData.from_features(data)
        self.n_users, self.n_items, self.n_catalog = data.n_users, data.n_items, data.n_catalog
        self.item_tags = data.item_tags
        t0 = time.perf_counter()
        frames, labels, groups = [], [], []
        for name in self.train_stages:
            stage = (make_stage(data.interactions, data.n_users, data.n_items, data.n_catalog, "valid")
                     if name == "valid" else inner_stage(data.interactions, data.n_users, data.n_items, data.n_catalog))
            sources, index = self._fit_state(stage.known)
            x, y, g = self._training_examples(stage, sources, index)
            frames.append(x), labels.append(y), groups.append(g)
            logger.info("two-stage: %s stage: %d users, %d candidates, %d positives among them",
                        name, len(g), len(y), int(y.sum()))
        x = pd.concat(frames, ignore_index=True)
        y = np.concatenate(labels)
        g = np.concatenate(groups)
        self.feature_names = list(x.columns)
        t1 = time.perf_counter()
        self.model = _train_ranker(self.ranker, x, y, g, self.ranker_params, self.seed)
        t2 = time.perf_counter()
        final = make_stage(data.interactions, data.n_users, data.n_items, data.n_catalog, "test")
        self.known = final.known
        self.sources, self.index = self._fit_state(final.known)
        self.fit_info = {"examples": int(len(y)), "positives": int(y.sum()), "groups": int(len(g)),
                         "features_s": round(t1 - t0, 3), "ranker_s": round(t2 - t1, 3),
                         "refit_s": round(time.perf_counter() - t2, 3), "ranker": self.ranker}
        logger.info("two-stage: fitted %s on %d examples (%s)", self.ranker, len(y), self.fit_info)
        return self

    def _fit_state(self, known: pd.DataFrame) -> tuple[dict[str, CandidateSource], KnownIndex]:
        index = KnownIndex(known["user_idx"].to_numpy(np.int64), known["item_idx"].to_numpy(np.int64),
                           known["ts"].to_numpy(np.int64), known["label"].to_numpy(np.int8), self.n_users,
                           self.n_items, self.item_tags, self.last_n, self.windows_days, self.transition_span)
        sources = {}
        for name, spec in self.source_specs.items():
            src = build_source(spec, name)
            src.fit(index.positives if spec["data"] == "positives" else index.seen)
            sources[name] = src
        return sources, index

    def _training_examples(self, stage: Stage, sources, index) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        users = stage.users
        truth_codes = np.concatenate([u * np.int64(self.n_items) + t for u, t in zip(users, stage.truth)])
        xs, ys, gs = [], [], []
        for start in range(0, len(users), self.batch_users):
            bu = users[start:start + self.batch_users]
            cu, ci, feats = self._candidate_features(bu, sources, index, stage.known)
            y = np.isin(cu * np.int64(self.n_items) + ci, truth_codes).astype(np.float32)
            xs.append(feats), ys.append(y)
            gs.append(np.bincount(np.searchsorted(bu, cu), minlength=len(bu)))
        g = np.concatenate(gs)
        x = pd.concat(xs, ignore_index=True)
        y = np.concatenate(ys)
        # users whose candidates hold no positive teach a ranker nothing: drop their rows
        has_pos = np.bincount(np.repeat(np.arange(len(g)), g), weights=y, minlength=len(g)) > 0
        keep_rows = np.repeat(has_pos, g)
        return x[keep_rows].reset_index(drop=True), y[keep_rows], g[has_pos]

    # ------------------------------------------------------------------ candidates + features
    def _candidates(self, users: np.ndarray, sources, index) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Union of the sources' top lists for ``users`` -> (cand users, cand items, per source
        score and rank at each candidate)."""
        seen = index.seen[users]
        n_cat = self.n_catalog
        blocks, ranks = {}, {}
        member = np.zeros((len(users), self.n_items), bool)
        for name, src in sources.items():
            s = np.array(src._score_users(users, seen), dtype=np.float32, copy=True)
            s[:, n_cat:] = -np.inf
            r_rows = np.repeat(np.arange(len(users)), np.diff(seen.indptr))
            s[r_rows, seen.indices] = -np.inf
            # rank among the user's returnable items (1 = best; ties -> lower item index),
            # capped at rank_depth + 1; the top n join the union
            order = np.argsort(-s, axis=1, kind="stable")
            depth = max(self.rank_depth, int(self.source_specs[name]["n"]))
            rank = np.empty(s.shape, np.float32)
            np.put_along_axis(rank, order, np.arange(1, s.shape[1] + 1, dtype=np.float32)[None, :], axis=1)
            rank[~np.isfinite(s) | (rank > depth)] = depth + 1
            n = int(self.source_specs[name]["n"])
            member |= rank <= n
            blocks[name], ranks[name] = s, rank
        if self.next_candidates > 0:  # "what people interact with next" after the user's last items
            n_last = max(self.last_n)
            s = np.asarray((index.last_any[n_last][users] @ index.transitions).todense(), dtype=np.float32)
            s[s <= 0] = -np.inf
            s[:, n_cat:] = -np.inf
            s[np.repeat(np.arange(len(users)), np.diff(seen.indptr)), seen.indices] = -np.inf
            ids, _ = topk(s, self.next_candidates)
            ok = ids >= 0
            member[np.repeat(np.arange(len(users))[:, None], ids.shape[1], axis=1)[ok], ids[ok]] = True
        # never fewer than the catalog allows: tiny catalogs take every unseen item
        allowed = np.ones((len(users), self.n_items), bool)
        allowed[:, n_cat:] = False
        allowed[np.repeat(np.arange(len(users)), np.diff(seen.indptr)), seen.indices] = False
        short = member.sum(axis=1) < min(50, n_cat)
        member[short] = allowed[short]
        member &= allowed
        ru, ci = np.nonzero(member)
        score = {n: b[ru, ci] for n, b in blocks.items()}
        rank = {n: r[ru, ci] for n, r in ranks.items()}
        return users[ru], ci.astype(np.int64), score, rank

    def _candidate_features(self, users: np.ndarray, sources, index: KnownIndex, known: pd.DataFrame,
                            frame: bool = True) -> tuple[np.ndarray, np.ndarray, Any]:
        """(candidate users, candidate items, features): a DataFrame, or with ``frame=False`` the
        name -> column dict (scoring skips pandas: a quarter of a one-user request's CPU)."""
        cu, ci, score, rank = self._candidates(users, sources, index)
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
        for w in self.windows_days:
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
        for n in self.last_n:
            f[f"ui.cos_last{n}"] = _pair_product(index.last_pos[n], index.cosine, cu, ci, users) / float(n)
            f[f"ui.next_last{n}"] = _pair_product(index.last_any[n], index.transitions, cu, ci, users)
        if index.item_tags is not None:
            prof = index.user_tags[cu]
            tags = index.item_tags[ci]
            f["ui.tag_aff"] = np.asarray(tags.multiply(prof).sum(axis=1)).ravel().astype(np.float32) / np.maximum(
                index.tag_count[ci], 1.0)
        for name, fn in self.extra_scores.items():
            f[f"extra.{name}"] = np.asarray(fn(cu, ci, known), dtype=np.float32).ravel()
        return cu, ci, (pd.DataFrame(f) if frame else f)

    # ------------------------------------------------------------------ recommend
    def _check_fitted(self) -> None:
        if self.model is None or self.sources is None:
            raise RuntimeError("TwoStageRecommender is not fitted; call fit() or load() first")

    def score_candidates(self, user_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(candidate users, candidate items, re-ranker scores), candidates of ``np.unique(user_idx)``
        grouped by user in ascending order (the re-ranker's view, before ranking)."""
        self._check_fitted()
        users = np.unique(np.asarray(user_idx, dtype=np.int64).reshape(-1))
        cu, ci, x = self._candidate_features(users, self.sources, self.index, self.known, frame=False)
        return cu, ci, self._score(x)

    def _score(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Re-ranker scores of feature columns (name -> values), in the trained feature order."""
        x = np.column_stack([np.asarray(columns[n], np.float64) for n in self.feature_names])
        return _predict(self.model, self.ranker, x)

    def rank_lists(self, user_idx: Any, n: int, exclude: sp.csr_matrix | None = None,
                   with_sources: bool = False) -> tuple[np.ndarray, np.ndarray, list[list[list[str]]] | None]:
        """Per user (in the order given, repeats allowed): the best ``n`` candidates by re-ranker
        score, ties to the lower item index.

        Never returns an item the user interacted with in the fitted data, nor one in ``exclude``
        (a (users, items) matrix indexed by user, e.g. a version's seen matrix that also holds later
        impressions). Returns ids (len(user_idx), n) int64 padded with -1, the re-ranker's scores
        float64 (NaN padding) and, with ``with_sources``, per user and item the sources whose top
        lists proposed it (``["catalog"]`` for an item added because the user's union was shorter than
        50 items).
        Vectorised: ``batch_users`` users share one feature frame and one ``predict`` call.
        """
        self._check_fitted()
        users = np.asarray(user_idx, dtype=np.int64).reshape(-1)
        if users.size and (users.min() < 0 or users.max() >= self.n_users):
            raise IndexError(f"user index outside 0..{self.n_users - 1}")
        n = int(n)
        out_ids = np.full((len(users), n), -1, np.int64)
        out_sc = np.full((len(users), n), np.nan, np.float64)
        out_src: list[list[list[str]]] | None = [[] for _ in users] if with_sources else None
        names = list(self.sources)
        uniq, inv = np.unique(users, return_inverse=True)
        for start in range(0, len(uniq), self.batch_users):
            bu = uniq[start:start + self.batch_users]
            cu, ci, x = self._candidate_features(bu, self.sources, self.index, self.known, frame=False)
            s = self._score(x)
            row = np.searchsorted(bu, cu)
            keep = np.ones(len(ci), bool)
            if exclude is not None:
                ex = exclude[bu]
                ex_codes = np.repeat(np.arange(len(bu), dtype=np.int64), np.diff(ex.indptr)) * self.n_items + ex.indices
                keep = ~np.isin(row * np.int64(self.n_items) + ci, ex_codes)
            order = np.flatnonzero(keep)
            order = order[np.lexsort((ci[order], -s[order], row[order]))]  # per user: score desc, item asc
            r_o = row[order]
            pos = np.arange(len(order)) - np.searchsorted(r_o, r_o)
            top = pos < n
            ids = np.full((len(bu), n), -1, np.int64)
            sc = np.full((len(bu), n), np.nan, np.float64)
            ids[r_o[top], pos[top]] = ci[order[top]]
            sc[r_o[top], pos[top]] = s[order[top]]
            sel = np.flatnonzero((inv >= start) & (inv < start + len(bu)))
            out_ids[sel] = ids[inv[sel] - start]
            out_sc[sel] = sc[inv[sel] - start]
            if out_src is not None:
                member = np.stack([np.asarray(x[f"{nm}.rank"])[order[top]] <= self.source_specs[nm]["n"]
                                   for nm in names], axis=1)
                per_row: list[list[list[str]]] = [[] for _ in bu]
                for r, m in zip(r_o[top], member):
                    per_row[r].append([nm for nm, hit in zip(names, m) if hit] or ["catalog"])
                for j in sel:
                    out_src[j] = per_row[inv[j] - start]
        return out_ids, out_sc, out_src

    def recommend(self, user_idx: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` items for known users, ranked by the re-ranker over their candidates.

        Never returns an item the user interacted with in train or valid; ties go to the lower item
        index. Returns ids (len(user_idx), k) int64 padded with -1 and scores float32 (NaN padding).
        """
        ids, sc, _ = self.rank_lists(user_idx, k)
        return ids, sc.astype(np.float32)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write the sources, the ranker and the known interactions into ``directory``."""
        self._check_fitted()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, src in self.sources.items():
            src.save(d / "sources" / name)
        if self.ranker == "lightgbm":
            booster = self.model.booster_ if hasattr(self.model, "booster_") else self.model
            booster.save_model(str(d / "ranker.txt"))
        else:  # scikit-learn: pickle (load only folders you wrote yourself)
            (d / "ranker.pkl").write_bytes(pickle.dumps(self.model))
        arrays = {c: self.known[c].to_numpy() for c in ("user_idx", "item_idx", "ts", "label")}
        if self.item_tags is not None:
            t = sp.csr_matrix(self.item_tags)
            arrays.update({"tags.data": t.data, "tags.indices": t.indices, "tags.indptr": t.indptr,
                           "tags.shape": np.asarray(t.shape)})
        np.savez(d / "known.npz", **arrays)
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "params": {"sources": self.source_specs, "train_stages": list(self.train_stages),
                       "last_n": list(self.last_n), "windows_days": list(self.windows_days),
                       "transition_span": self.transition_span, "next_candidates": self.next_candidates,
                       "rank_depth": self.rank_depth,
                       "ranker": self.ranker, "ranker_params": self.ranker_params,
                       "batch_users": self.batch_users, "seed": self.seed},
            "n_users": self.n_users, "n_items": self.n_items, "n_catalog": self.n_catalog,
            "feature_names": self.feature_names, "extra_scores": sorted(self.extra_scores),
            "fit_info": self.fit_info,
        }
        (d / "two_stage.json").write_text(json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, extra_scores: Mapping[str, ExtraScore] | None = None) -> TwoStageRecommender:
        d = Path(directory)
        meta = json.loads((d / "two_stage.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{d}: not a saved TwoStageRecommender")
        missing = set(meta.get("extra_scores", [])) - set(extra_scores or {})
        if missing:
            raise ValueError(f"{d} was trained with extra_scores {sorted(missing)}: pass them to load()")
        obj = cls(**meta["params"], extra_scores=extra_scores)
        obj.n_users, obj.n_items, obj.n_catalog = meta["n_users"], meta["n_items"], meta["n_catalog"]
        obj.feature_names = meta["feature_names"]
        obj.fit_info = meta.get("fit_info", {})
        obj.sources = {name: load_source(d / "sources" / name) for name in obj.source_specs}
        if obj.ranker == "lightgbm":
            import lightgbm

            obj.model = lightgbm.Booster(model_file=str(d / "ranker.txt"))
        else:
            obj.model = pickle.loads((d / "ranker.pkl").read_bytes())
        with np.load(d / "known.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        obj.known = pd.DataFrame({c: arrays[c] for c in ("user_idx", "item_idx", "ts", "label")})
        if "tags.data" in arrays:
            obj.item_tags = sp.csr_matrix((arrays["tags.data"], arrays["tags.indices"], arrays["tags.indptr"]),
                                          shape=tuple(int(x) for x in arrays["tags.shape"]))
        k = obj.known
        obj.index = KnownIndex(k["user_idx"].to_numpy(np.int64), k["item_idx"].to_numpy(np.int64),
                               k["ts"].to_numpy(np.int64), k["label"].to_numpy(np.int8), obj.n_users, obj.n_items,
                               obj.item_tags, obj.last_n, obj.windows_days, obj.transition_span)
        return obj


def _pair_product(left: sp.csr_matrix, right: sp.spmatrix, cu: np.ndarray, ci: np.ndarray, users: np.ndarray) -> np.ndarray:
    """(left @ right)[cu, ci] computed only for the batch's users."""
    prod = left[users] @ right
    prod = prod.toarray() if sp.issparse(prod) else np.asarray(prod)
    return prod[np.searchsorted(users, cu), ci].astype(np.float32)


def _resolve_ranker(ranker: str) -> str:
    if ranker != "auto":
        if ranker == "lightgbm":
            import lightgbm  # noqa: F401  (fail early with ImportError)
        return ranker
    try:
        import lightgbm  # noqa: F401
    except ImportError:
        return "sklearn"
    return "lightgbm"


#: Chosen on the dev protocol (re-ranker trained on the inner stage, scored on valid): small
#: trees and a slow rate; rank_xendcg, binary and lambdarank were within noise of each other,
#: rank_xendcg slightly ahead and ~2x faster than lambdarank. One thread: with OpenMP's spin
#: waits, n_jobs=2 on a busy 2-core machine was 10x slower than n_jobs=1.
LGBM_DEFAULTS: dict[str, Any] = {
    "objective": "rank_xendcg", "n_estimators": 300, "learning_rate": 0.03, "num_leaves": 15,
    "min_child_samples": 100, "subsample": 0.8, "subsample_freq": 1, "colsample_bytree": 0.8,
    "verbose": -1, "n_jobs": 1,
}
SKLEARN_DEFAULTS: dict[str, Any] = {"max_iter": 300, "learning_rate": 0.05, "max_leaf_nodes": 15,
                                    "min_samples_leaf": 100, "l2_regularization": 1.0}


def _train_ranker(kind: str, x: pd.DataFrame, y: np.ndarray, groups: np.ndarray, params: Mapping[str, Any],
                  seed: int) -> Any:
    if len(y) == 0 or y.sum() == 0:
        raise ValueError("the re-ranker has no positive training example: no valid positive reached a candidate list")
    if kind == "lightgbm":
        import lightgbm

        p = {**LGBM_DEFAULTS, **params, "random_state": seed}
        if p["objective"] == "binary":
            model = lightgbm.LGBMClassifier(**p)
            model.fit(x, y)
        else:
            model = lightgbm.LGBMRanker(**p)
            model.fit(x, y, group=groups)
        return model
    from sklearn.ensemble import HistGradientBoostingClassifier

    p = {**SKLEARN_DEFAULTS, **params, "random_state": seed}
    model = HistGradientBoostingClassifier(**p)
    with threadpool_limits(1, "openmp"):  # see LGBM_DEFAULTS: one thread is faster on a shared box
        model.fit(x, y)
    return model


_CONTROLLER: list[Any] = []


def _one_openmp_thread():
    """A context with OpenMP limited to one thread. The controller is built once: scanning the loaded
    libraries (what ``threadpool_limits`` does on every call) cost 3 ms of CPU per call here, the
    cached controller 0.02 ms (measured with sklearn, lightgbm and torch loaded)."""
    if not _CONTROLLER:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=1, user_api="openmp")


def _predict(model: Any, kind: str, x: pd.DataFrame | np.ndarray) -> np.ndarray:
    """Scores of feature rows: a DataFrame, or a float64 matrix in the trained feature order."""
    if kind == "lightgbm":  # the raw score (log-odds for binary): monotone in what was learned
        booster = model.booster_ if hasattr(model, "booster_") else model
        return np.asarray(booster.predict(x, raw_score=True, num_threads=1), dtype=np.float64)
    with _one_openmp_thread(), warnings.catch_warnings():
        # fitted on a DataFrame, scored on the same columns as a matrix: not a mistake to warn about
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        return np.asarray(model.decision_function(x), dtype=np.float64)
