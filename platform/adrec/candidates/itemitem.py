"""Item-item nearest-neighbour candidates (implicit's CosineRecommender / BM25Recommender)."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from adrec.config import CANDIDATE_DEFAULTS

from .base import CandidateSource, as_user_items, lists_to_csr, pack_csr, sparse_scores, union_history, unpack_csr

logger = logging.getLogger(__name__)

KINDS = ("cosine", "bm25")


class ItemItemSource(CandidateSource):
    """Score(u, j) = sum over the user's items i of weight(u, i) * sim(i, j), with sim kept to
    each item's ``K`` nearest neighbours. Only items reached through a neighbour are proposed.

    The user's items are their training row plus (weight 1) any item of the ``exclude`` row
    not in it, so up-to-date seen items count as history too. New users fold in the same way
    from the items they clicked.
    """

    name = "itemitem"
    supports_fold_in = True

    def __init__(
        self,
        kind: str = "cosine",
        K: int = CANDIDATE_DEFAULTS.itemitem_k,
        K1: float = 1.2,
        B: float = 0.75,
        num_threads: int = 0,
        show_progress: bool = False,
        name: str | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        super().__init__(name if name is not None else ("itemitem" if kind == "cosine" else kind))
        if K < 1:
            raise ValueError("K must be >= 1")
        self.kind = kind
        self.K = int(K)
        self.K1 = float(K1)
        self.B = float(B)
        self.num_threads = int(num_threads)
        self.show_progress = bool(show_progress)
        self.similarity: sp.csr_matrix | None = None  # (n_items, n_items)
        self.user_items: sp.csr_matrix | None = None  # training rows

    def fit(self, user_items: sp.csr_matrix) -> ItemItemSource:
        from implicit.nearest_neighbours import BM25Recommender, CosineRecommender
        from implicit.utils import ParameterWarning

        x = as_user_items(user_items)
        t0 = time.perf_counter()
        with threadpool_limits(1, "blas"), warnings.catch_warnings():
            # Cosine/BM25 hand their own re-weighted COO matrix to implicit's kNN, which then
            # warns that it expected CSR: implicit's internals, nothing a caller can act on.
            warnings.filterwarnings("ignore", category=ParameterWarning)
            if self.kind == "cosine":
                model = CosineRecommender(K=self.K, num_threads=self.num_threads)
            else:
                model = BM25Recommender(K=self.K, K1=self.K1, B=self.B, num_threads=self.num_threads)
            model.fit(x, show_progress=self.show_progress)
        sim = sp.csr_matrix(model.similarity, dtype=np.float32)
        sim.eliminate_zeros()
        sim.sort_indices()
        self.similarity = sim
        self.user_items = x
        self.n_users, self.n_items = x.shape
        logger.info(
            "%s: %s item-item similarity (K=%d) over %d items, %d pairs, in %.2fs",
            self.name, self.kind, self.K, self.n_items, sim.nnz, time.perf_counter() - t0,
        )
        return self

    def _scores_from_rows(self, rows: sp.csr_matrix) -> np.ndarray:
        return sparse_scores(rows @ self.similarity)

    def _score_users(self, users: np.ndarray, history: sp.csr_matrix | None) -> np.ndarray:
        return self._scores_from_rows(union_history(self.user_items[users], history))

    def fold_in(self, item_lists: Sequence[np.ndarray], weights: Sequence[np.ndarray] | None = None) -> np.ndarray:
        self._check_fitted()
        return self._scores_from_rows(lists_to_csr(item_lists, self.n_items, weights))

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays: dict[str, np.ndarray] = {}
        pack_csr("similarity", self.similarity, arrays)
        pack_csr("user_items", self.user_items, arrays)
        params = {"kind": self.kind, "K": self.K, "K1": self.K1, "B": self.B, "num_threads": self.num_threads}
        return params, arrays

    def _set_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.similarity = unpack_csr("similarity", arrays).astype(np.float32)
        self.user_items = unpack_csr("user_items", arrays).astype(np.float32)
