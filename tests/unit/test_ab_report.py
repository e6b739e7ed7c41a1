"""``adrec ab-report`` on a tiny feedback log, against a hand computation."""

from __future__ import annotations

import json
import math

import pytest
from adrec.config import build_config
from adrec.evaluation.abtest import ab_report, ab_report_command, compare, wilson
from adrec.feedback import open_log
from adrec.run import RunDir


def _imp(eid, user, item, ts, arm):
    return {"event_id": eid, "user": user, "item": item, "type": "impression", "ts": ts, "context": {},
            "arm": arm, "version": {"A": "v1", "B": "v2"}.get(arm)}


def _ev(eid, user, item, ts, typ="click"):
    return {"event_id": eid, "user": user, "item": item, "type": typ, "ts": ts, "context": {}}


# Arm A: 4 impressions, 1 attributed click (a second click on the same impression is a repeat).
# Arm B: 5 impressions, 2 attributed clicks (a third comes after the 1800 s window: unattributed);
#        one conversion, on a clicked impression of B.
# One impression without an arm (served outside the test).
LOG = [
    _imp("i1", "ua1", "x", 100, "A"), _imp("i2", "ua1", "y", 110, "A"), _imp("i3", "ua2", "x", 120, "A"),
    _imp("i4", "ua2", "z", 130, "A"),
    _imp("i5", "ub1", "x", 100, "B"), _imp("i6", "ub1", "y", 105, "B"), _imp("i7", "ub2", "x", 110, "B"),
    _imp("i8", "ub2", "y", 115, "B"), _imp("i9", "ub2", "z", 118, "B"), _imp("i10", "uz", "x", 100, None),
    _ev("c1", "ua1", "x", 150), _ev("c2", "ua1", "x", 160), _ev("c3", "ub1", "x", 200), _ev("c4", "ub2", "y", 300),
    _ev("k1", "ub1", "x", 250, "conversion"), _ev("c5", "ub2", "z", 5000),
]


def test_the_report_matches_a_hand_computation():
    r = ab_report(LOG, alpha=0.05, window_s=1800.0, arm_order=["A", "B"])
    a, b = r["arms"]
    assert (a["arm"], a["impressions"], a["clicks"], a["conversions"]) == ("A", 4, 1, 0)
    assert (b["arm"], b["impressions"], b["clicks"], b["conversions"]) == ("B", 5, 2, 1)
    assert a["ctr"] == pytest.approx(0.25) and b["ctr"] == pytest.approx(0.4)
    assert a["versions"] == ["v1"] and b["versions"] == ["v2"]
    # Wilson 95% intervals (published tables: 1/4 -> 0.0456-0.6994, 2/5 -> 0.1176-0.7693)
    assert a["ctr_ci"] == pytest.approx([0.0456, 0.6994], abs=1e-4)
    assert b["ctr_ci"] == pytest.approx([0.1176, 0.7693], abs=1e-4)
    assert b["cvr"] == pytest.approx(0.5) and a["cvr"] == pytest.approx(0.0)
    ctr = next(c for c in r["comparisons"] if c["metric"] == "ctr")
    # by hand: diff 0.15; Wald half-width 1.96 * sqrt(.25*.75/4 + .4*.6/5) = 0.60371;
    # pooled p = 3/9, se = sqrt(1/3 * 2/3 * (1/4 + 1/5)) = sqrt(0.1); z = 0.15 / 0.316228 = 0.474342; p = 0.63526
    assert ctr["diff"] == pytest.approx(0.15)
    assert ctr["ci"] == pytest.approx([0.15 - 0.60371, 0.15 + 0.60371], abs=1e-4)
    assert ctr["z"] == pytest.approx(0.474342, abs=1e-5)
    assert ctr["p_value"] == pytest.approx(0.63526, abs=1e-4)
    assert ctr["verdict"].startswith("no significant CTR difference between B and A at 0.05")
    assert r["unassigned_impressions"] == 1
    att = r["attribution"]
    assert (att["attributed_clicks"], att["repeat_clicks"], att["unattributed_clicks"] + att["late_clicks"]) == (2 + 1, 1, 1)


def test_a_large_difference_gets_a_verdict_and_three_arms_are_corrected():
    log = []
    for arm, n, clicks in (("A", 2000, 100), ("B", 2000, 160), ("C", 2000, 104)):
        for i in range(n):
            log.append(_imp(f"{arm}{i}", f"u{arm}{i}", "x", 100 + i, arm))
            if i < clicks:
                log.append(_ev(f"c{arm}{i}", f"u{arm}{i}", "x", 101 + i))
    log.sort(key=lambda e: e["ts"])  # the arms' traffic interleaved in time, as a served log is
    r = ab_report(log, alpha=0.05, window_s=60.0, arm_order=["A", "B", "C"])
    assert r["level"] == pytest.approx(0.025)  # Bonferroni over two comparisons
    by = {c["arm"]: c for c in r["comparisons"]}
    assert by["B"]["p_value"] < 0.025 and by["B"]["verdict"].startswith("B higher CTR than A")
    assert by["C"]["p_value"] > 0.025 and by["C"]["verdict"].startswith("no significant")
    assert "cvr" not in r["arms"][0]  # no conversions logged: no CVR
    lo, hi = wilson(100, 2000, 0.025)
    assert lo < 0.05 < hi
    assert math.isnan(compare(1, 0, 1, 10, 0.05)["p_value"])


def test_the_command_reads_the_runs_log_and_writes_json(tmp_path):
    run = RunDir(tmp_path / "run")
    log = tmp_path / "run" / "feedback" / "events.jsonl"
    log.parent.mkdir(parents=True)
    with open_log(log).writer() as w:
        w.append(LOG)
    cfg = build_config(overrides=["serve.ab={arms: [{name: A, share: 0.5}, {name: B, share: 0.5}]}"])
    report, text = ab_report_command(cfg, run, None, 0.05)
    assert report["log"] == str(log) and [a["arm"] for a in report["arms"]] == ["A", "B"]
    saved = json.loads((run.report / "ab_report.json").read_text())
    assert saved["arms"][1]["clicks"] == 2 and saved["comparisons"][0]["vs"] == "A"
    assert "| B " in text and "no significant CTR difference" in text


def test_the_cli_prints_the_table(tmp_path, capsys):
    from adrec.cli import main

    log = tmp_path / "elsewhere.jsonl"
    with open_log(log).writer() as w:
        w.append(LOG)
    assert main(["ab-report", "--run", str(tmp_path / "run"), "--log", str(log), "--alpha", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "| A " in out and "| B " in out and "at 0.1 (p = " in out and str(log) in out
    saved = json.loads((tmp_path / "run" / "report" / "ab_report.json").read_text())
    assert saved["alpha"] == 0.1 and saved["unassigned_impressions"] == 1
