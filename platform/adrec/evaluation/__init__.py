"""Evaluation layer: offline metrics, report figures and the run report.

Pure numpy/pandas (matplotlib only inside the plotting functions); no Ray, no torch.
Importing this package has no side effects: no backend is selected, nothing is logged.
"""

from .metrics import (
    auc,
    calibration,
    ctr_metrics,
    logloss,
    rank_candidates,
    rank_topk,
    topk_metrics,
)
from .plots import plot_calibration, plot_metric_bars, plot_robustness, plot_roc, roc_curve
from .report import flatten_metrics, markdown_table, write_report

__all__ = [
    "auc",
    "calibration",
    "ctr_metrics",
    "flatten_metrics",
    "logloss",
    "markdown_table",
    "plot_calibration",
    "plot_metric_bars",
    "plot_robustness",
    "plot_roc",
    "rank_candidates",
    "rank_topk",
    "roc_curve",
    "topk_metrics",
    "write_report",
]
