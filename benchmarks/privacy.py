"""DP-SGD benchmark: test AUC of the ranker at several epsilons and without DP, on a prepared run.

    python pipelines/benchmark_privacy.py (--run RUN | --dataset movielens-100k --data-dir DIR | --dataset synthetic)
        [--runs FOLDER] [--epsilons 1 3 8] [--seeds 0 1 2] [--epochs 2] [--max-steps-per-epoch N]
        [--set ranker.KEY=VALUE ...] [--out benchmarks]

``--dataset``: the prepare stage writes that data set's features first (into ``--runs/<dataset>``,
:func:`adrec.features.pipeline.prepare`, the stage ``adrec prepare`` runs), and the benchmark trains on them.

Each (epsilon, seed) trains the run's ranker configuration (``finetune: frozen``; ``--set`` overrides) in
this process (:func:`adrec.ranking.train.fit_local`, the loop Ray Train runs) with ``ranker.dp`` at that
target epsilon, or without DP, and scores it on the run's test impressions. Writes
``privacy_benchmark_<dataset>.json`` / ``.md`` / ``.png`` (AUC against epsilon) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
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


def prepared_run(dataset: str, data_dir: str | None, runs: Path) -> Path:
    """A run folder with ``dataset``'s features and its config (the prepare stage, default configuration)."""
    from adrec.flow import prepare

    from .ranker import dataset_overrides

    cfg = build_config(overrides=["data.pseudonym_key=benchmark", *dataset_overrides(dataset, data_dir, False)])
    path = runs / cfg.data.dataset
    t0 = time.perf_counter()
    prepare(cfg, RunDir(path))
    print(json.dumps({"prepared": str(path), "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return path


def run_benchmark(run_path: Path, epsilons: list[float], seeds: list[int], epochs: int, max_steps: int | None,
                  overrides: list[str], out: Path, physical_batch: int = 32, name: str | None = None) -> dict:
    """``name``: the files' stem (default ``privacy_benchmark_<dataset>``)."""
    run = RunDir(run_path)
    base = resolve_config(run)
    # the data set the features were prepared from (a run prepared by the library alone has no config file)
    dataset = run.manifest().get("stages", {}).get("prepare", {}).get("config", {}).get("data", {}).get(
        "dataset", base.data.dataset)
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
            (out / f"{name or 'privacy_benchmark_' + dataset}.partial.json").write_text(json.dumps(rows, indent=2) + "\n")
    return write_results(rows, dataset, epsilons, seeds, epochs, max_steps, overrides, out, physical_batch, name)


def write_results(rows: list[dict], dataset: str, epsilons: list[float], seeds: list[int], epochs: int,
                  max_steps: int | None, overrides: list[str], out: Path, physical_batch: int = 32,
                  name: str | None = None) -> dict:
    """The summary (medians over the seeds) of ``rows``, in ``<name>.json`` / ``.md`` / ``.png`` (default name
    ``privacy_benchmark_<dataset>``)."""
    name = name or f"privacy_benchmark_{dataset}"
    summary = []
    for eps in [*epsilons, "none"]:
        sel = [r for r in rows if r["target_epsilon"] == eps]
        aucs = [r["test_auc"] for r in sel]
        if not sel:
            continue
        summary.append({"epsilon": eps, "seeds": len(sel), "test AUC median": float(np.median(aucs)),
                        "test AUC mean": float(np.mean(aucs)), "test AUC std": float(np.std(aucs)),
                        "spent epsilon": float(np.max([r["spent_epsilon"] for r in sel])) if eps != "none" else "-",
                        "train s median": float(np.median([r["train_seconds"] for r in sel]))})
    curves = {"DP-SGD": {s["epsilon"]: s["test AUC median"] for s in summary if s["epsilon"] != "none"}}
    if summary and summary[-1]["epsilon"] == "none":
        curves["without DP"] = {e: summary[-1]["test AUC median"] for e in epsilons}
    out.mkdir(parents=True, exist_ok=True)
    img = plot_curves(curves, out / f"{name}.png",
                      xlabel="target epsilon (delta 1e-5)", ylabel="test AUC", title=f"DP-SGD on {dataset}")
    result = {"dataset": dataset, "epochs": epochs, "max_steps_per_epoch": max_steps, "overrides": overrides,
              "physical_batch": physical_batch,
              "runs": rows, "summary": summary}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(
        f"# DP-SGD on {dataset}\n\n{epochs} epoch(s), at most {max_steps or 'all'} steps each, overrides {overrides}; "
        f"seeds {seeds}; medians over the seeds (spent epsilon: the largest).\n\n{markdown_table(summary)}\n\n"
        f"{markdown_table(rows)}\n\n![AUC vs epsilon]({img.name})\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a run folder after `adrec prepare`")
    src.add_argument("--dataset", help="prepare this data set first (movielens-100k needs --data-dir; synthetic)")
    ap.add_argument("--data-dir", default=None, help="the unpacked ml-100k folder (--dataset movielens-100k)")
    ap.add_argument("--runs", type=Path, default=Path(tempfile.gettempdir()) / "adrec_privacy_runs",
                    help="where --dataset's run is prepared (default: under the temp dir)")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-steps-per-epoch", type=int, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="a ranker.KEY=VALUE override")
    ap.add_argument("--physical-batch", type=int, default=32, help="ranker.dp.physical_batch (memory only)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--name", default=None, help="the result files' stem (default privacy_benchmark_<dataset>)")
    args = ap.parse_args(argv)
    run = args.run if args.run is not None else prepared_run(args.dataset, args.data_dir, args.runs)
    run_benchmark(run, args.epsilons, args.seeds, args.epochs, args.max_steps_per_epoch, args.overrides, args.out,
                  args.physical_batch, args.name)
    return 0
