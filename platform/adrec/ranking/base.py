"""The ranker contract every stage codes against.

A ranker turns input rows into click probabilities. Rows carry ``user_idx``, ``item_idx``
(-1 = unknown), ``hist`` (list/array of the user's recent positive item indices, oldest first)
and the ``f:<field>`` code columns of the feature spec, exactly as in ``interactions.parquet`` or
as :meth:`FeatureSpec.encode_rows` produces them at serving time.

A saved ranker is a folder with a ``ranker.json`` naming its class; :func:`load_ranker` reads it
and returns the right class, so the Serve app and the evaluation never need to know which one it is.
The name maps through :data:`RANKER_CLASSES`, written here in code: a file never chooses a module to
import (a run folder on shared storage must not be a way to run code in Serve or the learner).
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import pandas as pd

from adrec.errors import UnsafeFileError

RANKER_JSON = "ranker.json"

#: The ranker classes a ``ranker.json`` may name, and where each lives (imported on first use: torch).
RANKER_CLASSES = {
    "FusionRanker": ("adrec.ranking.fusion", "FusionRanker"),
}


class Ranker(ABC):
    name: str = "ranker"

    @abstractmethod
    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        """Click probabilities in (0, 1), one per row, in row order."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write a self-describing folder (``ranker.json`` + whatever the class needs)."""

    @classmethod
    @abstractmethod
    def load(cls, path) -> "Ranker":
        """Rebuild a ranker from a folder written by :meth:`save`."""


def ranker_class(name: object, where: str | Path = RANKER_JSON) -> type[Ranker]:
    """The class :data:`RANKER_CLASSES` knows as ``name``; any other name (a module path, say) is refused
    with :class:`UnsafeFileError` before anything is imported."""
    if not isinstance(name, str) or name not in RANKER_CLASSES:
        raise UnsafeFileError(f"{where} names ranker class {name!r}, which is not one adrec ships "
                              f"(known: {sorted(RANKER_CLASSES)}); nothing was imported. Train the ranker "
                              "again (`adrec train --run R`) or fix the file's \"class\"")
    module, attr = RANKER_CLASSES[name]
    return getattr(importlib.import_module(module), attr)


def read_ranker_json(path: str | Path) -> dict:
    folder = Path(path)
    meta_path = folder / RANKER_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: {folder} is not a saved ranker (run `adrec train` first)")
    return json.loads(meta_path.read_text())


def load_ranker(path: str | Path) -> Ranker:
    """Load any saved ranker: reads ``ranker.json`` ({"class": ...}) and dispatches to that class."""
    meta = read_ranker_json(path)
    if "class" not in meta:
        raise ValueError(f"{Path(path) / RANKER_JSON} names no 'class'")
    return ranker_class(meta["class"], Path(path) / RANKER_JSON).load(Path(path))
