"""The ESMM head through the flow (issue 17): trained on Ray Train, published, and scored by `adrec evaluate`,
whose metrics.json carries cvr.auc (clicked test impressions) and ctcvr.auc (all of them)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from adrec import flow
from adrec.evaluation.stage import evaluate
from adrec.model_version import live_dir, load_version
from adrec.run import RunDir


@pytest.fixture(scope="module")
def two_task_run(tiny_run, tiny_cfg, tmp_path_factory):
    """The shared run's prepare and candidates (its synthetic log has conversions), copied, and a two-task
    ranker trained and published on it: the shared run's live version stays the click-only one the other
    tests read."""
    run = RunDir(tmp_path_factory.mktemp("esmm") / "run")
    shutil.copytree(tiny_run.path, run.path)
    cfg = tiny_cfg.model_copy(update={
        "ranker": tiny_cfg.ranker.model_copy(update={"tasks": ["ctr", "cvr"]}),
        "eval": tiny_cfg.eval.model_copy(update={"fgsm_epsilons": [], "exposure_weights": [], "explain_users": 0})})
    flow.train(cfg, run)
    return run, cfg


def test_a_two_task_ranker_is_published_and_evaluated_with_conversion_metrics(two_task_run):
    run, cfg = two_task_run
    inter = pd.read_parquet(run.features / "interactions.parquet")
    assert "conversion" in inter and (inter["conversion"] <= inter["label"]).all() and inter["conversion"].sum() > 0

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


def test_the_online_learner_learns_the_cvr_tower_from_the_logs_conversions(two_task_run, tmp_path):
    """A two-task version behind the online learner: the conversions that /feedback carries reach its CVR
    tower (ESMM's loss on the attributed events). The same log without its conversion records is the
    control: a learner that ignored conversions would end both runs in the same weights."""
    from adrec.config import OnlineConfig
    from adrec.online.learner import OnlineLearner
    from adrec.online.stream import feedback_events, write_feedback_log

    run, _ = two_task_run
    imp = pd.read_csv(run.raw / "impressions.csv", dtype=str).iloc[-1500:].reset_index(drop=True)
    events = feedback_events(imp, context=["slot", "hour", "device"], conversion="converted")
    n_conv = sum(e["type"] == "conversion" for e in events)
    assert n_conv >= 10, "the tiny log's tail has too few conversions to learn from"
    ocfg = OnlineConfig(batch_size=64, publish_every_events=None, checkpoint_every_events=10**6, lr=0.05, nice=0,
                        sched_idle=False, track_frozen=False)
    learners = {}
    torch_threads = torch.get_num_threads()
    try:
        for name, evs in (("with", events), ("without", [e for e in events if e["type"] != "conversion"])):
            path = tmp_path / f"{name}.jsonl"
            write_feedback_log(path, evs, b"test-key")
            learner = OnlineLearner(ocfg, live_dir(run), path, tmp_path / f"state-{name}", export_metrics=False)
            assert learner.esmm is not None and learner.esmm.ctcvr_weight == 1.0
            learner.run_until_caught_up()
            learner.flush()
            learners[name] = learner
    finally:
        torch.set_num_threads(torch_threads)
    with_conv, without = learners["with"].counts(), learners["without"].counts()
    assert with_conv["conversions"] == n_conv and without["conversions"] == 0
    # every conversion follows its click inside the window: each labels one clicked impression
    assert 0 < with_conv["converted_examples"] <= with_conv["positives"]
    assert with_conv["attributed_conversions"] >= with_conv["converted_examples"]
    assert with_conv["examples"] == without["examples"] and with_conv["positives"] == without["positives"]

    cvr = {n: {k: v for k, v in lr.model_state().items() if "cvr_" in k} for n, lr in learners.items()}
    assert cvr["with"] and set(cvr["with"]) == set(cvr["without"])
    assert any(not torch.allclose(cvr["with"][k], cvr["without"][k]) for k in cvr["with"])
    # Clicks without conversions only teach pCVR down; the converted ones pull it back up: on the clicked
    # test rows, the learner that saw the conversions predicts the higher mean pCVR.
    inter = pd.read_parquet(run.features / "interactions.parquet")
    clicked = inter[(inter["split"] == "test") & (inter["label"] == 1)].head(200)
    p = {n: lr.ranker.predict_tasks(clicked)["cvr"].mean() for n, lr in learners.items()}
    assert p["with"] > p["without"] + 1e-4, p
