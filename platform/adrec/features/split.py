"""The per-user temporal split of docs/design.md.

Per user, interactions sorted by (timestamp, item index); a user with n >= 5 interactions puts the
last (n + 4) // 5 in test and the rest in train; validation is carved from train by the same rule.
"""

from __future__ import annotations

import numpy as np

TRAIN, VALID, TEST = "train", "valid", "test"
SPLITS = (TRAIN, VALID, TEST)


def _tail_counts(n: np.ndarray) -> np.ndarray:
    return np.where(n >= 5, (n + 4) // 5, 0)


def temporal_split(users: np.ndarray, ts: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Return an array of "train" / "valid" / "test", aligned with the inputs."""
    order = np.lexsort((items, ts, users))
    u_sorted = users[order]
    # Position of each row within its user's sorted sequence, and that user's count.
    starts = np.r_[0, np.flatnonzero(u_sorted[1:] != u_sorted[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(order)])
    n = np.repeat(counts, counts)
    pos = np.arange(len(order)) - np.repeat(starts, counts)
    n_test = _tail_counts(n)
    n_train_full = n - n_test
    n_valid = _tail_counts(n_train_full)
    label = np.full(len(order), TRAIN, dtype=object)
    label[pos >= n_train_full] = TEST
    label[(pos >= n_train_full - n_valid) & (pos < n_train_full)] = VALID
    out = np.empty(len(order), dtype=object)
    out[order] = label
    return out



def new_item_holdout(catalog_items: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The strict item cold-start protocol's held-out items: a seeded ``fraction`` of the catalog.

    Their train and valid interactions are removed (the prepare stage drops them), so they are scored
    only in test, as items no model saw a row of. The temporal split is taken before the removal, so the
    test rows are the standard protocol's. Returns the sorted held-out item indices.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"new-item fraction must be in [0, 1), got {fraction}")
    items = np.unique(np.asarray(catalog_items, dtype=np.int64))
    n = int(round(fraction * len(items)))
    return np.sort(np.random.default_rng(seed).choice(items, size=n, replace=False)) if n else items[:0]
