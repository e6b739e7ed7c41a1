"""The synthetic log's titles carry the hidden preferences (issue 14) with the documented noise."""

from __future__ import annotations

import numpy as np

from adrec.data.synthetic import CATEGORIES, QUALITY_WORDS, STYLE_WORDS, TEXT_NOISE, ad_texts


def test_titles_name_the_ads_own_latent_dimensions_and_quality_up_to_the_noise():
    n = 2000
    rng = np.random.default_rng(0)
    own = rng.normal(0, 0.6, (n, len(STYLE_WORDS)))
    quality = rng.normal(0, 0.4, n)
    cats = list(CATEGORIES)
    titles, tags = ad_texts(np.random.default_rng(1), np.random.default_rng(2), cats,
                            rng.integers(0, len(cats), n), rng.integers(0, 5, n), own, quality)
    assert len(titles) == len(tags) == n
    hits = 0
    for a, t in enumerate(titles):
        words = t.split(", ")[-1].split()
        top = np.argsort(-np.abs(own[a]))[:2]
        expect = {STYLE_WORDS[d][int(own[a, d] < 0)] for d in top}
        hits += len(expect & set(words[:2]))
        assert (len(words) == 3) == (abs(quality[a]) > 0.3)  # a quality word only for clearly good or poor ads
    share = hits / (2 * n)
    assert abs(share - (1 - TEXT_NOISE)) < 0.05 + TEXT_NOISE / 8  # noise words sometimes hit by chance
    good = np.array([t.split()[-1] in QUALITY_WORDS[:2] for t in titles])
    graded = np.abs(quality) > 0.3
    agree = (good[graded] == (quality[graded] > 0)).mean()
    assert 1 - TEXT_NOISE <= agree <= 1 - TEXT_NOISE / 2 + 0.04  # a noisy word is good or poor at random
