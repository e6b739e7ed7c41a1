"""The flow's stages on a real local Ray: artifacts, metrics, and the CLI's boundary errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from adrec.evaluation.stage import evaluate

REQUIRED_METRICS = ["ctr.auc", "ctr.logloss", "ctr.calibration", "topk.precision@10", "topk.recall@10",
                    "topk.ndcg@10", "topk.map@10", "topk.hitrate@10", "topk.coverage@10", "candidates.recall@100"]


def test_prepare_writes_features_without_raw_ids(tiny_run):
    feats = tiny_run.features
    inter = pd.read_parquet(feats / "interactions.parquet")
    assert set(inter["split"]) == {"train", "valid", "test"}
    users = pd.read_parquet(feats / "users.parquet")
    assert users["user"].str.startswith("u_").all()
    raw = pd.read_csv(tiny_run.raw / "impressions.csv")
    # No raw user id appears in any feature file or in the manifest.
    blob = b"".join(p.read_bytes() for p in feats.iterdir()) + tiny_run.manifest_path.read_bytes()
    assert not any(uid.encode() in blob for uid in raw["user_id"].unique()[:50])
    manifest = tiny_run.manifest()
    assert manifest["stages"]["prepare"]["counts"]["interactions"] == len(raw)


def test_candidates_report_recall(tiny_run):
    recall = json.loads((tiny_run.candidates / "recall.json").read_text())
    assert {"union.recall@50", "union.recall@100", "union.recall@200", "als.recall@100"} <= set(recall)
    assert recall["union.recall@200"] >= recall["union.recall@50"] > 0


def test_model_version_is_self_contained(tiny_run):
    model = tiny_run.model
    for name in ("version.json", "features/spec.json", "history.parquet", "seen.npz", "candidates", "ranker"):
        assert (model / name).exists(), name


def test_evaluate_writes_every_metric_and_predictions(tiny_run, tiny_cfg):
    metrics = evaluate(tiny_cfg, tiny_run)
    on_disk = json.loads((tiny_run.report / "metrics.json").read_text())
    for key in REQUIRED_METRICS:
        assert isinstance(on_disk[key], float) and math.isfinite(on_disk[key]), key
        assert on_disk[key] == pytest.approx(metrics[key])
    assert 0.5 < on_disk["ctr.auc"] <= 1.0
    topk = pd.read_csv(tiny_run.report / "topk.csv", dtype=str)
    assert list(topk.columns) == ["user", "item", "rank"]
    assert topk.groupby("user").size().max() == 10
    assert topk["user"].str.startswith("user").all()  # the data owner's ids, not pseudonyms
    preds = pd.read_csv(tiny_run.report / "ctr_preds.csv")
    test_rows = pd.read_parquet(tiny_run.features / "interactions.parquet").query("split == 'test'")
    assert len(preds) == len(test_rows) and preds["prob"].between(0, 1).all()
    report = (tiny_run.report / "report.md").read_text()
    assert "roc.png" in report and "calibration.png" in report
    # Robustness: AUC under FGSM at every configured epsilon, epsilon 0 being the clean test AUC.
    rob = {float(k.split("=")[1]): v for k, v in on_disk.items() if k.startswith("robustness.auc@eps=")}
    assert set(rob) == {0.0, *tiny_cfg.eval.fgsm_epsilons}
    assert rob[0.0] == pytest.approx(on_disk["ctr.auc"], abs=1e-3)  # the attack at 0 changes nothing
    assert rob[max(rob)] < rob[0.0]  # an attack against the labels lowers the AUC
    assert "robustness.png" in report and "trained without adversarial training" in report
    # Fairness of exposure from the served lists: the synthetic log's providers are its advertisers.
    for key in ("fairness.gini.items", "fairness.gini.providers", "fairness.long_tail_share",
                "fairness.exposure_to_merit.min", "fairness.exposure_to_merit.max"):
        assert isinstance(on_disk[key], float) and math.isfinite(on_disk[key]), key
    assert 0 <= on_disk["fairness.gini.items"] < 1 and 0 <= on_disk["fairness.long_tail_share"] <= 1
    assert on_disk["fairness.exposure_to_merit.min"] <= on_disk["fairness.exposure_to_merit.max"]
    assert any(k.startswith("fairness.calibration.gender.") for k in on_disk)
    assert any(k.startswith("fairness.calibration.age.") for k in on_disk)
    assert "fairness_exposure.png" in report and "advertiser" in report
    # The exposure trade-off: w = 0 is the served lists; more weight, more even provider exposure.
    ws = sorted({float(k.split("=")[1].split(".ndcg")[0]) for k in on_disk if k.endswith(".ndcg@10")
                 and k.startswith("exposure_tradeoff.w=")})
    assert ws == sorted(tiny_cfg.eval.exposure_weights)
    assert on_disk["exposure_tradeoff.w=0.ndcg@10"] == pytest.approx(on_disk["topk.ndcg@10"])
    assert on_disk["exposure_tradeoff.w=0.gini.providers"] == pytest.approx(on_disk["fairness.gini.providers"])
    assert on_disk[f"exposure_tradeoff.w={max(ws):g}.gini.providers"] < on_disk["exposure_tradeoff.w=0.gini.providers"]
    assert "exposure_tradeoff.png" in report
    # Explanations: the faithfulness check ran over the sampled users' served items; no DP, no privacy keys.
    assert on_disk["explain.faithfulness.items"] > 0
    assert 0 <= on_disk["explain.faithfulness.top_beats_random"] <= 1
    assert "Explanations: faithfulness" in report and not any(k.startswith("privacy.") for k in on_disk)
    assert "without differential privacy" in report
    # The issue-14 slices, recomputed here from the features and the exported predictions.
    known = pd.read_parquet(tiny_run.features / "interactions.parquet").query("split != 'test'")
    per_item = known.groupby("item_idx").size()
    n_item = test_rows["item_idx"].map(per_item).fillna(0).to_numpy()
    assert on_disk["ctr.rows.cold_items"] == (n_item <= 5).sum() and on_disk["ctr.rows.warm_items"] == (n_item > 5).sum()
    assert on_disk["ctr.rows.new_items"] == (n_item == 0).sum()
    assert on_disk["ctr.rows.cold_items"] + on_disk["ctr.rows.warm_items"] == len(test_rows)
    assert 0.5 < on_disk["ctr.auc.warm_items"] <= 1.0 and "ctr.auc.few_shot_users" in on_disk
    assert "Slices where text matters" in report
    # Objectives: relevance served greedily is the served lists; bids (the synthetic ads carry them) give
    # expected revenue, which the expected_value order maximises over the same pool.
    assert on_disk["objective.relevance.greedy.ndcg@10"] == pytest.approx(on_disk["topk.ndcg@10"])
    assert on_disk["objective.expected_value.greedy.expected_revenue"] >= \
        on_disk["objective.relevance.greedy.expected_revenue"]
    assert on_disk["objective.expected_clicks.greedy.expected_clicks"] >= \
        on_disk["objective.relevance.epsilon_greedy.expected_clicks"]
    assert {"objective.relevance.thompson.ndcg@10", "objective.relevance.epsilon_greedy.expected_revenue"} <= set(on_disk)
    assert "Objectives and exploration" in report and "expected revenue per list" in report
    assert pd.read_parquet(tiny_run.model / "features" / "items.parquet")["bid"].ge(0).all()


def test_candidates_stage_fits_the_two_stage_recommender_into_the_version(tiny_run):
    meta = json.loads((tiny_run.path / "topk" / "two_stage.json").read_text())
    assert meta["fit_info"]["examples"] > 0 and meta["fit_info"]["positives"] > 0
    info = tiny_run.manifest()["stages"]["candidates"]["topk"]
    assert info["ranker"] in ("lightgbm", "sklearn") and "ease" in info["sources"]
    recall = json.loads((tiny_run.candidates / "recall.json").read_text())
    assert 0 < recall["two_stage.recall@50"] <= recall["two_stage.recall@200"] <= 1
    assert (tiny_run.model / "topk" / "two_stage.json").is_file()  # the version loads on its own
    assert json.loads((tiny_run.model / "version.json").read_text())["topk"] is True


def test_evaluate_scores_the_served_two_stage_lists(tiny_run, tiny_cfg):
    from adrec.metrics import topk_metrics
    from adrec.serving.recommender import Recommender

    metrics = json.loads((tiny_run.report / "metrics.json").read_text())  # written by the test above
    assert {"ctr_order.ndcg@10", "topk.ndcg@10"} <= set(metrics)
    topk = pd.read_csv(tiny_run.report / "topk.csv", dtype=str).sort_values(["user", "rank"], key=lambda c: (
        c.astype(int) if c.name == "rank" else c))
    rec = Recommender(tiny_run.model, tiny_cfg.data.pseudonym_key.encode())
    lists = topk.groupby("user")["item"].apply(list)
    for user in lists.index[:5]:  # evaluate's lists are what Recommender.recommend serves
        assert [r["item"] for r in rec.recommend(user, 10)] == lists[user]
    # and the reported metrics are those lists' metrics, recomputed from the CSV and the test split
    inter = pd.read_parquet(tiny_run.features / "interactions.parquet")
    pos = inter[(inter["split"] == "test") & (inter["label"] == 1)]
    truth = pos.groupby("user_idx")["item_idx"].apply(set)
    ids = {u: i for i, u in enumerate(rec.version.items["item"].astype(str))}
    users_idx = [rec.user_index(u) for u in lists.index]
    top = np.array([[ids[i] for i in lists[u]] + [-1] * (10 - len(lists[u])) for u in lists.index])
    again = topk_metrics(top, [truth[u] for u in users_idx], rec.version.spec.n_catalog, 10)
    assert again["topk.ndcg@10"] == pytest.approx(metrics["topk.ndcg@10"])
    assert again["topk.recall@10"] == pytest.approx(metrics["topk.recall@10"])


def test_precomputed_two_stage_lists_are_the_per_request_ones(tiny_run):
    """Serving has every known user's list at hand at version load (stored in the version by its publisher,
    or computed); a lookup must equal the re-ranking."""
    from adrec.model_version import TwoStageLists, VersionPaths
    from adrec.serving.recommender import Recommender

    assert VersionPaths(tiny_run.model).lists.is_file()  # stored by publish
    rec = Recommender(tiny_run.model, None, load_ranker=False)
    ts = rec.version.two_stage
    users = range(ts.n_users)
    fresh = [rec.candidates(u, 30) for u in users]
    assert rec.precompute_lists(40, max_users=ts.n_users)
    computed = TwoStageLists.compute(ts, rec.version.seen, 40)  # the same lists, computed here instead of read
    np.testing.assert_array_equal(rec.lists.ids, computed.ids)
    np.testing.assert_array_equal(rec.lists.masks, computed.masks)
    np.testing.assert_allclose(rec.lists.scores, computed.scores, rtol=1e-6)
    assert rec.lists.names == computed.names and rec.lists.decode == computed.decode
    for u, want in zip(users, fresh):
        got = rec.candidates(u, 30)
        assert got.items.tolist() == want.items.tolist() and got.sources == want.sources
        np.testing.assert_allclose(got.final, want.final)
    assert any(len(c.items) for c in fresh)
    # a longer list than precomputed takes the per-request path; a version over the user bound is not precomputed
    plain = Recommender(tiny_run.model, None, load_ranker=False)
    assert rec.candidates(0, 50).items.tolist() == plain.candidates(0, 50).items.tolist()
    assert not plain.precompute_lists(40, max_users=0) and plain.lists is None


def _adrec(*args, timeout=120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "adrec.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_bad_dataset_is_a_clear_error(tmp_path):
    r = _adrec("prepare", "--dataset", str(tmp_path / "missing.yaml"), "--run", str(tmp_path / "r"))
    assert r.returncode == 2
    assert "neither a built-in" in r.stderr and "Traceback" not in r.stderr


def test_cli_later_stage_without_prepare_says_what_to_run(tmp_path):
    r = _adrec("candidates", "--run", str(tmp_path / "empty"))
    assert r.returncode == 2
    assert "adrec prepare --run" in r.stderr


def test_cli_unknown_override_is_named(tmp_path):
    r = _adrec("prepare", "--run", str(tmp_path / "r"), "--set", "ranker.epoch=3")
    assert r.returncode == 2 and "unknown key 'ranker.epoch'" in r.stderr
