"""Reading a model version: its ``version.json``, or the whole version loaded (:class:`ModelVersion`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from adrec.candidates.merge import MultiSource
from adrec.candidates.popularity import PopularitySource
from adrec.errors import RunError
from adrec.features.pipeline import entity_codes
from adrec.features.row_encoder import RowEncoder
from adrec.features.spec import FeatureSpec
from adrec.model_version.layout import VersionPaths
from adrec.model_version.lists import TwoStageLists
from adrec.model_version.registry import materialize
from adrec.storage import is_remote

log = logging.getLogger(__name__)


def read_version(model_dir: str | Path) -> dict:
    """The ``version.json`` of a version folder or URI (id, creation time, sizes, where it came from).

    A local folder's other files are not hashed here (this is read several times per deploy and rollout):
    loading the version (:class:`ModelVersion`) verifies them, and so do the deploy and rollout checks."""
    folder = materialize(model_dir) if is_remote(model_dir) else Path(model_dir)
    path = VersionPaths(folder).info
    if not path.is_file():
        raise RunError(f"{model_dir} is not a model version (no version.json): run `adrec train` first")
    return json.loads(path.read_text())


def load_two_stage(model_dir: str | Path):
    """The version's two-stage recommender, or None when it has none."""
    paths = VersionPaths(model_dir)
    if not paths.topk.is_dir():
        return None
    from adrec.topk import (
        TwoStageRecommender,  # (cost: the top-K package pulls in its sources, ~1 s)
    )

    return TwoStageRecommender.load(paths.topk)


class ModelVersion:
    """A version folder loaded: feature spec and tables, histories, seen items, sources, models.

    ``load_ranker=False`` skips the CTR ranker (a process that only produces candidates);
    ``load_topk=False`` skips the two-stage recommender (about 80 MB and 0.5 s on MovieLens-100k):
    for a process that only scores with the CTR ranker.

    No file of the version runs code when read: a pickle, a checkpoint holding objects or a class name
    outside the code's allow-lists raises :class:`~adrec.errors.UnsafeFileError` naming the file and
    the command that rebuilds it.
    """

    def __init__(self, model_dir: str | Path, load_ranker: bool = True, load_topk: bool = True):
        from adrec.ranking.base import load_ranker as _load_ranker  # (cost: torch)

        self.paths = VersionPaths(materialize(model_dir))
        self.path = self.paths.root
        self.info = read_version(self.path)
        self.spec = FeatureSpec.load(self.paths.spec)
        self.items = pd.read_parquet(self.paths.items)
        users = pd.read_parquet(self.paths.users)
        self.item_codes = entity_codes(self.items)
        self.user_codes = entity_codes(users)
        self.user_pos = {u: i for i, u in enumerate(users["user"].tolist())}
        self.item_pos = {str(it): i for i, it in enumerate(self.items["item"].tolist())}
        hist = pd.read_parquet(self.paths.history)
        self.history = [np.asarray(h, dtype=np.int64) for h in hist["hist"]]
        self.seen = sp.load_npz(self.paths.seen).tocsr()
        self.sources = MultiSource.load(self.paths.candidates)
        self.popularity = next((s for s in self.sources.sources.values() if isinstance(s, PopularitySource)), None)
        self.context_field = self.info.get("context_field")
        self.ranker = _load_ranker(self.paths.ranker) if load_ranker else None
        self.two_stage = load_two_stage(self.path) if load_topk else None
        self._encoder: RowEncoder | None = None  # rows(): built on first use

    @property
    def version_id(self) -> str:
        return str(self.info["version"])

    def lists(self, n: int, max_users: int) -> TwoStageLists | None:
        """Every known user's two-stage list of ``n`` items: read from the folder when its writer stored
        them (at least ``n`` long), computed here otherwise. None when the version has no two-stage
        recommender or more than ``max_users`` users."""
        ts = self.two_stage
        if ts is None or n <= 0 or ts.n_users > max_users:
            return None
        lists = TwoStageLists.read(self.paths.lists, ts, n)
        if lists is not None:
            log.info("two-stage lists of %d known users read from the version (%d items each)", ts.n_users, n)
            return lists
        lists = TwoStageLists.compute(ts, self.seen, n)
        log.info("two-stage lists of %d known users computed (%d items each)", ts.n_users, n)
        return lists

    def rows(self, user_idx: np.ndarray, item_idx: np.ndarray, context: dict | None = None,
             hist: list[np.ndarray] | None = None) -> pd.DataFrame:
        """Ranker input rows, encoded with the version's feature spec (the training encoding).

        ``context``: the one context of every row (a served request's)."""
        # Serving calls this once per request with ~10-100 rows: the codes come from dictionary and numpy
        # lookups (RowEncoder), not through pandas' per-column maps, whose per-call cost was the request's.
        if self._encoder is None:
            self._encoder = RowEncoder(self.spec, self.user_codes, self.item_codes)
        u = np.asarray(user_idx, dtype=np.int64)
        if hist is None:
            empty = np.empty(0, np.int64)
            n_hist = len(self.history)
            hist = [self.history[x] if 0 <= x < n_hist else empty for x in u.tolist()]
        return self._encoder.encode(u, item_idx, context, hist)


def load_version(model_dir: str | Path, load_ranker: bool = True, load_topk: bool = True) -> ModelVersion:
    """The version in ``model_dir``, loaded (see :class:`ModelVersion` for what the flags skip)."""
    return ModelVersion(model_dir, load_ranker, load_topk)
