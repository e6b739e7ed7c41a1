"""adrec.topk.exposure: the exposure-aware re-ranking against a hand computation on a fixed list."""

from __future__ import annotations

import numpy as np
import pandas as pd

from adrec.topk.exposure import exposure_rerank, provider_codes


def test_exposure_rerank_matches_the_hand_computation():
    # one list: items 10..13, scores 1.0, 0.9, 0.5, 0.0 (scaled: 1, .9, .5, 0); providers A A B B
    provider = np.zeros(14, np.int64)
    provider[[12, 13]] = 1
    ids = np.array([[10, 11, 12, 13]])
    scores = np.array([[1.0, 0.9, 0.5, 0.0]])
    # w = 0.5. r=1: gains .5*(1, .9, .5, 0) -> item 10; E(A) = 1/log2(2) = 1.
    # r=2: 11: .45 - .5 = -.05; 12: .25; 13: 0 -> item 12; E(B) = 1/log2(3) = .631.
    # r=3: 11: -.05; 13: 0 - .5*.631 = -.315 -> item 11. r=4: item 13.
    np.testing.assert_array_equal(exposure_rerank(ids, scores, provider, 0.5, 4), [[0, 2, 1, 3]])
    # prefix-consistent: the first 2 of a list of 4 are the list of 2
    np.testing.assert_array_equal(exposure_rerank(ids, scores, provider, 0.5, 2), [[0, 2]])
    # w = 0.1: r=2: 11: .81 - .1 = .71 > 12: .45 -> the score order survives a small weight
    np.testing.assert_array_equal(exposure_rerank(ids, scores, provider, 0.1, 4), [[0, 1, 2, 3]])
    # w = 0 is the given order
    np.testing.assert_array_equal(exposure_rerank(ids, scores, provider, 0.0, 3), [[0, 1, 2]])


def test_exposure_rerank_pads_short_pools_and_breaks_ties_by_pool_position():
    provider = np.array([0, 0, 1, 1, 2])
    ids = np.array([[0, 1, 2, -1, -1], [4, 3, 2, 1, 0]])
    scores = np.array([[3.0, 3.0, 3.0, np.nan, np.nan], [5.0, 4.0, 3.0, 2.0, 1.0]])
    pos = exposure_rerank(ids, scores, provider, 1.0, 4)
    # row 0: equal scores (all scale to 1), w=1: item 0 (A), then B (item 2) before A again, then A; then padding
    np.testing.assert_array_equal(pos[0], [0, 2, 1, -1])
    # row 1: relevance ignored; each provider once (pool order among the unexposed), then the rest by exposure
    # r=1: 4(C) r=2: 3(B) r=3: 1(A) r=4: B has 1/log2(3)=.63, A 1/log2(4)=.5 -> item 0 (A, pos 4)
    np.testing.assert_array_equal(pos[1], [0, 1, 3, 4])


def test_provider_codes_from_the_items_frame():
    items = pd.DataFrame({"item_idx": [2, 0, 1], "item.genre": ["Drama|War", "Comedy", "Drama"]})
    codes = provider_codes(items, 4)
    assert codes[2] == codes[1] != codes[0]
    assert codes[3] not in codes[:3]  # an item the frame lacks has a provider of its own
    assert provider_codes(pd.DataFrame({"item_idx": [0]}), 1) is None


def test_tradeoff_points_on_a_fixed_pool():
    from adrec.evaluation.tradeoff import provider_gini, tradeoff_points

    # two users, pool of 4 from items 0..5; providers: 0,1 -> A, 2,3 -> B, 4,5 -> C
    provider = np.array([0, 0, 1, 1, 2, 2])
    pool = np.array([[0, 1, 2, 4], [1, 0, 3, 5]])
    scores = np.array([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    truth = [{0, 1}, {1, 0}]
    pts = tradeoff_points(pool, scores, provider, truth, 6, 2, [1.0, 0.0])
    assert [p["exposure_weight"] for p in pts] == [0.0, 1.0]
    # w = 0: both lists {0, 1}, all provider A: exposure A=4, B=C=0 -> Gini (n-1)/n = 2/3; NDCG 1
    assert pts[0]["ndcg@2"] == 1.0 and abs(pts[0]["gini.providers"] - 2 / 3) < 1e-12
    # w = 1: [0, 2] and [1, 3] (A then the first unexposed provider): A=2, B=2, C=0
    # Gini of (0, 2, 2): sum (2i-n-1) x_i / (n sum) = (-2*0 + 0*2 + 2*2) / (3*4) = 1/3
    assert abs(pts[1]["gini.providers"] - 1 / 3) < 1e-12
    # NDCG: one hit at rank 1 of an ideal of 2: 1 / (1 + 1/log2(3))
    assert abs(pts[1]["ndcg@2"] - 1 / (1 + 1 / np.log2(3))) < 1e-12
    assert provider_gini(np.array([[0, 2], [1, 3]]), provider, 6) == pts[1]["gini.providers"]
