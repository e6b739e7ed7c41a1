"""The ESMM head through the flow (issue 17): trained on Ray Train, published, and scored by `adrec evaluate`,
whose metrics.json carries cvr.auc (clicked test impressions) and ctcvr.auc (all of them)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd

from adrec import flow
from adrec.evaluation.stage import evaluate
from adrec.model_version import live_dir, load_version
from adrec.run import RunDir


def test_a_two_task_ranker_is_published_and_evaluated_with_conversion_metrics(tiny_run, tiny_cfg, tmp_path):
    # The shared run's prepare and candidates (its synthetic log has conversions), copied: its live version
    # stays the click-only one the other tests read.
    run = RunDir(tmp_path / "run")
    shutil.copytree(tiny_run.path, run.path)
    cfg = tiny_cfg.model_copy(update={
        "ranker": tiny_cfg.ranker.model_copy(update={"tasks": ["ctr", "cvr"]}),
        "eval": tiny_cfg.eval.model_copy(update={"fgsm_epsilons": [], "exposure_weights": [], "explain_users": 0})})
    inter = pd.read_parquet(run.features / "interactions.parquet")
    assert "conversion" in inter and (inter["conversion"] <= inter["label"]).all() and inter["conversion"].sum() > 0

    flow.train(cfg, run)
    version = load_version(live_dir(run))
    assert version.ranker.tasks == ["ctr", "cvr"]  # the served version rebuilt the head from its checkpoint
    test = inter[inter["split"] == "test"].head(50)
    p = version.ranker.predict_tasks(test)
    np.testing.assert_allclose(p["ctcvr"], p["ctr"] * p["cvr"], rtol=1e-12)

    metrics = evaluate(cfg, run, show_progress=False)
    on_disk = json.loads((run.report / "metrics.json").read_text())
    for key in ("cvr.auc", "ctcvr.auc", "ctcvr.logloss", "ctr.auc"):
        assert isinstance(on_disk[key], float) and math.isfinite(on_disk[key]), key
        assert on_disk[key] == metrics[key]
    test_all = inter[inter["split"] == "test"]
    assert on_disk["cvr.rows"] == int(test_all["label"].sum())
    assert on_disk["ctcvr.positives"] == int(test_all["conversion"].sum())
    assert 0.5 < on_disk["ctcvr.auc"] <= 1.0
    preds = pd.read_csv(run.report / "ctr_preds.csv")
    assert {"prob", "prob_cvr", "prob_ctcvr"} <= set(preds.columns)
    assert "Conversions (ESMM)" in (run.report / "report.md").read_text()

    # serve.objective=expected_value orders by bid x pCTCVR when the version's ranker has the ESMM head.
    from adrec.serving.recommender import Recommender
    from adrec.serving.strategy import EXPECTED_VALUE, Strategy

    rec = Recommender(live_dir(run), b"test-key")
    answer = rec.answer_index(0, 5, {}, strategy=Strategy(objective=EXPECTED_VALUE, pool=20))
    assert answer["objective"] == EXPECTED_VALUE and len(answer["items"]) == 5
    idx = np.asarray([rec.version.item_pos[it["item"]] for it in answer["items"]], np.int64)
    ctr, ctcvr = rec.rank_values(0, idx, {})
    assert ctcvr is not None
    np.testing.assert_allclose([it["click_prob"] for it in answer["items"]], ctr, rtol=1e-5)
    value = np.asarray([it["bid"] for it in answer["items"]]) * ctcvr
    assert np.all(np.diff(value) <= 1e-12), "the list is not in bid x pCTCVR order"
