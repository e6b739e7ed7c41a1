"""The ranker contract every stage codes against.

A ranker turns input rows into click probabilities. Rows carry ``user_idx``, ``item_idx``
(-1 = unknown), ``hist`` (list/array of the user's recent positive item indices, oldest first)
and the ``f:<field>`` code columns of the feature spec, exactly as in ``interactions.parquet`` or
as :meth:`FeatureSpec.encode_rows` produces them at serving time.

A saved ranker is a folder with a ``ranker.json`` naming its class; :func:`load_ranker` reads it
and returns the right class, so the Serve app and the evaluation never need to know which one it is.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import pandas as pd

RANKER_JSON = "ranker.json"

# Short names for the rankers this package ships; any "module:Class" or "module.Class" also works.
_REGISTRY = {
    "FusionRanker": "adrec.ranking.fusion:FusionRanker",
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


def _import_class(ref: str):
    ref = _REGISTRY.get(ref, ref)
    if ":" in ref:
        module, _, name = ref.partition(":")
    else:
        module, _, name = ref.rpartition(".")
    if not module:
        raise ValueError(f"unknown ranker class '{ref}' (known: {sorted(_REGISTRY)})")
    cls = getattr(importlib.import_module(module), name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, Ranker)):
        raise ValueError(f"'{ref}' is not a Ranker class")
    return cls


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
    return _import_class(meta["class"]).load(Path(path))
