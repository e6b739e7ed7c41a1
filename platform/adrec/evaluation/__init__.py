"""Evaluation layer: the evaluate stage, its report figures and the run report.

The metrics themselves live in :mod:`adrec.metrics` (below every stage that scores a model).
Pure numpy/pandas here (matplotlib only inside the plotting functions); no Ray, no torch.
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
