"""Two-stage re-ranker variants scored on VALID only (issue 14's top-10 target): the candidate union's
recall, the re-ranker's objective, parameters, rounds and label definition, features added or dropped.

The dev protocol of :mod:`benchmarks.topk` (``dev_variants``): the re-ranker learns on the ``inner`` stage
(sources, index and stage ranker fitted on train minus its per-user tails, labels = those tails), and is
scored on the ``valid`` stage (everything fitted on train, truth = the valid positives). Test rows are never
read. To try many variants cheaply, each stage's candidate features are computed ONCE over a wide union
(every source's top ``WIDE`` items, and extra sources) and kept as parquet; a variant then selects its
union (a candidate belongs to it when one of the variant's sources ranks it within that source's ``n``:
the ranks are computed over the whole catalog, so this is exactly the union a recommender with those ``n``
builds), its feature columns and its labels, and trains one LightGBM re-ranker. NDCG@10 is read at several
round counts from the same fit (what "early stopping on valid" would choose, chosen here as a setting).

    python -m benchmarks.topk_variants --run RUN --out OUT --lm-cache OUT/lm_cache [--variants NAMES]

Writes ``OUT/variants.json`` and ``OUT/variants.md`` (one row per variant).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adrec.candidates.base import write_json
from adrec.features.split import TRAIN
from adrec.evaluation.report import markdown_table
from adrec.topk import TopKData, TwoStageRecommender, default_params, inner_stage, make_stage

from .topk import evaluate_lists

log = logging.getLogger(__name__)

K = 10
#: The wide union the frames are computed over: each default source's top WIDE, and sources fitted on
#: every seen pair (what users watch, not only what they like).
WIDE = {"ease": 300, "als": 200, "itemitem": 200, "popularity": 100}
EXTRA_SOURCES = {
    "ease_seen": {"kind": "ease", "n": 200, "data": "seen", "l2": 200.0, "num_threads": 1},
    "als_seen": {"kind": "als", "n": 100, "data": "seen", "factors": 128, "regularization": 10.0, "alpha": 1.0,
                 "iterations": 15, "num_threads": 1},
}
DEFAULT_N = {name: spec["n"] for name, spec in default_params()["sources"].items()}
ROUNDS = (100, 150, 200, 300, 450, 600)


def wide_sources() -> dict[str, dict[str, Any]]:
    src = {name: {**spec, "n": WIDE[name]} for name, spec in default_params()["sources"].items()}
    return {**src, **EXTRA_SOURCES}


def stage_frame(rec: TwoStageRecommender, stage, data: TopKData) -> pd.DataFrame:
    """Every candidate of the wide union of ``stage.users`` with its features, ``_u``, ``_i`` and ``_rel``
    (2: a target positive, 1: a target interaction with label 0, 0: neither)."""
    sources, index, lm = rec._fit_state(stage.known, data.features)
    parts = []
    for start in range(0, len(stage.users), rec.batch_users):
        bu = stage.users[start:start + rec.batch_users]
        cu, ci, x = rec._features(bu, sources, index, stage.known, lm)
        x["_u"], x["_i"] = cu, ci
        parts.append(x)
    x = pd.concat(parts, ignore_index=True)
    t = stage.target
    codes = x["_u"].to_numpy(np.int64) * rec.n_items + x["_i"].to_numpy(np.int64)
    tcodes = t["user_idx"].to_numpy(np.int64) * rec.n_items + t["item_idx"].to_numpy(np.int64)
    pos = np.isin(codes, tcodes[t["label"].to_numpy() == 1])
    anyt = np.isin(codes, tcodes)
    x["_rel"] = np.where(pos, 2, np.where(anyt, 1, 0)).astype(np.int8)
    # post-hoc features (candidates for the feature set): each source's score relative to the user's best,
    # the user's mean item popularity against the candidate's
    g = x.groupby("_u", sort=False)
    for name in rec.source_specs:
        s = x[f"{name}.score"]
        x[f"{name}.gap"] = (s - g[f"{name}.score"].transform("max")).astype(np.float32)
    user_pop = np.zeros(rec.n_users, np.float64)
    lp = np.log1p(index.item_n)
    np.add.at(user_pop, index.u, lp[index.i])
    user_pop /= np.maximum(index.user_n, 1.0)
    x["user.mean_log_pop"] = user_pop[x["_u"].to_numpy()].astype(np.float32)
    x["ui.log_pop_diff"] = (lp[x["_i"].to_numpy()] - user_pop[x["_u"].to_numpy()]).astype(np.float32)
    return x


def union_mask(x: pd.DataFrame, n: dict[str, int]) -> np.ndarray:
    m = np.zeros(len(x), bool)
    for name, k in n.items():
        m |= x[f"{name}.rank"].to_numpy() <= k
    return m


def candidate_recall(x: pd.DataFrame, stage, mask: np.ndarray) -> float:
    """Mean over the stage's users of the share of their target positives inside the union."""
    hits = pd.Series((x["_rel"].to_numpy() == 2) & mask).groupby(x["_u"].to_numpy()).sum()
    per = hits.reindex(stage.users, fill_value=0).to_numpy() / np.array([len(t) for t in stage.truth])
    return float(per.mean())


def top_lists(u: np.ndarray, i: np.ndarray, s: np.ndarray, users: np.ndarray, k: int = K) -> np.ndarray:
    order = np.lexsort((i, -s, u))
    uo = u[order]
    pos = np.arange(len(order)) - np.searchsorted(uo, uo)
    top = pos < k
    out = np.full((len(users), k), -1, np.int64)
    out[np.searchsorted(users, uo[top]), pos[top]] = i[order[top]]
    return out


def feature_columns(x: pd.DataFrame, sources: list[str], drop: tuple[str, ...] = (), add: tuple[str, ...] = ()):
    post = {f"{s}.gap" for s in x.columns.str.split(".").str[0]} | {"user.mean_log_pop", "ui.log_pop_diff"}
    cols = []
    for c in x.columns:
        if c.startswith("_"):
            continue
        head = c.split(".")[0]
        is_source = any(c.startswith(f"{s}.") for s in list(WIDE) + list(EXTRA_SOURCES))
        if is_source and head not in sources:
            continue
        if c in post and not any(a in c for a in add):
            continue
        if any(c == d or c.startswith(d) for d in drop):
            continue
        cols.append(c)
    return cols


def run_variant(name: str, v: dict[str, Any], frames: dict[str, pd.DataFrame], stages: dict[str, Any],
                seed: int = 0) -> dict[str, Any]:
    import lightgbm

    xv, valid, inner = frames["valid"], stages["valid"], stages["inner"]
    train_on = v.get("stages", ["inner"])
    xi = pd.concat([frames[s].assign(_u=frames[s]["_u"] + j * 10**7) for j, s in enumerate(train_on)],
                   ignore_index=True)
    n = v.get("n", DEFAULT_N)
    cols = feature_columns(xi, list(n), v.get("drop", ()), v.get("add", ()))
    mi, mv = union_mask(xi, n), union_mask(xv, n)
    a = xi[mi].reset_index(drop=True)
    rel = a["_rel"].to_numpy()
    label = v.get("label", "positives")
    y = (rel == 2).astype(np.float32) if label == "positives" else rel.astype(np.float32)
    if label == "graded1":  # watched-but-disliked counts as a positive as much as a liked one
        y = (rel > 0).astype(np.float32)
    u = a["_u"].to_numpy()
    keep_users = pd.Series(rel == 2).groupby(u).any()
    keep = keep_users.reindex(u).to_numpy(dtype=bool).copy()
    neg = v.get("max_neg")
    if neg:  # per user: every relevant candidate and the best `neg` others by EASE rank
        d = pd.DataFrame({"u": u, "r": a["ease.rank"].to_numpy(), "neg": rel == 0})
        nr = d[d["neg"]].sort_values(["u", "r"], kind="stable").groupby("u").cumcount() + 1
        keep[nr.index[nr.to_numpy() > neg].to_numpy()] = False
    a, y, u = a[keep], y[keep], u[keep]
    groups = np.bincount(np.unique(u, return_inverse=True)[1])
    params = {"objective": "rank_xendcg", "n_estimators": max(ROUNDS), "learning_rate": 0.03, "num_leaves": 15,
              "min_child_samples": 100, "subsample": 0.8, "subsample_freq": 1, "colsample_bytree": 0.8,
              "verbose": -1, "n_jobs": 1, "random_state": seed, **v.get("params", {})}
    t0 = time.perf_counter()
    models = []
    for m in range(int(v.get("ensemble", 1))):  # the mean of the raw scores of re-rankers with seeds seed..seed+m
        pm = {**params, "random_state": seed + m}
        if pm["objective"] == "binary":
            models.append(lightgbm.LGBMClassifier(**pm).fit(
                a[cols], (y > 0).astype(np.float32), sample_weight=None if label == "positives" else
                np.where(y == 2, 2.0, 1.0)))
        else:
            if pm["objective"] == "lambdarank":
                pm.setdefault("label_gain", [0, 1, 3])
            models.append(lightgbm.LGBMRanker(**pm).fit(a[cols], y, group=groups))
    model = models[0]
    fit_s = time.perf_counter() - t0
    b = xv[mv]
    bu, bi = b["_u"].to_numpy(), b["_i"].to_numpy()
    curve = {}
    for r in ROUNDS:
        if r > params["n_estimators"]:
            continue
        s = np.mean([mm.booster_.predict(b[cols], raw_score=True, num_iteration=r) for mm in models], axis=0)
        curve[r] = evaluate_lists(valid, top_lists(bu, bi, s, valid.users), K)
    best = max(curve, key=lambda r: curve[r]["ndcg@10"])
    gain = model.booster_.feature_importance(importance_type="gain")
    top = [(cols[j], round(float(gain[j] / gain.sum()), 4)) for j in np.argsort(-gain)[:12]]
    out = {"variant": name, "spec": v, "features": len(cols), "train_rows": int(len(y)),
           "train_users": int(len(groups)), "valid_rows": int(len(b)),
           "cand_recall_valid": candidate_recall(xv, valid, mv),
           "cand_recall_inner": candidate_recall(frames["inner"], inner, union_mask(frames["inner"], n)),
           "valid_at_300": curve.get(300), "best_rounds": best, "valid_best": curve[best],
           "curve_ndcg": {r: round(c["ndcg@10"], 4) for r, c in curve.items()},
           "curve_recall": {r: round(c["recall@10"], 4) for r, c in curve.items()},
           "fit_s": round(fit_s, 1), "top_features": top}
    log.info("%s: cand recall %.4f; valid ndcg@10 %s", name, out["cand_recall_valid"], out["curve_ndcg"])
    return out


#: name -> variant: ``n`` (source -> top n in the union; default: the topk section's sources), ``label``
#: ("positives", "graded": 2 liked / 1 interacted with, "graded1": both 1), ``params`` (LightGBM over the
#: current defaults), ``drop`` / ``add`` (feature prefixes), ``max_neg`` (training negatives per user).
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "no-lm": {"drop": ("lm.",)},
    "graded": {"label": "graded"},
    "graded1": {"label": "graded1"},
    "lambdarank": {"params": {"objective": "lambdarank"}},
    "lambdarank-graded": {"label": "graded", "params": {"objective": "lambdarank"}},
    "binary": {"params": {"objective": "binary"}},
    "binary-graded": {"label": "graded", "params": {"objective": "binary"}},
    "leaves31": {"params": {"num_leaves": 31}},
    "leaves63-mcs50": {"params": {"num_leaves": 63, "min_child_samples": 50}},
    "lr0.06": {"params": {"learning_rate": 0.06}},
    "gap+pop": {"add": (".gap", "user.mean_log_pop", "ui.log_pop_diff")},
    "ease_seen": {"n": {**DEFAULT_N, "ease_seen": 50}},
    "ease_seen+als_seen": {"n": {**DEFAULT_N, "ease_seen": 50, "als_seen": 50}},
    "wider": {"n": {"ease": 150, "als": 100, "itemitem": 100, "popularity": 50}},
    "widest": {"n": {"ease": 300, "als": 200, "itemitem": 200, "popularity": 100}},
    "narrow": {"n": {"ease": 50, "als": 30, "itemitem": 30, "popularity": 20}},
    "maxneg50": {"max_neg": 50},
    # a third stage carved from the inner stage's known rows by the same tail rule (--inner2): more examples
    "inner+inner2": {"stages": ["inner", "inner2"]},
    "ensemble3": {"ensemble": 3},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="topk_variants", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a prepared run (adrec prepare / benchmark_topk's OUT/run)")
    p.add_argument("--out", required=True)
    p.add_argument("--lm-cache", help="the stage rankers' cache (shared with benchmark_topk --lm-cache)")
    p.add_argument("--variants", default="", help="comma-separated names of VARIANTS (default: all)")
    p.add_argument("--extra", default="{}", help="JSON name -> variant, added to VARIANTS")
    p.add_argument("--frames-only", action="store_true")
    p.add_argument("--inner2", action="store_true", help="also the frame of a stage carved from the inner one")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from adrec.features.pipeline import Features
    from adrec.run import RunDir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = TopKData.from_features(Features(RunDir(args.run)))
    inner = inner_stage(data.interactions, data.n_users, data.n_items, data.n_catalog)
    valid = make_stage(data.interactions, data.n_users, data.n_items, data.n_catalog, "valid")
    stages = {"inner": inner, "valid": valid}
    if args.inner2:
        stages["inner2"] = inner_stage(inner.known.assign(split=TRAIN), data.n_users, data.n_items, data.n_catalog)
    rec = TwoStageRecommender(sources=wide_sources(), lm_cache=args.lm_cache)
    rec.n_users, rec.n_items, rec.n_catalog = data.n_users, data.n_items, data.n_catalog
    rec.item_tags = data.item_tags
    frames = {}
    for name, stage in stages.items():
        path = out / f"frame_{name}.parquet"
        if path.is_file():
            frames[name] = pd.read_parquet(path)
            continue
        t0 = time.perf_counter()
        frames[name] = stage_frame(rec, stage, data)
        frames[name].to_parquet(path, index=False)
        log.info("%s frame: %d rows in %.0fs", name, len(frames[name]), time.perf_counter() - t0)
    if args.frames_only:
        return 0
    variants = {**VARIANTS, **json.loads(args.extra)}
    names = [s for s in args.variants.split(",") if s] or list(variants)
    path = out / "variants.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in names:
        if not set(variants[name].get("stages", ["inner"])) <= set(frames):
            log.info("%s: skipped (needs --inner2)", name)
            continue
        results[name] = run_variant(name, variants[name], frames, stages)
        results[name]["load_avg_1m"] = os.getloadavg()[0]
        write_json(path, results)
        (out / "variants.md").write_text(report(results))
    print(report(results))
    return 0


def report(results: dict[str, Any]) -> str:
    rows = []
    for name, r in results.items():
        v300 = r["valid_at_300"] or {}
        rows.append({"variant": name, "cand recall": round(r["cand_recall_valid"], 4),
                     "train rows": r["train_rows"], "features": r["features"],
                     "NDCG@10 (300)": v300.get("ndcg@10"), "R@10 (300)": v300.get("recall@10"),
                     "best rounds": r["best_rounds"], "NDCG@10 (best)": r["valid_best"]["ndcg@10"],
                     "R@10 (best)": r["valid_best"]["recall@10"], "fit s": r["fit_s"]})
    return markdown_table(rows) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
