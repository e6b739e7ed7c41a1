"""Exposure trade-off benchmark: NDCG@10 against provider Gini at several ``topk.exposure_weight`` values
on a prepared run (its features and its fitted ``topk`` folder), under the evaluate stage's protocol
(users with a test positive, train + valid items excluded) and with its code
(:func:`adrec.evaluation.tradeoff.exposure_tradeoff`).

    python pipelines/benchmark_exposure.py --run RUN [--weights 0 0.1 0.2 0.3 0.5 0.8] [--out benchmarks] [--refit]

Writes ``exposure_benchmark_<dataset>.json`` / ``.md`` and ``exposure_tradeoff_<dataset>.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from adrec.config import EvalConfig
from adrec.evaluation.tradeoff import exposure_tradeoff
from adrec.features.pipeline import Features
from adrec.features.split import TEST
from adrec.run import RunDir, resolve_config
from adrec.topk import TwoStageRecommender, fit_topk, topk_dir
from adrec.topk.exposure import provider_codes, provider_column


def run_benchmark(run_path: Path, weights: list[float], out: Path, refit: bool = False) -> dict:
    t0 = time.perf_counter()
    run = RunDir(run_path)
    feats = Features(run)
    spec = feats.spec
    if refit:  # the run's topk folder refitted from its features and configuration (as `adrec candidates` does)
        fit_topk(resolve_config(run), run, feats)
    rec = TwoStageRecommender.load(topk_dir(run))
    if rec.item_provider is None:  # a topk folder saved before exposure re-ranking: the providers from the features
        rec.item_provider = provider_codes(feats.items, int(spec.n_items))
    seen = sp.load_npz(run.candidates / "seen.npz").tocsr()
    test = feats.rows(TEST)
    pos = test[test["label"] == 1].groupby("user_idx")["item_idx"].apply(lambda s: set(s.tolist()))
    users = pos.index.to_numpy(np.int64)
    out.mkdir(parents=True, exist_ok=True)
    dataset = resolve_config(run).data.dataset
    metrics, body, img = exposure_tradeoff(rec, users, pos.tolist(), seen, int(spec.n_catalog), 10, weights, out)
    final = out / f"exposure_tradeoff_{dataset}.png"
    img.replace(final)
    result = {"dataset": dataset, "users": int(len(users)), "providers": provider_column(feats.items)[1],
              "exposure_pool": rec.exposure_pool, "metrics": metrics, "seconds": round(time.perf_counter() - t0, 1)}
    (out / f"exposure_benchmark_{dataset}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"exposure_benchmark_{dataset}.md").write_text(
        f"# Exposure trade-off on {dataset}\n\n{len(users)} users; providers: {result['providers']}.\n\n{body}\n\n"
        f"![trade-off]({final.name})\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder after `adrec candidates`")
    ap.add_argument("--weights", type=float, nargs="+", default=EvalConfig().exposure_weights)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--refit", action="store_true", help="refit the run's topk folder first (it is overwritten)")
    args = ap.parse_args(argv)
    res = run_benchmark(args.run, args.weights, args.out, args.refit)
    print(json.dumps(res, indent=2))
    return 0
