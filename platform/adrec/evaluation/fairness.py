"""Fairness of exposure for the evaluate stage: the ``fairness.*`` metrics, their report section and plot.

Computed from what evaluate already has: the served top-K lists and the ranker's test predictions
(no second pass over the data). The definitions are the functions' in :mod:`adrec.metrics`.

Providers are the item's advertiser (``item.advertiser``, the synthetic log); where the data has none
(MovieLens-100k) the item's primary genre (the first value of ``item.genre``) stands in, and the report
says so. User groups for calibration are ``user.gender`` and ``user.age`` in buckets, where present.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from adrec.evaluation.plots import plot_metric_bars
from adrec.metrics import calibration_by_group, exposure_to_merit, gini, item_exposure, long_tail_share
from adrec.topk.exposure import provider_column

log = logging.getLogger(__name__)

HEAD_SHARE = 0.8  # the head: the most popular items that make up 80% of train positives
AGE_EDGES = [18, 25, 35, 45, 55]  # buckets <18, 18-24, 25-34, 35-44, 45-54, 55+
_PLOT_PROVIDERS = 15  # bars for the providers with the most test positives; the table lists all


def age_bucket(age: pd.Series) -> pd.Series:
    """'<18', '18-24', '25-34', '35-44', '45-54', '55+'; missing ages stay missing."""
    labels = ["<18"] + [f"{lo}-{hi - 1}" for lo, hi in zip(AGE_EDGES, AGE_EDGES[1:])] + [f"{AGE_EDGES[-1]}+"]
    codes = np.searchsorted(AGE_EDGES, age.to_numpy(dtype=np.float64), side="right")
    return pd.Series(np.where(age.isna(), None, np.array(labels, dtype=object)[np.minimum(codes, len(labels) - 1)]),
                     index=age.index)


def fairness(items: pd.DataFrame, users: pd.DataFrame, n_catalog: int, train_pos_items: np.ndarray,
             top: np.ndarray, truth: list[set], test: pd.DataFrame, probs: np.ndarray,
             report: Path) -> tuple[dict[str, float], str, Path | None, pd.DataFrame | None]:
    """The ``fairness.*`` metrics, the report section, the exposure-vs-merit plot and the per-provider table.

    ``items``/``users``: the feature tables (rows in index order); ``top``: the served lists of the users
    whose test positives are ``truth``; ``test``/``probs``: the test impressions and their predictions.
    """
    items = items.sort_values("item_idx").iloc[:n_catalog]
    exposure = item_exposure(top, n_catalog)
    popularity = np.bincount(train_pos_items, minlength=n_catalog)[:n_catalog]
    metrics = {"fairness.gini.items": gini(exposure),
               "fairness.long_tail_share": long_tail_share(top, popularity, HEAD_SHARE)}
    lines = [f"From the served top-{top.shape[1]} lists of {top.shape[0]} users. Exposure of an item is the "
             f"number of lists it appears in; `fairness.gini.items` is the Gini index of that exposure over all "
             f"{n_catalog} catalog items (zero exposure included). `fairness.long_tail_share`: the share of served "
             f"slots holding an item outside the head, the most popular items (by train positives) that make up "
             f"{HEAD_SHARE:.0%} of train positives."]
    img, table = None, None
    provider, what = provider_column(items)
    lines.append(f"Providers: {what}.")
    if provider is not None:
        names, group = np.unique(provider.to_numpy(), return_inverse=True)
        metrics["fairness.gini.providers"] = gini(np.bincount(group, weights=exposure, minlength=len(names)))
        etm = exposure_to_merit(top, truth, group, len(names))
        table = pd.DataFrame({"provider": names, "exposure share": etm["exposure_share"],
                              "merit share": etm["merit_share"], "exposure / merit": etm["ratio"]})
        ratio = etm["ratio"]
        if np.isfinite(ratio).any():
            worst = int(np.nanargmin(ratio))
            metrics["fairness.exposure_to_merit.min"] = float(ratio[worst])
            metrics["fairness.exposure_to_merit.max"] = float(np.nanmax(ratio))
            lines.append(f"Exposure to merit (Singh & Joachims): each provider's share of the position-weighted "
                         f"exposure (1/log2(1+rank)) over its share of the test positives; 1 is exposure in "
                         f"proportion to merit. The least exposed provider for its merit is `{names[worst]}` "
                         f"({ratio[worst]:.3f}); providers without test positives have no ratio.")
        shown = table.sort_values("merit share", ascending=False).head(_PLOT_PROVIDERS)
        img = plot_metric_bars({"exposure share": dict(zip(shown["provider"], shown["exposure share"])),
                                "merit share": dict(zip(shown["provider"], shown["merit share"]))},
                               report / "fairness_exposure.png",
                               title=f"Provider exposure vs merit (top {len(shown)} by test positives)")
    y = test["label"].to_numpy()
    by_user = users.set_index("user_idx")
    groups = {}
    if "user.gender" in by_user:
        groups["gender"] = by_user["user.gender"].fillna("").astype(str)
    if "user.age" in by_user:
        groups["age"] = age_bucket(pd.to_numeric(by_user["user.age"], errors="coerce"))
    for name, labels in groups.items():
        row_labels = labels.reindex(test["user_idx"]).to_numpy()
        known = pd.notna(row_labels) & (row_labels != "")
        for value, c in calibration_by_group(y[known], probs[known], row_labels[known]).items():
            metrics[f"fairness.calibration.{name}.{value}"] = c
    lines.append("Calibration per user group (`fairness.calibration.<group>.<value>`): mean predicted click "
                 "probability over observed CTR on the group's test impressions (1 is calibrated); groups: "
                 + (", ".join(groups) if groups else "none in this data")
                 + (f" (age in buckets split at {AGE_EDGES})" if "age" in groups else "") + ".")
    return metrics, "\n\n".join(lines), img, table
