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


def _multitask(esmm_ctcvr: float, esmm_ctr: float, single_ctrs=(0.80,)) -> dict:
    from benchmarks.ranker_multitask import BASELINE, CVR_ON_CLICKS, ESMM, SINGLE

    runs = [{"seed": i, ESMM: {"ctr_auc": esmm_ctr, "cvr_auc": 0.7, "ctcvr_auc": esmm_ctcvr, "train_seconds": 10.0},
             SINGLE: {"ctr_auc": c, "train_seconds": 8.0},
             CVR_ON_CLICKS: {"cvr_auc": 0.65, "train_seconds": 3.0},
             BASELINE: {"ctr_auc": c, "cvr_auc": 0.65, "ctcvr_auc": 0.75, "train_seconds": 11.0}}
            for i, c in enumerate(single_ctrs)]
    models = [m for m in runs[0] if m != "seed"]
    median = {m: {k: sorted(r[m][k] for r in runs)[len(runs) // 2] for k in runs[0][m]} for m in models}
    return {"rows": {"test": 100}, "clicked_rows": {"train": 50, "test": 10}, "conversions": {"train": 9, "test": 2},
            "runs": runs, "median": median}


def test_multitask_target_needs_the_ctcvr_margin_and_a_ctr_within_seed_noise():
    from benchmarks.ranker_multitask import markdown_lines, target_check

    t = target_check(_multitask(0.756, 0.799), ctr_tolerance=0.002)
    assert abs(t["ctcvr_gain"] - 0.006) < 1e-9 and abs(t["ctr_diff"] + 0.001) < 1e-9 and t["met"]
    assert t["ctr_noise_from"].startswith("stated tolerance")
    assert not target_check(_multitask(0.754, 0.80))["ctcvr_met"]  # under +0.005 over the baseline
    assert not target_check(_multitask(0.76, 0.797), ctr_tolerance=0.002)["ctr_met"]  # CTR lost beyond the noise
    # With several seeds the noise is the single-task CTR AUC's spread over them (0.006 here).
    many = target_check(_multitask(0.76, 0.797, single_ctrs=(0.798, 0.80, 0.804)))
    assert many["ctr_noise_from"] == "seed spread" and abs(many["ctr_noise"] - 0.006) < 1e-9 and many["ctr_met"]
    table = _multitask(0.756, 0.799)
    table["target"] = target_check(table, ctr_tolerance=0.002)
    md = "\n".join(markdown_lines("synthetic", table))
    assert "| esmm | 0.7990 | 0.7000 | 0.7560 | 10 |" in md and "| ctr x cvr-on-clicks | 0.8000 | 0.6500 | 0.7500 | 11 |" in md
    assert "CTCVR AUC: +0.0060 (target >= +0.005: met)" in md
    assert "skipped" in markdown_lines("x", {"skipped": "no conversion label"})[-1]


def test_multitask_reuses_an_earlier_runs_baseline_of_the_same_preparation_only(tmp_path):
    import json
    from types import SimpleNamespace

    import pandas as pd
    import pytest

    from benchmarks.ranker_multitask import ClickedOnly, _counts, reusable_runs

    inter = pd.DataFrame({"split": ["train", "train", "valid", "test", "test"], "label": [1, 0, 1, 1, 0],
                          "conversion": [1, 0, 0, 1, 0]})
    feats = SimpleNamespace(spec=None, interactions=inter, items=None, users=None)
    table = {**_counts(feats), "runs": [{"seed": 0, "single-task": {"ctr_auc": 0.7}}]}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"datasets": {"synthetic": {"multitask": table}}}))
    assert reusable_runs(report, feats) == {0: table["runs"][0]}  # a benchmark report holds it per data set
    alone = tmp_path / "table.json"
    alone.write_text(json.dumps(table))
    assert reusable_runs(alone, feats)[0]["single-task"]["ctr_auc"] == 0.7
    other = SimpleNamespace(interactions=inter.assign(conversion=[0, 0, 0, 1, 0]))  # another preparation
    with pytest.raises(ValueError, match="no multi-task table of this preparation"):
        reusable_runs(report, other)
    clicked = ClickedOnly.of(feats)  # the clicked-only CVR model's rows: what train_ranker is handed
    assert clicked.sharded is False and clicked.row_count() == 3
    assert clicked.interactions["label"].tolist() == [1, 0, 1] and "conversion" not in clicked.interactions


def test_multitask_tables_of_one_preparation_merge_per_seed():
    import pytest

    from benchmarks.ranker_multitask import BASELINE, ESMM, SINGLE, merge_tables

    full = _multitask(0.756, 0.799, single_ctrs=(0.80, 0.802))
    esmm_only = {**full, "parts": ["esmm"], "runs": [{"seed": r["seed"], ESMM: r[ESMM]} for r in full["runs"]]}
    base_only = {**full, "parts": ["baseline"],
                 "runs": [{k: v for k, v in r.items() if k != ESMM} for r in full["runs"]]}
    merged = merge_tables([esmm_only, base_only], ctr_tolerance=0.002)
    assert merged["runs"] == full["runs"] and merged["parts"] == ["baseline", "esmm"]
    assert abs(merged["target"]["ctcvr_gain"] - 0.006) < 1e-9 and merged["median"][SINGLE]["ctr_auc"] == 0.801
    assert "target" not in merge_tables([esmm_only])  # no baseline rows: nothing to compare with
    with pytest.raises(ValueError, match="more than one table"):
        merge_tables([full, base_only])
    with pytest.raises(ValueError, match="different preparations"):
        merge_tables([esmm_only, {**base_only, "rows": {"test": 99}}])
    with pytest.raises(ValueError, match="lack models"):
        merge_tables([esmm_only, {**base_only, "runs": base_only["runs"][:1]}])
    assert BASELINE in merged["median"]
