"""DP-SGD benchmark: test AUC of the ranker at several epsilons and without DP, on a prepared run.

    python pipelines/benchmark_privacy.py --run RUN [--epsilons 1 3 8] [--seeds 0 1 2] [--epochs 2]
        [--max-steps-per-epoch N] [--set ranker.KEY=VALUE ...] [--out benchmarks]

Each (epsilon, seed) trains the run's ranker configuration (``finetune: frozen``; ``--set`` overrides) in
this process (:func:`adrec.ranking.train.fit_local`, the loop Ray Train runs) with ``ranker.dp`` at that
target epsilon, or without DP, and scores it on the run's test impressions. Writes
``privacy_benchmark_<dataset>.json`` / ``.md`` / ``.png`` (AUC against epsilon) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from adrec.config import build_config
from adrec.evaluation.plots import plot_curves
from adrec.evaluation.report import markdown_table
from adrec.features.pipeline import Features
from adrec.features.split import TEST
from adrec.metrics import auc
from adrec.ranking.train import fit_local
from adrec.run import RunDir, resolve_config


def run_benchmark(run_path: Path, epsilons: list[float], seeds: list[int], epochs: int, max_steps: int | None,
                  overrides: list[str], out: Path, physical_batch: int = 32) -> dict:
    run = RunDir(run_path)
    base = resolve_config(run)
    feats = Features(run)
    test = feats.rows(TEST)
    y = test["label"].to_numpy()
    rows = []
    for seed in seeds:  # seed-major: a stopped run still has every epsilon of its first seeds
        for eps in [*epsilons, None]:
            sets = [f"ranker.seed={seed}", f"ranker.epochs={epochs}", "ranker.finetune=frozen",
                    "ranker.fgsm_epsilon=0", "ranker.ensemble_bagging=false", *overrides]
            if max_steps:
                sets.append(f"ranker.max_steps_per_epoch={max_steps}")
            if eps is not None:
                sets.append(f"ranker.dp={{target_epsilon: {eps}, physical_batch: {physical_batch}}}")
            cfg = build_config(base.model_dump(mode="json"), overrides=sets).ranker
            t0 = time.perf_counter()
            ranker, _ = fit_local(cfg, feats)
            secs = time.perf_counter() - t0
            spent = (ranker.info.get("privacy") or {}).get("epsilon")
            rows.append({"target_epsilon": "none" if eps is None else eps, "seed": seed,
                         "spent_epsilon": spent, "test_auc": float(auc(y, ranker.predict(test))),
                         "train_seconds": round(secs, 1)})
            print(json.dumps(rows[-1]), flush=True)
            out.mkdir(parents=True, exist_ok=True)  # what ran so far, should a long benchmark be stopped
            (out / f"privacy_benchmark_{base.data.dataset}.partial.json").write_text(json.dumps(rows, indent=2) + "\n")
    dataset = base.data.dataset
    summary = []
    for eps in [*epsilons, "none"]:
        sel = [r for r in rows if r["target_epsilon"] == eps]
        aucs = [r["test_auc"] for r in sel]
        summary.append({"epsilon": eps, "seeds": len(sel), "test AUC mean": float(np.mean(aucs)),
                        "test AUC std": float(np.std(aucs)), "train s mean": float(np.mean([r["train_seconds"] for r in sel]))})
    no_dp = summary[-1]["test AUC mean"]
    img = plot_curves({"DP-SGD": {s["epsilon"]: s["test AUC mean"] for s in summary[:-1]},
                       "without DP": {e: no_dp for e in epsilons}}, out / f"privacy_benchmark_{dataset}.png",
                      xlabel="target epsilon (delta 1e-5)", ylabel="test AUC", title=f"DP-SGD on {dataset}")
    result = {"dataset": dataset, "epochs": epochs, "max_steps_per_epoch": max_steps, "overrides": overrides,
              "physical_batch": physical_batch,
              "runs": rows, "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"privacy_benchmark_{dataset}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"privacy_benchmark_{dataset}.md").write_text(
        f"# DP-SGD on {dataset}\n\n{epochs} epoch(s), at most {max_steps or 'all'} steps each, overrides {overrides}; "
        f"seeds {seeds}.\n\n{markdown_table(summary)}\n\n{markdown_table(rows)}\n\n![AUC vs epsilon]({img.name})\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder after `adrec prepare`")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-steps-per-epoch", type=int, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="a ranker.KEY=VALUE override")
    ap.add_argument("--physical-batch", type=int, default=32, help="ranker.dp.physical_batch (memory only)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(argv)
    run_benchmark(args.run, args.epsilons, args.seeds, args.epochs, args.max_steps_per_epoch, args.overrides, args.out,
                  args.physical_batch)
    return 0
