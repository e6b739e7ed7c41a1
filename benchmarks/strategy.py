"""Serving strategy benchmark: what objectives and exploration cost per request, on a trained run.

    python pipelines/benchmark_strategy.py --run RUN [--users 300] [--calls 300] [--out benchmarks]

Two timings per (objective, policy), one thread: the policy's choice alone
(:meth:`adrec.serving.strategy.Strategy.choose` on a pool of ``serve.pool`` items for k = 10, ``--calls``
calls on the first known user's scored pool), and the whole request in-process
(:meth:`adrec.serving.recommender.Recommender.answer_index`, candidates + ranker + choice, for ``--users``
known users, after a warm-up). Median and p95 milliseconds. Writes ``strategy_benchmark.json`` / ``.md``
into ``--out``. The NDCG and expected value of each strategy are the report's table (``adrec evaluate``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from adrec.config import ExplorationConfig, ServeConfig
from adrec.evaluation.report import markdown_table
from adrec.model_version import live_dir
from adrec.run import RunDir
from adrec.serving.holder import load_candidate_side
from adrec.serving.replica import single_threaded
from adrec.serving.strategy import Strategy, make_policy, request_rng

STRATEGIES = [("relevance", "off"), ("expected_value", "off"), ("relevance", "epsilon_greedy"),
              ("relevance", "thompson"), ("expected_value", "thompson")]


def _ms(times: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.median(times)), 3), "p95_ms": round(float(np.percentile(times, 95)), 3)}


def run_benchmark(run_dir: Path, users: int, calls: int, out: Path, k: int = 10) -> dict:
    single_threaded()
    serve = ServeConfig()
    rec = load_candidate_side(live_dir(RunDir(run_dir)), True, 100, 100, serve.precompute_max_users)
    n_users = min(users, rec.version.two_stage.n_users if rec.version.two_stage is not None else users)
    cand = rec.candidates(0, 100)
    pool_items = cand.items[:serve.pool]
    pool_probs = rec.rank(0, pool_items)
    bids = rec.bids[pool_items] if rec.bids is not None else np.ones(len(pool_items))
    rows = []
    for objective, policy in STRATEGIES:
        if objective == "expected_value" and rec.bids is None:
            continue
        s = Strategy(objective, make_policy(ExplorationConfig(policy=policy)), serve.pool)
        choose = []
        for i in range(calls):
            t = time.perf_counter()
            s.choose(pool_items, pool_probs, bids, k, request_rng(f"{i:x}"), list_order=True)
            choose.append((time.perf_counter() - t) * 1e3)
        for u in range(min(20, n_users)):  # warm-up
            rec.answer_index(u, k, None, 100, strategy=s)
        request = []
        for u in range(n_users):
            t = time.perf_counter()
            rec.answer_index(u, k, None, 100, strategy=s)
            request.append((time.perf_counter() - t) * 1e3)
        rows.append({"objective": objective, "policy": policy, **{f"choose_{k_}": v for k_, v in _ms(choose).items()},
                     **{f"request_{k_}": v for k_, v in _ms(request).items()}})
        print(rows[-1], flush=True)
    report = {"run": str(run_dir), "pool": serve.pool, "k": k, "users": n_users, "calls": calls, "results": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "strategy_benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "strategy_benchmark.md").write_text(
        f"Strategy cost, pool {serve.pool}, k {k}, {n_users} known users, {calls} choice calls "
        f"(`python pipelines/benchmark_strategy.py --run RUN`)\n\n{markdown_table(rows)}\n")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder after `adrec train`")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(argv)
    print(json.dumps(run_benchmark(args.run, args.users, args.calls, args.out), indent=2))
    return 0
