"""Explanations benchmark on a trained run: the report's faithfulness check and what ``explain=true`` costs.

    python pipelines/benchmark_explain.py --run RUN [--users 50] [--requests 20] [--out benchmarks]

Faithfulness: :func:`adrec.evaluation.faithfulness.faithfulness` over ``--users`` sampled users' served
top-10 lists (the evaluate stage's code and protocol). Cost: ``--requests`` in-process explained requests of
k = 10 (:meth:`adrec.serving.recommender.Recommender.explain` with an unbounded budget), median and p95
milliseconds, for (b) attention alone and for (b) + (c) Integrated Gradients. Writes
``explain_benchmark_<dataset>.json`` / ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from adrec.evaluation.faithfulness import faithfulness
from adrec.evaluation.report import markdown_table
from adrec.evaluation.stage import two_stage_lists
from adrec.features.pipeline import Features
from adrec.features.split import TEST
from adrec.model_version import live_dir, load_version
from adrec.run import RunDir, resolve_config
from adrec.serving.recommender import Recommender


def _ms(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(float(np.median(values)) * 1e3, 1), "p95_ms": round(float(np.quantile(values, 0.95)) * 1e3, 1)}


def run_benchmark(run_path: Path, n_users: int, n_requests: int, out: Path) -> dict:
    run = RunDir(run_path)
    cfg = resolve_config(run)
    feats = Features(run)
    test = feats.rows(TEST)
    users = np.unique(test.loc[test["label"] == 1, "user_idx"].to_numpy(np.int64))
    version = load_version(live_dir(run))
    top = two_stage_lists(version, users, 10)
    t0 = time.perf_counter()
    metrics, body = faithfulness(version, users, top, n_users, seed=cfg.ranker.seed)
    faith_s = time.perf_counter() - t0
    rec = Recommender(version)
    cost = {"attention_only": [], "attention_and_ig": []}
    for u, row in zip(users[:n_requests], top[:n_requests]):
        items = row[row >= 0]
        for name, budget in (("attention_only", 0.0), ("attention_and_ig", 1e9)):
            t = time.perf_counter()
            rec.explain(int(u), items, None, budget_ms=budget)
            cost[name].append(time.perf_counter() - t)
    result = {"dataset": cfg.data.dataset, "faithfulness": metrics, "faithfulness_seconds": round(faith_s, 1),
              "explain_cost_k10": {k: _ms(v) for k, v in cost.items()}, "requests": len(cost["attention_only"])}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"explain_benchmark_{cfg.data.dataset}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table([{"explanation": k, **v} for k, v in result["explain_cost_k10"].items()])
    (out / f"explain_benchmark_{cfg.data.dataset}.md").write_text(
        f"# Explanations on {cfg.data.dataset}\n\n## Faithfulness\n\n{body}\n\n## Cost of explain=true, k = 10, "
        f"in process ({result['requests']} requests)\n\n{table}\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder after `adrec train`")
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(argv)
    print(json.dumps(run_benchmark(args.run, args.users, args.requests, args.out), indent=2))
    return 0
