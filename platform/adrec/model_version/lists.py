"""The two-stage lists of a version's known users: computed once, stored in the version folder, looked up.

A known user's list depends on the version alone (its sources, its re-ranker and its seen matrix are
fixed), so it is computed once per version instead of ~4 ms of CPU per request. Sources are kept as
a bit mask per item (a few bytes, not Python lists): bit j stands for name j of :func:`source_names`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adrec.config import CandidateConfig, ServeConfig


def source_names(two_stage) -> list[str]:
    """The source names a list's bit masks stand for, bit j for name j."""
    return list(two_stage.sources) + ["catalog"]


def stored_length() -> int:
    """How long the writer stores the lists: as long as serving's default request needs them
    (``candidates.n_candidates`` candidates, at least ``serve.max_k``)."""
    return max(CandidateConfig().n_candidates, ServeConfig().max_k)


@dataclass
class TwoStageLists:
    ids: np.ndarray  # (users, n) item indices, best first, -1 padded
    scores: np.ndarray  # (users, n) the re-ranker's scores
    masks: np.ndarray  # (users, n) per item the bit mask of the sources that proposed it
    names: list[str]  # bit j of a mask is names[j]
    decode: dict[int, list[str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        bit = {nm: 1 << j for j, nm in enumerate(self.names)}
        self.decode = {int(m): [nm for nm in self.names if m & bit[nm]] for m in np.unique(self.masks)}

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    def lookup(self, user_idx: int, n: int) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
        """The first ``n`` (<= :attr:`length`) items of a user's list: ids, sources per item, scores."""
        row = self.ids[user_idx, :n]
        keep = row >= 0
        return row[keep], [self.decode[int(m)] for m in self.masks[user_idx, :n][keep]], self.scores[user_idx, :n][keep]

    @classmethod
    def compute(cls, two_stage, seen, n: int, batch_users: int = 2048) -> "TwoStageLists":
        """Every known user's list of ``n`` items, ranked in batches of users (``seen`` items excluded)."""
        names = source_names(two_stage)
        bit = {nm: 1 << j for j, nm in enumerate(names)}
        ids = np.full((two_stage.n_users, n), -1, np.int64)
        scores = np.full((two_stage.n_users, n), np.nan, np.float64)
        masks = np.zeros((two_stage.n_users, n), np.int64)
        for start in range(0, two_stage.n_users, batch_users):
            users = np.arange(start, min(start + batch_users, two_stage.n_users))
            i, s, src = two_stage.rank_lists(users, n, exclude=seen, with_sources=True)
            ids[users], scores[users] = i, s
            for row, per_user in zip(users, src):
                masks[row, :len(per_user)] = [sum(bit[x] for x in per_item) for per_item in per_user]
        return cls(ids, scores, masks, names)

    def save(self, path: str | Path) -> None:
        np.savez(path, ids=self.ids.astype(np.int32), scores=self.scores, masks=self.masks.astype(np.int32),
                 names=np.array(self.names))

    @classmethod
    def read(cls, path: str | Path, two_stage, n: int) -> "TwoStageLists | None":
        """The stored lists cut to ``n`` items, or None when there are none, or they are too short or for
        another two-stage recommender (other users or sources)."""
        path = Path(path)
        if not path.is_file():
            return None
        with np.load(path) as z:
            names = [str(x) for x in z["names"]]
            n_users, stored = z["ids"].shape
            if n_users != two_stage.n_users or stored < n or names != source_names(two_stage):
                return None
            return cls(z["ids"][:, :n].astype(np.int64), z["scores"][:, :n], z["masks"][:, :n].astype(np.int64), names)
