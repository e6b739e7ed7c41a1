"""Candidate-then-rank recommendation over one model version, as a plain Python object.

For a user the version's two-stage top-K recommender knows (``topk/``, fitted by the candidates
stage), :meth:`Recommender.candidates` returns its candidate union already ordered by the learned
re-ranker (``Candidates.final``), and that order is the final one; the CTR ranker's click
probability is reported next to it (``click_prob``) and drives ``explain``'s features. Users it does
not know (new, or added online by fold-in) take the merged sources, ordered by the CTR ranker.

The Serve deployments wrap the two halves (:meth:`Recommender.candidates` and
:meth:`Recommender.rank`); the evaluation stage and the serving benchmark call the same code
in-process, so what is measured offline is what is served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from adrec.candidates.merge import MultiSource
from adrec.candidates.popularity import PopularitySource
from adrec.data.privacy import pseudonymize
from adrec.features.pipeline import entity_codes
from adrec.features.spec import FeatureSpec
from adrec.model_version import read_version

log = logging.getLogger(__name__)

#: The two-stage lists of a version's known users, stored in its folder by its publisher (store_lists).
LISTS_FILE = "lists.npz"


@dataclass
class Candidates:
    items: np.ndarray  # item indices, best first
    sources: list[list[str]] = field(default_factory=list)  # per item, the sources that proposed it
    # Per item, the two-stage re-ranker's score when it ordered the list (then the final order), else None.
    final: np.ndarray | None = None


class Recommender:
    def __init__(self, model_dir: str | Path, pseudonym_key: bytes | None = None, load_ranker: bool = True,
                 load_topk: bool = True):
        """``load_topk=False`` skips the two-stage recommender (about 80 MB and 0.5 s on MovieLens-100k):
        for a process that only scores with the CTR ranker (the graph's ranker replicas)."""
        from adrec.ranking.base import load_ranker as _load_ranker

        self.model_dir = Path(model_dir)
        self.version = read_version(self.model_dir)
        fdir = self.model_dir / "features"
        self.spec = FeatureSpec.load(fdir / "spec.json")
        self.items = pd.read_parquet(fdir / "items.parquet")
        users = pd.read_parquet(fdir / "users.parquet")
        self.item_codes = entity_codes(self.items)
        self.user_codes = entity_codes(users)
        self.user_pos = {u: i for i, u in enumerate(users["user"].tolist())}
        self.item_pos = {str(it): i for i, it in enumerate(self.items["item"].tolist())}
        hist = pd.read_parquet(self.model_dir / "history.parquet")
        self.history = [np.asarray(h, dtype=np.int64) for h in hist["hist"]]
        self.seen = sp.load_npz(self.model_dir / "seen.npz").tocsr()
        self.sources = MultiSource.load(self.model_dir / "candidates")
        self.popularity = next((s for s in self.sources.sources.values() if isinstance(s, PopularitySource)), None)
        self.context_field = self.version.get("context_field")
        self.key = pseudonym_key
        self._reverse_vocabs: dict[str, dict[int, str]] = {}
        self.ranker = _load_ranker(self.model_dir / "ranker") if load_ranker else None
        self.two_stage = None
        if load_topk and (self.model_dir / "topk").is_dir():
            from adrec.topk import TwoStageRecommender

            self.two_stage = TwoStageRecommender.load(self.model_dir / "topk")
        # Known users' two-stage lists computed once for the version (see precompute_lists).
        # (ids, re-ranker scores, source bit masks, mask -> source names)
        self._lists: tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, list[str]]] | None = None

    def precompute_lists(self, n: int, max_users: int, batch_users: int = 2048) -> bool:
        """Have the two-stage list (``n`` items) of every known user at hand, so that :meth:`candidates`
        only looks it up.

        A list depends on the version alone (the sources, the re-ranker and the seen matrix are fixed
        per version), so this is the same answer, paid for once instead of ~4 ms of CPU per request:
        read from the version folder when its publisher stored them (:func:`store_lists`, at least
        ``n`` long), computed here otherwise. Sources are kept as a bit mask per item (a few bytes, not
        Python lists). Skipped (False) when the version has no two-stage model or more than
        ``max_users`` users.
        """
        ts = self.two_stage
        if ts is None or n <= 0 or ts.n_users > max_users:
            return False
        if self._read_lists(n):
            log.info("two-stage lists of %d known users read from the version (%d items each)", ts.n_users, n)
            return True
        names = self._list_sources()
        bit = {nm: 1 << j for j, nm in enumerate(names)}
        ids = np.full((ts.n_users, n), -1, np.int64)
        scores = np.full((ts.n_users, n), np.nan, np.float64)
        masks = np.zeros((ts.n_users, n), np.int64)
        for start in range(0, ts.n_users, batch_users):
            users = np.arange(start, min(start + batch_users, ts.n_users))
            i, s, src = ts.rank_lists(users, n, exclude=self.seen, with_sources=True)
            ids[users], scores[users] = i, s
            for row, per_user in zip(users, src):
                masks[row, :len(per_user)] = [sum(bit[x] for x in per_item) for per_item in per_user]
        self._set_lists(ids, scores, masks, names)
        log.info("two-stage lists of %d known users precomputed (%d items each)", ts.n_users, n)
        return True

    def _list_sources(self) -> list[str]:
        """The source names a list's bit masks stand for, bit j for name j."""
        return list(self.two_stage.sources) + ["catalog"]

    def _set_lists(self, ids: np.ndarray, scores: np.ndarray, masks: np.ndarray, names: list[str]) -> None:
        bit = {nm: 1 << j for j, nm in enumerate(names)}
        decode = {int(m): [nm for nm in names if m & bit[nm]] for m in np.unique(masks)}
        self._lists = (ids, scores, masks, decode)

    def _read_lists(self, n: int) -> bool:
        path = self.model_dir / LISTS_FILE
        if not path.is_file():
            return False
        with np.load(path) as z:
            names = [str(x) for x in z["names"]]
            n_users, stored = z["ids"].shape
            if n_users != self.two_stage.n_users or stored < n or names != self._list_sources():
                return False
            self._set_lists(z["ids"][:, :n].astype(np.int64), z["scores"][:, :n], z["masks"][:, :n].astype(np.int64),
                            names)
        return True

    def save_lists(self, path: str | Path) -> None:
        """Write the precomputed lists (see :meth:`precompute_lists`) to ``path`` (an ``.npz``)."""
        ids, scores, masks, _ = self._lists
        np.savez(path, ids=ids.astype(np.int32), scores=scores, masks=masks.astype(np.int32),
                 names=np.array(self._list_sources()))

    # ---- ids ----------------------------------------------------------------------------------
    @property
    def version_id(self) -> str:
        return str(self.version["version"])

    def user_index(self, raw_user_id: str) -> int:
        """Index of a raw user id (pseudonymized with the key), or -1 for a user the model never saw."""
        if self.key is None:
            raise ValueError("this Recommender has no pseudonymization key; it cannot look up raw user ids")
        return self.pseudonym_index(pseudonymize(str(raw_user_id), self.key))

    def pseudonym_index(self, pseudonym: str) -> int:
        """Index of an already pseudonymized user id (what the Serve graph passes around), or -1."""
        return self.user_pos.get(pseudonym, -1)

    def item_ids(self, idx: np.ndarray) -> list[str]:
        return self.items["item"].to_numpy()[idx].astype(str).tolist()

    def _context_code(self, context: dict | None) -> int | None:
        if not context or not self.context_field:
            return None
        name = self.context_field.removeprefix("ctx.")
        if name not in context:
            return None
        return int(self.spec.encode_categorical(self.context_field, pd.Series([str(context[name])]))[0])

    # ---- the two halves -----------------------------------------------------------------------
    def candidates(self, user_idx: int, n: int, context: dict | None = None, extra_seen: list[int] | None = None) -> Candidates:
        code = self._context_code(context)
        if user_idx < 0 or user_idx >= self.seen.shape[0]:
            if self.popularity is None:
                return Candidates(np.empty(0, np.int64), [])
            seen = np.asarray(extra_seen or [], dtype=np.int64)
            ids, _ = self.popularity.recommend_for_items([seen], n, None, context=code) if code is not None \
                else self.popularity.recommend_for_items([seen], n, None)
            ids = ids[0][ids[0] >= 0]
            return Candidates(ids, [["popularity"]] * len(ids))
        if self.two_stage is not None and user_idx < self.two_stage.n_users:
            if self._lists is not None and n <= self._lists[0].shape[1]:
                ids, scores, masks, decode = self._lists
                row = ids[user_idx, :n]
                keep = row >= 0
                return Candidates(row[keep], [decode[int(m)] for m in masks[user_idx, :n][keep]], scores[user_idx, :n][keep])
            ids, scores, sources = self.two_stage.rank_lists([user_idx], n, exclude=self.seen, with_sources=True)
            keep = ids[0] >= 0
            return Candidates(ids[0][keep], sources[0], scores[0][keep])
        ids, _, sources = self.sources.recommend(np.array([user_idx]), n, self.seen[user_idx], context=code)
        keep = ids[0] >= 0
        return Candidates(ids[0][keep], [s for s, k in zip(sources[0], keep) if k])

    def rows(self, user_idx: np.ndarray, item_idx: np.ndarray, context: dict | None = None,
             hist: list[np.ndarray] | None = None) -> pd.DataFrame:
        """Ranker input rows, encoded with the version's feature spec (the training encoding)."""
        # Serving calls this once per request with ~10-100 rows: pandas' per-call overhead is the cost,
        # so one frame construction and in-place inserts instead of column assignments and a concat.
        u = np.asarray(user_idx, dtype=np.int64)
        it = np.asarray(item_idx, dtype=np.int64)
        cols: dict[str, np.ndarray] = {"user_idx": u, "item_idx": it}
        for c in self.spec.context:
            cols[c] = np.full(len(it), str((context or {}).get(c.removeprefix("ctx."), "")), dtype=object)
        out = self.spec.encode_rows(pd.DataFrame(cols), self.user_codes, self.item_codes)
        out.insert(0, "item_idx", it)
        out.insert(0, "user_idx", u)
        if hist is None:
            empty = np.empty(0, np.int64)
            n_hist = len(self.history)
            hist = [self.history[x] if 0 <= x < n_hist else empty for x in u.tolist()]
        out["hist"] = hist
        return out

    def rank(self, user_idx: int, item_idx: np.ndarray, context: dict | None = None,
             hist: np.ndarray | None = None) -> np.ndarray:
        if len(item_idx) == 0:
            return np.empty(0, np.float32)
        users = np.full(len(item_idx), user_idx, dtype=np.int64)
        h = None if hist is None else [np.asarray(hist, np.int64)] * len(item_idx)
        return np.asarray(self.ranker.predict(self.rows(users, item_idx, context, h)), dtype=np.float32)

    # ---- the whole path -----------------------------------------------------------------------
    def recommend(self, raw_user_id: str, k: int, context: dict | None = None, n_candidates: int = 100,
                  explain: bool = False) -> list[dict]:
        u = self.user_index(raw_user_id)
        cand = self.candidates(u, max(n_candidates, k), context)
        if cand.final is not None:  # the order is already final: click probabilities for the top k only
            scores = np.full(len(cand.items), np.nan, np.float32)
            top = self.top_order(cand, scores, k)
            scores[top] = self.rank(u, cand.items[top], context)
        else:
            scores = self.rank(u, cand.items, context)
        out = self.top(cand, scores, k, explain)
        if explain and out:
            feats = self.explain(u, cand.items[self.top_order(cand, scores, k)], context)
            for rec, f in zip(out, feats):
                rec["features"] = f
        return out

    def explain(self, user_idx: int, item_idx: np.ndarray, context: dict | None = None, top_n: int = 3) -> list[list[dict]]:
        """Per item, the ``top_n`` features that raise its score most (occlusion).

        Each feature field (and the user's history) is replaced in turn by "unknown" and the item
        re-scored; a feature's contribution is the drop in the click probability. One ``predict`` call
        covers every variant, so this costs (fields + 2) x len(item_idx) rows of the cached ranker.
        """
        item_idx = np.asarray(item_idx, dtype=np.int64)
        n = len(item_idx)
        if n == 0:
            return []
        base = self.rows(np.full(n, user_idx, dtype=np.int64), item_idx, context)
        fcols = [c for c in base.columns if c.startswith("f:")]
        variants = [base]
        names = []
        for c in fcols:
            variants.append(base.assign(**{c: 0}))
            names.append(c[2:])
        no_hist = base.copy()
        no_hist["hist"] = [np.empty(0, np.int64)] * n
        variants.append(no_hist)
        names.append("history")
        probs = np.asarray(self.ranker.predict(pd.concat(variants, ignore_index=True)), dtype=np.float64).reshape(-1, n)
        delta = probs[0][None, :] - probs[1:]  # (variants, items)
        out = []
        for j in range(n):
            order = np.argsort(-delta[:, j], kind="stable")[:top_n]
            feats = []
            for v in order:
                rec = {"feature": names[v], "contribution": round(float(delta[v, j]), 6)}
                value = self._feature_value(names[v], base, j)
                if value is not None:
                    rec["value"] = value
                feats.append(rec)
            out.append(feats)
        return out

    def _feature_value(self, name: str, rows: pd.DataFrame, j: int) -> str | None:
        """The readable value behind a field code (item and context vocabularies only: no user data)."""
        if not (name.startswith("item.") or name.startswith("ctx.")) or name not in self.spec.vocabs:
            return None
        code = int(rows[f"f:{name}"].iloc[j])
        if code == 0:
            return None
        rev = self._reverse_vocabs.get(name)
        if rev is None:
            rev = self._reverse_vocabs[name] = {v: k for k, v in self.spec.vocabs[name].items()}
        return rev.get(code)

    def top(self, cand: Candidates, scores: np.ndarray, k: int, explain: bool = False) -> list[dict]:
        # Ties go to the lower item index, as in the offline protocol.
        order = self.top_order(cand, scores, k)
        ids = self.item_ids(cand.items[order])
        out = []
        for rank, (j, item) in enumerate(zip(order, ids), start=1):
            if cand.final is None:
                rec = {"item": item, "score": float(scores[j]), "rank": rank}
            else:  # the re-ranker's score squashed into (0, 1) (monotone: the order is unchanged)
                rec = {"item": item, "score": float(1.0 / (1.0 + np.exp(-cand.final[j]))), "rank": rank,
                       "click_prob": float(scores[j])}
            if explain:
                rec["sources"] = cand.sources[j] if cand.sources else []
            out.append(rec)
        return out

    @staticmethod
    def top_order(cand: Candidates, scores: np.ndarray, k: int) -> np.ndarray:
        """Positions in ``cand`` of the best ``k`` (score descending, ties to the lower item index);
        the score is the two-stage re-ranker's when it ordered the candidates, else ``scores``."""
        return np.lexsort((cand.items, -np.asarray(scores if cand.final is None else cand.final)))[:k]


def store_lists(model_dir: str | Path) -> bool:
    """Compute the two-stage lists of a version's known users once and store them in its folder, at the
    length and user bound Serve uses by default, so that every replica that loads the version reads
    them instead of computing them (measured: 2.7 s on MovieLens-100k, 3.1 s on the 2,000-user online
    benchmark, of a serving replica's CPU per version). False (nothing written) when there is nothing to store.
    """
    from adrec.config import ServeConfig

    serve_cfg = ServeConfig()
    rec = Recommender(model_dir, None, load_ranker=False)
    if not rec.precompute_lists(max(serve_cfg.n_candidates, serve_cfg.max_k), serve_cfg.precompute_max_users):
        return False
    rec.save_lists(Path(model_dir) / LISTS_FILE)
    return True
