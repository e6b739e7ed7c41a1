"""A finished training state -> the ranker to save: the chosen weights, calibrated on valid."""

from __future__ import annotations

import numpy as np

from adrec.config import RankerConfig
from adrec.features.split import VALID
from adrec.ranking.fusion import FusionRanker
from adrec.ranking.train.privacy import spent


def fit_platt(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt scaling ``p = sigmoid(a * logit + b)``: scikit-learn's unpenalised logistic regression
    of the labels on the logits (Newton steps to a tight tolerance). ``(1, 0)`` with one class or no rows."""
    from sklearn.linear_model import LogisticRegression

    z = np.asarray(logits, dtype=np.float64).reshape(-1, 1)
    y = np.asarray(y, dtype=np.float64)
    if len(z) == 0 or y.min() == y.max():
        return 1.0, 0.0
    fit = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-10, max_iter=100).fit(z, y)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def finish(cfg: RankerConfig, data: dict, state: dict, ranker: FusionRanker | None = None) -> FusionRanker:
    """The ranker of a training state: the refit's weights (or the best selection epoch's without a
    refit), with Platt scaling fitted on the best epoch's valid logits (``cfg.calibrate``)."""
    if state is None or state.get("best_state") is None:
        raise RuntimeError("training produced no checkpoint with a best model")
    if ranker is None:
        ranker = FusionRanker.build(cfg, data["spec"], data["items"], data["users"], refresh=False)
    ranker.model.cpu()
    ranker.collab = data.get("collab")
    refit = state.get("final_state") is not None
    weights = state["final_state"] if refit else state["best_state"]
    missing, unexpected = ranker.model.load_state_dict(weights, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: unexpected {unexpected}")
    ranker.model.text.pooled.copy_(state["final_pooled"] if refit else state["best_pooled"])
    ranker.model.eval()
    calibration = (1.0, 0.0)
    if cfg.calibrate and state.get("best_logits") is not None:
        labels = state.get("best_labels")  # a streamed valid: read with its logits
        calibration = fit_platt(state["best_logits"], data[VALID]["label"] if labels is None else labels)
    ranker.calibration = calibration
    hist = state["history"]
    ranker.info = {"valid_auc": state["best_auc"], "best_epoch": state["best_epoch"], "refit": refit,
                   "epochs_run": [h["epoch"] for h in hist], "history": hist}
    if state.get("privacy") is not None:  # DP-SGD: the epsilon Opacus' accountant gives for the steps taken
        ranker.info["privacy"] = spent(state["privacy"])
    return ranker
