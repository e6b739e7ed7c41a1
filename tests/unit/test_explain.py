"""adrec.ranking.explain on the tiny fusion ranker: captum's Integrated Gradients by field, the attention
over the history, and zeroing a group (the faithfulness check's step). Real torch and captum, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adrec.config import RankerConfig
from tests.unit.test_ranking_model import needs_minilm

pytestmark = needs_minilm


@pytest.fixture(scope="module")
def ranker_and_rows():
    from adrec.ranking.fusion import FusionRanker
    from tests.support.toy import toy_features

    toy = toy_features()
    torch.manual_seed(0)
    cfg = RankerConfig(tiny_encoder=True, embed_dim=8, hidden=[16], cross_layers=2, cross_rank=4, att_hidden=8,
                       max_text_len=16, ensemble=2)
    r = FusionRanker.build(cfg, toy.spec, toy.items, toy.users)
    with torch.no_grad():  # a head whose output depends on its inputs visibly (a fresh one is near zero)
        for p in r.model.parameters():
            if p.requires_grad and p.dim() > 1:
                p.mul_(3.0)
    rows = toy.rows("test")
    rows = rows[rows["hist"].map(len) > 1].iloc[:5]
    return r, rows


def test_integrated_gradients_groups_sum_to_the_logit_change(ranker_and_rows):
    from adrec.ranking.explain import ITEM_GROUPS, Explainer

    r, rows = ranker_and_rows
    ex = Explainer(r, n_steps=32)
    attrs, base = ex.attributions(rows)
    assert ex.groups[-len(ITEM_GROUPS):] == list(ITEM_GROUPS)
    assert {"user", "item", "ctx.slot", "item.category", "x:user.gender*item.category", "item.tags"} <= set(ex.groups)
    assert attrs.shape == (len(rows), len(ex.groups))
    logits = r.logits(rows)
    # completeness of IG: the attributions add up to logit(input) - logit(all-zero baseline)
    change = logits - base
    np.testing.assert_allclose(attrs.sum(1), change, atol=0.02 * np.abs(change).max() + 1e-4)
    assert np.abs(attrs[:, ex.groups.index("history")]).max() > 0  # the rows have a history
    # the forward IG integrates is the ranker's own: with nothing zeroed it gives the served logits
    full, _ = ex.logits_without(rows, ["item.text"] * len(rows))
    np.testing.assert_allclose(full, logits, rtol=1e-5, atol=1e-6)


def test_zeroing_a_group_is_its_baseline(ranker_and_rows):
    from adrec.ranking.explain import Explainer

    r, rows = ranker_and_rows
    ex = Explainer(r, n_steps=32)
    # one group zeroed: for a group whose effect is close to linear, the drop is about its attribution
    full, without = ex.logits_without(rows, ["ctx.slot"] * len(rows))
    attrs, _ = ex.attributions(rows)
    a = attrs[:, ex.groups.index("ctx.slot")]
    assert np.all(np.sign(full - without) == np.sign(a)) or np.abs(a).max() < 1e-3
    # each row loses its own group only: row 0 its history, row 1 its item text
    _, both = ex.logits_without(rows.iloc[:2], ["history", "item.text"])
    _, no_hist = ex.logits_without(rows.iloc[:1], ["history"])
    _, no_text = ex.logits_without(rows.iloc[1:2], ["item.text"])
    np.testing.assert_allclose(both, [no_hist[0], no_text[0]], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown group"):
        ex.logits_without(rows.iloc[:1], ["no.such.field"])


def test_history_attention_is_a_distribution_over_the_history(ranker_and_rows):
    from adrec.ranking.explain import Explainer

    r, rows = ranker_and_rows
    hist_items, w = Explainer(r).history_attention(rows)
    for row_hist, items, weights in zip(rows["hist"], hist_items, w):
        assert set(items[items >= 0].tolist()) == set(np.asarray(row_hist).tolist()[-len(items):])
        assert np.all(weights[items < 0] == 0) and weights.sum() == pytest.approx(1.0, abs=1e-5)
