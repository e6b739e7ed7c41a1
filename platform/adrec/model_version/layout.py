"""The file names of a model version folder: the one place that says where each part lives.

Layout::

    version.json             id, creation time, sizes, where it came from
    features/                spec.json, items.parquet, users.parquet (pseudonyms only)
    history.parquet          per user the most recent known positives (serving's starting history)
    seen.npz                 per user every known item (never recommended again)
    candidates/              the fitted candidate sources (MultiSource)
    topk/                    the two-stage top-K recommender that orders known users' lists
                             (TwoStageRecommender; absent when topk.enabled was off)
    lists.npz                the two-stage lists of the known users, computed once by the writer
                             (absent without topk/ or beyond the user bound)
    ranker/                  the self-describing ranker (config, weights, encoder via save_pretrained)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FEATURE_FILES = ("spec.json", "items.parquet", "users.parquet")


@dataclass(frozen=True)
class VersionPaths:
    """Where each part of the version folder ``root`` lives."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def info(self) -> Path:
        return self.root / "version.json"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def spec(self) -> Path:
        return self.features / "spec.json"

    @property
    def items(self) -> Path:
        return self.features / "items.parquet"

    @property
    def users(self) -> Path:
        return self.features / "users.parquet"

    @property
    def history(self) -> Path:
        return self.root / "history.parquet"

    @property
    def seen(self) -> Path:
        return self.root / "seen.npz"

    @property
    def candidates(self) -> Path:
        return self.root / "candidates"

    @property
    def topk(self) -> Path:
        return self.root / "topk"

    @property
    def lists(self) -> Path:
        return self.root / "lists.npz"

    @property
    def ranker(self) -> Path:
        return self.root / "ranker"
