"""The exposure trade-off curve of the evaluate stage: NDCG@K against provider Gini at several
``topk.exposure_weight`` values (the re-ranking of :mod:`adrec.topk.exposure`), for the report.

One pass of the two-stage recommender gives every evaluated user's pool (the best ``exposure_pool``
candidates by re-ranker score, as serving re-ranks them); each weight then only re-ranks those pools, so
the curve costs one ranking, not one per weight. The point at the served version's own weight is the
served lists' (``topk.*`` and ``fairness.gini.providers``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adrec.evaluation.plots import plot_curves
from adrec.evaluation.report import markdown_table
from adrec.metrics import gini, item_exposure, topk_metrics
from adrec.topk.exposure import exposure_rerank


def provider_gini(top: np.ndarray, provider: np.ndarray, n_catalog: int) -> float:
    """Gini of exposure (lists an item appears in, summed per provider) over the catalog's providers."""
    _, group = np.unique(provider[:n_catalog], return_inverse=True)
    return gini(np.bincount(group, weights=item_exposure(top, n_catalog), minlength=int(group.max()) + 1))


def tradeoff_points(pool: np.ndarray, pool_scores: np.ndarray, provider: np.ndarray, truth: list[set],
                    n_catalog: int, k: int, weights) -> list[dict]:
    """Per weight: NDCG@k, coverage@k and provider Gini of the pools re-ranked to k items."""
    out = []
    for w in sorted({float(x) for x in weights}):
        pos = exposure_rerank(pool, pool_scores, provider, w, k)
        top = np.where(pos >= 0, np.take_along_axis(pool, np.maximum(pos, 0), 1), -1)
        m = topk_metrics(top, truth, n_catalog, k)
        out.append({"exposure_weight": w, f"ndcg@{k}": m[f"topk.ndcg@{k}"],
                    f"coverage@{k}": m[f"topk.coverage@{k}"], "gini.providers": provider_gini(top, provider, n_catalog)})
    return out


def exposure_tradeoff(two_stage, users: np.ndarray, truth: list[set], seen, n_catalog: int, k: int, weights,
                      report: Path) -> tuple[dict[str, float], str, Path | None]:
    """The curve's metrics (``exposure_tradeoff.w=<w>.<metric>``), its report section and plot."""
    if two_stage is None or two_stage.item_provider is None or not len(weights):
        why = ("no two-stage recommender in the version" if two_stage is None else
               "the items have no provider" if two_stage.item_provider is None else "no eval.exposure_weights")
        return {}, f"Not measured: {why}.", None
    pool, pool_sc, _ = two_stage.rank_lists(users, max(k, two_stage.exposure_pool), exclude=seen, exposure_weight=0.0)
    points = tradeoff_points(pool, pool_sc, two_stage.item_provider, truth, n_catalog, k, weights)
    metrics = {f"exposure_tradeoff.w={p['exposure_weight']:g}.{name}": float(v)
               for p in points for name, v in p.items() if name != "exposure_weight"}
    ndcg = f"ndcg@{k}"
    body = (f"The exposure-aware re-ranking (`topk.exposure_weight` = w, docs/design.md) of the same users' pools "
            f"(the best {two_stage.exposure_pool} candidates by re-ranker score) at each w of `eval.exposure_weights`; "
            f"w = 0 is the re-ranker's order. The served lists use w = {two_stage.exposure_weight:g}.\n\n"
            + markdown_table(points))
    curve = {p["gini.providers"]: p[ndcg] for p in points}
    img = plot_curves({"two-stage + exposure re-ranking": curve}, report / "exposure_tradeoff.png",
                      xlabel="Gini of provider exposure (lower is more even)", ylabel=f"NDCG@{k}",
                      title="Relevance vs evenness of provider exposure",
                      labels={"two-stage + exposure re-ranking": {p["gini.providers"]: f"w={p['exposure_weight']:g}"
                                                                  for p in points}})
    return metrics, body, img
