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


def test_slice_table_reads_the_strict_pass_for_new_items_and_checks_the_slice_targets():
    from benchmarks.ranker import slice_target_check

    ds = _ds(0.801, 0.55)
    sl = {"logreg": (0.70, 0.60), "lightgbm": (0.72, 0.61), "adrec": (0.76, 0.65), "adrec:no-text": (0.73, 0.62)}
    for m, (cold, new) in sl.items():
        ds["models"].setdefault(m, {"median": {"auc": 0.79, "logloss": 0.5, "calibration": 1.0, "valid_auc": 0.79,
                                               "seconds": 1.0}})
        ds["models"][m]["median"]["slices"] = {"cold_items": cold, "warm_items": 0.8, "few_shot_users": 0.7,
                                               "new_items": 0.99}  # the standard split's: not the table's
    ds["slice_rows"] = {"cold_items": 10, "warm_items": 90, "few_shot_users": 5, "new_items": 1}
    ds["new_items_protocol"] = {"fraction": 0.2, "held_out": 6, "new_item_rows": 40, "models": {
        m: {"median": {"slices": {"new_items": new}}} for m, (_, new) in sl.items()}}
    t = ds["slice_target"] = slice_target_check(ds)
    assert t["cold_items"]["best_peer"] == "lightgbm" and abs(t["cold_items"]["gain_over_best_peer"] - 0.04) < 1e-9
    assert abs(t["cold_items"]["gain_over_no_text"] - 0.03) < 1e-9 and t["cold_items"]["met"]
    assert abs(t["new_items"]["gain_over_best_peer"] - 0.04) < 1e-9 and t["new_items"]["met"]
    md = markdown({"protocol": {"split": "s", "seeds": [0]}, "datasets": {"movielens-100k": ds}})
    assert "| adrec | 0.8010 | 0.7600 | 0.8000 | 0.7000 | 0.6500 | 12 |" in md
    assert "cold items (10)" in md and "new items, strict (40)" in md and "6 items (20%)" in md
    ds["models"]["adrec"]["median"]["slices"]["cold_items"] = 0.74
    assert not slice_target_check(ds)["cold_items"]["met"]  # only +0.02 over the best peer
