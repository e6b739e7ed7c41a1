"""The collaborative ranker features (ranker.collab): leakage-free, and one implementation end to end."""

from __future__ import annotations

import numpy as np
import pytest

from adrec.features.pipeline import history_lists
from adrec.features.split import TRAIN, VALID
from adrec.ranking.collab import CollabScorer, feature_names, training_features
from tests.support.toy import toy_features

KINDS = ["ease", "als", "itemitem"]


@pytest.fixture(scope="module")
def toy():
    return toy_features(n_users=30, n_items=25, n_rows=1200, history_len=5)


def _features(inter, spec):
    feats, _ = training_features(inter, spec.n_users, spec.n_items, KINDS, seed=0)
    out = np.zeros((len(inter), len(KINDS) + 1), np.float32)
    for split in (TRAIN, VALID):
        out[(inter["split"] == split).to_numpy()] = feats[split]
    return out


def _with_labels(inter, labels):
    """The frame as the prepare stage would give it with these labels (histories rebuilt from them)."""
    out = inter.copy()
    out["label"] = labels
    out["hist"] = history_lists(out["user_idx"].to_numpy(), out["item_idx"].to_numpy(), out["ts"].to_numpy(),
                                labels, out["split"].to_numpy(), 5)
    return out


def test_a_rows_features_never_use_its_own_label_or_a_later_one(toy):
    inter = toy.interactions.reset_index(drop=True)
    base = _features(inter, toy.spec)
    scored = base[:, -1] > 0
    assert scored.sum() > 100 and (~scored).sum() > 0  # the earliest train rows have none
    assert np.abs(base[scored, :-1]).sum() > 0
    rng = np.random.default_rng(0)
    known = np.flatnonzero(inter["split"].isin([TRAIN, VALID]).to_numpy() & scored)
    for r in rng.choice(known, 4, replace=False):
        u, split = inter.at[r, "user_idx"], inter.at[r, "split"]
        # Flip the row's own label and those of every later row of its user (the frame is in time order).
        later = (inter["user_idx"] == u).to_numpy() & (np.arange(len(inter)) >= r)
        labels = inter["label"].to_numpy().copy()
        labels[later] = 1 - labels[later]
        again = _features(_with_labels(inter, labels), toy.spec)
        np.testing.assert_allclose(again[r], base[r], atol=1e-5, err_msg=f"row {r} ({split})")
        earlier = (inter["user_idx"] == u).to_numpy() & ~later & inter["split"].isin([TRAIN, VALID]).to_numpy()
        np.testing.assert_allclose(again[earlier], base[earlier], atol=1e-5)
    # The features do read the labels of earlier rows (they are not constant): flipping every label moves them.
    flipped = _features(_with_labels(inter, 1 - inter["label"].to_numpy()), toy.spec)
    assert np.abs(flipped - base).max() > 1e-3


def test_scores_are_the_sources_fold_in_scores_of_the_row(toy):
    inter = toy.interactions
    fit = inter[inter["split"] == TRAIN]
    scorer = CollabScorer.fit(fit, toy.spec.n_users, toy.spec.n_items, ["itemitem"])
    rows = inter[inter["split"] == VALID].iloc[:20]
    f = scorer.features(rows["hist"].to_numpy(), rows["item_idx"].to_numpy())
    sim = scorer.sources["itemitem"].similarity.toarray()
    for k, (h, i) in enumerate(zip(rows["hist"], rows["item_idx"])):
        expect = sum(sim[j, i] for j in h)  # the sum of the item's similarities to the history
        assert f[k, 0] == pytest.approx(np.sign(expect) * np.log1p(abs(expect)), abs=1e-5)
        assert f[k, 1] == float(len(h) > 0)
    assert feature_names(["itemitem"]) == ["collab.itemitem", "collab.known"]


def test_a_collab_ranker_trains_saves_and_scores_from_its_own_sources(toy, tmp_path):
    from adrec.config import RankerConfig
    from adrec.ranking.fusion import FusionRanker
    from adrec.ranking.train import fit_local

    cfg = RankerConfig(tiny_encoder=True, embed_dim=8, hidden=[16], cross_layers=1, cross_rank=4, att_hidden=8,
                       max_text_len=16, epochs=1, refit=False, collab=["ease", "itemitem"])
    ranker, _ = fit_local(cfg, toy)
    assert ranker.arch["dense"] == ["collab.ease", "collab.itemitem", "collab.known"]
    test = toy.rows("test")
    p = ranker.predict(test)
    ranker.save(tmp_path / "r")
    assert (tmp_path / "r" / "collab" / "ease").is_dir()
    loaded = FusionRanker.load(tmp_path / "r")
    np.testing.assert_allclose(loaded.predict(test), p, atol=1e-6)
    # Serving reads the same features from the same sources: the batch carries them.
    b = loaded.batch(test.iloc[:8])
    expect = loaded.collab.features(test["hist"].to_numpy()[:8], test["item_idx"].to_numpy()[:8])
    np.testing.assert_allclose(b["dense"].numpy(), expect)
