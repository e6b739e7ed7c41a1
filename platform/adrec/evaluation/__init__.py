"""Evaluation layer: the evaluate stage, its report figures and the run report; off-policy evaluation
(:mod:`.ope`: the estimators, numpy only; :mod:`.policy_eval`: ``adrec evaluate-policy`` on the feedback log).

The metrics themselves live in :mod:`adrec.metrics` (below every stage that scores a model).
Pure numpy/pandas here (matplotlib only inside the plotting functions); no Ray, no torch (policy_eval loads a
model version, and with it torch, inside its command only).
Importing this package has no side effects: no backend is selected, nothing is logged.
"""

from .plots import plot_calibration, plot_metric_bars, plot_robustness, plot_roc
from .report import flatten_metrics, markdown_table, write_report

__all__ = [
    "flatten_metrics",
    "markdown_table",
    "plot_calibration",
    "plot_metric_bars",
    "plot_robustness",
    "plot_roc",
    "write_report",
]
