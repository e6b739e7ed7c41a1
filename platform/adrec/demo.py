"""``adrec demo``: the whole flow on a local Ray, then real HTTP requests to the served model.

Reads top to bottom like the flow: prepare -> candidates -> train -> evaluate -> serve -> ask.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from adrec import flow
from adrec.config import load_config
from adrec.run import RunDir

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def _banner(step: int, total: int, text: str) -> None:
    print(f"\n[{step}/{total}] {text}", flush=True)


LOG_NAME = "demo.log"


@contextlib.contextmanager
def _log_lines_to(path: Path, verbose: bool) -> Iterator[None]:
    """The story on stdout; every log line (the library's INFO, Ray's and its workers', progress bars) in
    ``path``, unless ``verbose``, when they stay on stderr at DEBUG.

    Ray's processes write to the file descriptor they inherit, not to Python's logging, so stderr itself
    (fd 2) is pointed at the file while the demo runs; a failure puts it back and shows the log's tail.
    """
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a", buffering=1) as f:
        os.dup2(f.fileno(), 2)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stderr)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            tail = path.read_text(errors="replace").splitlines()[-25:]
            print("\n".join(["", f"the demo failed; the last lines of {path}:", *tail]), file=sys.stderr)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def run_demo(run_dir: str | None, config: str | None, overrides: list[str], users: int = 3,
             verbose: bool = False) -> int:
    cfg = load_config(config or DEMO_CONFIG, overrides)
    run = RunDir(run_dir or f"runs/demo-{cfg.data.dataset.replace('/', '_')}")
    log_path = run.path / LOG_NAME
    if not verbose:
        print(f"adrec demo: the log lines of every stage go to {log_path} (-v shows them here)", flush=True)
    with _log_lines_to(log_path, verbose):
        return _demo(cfg, run, users)


def _demo(cfg, run: RunDir, users: int) -> int:
    import httpx
    import ray
    from ray import serve

    from adrec.serving.deploy import serve_run

    t0 = time.perf_counter()
    timings = {}
    try:
        _banner(1, 6, f"prepare: {cfg.data.dataset} -> features on Ray Data  ({run.path})")
        t = time.perf_counter()
        counts = flow.prepare(cfg, run)
        timings["prepare"] = time.perf_counter() - t
        print(f"      {counts['interactions']} interactions, {counts['users']} users, {counts['items']} items, "
              f"{counts['positives']} positives; crosses: {', '.join(counts['crosses']) or 'none'}")

        _banner(2, 6, "candidates: implicit ALS + item-item + popularity + text neighbours")
        t = time.perf_counter()
        cand = flow.candidates(cfg, run)
        timings["candidates"] = time.perf_counter() - t
        print(f"      union recall@100 = {cand['recall'].get('union.recall@100', float('nan')):.4f}")

        _banner(3, 6, f"train: ranker ({cfg.ranker.encoder}{' tiny' if cfg.ranker.tiny_encoder else ''}) on Ray Train, "
                      f"{cfg.ranker.num_workers} worker(s)")
        t = time.perf_counter()
        flow.train(cfg, run)
        timings["train"] = time.perf_counter() - t

        _banner(4, 6, "evaluate: CTR and top-K on the held-out tail of each user")
        t = time.perf_counter()
        metrics = flow.evaluate(cfg, run)
        timings["evaluate"] = time.perf_counter() - t
        for key in ("ctr.auc", "ctr.logloss", "ctr.calibration", "topk.precision@10", "topk.recall@10",
                    "topk.ndcg@10", "topk.map@10", "topk.hitrate@10", "topk.coverage@10", "candidates.recall@100"):
            print(f"      {key:24s} {metrics[key]:.4f}")
        print(f"      report: {run.report / 'report.md'}")

        _banner(5, 6, f"serve: Ray Serve on http://{cfg.serve.host}:{cfg.serve.port}")
        t = time.perf_counter()
        base = serve_run(cfg, run, blocking=False)
        timings["serve"] = time.perf_counter() - t

        _banner(6, 6, "ask: real HTTP requests")
        known = pd.read_csv(run.report / "topk.csv", dtype=str)["user"].drop_duplicates().head(users).tolist()
        context = _example_context(run)
        with httpx.Client(base_url=base, timeout=30) as client:
            print(f"      GET /healthz -> {client.get('/healthz').status_code}")
            for uid in [*known, "a-visitor-we-never-saw"]:
                body = {"user_id": uid, "k": 5, "context": context}
                resp = client.post("/recommend", json=body)
                print(f"      POST /recommend {json.dumps(body)} -> {resp.status_code}")
                if resp.status_code == 200:
                    answer = resp.json()
                    print(f"          ranked by {answer['ranked_by']}, model version {answer['version']}")
                    for rec in answer["items"]:
                        rel = "" if rec.get("relevance") is None else f"  relevance {rec['relevance']:+.3f}"
                        print(f"          {rec['rank']}. {rec['item']:>8}  click_prob {rec['click_prob']:.3f}{rel}  "
                              f"{_title(run, rec['item'])}")
                else:
                    print(f"          {resp.text}")
            if known:
                body = {"user_id": known[0], "k": 1, "context": context, "explain": True}
                resp = client.post("/recommend", json=body)
                print(f"      POST /recommend {json.dumps(body)} -> {resp.status_code}")
                if resp.status_code == 200:
                    _print_explained(run, resp.json())
            bad = client.post("/recommend", json={"user_id": known[0] if known else "x", "k": 0})
            print(f"      POST /recommend with k=0 -> {bad.status_code} {bad.json().get('detail', '')!s:.120}")
        timings["total"] = time.perf_counter() - t0
        print("\n      timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
        return 0
    finally:
        if ray.is_initialized():
            try:
                serve.shutdown()
            except Exception:  # Serve never started: nothing to shut down
                pass
            ray.shutdown()


def _print_explained(run: RunDir, answer: dict) -> None:
    """One explained recommendation, as a person reads it: sources, "because you liked", top attributions."""
    for rec in answer["items"]:
        print(f"          {rec['rank']}. {rec['item']:>8}  click_prob {rec['click_prob']:.3f}  {_title(run, rec['item'])}")
        print(f"             proposed by: {', '.join(rec.get('sources') or []) or '-'}")
        for liked in rec.get("because_you_liked") or []:
            print(f"             because you liked {liked['item']:>8} ({liked['method']} {liked['weight']:.3f})  "
                  f"{_title(run, liked['item'])[:50]}")
        for f in rec.get("features") or []:
            value = f" = {f['value']}" if f.get("value") else ""
            print(f"             {f['sign']} {f['feature']}{value} ({f['kind']}, {f['share']:.0%} of the attribution)")
        if rec.get("features") is None:
            print("             (feature attributions skipped: the explanation time budget ran out)")


def _example_context(run: RunDir) -> dict:
    """A context of the kind the data set logs (its first impression's), so the demo shows contextual ranking."""
    from adrec.features.spec import FeatureSpec

    spec = FeatureSpec.load(run.features / "spec.json")
    ctx = {}
    for c in spec.context:
        values = sorted(spec.vocabs.get(c, {}))
        if values:
            ctx[c.removeprefix("ctx.")] = values[0]
    return ctx


_TITLES: dict[str, dict[str, str]] = {}


def _title(run: RunDir, item: str) -> str:
    key = str(run.path)
    if key not in _TITLES:
        items = pd.read_parquet(run.features / "items.parquet", columns=["item", "text"])
        _TITLES[key] = dict(zip(items["item"].astype(str), items["text"]))
    return _TITLES[key].get(item, "")[:70]
