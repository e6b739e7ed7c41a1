"""The two-stage top-K recommender: the union of several candidate sources (:mod:`.union`), then a
learned re-ranker (:mod:`.gbdt`) over per-candidate features (:mod:`.features`).

Training follows the evaluation protocol (docs/design.md): sources are fitted on the train split
only and the re-ranker learns to put the *valid* positives first among their candidates (optionally
also on an "inner" stage carved from train by the same tail rule); then the sources are refitted on
train + valid and the re-ranker is applied as is. Test rows are never read.

Every feature at a user's prediction time is computed from the known interactions (all labels) of
that stage and the user's cutoff = time of their last known interaction.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import ValidationError

from adrec.candidates.base import CandidateSource, load_source, pack_csr, unpack_csr
from adrec.config import TopKConfig, TopKSourceConfig

from .data import TopKData
from .exposure import exposure_rerank
from .features import ExtraScore, candidate_features
from .gbdt import load_ranker, predict, resolve_ranker, save_ranker, train_ranker
from .known import KnownIndex
from .lm import LM_DIR, LMScorer, stage_ranker_config
from .protocol import Stage, inner_stage, make_stage
from .union import fit_sources

logger = logging.getLogger(__name__)

__all__ = ["TwoStageRecommender", "default_params"]

FORMAT = "adrec.topk.two_stage"
FORMAT_VERSION = 1
TRAIN_STAGES = ("valid", "inner")
#: The re-ranker's training labels: "positives" (1 = a target positive, else 0) or "graded" (2 = a target
#: positive, 1 = a target interaction with label 0: the user chose the item but did not like it, 0 = neither).
RELEVANCE = ("positives", "graded")
_KNOWN_COLUMNS = ("user_idx", "item_idx", "ts", "label")


def default_params() -> dict[str, Any]:
    """The recommender's defaults: those of :class:`adrec.config.TopKConfig`, the one place they live."""
    return TopKConfig().recommender_kwargs()


def _source_specs(sources: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each spec validated by :class:`adrec.config.TopKSourceConfig`, with its defaults filled in."""
    out = {}
    for name, spec in sources.items():
        try:
            out[name] = TopKSourceConfig.from_spec(dict(spec)).spec()
        except ValidationError as e:
            raise ValueError(f"source {name!r}: {e}") from None
    return out


class TwoStageRecommender:
    """Candidate union + learned re-ranker for top-K lists under the evaluation protocol.

    Every argument left as None takes :func:`default_params` (the ``topk`` config section's defaults).

    - ``sources``: name -> spec (see :class:`adrec.config.TopKSourceConfig`); each source's top ``n``
      join the union, and every source's score and rank are features of every candidate.
    - ``train_stages``: where the re-ranker's examples come from: "valid" (sources fitted on
      train, labels = valid positives) and "inner" (the same one step earlier, carved from train
      by the split's tail rule). Both by default: on MovieLens-100k halving the examples cost
      about 0.01 NDCG@10 on the dev protocol.
    - ``last_n``: the "user's most recent items" windows (cosine with the last N positives,
      transitions from the last N interactions); ``windows_days``: recent-popularity windows
      ending at the user's cutoff; ``transition_span``: how many later interactions count as
      "next"; ``next_candidates``: also add the top N items by transition score to the union
      (0 = off; it raised candidate recall but not NDCG@10 on the dev protocol).
    - ``rank_depth``: source ranks beyond it are reported as ``rank_depth + 1``.
    - ``ranker``: "lightgbm", "sklearn" or "auto" (LightGBM when importable, else scikit-learn's
      HistGradientBoostingClassifier); ``ranker_params`` override
      :data:`~adrec.topk.gbdt.LGBM_DEFAULTS` / :data:`~adrec.topk.gbdt.SKLEARN_DEFAULTS`
      (e.g. ``{"objective": "lambdarank"}``); ``relevance``: its training labels (:data:`RELEVANCE`;
      "graded" also gives a grade to the target items the user interacted with but did not like).
    - ``extra_scores``: name -> :data:`~adrec.topk.features.ExtraScore`, extra features such as a CTR
      ranker's probability. The callable receives the stage's known interactions (the train split
      while the re-ranker learns, train + valid afterwards); a model behind it must not have seen the
      valid split's labels, or the re-ranker learns to trust a leaked feature. Not saved: pass
      them again to :meth:`load`.

    - ``ranker_features``: the language-model ranker inside the order (:mod:`.lm`): its calibrated click
      probability and the candidate's text similarity to the user's last ``ranker_features_last_n``
      positives as features, each stage's from a fusion ranker fitted on that stage's known rows only
      (``lm_config``: the ``ranker`` section it starts from, ``ranker_features_params`` its overrides; see
      :func:`~adrec.topk.lm.stage_ranker_config`); ``lm_cache``: a folder keeping fitted stage rankers.
      Needs the prepared rows (:attr:`TopKData.features`). Saved with the recommender (``lm/``).

    - ``exposure_weight``: w of the exposure-aware re-ranking of every list (:mod:`.exposure`; 0 = off),
      over the best ``exposure_pool`` candidates by re-ranker score; needs item providers (the data's
      ``item.advertiser``, else primary ``item.genre``), without them the lists are not re-ranked.

    Serving: :meth:`save` writes a self-contained folder; :meth:`load` + :meth:`recommend` answer
    for users known at fit time (index ``0..n_users-1``).
    """

    def __init__(
        self,
        sources: Mapping[str, Mapping[str, Any]] | None = None,
        train_stages: Sequence[str] | None = None,
        last_n: Sequence[int] | None = None,
        windows_days: Sequence[int] | None = None,
        transition_span: int | None = None,
        next_candidates: int | None = None,
        rank_depth: int | None = None,
        ranker: str | None = None,
        ranker_params: Mapping[str, Any] | None = None,
        extra_scores: Mapping[str, ExtraScore] | None = None,
        batch_users: int | None = None,
        seed: int | None = None,
        exposure_weight: float | None = None,
        exposure_pool: int | None = None,
        ranker_features: bool | None = None,
        ranker_features_params: Mapping[str, Any] | None = None,
        ranker_features_last_n: int | None = None,
        lm_config: Any = None,
        lm_cache: str | Path | None = None,
        relevance: str | None = None,
    ) -> None:
        given = {"sources": sources, "train_stages": train_stages, "last_n": last_n, "windows_days": windows_days,
                 "transition_span": transition_span, "next_candidates": next_candidates, "rank_depth": rank_depth,
                 "ranker": ranker, "ranker_params": ranker_params, "batch_users": batch_users, "seed": seed,
                 "exposure_weight": exposure_weight, "exposure_pool": exposure_pool,
                 "ranker_features": ranker_features, "ranker_features_params": ranker_features_params,
                 "ranker_features_last_n": ranker_features_last_n, "relevance": relevance}
        p = {**default_params(), **{k: v for k, v in given.items() if v is not None}}
        self.source_specs = _source_specs(p["sources"])
        bad = [s for s in p["train_stages"] if s not in TRAIN_STAGES]
        if bad or not p["train_stages"]:
            raise ValueError(f"train_stages must be a non-empty subset of {TRAIN_STAGES}, got {p['train_stages']!r}")
        self.train_stages = tuple(p["train_stages"])
        self.last_n = tuple(int(n) for n in p["last_n"])
        self.windows_days = tuple(int(w) for w in p["windows_days"])
        self.transition_span = int(p["transition_span"])
        self.next_candidates = int(p["next_candidates"])
        self.rank_depth = int(p["rank_depth"])
        self.ranker = resolve_ranker(p["ranker"])
        self.ranker_params = dict(p["ranker_params"])
        if p["relevance"] not in RELEVANCE:
            raise ValueError(f"relevance must be one of {RELEVANCE}, got {p['relevance']!r}")
        self.relevance = str(p["relevance"])
        self.extra_scores = dict(extra_scores or {})
        self.batch_users = int(p["batch_users"])
        self.seed = int(p["seed"])
        self.exposure_weight = float(p["exposure_weight"])
        self.exposure_pool = int(p["exposure_pool"])
        if not 0.0 <= self.exposure_weight <= 1.0 or self.exposure_pool < 1:
            raise ValueError(f"exposure_weight must be in [0, 1] and exposure_pool >= 1, got "
                             f"{self.exposure_weight!r}, {self.exposure_pool!r}")
        self.ranker_features = bool(p["ranker_features"])
        self.ranker_features_params = dict(p["ranker_features_params"])
        self.ranker_features_last_n = int(p["ranker_features_last_n"])
        self.lm_cache = lm_cache
        # the stage rankers' configuration, checked now (a bad key fails before anything is fitted)
        self.lm_config = (stage_ranker_config(lm_config, self.ranker_features_params) if self.ranker_features
                          else None)
        # fitted state
        self.lm: LMScorer | None = None  # the language-model features' ranker fitted on train + valid
        self.model: Any = None
        self.feature_names: list[str] | None = None
        self.sources: dict[str, CandidateSource] | None = None
        self.index: KnownIndex | None = None
        self.known: pd.DataFrame | None = None
        self.item_tags: sp.csr_matrix | None = None
        self.item_provider: np.ndarray | None = None  # per item index its provider's code (exposure re-ranking)
        self.n_users = self.n_items = self.n_catalog = None
        self.fit_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ fit
    def fit(self, data: Any, final_stage: str = "test") -> TwoStageRecommender:
        """Learn the re-ranker on the train-side stages, then refit the sources on train + valid.

        ``data``: :class:`~adrec.topk.data.TopKData` or :class:`adrec.features.pipeline.Features`.
        ``final_stage="valid"`` (model selection): the state it serves from is fitted on train only, to be
        scored on the valid positives; it then learns from the ``inner`` stage alone (``train_stages``
        must be ``("inner",)``, or the re-ranker would have read the valid labels).
        """
        if final_stage not in ("test", "valid"):
            raise ValueError(f"final_stage must be 'test' or 'valid', got {final_stage!r}")
        if final_stage == "valid" and tuple(self.train_stages) != ("inner",):
            raise ValueError("final_stage='valid' scores the valid split: train the re-ranker on the inner stage "
                             f"alone (train_stages=('inner',)), not {self.train_stages!r}")
        data = data if isinstance(data, TopKData) else TopKData.from_features(data)
        if self.ranker_features and data.features is None:
            raise ValueError("ranker_features needs the prepared rows the language-model ranker trains on: pass "
                             "TopKData.from_features(features) (or the Features), not bare interactions")
        self.n_users, self.n_items, self.n_catalog = data.n_users, data.n_items, data.n_catalog
        self.item_tags = data.item_tags
        self.item_provider = data.item_provider
        t0 = time.perf_counter()
        frames, labels, groups = [], [], []
        for name in self.train_stages:
            stage = (make_stage(data.interactions, data.n_users, data.n_items, data.n_catalog, "valid")
                     if name == "valid" else inner_stage(data.interactions, data.n_users, data.n_items, data.n_catalog))
            sources, index, lm = self._fit_state(stage.known, data.features)
            x, y, g = self._training_examples(stage, sources, index, lm)
            frames.append(x), labels.append(y), groups.append(g)
            logger.info("two-stage: %s stage: %d users, %d candidates, %d positives among them",
                        name, len(g), len(y), int((y == y.max()).sum()))
        x = pd.concat(frames, ignore_index=True)
        y = np.concatenate(labels)
        g = np.concatenate(groups)
        self.feature_names = list(x.columns)
        t1 = time.perf_counter()
        self.model = train_ranker(self.ranker, x, y, g, self.ranker_params, self.seed)
        t2 = time.perf_counter()
        final = make_stage(data.interactions, data.n_users, data.n_items, data.n_catalog, final_stage)
        self.known = final.known
        self.sources, self.index, self.lm = self._fit_state(final.known, data.features)
        self.fit_info = {"examples": int(len(y)), "positives": int((y == y.max()).sum()) if len(y) else 0, "groups": int(len(g)),
                         "features_s": round(t1 - t0, 3), "ranker_s": round(t2 - t1, 3),
                         "refit_s": round(time.perf_counter() - t2, 3), "ranker": self.ranker,
                         "final_stage": final_stage}
        if self.lm is not None:
            self.fit_info["lm_final"] = self.lm.info
        logger.info("two-stage: fitted %s on %d examples (%s)", self.ranker, len(y), self.fit_info)
        return self

    def _known_index(self, known: pd.DataFrame) -> KnownIndex:
        return KnownIndex.from_frame(known, self.n_users, self.n_items, self.item_tags, self.last_n,
                                     self.windows_days, self.transition_span)

    def _fit_state(self, known: pd.DataFrame, features: Any) -> tuple[dict[str, CandidateSource], KnownIndex,
                                                                       LMScorer | None]:
        """Everything a stage's features read, fitted on its known interactions only (``features``: the
        prepared rows the language-model ranker trains on)."""
        index = self._known_index(known)
        lm = (LMScorer.fit(known, features, self.lm_config, self.ranker_features_last_n, self.lm_cache)
              if self.ranker_features else None)
        return fit_sources(self.source_specs, index), index, lm

    def _training_examples(self, stage: Stage, sources, index, lm) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        users = stage.users
        n = np.int64(self.n_items)
        truth_codes = np.concatenate([u * n + t for u, t in zip(users, stage.truth)])
        target_codes = (stage.target["user_idx"].to_numpy(np.int64) * n + stage.target["item_idx"].to_numpy(np.int64)
                        if self.relevance == "graded" else None)
        xs, ys, ps, gs = [], [], [], []
        for start in range(0, len(users), self.batch_users):
            bu = users[start:start + self.batch_users]
            cu, ci, feats = self._features(bu, sources, index, stage.known, lm)
            codes = cu * n + ci
            pos = np.isin(codes, truth_codes)
            y = (pos.astype(np.float32) if target_codes is None
                 else np.where(pos, 2.0, np.isin(codes, target_codes).astype(np.float32)).astype(np.float32))
            xs.append(feats), ys.append(y), ps.append(pos)
            gs.append(np.bincount(np.searchsorted(bu, cu), minlength=len(bu)))
        g = np.concatenate(gs)
        x = pd.concat(xs, ignore_index=True)
        y = np.concatenate(ys)
        # users whose candidates hold no positive teach a ranker nothing: drop their rows
        has_pos = np.bincount(np.repeat(np.arange(len(g)), g), weights=np.concatenate(ps), minlength=len(g)) > 0
        keep_rows = np.repeat(has_pos, g)
        return x[keep_rows].reset_index(drop=True), y[keep_rows], g[has_pos]

    def _features(self, users: np.ndarray, sources, index: KnownIndex, known: pd.DataFrame, lm: LMScorer | None,
                  frame: bool = True) -> tuple[np.ndarray, np.ndarray, Any]:
        """:func:`~adrec.topk.features.candidate_features` with this recommender's settings (the one feature
        function of training, evaluation and serving)."""
        top_n = {name: spec["n"] for name, spec in self.source_specs.items()}
        return candidate_features(users, sources, top_n, index, known, self.n_catalog, self.rank_depth,
                                  self.next_candidates, self.extra_scores, frame=frame, lm=lm)

    # ------------------------------------------------------------------ recommend
    def _check_fitted(self) -> None:
        if self.model is None or self.sources is None:
            raise RuntimeError("TwoStageRecommender is not fitted; call fit() or load() first")

    def score_candidates(self, user_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(candidate users, candidate items, re-ranker scores), candidates of ``np.unique(user_idx)``
        grouped by user in ascending order (the re-ranker's view, before ranking)."""
        self._check_fitted()
        users = np.unique(np.asarray(user_idx, dtype=np.int64).reshape(-1))
        cu, ci, x = self._features(users, self.sources, self.index, self.known, self.lm, frame=False)
        return cu, ci, self._score(x)

    def _score(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Re-ranker scores of feature columns (name -> values), in the trained feature order."""
        x = np.column_stack([np.asarray(columns[n], np.float64) for n in self.feature_names])
        return predict(self.model, self.ranker, x)

    def rank_lists(self, user_idx: Any, n: int, exclude: sp.csr_matrix | None = None, with_sources: bool = False,
                   exposure_weight: float | None = None) -> tuple[np.ndarray, np.ndarray, list[list[list[str]]] | None]:
        """Per user (in the order given, repeats allowed): the best ``n`` candidates by re-ranker
        score, ties to the lower item index.

        Never returns an item the user interacted with in the fitted data, nor one in ``exclude``
        (a (users, items) matrix indexed by user, e.g. a version's seen matrix that also holds later
        impressions). Returns ids (len(user_idx), n) int64 padded with -1, the re-ranker's scores
        float64 (NaN padding) and, with ``with_sources``, per user and item the sources whose top
        lists proposed it (``["catalog"]`` for an item added because the user's union was shorter than
        :data:`~adrec.topk.union.MIN_UNION` items).
        Vectorised: ``batch_users`` users share one feature frame and one ``predict`` call.

        With an ``exposure_weight`` (None: the recommender's own) above 0 and item providers known, each
        list is the exposure-aware re-ranking (:mod:`.exposure`) of the user's best ``exposure_pool``
        candidates; the scores stay each item's re-ranker score, so they need not fall along the list.
        """
        w = self.exposure_weight if exposure_weight is None else float(exposure_weight)
        if w <= 0 or self.item_provider is None:
            return self._rank_by_score(user_idx, n, exclude, with_sources)
        n = int(n)
        ids, sc, src = self._rank_by_score(user_idx, max(n, self.exposure_pool), exclude, with_sources)
        pos = exposure_rerank(ids, sc, self.item_provider, w, n)
        rows = np.arange(len(ids))[:, None]
        got = pos >= 0
        out_ids = np.where(got, ids[rows, np.maximum(pos, 0)], -1)
        out_sc = np.where(got, sc[rows, np.maximum(pos, 0)], np.nan)
        out_src = None if src is None else [[per[p] for p in row if p >= 0] for per, row in zip(src, pos)]
        return out_ids, out_sc, out_src

    def _rank_by_score(self, user_idx: Any, n: int, exclude: sp.csr_matrix | None,
                       with_sources: bool) -> tuple[np.ndarray, np.ndarray, list[list[list[str]]] | None]:
        """:meth:`rank_lists` without the exposure re-ranking: the best ``n`` by re-ranker score."""
        self._check_fitted()
        users = np.asarray(user_idx, dtype=np.int64).reshape(-1)
        if users.size and (users.min() < 0 or users.max() >= self.n_users):
            raise IndexError(f"user index outside 0..{self.n_users - 1}")
        n = int(n)
        out_ids = np.full((len(users), n), -1, np.int64)
        out_sc = np.full((len(users), n), np.nan, np.float64)
        out_src: list[list[list[str]]] | None = [[] for _ in users] if with_sources else None
        names = list(self.sources)
        uniq, inv = np.unique(users, return_inverse=True)
        for start in range(0, len(uniq), self.batch_users):
            bu = uniq[start:start + self.batch_users]
            cu, ci, x = self._features(bu, self.sources, self.index, self.known, self.lm, frame=False)
            s = self._score(x)
            row = np.searchsorted(bu, cu)
            keep = np.ones(len(ci), bool)
            if exclude is not None:
                ex = exclude[bu]
                ex_codes = np.repeat(np.arange(len(bu), dtype=np.int64), np.diff(ex.indptr)) * self.n_items + ex.indices
                keep = ~np.isin(row * np.int64(self.n_items) + ci, ex_codes)
            order = np.flatnonzero(keep)
            order = order[np.lexsort((ci[order], -s[order], row[order]))]  # per user: score desc, item asc
            r_o = row[order]
            pos = np.arange(len(order)) - np.searchsorted(r_o, r_o)
            top = pos < n
            ids = np.full((len(bu), n), -1, np.int64)
            sc = np.full((len(bu), n), np.nan, np.float64)
            ids[r_o[top], pos[top]] = ci[order[top]]
            sc[r_o[top], pos[top]] = s[order[top]]
            sel = np.flatnonzero((inv >= start) & (inv < start + len(bu)))
            out_ids[sel] = ids[inv[sel] - start]
            out_sc[sel] = sc[inv[sel] - start]
            if out_src is not None:
                member = np.stack([np.asarray(x[f"{nm}.rank"])[order[top]] <= self.source_specs[nm]["n"]
                                   for nm in names], axis=1)
                per_row: list[list[list[str]]] = [[] for _ in bu]
                for r, m in zip(r_o[top], member):
                    per_row[r].append([nm for nm, hit in zip(names, m) if hit] or ["catalog"])
                for j in sel:
                    out_src[j] = per_row[inv[j] - start]
        return out_ids, out_sc, out_src

    def recommend(self, user_idx: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` items for known users, ranked by the re-ranker over their candidates.

        Never returns an item the user interacted with in train or valid; ties go to the lower item
        index. Returns ids (len(user_idx), k) int64 padded with -1 and scores float32 (NaN padding).
        """
        ids, sc, _ = self.rank_lists(user_idx, k)
        return ids, sc.astype(np.float32)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write the sources, the ranker and the known interactions into ``directory``."""
        self._check_fitted()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, src in self.sources.items():
            src.save(d / "sources" / name)
        save_ranker(self.model, self.ranker, d)
        if self.lm is not None:
            self.lm.save(d / LM_DIR)
        arrays = {c: self.known[c].to_numpy() for c in _KNOWN_COLUMNS}
        pack_csr("tags", self.item_tags, arrays)
        if self.item_provider is not None:
            arrays["item_provider"] = np.asarray(self.item_provider, np.int64)
        np.savez(d / "known.npz", **arrays)
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "params": {"sources": self.source_specs, "train_stages": list(self.train_stages),
                       "last_n": list(self.last_n), "windows_days": list(self.windows_days),
                       "transition_span": self.transition_span, "next_candidates": self.next_candidates,
                       "rank_depth": self.rank_depth,
                       "ranker": self.ranker, "ranker_params": self.ranker_params,
                       "batch_users": self.batch_users, "seed": self.seed,
                       "exposure_weight": self.exposure_weight, "exposure_pool": self.exposure_pool,
                       "ranker_features": self.ranker_features,
                       "ranker_features_params": self.ranker_features_params,
                       "ranker_features_last_n": self.ranker_features_last_n, "relevance": self.relevance},
            "lm_config": json.loads(self.lm_config.model_dump_json()) if self.lm_config is not None else None,
            "n_users": self.n_users, "n_items": self.n_items, "n_catalog": self.n_catalog,
            "feature_names": self.feature_names, "extra_scores": sorted(self.extra_scores),
            "fit_info": self.fit_info,
        }
        (d / "two_stage.json").write_text(json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, extra_scores: Mapping[str, ExtraScore] | None = None) -> TwoStageRecommender:
        d = Path(directory)
        meta = json.loads((d / "two_stage.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{d}: not a saved TwoStageRecommender")
        missing = set(meta.get("extra_scores", [])) - set(extra_scores or {})
        if missing:
            raise ValueError(f"{d} was trained with extra_scores {sorted(missing)}: pass them to load()")
        obj = cls(**meta["params"], extra_scores=extra_scores, lm_config=meta.get("lm_config"))
        obj.n_users, obj.n_items, obj.n_catalog = meta["n_users"], meta["n_items"], meta["n_catalog"]
        obj.feature_names = meta["feature_names"]
        obj.fit_info = meta.get("fit_info", {})
        obj.sources = {name: load_source(d / "sources" / name) for name in obj.source_specs}
        obj.model = load_ranker(obj.ranker, d)
        with np.load(d / "known.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        obj.known = pd.DataFrame({c: arrays[c] for c in _KNOWN_COLUMNS})
        obj.item_tags = unpack_csr("tags", arrays)
        obj.item_provider = arrays.get("item_provider")  # absent in folders saved before exposure re-ranking
        obj.index = obj._known_index(obj.known)
        if obj.ranker_features:
            if not (d / LM_DIR).is_dir():
                raise ValueError(f"{d} was fitted with ranker_features but holds no {LM_DIR}/ folder: refit the top-K "
                                 "stage (`adrec candidates --run R`)")
            obj.lm = LMScorer.load(d / LM_DIR)
        return obj
