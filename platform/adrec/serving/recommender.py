"""Candidate-then-rank recommendation over one model version, as a plain Python object.

For a user the version's two-stage top-K recommender knows (``topk/``, fitted by the candidates
stage), :meth:`Recommender.candidates` returns its candidate union already ordered by the learned
re-ranker (``Candidates.final``), and that order is the final one; the CTR ranker's click
probability is reported next to it and ``explain`` explains it (:mod:`adrec.serving.explanations`). Users it does not know (new,
or added online by fold-in) take the merged sources, ordered by the CTR ranker.

The Serve deployments run the request algorithm (:class:`~adrec.serving.request.Recommendation`)
over the two halves (:meth:`Recommender.candidates` and :meth:`Recommender.rank`); :meth:`recommend`
runs the same algorithm in-process, so what is measured offline is what is served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from adrec.config import CandidateConfig, ServeConfig
from adrec.errors import ConfigError
from adrec.data.ids import normalize_id
from adrec.data.ingest import BID
from adrec.data.privacy import pseudonymize
from adrec.model_version import ModelVersion, TwoStageLists, load_version
from adrec.serving.explanations import explain_items
from adrec.serving.request import Recommendation
from adrec.serving.scoring import predict_scores
from adrec.serving.strategy import EXPECTED_VALUE, Strategy

log = logging.getLogger(__name__)


@dataclass
class Candidates:
    items: np.ndarray  # item indices, best first
    sources: list[list[str]] = field(default_factory=list)  # per item, the sources that proposed it
    # Per item, the two-stage re-ranker's score when it ordered the list (then the final order), else None.
    final: np.ndarray | None = None


class Recommender:
    """Request logic over a loaded :class:`~adrec.model_version.ModelVersion` (``version``).

    ``model`` is a version folder (loaded with ``load_ranker`` / ``load_topk``, see
    :class:`~adrec.model_version.ModelVersion`) or an already loaded version. ``ranker`` is what
    scores (the version's ranker, unless replaced).
    """

    def __init__(self, model: str | Path | ModelVersion, pseudonym_key: bytes | None = None, load_ranker: bool = True,
                 load_topk: bool = True):
        self.version = model if isinstance(model, ModelVersion) else load_version(model, load_ranker, load_topk)
        self.ranker = self.version.ranker
        self.key = pseudonym_key
        self._reverse_vocabs: dict[str, dict[int, str]] = {}
        self.lists: TwoStageLists | None = None  # known users' two-stage lists at hand (precompute_lists)
        # Per item index its bid (schema items.bid), or None when the version's items carry none.
        items = self.version.items
        self.bids = items[BID].to_numpy(np.float64) if BID in items else None
        # Per item index its id as text, once per version (a pandas column read per request cost ~1 ms).
        self._item_ids = items["item"].to_numpy().astype(str)

    def precompute_lists(self, n: int, max_users: int) -> bool:
        """Have the two-stage list (``n`` items) of every known user at hand, so that :meth:`candidates`
        only looks it up (stored in the version by its writer, or computed here: see
        :meth:`ModelVersion.lists`). False when the version has no two-stage model or more than
        ``max_users`` users."""
        self.lists = self.version.lists(n, max_users)
        return self.lists is not None

    # ---- ids ----------------------------------------------------------------------------------
    @property
    def version_id(self) -> str:
        return self.version.version_id

    def user_index(self, raw_user_id: str) -> int:
        """Index of a raw user id (pseudonymized with the key), or -1 for a user the model never saw."""
        if self.key is None:
            raise ValueError("this Recommender has no pseudonymization key; it cannot look up raw user ids")
        return self.pseudonym_index(pseudonymize(normalize_id(raw_user_id), self.key))

    def pseudonym_index(self, pseudonym: str) -> int:
        """Index of an already pseudonymized user id (what the Serve graph passes around), or -1."""
        return self.version.user_pos.get(pseudonym, -1)

    def item_ids(self, idx: np.ndarray) -> list[str]:
        return self._item_ids[idx].tolist()

    def _context_code(self, context: dict | None) -> int | None:
        field_name = self.version.context_field
        if not context or not field_name:
            return None
        name = field_name.removeprefix("ctx.")
        if name not in context:
            return None
        # The vocabulary lookup encode_categorical does, for one value (a pandas Series per request cost ~1 ms).
        return int(self.version.spec.vocabs[field_name].get(str(context[name]), 0))

    # ---- the two halves -----------------------------------------------------------------------
    def candidates(self, user_idx: int, n: int, context: dict | None = None, extra_seen: list[int] | None = None) -> Candidates:
        v = self.version
        code = self._context_code(context)
        if user_idx < 0 or user_idx >= v.seen.shape[0]:
            if v.popularity is None:
                return Candidates(np.empty(0, np.int64), [])
            seen = np.asarray(extra_seen or [], dtype=np.int64)
            ids, _ = v.popularity.recommend_for_items([seen], n, None, context=code) if code is not None \
                else v.popularity.recommend_for_items([seen], n, None)
            ids = ids[0][ids[0] >= 0]
            return Candidates(ids, [["popularity"]] * len(ids))
        if v.two_stage is not None and user_idx < v.two_stage.n_users:
            if self.lists is not None and n <= self.lists.length:
                return Candidates(*self.lists.lookup(user_idx, n))
            ids, scores, sources = v.two_stage.rank_lists([user_idx], n, exclude=v.seen, with_sources=True)
            keep = ids[0] >= 0
            return Candidates(ids[0][keep], sources[0], scores[0][keep])
        ids, _, sources = v.sources.recommend(np.array([user_idx]), n, v.seen[user_idx], context=code)
        keep = ids[0] >= 0
        return Candidates(ids[0][keep], [s for s, k in zip(sources[0], keep) if k])

    def rank(self, user_idx: int, item_idx: np.ndarray, context: dict | None = None,
             hist: np.ndarray | None = None) -> np.ndarray:
        """The click probabilities of ``item_idx`` for one user."""
        if len(item_idx) == 0:
            return np.empty(0, np.float32)
        users = np.full(len(item_idx), user_idx, dtype=np.int64)
        h = None if hist is None else [np.asarray(hist, np.int64)] * len(item_idx)
        return np.asarray(self.ranker.predict(self.version.rows(users, item_idx, context, h)), dtype=np.float32)

    def rank_values(self, user_idx: int, item_idx: np.ndarray, context: dict | None = None) -> tuple:
        """:meth:`rank`, with pCTCVR beside it when the ranker has the ESMM head (else None)."""
        if len(item_idx) == 0:
            return np.empty(0, np.float32), None
        users = np.full(len(item_idx), user_idx, dtype=np.int64)
        return predict_scores(self.ranker, self.version.rows(users, item_idx, context))

    # ---- the whole path, in-process -----------------------------------------------------------
    def recommend(self, raw_user_id: str, k: int, context: dict | None = None, n_candidates: int | None = None,
                  explain: bool = False) -> list[dict]:
        """The items ``/recommend`` answers for a raw user id (``n_candidates``: the candidates stage's count
        by default; the explanations' bounds: :class:`~adrec.config.ServeConfig`'s defaults)."""
        return self.recommend_index(self.user_index(raw_user_id), k, context, n_candidates, explain)

    def recommend_index(self, u: int, k: int, context: dict | None = None, n_candidates: int | None = None,
                        explain: bool = False, strategy: Strategy | None = None) -> list[dict]:
        """:meth:`recommend` for a user index (-1: a user the version does not know); ``strategy``: the
        objective and exploration policy (default: relevance, none)."""
        return self.answer_index(u, k, context, n_candidates, explain, strategy)["items"]

    def answer_index(self, u: int, k: int, context: dict | None = None, n_candidates: int | None = None,
                     explain: bool = False, strategy: Strategy | None = None, request_id: str | None = None) -> dict:
        """The whole answer of :meth:`recommend_index` (objective, policy, request_id and items)."""
        n = CandidateConfig().n_candidates if n_candidates is None else n_candidates
        req = Recommendation(self, u, k, context, n, explain, strategy, request_id=request_id)
        return req.run(lambda items: self.rank_values(u, items, context), lambda items: self.explain(u, items, context))

    def check_objective(self, objective: str) -> None:
        """A :class:`ConfigError` when ``objective`` needs what the version lacks (bids for expected_value)."""
        if objective == EXPECTED_VALUE and self.bids is None:
            raise ConfigError(f"serve.objective=expected_value needs item bids, and model version {self.version_id} "
                              "has none: name the bid column in the schema YAML's items table (bid: COLUMN), "
                              "prepare and train again, or serve another objective")

    def explain(self, user_idx: int, item_idx: np.ndarray, context: dict | None = None,
                budget_ms: float | None = None, max_items: int | None = None) -> dict:
        """The ranker's explanations of ``item_idx`` for one user: attention over the history and the top
        attributions by field, within ``budget_ms`` (:func:`adrec.serving.explanations.explain_items`)."""
        d = ServeConfig()
        return explain_items(self, user_idx, item_idx, context,
                             (d.explain_budget_ms if budget_ms is None else budget_ms) / 1e3,
                             d.explain_max_items if max_items is None else max_items)

    def als_because(self, user_idx: int, item_idx: np.ndarray, sources: list[list[str]], top_n: int = 3) -> list[list[dict]]:
        """Per item the ALS source proposed: the user's liked items that contribute most to its ALS score
        (implicit's ``explain()``); [] for other items and for users the two-stage model does not know."""
        ts = self.version.two_stage
        als = None if ts is None else ts.sources.get("als")
        out: list[list[dict]] = [[] for _ in item_idx]
        if als is None or not 0 <= user_idx < ts.n_users or not hasattr(als, "explain"):
            return out
        liked = ts.index.positives[user_idx]
        todo = [j for j, src in enumerate(sources) if "als" in src]
        if not todo or liked.nnz == 0:
            return out
        for j, contrib in zip(todo, als.explain(liked, [int(item_idx[j]) for j in todo], top_n)):
            names = self.item_ids(np.array([i for i, _, _ in contrib], np.int64)) if contrib else []
            # weight: the signed share of the ALS score (a raw contribution is often < 1e-3 and read as 0.000)
            out[j] = [{"item": nm, "weight": round(share, 6), "contribution": float(c), "method": "als"}
                      for nm, (_, c, share) in zip(names, contrib)]
        return out

    def feature_value(self, name: str, row: pd.DataFrame) -> str | None:
        """The readable value behind a field code of a one-row frame (item and context vocabularies only:
        no user data)."""
        vocabs = self.version.spec.vocabs
        if not (name.startswith("item.") or name.startswith("ctx.")) or name not in vocabs or f"f:{name}" not in row:
            return None
        code = int(row[f"f:{name}"].iloc[0])
        if code == 0:
            return None
        rev = self._reverse_vocabs.get(name)
        if rev is None:
            rev = self._reverse_vocabs[name] = {v: k for k, v in vocabs[name].items()}
        return rev.get(code)
