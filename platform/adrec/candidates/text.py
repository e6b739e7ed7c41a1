"""Text-similarity candidates: the cold-start path.

Items with no interactions at all still have text, hence an embedding; this source scores
every item with an embedding by its cosine to the mean embedding of the user's seen items,
so brand-new ads can be proposed from day one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from .base import CandidateSource, as_user_items, lists_to_csr, pack_csr, union_history, unpack_csr

logger = logging.getLogger(__name__)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero). float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


class TextNeighbourSource(CandidateSource):
    """Cosine between each item's text embedding and the user's profile (the mean embedding
    of the items they have seen: training row plus any item of ``exclude``).

    ``item_embeddings``: (n_items, d) float32, one row per item index; it may have more rows
    than the training matrix has columns (catalog items nobody has interacted with yet).
    Rows are re-normalised; an all-zero row means "no text" and is never proposed. A user with
    no seen item gets no candidates from this source.
    """

    name = "text"
    supports_fold_in = True

    def __init__(self, item_embeddings: np.ndarray, name: str | None = None) -> None:
        super().__init__(name)
        emb = np.asarray(item_embeddings)
        if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
            raise ValueError(f"item_embeddings must be a non-empty (n_items, d) array, got shape {emb.shape}")
        if not np.isfinite(emb).all():
            raise ValueError("item_embeddings holds non-finite values")
        self.item_embeddings = l2_normalise(emb)
        self._has_text = np.linalg.norm(self.item_embeddings, axis=1) > 0
        self.user_items: sp.csr_matrix | None = None

    def fit(self, user_items: sp.csr_matrix) -> TextNeighbourSource:
        x = as_user_items(user_items)
        n_emb = self.item_embeddings.shape[0]
        if x.shape[1] > n_emb:
            raise ValueError(f"user_items has {x.shape[1]} item columns but item_embeddings only {n_emb} rows")
        x = x.copy()
        x.resize((x.shape[0], n_emb))
        self.user_items = x
        self.n_users, self.n_items = x.shape[0], n_emb
        logger.info("%s: %d items with text, %d users", self.name, int(self._has_text.sum()), self.n_users)
        return self

    def _scores_from_rows(self, rows: sp.csr_matrix) -> np.ndarray:
        seen = sp.csr_matrix(rows, dtype=np.float32, copy=True)
        seen.data[:] = 1.0  # a plain mean over the seen items
        counts = np.diff(seen.indptr)
        profile = np.asarray(seen @ self.item_embeddings, dtype=np.float32)
        profile = l2_normalise(profile)  # dividing by the count first would not change the cosine
        scores = profile @ self.item_embeddings.T
        scores[:, ~self._has_text] = -np.inf
        scores[(counts == 0) | (np.linalg.norm(profile, axis=1) == 0)] = -np.inf
        return scores

    def _score_users(self, users: np.ndarray, history: sp.csr_matrix | None) -> np.ndarray:
        return self._scores_from_rows(union_history(self.user_items[users], history))

    def fold_in(self, item_lists: Sequence[np.ndarray], weights: Sequence[np.ndarray] | None = None) -> np.ndarray:
        self._check_fitted()
        return self._scores_from_rows(lists_to_csr(item_lists, self.n_items, weights))

    @classmethod
    def _from_params(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> TextNeighbourSource:
        return cls(arrays["item_embeddings"], **params)

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays: dict[str, np.ndarray] = {"item_embeddings": self.item_embeddings}
        pack_csr("user_items", self.user_items, arrays)
        return {}, arrays

    def _set_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.user_items = unpack_csr("user_items", arrays).astype(np.float32)
