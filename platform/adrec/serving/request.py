"""The request algorithm: one ``/recommend`` over one model version, the same steps wherever it runs.

The fused Ingress, the graph's CandidateDeployment and the in-process :class:`Recommender` all run
:class:`Recommendation`; they differ only in where the click probabilities and the explanations are
computed (in this process, or on a ranker replica behind a handle)::

    req = Recommendation(rec, user_idx, k, context, n_candidates, explain)
    answer = req.run(rank, explain_fn)               # in-process: plain calls
    answer = await req.run_async(rank, explain_fn)   # Serve: awaited calls (batched, or on another replica)

``rank(items)`` returns the CTR ranker's click probabilities of ``items``, ``explain_fn(items)`` the
ranker's explanations of them (:func:`adrec.serving.explanations.explain_items`). For a user the two-stage recommender knows, its re-ranker's order is final: click
probabilities are computed for the top ``k`` only (a tenth of the ranker rows at k=10 of 100
candidates). For other users the click probability orders the candidates.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import numpy as np

#: What ordered a list (the response's ``ranked_by``).
TWO_STAGE, CLICK_PROB = "two_stage", "click_prob"


def top_order(items: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the best ``k`` (score descending, ties to the lower item index, as in the offline protocol)."""
    return np.lexsort((items, -np.asarray(scores)))[:k]


class Recommendation:
    """One request: candidates -> click probabilities -> the top ``k`` -> the answer (see the module)."""

    def __init__(self, rec, user_idx: int, k: int, context: dict | None, n_candidates: int, explain: bool = False):
        self.rec, self.user_idx, self.k, self.explain = rec, user_idx, k, explain
        self.cand = rec.candidates(user_idx, max(n_candidates, k), context)
        self.ranked_by = CLICK_PROB if self.cand.final is None else TWO_STAGE
        self.click_probs = np.full(len(self.cand.items), np.nan, np.float32)
        # Positions of the chosen items, best first: known now when the two-stage order is final. That order
        # is the list's own (by re-ranker score, or its exposure-aware re-ranking: adrec.topk.exposure).
        self.order = None if self.cand.final is None else np.arange(min(k, len(self.cand.items)))

    @property
    def to_score(self) -> np.ndarray:
        """The items whose click probability the answer needs."""
        return self.cand.items if self.order is None else self.cand.items[self.order]

    def set_click_probs(self, probs: np.ndarray) -> None:
        probs = np.asarray(probs, np.float32)
        if self.order is None:
            self.click_probs = probs
            self.order = top_order(self.cand.items, probs, self.k)
        else:
            self.click_probs[self.order] = probs

    @property
    def chosen(self) -> np.ndarray:
        """The answer's items (indices), best first."""
        return self.cand.items[self.order] if self.order is not None else np.empty(0, np.int64)

    def run(self, rank: Callable[[np.ndarray], np.ndarray],
            explain_fn: Callable[[np.ndarray], dict] | None = None) -> dict:
        if len(self.to_score):
            self.set_click_probs(rank(self.to_score))
        return self.answer(explain_fn(self.chosen) if self.explain and len(self.chosen) else None)

    async def run_async(self, rank: Callable[[np.ndarray], Awaitable[np.ndarray]],
                        explain_fn: Callable[[np.ndarray], Awaitable[dict]] | None = None) -> dict:
        if len(self.to_score):
            self.set_click_probs(await rank(self.to_score))
        return self.answer(await explain_fn(self.chosen) if self.explain and len(self.chosen) else None)

    def answer(self, explained: dict | None = None) -> dict:
        """``{"version", "ranked_by", "items"}`` (and ``explain_complete`` with explain), the items as
        :class:`~adrec.serving.responses.RecommendedItem`. ``explained``: the ranker's explanations of the
        chosen items (:func:`adrec.serving.explanations.explain_items`); the sources and the ALS part of
        "because you liked" come from this side, which holds the candidates."""
        items = []
        out = {"version": self.rec.version_id, "ranked_by": self.ranked_by}
        if self.order is not None:
            cand = self.cand
            sources = [cand.sources[j] if cand.sources else [] for j in self.order]
            per_item = (explained or {}).get("items") or [{} for _ in self.order]
            als = self.rec.als_because(self.user_idx, cand.items[self.order], sources) if self.explain else None
            for rank, (j, item) in enumerate(zip(self.order, self.rec.item_ids(cand.items[self.order])), start=1):
                rec = {"item": item, "rank": rank, "click_prob": float(self.click_probs[j]),
                       "relevance": None if cand.final is None else float(cand.final[j])}
                if self.explain:
                    ex = per_item[rank - 1]
                    rec["sources"] = sources[rank - 1]
                    rec["because_you_liked"] = list(ex.get("because_you_liked") or []) + als[rank - 1]
                    rec["features"] = ex.get("features")
                items.append(rec)
            if self.explain:
                out["explain_complete"] = bool((explained or {}).get("complete", False))
        out["items"] = items
        return out
