"""Matrix-factorisation candidates from implicit: ALS (and the shared factor-model base).

The model is fitted with implicit on the CPU or, when ``use_gpu`` resolves to True, on
the GPU; either way the factors are kept as CPU numpy arrays afterwards, so a saved model
loads and serves on a machine without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from adrec.config import CANDIDATE_DEFAULTS

from .base import CandidateSource, as_user_items, lists_to_csr, resolve_use_gpu

logger = logging.getLogger(__name__)


def to_numpy(factors: Any) -> np.ndarray:
    """implicit GPU matrices -> numpy (``.to_numpy()``); numpy stays numpy. float32, C order."""
    if hasattr(factors, "to_numpy"):
        factors = factors.to_numpy()
    return np.ascontiguousarray(np.asarray(factors), dtype=np.float32)


class _FactorSource(CandidateSource):
    """Scores = user_factors @ item_factors.T, factors held as numpy float32.

    Holds the settings every implicit factor model shares; a subclass adds its own and builds the
    implicit model from them (:meth:`_make_model`)."""

    def __init__(self, factors: int, iterations: int, regularization: float, seed: int | None,
                 use_gpu: bool | None, num_threads: int, show_progress: bool, name: str | None) -> None:
        super().__init__(name)
        if factors < 1 or iterations < 1:
            raise ValueError("factors and iterations must be >= 1")
        self.factors = int(factors)
        self.iterations = int(iterations)
        self.regularization = float(regularization)
        self.seed = seed
        self.use_gpu = use_gpu
        self.num_threads = int(num_threads)
        self.show_progress = bool(show_progress)
        self.user_factors: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None
        self.backend: str | None = None  # "cpu" or "gpu": where the last fit ran

    def _score_users(self, users: np.ndarray, history: sp.csr_matrix | None) -> np.ndarray:
        return self.user_factors[users] @ self.item_factors.T

    def _make_model(self, use_gpu: bool) -> Any:  # pragma: no cover - abstract in spirit
        raise NotImplementedError

    def _fit_factors(self, user_items: sp.csr_matrix, use_gpu: bool, show_progress: bool) -> None:
        x = as_user_items(user_items)
        t0 = time.perf_counter()
        # implicit runs its own thread pool; BLAS threads on top of it slow fitting down badly.
        with threadpool_limits(1, "blas"):
            model = self._make_model(use_gpu)
            model.fit(x, show_progress=show_progress)
        self.user_factors = to_numpy(model.user_factors)
        self.item_factors = to_numpy(model.item_factors)
        del model  # frees GPU memory when fitted there
        self.backend = "gpu" if use_gpu else "cpu"
        self.n_users, self.n_items = x.shape
        logger.info(
            "%s: fitted %s on %d users x %d items (%d interactions) on %s in %.2fs",
            self.name, type(self).__name__, self.n_users, self.n_items, x.nnz, self.backend, time.perf_counter() - t0,
        )

    def _factor_arrays(self) -> dict[str, np.ndarray]:
        return {"user_factors": self.user_factors, "item_factors": self.item_factors}

    def _set_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.user_factors = np.ascontiguousarray(arrays["user_factors"], dtype=np.float32)
        self.item_factors = np.ascontiguousarray(arrays["item_factors"], dtype=np.float32)
        self.backend = "cpu"


class ALSSource(_FactorSource):
    """implicit's AlternatingLeastSquares (Hu, Koren & Volinsky's implicit-feedback ALS).

    ``use_gpu=None`` fits on the GPU exactly when ``implicit.gpu.HAS_CUDA``. ``seed`` fixes the
    initial factors, so fits are reproducible. New users are folded in by solving their least
    squares problem against the fixed item factors (implicit's ``recalculate_user`` path).
    """

    name = "als"
    supports_fold_in = True

    def __init__(
        self,
        factors: int = CANDIDATE_DEFAULTS.factors,
        iterations: int = CANDIDATE_DEFAULTS.iterations,
        regularization: float = CANDIDATE_DEFAULTS.regularization,
        alpha: float = CANDIDATE_DEFAULTS.alpha,
        seed: int | None = 0,
        use_gpu: bool | None = None,
        num_threads: int = 0,
        show_progress: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(factors, iterations, regularization, seed, use_gpu, num_threads, show_progress, name)
        self.alpha = float(alpha)
        self._cpu_model: Any = None

    def _make_model(self, use_gpu: bool) -> Any:
        from implicit.als import AlternatingLeastSquares

        return AlternatingLeastSquares(
            factors=self.factors,
            regularization=self.regularization,
            alpha=self.alpha,
            iterations=self.iterations,
            use_gpu=use_gpu,
            num_threads=self.num_threads,
            random_state=self.seed,
        )

    def fit(self, user_items: sp.csr_matrix) -> ALSSource:
        self._fit_factors(user_items, resolve_use_gpu(self.use_gpu), self.show_progress)
        self._cpu_model = None
        return self

    def _cpu(self) -> Any:
        """An implicit CPU ALS model wrapping the numpy factors (for recalculate_user)."""
        if self._cpu_model is None:
            from implicit.cpu.als import AlternatingLeastSquares

            with threadpool_limits(1, "blas"):
                m = AlternatingLeastSquares(
                    factors=int(self.item_factors.shape[1]),
                    regularization=self.regularization,
                    alpha=self.alpha,
                    dtype=np.float32,
                    iterations=self.iterations,
                    num_threads=self.num_threads,
                    random_state=self.seed,
                )
            m.item_factors = self.item_factors
            m.user_factors = self.user_factors
            self._cpu_model = m
        return self._cpu_model

    def fold_in_factors(self, item_lists: Sequence[np.ndarray], weights: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Least-squares user factors (len(item_lists), factors) against the fixed item factors."""
        self._check_fitted()
        rows = lists_to_csr(item_lists, self.n_items, weights)
        if rows.shape[0] == 0:
            return np.zeros((0, self.item_factors.shape[1]), np.float32)
        model = self._cpu()
        with threadpool_limits(1, "blas"):
            uf = model.recalculate_user(np.arange(rows.shape[0]), rows)
        return np.asarray(uf, dtype=np.float32).reshape(rows.shape[0], -1)

    def explain(self, liked: sp.csr_matrix, items: Sequence[int], n: int = 3) -> list[list[tuple[int, float, float]]]:
        """implicit's ``explain()`` for one user: per item of ``items``, the ``n`` liked items that contribute
        most to its ALS score, as (item index, contribution, share); the share is the contribution divided by
        the sum of the absolute contributions of all the user's liked items (sign kept; the shares' absolute values sum to
        at most 1). Raw contributions are products of small factors (often below 1e-3), which read as 0 at
        any fixed number of decimals. ``liked``: the user's row (1 x items) of the matrix the source was
        fitted on."""
        self._check_fitted()
        row = as_user_items(liked, "liked")
        model = self._cpu()
        weights, out = None, []
        n_liked = max(int(row.nnz), 1)
        with threadpool_limits(1, "blas"):
            for item in items:  # the user's factorisation (weights) is computed once and reused
                _, every, weights = model.explain(0, row, int(item), user_weights=weights, N=n_liked)
                total = sum(abs(float(c)) for _, c in every)
                out.append([(int(i), float(c), float(c) / total if total > 0 else 0.0) for i, c in every[:n]])
        return out

    def fold_in(self, item_lists: Sequence[np.ndarray], weights: Sequence[np.ndarray] | None = None) -> np.ndarray:
        rows = lists_to_csr(item_lists, self.n_items, weights)
        scores = self.fold_in_factors(item_lists, weights) @ self.item_factors.T
        scores[np.diff(rows.indptr) == 0] = -np.inf  # nothing known: nothing personal to propose
        return scores

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        params = {
            "factors": self.factors,
            "iterations": self.iterations,
            "regularization": self.regularization,
            "alpha": self.alpha,
            "seed": self.seed,
            "use_gpu": self.use_gpu,
            "num_threads": self.num_threads,
        }
        return params, self._factor_arrays()

    def _set_state(self, arrays: dict[str, np.ndarray]) -> None:
        super()._set_state(arrays)
        self._cpu_model = None
