"""The language-model ranker inside the top-K order (topk.ranker_features, adrec.topk.lm): leakage-free stage
rankers, and one feature function for the re-ranker's training, evaluation and serving.

Real fusion rankers (a tiny randomly initialised BERT, as tests/unit/test_ranking.py uses), real implicit
sources and scikit-learn's re-ranker; no Ray.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from adrec.config import RankerConfig, build_config
from adrec.errors import ConfigError
from adrec.features.pipeline import history_lists
from adrec.features.split import TEST, TRAIN, VALID
from adrec.topk import TopKData, TwoStageRecommender
from adrec.topk.known import KnownIndex
from adrec.topk.lm import (
    FEATURE_NAMES,
    LMScorer,
    _fingerprint,
    stage_ranker_config,
    stage_rows,
)
from adrec.topk.protocol import inner_stage, make_stage

from tests.support.toy import toy_features

SOURCES = {"ease": {"kind": "ease", "n": 15, "l2": 10.0}, "pop": {"kind": "popularity", "n": 10}}
HIST = 5


def tiny(**kw) -> RankerConfig:
    base = {"tiny_encoder": True, "epochs": 1, "batch_size": 128, "embed_dim": 8, "hidden": [16], "cross_layers": 1,
            "cross_rank": 4, "att_hidden": 8, "max_text_len": 16, "refit": False, "ema_decay": None}
    base.update(kw)
    return stage_ranker_config(RankerConfig(**base), {"epochs": base["epochs"]})


@pytest.fixture(scope="module")
def toy():
    return toy_features(n_users=30, n_items=25, n_rows=1000, history_len=HIST)


def _stages(inter, spec):
    n_u, n_i, n_c = spec.n_users, spec.n_items, spec.n_catalog
    return {"inner": inner_stage(inter, n_u, n_i, n_c), "valid": make_stage(inter, n_u, n_i, n_c, "valid"),
            "test": make_stage(inter, n_u, n_i, n_c, "test")}


def _with_labels(toy, labels):
    """The toy features as the prepare stage would give them with these labels (histories rebuilt)."""
    inter = toy.interactions.copy()
    inter["label"] = labels
    inter["hist"] = history_lists(inter["user_idx"].to_numpy(), inter["item_idx"].to_numpy(), inter["ts"].to_numpy(),
                                  labels, inter["split"].to_numpy(), HIST)
    return type(toy)(spec=toy.spec, interactions=inter, items=toy.items, users=toy.users)


def _candidates(stage, n_items):
    """Every (evaluated user, catalog item) pair of the stage, grouped by user."""
    cu = np.repeat(stage.users, n_items)
    ci = np.tile(np.arange(n_items), len(stage.users))
    return cu, ci


def _index(stage, spec):
    return KnownIndex.from_frame(stage.known, spec.n_users, spec.n_items, None, [1, 5], [7], 3)


def test_a_stage_ranker_learns_from_the_stage_known_rows_only(toy):
    inter = toy.interactions
    for name, stage in _stages(inter, toy.spec).items():
        rows = stage_rows(inter, stage.known)
        assert len(rows) == len(stage.known)
        # exactly the stage's known rows: never its target rows nor a later split's
        known_keys = set(zip(stage.known["user_idx"], stage.known["item_idx"], stage.known["ts"]))
        assert set(zip(rows["user_idx"], rows["item_idx"], rows["ts"])) == known_keys
        orig = rows.merge(inter[["user_idx", "item_idx", "ts", "split"]], on=["user_idx", "item_idx", "ts"],
                          suffixes=("", "_orig"))["split_orig"]
        assert set(orig) == ({TRAIN} if name in ("inner", "valid") else {TRAIN, VALID}), name
        if name == "inner":  # the inner stage's targets are the tails of train: none of them is known
            assert len(rows) < (inter["split"] == TRAIN).sum()
        # inside them, the stage ranker selects on each user's tail: the protocol's split once more
        assert set(rows["split"]) <= {TRAIN, VALID} and (rows["split"] == VALID).sum() > 0
    # the final stage (train + valid) re-splits into exactly adrec train's split
    final = stage_rows(inter, _stages(inter, toy.spec)["test"].known)
    orig = inter[inter["split"].isin([TRAIN, VALID])]
    merged = final.merge(orig[["user_idx", "item_idx", "ts", "split"]], on=["user_idx", "item_idx", "ts"],
                         suffixes=("", "_orig"))
    assert (merged["split"] == merged["split_orig"]).all()


def test_a_training_rows_ranker_feature_never_sees_that_row_or_a_later_one(toy):
    """The ranker behind the valid stage's features (the re-ranker learns on valid positives) is fitted on
    train only: flipping the labels of every valid and test row (the targets and everything later) leaves its
    features unchanged; flipping a train label changes them (so the check can fail)."""
    inter = toy.interactions
    cfg = tiny()
    valid = _stages(inter, toy.spec)["valid"]
    cu, ci = _candidates(valid, toy.spec.n_catalog)
    index = _index(valid, toy.spec)
    base = LMScorer.fit(valid.known, toy, cfg, 3).features(cu, ci, index)
    assert set(base) == set(FEATURE_NAMES)
    assert np.ptp(base["lm.p_click"]) > 1e-4 and np.ptp(base["lm.text_sim"]) > 1e-4
    assert ((base["lm.p_click"] > 0) & (base["lm.p_click"] < 1)).all()

    labels = inter["label"].to_numpy().copy()
    later = inter["split"].isin([VALID, TEST]).to_numpy()
    labels[later] = 1 - labels[later]
    flipped = _with_labels(toy, labels)
    valid_f = _stages(flipped.interactions, toy.spec)["valid"]
    pd.testing.assert_frame_equal(valid_f.known, valid.known)  # the stage's known rows are the same
    again = LMScorer.fit(valid_f.known, flipped, cfg, 3).features(cu, ci, _index(valid_f, toy.spec))
    for name in FEATURE_NAMES:
        np.testing.assert_allclose(again[name], base[name], atol=1e-6, err_msg=name)

    labels = inter["label"].to_numpy().copy()
    early = inter["split"].eq(TRAIN).to_numpy()
    labels[early] = 1 - labels[early]
    moved = _with_labels(toy, labels)
    valid_m = _stages(moved.interactions, toy.spec)["valid"]
    other = LMScorer.fit(valid_m.known, moved, cfg, 3).features(cu, ci, _index(valid_m, toy.spec))
    assert np.abs(other["lm.p_click"] - base["lm.p_click"]).max() > 1e-3


@pytest.fixture(scope="module")
def fitted(toy, tmp_path_factory):
    cache = tmp_path_factory.mktemp("lm_cache")
    rec = TwoStageRecommender(sources=SOURCES, ranker="sklearn", ranker_params={"max_iter": 30},
                              train_stages=("valid", "inner"), last_n=[1, 5], windows_days=[7], transition_span=3,
                              ranker_features=True, ranker_features_last_n=3, lm_config=tiny(),
                              lm_cache=cache).fit(TopKData.from_features(toy))
    return rec, cache


def test_each_stage_of_the_recommender_has_its_own_ranker_fitted_on_that_stage(toy, fitted):
    rec, cache = fitted
    assert [n for n in FEATURE_NAMES if n not in rec.feature_names] == []
    stages = _stages(toy.interactions, toy.spec)
    # the cache holds exactly one ranker per stage, each keyed by (and fitted on) that stage's known rows
    keys = {_fingerprint(s.known, rec.lm_config): name for name, s in stages.items()}
    assert {p.name for p in cache.iterdir()} == set(keys)
    for key, name in keys.items():
        info = json.loads((cache / key / "lm.json").read_text())["info"]
        assert info["rows"] == len(stages[name].known), name
    assert rec.lm.info["key"] == _fingerprint(stages["test"].known, rec.lm_config)  # serving: train + valid


def test_evaluation_and_serving_read_the_same_features(toy, fitted, tmp_path):
    rec, _ = fitted
    users = np.arange(toy.spec.n_users)
    cu, ci, s = rec.score_candidates(users)
    rec.save(tmp_path / "topk")
    assert (tmp_path / "topk" / "lm" / "ranker" / "ranker.json").is_file()
    loaded = TwoStageRecommender.load(tmp_path / "topk")  # what a version's Serve replica loads
    cu2, ci2, s2 = loaded.score_candidates(users)
    np.testing.assert_array_equal(cu2, cu)
    np.testing.assert_array_equal(ci2, ci)
    np.testing.assert_allclose(s2, s, rtol=1e-6, atol=1e-9)
    assert rec.lm.cache_dir is not None and any(rec.lm.cache_dir.glob("p_click_*.npy"))
    np.testing.assert_array_equal(rec.score_candidates(users)[2], s)  # read back from the fit's cache
    np.testing.assert_array_equal(loaded.recommend(users, 5)[0], rec.recommend(users, 5)[0])
    # lm.p_click is the ranker's calibrated click probability of the row the serving path builds
    _, _, cols = loaded._features(users[:3], loaded.sources, loaded.index, loaded.known, loaded.lm, frame=False)
    lm = loaded.lm
    sel = np.flatnonzero(np.isin(cu, users[:3]))[:12]
    pos = loaded.known[loaded.known["label"] == 1].sort_values(["user_idx", "ts", "item_idx"])
    rows = lm.spec.encode_rows(pd.DataFrame({"user_idx": cu[sel], "item_idx": ci[sel], "ctx.slot": ""}),
                               lm.encoder.user_codes, lm.encoder.item_codes)
    rows.insert(0, "item_idx", ci[sel])
    rows.insert(0, "user_idx", cu[sel])
    rows["hist"] = [pos.loc[pos["user_idx"] == u, "item_idx"].to_numpy()[-HIST:] for u in cu[sel]]
    np.testing.assert_allclose(np.asarray(cols["lm.p_click"])[:len(sel)], lm.ranker.predict(rows), atol=1e-6)
    # lm.text_sim: the item's embedding against the mean of the user's last 3 positives' embeddings
    emb = lm.ranker.item_embeddings()
    u0 = cu[sel[0]]
    prof = emb[pos.loc[pos["user_idx"] == u0, "item_idx"].to_numpy()[-3:]].mean(0)
    expect = emb[ci[sel[0]]] @ (prof / np.linalg.norm(prof))
    assert np.asarray(cols["lm.text_sim"])[0] == pytest.approx(expect, abs=1e-5)


def test_config_and_guards(toy):
    cfg = build_config(overrides=["topk.ranker_features=true", "topk.ranker_features_params={epochs: 1}"])
    kw = cfg.topk.recommender_kwargs()
    assert kw["ranker_features"] is True and kw["ranker_features_params"] == {"epochs": 1}
    assert TwoStageRecommender(**kw, lm_config=cfg.ranker).lm_config.epochs == 1
    with pytest.raises(ConfigError, match="ranker_featurez"):
        build_config(overrides=["topk.ranker_featurez=true"])
    with pytest.raises(ValueError, match="epochz"):
        TwoStageRecommender(ranker_features=True, ranker_features_params={"epochz": 1})
    with pytest.raises(ValueError, match="prepared rows"):
        TwoStageRecommender(sources=SOURCES, ranker="sklearn", ranker_features=True, lm_config=tiny()).fit(
            TopKData(toy.interactions, toy.spec.n_users, toy.spec.n_items, toy.spec.n_catalog))
    with pytest.raises(ValueError, match="inner"):
        TwoStageRecommender(sources=SOURCES, ranker="sklearn").fit(TopKData.from_features(toy), final_stage="valid")


def test_the_benchmarks_ablation_and_valid_variants(toy, tmp_path):
    from benchmarks.topk import run_benchmark

    grids = {"most-popular": ("popularity", [{}]), "ease": ("ease", [{"l2": 10.0, "num_threads": 1}])}
    kw = {"sources": SOURCES, "ranker": "sklearn", "ranker_params": {"max_iter": 30}, "last_n": [1, 5],
          "windows_days": [7], "transition_span": 3, "lm_config": tiny(), "lm_cache": tmp_path / "cache"}
    res = run_benchmark(TopKData.from_features(toy), tmp_path / "out", repeats=1, grids=grids, dataset="toy",
                        two_stage_kwargs=kw, ranker_features="both",
                        dev_variants={"base": {"ranker_features": False}, "lm": {"ranker_features": True}})
    assert {"adrec-two-stage", "adrec-two-stage+lm"} <= set(res["methods"])
    assert res["methods"]["adrec-two-stage+lm"]["params"]["ranker_features"] is True
    assert res["methods"]["adrec-two-stage"]["params"]["ranker_features"] is False
    assert set(res["dev"]) == {"base", "lm"} and res["gain_row"] == "adrec-two-stage+lm"
    assert set(res["absolute_targets"]["adrec-two-stage+lm"]) == {"ndcg@10", "recall@10"}
    # three stage rankers in all (inner, train, train + valid): the VALID variants and the test fit share them
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 3
    md = (tmp_path / "out" / "topk_benchmark.md").read_text()
    assert "| adrec-two-stage+lm" in md and "on VALID" in md
