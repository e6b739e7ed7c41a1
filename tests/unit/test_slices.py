"""The issue-14 CTR slices against a hand computation, and the strict new-item holdout."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adrec.evaluation.slices import SLICES, slice_masks, slice_metrics
from adrec.features.split import new_item_holdout

# Known (train + valid) rows: user 0 has 7 (item 0 six times, item 1 once), user 1 has 1 (item 1).
# So item 0 is warm (6 > 5), item 1 cold (2), item 2 new (0); user 1 is few-shot, user 0 is not.
KNOWN_U = [0] * 7 + [1]
KNOWN_I = [0] * 6 + [1, 1]
TEST_U = [0, 0, 1, 0, 1, 1, 0, 1]
TEST_I = [0, 0, 0, 1, 1, 2, 2, 2]
Y = [1, 0, 0, 1, 0, 1, 0, 0]
P = [0.9, 0.4, 0.95, 0.3, 0.6, 0.7, 0.2, 0.7]


def test_slice_masks_by_hand():
    m = slice_masks(KNOWN_U, KNOWN_I, TEST_U, TEST_I)
    assert set(m) == set(SLICES)
    assert m["warm_items"].tolist() == [True, True, True, False, False, False, False, False]
    assert m["cold_items"].tolist() == [False, False, False, True, True, True, True, True]
    assert m["new_items"].tolist() == [False] * 5 + [True] * 3
    assert m["few_shot_users"].tolist() == [False, False, True, False, True, True, False, True]


def test_slice_auc_by_hand():
    out = slice_metrics(Y, P, slice_masks(KNOWN_U, KNOWN_I, TEST_U, TEST_I))
    # Pairs (positive, negative) ordered right, ties half:
    # warm: pos .9 vs negs .4, .95 -> 1 of 2.
    # cold: pos .3 vs .6/.2/.7 -> 1; pos .7 vs .6/.2/.7 -> 2.5; 3.5 of 6.
    # new: pos .7 vs .2/.7 -> 1.5 of 2.  few-shot: pos .7 vs .95/.6/.7 -> 1.5 of 3.
    expected = {"warm_items": (0.5, 3), "cold_items": (3.5 / 6, 5), "new_items": (0.75, 3), "few_shot_users": (0.5, 4)}
    for name, (a, rows) in expected.items():
        assert out[f"ctr.auc.{name}"] == pytest.approx(a, abs=1e-12)
        assert out[f"ctr.rows.{name}"] == rows


def test_slice_of_one_class_or_no_rows_is_nan():
    masks = {"only_negatives": np.array([False, True, False]), "empty": np.zeros(3, bool)}
    out = slice_metrics([1, 0, 1], [0.2, 0.5, 0.9], masks)
    assert math.isnan(out["ctr.auc.only_negatives"]) and out["ctr.rows.only_negatives"] == 1
    assert math.isnan(out["ctr.auc.empty"]) and out["ctr.rows.empty"] == 0
    with pytest.raises(ValueError, match="mask of shape"):
        slice_metrics([1, 0], [0.2, 0.5], {"bad": np.array([True])})


def test_new_item_holdout_is_a_seeded_fraction_of_the_catalog():
    items = np.repeat(np.arange(50), 3)
    held = new_item_holdout(items, 0.2, seed=7)
    assert len(held) == 10 and len(set(held.tolist())) == 10 and set(held.tolist()) <= set(range(50))
    assert held.tolist() == new_item_holdout(items, 0.2, seed=7).tolist()
    assert held.tolist() != new_item_holdout(items, 0.2, seed=8).tolist()
    assert len(new_item_holdout(items, 0.0, seed=7)) == 0
    with pytest.raises(ValueError):
        new_item_holdout(items, 1.0, seed=0)
