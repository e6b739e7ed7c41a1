"""Serving benchmark: the Serve app over HTTP vs the same top-10 in-process, cached vs encoder-per-request.

Ways to compute the same top-10 for the same users:

- ``serve:<topology>@<ingress>``: ``POST /recommend`` to the Serve app on 127.0.0.1 (``graph``: three
  deployments, ``fused``: one; see :mod:`adrec.serving.builder`) behind one of Serve's HTTP ingresses
  (``haproxy``: HAProxy forwarding to the replicas' own HTTP servers; ``proxy``: the Python proxy
  actor; each on its own local Ray, started in turn: see :mod:`adrec.runtime`), a bounded
  closed-loop load at each concurrency (each of ``c`` clients sends its next request when the previous
  one is answered) for a fixed number of requests; the targets take turns at each level and each
  (target, level) runs ``repeats`` times: the table shows per-metric medians, the JSON every run;
- ``serve:floor@<ingress>``: the same HTTP path to a FastAPI deployment answering a constant list (no
  model), what the ingress, one replica and the load client cost by themselves;
- ``inprocess``: :meth:`Recommender.recommend` called in this process (what the graph computes,
  without HTTP, handles and batching) -> the cost of Serve is ``serve / inprocess``;
- ``encoder_per_request``: the same call with a ranker that re-encodes every candidate's (and history
  item's) text with the encoder on each request instead of reading the per-version cache -> the gain
  from cached embeddings is ``encoder_per_request / inprocess``.

``pipelines/benchmark_serving.py`` is the command line around :func:`run_benchmark`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .loadtest import LoadResult, call_load, measure_serve, raw_user_ids, request_bodies

log = logging.getLogger(__name__)


# ---- the encoder-per-request ranker --------------------------------------------------------------------
class EncoderPerRequestRanker:
    """Wraps a :class:`FusionRanker`: every ``predict`` re-encodes the texts of the items it needs.

    The items of the rows (candidates and history) are run through the encoder and mean-pooled, the
    result replaces the model's cached pooled texts for this call only (the rest of the cache is zeroed,
    so nothing cached can leak into the score), and the model runs as usual. Scores equal the cached
    ranker's up to float noise; only the cost differs.
    """

    def __init__(self, ranker):
        import torch

        self.ranker = ranker
        self.text = ranker.model.text
        self._scratch = torch.zeros_like(self.text.pooled)

    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        import torch

        from adrec.ranking.data import rows_to_arrays
        from adrec.features.encoder import mean_pool

        arrays = rows_to_arrays(rows, self.ranker.arch)
        codes = np.unique(np.concatenate([arrays["item"], arrays["hist"].reshape(-1)]))
        codes = torch.as_tensor(codes[codes > 0])
        text = self.text
        cached = text.pooled
        with torch.inference_mode():
            mask = text.tok_mask[codes]
            t = int(mask.sum(1).max().clamp(min=1)) if len(codes) else 1
            hidden = text.encoder(input_ids=text.tok_ids[codes, :t], attention_mask=mask[:, :t]).last_hidden_state
            scratch = self._scratch
            scratch.zero_()
            scratch[codes] = mean_pool(hidden, mask[:, :t]).to(scratch.dtype)
        text.pooled = scratch
        try:
            return self.ranker.predict(rows)
        finally:
            text.pooled = cached


# ---- the benchmark --------------------------------------------------------------------------------------
#: The target name of Serve's floor: what the HTTP ingress, one FastAPI replica and the load client cost
#: with no model at all. The distance from it to a topology is what the model's work adds.
FLOOR = "floor"


# The latency target: p99 at concurrency 8 on the benchmark machine.
TARGET_P99_MS = 100.0
TARGET_CONCURRENCY = 8


def topology_of(name: str) -> str:
    """``fused@haproxy`` -> ``fused``: a target is named ``<topology>[@<ingress>]``."""
    return name.split("@", 1)[0]



class Benchmark:
    """One benchmark run: the in-process paths built once, Serve targets measured in one or more rounds.

    A round is a set of running Serve apps (:meth:`measure`); rounds on differently started Rays (the
    HAProxy and the proxy-actor ingress) land in the same report. :meth:`report` then measures the
    in-process and encoder-per-request paths on the same requests and computes the ratios.
    """

    def __init__(self, model_dir: str | Path, key: bytes, users: list[str], *, requests: int = 2000,
                 concurrency: tuple[int, ...] = (1, 8, 32), encoder_requests: int = 100, k: int = 10,
                 api_key: str | None = None, warmup: int = 50, context: dict | None = None, repeats: int = 1):
        from adrec.config import ServeConfig
        from adrec.model_version.lists import stored_length
        from adrec.serving.recommender import Recommender
        from adrec.serving.replica import single_threaded

        single_threaded()  # like a replica: the in-process paths get one thread too
        self.model_dir, self.k, self.requests, self.repeats = model_dir, k, requests, repeats
        self.concurrency, self.encoder_requests, self.warmup = concurrency, encoder_requests, warmup
        self.headers = {"x-api-key": api_key} if api_key else {}
        self.bodies = request_bodies(users, max(requests, 500), k=k, context=context)
        self.load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        serve_cfg = ServeConfig()  # the served defaults: known users' two-stage lists precomputed at load
        list_len = stored_length()
        self.rec = Recommender(model_dir, key)
        self.rec.precompute_lists(list_len, serve_cfg.precompute_max_users)
        self.slow = Recommender(model_dir, key)
        self.slow.precompute_lists(list_len, serve_cfg.precompute_max_users)  # same candidates: the ratio is the encoder's
        self.slow.ranker = EncoderPerRequestRanker(self.slow.ranker)
        self.results: list[LoadResult] = []
        self.runs: list[LoadResult] = []
        self.targets: list[str] = []
        self.checked = self.bodies[:20]
        self.agree: dict[str, int] = {}

    def cached(self, b: dict) -> list:
        return self.rec.recommend(b["user_id"], b["k"], b.get("context"))

    def per_request(self, b: dict) -> list:
        return self.slow.recommend(b["user_id"], b["k"], b.get("context"))

    def measure(self, targets: dict[str, tuple[str, str | None]]) -> None:
        """Load the running Serve ``targets`` ({name: (url, app name)}) and check they answer like in-process."""
        import httpx

        results, runs = measure_serve(targets, self.bodies, self.concurrency, self.requests, self.headers,
                                      self.warmup, self.repeats)
        self.results += results
        self.runs += runs
        self.targets += list(targets)
        with httpx.Client(headers=self.headers, timeout=30) as client:
            for name, (base, _) in targets.items():
                if topology_of(name) == FLOOR:  # answers a constant list by design
                    continue
                key = f"serve:{name}_vs_inprocess"
                self.agree[key] = sum(
                    [r["item"] for r in client.post(base.rstrip("/") + "/recommend", json=b).json()["items"]]
                    == [r["item"] for r in self.cached(b)] for b in self.checked)

    def report(self) -> dict:
        for b in self.bodies[:20]:
            self.cached(b)
        inproc = call_load("inprocess", self.cached, self.bodies, self.requests)
        self.per_request(self.bodies[0])
        enc = call_load("encoder_per_request", self.per_request, self.bodies,
                        min(self.encoder_requests, self.requests))
        self.agree["encoder_vs_cached"] = sum([r["item"] for r in self.per_request(b)] == [r["item"] for r in self.cached(b)]
                                              for b in self.checked)
        results = self.results + [inproc, enc]
        return {
            "model_version": self.rec.version_id,
            "model_dir": str(self.model_dir),
            "n_items": int(self.rec.version.spec.n_items),
            "encoder": self.rec.ranker.cfg.encoder if hasattr(self.rec.ranker, "cfg") else None,
            "tiny_encoder": bool(getattr(getattr(self.rec.ranker, "cfg", None), "tiny_encoder", False)),
            "k": self.k,
            "requests": self.requests,
            "repeats": self.repeats,
            "results": [asdict(r) | {"success_rate": round(r.success_rate, 4)} for r in results],
            "runs": [asdict(r) for r in self.runs],
            "ratios": ratios(self.targets, self.results, inproc, enc, self.concurrency),
            "target": target_check(self.targets, self.results),
            "top_k_agreement": {name: f"{v}/{len(self.checked)}" for name, v in self.agree.items()},
            "load_average": {"before": self.load_before,
                             "after": os.getloadavg() if self.load_before is not None else None},
            "cpu_count": os.cpu_count(),
        }


def _at(results: list[LoadResult], name: str, c: int) -> LoadResult | None:
    return next((r for r in results if r.path == f"serve:{name}" and r.concurrency == c), None)


def ratios(targets: list[str], results: list[LoadResult], inproc: LoadResult, enc: LoadResult,
           concurrency: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "encoder_per_request_over_cached_mean": round(enc.mean_ms / inproc.mean_ms, 2),
        "encoder_per_request_over_cached_cpu": round(enc.cpu_ms["total"] / inproc.cpu_ms["total"], 2),
    }
    for name in targets:
        mine = [r for r in results if r.path == f"serve:{name}"]
        c1 = next((r for r in mine if r.concurrency == 1), mine[0])
        out[f"serve:{name}_overhead_p50_c1"] = round(c1.p50_ms / inproc.p50_ms, 2)
        if c1.cpu_ms:
            serve_cpu = c1.cpu_ms["total"] - c1.cpu_ms.get("client", 0.0)
            out[f"serve:{name}_cpu_over_inprocess_cpu_c1"] = round(serve_cpu / inproc.cpu_ms["total"], 2)
    # The same topology on two ingresses, and the two topologies on one ingress, at each level.
    pairs = []
    for a in targets:
        for b in targets:
            same_ingress = a.partition("@")[2] == b.partition("@")[2]
            if topology_of(a) == "graph" and topology_of(b) == "fused" and same_ingress:
                pairs.append(("graph_over_fused" + ("@" + a.partition("@")[2] if "@" in a else ""), a, b))
            if topology_of(a) == topology_of(b) and a.endswith("@proxy") and b.endswith("@haproxy"):
                pairs.append((f"{topology_of(a)}:proxy_over_haproxy", a, b))
    for label, a, b in pairs:
        for c in concurrency:
            ra, rb = _at(results, a, c), _at(results, b, c)
            if ra and rb:
                if ra.cpu_ms and rb.cpu_ms:
                    out[f"{label}_cpu_c{c}"] = round(ra.cpu_ms["total"] / rb.cpu_ms["total"], 2)
                out[f"{label}_p99_c{c}"] = round(ra.p99_ms / rb.p99_ms, 2)
    return out


def target_check(targets: list[str], results: list[LoadResult]) -> dict[str, Any]:
    out: dict[str, Any] = {"p99_ms_below": TARGET_P99_MS, "concurrency": TARGET_CONCURRENCY}
    for name in targets:
        at = _at(results, name, TARGET_CONCURRENCY)
        if at is None:
            continue
        if topology_of(name) == FLOOR:
            out[f"serve:{name}"] = {"p99_ms": at.p99_ms, "floor": True}
        else:
            out[f"serve:{name}"] = {"p99_ms": at.p99_ms, "met": bool(at.p99_ms < TARGET_P99_MS)}
    return out


def run_benchmark(targets: dict[str, tuple[str, str | None]], model_dir: str | Path, key: bytes, users: list[str],
                  **kwargs: Any) -> dict:
    """Measure every path once; ``targets`` are running Serve apps for ``model_dir``: {name: (url, app name)}."""
    bench = Benchmark(model_dir, key, users, **kwargs)
    bench.measure(targets)
    return bench.report()


def markdown(report: dict) -> str:
    lines = [f"# Serving benchmark (model {report['model_version']}, {report['n_items']} items, top-{report['k']})", "",
             "| path | concurrency | requests | ok | req/s | p50 ms | p95 ms | p99 ms | mean ms | CPU ms/request |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        cpu = r.get("cpu_ms") or {}
        parts = [f"{k} {v}" for k, v in cpu.items() if k != "total"]
        cpu_txt = f"{cpu.get('total', '')}" + (f" ({', '.join(parts)})" if parts else "")
        lines.append(f"| {r['path']} | {r['concurrency']} | {r['requests']} | {r['ok']} | {r['rps']} | {r['p50_ms']} | "
                     f"{r['p95_ms']} | {r['p99_ms']} | {r['mean_ms']} | {cpu_txt} |")
    ratios_, target = report["ratios"], report.get("target", {})
    lines += ["", f"Medians of {report.get('repeats', 1)} run(s) per row; CPU ms/request: Serve processes + the "
              "load client (total), or this process (in-process paths). `@haproxy`: Serve's HAProxy ingress; "
              "`@proxy`: Serve's proxy actor; `floor`: the same HTTP path to a FastAPI deployment answering a "
              "constant list (no model)."]
    for name in dict.fromkeys(r["path"].split(":", 1)[1] for r in report["results"] if r["path"].startswith("serve:")):
        line = f"- {name}: cost of Serve (p50 over HTTP at concurrency 1 / in-process p50): " \
               f"**{ratios_[f'serve:{name}_overhead_p50_c1']}x**"
        if f"serve:{name}_cpu_over_inprocess_cpu_c1" in ratios_:
            line += f"; in CPU (Serve processes / in-process): **{ratios_[f'serve:{name}_cpu_over_inprocess_cpu_c1']}x**"
        got = target.get(f"serve:{name}")
        if got and "met" in got:
            line += (f"; p99 at concurrency {target['concurrency']}: {got['p99_ms']} ms "
                     f"(target < {target['p99_ms_below']:.0f} ms: {'met' if got['met'] else 'not met'})")
        elif got:
            line += f"; p99 at concurrency {target['concurrency']}: {got['p99_ms']} ms (no model)"
        lines.append(line)
    # graph_over_fused[@<ingress>]_cpu_c<c> and <topology>:proxy_over_haproxy_cpu_c<c>, one line each
    for label, title in (("graph_over_fused", "graph / fused"), ("proxy_over_haproxy", "proxy actor / HAProxy")):
        got = []
        for key, v in ratios_.items():
            if label in key and "_cpu_c" in key:
                head, c = key.rsplit("_cpu_c", 1)
                who = head.split(":", 1)[0] if ":" in head else head.partition("@")[2]
                got.append(f"{who + ' ' if who else ''}c{c} {v}x")
        if got:
            lines.append(f"- CPU per request, {title}: " + ", ".join(got))
    lines += [f"- gain from cached item embeddings (encoder-per-request / cached, mean latency): "
              f"**{ratios_['encoder_per_request_over_cached_mean']}x** (CPU: {ratios_['encoder_per_request_over_cached_cpu']}x)",
              f"- same top-{report['k']}: " + ", ".join(f"{k} {v}" for k, v in report["top_k_agreement"].items())]
    if report.get("load_average"):
        la = report["load_average"]
        lines.append(f"- machine: {report.get('cpu_count')} CPUs, load average before/after "
                     f"{la['before'][0] if la['before'] else '?'} / {la['after'][0] if la['after'] else '?'} "
                     "(other work on the machine inflates latency far more than CPU ms/request)")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "serving_benchmark.json", out / "serving_benchmark.md"
    js.write_text(json.dumps(report, indent=2))
    md.write_text(markdown(report))
    return js, md


# ---- command line (pipelines/benchmark_serving.py) ---------------------------------------------------------
def build_parser():
    import argparse

    ap = argparse.ArgumentParser(prog="benchmark_serving", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run folder with a published model version (<run>/model)")
    ap.add_argument("--config", help="YAML config (default: the run's config.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--address", help="Ray address of a running cluster (default: start Ray in-process, once per "
                                      "--ingress)")
    ap.add_argument("--out", default="bench_results/serving", help="folder for serving_benchmark.json/.md")
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--encoder-requests", type=int, default=200, help="requests for the encoder-per-request path")
    ap.add_argument("--port", type=int, default=28080, help="Serve's HTTP port on 127.0.0.1")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--topologies", default="graph,fused", help="Serve topologies to measure side by side")
    ap.add_argument("--ingress", default="haproxy,proxy",
                    help="Serve ingresses to measure (ray.serve_ingress), each on its own local Ray started in turn; "
                         "ignored with --address (the cluster's own ingress is measured)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per (topology, concurrency); medians reported")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip Serve's floor (a constant-answer app on the same ingress, measured alongside)")
    ap.add_argument("--replicas", type=int, default=2,
                    help="replicas of what holds the ranker (graph: RankerDeployment, fused: Ingress); each computes "
                         "on one thread, so 2 uses both cores of a 2-core machine")
    return ap


def _deploy_round(cfg, run, args, topologies: list[str], suffix: str):
    """Deploy one app per topology (route /<topology>) and, unless skipped, Serve's floor, on the running
    Ray; returns ({name: (url, app name)}, the first app's AppArgs)."""
    from ray import serve

    from adrec.serving.args import AppArgs
    from adrec.serving.deploy import deploy

    # Feedback goes to a scratch log: the benchmark sends none, and must not touch the run's.
    apps = {t: AppArgs.from_config(cfg, run.path, host="127.0.0.1", port=args.port, app_name=f"adrec-bench-{t}",
                                   route_prefix=f"/{t}", topology=t, ranker_replicas=args.replicas,
                                   feedback_log=str(Path(args.out).resolve() / "feedback.jsonl"))
            for t in topologies}
    targets = {t + suffix: (deploy(a), a.app_name) for t, a in apps.items()}
    if args.floor:
        # No CPU claim: the topologies' replicas hold all of the cluster's CPUs (a claim only schedules).
        from .serve_floor import floor_app

        app = next(iter(apps.values()))
        serve.run(floor_app(args.replicas, 0, app.max_ongoing_requests), name="adrec-bench-floor",
                  route_prefix=f"/{FLOOR}")
        targets[FLOOR + suffix] = (f"http://127.0.0.1:{args.port}/{FLOOR}", "adrec-bench-floor")
    return targets, next(iter(apps.values()))


def main(argv: list[str] | None = None) -> int:
    import sys

    import ray
    from ray import serve

    from adrec.model_version import live_dir
    from adrec.run import RunDir, resolve_config
    from adrec.runtime import haproxy_threads, init_ray

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run = RunDir(args.run)
    model_dir = live_dir(run)  # the run's live version (a clear error when it has none)
    overrides = list(args.overrides) + ([f"ray.address={args.address}"] if args.address else [])
    cfg = resolve_config(run, args.config, overrides)
    topologies = [t.strip() for t in args.topologies.split(",") if t.strip()]
    ingresses = [None] if args.address else [m.strip() for m in args.ingress.split(",") if m.strip()]
    bench = None
    app = None
    for mode in ingresses:
        # Serve's ingress is fixed when Ray starts: each one gets its own local Ray, started in turn.
        mode_cfg = cfg if mode is None else resolve_config(run, args.config, overrides + [f"ray.serve_ingress={mode}"])
        init_ray(mode_cfg.ray)
        try:
            targets, app = _deploy_round(mode_cfg, run, args, topologies, "" if mode is None else f"@{mode}")
            if bench is None:
                bench = Benchmark(model_dir, app.resolved().key_bytes(), raw_user_ids(run), requests=args.requests,
                                  concurrency=tuple(int(c) for c in args.concurrency.split(",")),
                                  encoder_requests=args.encoder_requests, k=args.k,
                                  api_key=app.api_key.get_secret_value() if app.api_key else None,
                                  repeats=args.repeats)
            bench.measure(targets)
        finally:
            serve.shutdown()
            if mode is not None:
                ray.shutdown()
    report = bench.report()
    report["settings"] = {"max_ongoing_requests": app.max_ongoing_requests, "max_batch_size": app.max_batch_size,
                          "replicas": args.replicas, "n_candidates": app.n_candidates,
                          "num_cpus_per_replica": app.num_cpus_per_replica, "topologies": topologies,
                          "ingresses": ingresses,
                          "haproxy_threads": haproxy_threads() if "haproxy" in ingresses else None}
    report["command"] = "python pipelines/benchmark_serving.py " + " ".join(argv if argv is not None else sys.argv[1:])
    js, md = write_report(report, args.out)
    print(markdown(report))
    print(f"written: {js} {md}")
    return 0
