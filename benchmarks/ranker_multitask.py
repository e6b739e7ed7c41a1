"""The ranker benchmark's multi-task table (issue 17): ESMM against a CTR model times an independent CVR model.

On the ranker benchmark's prepared features of a data set with a conversion label, for every seed:

- ``single-task``: adrec's ranker as it ships (``ranker.tasks=[ctr]``), trained on every row: pCTR;
- ``cvr on clicks``: the same architecture, single-task, trained on the clicked rows only with the
  conversion as its label (the selection-biased estimator ESMM replaces): pCVR;
- ``baseline``: pCTCVR = pCTR (single-task) x pCVR (clicks only);
- ``esmm``: ``ranker.tasks=[ctr, cvr]`` on every row (:mod:`adrec.ranking.model`): pCTR, pCVR, pCTCVR.

Scored on the test split: CTR AUC (every impression), CVR AUC (the clicked impressions: the only ones with a
conversion label of their own), CTCVR AUC (every impression, click and conversion). Every ranker trains with
``train_ranker`` on Ray Train, the path ``adrec train`` runs. Targets: ESMM's CTCVR AUC at least
``CTCVR_MARGIN`` above the baseline's, its CTR AUC no worse than the single-task ranker's within seed noise
(the spread of the single-task CTR AUC over the seeds; with one seed, ``ctr_tolerance``).

ESMM's rows also hold its valid CTR / CVR / CTCVR AUCs at the selected epoch (what its settings are chosen on).
``parts`` trains one side only (``esmm``; ``baseline``: the single-task and clicked-only models), so that the two
sides, or the seeds, run in processes of their own; :func:`merge_reports` (``python -m
benchmarks.ranker_multitask``) then joins such reports of one preparation per seed, and ``baseline_from`` lets
an ESMM variant reuse an earlier run's baseline rows.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from adrec.config import AdrecConfig
from adrec.metrics import conversion_metrics
from adrec.metrics import auc as _auc
from adrec.run import RunDir

log = logging.getLogger(__name__)

ESMM, SINGLE, CVR_ON_CLICKS, BASELINE = "esmm", "single-task", "cvr on clicks", "ctr x cvr-on-clicks"
PARTS = ("esmm", "baseline")  # what run_multitask can train: ESMM; the single-task and clicked-only CVR models
CTCVR_MARGIN = 0.005  # issue 17's target: ESMM's CTCVR AUC at least this far above the baseline's
# With one seed, the CTR "seed noise": the spread (max - min) of the single-task ranker's test AUC over seeds
# 0, 1, 2 in the ranker benchmark (benchmarks/ranker_benchmark_synthetic.json: 0.0047; MovieLens: 0.0023).
DEFAULT_CTR_TOLERANCE = 0.005


@dataclass
class ClickedOnly:
    """The clicked rows of a feature set, relabelled with their conversions: what the independent CVR model of
    the baseline trains and selects on (shaped like :class:`adrec.features.pipeline.Features`)."""

    spec: object
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    sharded: bool = False  # in memory: train_ranker's in-memory feed (it asks, since the streamed feed came)

    @classmethod
    def of(cls, features) -> ClickedOnly:
        inter = features.interactions
        clicked = inter[inter["label"] == 1]
        rows = clicked.assign(label=clicked["conversion"].to_numpy()).drop(columns=["conversion"])
        return cls(features.spec, rows.reset_index(drop=True), features.items, features.users)

    def rows(self, *splits: str) -> pd.DataFrame:
        return self.interactions[self.interactions["split"].isin(splits)]

    def row_count(self) -> int:
        return len(self.interactions)


def _train(cfg: AdrecConfig, run: RunDir, features, seed: int, tasks: list[str]):
    from adrec.ranking.fusion import FusionRanker
    from adrec.ranking.train import train_ranker

    rc = cfg.ranker.model_copy(update={"seed": seed, "tasks": tasks})
    summary = train_ranker(cfg.model_copy(update={"ranker": rc}), run, features=features)
    return FusionRanker.load(run.ranker), summary


def _valid_at_best(summary: dict) -> dict:
    """ESMM's valid CTR / CVR / CTCVR AUCs at its selected epoch (what its settings are chosen on)."""
    if summary.get("cvr_epochs"):  # ranker.cvr_tower_epochs: the kept epoch of the CVR tower alone
        best = [h for h in summary["history"] if h.get("phase") == "cvr" and h["cvr_epoch"] == summary["cvr_epochs"]]
    else:
        best = [h for h in summary["history"] if h.get("phase") == "select" and h["epoch"] == summary["best_epoch"]]
    return {k: float(best[-1][k]) for k in ("valid_ctr_auc", "valid_cvr_auc", "valid_ctcvr_auc")
            if best and k in best[-1]}


def _one_seed(cfg: AdrecConfig, run: RunDir, features, seed: int, parts=PARTS, reused: dict | None = None) -> dict:
    """One seed's rows: ``parts`` says which models train here (``esmm``; ``baseline``: the single-task and
    the clicked-only CVR models); ``reused``: that seed's rows of an earlier run for the parts not trained."""
    test = features.rows("test").reset_index(drop=True)
    clicks = test["label"].to_numpy().astype(np.int64)
    conversions = test["conversion"].to_numpy().astype(np.int64) * clicks
    out = {}

    if "esmm" in parts:
        t0 = time.perf_counter()
        esmm, s_esmm = _train(cfg, run, features, seed, ["ctr", "cvr"])
        p = esmm.predict_tasks(test)
        out[ESMM] = {"ctr_auc": _auc(clicks, p["ctr"]), **_conv(clicks, conversions, p["cvr"], p["ctcvr"]),
                     **_valid_at_best(s_esmm), "train_seconds": float(s_esmm["seconds"]),
                     "best_epoch": int(s_esmm["best_epoch"]), **({"cvr_epochs": int(s_esmm["cvr_epochs"])}
                                                                  if "cvr_epochs" in s_esmm else {}),
                     "seconds": round(time.perf_counter() - t0, 2)}
    elif reused and ESMM in reused:
        out[ESMM] = reused[ESMM]

    if "baseline" not in parts:
        if reused is not None:
            if SINGLE not in reused:
                raise ValueError(f"seed {seed}: the reused run has no baseline rows for this seed; run the "
                                 "baseline part of it (--multitask-parts baseline --seeds ...) first")
            out.update({m: reused[m] for m in (SINGLE, CVR_ON_CLICKS, BASELINE)})
        # else: ESMM's rows alone, to be merged with a baseline run's (merge_reports)
    else:
        t0 = time.perf_counter()
        single, s_single = _train(cfg, run, features, seed, ["ctr"])
        p_ctr = single.predict(test)
        out[SINGLE] = {"ctr_auc": _auc(clicks, p_ctr), "train_seconds": float(s_single["seconds"]),
                       "best_epoch": int(s_single["best_epoch"]), "seconds": round(time.perf_counter() - t0, 2)}

        t0 = time.perf_counter()
        cvr_model, s_cvr = _train(cfg, run, ClickedOnly.of(features), seed, ["ctr"])
        p_cvr = cvr_model.predict(test)  # its one task is the conversion of a click: pCVR for every test row
        out[CVR_ON_CLICKS] = {**_conv(clicks, conversions, p_cvr, p_cvr), "train_seconds": float(s_cvr["seconds"]),
                              "best_epoch": int(s_cvr["best_epoch"]), "seconds": round(time.perf_counter() - t0, 2)}
        out[CVR_ON_CLICKS].pop("ctcvr_auc")  # pCVR alone is no CTCVR estimate: the baseline's row has that
        out[BASELINE] = {"ctr_auc": out[SINGLE]["ctr_auc"], **_conv(clicks, conversions, p_cvr, p_ctr * p_cvr),
                         "train_seconds": out[SINGLE]["train_seconds"] + out[CVR_ON_CLICKS]["train_seconds"]}
    log.info("multi-task / seed %d: %s", seed, {m: {k: round(v, 4) for k, v in r.items() if k.endswith("auc")}
                                                 for m, r in out.items()})
    return out


def reusable_runs(path, features) -> dict:
    """The per-seed rows of an earlier multi-task run (its JSON: a benchmark report or the table alone), checked
    to be of this very preparation (the same split sizes, clicks and conversions)."""
    import json
    from pathlib import Path

    doc = json.loads(Path(path).read_text())
    tables = [ds["multitask"] for ds in doc.get("datasets", {}).values() if "multitask" in ds] or [doc]
    here = _counts(features)
    for table in tables:
        if all(table.get(k) == v for k, v in here.items()):
            return {r["seed"]: r for r in table["runs"]}
    raise ValueError(f"{path}: no multi-task table of this preparation ({here}); rerun its baseline part")


def _counts(features) -> dict:
    inter = features.interactions
    return {"rows": {s: int((inter["split"] == s).sum()) for s in ("train", "valid", "test")},
            "clicked_rows": {s: int(((inter["split"] == s) & (inter["label"] == 1)).sum())
                             for s in ("train", "valid", "test")},
            "conversions": {s: int(((inter["split"] == s) & (inter["conversion"] == 1)).sum())
                            for s in ("train", "valid", "test")}}


def _conv(clicks, conversions, p_cvr, p_ctcvr) -> dict:
    m = conversion_metrics(clicks, conversions, p_cvr, p_ctcvr)
    return {"cvr_auc": m["cvr.auc"], "ctcvr_auc": m["ctcvr.auc"]}


def run_multitask(cfg: AdrecConfig, run: RunDir, features, seeds, ctr_tolerance: float = DEFAULT_CTR_TOLERANCE,
                  write=lambda table: None, parts=PARTS, baseline_from=None) -> dict:
    """The multi-task table of one prepared data set: per model its runs and medians, and the targets.

    ``parts``: the models trained here (``("esmm", "baseline")``: all); ``baseline_from``: the JSON of an earlier
    run of this preparation whose rows (per seed) stand for the parts not trained here: an ESMM variant is
    then compared with the very baseline models that run trained, at the cost of ESMM's trainings alone."""
    if "conversion" not in features.interactions.columns:
        return {"skipped": "the data set has no conversion label (the schema's interactions.conversion)"}
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"multi-task parts must be among {PARTS}, not {list(parts)}")
    reused = reusable_runs(baseline_from, features) if baseline_from else {}
    table: dict = {**_counts(features), "parts": list(parts), "runs": []}
    if baseline_from:
        table["reused_from"] = str(baseline_from)
    for seed in seeds:
        if baseline_from and seed not in reused:
            raise ValueError(f"{baseline_from} has no run of seed {seed}")
        table["runs"].append({"seed": seed, **_one_seed(cfg, run, features, seed, parts,
                                                        reused.get(seed) if baseline_from else None)})
        write(table)
    _summarize(table, ctr_tolerance)
    write(table)
    return table


def _summarize(table: dict, ctr_tolerance: float = DEFAULT_CTR_TOLERANCE) -> None:
    """Medians over the runs per model (and key), and the targets where ESMM and the baseline are both in."""
    models = [m for m in table["runs"][0] if m != "seed"]
    table["median"] = {m: {k: float(statistics.median(r[m][k] for r in table["runs"]))
                           for k in table["runs"][0][m]} for m in models}
    table.pop("target", None)
    if ESMM in table["median"] and BASELINE in table["median"]:
        table["target"] = target_check(table, ctr_tolerance)


def merge_tables(tables: list[dict], ctr_tolerance: float = DEFAULT_CTR_TOLERANCE) -> dict:
    """One table of several runs of the same preparation (e.g. ESMM and the baseline trained in parallel
    processes, or seeds split over processes): per seed, the union of their models' rows. Refuses tables
    of another preparation and two rows of one model and seed."""
    first = tables[0]
    counts = {k: first[k] for k in ("rows", "clicked_rows", "conversions")}
    by_seed: dict[int, dict] = {}
    for t in tables:
        if any(t.get(k) != v for k, v in counts.items()):
            raise ValueError(f"cannot merge multi-task tables of different preparations: {counts} vs "
                             f"{ {k: t.get(k) for k in counts} }")
        for r in t["runs"]:
            row = by_seed.setdefault(r["seed"], {"seed": r["seed"]})
            twice = set(row) & set(r) - {"seed"}
            if twice:
                raise ValueError(f"seed {r['seed']}: {sorted(twice)} come from more than one table")
            row.update(r)
    runs = [by_seed[s] for s in sorted(by_seed)]
    incomplete = [r["seed"] for r in runs if set(r) != set(runs[0])]
    if incomplete:
        raise ValueError(f"seeds {incomplete} lack models the others have: {sorted(set(runs[0]) - {'seed'})}")
    table = {**counts, "parts": sorted({p for t in tables for p in t.get("parts", PARTS)}), "runs": runs}
    _summarize(table, ctr_tolerance)
    return table


def merge_reports(paths, out, name: str, ctr_tolerance: float = DEFAULT_CTR_TOLERANCE) -> dict:
    """Benchmark reports (``benchmark_ranker.py --multitask`` JSONs) merged data set by data set into
    ``<out>/<name>.{json,md}``: the first report's protocol and data set figures, the merged multi-task table.
    A path ``report.json::esmm`` takes only that model's rows of the report (see :func:`_pick`)."""
    import json
    from pathlib import Path

    from .ranker import _write

    picks = [_pick(p) for p in paths]
    reports = [json.loads(Path(p).read_text()) for p, _ in picks]
    for r, (_, models) in zip(reports, picks):
        if models:  # "report.json::esmm": only these models' rows of that report
            for ds in r["datasets"].values():
                if "multitask" in ds:
                    ds["multitask"]["runs"] = [{k: v for k, v in run.items() if k == "seed" or k in models}
                                               for run in ds["multitask"]["runs"]]
    merged = json.loads(json.dumps(reports[0]))
    merged["protocol"]["seeds"] = sorted({s for r in reports for s in r["protocol"]["seeds"]})
    merged["protocol"]["merged_from"] = [str(p) for p in paths]
    merged["protocol"]["overrides_by_file"] = {str(p): r["protocol"].get("overrides", [])
                                               for p, r in zip(paths, reports)}
    for ds in merged["datasets"]:
        having = [r for r in reports if "multitask" in r["datasets"].get(ds, {})]
        table = merge_tables([r["datasets"][ds]["multitask"] for r in having], ctr_tolerance)
        # the settings ESMM was trained with (its --set overrides), from the reports its rows came from
        trained_esmm = [r for r in having if any(ESMM in run for run in r["datasets"][ds]["multitask"]["runs"])]
        table["esmm_overrides"] = sorted({o for r in trained_esmm for o in r["protocol"].get("overrides", [])})
        merged["datasets"][ds]["multitask"] = table
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write(merged, out, name)
    return merged


def _pick(path: str) -> tuple[str, set[str]]:
    """``report.json`` (every model's rows) or ``report.json::esmm,single-task`` (those models' rows only)."""
    path = str(path)
    if "::" not in path:
        return path, set()
    path, models = path.split("::", 1)
    unknown = {m.strip() for m in models.split(",")} - {ESMM, SINGLE, CVR_ON_CLICKS, BASELINE}
    if unknown:
        raise ValueError(f"{path}: unknown multi-task models {sorted(unknown)}")
    return path, {m.strip() for m in models.split(",")}


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.ranker_multitask --out DIR --name NAME a.json b.json ...``: merge_reports."""
    import argparse

    ap = argparse.ArgumentParser(description="merge multi-task benchmark reports of one preparation")
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--ctr-tolerance", type=float, default=DEFAULT_CTR_TOLERANCE)
    args = ap.parse_args(argv)
    merge_reports(args.reports, args.out, args.name, args.ctr_tolerance)
    return 0



def target_check(table: dict, ctr_tolerance: float = DEFAULT_CTR_TOLERANCE) -> dict:
    """ESMM's median CTCVR AUC minus the baseline's (target >= ``CTCVR_MARGIN``) and its median CTR AUC minus
    the single-task ranker's (target >= minus the seed noise: the single-task CTR AUC's spread over the
    seeds, or ``ctr_tolerance`` with fewer than two)."""
    med = table["median"]
    single = [r[SINGLE]["ctr_auc"] for r in table["runs"]]
    noise = max(single) - min(single) if len(single) > 1 else ctr_tolerance
    ctcvr_gain = med[ESMM]["ctcvr_auc"] - med[BASELINE]["ctcvr_auc"]
    ctr_diff = med[ESMM]["ctr_auc"] - med[SINGLE]["ctr_auc"]
    return {"ctcvr_gain": ctcvr_gain, "ctr_diff": ctr_diff, "ctr_noise": noise,
            "ctr_noise_from": "seed spread" if len(single) > 1 else "stated tolerance (one seed)",
            "ctcvr_met": bool(ctcvr_gain >= CTCVR_MARGIN), "ctr_met": bool(ctr_diff >= -noise),
            "met": bool(ctcvr_gain >= CTCVR_MARGIN and ctr_diff >= -noise)}


def markdown_lines(name: str, table: dict) -> list[str]:
    """The multi-task section of the benchmark's markdown for one data set."""
    if "skipped" in table:
        return ["", f"Multi-task ({name}): skipped, {table['skipped']}."]
    if "median" not in table:
        return []
    seeds = [r["seed"] for r in table["runs"]]
    lines = ["", (f"Multi-task (issue 17; seeds {seeds}, medians): test rows {table['rows']['test']}, clicked "
                  f"{table['clicked_rows']['test']}, conversions {table['conversions']['test']} (train: "
                  f"{table['clicked_rows']['train']} clicks, {table['conversions']['train']} conversions). CTR and "
                  "CTCVR AUC on every test impression, CVR AUC on the clicked ones."), "",
             "| model | CTR AUC | CVR AUC | CTCVR AUC | train s |", "|---|---|---|---|---|"]

    def cell(v):
        return f"{v:.4f}" if v is not None and not math.isnan(v) else ""

    for model in (ESMM, SINGLE, CVR_ON_CLICKS, BASELINE):
        m = table["median"].get(model)
        if m is None:
            continue
        lines.append(f"| {model} | {cell(m.get('ctr_auc'))} | {cell(m.get('cvr_auc'))} | {cell(m.get('ctcvr_auc'))} | "
                     f"{m['train_seconds']:.0f} |")
    if table.get("esmm_overrides"):
        lines += ["", f"ESMM trained with {', '.join('`' + o + '`' for o in table['esmm_overrides'])}."]
    if "reused_from" in table:
        lines += ["", (f"The single-task and clicked-only CVR rows are those of {table['reused_from']} (the same "
                       "preparation and seeds); ESMM was trained in this run.")]
    t = table.get("target")
    if t is None:
        return lines
    lines += ["", (f"ESMM minus the baseline, CTCVR AUC: {t['ctcvr_gain']:+.4f} (target >= +{CTCVR_MARGIN}: "
                   f"{'met' if t['ctcvr_met'] else 'NOT met'}); ESMM minus the single-task ranker, CTR AUC: "
                   f"{t['ctr_diff']:+.4f} (target >= -{t['ctr_noise']:.4f}, {t['ctr_noise_from']}: "
                   f"{'met' if t['ctr_met'] else 'NOT met'}).")]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
