"""``adrec ab-report``: the A/B arms of the feedback log compared, from the log alone.

- Impressions count in the arm the server logged with them (``arm``; impressions without one, served
  before or outside an A/B test, are counted apart and compared with nothing).
- Clicks label impressions by the online learner's attribution rules (:mod:`adrec.online.attribution`, the
  run's ``online.attribution_window_s``): a click labels the most recent unclicked impression of the same
  (user, item) at most one window before it; repeated, late and unattributed clicks count for no arm.
  CTR = labelled impressions / impressions.
- Conversions (``"conversion"`` records: ``POST /feedback`` with ``type: conversion``) label clicked impressions by the same rules, one window from the impression: CVR = converted /
  clicked impressions.
- Per arm a Wilson interval at 1 - alpha; each other arm against the first (the run config's serve.ab
  order, else the arms' names sorted): the difference with its Wald interval and a two-sided
  two-proportion z test (pooled variance). With more than two arms each comparison is made at alpha / (arms - 1)
  (Bonferroni). The verdict says whether the difference is significant at that level, and its direction.
"""

from __future__ import annotations

import json
import math
from typing import Any

from scipy.stats import norm

from adrec.evaluation.report import markdown_table
from adrec.feedback import CLICK, CONVERSION, IMPRESSION, open_log
from adrec.online.attribution import AttributionJoiner

NO_ARM = "(no arm)"


def wilson(successes: int, n: int, alpha: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion at level 1 - alpha (NaNs for n = 0)."""
    if n == 0:
        return math.nan, math.nan
    z = norm.ppf(1 - alpha / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def compare(s1: int, n1: int, s0: int, n0: int, alpha: float) -> dict[str, Any]:
    """Arm 1 against arm 0: difference p1 - p0, its Wald interval, the pooled z test's two-sided p-value."""
    if n0 == 0 or n1 == 0:
        return {"diff": math.nan, "ci": [math.nan, math.nan], "z": math.nan, "p_value": math.nan}
    p0, p1 = s0 / n0, s1 / n1
    diff = p1 - p0
    half = norm.ppf(1 - alpha / 2) * math.sqrt(p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1)
    pooled = (s0 + s1) / (n0 + n1)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n0 + 1 / n1))
    z = diff / se if se > 0 else 0.0
    return {"diff": diff, "ci": [diff - half, diff + half], "z": z, "p_value": float(2 * norm.sf(abs(z)))}


def _attribute(records: list[dict], window_s: float, outcome: str, eligible) -> tuple[dict[str, int], dict]:
    """Per impression event id (those ``eligible`` picks): 1 when an ``outcome`` record of the same user and
    item labels it by the learner's attribution rules, else 0; and the joiner's counters."""
    joiner = AttributionJoiner(window_s, max_ahead_s=None)
    labels: dict[str, int] = {}
    for r in records:
        if r.get("type") == IMPRESSION and eligible(r):
            out = joiner.impression(str(r["event_id"]), str(r["user"]), str(r["item"]), float(r["ts"]), {}, ())
        elif r.get("type") == outcome:
            out = joiner.click(str(r["user"]), str(r["item"]), float(r["ts"]))
        else:
            continue
        labels.update((e.event_id, e.label) for e in out)
    labels.update((e.event_id, e.label) for e in joiner.flush())
    return labels, joiner.counts


def label_impressions(records: list[dict], window_s: float) -> tuple[dict[str, int], dict[str, int], dict]:
    """Per impression event id: clicked (0/1), and converted (0/1, clicked impressions only); the joiners'
    counters. In log order, as the learner reads it; the end of the log labels whatever is still pending."""
    clicked, click_counts = _attribute(records, window_s, CLICK, lambda r: True)
    converted, conv_counts = _attribute(records, window_s, CONVERSION, lambda r: clicked.get(str(r["event_id"])))
    n_conv = sum(r.get("type") == CONVERSION for r in records)
    return clicked, converted, {"clicks": click_counts, "conversions": conv_counts if n_conv else None}


def ab_report(records: list[dict], alpha: float = 0.05, window_s: float = 1800.0,
              arm_order: list[str] | None = None) -> dict[str, Any]:
    """The A/B comparison of a feedback log's records (see the module)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    clicked, converted, counts = label_impressions(records, window_s)
    has_conversions = counts["conversions"] is not None
    per: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("type") != IMPRESSION:
            continue
        arm = r.get("arm") or NO_ARM
        a = per.setdefault(arm, {"arm": arm, "impressions": 0, "clicks": 0, "conversions": 0, "versions": set()})
        eid = str(r["event_id"])
        a["impressions"] += 1
        a["clicks"] += clicked.get(eid, 0)
        a["conversions"] += converted.get(eid, 0)
        if r.get("version") is not None:
            a["versions"].add(str(r["version"]))
    unassigned = per.pop(NO_ARM, None)
    names = [a for a in (arm_order or []) if a in per] + sorted(a for a in per if a not in (arm_order or []))
    level = alpha / max(1, len(names) - 1)
    arms = []
    for name in names:
        a = per[name]
        row = {**a, "versions": sorted(a["versions"]), "ctr": _ratio(a["clicks"], a["impressions"]),
               "ctr_ci": list(wilson(a["clicks"], a["impressions"], level))}
        if has_conversions:
            row.update(cvr=_ratio(a["conversions"], a["clicks"]), cvr_ci=list(wilson(a["conversions"], a["clicks"], level)))
        else:
            del row["conversions"]
        arms.append(row)
    comparisons = []
    for row in arms[1:]:
        base = arms[0]
        metrics = [("ctr", "clicks", "impressions")] + ([("cvr", "conversions", "clicks")] if has_conversions else [])
        for metric, num, den in metrics:
            c = compare(row[num], row[den], base[num], base[den], level)
            comparisons.append({"arm": row["arm"], "vs": base["arm"], "metric": metric, **c,
                                "verdict": _verdict(row["arm"], base["arm"], metric, c, level)})
    return {"alpha": alpha, "level": level, "window_s": window_s, "arms": arms, "comparisons": comparisons,
            "unassigned_impressions": unassigned["impressions"] if unassigned else 0,
            "attribution": counts["clicks"], "conversion_attribution": counts["conversions"]}


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


def _verdict(arm: str, base: str, metric: str, c: dict, level: float) -> str:
    if math.isnan(c["p_value"]):
        return f"no verdict: an arm has no {'impressions' if metric == 'ctr' else 'clicks'}"
    if c["p_value"] < level:
        return f"{arm} {'higher' if c['diff'] > 0 else 'lower'} {metric.upper()} than {base} (p = {c['p_value']:.3g} < {level:g})"
    return f"no significant {metric.upper()} difference between {arm} and {base} at {level:g} (p = {c['p_value']:.3g})"


def report_table(report: dict) -> str:
    """The printed form: one row per arm, then one per comparison."""
    rows = []
    for a in report["arms"]:
        row = {"arm": a["arm"], "impressions": a["impressions"], "clicks": a["clicks"], "CTR": a["ctr"],
               f"CTR {1 - report['level']:.3g} CI": _interval(a["ctr_ci"])}
        if "cvr" in a:
            row.update({"conversions": a["conversions"], "CVR": a["cvr"], "CVR CI": _interval(a["cvr_ci"])})
        row["versions"] = ", ".join(a["versions"])
        rows.append(row)
    text = markdown_table(rows) if rows else "no impression carries an A/B arm"
    if report["comparisons"]:
        text += "\n\n" + markdown_table([{"arm": c["arm"], "vs": c["vs"], "metric": c["metric"], "difference": c["diff"],
                                          "CI": _interval(c["ci"]), "p-value": c["p_value"], "verdict": c["verdict"]}
                                         for c in report["comparisons"]])
    if report["unassigned_impressions"]:
        text += f"\n\n{report['unassigned_impressions']} impression(s) without an arm (not compared)."
    return text


def _interval(ci: list[float]) -> str:
    return "" if any(math.isnan(x) for x in ci) else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def ab_report_command(cfg, run, log_uri: str | None, alpha: float) -> tuple[dict, str]:
    """``adrec ab-report``: the report of the run's feedback log (or ``log_uri``), written to
    ``<run>/report/ab_report.json``; returns it and its printed table."""
    from adrec.serving.args import default_feedback_log

    uri = log_uri or cfg.serve.feedback_log or default_feedback_log(run.uri)
    order = [a.name for a in cfg.serve.ab.arms] if cfg.serve.ab is not None else None
    report = {"log": str(uri), **ab_report(open_log(uri).records(), alpha, cfg.online.attribution_window_s, order)}
    run.report.mkdir(parents=True, exist_ok=True)
    out = run.report / "ab_report.json"
    out.write_text(json.dumps(_json_ready(report), indent=2) + "\n")
    return report, f"{report_table(report)}\n\nfeedback log: {uri}\nreport: {out}"


def _json_ready(x):
    """NaN -> null (strict JSON, as metrics.json)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_ready(v) for v in x]
    return x
