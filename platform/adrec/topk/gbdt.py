"""Stage 2's model: a gradient-boosted re-ranker over the candidate features, with LightGBM
(``rank_xendcg`` by default, ``binary`` as a classifier) when it is installed, else scikit-learn's
pointwise HistGradientBoostingClassifier; training, scoring and the model file.

Scores are monotone in what was learned (LightGBM's raw score, scikit-learn's decision function):
they order one user's candidates and mean nothing across models.

Neither model file is a pickle: a version folder may sit on storage others can write, and unpickling
runs code. LightGBM's is its text model; scikit-learn's is a skops file (``skops.io``: a zip of JSON
and numpy arrays), loaded with the trusted-type list :data:`SKLEARN_TRUSTED` and refused otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from adrec.errors import UnsafeFileError

__all__ = ["LGBM_DEFAULTS", "RANKERS", "SKLEARN_DEFAULTS", "load_ranker", "predict", "resolve_ranker", "save_ranker",
           "train_ranker"]

#: What ``ranker`` may say; "auto" is LightGBM when importable, else scikit-learn.
RANKERS = ("auto", "lightgbm", "sklearn")
LGBM_FILE = "ranker.txt"
SKLEARN_FILE = "ranker.skops"
#: What versions before skops wrote: a pickle, refused (never unpickled).
LEGACY_PICKLE = "ranker.pkl"
#: The types a scikit-learn re-ranker file may hold beyond those skops trusts by default (scikit-learn's
#: estimators, numpy and builtins): the fitted trees of HistGradientBoostingClassifier.
SKLEARN_TRUSTED = ("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",)
_REFIT = "refit the top-K stage (`adrec candidates --run R`)"


def resolve_ranker(ranker: str) -> str:
    """"lightgbm" or "sklearn" for a :data:`RANKERS` value (ImportError for "lightgbm" without it)."""
    if ranker not in RANKERS:
        raise ValueError(f"ranker must be 'auto', 'lightgbm' or 'sklearn', got {ranker!r}")
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


def train_ranker(kind: str, x: pd.DataFrame, y: np.ndarray, groups: np.ndarray, params: Mapping[str, Any],
                 seed: int) -> Any:
    """A fitted re-ranker of ``kind`` on examples ``x`` (labels ``y``: 0/1, or graded 0/1/2; ``groups``:
    candidates per user, in row order) with ``params`` over the kind's defaults.

    A ranking objective reads graded labels as they are; a classifier (LightGBM ``binary``, scikit-learn)
    learns ``y > 0`` with the top grade weighted twice (graded labels) or ``y`` unweighted (0/1)."""
    if len(y) == 0 or y.sum() == 0:
        raise ValueError("the re-ranker has no positive training example: no valid positive reached a candidate list")
    y = np.asarray(y, np.float32)
    graded = float(y.max()) > 1
    weight = np.where(y >= y.max(), 2.0, 1.0) if graded else None
    y_bin = (y > 0).astype(np.float32)
    if kind == "lightgbm":
        import lightgbm

        p = {**LGBM_DEFAULTS, **params, "random_state": seed}
        if p["objective"] == "binary":
            model = lightgbm.LGBMClassifier(**p)
            model.fit(x, y_bin, sample_weight=weight)
        else:
            model = lightgbm.LGBMRanker(**p)
            model.fit(x, y, group=groups)
        return model
    from sklearn.ensemble import HistGradientBoostingClassifier

    p = {**SKLEARN_DEFAULTS, **params, "random_state": seed}
    model = HistGradientBoostingClassifier(**p)
    with threadpool_limits(1, "openmp"):  # see LGBM_DEFAULTS: one thread is faster on a shared box
        model.fit(x, y_bin, sample_weight=weight)
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


def predict(model: Any, kind: str, x: pd.DataFrame | np.ndarray) -> np.ndarray:
    """Scores of feature rows: a DataFrame, or a float64 matrix in the trained feature order."""
    if kind == "lightgbm":  # the raw score (log-odds for binary): monotone in what was learned
        booster = model.booster_ if hasattr(model, "booster_") else model
        return np.asarray(booster.predict(x, raw_score=True, num_threads=1), dtype=np.float64)
    with _one_openmp_thread(), warnings.catch_warnings():
        # fitted on a DataFrame, scored on the same columns as a matrix: not a mistake to warn about
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        return np.asarray(model.decision_function(x), dtype=np.float64)


def _skops():
    try:
        import skops.io
    except ImportError as err:
        raise ImportError("the scikit-learn re-ranker is saved with skops: pip install skops "
                          "(or install LightGBM and use ranker='lightgbm')") from err
    return skops.io


def save_ranker(model: Any, kind: str, directory: Path) -> None:
    """Write the re-ranker into ``directory``: LightGBM's text model, or scikit-learn's model as a skops file."""
    if kind == "lightgbm":
        booster = model.booster_ if hasattr(model, "booster_") else model
        booster.save_model(str(directory / LGBM_FILE))
    else:
        _skops().dump(model, directory / SKLEARN_FILE)


def load_ranker(kind: str, directory: Path) -> Any:
    """The re-ranker :func:`save_ranker` wrote (a LightGBM Booster, or the scikit-learn model).

    A scikit-learn file holding any type outside skops' defaults and :data:`SKLEARN_TRUSTED`, and a
    pickled ``ranker.pkl`` of older versions, are refused with :class:`UnsafeFileError`: nothing in them runs."""
    if kind == "lightgbm":
        import lightgbm

        return lightgbm.Booster(model_file=str(directory / LGBM_FILE))
    path = directory / SKLEARN_FILE
    if not path.is_file():
        if (directory / LEGACY_PICKLE).is_file():
            raise UnsafeFileError(f"{directory / LEGACY_PICKLE} is a pickled re-ranker, which adrec no longer "
                                  f"loads (unpickling a file runs code from it): {_REFIT}")
        raise FileNotFoundError(f"{path} is missing: {_REFIT}")
    sio = _skops()
    from skops.io.exceptions import UntrustedTypesFoundException

    try:
        model = sio.load(path, trusted=list(SKLEARN_TRUSTED))
    except UntrustedTypesFoundException as err:
        raise UnsafeFileError(f"{path} is refused: it holds types outside the re-ranker's trusted list "
                              f"({err}); {_REFIT}") from None
    from sklearn.ensemble import HistGradientBoostingClassifier

    if not isinstance(model, HistGradientBoostingClassifier):
        raise UnsafeFileError(f"{path} holds a {type(model).__name__}, not the HistGradientBoostingClassifier "
                              f"adrec writes: {_REFIT}")
    return model
