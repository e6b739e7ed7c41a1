"""EASE: the closed-form linear item-item model of Steck (2019), "Embarrassingly Shallow
Autoencoders for Sparse Data", behind the :class:`~adrec.candidates.base.CandidateSource` contract.

With X the (users, items) training matrix and G = X^T X + l2 * I, the weights are

    P = G^{-1},   B = -P / diag(P)  (column-wise),   diag(B) = 0,

the minimiser of ||X - X B||_F^2 + l2 ||B||_F^2 subject to diag(B) = 0. A user's scores are
their training row times B. The item-item matrix is dense (n_items^2 float32): this is a model
for catalogs up to a few tens of thousands of items.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from adrec.config import CANDIDATE_DEFAULTS

from .base import CandidateSource, as_user_items, lists_to_csr, pack_csr, unpack_csr

logger = logging.getLogger(__name__)

__all__ = ["EASESource", "ease_weights"]


def ease_weights(user_items: sp.spmatrix | np.ndarray, l2: float, num_threads: int = 0) -> np.ndarray:
    """The EASE weight matrix B (n_items, n_items) float32 of ``user_items`` for ``l2``.

    Items nobody interacted with get a zero column (they are never proposed by anything) and a
    zero row. ``num_threads``: BLAS threads for the inversion (0 = the BLAS default).
    """
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    x = sp.csr_matrix(user_items, dtype=np.float64)
    g = (x.T @ x).toarray()
    g[np.diag_indices_from(g)] += float(l2)
    # G is symmetric positive definite (l2 > 0): invert it through its Cholesky factor (LAPACK
    # potrf + potri), 2-3x faster than a general inverse. Measured on ML-100k (1682 items) on a
    # busy 2-core machine: 0.4 s with one BLAS thread, 2 s with two (spin-waiting threads).
    with threadpool_limits(num_threads if num_threads > 0 else None, "blas"):
        c, info = scipy.linalg.lapack.dpotrf(g, lower=False, overwrite_a=True)
        if info != 0:
            raise np.linalg.LinAlgError(f"EASE: X^T X + l2 I is not positive definite (potrf info={info})")
        p, info = scipy.linalg.lapack.dpotri(c, lower=False, overwrite_c=True)
        if info != 0:
            raise np.linalg.LinAlgError(f"EASE: inversion failed (potri info={info})")
    p = np.triu(p) + np.triu(p, 1).T  # potri fills the upper triangle only
    b = p / (-np.diag(p))[None, :]
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float32)


class EASESource(CandidateSource):
    """Closed-form linear item-item model (EASE^R) as a candidate source.

    ``l2``: the ridge penalty (Steck reports 200-1000 on MovieLens-scale data; pick it on
    validation). Scores are every item's linear score, so every non-excluded item is
    returnable. New users fold in as their clicked-items row times B. ``num_threads``: BLAS
    threads while fitting (0 = the BLAS default).
    """

    name = "ease"
    supports_fold_in = True

    def __init__(self, l2: float = CANDIDATE_DEFAULTS.ease_l2, num_threads: int = 0, name: str | None = None) -> None:
        super().__init__(name)
        if not float(l2) > 0:
            raise ValueError(f"l2 must be > 0, got {l2}")
        self.l2 = float(l2)
        self.num_threads = int(num_threads)
        self.weights: np.ndarray | None = None  # B, (n_items, n_items) float32
        self.user_items: sp.csr_matrix | None = None  # training rows

    def fit(self, user_items: sp.csr_matrix) -> EASESource:
        x = as_user_items(user_items)
        t0 = time.perf_counter()
        self.weights = ease_weights(x, self.l2, self.num_threads)
        self.user_items = x
        self.n_users, self.n_items = x.shape
        logger.info(
            "%s: EASE (l2=%g) over %d users x %d items (%d interactions) in %.2fs",
            self.name, self.l2, self.n_users, self.n_items, x.nnz, time.perf_counter() - t0,
        )
        return self

    def _scores_from_rows(self, rows: sp.csr_matrix) -> np.ndarray:
        return np.asarray(rows @ self.weights, dtype=np.float32)

    def _score_users(self, users: np.ndarray, history: sp.csr_matrix | None) -> np.ndarray:
        return self._scores_from_rows(self.user_items[users])

    def fold_in(self, item_lists: Sequence[np.ndarray], weights: Sequence[np.ndarray] | None = None) -> np.ndarray:
        self._check_fitted()
        return self._scores_from_rows(lists_to_csr(item_lists, self.n_items, weights))

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays: dict[str, np.ndarray] = {"weights": self.weights}
        pack_csr("user_items", self.user_items, arrays)
        return {"l2": self.l2, "num_threads": self.num_threads}, arrays

    def _set_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.weights = np.ascontiguousarray(arrays["weights"], dtype=np.float32)
        self.user_items = unpack_csr("user_items", arrays).astype(np.float32)
