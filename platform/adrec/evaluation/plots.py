"""Report figures: ROC, reliability diagram, metric bars, robustness and other curves.

matplotlib is imported inside each function, never at import of the package. If no
backend has been selected yet in the process, Agg is selected (headless workers,
CI); a backend chosen by the user (``MPLBACKEND``, ``matplotlib.use``, pyplot
already imported) is left alone. Figures are built with the object-oriented API
(``matplotlib.figure.Figure``), not pyplot, so no global figure state is kept and
nothing leaks in long-running processes.

Every function writes a PNG (creating parent folders) and returns its path.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from adrec.metrics import auc, calibration, calibration_bins, roc_points

logger = logging.getLogger(__name__)

__all__ = ["plot_roc", "plot_calibration", "plot_curves", "plot_estimates", "plot_metric_bars", "plot_robustness"]

_DPI = 120


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kw):
    import matplotlib

    _select_backend(matplotlib)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, **kw)
    return fig, axes


def _select_backend(matplotlib) -> None:
    """Select Agg only if nothing chose a backend yet."""
    if os.environ.get("MPLBACKEND") or "matplotlib.pyplot" in sys.modules:
        return
    get = getattr(matplotlib.rcParams, "_get_backend_or_none", None)
    if get is not None:
        if get() is None:
            matplotlib.use("Agg")
    elif "matplotlib.backends" not in sys.modules:  # pragma: no cover - old matplotlib
        matplotlib.use("Agg")


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    logger.debug("wrote %s", path)
    return path


def plot_roc(
    y=None,
    p=None,
    path: str | os.PathLike = "roc.png",
    label: str = "model",
    *,
    curves: Mapping[str, tuple] | None = None,
    title: str = "ROC curve",
) -> Path:
    """ROC curve(s) with AUC in the legend.

    Either one curve (``y``, ``p``, ``label``) or several via ``curves={label: (y, p)}``
    (both may be given; the single curve comes first).
    """
    series: dict[str, tuple] = {}
    if y is not None or p is not None:
        if y is None or p is None:
            raise ValueError("plot_roc needs both y and p (or curves=...)")
        series[label] = (y, p)
    if curves:
        for name, pair in curves.items():
            if name in series:
                raise ValueError(f"duplicate curve label {name!r}")
            series[name] = pair
    if not series:
        raise ValueError("plot_roc needs y and p, or curves={label: (y, p)}")

    fig, ax = _figure(5.5, 5.0)
    for name, (yy, pp) in series.items():
        fpr, tpr = roc_points(yy, pp)
        a = auc(yy, pp)
        ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUC = {_fmt(a)})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance (AUC = 0.5)")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate",
           title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_calibration(
    y,
    p,
    path: str | os.PathLike = "calibration.png",
    n_bins: int = 10,
    *,
    strategy: str = "uniform",
    label: str = "model",
    title: str = "Reliability diagram",
) -> Path:
    """Reliability diagram: observed click rate vs mean predicted probability per bin,
    with the number of impressions per bin in a panel below.

    ``strategy="uniform"`` uses equal-width bins on [0, 1]; ``"quantile"`` uses
    equal-count bins (better when predicted CTRs are all small).
    """
    edges, counts, mean_p, rate = calibration_bins(y, p, n_bins, strategy)
    nb = edges.size - 1
    n_rows = int(counts.sum())

    fig, (ax, axc) = _figure(5.5, 6.5, 2, 1, sharex=True, height_ratios=[3, 1])
    hi = float(max(edges[-1], mean_p.max(), rate.max())) if strategy == "quantile" else 1.0
    ax.plot([0, hi], [0, hi], ls="--", color="grey", lw=1, label="perfectly calibrated")
    ax.plot(mean_p, rate, marker="o", lw=1.8,
            label=f"{label} (mean p / CTR = {_fmt(calibration(y, p))})")
    ax.set(ylabel="Observed click rate", title=title, xlim=(0, hi), ylim=(0, hi * 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    widths = np.diff(edges)
    bars = axc.bar(edges[:-1], counts, width=widths, align="edge", edgecolor="black",
                   color="tab:blue", alpha=0.6)
    if strategy == "uniform" and nb <= 20:
        axc.bar_label(bars, labels=[str(int(c)) if c else "" for c in counts], fontsize=7)
    else:  # equal-count bins are often too narrow to label
        axc.set_title(f"{nb} equal-count bins, about {int(round(n_rows / nb))} impressions each",
                      fontsize="small")
    axc.set(xlabel="Mean predicted probability (bin)", ylabel="Impressions")
    axc.set_ylim(0, counts.max() * 1.25)
    axc.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_metric_bars(
    metrics: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike = "metrics.png",
    *,
    title: str = "Metrics by model",
) -> Path:
    """Grouped bars: one group per metric, one bar per model (``{model: {metric: value}}``).

    Metrics missing for a model, or nan, are left out of that group.
    """
    if not metrics:
        raise ValueError("plot_metric_bars needs at least one model")
    models = list(metrics)
    names: list[str] = []
    for m in models:
        for name in metrics[m]:
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("plot_metric_bars needs at least one metric")
    width = 0.8 / len(models)
    fig, ax = _figure(max(6.0, 0.9 * len(names) * max(1, len(models)) ** 0.5 + 2), 4.8)
    x = np.arange(len(names))
    for i, m in enumerate(models):
        vals = np.array([_as_float(metrics[m].get(n, math.nan)) for n in names])
        ok = np.isfinite(vals)
        bars = ax.bar(x[ok] - 0.4 + width * (i + 0.5), vals[ok], width, label=m)
        if len(names) * len(models) <= 40:
            ax.bar_label(bars, labels=[_fmt(v, 3) for v in vals[ok]], fontsize=7, rotation=90,
                         padding=2)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="Value", title=title)
    ymax = max((_as_float(v) for d in metrics.values() for v in d.values()
                if np.isfinite(_as_float(v))), default=1.0)
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), max(ymax, 0) * 1.2 or 1.0)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_robustness(
    table: Mapping[str, Mapping[float, float]],
    path: str | os.PathLike = "robustness.png",
    *,
    metric: str = "AUC",
    title: str = "Robustness to input perturbation",
) -> Path:
    """AUC (or ``metric``) against perturbation size epsilon, one line per model."""
    return plot_curves(table, path, xlabel="Perturbation ε (FGSM)", ylabel=metric, title=title)


def plot_curves(
    table: Mapping[str, Mapping[float, float]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    labels: Mapping[str, Mapping[float, str]] | None = None,
) -> Path:
    """One line per series (``{name: {x: y}}``, drawn in x order); ``labels[name][x]`` annotates a point."""
    if not table:
        raise ValueError("plot_curves needs at least one series")
    fig, ax = _figure(6.0, 4.5)
    for name, by_x in table.items():
        if not by_x:
            continue
        pts = sorted((float(e), _as_float(v)) for e, v in by_x.items())
        ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", lw=1.8, label=name)
        for x, text in ((labels or {}).get(name) or {}).items():
            ax.annotate(text, (float(x), _as_float(by_x[x])), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_estimates(
    estimates: Mapping,
    path: str | os.PathLike = "estimates.png",
    *,
    reference: tuple[str, float] | None = None,
    title: str = "Estimates",
    xlabel: str = "Value",
) -> Path:
    """Point estimates with their intervals, one row each: ``{row: (value, low, high)}``, or several series
    side by side, ``{series: {row: (value, low, high)}}``; ``reference=(label, x)`` draws a vertical line
    (the on-policy value the estimates aim at). Missing or nan bounds draw the point alone."""
    if not estimates:
        raise ValueError("plot_estimates needs at least one estimate")
    first = next(iter(estimates.values()))
    series = {"": estimates} if isinstance(first, (tuple, list)) else dict(estimates)
    rows: list[str] = []
    for by_row in series.values():
        rows += [r for r in by_row if r not in rows]
    fig, ax = _figure(7.0, max(2.5, 0.45 * len(rows) * max(1, len(series)) + 1.5))
    height = 0.8 / len(series)
    y0 = np.arange(len(rows))[::-1].astype(float)
    for i, (name, by_row) in enumerate(series.items()):
        ys, xs, lo, hi = [], [], [], []
        for j, r in enumerate(rows):
            if r not in by_row:
                continue
            v, low, high = (_as_float(x) for x in by_row[r])
            if not np.isfinite(v):
                continue
            ys.append(y0[j] + 0.4 - height * (i + 0.5))
            xs.append(v)
            lo.append(v - low if np.isfinite(low) else 0.0)
            hi.append(high - v if np.isfinite(high) else 0.0)
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", capsize=4, lw=1.6, label=name or None)
        for x, y in zip(xs, ys):
            ax.annotate(_fmt(x, 4), (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    if reference is not None:
        ax.axvline(_as_float(reference[1]), color="0.3", ls="--", lw=1.2, label=f"{reference[0]}: {_fmt(reference[1], 4)}")
    ax.set_yticks(y0, rows)
    ax.set(xlabel=xlabel, title=title)
    ax.grid(alpha=0.3, axis="x")
    if len(series) > 1 or reference is not None:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def _as_float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _fmt(v: float, digits: int = 4) -> str:
    return "nan" if not np.isfinite(v) else f"{v:.{digits}f}"
