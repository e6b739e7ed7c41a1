"""The ranker benchmark (issue 3): adrec's fusion ranker beside its peers, same features, same split.

For each data set: the prepare stage writes the features once; then, for every seed, each peer
(:mod:`benchmarks.ranker_peers`) and adrec's ranker (``train_ranker`` on Ray Train, the path
``adrec train`` runs) fit on train, select on valid, refit on train + valid when configured, and
predict test. Reported per model: test AUC, logloss, calibration (mean predicted / observed click
rate) and wall time, as medians over the seeds, in ``results.json`` and ``results.md``; and the test AUC
on the slices where text matters (issue 14, :mod:`adrec.evaluation.slices`): cold and warm items,
few-shot users, and new items under the strict item cold-start protocol (a second preparation where a
seeded 20% of the items lose their train and valid rows, every model trained again on it).
``--ablation`` adds adrec's variants (no text tower, frozen, LoRA, last-N layers, collaborative
features) on every slice. ``--multitask`` adds the multi-task table of issue 17 on every data set with a
conversion label (:mod:`benchmarks.ranker_multitask`: ESMM against a CTR model times a CVR model trained on
the clicked rows only).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform as _platform
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from adrec.config import AdrecConfig, build_config
from adrec.evaluation.slices import COLD_MAX, SLICES, slice_masks, slice_metrics
from adrec.metrics import auc, calibration, logloss
from adrec.run import RunDir

from .ranker_multitask import DEFAULT_CTR_TOLERANCE, PARTS, markdown_lines, run_multitask
from .ranker_peers import PEERS, BenchData, run_peer

log = logging.getLogger(__name__)

ADREC = "adrec"
MODELS = (*PEERS, ADREC)
# The ablation (issue 14): adrec with one change to its ranker config each (``--models`` may name them).
VARIANTS: dict[str, list[str]] = {
    "adrec:no-text": ["ranker.text_tower=false"],
    "adrec:frozen": ["ranker.finetune=frozen"],
    "adrec:lora": ["ranker.finetune=lora"],
    "adrec:last-n": ["ranker.finetune=last_n"],
    "adrec:collab": ["ranker.collab=[ease,als,itemitem]"],
}
ALL_MODELS = (*MODELS, *VARIANTS)
# The quick run: a small synthetic log, the tiny encoder, one seed, short training.
QUICK_SYNTHETIC = ["data.synthetic.n_users=300", "data.synthetic.n_ads=100", "data.synthetic.n_impressions=8000"]
QUICK_RANKER = ["ranker.tiny_encoder=true", "ranker.epochs=2", "ranker.embed_dim=8", "ranker.hidden=[32]"]


def dataset_overrides(name: str, data_dir: str | None, quick: bool) -> list[str]:
    if name in ("movielens-100k", "ml-100k"):
        if not data_dir:
            raise ValueError("movielens-100k needs --data-dir (the unpacked ml-100k folder)")
        return ["data.dataset=movielens-100k", f"data.data_dir={data_dir}"]
    if name == "synthetic":
        return ["data.dataset=synthetic", *(QUICK_SYNTHETIC if quick else [])]
    return [f"data.dataset={name}", *([f"data.data_dir={data_dir}"] if data_dir else [])]


def is_adrec(model: str) -> bool:
    return model == ADREC or model in VARIANTS


def _metrics(y: np.ndarray, p: np.ndarray) -> dict:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return {"auc": float(auc(y, p)), "logloss": float(logloss(y, p)), "calibration": float(calibration(y, p))}


def _adrec(cfg: AdrecConfig, run: RunDir, features, seed: int) -> dict:
    from adrec.ranking.fusion import FusionRanker
    from adrec.ranking.train import train_ranker

    t0 = time.perf_counter()
    cfg = cfg.model_copy(update={"ranker": cfg.ranker.model_copy(update={"seed": seed})})
    summary = train_ranker(cfg, run, features=features)
    ranker = FusionRanker.load(run.ranker)
    test = features.rows("test")
    pred = ranker.predict(test)
    return {"pred": pred, "valid_auc": summary["valid_auc"], "seconds": time.perf_counter() - t0, "ranker": ranker,
            "choice": {"best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
                       "train_seconds": summary["seconds"]}}


def robustness(cfg: AdrecConfig, run: RunDir, features, epsilon_train: float, seed: int = 0,
               trained: dict | None = None) -> dict:
    """FGSM robustness AUC (``cfg.eval.fgsm_epsilons``) of adrec trained without and with FGSM.

    ``trained``: rankers already trained with this config and ``seed``, by their FGSM epsilon (the
    benchmark's own seed run without FGSM): reused rather than trained again.
    """
    from adrec.ranking.fgsm import robustness_auc
    from adrec.ranking.fusion import FusionRanker
    from adrec.ranking.train import train_ranker

    test = features.rows("test")
    out = {}
    for eps_train in (0.0, epsilon_train):
        ranker = (trained or {}).get(eps_train)
        if ranker is None:
            rc = cfg.ranker.model_copy(update={"seed": seed, "fgsm_epsilon": eps_train})
            train_ranker(cfg.model_copy(update={"ranker": rc}), run, features=features)
            ranker = FusionRanker.load(run.ranker)
        out[f"fgsm_train_{eps_train:g}"] = {str(k): v for k, v in
                                            robustness_auc(ranker, test, cfg.eval.fgsm_epsilons).items()}
    return out


def _models_pass(cfg: AdrecConfig, run: RunDir, features, data: BenchData, models, seeds, refit: bool, quick: bool,
                 masks: dict, label: str, variant_cfgs: dict | None = None, trained: dict | None = None,
                 write=lambda models: None) -> dict:
    """Every model on every seed on one prepared data set: per model ``{"runs": [...], "median": {...}}``,
    each run with its test metrics and its AUC on every slice of ``masks``."""
    y = data.test["label"].to_numpy().astype(np.int64)
    out: dict = {}
    for model in models:
        runs, skipped = [], None
        for seed in seeds:
            if is_adrec(model):
                r = _adrec((variant_cfgs or {}).get(model, cfg), run, features, seed)
                pred, valid_auc, secs, choice = r["pred"], r["valid_auc"], r["seconds"], r["choice"]
                if trained is not None and model == ADREC and seed == seeds[0] and cfg.ranker.fgsm_epsilon == 0:
                    trained[0.0] = r["ranker"]
            else:
                res = run_peer(model, data, seed, refit=refit, quick=quick)
                if res.skipped:
                    skipped = res.skipped
                    break
                pred, valid_auc, secs, choice = res.test_pred, res.valid_auc, res.seconds, res.choice
            m = _metrics(y, pred)
            m.update(valid_auc=float(valid_auc), seconds=round(float(secs), 2), seed=seed, choice=choice)
            m["slices"] = {name.removeprefix("ctr.auc."): v for name, v in
                           slice_metrics(y, np.asarray(pred, dtype=np.float64), masks).items()
                           if name.startswith("ctr.auc.")}
            if is_adrec(model):  # the training alone (train_ranker on Ray Train), without loading and predicting
                m["train_seconds"] = float(choice["train_seconds"])
            runs.append(m)
            log.info("%s / %s / seed %d: AUC %.4f, logloss %.4f, calibration %.3f, %.1fs; slices %s",
                     label, model, seed, m["auc"], m["logloss"], m["calibration"], m["seconds"],
                     {k: round(v, 4) for k, v in m["slices"].items()})
        entry: dict = {"runs": runs}
        if skipped:
            entry["skipped"] = skipped
            log.warning("%s / %s skipped: %s", label, model, skipped)
        if runs:
            entry["median"] = {k: float(statistics.median(r[k] for r in runs))
                               for k in ("auc", "logloss", "calibration", "valid_auc", "seconds", "train_seconds")
                               if all(k in r for r in runs)}
            entry["median"]["slices"] = {k: float(statistics.median(r["slices"][k] for r in runs))
                                         for k in runs[0]["slices"]}
        out[model] = entry
        write(out)
    return out


def _prepared(cfg: AdrecConfig, run: RunDir):
    from adrec.features.pipeline import Features, prepare

    t0 = time.perf_counter()
    prepare(cfg, run)
    prep_s = time.perf_counter() - t0
    features = Features(run)
    data = BenchData.from_features(features)
    known = pd.concat([data.train, data.valid])
    masks = slice_masks(known["user_idx"].to_numpy(), known["item_idx"].to_numpy(),
                        data.test["user_idx"].to_numpy(), data.test["item_idx"].to_numpy())
    return features, data, masks, prep_s


def run_benchmark(datasets: list[str], out: str | Path, data_dir: str | None = None, seeds=(0, 1, 2),
                  models=MODELS, quick: bool = False, refit: bool = True, overrides: list[str] | None = None,
                  robustness_epsilon: float | None = None, name: str = "results",
                  runs: str | Path | None = None, new_items: float = 0.0, new_items_models=None,
                  multitask: bool = False, ctr_tolerance: float = DEFAULT_CTR_TOLERANCE,
                  multitask_parts=PARTS, multitask_baseline_from=None) -> dict:
    """Run every model on every data set and seed; write ``<name>.json`` and ``<name>.md`` under ``out``
    (the prepared features and the trained rankers go under ``runs``, default ``<out>/runs``).

    ``new_items`` > 0: also the strict item cold-start protocol (that seeded fraction of the items loses
    its train and valid rows; ``features.new_items``), every model (or ``new_items_models``) again on that
    second preparation. ``multitask``: also the multi-task table (:func:`run_multitask`) where the data set has
    a conversion label (``multitask_parts`` / ``multitask_baseline_from``: see :func:`run_multitask`)."""
    from adrec.runtime import init_ray

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(runs) if runs is not None else out / "runs"
    strict_models = list(models if new_items_models is None else new_items_models)
    unknown = [m for m in [*models, *strict_models] if m not in ALL_MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(ALL_MODELS)}")
    seeds = [0] if quick else list(seeds)
    report: dict = {"protocol": {
        "split": "per-user temporal split of docs/design.md; fit on train, select on valid (AUC), "
                 + ("refit on train+valid with the selected setting, " if refit else "")
                 + "test on test",
        "seeds": seeds, "quick": quick, "refit": refit, "machine": _platform.platform(),
        "overrides": list(overrides or []), "new_items": new_items, "multitask": multitask,
        "slices": f"items with <= {COLD_MAX} train+valid interactions (cold) or more (warm), users with <= "
                  f"{COLD_MAX} (few-shot); new items: test rows of the items held out by the strict protocol",
    }, "datasets": {}}
    for ds_name in datasets:
        ov = ["data.pseudonym_key=benchmark", *dataset_overrides(ds_name, data_dir, quick),
              *(QUICK_RANKER if quick else []), f"ranker.refit={str(refit).lower()}", *(overrides or [])]
        cfg = build_config(overrides=ov)
        variant_cfgs = {m: build_config(overrides=[*ov, *VARIANTS[m]]) for m in {*models, *strict_models}
                        if m in VARIANTS}
        init_ray(cfg.ray)
        run = RunDir(runs_dir / ds_name)
        features, data, masks, prep_s = _prepared(cfg, run)
        y = data.test["label"].to_numpy().astype(np.int64)
        ds_out: dict = {"rows": {s: int(len(getattr(data, s))) for s in ("train", "valid", "test")},
                        "test_ctr": float(y.mean()), "prepare_seconds": round(prep_s, 2), "models": {},
                        "slice_rows": {k: int(v.sum()) for k, v in masks.items()},
                        "ranker_config": json.loads(cfg.ranker.model_dump_json())}
        log.info("benchmark %s: %s rows, test CTR %.4f, slices %s", ds_name, ds_out["rows"], ds_out["test_ctr"],
                 ds_out["slice_rows"])
        trained = {}  # adrec of the first seed, without FGSM: the robustness table's first row

        def write(**parts):  # the report so far, after every model
            _write(report | {"datasets": report["datasets"] | {ds_name: ds_out | parts}}, out, name)

        ds_out["models"] = _models_pass(cfg, run, features, data, models, seeds, refit, quick, masks, ds_name,
                                        variant_cfgs, trained, lambda done: write(models=done))
        if multitask:
            ds_out["multitask"] = run_multitask(cfg, run, features, seeds, ctr_tolerance,
                                                write=lambda table: write(multitask=table), parts=multitask_parts,
                                                baseline_from=multitask_baseline_from)
        if robustness_epsilon:
            ds_out["robustness"] = robustness(cfg, run, features, robustness_epsilon, seed=seeds[0], trained=trained)
        if new_items:
            strict = [*ov, f"features.new_items={new_items}"]
            s_cfg = build_config(overrides=strict)
            s_variants = {m: build_config(overrides=[*strict, *VARIANTS[m]]) for m in variant_cfgs}
            s_run = RunDir(runs_dir / f"{ds_name}.new-items")
            s_feats, s_data, s_masks, _ = _prepared(s_cfg, s_run)
            ds_out["new_items_protocol"] = {
                "fraction": new_items, "held_out": int(s_run.manifest()["stages"]["prepare"]["counts"]["new_items_held_out"]),
                "rows": {s: int(len(getattr(s_data, s))) for s in ("train", "valid", "test")},
                "new_item_rows": int(s_masks["new_items"].sum())}
            ds_out["new_items_protocol"]["models"] = _models_pass(
                s_cfg, s_run, s_feats, s_data, strict_models, seeds, refit, quick, {"new_items": s_masks["new_items"]},
                f"{ds_name} (new items)", s_variants,
                write=lambda done: write(new_items_protocol=ds_out["new_items_protocol"] | {"models": done}))
        ds_out["target"] = target_check(ds_out)
        ds_out["slice_target"] = slice_target_check(ds_out)
        report["datasets"][ds_name] = ds_out
        _write(report, out, name)
    return report


def target_check(ds: dict) -> dict:
    """adrec's median AUC minus the best peer's, and whether its logloss is below the best peer's."""
    med = {m: e["median"] for m, e in ds["models"].items() if "median" in e}
    peers = {m: v for m, v in med.items() if m != ADREC}
    if ADREC not in med or not peers:
        return {}
    best_auc = max(peers, key=lambda m: peers[m]["auc"])
    best_ll = min(peers, key=lambda m: peers[m]["logloss"])
    return {"best_peer_auc": best_auc, "auc_gain": med[ADREC]["auc"] - peers[best_auc]["auc"],
            "best_peer_logloss": best_ll, "logloss_gain": peers[best_ll]["logloss"] - med[ADREC]["logloss"],
            "met": bool(med[ADREC]["auc"] >= peers[best_auc]["auc"] + 0.01
                        and med[ADREC]["logloss"] < peers[best_ll]["logloss"])}


def slice_table(ds: dict) -> dict:
    """Per model, the median test AUC overall and on every slice; new items from the strict protocol's pass."""
    strict = ds.get("new_items_protocol", {}).get("models", {})
    table = {}
    for model in [*ds["models"], *(m for m in strict if m not in ds["models"])]:
        med = ds["models"].get(model, {}).get("median")
        s_med = strict.get(model, {}).get("median")
        if med is None and s_med is None:
            continue
        row = {"overall": med["auc"], **med.get("slices", {})} if med else {}
        row.pop("new_items", None)  # the standard split's new items are few and incidental: the strict pass scores them
        row["new_items"] = (s_med or {}).get("slices", {}).get("new_items", float("nan"))
        if med and "train_seconds" in med:
            row["train_seconds"] = med["train_seconds"]
        table[model] = row
    return table


def slice_target_check(ds: dict) -> dict:
    """Issue 14's slice targets: on cold and new items adrec >= best peer + 0.03 and >= adrec:no-text + 0.02."""
    table = slice_table(ds)
    if ADREC not in table:
        return {}
    out = {}
    for sl in ("cold_items", "new_items"):
        peers = {m: r[sl] for m, r in table.items() if not is_adrec(m) and r.get(sl, math.nan) == r.get(sl, math.nan)}
        mine = table[ADREC].get(sl, math.nan)
        entry: dict = {}
        if peers:
            best = max(peers, key=peers.get)
            entry.update(best_peer=best, gain_over_best_peer=mine - peers[best])
        if "adrec:no-text" in table:
            entry["gain_over_no_text"] = mine - table["adrec:no-text"].get(sl, math.nan)
        entry["met"] = bool(entry.get("gain_over_best_peer", -1) >= 0.03 and entry.get("gain_over_no_text", -1) >= 0.02)
        out[sl] = entry
    return out


def _slice_lines(ds: dict) -> list[str]:
    table = slice_table(ds)
    if not any("cold_items" in r or r["new_items"] == r["new_items"] for r in table.values()):  # no slices yet
        return []
    rows = ds.get("slice_rows", {})
    strict = ds.get("new_items_protocol")
    head = ["overall", *[s for s in SLICES if s != "new_items"], "new_items"]
    label = {"overall": f"overall ({ds['rows']['test']})", "new_items": "new items, strict"
             + (f" ({strict['new_item_rows']})" if strict else "")}
    lines = ["", f"Test AUC by slice (medians; rows in brackets; cold: items with <= {COLD_MAX} train+valid "
                 f"interactions, few-shot: users with <= {COLD_MAX}"
             + (f"; new items: the strict protocol, {strict['held_out']} items ({strict['fraction']:.0%}) without any "
                f"train or valid row, every model trained again on that split" if strict else "") + "):", "",
             "| model | " + " | ".join(label.get(h, f"{h.replace('_', ' ')} ({rows.get(h, '?')})") for h in head)
             + " | train s |", "|---|" + "---|" * (len(head) + 1)]
    for model, r in table.items():
        cells = [f"{r[h]:.4f}" if h in r and r[h] == r[h] else "" for h in head]  # nan (one class): empty
        secs = f"{r['train_seconds']:.0f}" if "train_seconds" in r else ""
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {secs} |")
    st = ds.get("slice_target") or {}
    for sl, t in st.items():
        bits = []
        if "gain_over_best_peer" in t:
            bits.append(f"{t['gain_over_best_peer']:+.4f} over the best peer ({t['best_peer']})")
        if "gain_over_no_text" in t:
            bits.append(f"{t['gain_over_no_text']:+.4f} over adrec without the text tower")
        lines.append(f"\n{sl.replace('_', ' ')}: adrec {', '.join(bits) or 'has no comparison'}; target "
                     f"(+0.03 over the best peer and +0.02 over no-text) {'met' if t['met'] else 'NOT met'}.")
    return lines


def markdown(report: dict) -> str:
    lines = ["# Ranker benchmark", "", f"Protocol: {report['protocol']['split']}; medians over seeds "
             f"{report['protocol']['seeds']}.", ""]
    for name, ds in report["datasets"].items():
        lines += [f"## {name}", "", f"rows {ds['rows']}, test CTR {ds['test_ctr']:.4f}"]
        if ds["models"]:  # (--models '' runs the multi-task table alone)
            lines += ["", "| model | test AUC | test logloss | calibration | valid AUC | wall s |",
                      "|---|---|---|---|---|---|"]
        for model, e in ds["models"].items():
            if "median" in e:
                m = e["median"]
                lines.append(f"| {model} | {m['auc']:.4f} | {m['logloss']:.4f} | {m['calibration']:.3f} | "
                             f"{m['valid_auc']:.4f} | {m['seconds']:.1f} |")
            else:
                lines.append(f"| {model} | skipped: {e.get('skipped', 'no runs')} | | | | |")
        lines += _slice_lines(ds)
        if ds.get("multitask"):
            lines += markdown_lines(name, ds["multitask"])
        tr = ds["models"].get(ADREC, {}).get("median", {}).get("train_seconds")
        if tr is not None:
            lines += ["", f"adrec training alone (train_ranker on Ray Train, median): {tr:.1f} s."]
        t = ds.get("target")
        if t:
            lines += ["", f"adrec minus best peer: AUC {t['auc_gain']:+.4f} (best peer by AUC: {t['best_peer_auc']}); "
                          f"logloss {-t['logloss_gain']:+.4f} (best peer by logloss: {t['best_peer_logloss']}); "
                          f"target (AUC >= best + 0.01 and a lower logloss) {'met' if t['met'] else 'NOT met'}."]
        if ds.get("robustness"):
            rob = ds["robustness"]
            eps = sorted({float(k) for res in rob.values() for k in res})
            lines += ["", "FGSM robustness: adrec's test AUC under a one-step FGSM attack of L-inf size epsilon on "
                          f"every input embedding (seed {report['protocol']['seeds'][0]}), trained without and with FGSM "
                          "adversarial training:", "",
                      "| adrec trained | " + " | ".join(f"eps {e:g}" for e in eps) + " |",
                      "|---|" + "---|" * len(eps)]
            for variant, res in rob.items():
                by = {float(k): v for k, v in res.items()}
                eps_train = variant.removeprefix("fgsm_train_")
                label = "without FGSM" if float(eps_train) == 0 else f"with FGSM (eps {eps_train})"
                lines.append(f"| {label} | " + " | ".join(f"{by[e]:.4f}" if e in by else "" for e in eps) + " |")
        lines.append("")
    return "\n".join(lines)


def _write(report: dict, out: Path, name: str = "results") -> None:
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{name}.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from adrec.data.sources import BUILTIN

    ap = argparse.ArgumentParser(prog="benchmark_ranker", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder of NAME.json and NAME.md")
    ap.add_argument("--name", default="results", help="file name stem of the outputs (default: results)")
    ap.add_argument("--runs", default=None, help="folder of the prepared features and trained rankers "
                                                 "(default: OUT/runs)")
    ap.add_argument("--datasets", default="movielens-100k,synthetic",
                    help=f"comma-separated: {', '.join(BUILTIN)} or schema paths")
    ap.add_argument("--data-dir", default=os.environ.get("ADREC_ML100K"),
                    help="the unpacked ml-100k folder (default: $ADREC_ML100K)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated subset of {', '.join(ALL_MODELS)} (the adrec:* ones: the ablation)")
    ap.add_argument("--ablation", action="store_true", help=f"also the ablation variants {', '.join(VARIANTS)}")
    ap.add_argument("--new-items", type=float, default=0.2, metavar="FRACTION",
                    help="the strict item cold-start protocol's held-out share of the items, every model trained "
                         "again on it for ctr.auc.new_items (default 0.2; 0 skips that pass)")
    ap.add_argument("--new-items-models", default=None,
                    help="comma-separated models of the strict pass (default: those of --models)")
    ap.add_argument("--multitask", action="store_true",
                    help="also the multi-task table (issue 17): ESMM vs a CTR model x a CVR model trained on clicks "
                         "only, on the data sets with a conversion label (--models '' runs that table alone)")
    ap.add_argument("--multitask-parts", default="esmm,baseline",
                    help="what the multi-task table trains: esmm, baseline (the single-task and clicked-only CVR "
                         "models) or both (default)")
    ap.add_argument("--multitask-baseline-from", default=None, metavar="JSON",
                    help="an earlier multi-task run's JSON of the same preparation and seeds: its baseline rows "
                         "stand for the parts not trained (an ESMM variant at the cost of ESMM alone)")
    ap.add_argument("--ctr-tolerance", type=float, default=DEFAULT_CTR_TOLERANCE,
                    help="with one seed, the CTR AUC loss that counts as seed noise in the multi-task target")
    ap.add_argument("--quick", action="store_true", help="tiny run: small synthetic log, tiny encoder, one seed")
    ap.add_argument("--no-refit", action="store_true", help="test the models fitted on train only")
    ap.add_argument("--robustness", type=float, default=None, metavar="EPS",
                    help="also train adrec with FGSM at EPS and report AUC under attack (eval.fgsm_epsilons)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="configuration override, e.g. ranker.epochs=4 (repeatable)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    report = run_benchmark([d.strip() for d in args.datasets.split(",") if d.strip()], args.out,
                           data_dir=args.data_dir, seeds=[int(s) for s in args.seeds.split(",")],
                           models=[m.strip() for m in args.models.split(",") if m.strip()]
                           + (list(VARIANTS) if args.ablation else []), quick=args.quick,
                           refit=not args.no_refit, overrides=args.set, robustness_epsilon=args.robustness,
                           name=args.name, runs=args.runs, new_items=args.new_items,
                           new_items_models=None if args.new_items_models is None else
                           [m.strip() for m in args.new_items_models.split(",") if m.strip()],
                           multitask=args.multitask, ctr_tolerance=args.ctr_tolerance,
                           multitask_parts=tuple(p.strip() for p in args.multitask_parts.split(",") if p.strip()),
                           multitask_baseline_from=args.multitask_baseline_from)
    log.info("results in %s/%s.json and %s.md", args.out, args.name, args.name)
    sys_out = markdown(report)
    log.info("\n%s", sys_out)
    return 0
