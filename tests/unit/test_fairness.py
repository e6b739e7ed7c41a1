"""Fairness-of-exposure metrics against hand computations on one small fixed set of served lists."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from adrec.evaluation.fairness import age_bucket, fairness, provider_column
from adrec.metrics import calibration_by_group, exposure_to_merit, gini, item_exposure, long_tail_share

# Three served lists over items 0..4 (-1 pads the second one).
LISTS = np.array([[0, 1, 2],
                  [0, 2, -1],
                  [3, 0, 1]])
W2, W3 = 1 / math.log2(3), 1 / math.log2(4)  # position weights of ranks 2 and 3 (rank 1 weighs 1)
GROUP = np.array([0, 0, 1, 1, 2])  # items 0,1 -> provider A; 2,3 -> B; 4 -> C
TRUTH = [{0, 4}, {2}, {3, 1}]


def test_item_exposure_counts_lists_or_position_weights():
    # item 0 in all 3 lists, item 1 in lists 0 and 2, item 2 in 0 and 1, item 3 in 2, item 4 nowhere.
    assert item_exposure(LISTS, 5).tolist() == [3, 2, 2, 1, 0]
    # item 0: ranks 1, 1, 2 -> 1 + 1 + W2; item 1: ranks 2, 3; item 2: ranks 3, 2; item 3: rank 1.
    np.testing.assert_allclose(item_exposure(LISTS, 5, position_weighted=True),
                               [2 + W2, W2 + W3, W3 + W2, 1.0, 0.0], rtol=1e-12)
    np.testing.assert_allclose(item_exposure(LISTS, 5, position_weighted=True),
                               [2.6309298, 1.1309298, 1.1309298, 1.0, 0.0], atol=1e-6)


def test_gini_by_hand():
    # [3,2,2,1,0] sorted: [0,1,2,2,3], n=5, sum=8, weights 2i-n-1 = -4,-2,0,2,4:
    # (0*-4 + 1*-2 + 2*0 + 2*2 + 3*4) / (5*8) = 14/40 = 0.35
    # (check: sum over ordered pairs of |xi-xj| = 28, / (2 n^2 mean) = 28/80 = 0.35)
    assert gini([3, 2, 2, 1, 0]) == pytest.approx(0.35)
    assert gini([1, 1, 1]) == pytest.approx(0.0)
    assert gini([0, 0, 5]) == pytest.approx(2 / 3)  # all on one of n=3: (n-1)/n
    # providers: A = 3+2 = 5, B = 2+1 = 3, C = 0 -> sorted [0,3,5], weights -2,0,2: 10/(3*8)
    provider_exposure = np.bincount(GROUP, weights=item_exposure(LISTS, 5))
    assert provider_exposure.tolist() == [5, 3, 0]
    assert gini(provider_exposure) == pytest.approx(10 / 24)
    assert math.isnan(gini([])) and math.isnan(gini([0, 0]))
    with pytest.raises(ValueError):
        gini([1, -1])


def test_long_tail_share_by_hand():
    # popularity sums to 100; cumulative 50, 70, 85 >= 80: the head is items {0,1,2}, tail {3,4}.
    # Served slots: 3 + 2 + 3 = 8, of which one (item 3) is long tail: 1/8.
    assert long_tail_share(LISTS, [50, 20, 15, 10, 5], 0.8) == pytest.approx(0.125)
    # Exactly 80%: cumulative 50, 80 -> head {0,1}; tail slots: item 2 twice, item 3 once = 3/8.
    assert long_tail_share(LISTS, [50, 30, 10, 5, 5], 0.8) == pytest.approx(3 / 8)
    # Tie on popularity goes to the lower index: head {0}; both served items 1 and 2 are tail.
    assert long_tail_share([[1, 2]], [10, 10, 0, 0], 0.5) == pytest.approx(1.0)
    assert math.isnan(long_tail_share(np.zeros((0, 3)), [1, 2, 3]))
    assert math.isnan(long_tail_share([[-1, -1]], [1, 2, 3]))


def test_exposure_to_merit_by_hand_and_a_provider_without_positives():
    # Position-weighted exposure: A = item0 + item1 = (2 + W2) + (W2 + W3); B = (W3 + W2) + 1; C = 0.
    # Total = every slot's weight = (1+W2+W3) + (1+W2) + (1+W2+W3) = 3 + 3*W2 + 2*W3 = 5.8927893.
    # Merit: test positives 0,1 -> A (2), 2,3 -> B (2), 4 -> C (1), of 5; D (group 3) has no item.
    out = exposure_to_merit(LISTS, TRUTH, GROUP, 4)
    total = 3 + 3 * W2 + 2 * W3
    exp_a, exp_b = (2 + 2 * W2 + W3) / total, (1 + W2 + W3) / total  # 3.7618597/5.8927893 = 0.6383834
    np.testing.assert_allclose(out["exposure_share"], [exp_a, exp_b, 0.0, 0.0], rtol=1e-12)
    np.testing.assert_allclose(out["exposure_share"][:2], [0.6383834, 0.3616166], atol=1e-6)
    np.testing.assert_allclose(out["merit_share"], [0.4, 0.4, 0.2, 0.0])
    # ratio = exposure share / merit share: A 0.6383834/0.4 = 1.5959585, B 0.9040415, C 0/0.2 = 0, D none.
    np.testing.assert_allclose(out["ratio"][:3], [1.5959585, 0.9040415, 0.0], atol=1e-6)
    assert math.isnan(out["ratio"][3])
    empty = exposure_to_merit(np.zeros((0, 3)), [], GROUP, 3)
    assert all(np.isnan(empty[k]).all() for k in ("exposure_share", "merit_share", "ratio"))
    with pytest.raises(ValueError):
        exposure_to_merit(LISTS, TRUTH[:2], GROUP, 3)


def test_calibration_by_group_by_hand():
    y = [1, 0, 0, 1, 0, 0]
    p = [0.5, 0.1, 0.3, 0.2, 0.2, 0.2]
    out = calibration_by_group(y, p, ["F", "F", "F", "M", "M", "X"])
    # F: mean p = 0.9/3 = 0.3, CTR = 1/3 -> 0.9; M: 0.2 / 0.5 = 0.4; X: no clicks -> nan.
    assert out["F"] == pytest.approx(0.9) and out["M"] == pytest.approx(0.4)
    assert math.isnan(out["X"])
    assert calibration_by_group([], [], []) == {}


def test_age_buckets_and_provider_stand_in():
    ages = age_bucket(pd.Series([7, 18, 24, 25, 54, 55, 73, np.nan]))
    assert ages.tolist()[:7] == ["<18", "18-24", "18-24", "25-34", "45-54", "55+", "55+"]
    assert ages.isna().tolist()[-1]
    labels, what = provider_column(pd.DataFrame({"item.genre": ["Action|Comedy", "Drama"]}))
    assert labels.tolist() == ["Action", "Drama"] and "stand-in" in what
    labels, what = provider_column(pd.DataFrame({"item.advertiser": ["b1", "b2"], "item.genre": ["x", "y"]}))
    assert labels.tolist() == ["b1", "b2"] and "advertiser" in what


def test_fairness_section_keys_on_the_fixed_lists(tmp_path):
    items = pd.DataFrame({"item_idx": range(5), "item.advertiser": ["A", "A", "B", "B", "C"]})
    users = pd.DataFrame({"user_idx": [0, 1], "user.gender": ["F", "M"], "user.age": [22.0, 40.0]})
    test = pd.DataFrame({"user_idx": [0, 0, 1, 1], "label": [1, 0, 1, 0]})
    probs = np.array([0.6, 0.2, 0.3, 0.1])
    train_pos = np.array([0] * 50 + [1] * 20 + [2] * 15 + [3] * 10 + [4] * 5)
    metrics, body, img, table = fairness(items, users, 5, train_pos, LISTS, TRUTH, test, probs, tmp_path)
    assert metrics["fairness.gini.items"] == pytest.approx(0.35)
    assert metrics["fairness.gini.providers"] == pytest.approx(10 / 24)
    assert metrics["fairness.long_tail_share"] == pytest.approx(0.125)
    assert metrics["fairness.exposure_to_merit.min"] == pytest.approx(0.0)  # C: positives, never shown
    assert metrics["fairness.exposure_to_merit.max"] == pytest.approx(1.5959585, abs=1e-6)
    # F (user 0): 0.8/2 / (1/2) = 0.8; M (user 1): 0.4/2 / (1/2) = 0.4; ages 22 -> 18-24, 40 -> 35-44.
    assert metrics["fairness.calibration.gender.F"] == pytest.approx(0.8)
    assert metrics["fairness.calibration.gender.M"] == pytest.approx(0.4)
    assert metrics["fairness.calibration.age.18-24"] == pytest.approx(0.8)
    assert metrics["fairness.calibration.age.35-44"] == pytest.approx(0.4)
    assert img is not None and img.is_file() and "`C`" in body
    assert table["provider"].tolist() == ["A", "B", "C"]
