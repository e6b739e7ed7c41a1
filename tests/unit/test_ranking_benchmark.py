"""The ranker benchmark's verdict and report (no training here: the figures are given)."""

from benchmarks.ranker import markdown, target_check


def _ds(adrec_auc: float, adrec_ll: float) -> dict:
    def med(auc, ll):
        return {"median": {"auc": auc, "logloss": ll, "calibration": 1.0, "valid_auc": auc, "seconds": 1.0}}

    models = {"logreg": med(0.78, 0.56), "lightgbm": med(0.79, 0.57), "adrec": med(adrec_auc, adrec_ll)}
    models["adrec"]["median"]["train_seconds"] = 12.5
    return {"rows": {"train": 1, "valid": 1, "test": 1}, "test_ctr": 0.5, "models": models}


def test_target_needs_both_the_auc_margin_and_a_lower_logloss():
    t = target_check(_ds(0.801, 0.55))
    assert t["best_peer_auc"] == "lightgbm" and t["best_peer_logloss"] == "logreg"
    assert abs(t["auc_gain"] - 0.011) < 1e-9 and abs(t["logloss_gain"] - 0.01) < 1e-9 and t["met"]
    assert not target_check(_ds(0.799, 0.55))["met"]  # AUC gain under 0.01
    assert not target_check(_ds(0.801, 0.565))["met"]  # logloss not below the best peer's (logreg's)
    assert target_check({"models": {"logreg": _ds(0.8, 0.5)["models"]["logreg"]}}) == {}  # no adrec: no verdict


def test_markdown_has_the_table_the_verdict_and_the_robustness_rows():
    ds = _ds(0.801, 0.55)
    ds["target"] = target_check(ds)
    ds["robustness"] = {"fgsm_train_0": {"0.0": 0.8, "0.01": 0.7}, "fgsm_train_0.01": {"0.0": 0.79, "0.01": 0.76}}
    md = markdown({"protocol": {"split": "s", "seeds": [0, 1, 2]}, "datasets": {"movielens-100k": ds}})
    assert "| adrec | 0.8010 | 0.5500 |" in md and "target (AUC >= best + 0.01 and a lower logloss) met" in md
    assert "training alone (train_ranker on Ray Train, median): 12.5 s" in md
    assert "| without FGSM | 0.8000 | 0.7000 |" in md and "| with FGSM (eps 0.01) | 0.7900 | 0.7600 |" in md
