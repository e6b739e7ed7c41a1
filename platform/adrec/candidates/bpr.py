"""Bayesian Personalized Ranking candidates from implicit (CPU or GPU behind one name)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.sparse as sp

from adrec.config import CANDIDATE_DEFAULTS

from .als import _FactorSource
from .base import resolve_use_gpu

logger = logging.getLogger(__name__)


class BPRSource(_FactorSource):
    """implicit's BayesianPersonalizedRanking; the item factors carry a bias column.

    BPR trains by Hogwild SGD, which is only reproducible for a seed with one thread: hence
    ``num_threads=1`` by default (0 = all cores, faster, not reproducible). No fold-in.
    """

    name = "bpr"
    supports_fold_in = False

    def __init__(
        self,
        factors: int = CANDIDATE_DEFAULTS.factors,
        iterations: int = 100,
        learning_rate: float = 0.01,
        regularization: float = 0.01,
        seed: int | None = 0,
        use_gpu: bool | None = None,
        num_threads: int = 1,
        verify_negative_samples: bool = True,
        show_progress: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(factors, iterations, regularization, seed, use_gpu, num_threads, show_progress, name)
        self.learning_rate = float(learning_rate)
        self.verify_negative_samples = bool(verify_negative_samples)

    def _make_model(self, use_gpu: bool) -> Any:
        from implicit.bpr import BayesianPersonalizedRanking

        return BayesianPersonalizedRanking(
            factors=self.factors,
            learning_rate=self.learning_rate,
            regularization=self.regularization,
            iterations=self.iterations,
            use_gpu=use_gpu,
            num_threads=self.num_threads,
            verify_negative_samples=self.verify_negative_samples,
            random_state=self.seed,
        )

    def fit(self, user_items: sp.csr_matrix) -> BPRSource:
        self._fit_factors(user_items, resolve_use_gpu(self.use_gpu), self.show_progress)
        return self

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        params = {
            "factors": self.factors,
            "iterations": self.iterations,
            "learning_rate": self.learning_rate,
            "regularization": self.regularization,
            "seed": self.seed,
            "use_gpu": self.use_gpu,
            "num_threads": self.num_threads,
            "verify_negative_samples": self.verify_negative_samples,
        }
        return params, self._factor_arrays()
