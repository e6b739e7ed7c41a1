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

With an objective other than relevance, or exploration on (:mod:`adrec.serving.strategy`), a pool of
candidates is scored and the strategy picks the list from it; every answer says which objective and
policy, its ``request_id`` and A/B arm, and per item its ``position`` (0-based) and ``propensity``.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import numpy as np

from adrec.serving.strategy import (EXPECTED_CLICKS, EXPECTED_VALUE, RELEVANCE, Strategy, greedy_order,
                                    new_request_id, objective_values, request_rng)

#: What ordered a list (the response's ``ranked_by``).
TWO_STAGE, CLICK_PROB, VALUE = "two_stage", "click_prob", "expected_value"
# Per objective: what orders the list (None: the relevance order, two_stage or click_prob by user).
RANKED_BY = {RELEVANCE: None, EXPECTED_CLICKS: CLICK_PROB, EXPECTED_VALUE: VALUE}


def top_order(items: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the best ``k`` (score descending, ties to the lower item index, as in the offline protocol)."""
    return np.lexsort((items, -np.asarray(scores)))[:k]


class Recommendation:
    """One request: candidates -> click probabilities -> the list of ``k`` -> the answer (see the module).

    ``strategy`` (:class:`~adrec.serving.strategy.Strategy`): the objective and exploration policy; the
    default is the relevance order without exploration, where only the top ``k`` of a two-stage list are
    scored. Otherwise the first ``strategy.pool`` candidates of a two-stage list (the list's own order), or
    the ``pool`` best by the objective of every scored candidate for other users, are what the policy
    chooses from. ``arm``: the A/B arm the request was assigned to (None: no A/B), reported as is.
    """

    def __init__(self, rec, user_idx: int, k: int, context: dict | None, n_candidates: int, explain: bool = False,
                 strategy: Strategy | None = None, arm: str | None = None, request_id: str | None = None):
        self.rec, self.user_idx, self.k, self.explain = rec, user_idx, k, explain
        self.strategy = strategy or Strategy()
        self.arm = arm
        self.request_id = request_id or new_request_id()
        self.cand = rec.candidates(user_idx, max(n_candidates, k), context)
        self.two_stage = self.cand.final is not None
        self.ranked_by = RANKED_BY[self.strategy.objective] or (TWO_STAGE if self.two_stage else CLICK_PROB)
        self.click_probs = np.full(len(self.cand.items), np.nan, np.float32)
        self.propensities = np.ones(0)
        # Positions of the items to score: known now for a two-stage list (its top k, or its first `pool`
        # for a strategy); None: every candidate (the click probability orders them).
        n = len(self.cand.items)
        self.scored = None if not self.two_stage else \
            np.arange(min(k if self.strategy.plain else max(self.strategy.pool, k), n))
        # Positions of the chosen items, best first. For a plain two-stage list: its top k, whose order is
        # the list's own (by re-ranker score, or its exposure-aware re-ranking: adrec.topk.exposure).
        self.order = self.scored if self.two_stage and self.strategy.plain else None

    @property
    def to_score(self) -> np.ndarray:
        """The items whose click probability the answer needs."""
        return self.cand.items if self.scored is None else self.cand.items[self.scored]

    def _set_ranked(self, ranked) -> None:
        if isinstance(ranked, tuple):
            self.set_click_probs(*ranked)
        else:
            self.set_click_probs(ranked)

    def set_click_probs(self, probs: np.ndarray, ctcvr: np.ndarray | None = None) -> None:
        """The ranker's click probabilities of :attr:`to_score` (and its pCTCVR, when it gives one: the hook
        of expected_value's bid x pCTCVR); chooses the list."""
        probs = np.asarray(probs, np.float32)
        ct = None if ctcvr is None else np.asarray(ctcvr, np.float64)  # aligned with to_score, as probs
        s = self.strategy
        if self.scored is None:
            self.click_probs = probs
            if s.plain:
                self.order = top_order(self.cand.items, probs, self.k)
                self.propensities = np.ones(len(self.order))
                return
            values = objective_values(s.objective, probs, self._bids(np.arange(len(probs))), ct)
            pool = greedy_order(self.cand.items, values, max(s.pool, self.k))
            ct = None if ct is None else ct[pool]
        else:
            self.click_probs[self.scored] = probs
            if s.plain:
                self.propensities = np.ones(len(self.order))
                return
            pool = self.scored
        sel = s.choose(self.cand.items[pool], self.click_probs[pool], self._bids(pool), self.k,
                       request_rng(self.request_id), list_order=self.scored is not None, ctcvr=ct)
        self.order, self.propensities = pool[sel.order], sel.propensities

    def _bids(self, positions: np.ndarray) -> np.ndarray | None:
        bids = getattr(self.rec, "bids", None)
        return None if bids is None else bids[self.cand.items[positions]]

    @property
    def chosen(self) -> np.ndarray:
        """The answer's items (indices), best first."""
        return self.cand.items[self.order] if self.order is not None else np.empty(0, np.int64)

    def run(self, rank: Callable[[np.ndarray], np.ndarray | tuple],
            explain_fn: Callable[[np.ndarray], dict] | None = None) -> dict:
        """``rank(items)``: their pCTR, or ``(pCTR, pCTCVR or None)`` from a ranker with the ESMM head."""
        if len(self.to_score):
            self._set_ranked(rank(self.to_score))
        return self.answer(explain_fn(self.chosen) if self.explain and len(self.chosen) else None)

    async def run_async(self, rank: Callable[[np.ndarray], Awaitable[np.ndarray]],
                        explain_fn: Callable[[np.ndarray], Awaitable[dict]] | None = None) -> dict:
        if len(self.to_score):
            self._set_ranked(await rank(self.to_score))
        return self.answer(await explain_fn(self.chosen) if self.explain and len(self.chosen) else None)

    def answer(self, explained: dict | None = None) -> dict:
        """``{"version", "ranked_by", "items"}`` (and ``explain_complete`` with explain), the items as
        :class:`~adrec.serving.responses.RecommendedItem`. ``explained``: the ranker's explanations of the
        chosen items (:func:`adrec.serving.explanations.explain_items`); the sources and the ALS part of
        "because you liked" come from this side, which holds the candidates."""
        items = []
        out = {"version": self.rec.version_id, "ranked_by": self.ranked_by, "objective": self.strategy.objective,
               "policy": self.strategy.policy.name, "request_id": self.request_id, "arm": self.arm}
        if self.order is not None:
            cand = self.cand
            bids = self._bids(self.order)
            sources = [cand.sources[j] if cand.sources else [] for j in self.order]
            per_item = (explained or {}).get("items") or [{} for _ in self.order]
            als = self.rec.als_because(self.user_idx, cand.items[self.order], sources) if self.explain else None
            for rank, (j, item) in enumerate(zip(self.order, self.rec.item_ids(cand.items[self.order])), start=1):
                rec = {"item": item, "rank": rank, "click_prob": float(self.click_probs[j]),
                       "relevance": float(cand.final[j]) if self.ranked_by == TWO_STAGE else None,
                       "position": rank - 1, "propensity": float(self.propensities[rank - 1]),
                       "bid": None if bids is None else float(bids[rank - 1])}
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
