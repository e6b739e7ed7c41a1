"""CTR slices where text matters (issue 14): cold and warm items, new items, few-shot users.

The one definition of each slice, shared by ``adrec evaluate`` and the ranker benchmark (adrec and
every peer are scored on the same rows). A test impression's item (user) count is the number of
interactions of that item (user) the model could learn from: the train and valid splits, i.e. the
protocol's "train" (docs/design.md: validation is carved from train), whatever their label.

- ``cold_items``: test impressions of items with at most ``max_count`` (5) known interactions;
- ``warm_items``: the rest of the test impressions;
- ``new_items``: test impressions of items with no known interaction. Under the strict item
  cold-start protocol (``features.new_items=0.2``: a seeded 20% of the items lose every train and
  valid interaction, see :func:`adrec.features.split.new_item_holdout`) these are the held-out items;
- ``few_shot_users``: test impressions of users with at most ``max_count`` known interactions.

Each slice gives ``ctr.auc.<slice>`` (``nan``, written ``null``, when the slice has one class) and
``ctr.rows.<slice>``. Pure numpy: no Ray, no torch.
"""

from __future__ import annotations

import numpy as np

from adrec.metrics import auc

__all__ = ["SLICES", "COLD_MAX", "slice_masks", "slice_metrics"]

SLICES = ("cold_items", "warm_items", "new_items", "few_shot_users")
COLD_MAX = 5  # "at most 5 train interactions" (issue 14)


def _counts_at(known: np.ndarray, query: np.ndarray) -> np.ndarray:
    known = np.asarray(known, dtype=np.int64).reshape(-1)
    query = np.asarray(query, dtype=np.int64).reshape(-1)
    if (known < 0).any() or (query < 0).any():
        raise ValueError("slice counts need non-negative indices")
    size = int(max(known.max(initial=-1), query.max(initial=-1))) + 1
    return np.bincount(known, minlength=size)[query]


def slice_masks(known_users, known_items, test_users, test_items, max_count: int = COLD_MAX) -> dict[str, np.ndarray]:
    """Boolean masks over the test rows, one per slice in :data:`SLICES`.

    ``known_users`` / ``known_items``: user and item index of every interaction the model could learn
    from (train + valid rows); ``test_users`` / ``test_items``: those of the test impressions.
    """
    if len(test_users) != len(test_items) or len(known_users) != len(known_items):
        raise ValueError("users and items must have the same length")
    n_item = _counts_at(known_items, test_items)
    n_user = _counts_at(known_users, test_users)
    return {"cold_items": n_item <= max_count, "warm_items": n_item > max_count,
            "new_items": n_item == 0, "few_shot_users": n_user <= max_count}


def slice_metrics(y, p, masks: dict[str, np.ndarray], prefix: str = "ctr") -> dict[str, float]:
    """``{prefix}.auc.<slice>`` and ``{prefix}.rows.<slice>`` for each mask of :func:`slice_masks`."""
    y, p = np.asarray(y), np.asarray(p)
    out: dict[str, float] = {}
    for name, mask in masks.items():
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != y.shape:
            raise ValueError(f"slice {name}: mask of shape {mask.shape} for {y.shape} rows")
        out[f"{prefix}.auc.{name}"] = auc(y[mask], p[mask]) if mask.any() else float("nan")
        out[f"{prefix}.rows.{name}"] = float(mask.sum())
    return out
