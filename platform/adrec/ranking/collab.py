"""The collaborative signal as ranker input (issue 14): candidate sources' scores for a (user, item) row.

A row's features are the scores that sources fitted on earlier rows give its item when the user is
folded in from the row's ``hist`` (their positives known at that row's time, the prepare stage's
leakage-free history): EASE (the history row times EASE's item-item weights), ALS (the dot product of
the least-squares user factor of the history with the item factor) and item-item cosine (the sum of
the item's similarities to the history), each squashed ``sign(x) log(1 + |x|)`` (no statistics of other
rows: a row's features depend on nothing but its history, its item and the fitted sources), plus an
indicator that the row had a fitted source and a history at all.

Leakage-free by construction, the way the two-stage recommender fits its sources (:mod:`adrec.topk`):

- test rows, serving and the online learner: sources fitted on train + valid (the ones a ranker saves);
- valid rows: sources fitted on train;
- train rows: the per-user tail rule (docs/design.md) applied again inside train cuts each user's train
  rows into an early part, a middle tail and a last tail; the last tail is scored by sources fitted on
  the early part and the middle tail, the middle tail by sources fitted on the early part; the early part
  has no scores (the indicator is 0).

So no row's features ever see its own label or a later row of its user. :class:`CollabScorer` is the one
implementation: training (:func:`training_features`), the fitted ranker's :meth:`FusionRanker.batch`
(serving, evaluation, the online learner) all call :meth:`CollabScorer.features`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from adrec.candidates.base import CandidateSource, binary_matrix
from adrec.candidates.factory import make_source
from adrec.features.split import TEST, TRAIN, VALID, temporal_split

log = logging.getLogger(__name__)

KINDS = ("ease", "als", "itemitem")
COLLAB_DIR = "collab"  # in a saved ranker's folder
_JSON = "collab.json"
_CHUNK = 4096  # fold-in rows at once: bounds the (rows, n_items) score block


def feature_names(kinds) -> list[str]:
    """The dense input columns of the ranker for these sources (the last one is the indicator)."""
    return [f"collab.{k}" for k in kinds] + ["collab.known"]


def _source(kind: str, seed: int) -> CandidateSource:
    if kind == "als":  # the CPU path, one BLAS thread: a few seconds on MovieLens-100k
        return make_source("als", factors=32, iterations=10, regularization=0.05, seed=seed, use_gpu=False)
    return make_source(kind)


def _squash(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


class CollabScorer:
    """Sources fitted on one set of known rows; :meth:`features` scores (history, item) rows with them."""

    def __init__(self, sources: dict[str, CandidateSource]):
        self.sources = sources
        self.kinds = list(sources)

    @classmethod
    def fit(cls, known: pd.DataFrame, n_users: int, n_items: int, kinds, seed: int = 0) -> "CollabScorer":
        """Sources fitted on the positives (label 1) of ``known``: the rows before the ones they will score."""
        pos = known[known["label"] == 1]
        m = binary_matrix(pos, n_users, n_items)
        return cls({k: _source(k, seed).fit(m) for k in kinds})

    def features(self, hist, items: np.ndarray) -> np.ndarray:
        """(N, len(kinds) + 1) float32: each source's squashed score of the row's item for its history, and
        the indicator of a non-empty history (0 rows have all-zero scores)."""
        items = np.asarray(items, dtype=np.int64)
        n = len(items)
        out = np.zeros((n, len(self.kinds) + 1), np.float32)
        if n == 0:
            return out
        lists = [np.asarray(h if h is not None else (), dtype=np.int64).reshape(-1) for h in hist]
        # Rows of one user between two positives share a history: fold each distinct one in once.
        uniq: dict[bytes, int] = {}
        u_lists: list[np.ndarray] = []
        row_of = np.empty(n, np.int64)
        for r, h in enumerate(lists):
            key = h.tobytes()
            if key not in uniq:
                uniq[key] = len(u_lists)
                u_lists.append(h)
            row_of[r] = uniq[key]
        has = np.fromiter((len(h) > 0 for h in u_lists), bool, len(u_lists))
        n_items = next(iter(self.sources.values())).n_items
        ok_item = (items >= 0) & (items < n_items)
        safe_item = np.where(ok_item, items, 0)
        for j, kind in enumerate(self.kinds):
            src = self.sources[kind]
            col = np.zeros(n, np.float32)
            for start in range(0, len(u_lists), _CHUNK):
                sl = slice(start, start + _CHUNK)
                scores = src.fold_in(u_lists[sl])  # (chunk, n_items)
                sel = (row_of >= start) & (row_of < start + _CHUNK)
                col[sel] = scores[row_of[sel] - start, safe_item[sel]]
            col = np.where(np.isfinite(col) & ok_item & has[row_of], col, 0.0)
            out[:, j] = _squash(col)
        out[:, -1] = (has[row_of] & ok_item).astype(np.float32)
        return out

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for kind, src in self.sources.items():
            src.save(folder / kind)
        (folder / _JSON).write_text(json.dumps({"kinds": self.kinds}))

    @classmethod
    def load(cls, folder: Path) -> "CollabScorer":
        folder = Path(folder)
        meta = json.loads((folder / _JSON).read_text())
        return cls({k: CandidateSource.load(folder / k) for k in meta["kinds"]})


def training_features(interactions: pd.DataFrame, n_users: int, n_items: int, kinds,
                      seed: int = 0) -> tuple[dict[str, np.ndarray], CollabScorer]:
    """Leakage-free features of the train and valid rows (``{"train": (N, F), "valid": (M, F)}``, rows in
    the frame's order) and the scorer fitted on train + valid that the ranker keeps for everything later."""
    kinds = list(kinds)
    train = interactions[interactions["split"] == TRAIN]
    valid = interactions[interactions["split"] == VALID]
    inner = temporal_split(train["user_idx"].to_numpy(), train["ts"].to_numpy(), train["item_idx"].to_numpy())
    early, middle, last = (inner == TRAIN), (inner == VALID), (inner == TEST)

    def score(fit_rows: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
        return CollabScorer.fit(fit_rows, n_users, n_items, kinds, seed).features(rows["hist"].to_numpy(),
                                                                                  rows["item_idx"].to_numpy())

    f_train = np.zeros((len(train), len(kinds) + 1), np.float32)  # the early part: no scores
    if middle.any():
        f_train[middle] = score(train[early], train[middle])
    if last.any():
        f_train[last] = score(train[early | middle], train[last])
    f_valid = score(train, valid)
    final = CollabScorer.fit(pd.concat([train, valid]), n_users, n_items, kinds, seed)
    log.info("collaborative features %s: %d of %d train rows and %d of %d valid rows scored", kinds,
             int((f_train[:, -1] > 0).sum()), len(train), int((f_valid[:, -1] > 0).sum()), len(valid))
    return {TRAIN: f_train, VALID: f_valid}, final
