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


def task_calibrations(ctr_logits: np.ndarray, cvr_logits: np.ndarray, clicks: np.ndarray,
                      conversions: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """A two-task (ESMM) model's two Platt calibrations: pCTR's on every row's click, pCVR's on the clicked
    rows' conversions (pCVR is the probability of a conversion given a click: the clicked rows are the only
    ones that observe it), as the baseline's independent CVR model is calibrated on its clicked valid rows."""
    clicks = np.asarray(clicks, dtype=np.float64)
    clicked = clicks > 0
    return (fit_platt(ctr_logits, clicks),
            fit_platt(np.asarray(cvr_logits)[clicked], np.asarray(conversions, dtype=np.float64)[clicked]))


def task_probabilities(ctr_logits: np.ndarray, cvr_logits: np.ndarray, clicks: np.ndarray, conversions: np.ndarray,
                       calibrate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(pCTR, pCVR) of these rows, each through the Platt calibration fitted on these very rows
    (:func:`task_calibrations`; raw sigmoids with ``calibrate=False``): the valid split's pCTCVR = pCTR x pCVR
    as the saved ranker will form it, which a two-task model's epochs are selected on."""
    (a1, b1), (a2, b2) = task_calibrations(ctr_logits, cvr_logits, clicks, conversions) if calibrate \
        else ((1.0, 0.0), (1.0, 0.0))
    return _sigmoid(a1 * np.asarray(ctr_logits) + b1), _sigmoid(a2 * np.asarray(cvr_logits) + b2)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(z, dtype=np.float64), -50, 50)))


def finish(cfg: RankerConfig, data: dict, state: dict, ranker: FusionRanker | None = None) -> FusionRanker:
    """The ranker of a training state: the refit's weights (or the best selection epoch's without a
    refit), with Platt scaling fitted on the best epoch's valid logits (``cfg.calibrate``): pCTR's, and a
    two-task model's pCVR's on the valid clicked rows (:func:`task_calibrations`)."""
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
    labels = state.get("best_labels")  # a streamed valid: read with its logits
    if cfg.calibrate and state.get("best_logits") is not None:
        calibration = fit_platt(state["best_logits"], data[VALID]["label"] if labels is None else labels)
    ranker.calibration = calibration
    ranker.cvr_calibration = (1.0, 0.0)
    if cfg.calibrate and ranker.model.has_cvr and state.get("best_cvr_logits") is not None:
        clicks = data[VALID]["label"] if labels is None else labels
        conversions = state.get("best_conversions")
        if conversions is None:
            conversions = np.asarray(data[VALID]["conversion"], dtype=np.float64) * np.asarray(clicks)
        ranker.cvr_calibration = task_calibrations(state["best_logits"], state["best_cvr_logits"], clicks,
                                                   conversions)[1]
    hist = state["history"]
    ranker.info = {"valid_auc": state["best_auc"], "best_epoch": state["best_epoch"], "refit": refit,
                   "cvr_epochs": int(state.get("cvr_epochs", 0)),
                   "epochs_run": [h["epoch"] for h in hist], "history": hist}
    if state.get("privacy") is not None:  # DP-SGD: the epsilon Opacus' accountant gives for the steps taken
        ranker.info["privacy"] = spent(state["privacy"])
    return ranker
