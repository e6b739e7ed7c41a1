"""The explanations ``/recommend`` answers with ``explain=true``, per item, within a time budget.

(a) the candidate sources that proposed the item (the request algorithm has them: :mod:`.request`);
(b) ``because_you_liked``: the user's history items that contributed most: the ranker's target-attention
    weights over the history (:meth:`adrec.ranking.explain.Explainer.history_attention`) and, for an item
    the ALS source proposed, implicit's ``explain()`` (the liked items' shares of the ALS score);
(c) ``features``: the ranker's top attributions by field (Integrated Gradients over the input
    embeddings, :meth:`~adrec.ranking.explain.Explainer.attributions`), each with its sign and share.

Cost is bounded: nothing runs without ``explain``; only the first ``serve.explain_max_items`` items are
explained; (b) runs first (one forward pass), then (c) in chunks of items while the request's
``serve.explain_budget_ms`` lasts; an item left without (c) has ``features: null`` and the answer says
``explain_complete: false``.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)

IG_CHUNK = 4  # items per Integrated Gradients pass: the budget is checked between passes


def field_kind(name: str) -> str:
    """What a field is, for a reader: user, item, context, cross, text or history."""
    if name.startswith("x:"):
        return "cross"
    if name == "item.text":
        return "text"
    if name == "history":
        return "history"
    return {"ctx": "context", "user": "user", "item": "item"}.get(name.split(".", 1)[0], "other")


def attention_because(hist: np.ndarray, weights: np.ndarray, item_ids, top_n: int) -> list[dict]:
    """The ``top_n`` history items of one row by attention weight (weights > 0 only)."""
    order = np.argsort(-weights, kind="stable")[:top_n]
    keep = [p for p in order if weights[p] > 0 and hist[p] >= 0]
    names = item_ids(hist[keep]) if keep else []
    return [{"item": n, "weight": round(float(weights[p]), 6), "method": "attention"} for n, p in zip(names, keep)]


def feature_records(attr: np.ndarray, groups: list[str], top_n: int, value_of) -> list[dict]:
    """The ``top_n`` groups of one row by |attribution|, with sign, share of the total |attribution| and value."""
    total = float(np.abs(attr).sum())
    out = []
    for g in np.argsort(-np.abs(attr), kind="stable")[:top_n]:
        a = float(attr[g])
        rec = {"feature": groups[g], "kind": field_kind(groups[g]), "attribution": round(a, 6),
               "sign": "+" if a >= 0 else "-", "share": round(abs(a) / total, 6) if total > 0 else 0.0}
        value = value_of(groups[g])
        if value is not None:
            rec["value"] = value
        out.append(rec)
    return out


def explain_items(rec, user_idx: int, item_idx: np.ndarray, context: dict | None, budget_s: float,
                  max_items: int, top_n: int = 5) -> dict:
    """``{"items": [per item {"because_you_liked", "features"}], "complete": bool}`` for ``item_idx`` (best first).

    ``rec`` is a :class:`~adrec.serving.recommender.Recommender`; (a) and the ALS part of (b) are the
    caller's (:meth:`Recommender.als_because`: the candidate side holds the sources).
    """
    t0 = time.perf_counter()
    item_idx = np.asarray(item_idx, np.int64)
    n = min(len(item_idx), int(max_items))
    out = [{"because_you_liked": [], "features": None} for _ in item_idx]
    from adrec.ranking.explain import explainer_of  # torch and captum: only when explaining

    ex = explainer_of(rec.ranker)
    if n == 0 or ex is None:
        return {"items": out, "complete": ex is not None or n == 0}
    rows = rec.version.rows(np.full(n, user_idx, dtype=np.int64), item_idx[:n], context)
    hist, weights = ex.history_attention(rows)
    for j in range(n):
        out[j]["because_you_liked"] = attention_because(hist[j], weights[j], rec.item_ids, 3)
    complete = True
    for start in range(0, n, IG_CHUNK):
        if time.perf_counter() - t0 > budget_s:
            complete = False
            log.info("explain: time budget of %.0f ms spent after %d of %d items", budget_s * 1e3, start, n)
            break
        chunk = rows.iloc[start:start + IG_CHUNK]
        attrs, _ = ex.attributions(chunk)
        for j in range(len(chunk)):
            row = chunk.iloc[[j]]
            out[start + j]["features"] = feature_records(
                attrs[j], ex.groups, top_n, lambda g, row=row: rec.feature_value(g, row))
    return {"items": out, "complete": complete and n == len(item_idx)}
