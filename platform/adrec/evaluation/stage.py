"""The evaluate stage: CTR on test impressions and the full candidates -> ranker -> top-K path.

The top-K lists come from the model version Serve loads (:class:`~adrec.model_version.ModelVersion`):
its two-stage recommender for the users it knows (``topk.*``), as served, with the older path --
merged candidates ordered by the CTR ranker -- reported next to it (``ctr_order.*``) when both exist.

Writes ``<run>/report/``: ``metrics.json`` (the keys docs/design.md lists), ``report.md`` with plots, and
the raw predictions in the dataset's own ids (``topk.csv``, ``ctr_preds.csv``) so anyone can re-score
them with another implementation of the protocol.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from adrec.config import AdrecConfig
from adrec.data.ids import normalize_ids
from adrec.data.ingest import _read_table
from adrec.data.privacy import pseudonym_map, resolve_key
from adrec.data.schema import load_schema
from adrec.evaluation.fairness import fairness
from adrec.evaluation.faithfulness import faithfulness
from adrec.evaluation.objectives import objective_table
from adrec.evaluation.slices import COLD_MAX, SLICES, slice_masks, slice_metrics
from adrec.evaluation.plots import plot_calibration, plot_robustness, plot_roc
from adrec.evaluation.report import markdown_table, write_report
from adrec.evaluation.tradeoff import exposure_tradeoff
from adrec.features.pipeline import Features
from adrec.features.split import TEST, TRAIN, VALID
from adrec.metrics import conversion_metrics, ctr_metrics, rank_candidates, topk_metrics
from adrec.model_version import ModelVersion, live_dir, load_version
from adrec.run import RunDir

log = logging.getLogger(__name__)


def _raw_user_ids(run: RunDir, key: bytes) -> dict[str, str]:
    """pseudonym -> the data owner's raw id, rebuilt from the raw file (never stored anywhere)."""
    prep = run.manifest()["stages"]["prepare"]
    schema, root = load_schema(prep["schema"], prep.get("data_root"))
    df, _, _ = _read_table(schema.interactions, root, "interactions")
    return pseudonym_map(normalize_ids(df[schema.interactions.user]).to_numpy(), key)


def two_stage_lists(version: ModelVersion, users: np.ndarray, k: int) -> np.ndarray:
    """Top-K ids of known users from the version's two-stage recommender, -1 padded: what serving's
    ``Recommender.recommend`` answers them (same exclusions, same order, ties to the lower item)."""
    return version.two_stage.rank_lists(users, k, exclude=version.seen)[0]


def topk_lists(rec: ModelVersion, users: np.ndarray, n_candidates: int, k: int, batch_users: int = 128,
               show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Merged candidates then the CTR ranker for many users at once: (top-K ids, candidate ids), -1 padded."""
    tops, cands = [], []
    for start in tqdm(range(0, len(users), batch_users), desc="ranking candidates", disable=not show_progress):
        chunk = users[start:start + batch_users]
        ids, _, _ = rec.sources.recommend(chunk, n_candidates, rec.seen[chunk])
        valid = ids >= 0
        rows_u = np.repeat(chunk, valid.sum(1))
        rows_i = ids[valid]
        scores = np.full(ids.shape, -np.inf, dtype=np.float64)
        if len(rows_i):
            scores[valid] = rec.ranker.predict(rec.rows(rows_u, rows_i))
        tops.append(rank_candidates(ids, scores, k))
        cands.append(ids)
    return np.concatenate(tops), np.concatenate(cands)


def robustness(ranker, test: pd.DataFrame, epsilons, report: Path) -> tuple[dict[str, float], str, Path | None]:
    """Test AUC under a one-step FGSM attack at each epsilon (metrics, a markdown section, the plot).

    Only rankers with input embeddings to perturb (the fusion ranker) are attacked; others get a note.
    """
    if not epsilons:
        return {}, "No epsilons configured (eval.fgsm_epsilons).", None
    if not hasattr(getattr(ranker, "model", None), "embed"):
        return {}, f"Not measured: the {type(ranker).__name__} has no input embeddings to attack.", None
    from adrec.ranking.fgsm import robustness_auc

    by_eps = robustness_auc(ranker, test, sorted({0.0, *map(float, epsilons)}))
    trained = float(getattr(ranker.cfg, "fgsm_epsilon", 0.0) or 0.0)
    how = f"with FGSM adversarial training (epsilon {trained:g})" if trained > 0 else \
        "without adversarial training (ranker.fgsm_epsilon = 0)"
    clean = by_eps[0.0]
    table = markdown_table([{"epsilon": e, "test AUC": a, "change vs clean": a - clean} for e, a in by_eps.items()])
    body = (f"Test AUC when every input embedding of the ranker (feature, id, attribute and item text "
            f"embeddings) is moved by a one-step FGSM attack of L-inf size epsilon against the true labels. "
            f"This ranker was trained {how}; `pipelines/benchmark_ranker.py --robustness EPS` compares "
            f"both trainings side by side.\n\n{table}")
    label = f"adrec ranker ({'FGSM ' + format(trained, 'g') if trained > 0 else 'no adversarial training'})"
    img = plot_robustness({label: by_eps}, report / "robustness.png", title="Test AUC under FGSM")
    return {f"robustness.auc@eps={e:g}": a for e, a in by_eps.items()}, body, img


def evaluate(cfg: AdrecConfig, run: RunDir, show_progress: bool = False) -> dict[str, float]:
    t0 = time.perf_counter()
    feats = Features(run)
    spec = feats.spec
    rec = load_version(live_dir(run))
    k = cfg.eval.k
    report = run.report
    report.mkdir(parents=True, exist_ok=True)
    key = resolve_key(cfg.data.pseudonym_key, run.path)
    raw_user = _raw_user_ids(run, key)
    user_raw = feats.users["user"].map(raw_user).fillna(feats.users["user"]).to_numpy()
    item_raw = feats.items["item"].astype(str).to_numpy()

    # CTR: every test interaction is an impression.
    test = feats.rows(TEST).reset_index(drop=True)
    probs = np.asarray(rec.ranker.predict(test), dtype=np.float64)
    y = test["label"].to_numpy()
    metrics = ctr_metrics(y, probs)
    known = feats.rows(TRAIN, VALID)
    metrics.update(slice_metrics(y, probs, slice_masks(known["user_idx"].to_numpy(), known["item_idx"].to_numpy(),
                                                       test["user_idx"].to_numpy(), test["item_idx"].to_numpy())))
    preds = pd.DataFrame({"user": user_raw[test["user_idx"]], "item": item_raw[test["item_idx"]], "prob": probs})
    conv_metrics = conversion_section = None
    if "cvr" in getattr(rec.ranker, "tasks", ["ctr"]):
        conv_metrics, tasks = _conversions(rec.ranker, test)
        metrics.update(conv_metrics)
        preds = preds.assign(prob_cvr=tasks["cvr"], prob_ctcvr=tasks["ctcvr"])
        conversion_section = conversions_section(conv_metrics)
    preds.to_csv(report / "ctr_preds.csv", index=False)

    # Top-K end to end: users with at least one test positive.
    pos = test[test["label"] == 1]
    truth_by_user = pos.groupby("user_idx")["item_idx"].apply(lambda s: set(s.tolist()))
    users = truth_by_user.index.to_numpy(dtype=np.int64)
    truth = truth_by_user.tolist()
    top, cand = topk_lists(rec, users, cfg.candidates.n_candidates, k, show_progress=show_progress)
    two_stage = rec.two_stage is not None
    if two_stage:
        metrics.update(topk_metrics(top, truth, spec.n_catalog, k, prefix="ctr_order"))
        top = two_stage_lists(rec, users, k)
    metrics.update(topk_metrics(top, truth, spec.n_catalog, k))
    # The candidate lists alone, in their merged order: what the ranker adds over retrieval.
    metrics.update(topk_metrics(cand[:, :k], truth, spec.n_catalog, k, prefix="candidates"))
    hits = [(len(set(c[c >= 0][:100].tolist()) & t) / len(t)) for c, t in zip(cand, truth)]
    metrics["candidates.recall@100"] = float(np.mean(hits))
    rows = [(user_raw[u], item_raw[i], r + 1) for u, row in zip(users, top) for r, i in enumerate(row) if i >= 0]
    pd.DataFrame(rows, columns=["user", "item", "rank"]).to_csv(report / "topk.csv", index=False)

    images = {
        "ROC curve (test impressions)": plot_roc(y, probs, report / "roc.png", label="adrec ranker"),
        "Calibration (test impressions)": plot_calibration(y, probs, report / "calibration.png"),
    }
    rob_metrics, rob_body, rob_img = robustness(rec.ranker, test, cfg.eval.fgsm_epsilons, report)
    metrics.update(rob_metrics)
    if rob_img is not None:
        images["Robustness: test AUC under FGSM"] = rob_img
    train_pos = feats.rows(TRAIN).query("label == 1")["item_idx"].to_numpy(dtype=np.int64)
    fair_metrics, fair_body, fair_img, fair_table = fairness(
        feats.items, feats.users, spec.n_catalog, train_pos, top, truth, test, probs, report)
    metrics.update(fair_metrics)
    if fair_img is not None:
        images["Fairness: provider exposure share vs merit share"] = fair_img
    tables = {}
    if fair_table is not None:
        tables["Exposure to merit by provider"] = fair_table
    if two_stage:
        trade_metrics, trade_body, trade_img = exposure_tradeoff(
            rec.two_stage, users, truth, rec.seen, spec.n_catalog, k, cfg.eval.exposure_weights, report)
        metrics.update(trade_metrics)
        fair_body += "\n\n### Exposure-aware re-ranking: the trade-off\n\n" + trade_body
        if trade_img is not None:
            images["Fairness: NDCG vs provider Gini (exposure re-ranking)"] = trade_img
    value_metrics, value_body = objective_table(rec, users, truth, spec.n_catalog, k, cfg.serve,
                                                cfg.candidates.n_candidates)
    metrics.update(value_metrics)
    privacy = (getattr(rec.ranker, "info", None) or {}).get("privacy")
    if privacy:
        metrics.update({"privacy.epsilon": float(privacy["epsilon"]), "privacy.delta": float(privacy["delta"])})
    faith_metrics, faith_body = faithfulness(rec, users, top, cfg.eval.explain_users, seed=cfg.ranker.seed)
    metrics.update(faith_metrics)
    recall_path = run.candidates / "recall.json"
    if recall_path.exists():
        rec_json = json.loads(recall_path.read_text())
        long = pd.DataFrame([(*name.split(".", 1), v) for name, v in rec_json.items()], columns=["source", "metric", "value"])
        tables["Candidate recall by source"] = long.pivot(index="source", columns="metric", values="value").reset_index()
    sections = {
        "Protocol": (
            f"Per-user temporal split (docs/design.md). CTR over {len(test)} test impressions; top-{k} over "
            f"{len(users)} users with a test positive, "
            + (f"ordered by the version's two-stage recommender ({rec.two_stage.ranker} re-ranker over the union of "
               f"{'+'.join(rec.two_stage.sources)}; train+valid items excluded), as served (`topk.*`); the merged "
               f"candidates ({cfg.candidates.n_candidates} per user) ranked by the CTR ranker are `ctr_order.*`"
               if two_stage else
               f"candidates ({cfg.candidates.n_candidates} per user, train items excluded) ranked by the ranker")
            + f", ties to the lower item index. Model version {rec.version_id}."
        ),
        "Slices where text matters": slices_section(
            metrics, int(run.manifest()["stages"]["prepare"]["counts"].get("new_items_held_out", 0))),
        "Objectives and exploration: NDCG and expected value": value_body,
        "Robustness (FGSM)": rob_body,
        "Fairness of exposure": fair_body,
        "Explanations: faithfulness": faith_body,
        "Privacy": privacy_section(privacy),
    }
    if conversion_section is not None:
        sections["Conversions (ESMM)"] = conversion_section
    write_report(report, metrics, sections=sections, images=images, tables=tables, title=f"adrec report: {run.path.name}")
    run.update_manifest("evaluate", {"metrics": metrics, "seconds": round(time.perf_counter() - t0, 2)})
    log.info("evaluate: %s", {k_: round(v, 4) for k_, v in metrics.items()})
    return metrics


def _conversions(ranker, test: pd.DataFrame) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """A two-task ranker's ``cvr.*`` (clicked test impressions) and ``ctcvr.*`` (all of them) metrics, and
    its predictions. Test rows without a conversion label (a schema that names none) are a clear error."""
    if "conversion" not in test.columns:
        raise ValueError("the ranker predicts conversions (ranker.tasks=[ctr, cvr]) but the test rows carry no "
                         "conversion label: name one in the schema (interactions.conversion) and run prepare again")
    tasks = ranker.predict_tasks(test)
    clicks = test["label"].to_numpy()
    return conversion_metrics(clicks, test["conversion"].to_numpy() * clicks, tasks["cvr"], tasks["ctcvr"]), tasks


def conversions_section(m: dict[str, float]) -> str:
    """The report's paragraph on the ESMM head's conversion predictions."""
    rows = [{"metric": k, "value": m[k]} for k in ("cvr.auc", "cvr.logloss", "cvr.rows", "ctcvr.auc", "ctcvr.logloss",
                                                  "ctcvr.calibration", "ctcvr.positives")]
    return ("The ranker's ESMM head (ranker.tasks=[ctr, cvr]): pCVR, the probability of a conversion given a "
            "click, scored on the clicked test impressions (`cvr.*`); pCTCVR = pCTR x pCVR, of a click and a "
            "conversion, scored on every test impression (`ctcvr.*`: what ordering by bid x pCTCVR relies on).\n\n"
            + markdown_table(rows))


def privacy_section(privacy: dict | None) -> str:
    """The report's privacy paragraph: what DP-SGD spent and what the guarantee covers (docs/design.md)."""
    if not privacy:
        return "The ranker was trained without differential privacy (`ranker.dp` is off)."
    return (f"The ranker was trained with DP-SGD (Opacus' {privacy['accountant'].upper()} accountant): "
            f"epsilon = {privacy['epsilon']:.3f} at delta = {privacy['delta']:g} (target {privacy['target_epsilon']:g}) "
            f"over {privacy['steps']} noisy steps (noise multiplier {privacy['noise_multiplier']:.3f}, per-example "
            f"clipping to {privacy['max_grad_norm']:g}). The guarantee is example-level: one training row of the log, "
            f"for the ranker's weights. It does not cover the valid labels used for early stopping and "
            f"calibration, a user's rows together (user-level), the candidate sources and the two-stage re-ranker, "
            f"nor the online learner (docs/design.md, \"Differential privacy\").")


def slices_section(metrics: dict[str, float], held_out: int) -> str:
    """The report's slice table (adrec.evaluation.slices defines the slices)."""
    rows = [{"slice": name, "test AUC": metrics[f"ctr.auc.{name}"], "rows": int(metrics[f"ctr.rows.{name}"])}
            for name in SLICES]
    protocol = (f"the strict item cold-start protocol: {held_out} items (features.new_items, seeded) had every "
                f"train and valid interaction removed" if held_out else
                "the standard protocol (no items held out; `features.new_items=0.2` runs the strict one)")
    return (f"Test AUC on impressions of items with at most {COLD_MAX} train+valid interactions (cold) or more "
            f"(warm), of items with none (new; this run used {protocol}), and of users with at most {COLD_MAX} "
            f"(few-shot).\n\n{markdown_table(rows)}")


def metrics_table(metrics: dict[str, float]) -> str:
    return markdown_table([{"metric": k, "value": v} for k, v in sorted(metrics.items())])
