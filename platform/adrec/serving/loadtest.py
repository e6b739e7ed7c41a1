"""Serving benchmark: the Serve app over HTTP vs the same top-10 in-process, cached vs encoder-per-request.

Ways to compute the same top-10 for the same users:

- ``serve:<topology>``: ``POST /recommend`` to the Serve app on 127.0.0.1 (``graph``: three deployments,
  ``fused``: one; see :mod:`adrec.serving.app`), a bounded closed-loop load at each concurrency (each
  of ``c`` clients sends its next request when the previous one is answered) for a fixed number of
  requests; the topologies take turns at each level and each (topology, level) runs ``repeats``
  times: the table shows per-metric medians, the JSON every run;
- ``inprocess``: :meth:`Recommender.recommend` called in this process (what the graph computes,
  without HTTP, handles and batching) -> the cost of Serve is ``serve / inprocess``;
- ``encoder_per_request``: the same call with a ranker that re-encodes every candidate's (and history
  item's) text with the encoder on each request instead of reading the per-version cache -> the gain
  from cached embeddings is ``encoder_per_request / inprocess``.

``pipelines/benchmark_serving.py`` is the command line around :func:`run_benchmark`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


# ---- latency statistics ------------------------------------------------------------------------------
@dataclass
class LoadResult:
    path: str
    concurrency: int
    requests: int
    ok: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    statuses: dict[str, int] = field(default_factory=dict)
    # CPU milliseconds per request, per process group (Serve replicas, proxy, client, or this process).
    cpu_ms: dict[str, float] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return self.ok / self.requests if self.requests else 0.0


def summarize(path: str, concurrency: int, latencies_s: list[float], ok: int, seconds: float,
              statuses: dict[str, int] | None = None) -> LoadResult:
    lat = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: math.nan)
    return LoadResult(path=path, concurrency=concurrency, requests=len(lat), ok=ok, seconds=round(seconds, 3),
                      rps=round(len(lat) / seconds, 2) if seconds > 0 else math.nan,
                      p50_ms=round(pct(50), 2), p95_ms=round(pct(95), 2), p99_ms=round(pct(99), 2),
                      mean_ms=round(float(lat.mean()), 2) if len(lat) else math.nan, statuses=dict(statuses or {}))


# ---- CPU time of the Serve processes (robust to other load on the machine) ------------------------------
def local_raylet_pid() -> int | None:
    """PID of the raylet this driver started (Ray's workers are its children), None when attached to a
    cluster started elsewhere."""
    try:
        import ray

        return ray._private.worker._global_node.all_processes["raylet"][0].process.pid  # private, best effort
    except Exception:
        return None


def serve_cpu_seconds(app_name: str, raylet_pid: int | None = None) -> dict[str, float]:
    """CPU seconds (user + system) so far of this machine's Serve processes: the app's replicas (per
    deployment) and the HTTP proxy. Linux only (``/proc``); empty elsewhere.

    ``raylet_pid``: count only that raylet's workers. Other Ray clusters on the machine (tests,
    other benchmarks) run proxies too; one of them ending between two readings made a sum over
    every ``ProxyActor`` go negative.
    """
    import os

    proc = Path("/proc")
    if not proc.is_dir():
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            if raylet_pid is not None and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != raylet_pid:
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "ray::ServeReplica:" in cmd and f":{app_name}:" in cmd:
                name = cmd.split(f":{app_name}:", 1)[1].split(".", 1)[0].split()[0]
            elif "ray::ProxyActor" in cmd:
                name = "proxy"
            else:
                continue
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return out


def cpu_ms_per_request(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    per = {k: round((after.get(k, 0.0) - before.get(k, 0.0)) * 1000 / max(n, 1), 2) for k in after}
    per["total"] = round(sum(per.values()), 2)
    return per


# ---- HTTP load ---------------------------------------------------------------------------------------
async def _http_load(url: str, bodies: list[dict], concurrency: int, n_requests: int, headers: dict[str, str],
                     timeout_s: float) -> LoadResult:
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    ok = 0
    counter = iter(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, headers=headers) as client:
        async def worker() -> None:
            nonlocal ok
            for i in counter:
                body = bodies[i % len(bodies)]
                t = time.perf_counter()
                try:
                    r = await client.post(url, json=body)
                    code = str(r.status_code)
                except httpx.HTTPError as err:
                    code = type(err).__name__
                latencies.append(time.perf_counter() - t)
                statuses[code] = statuses.get(code, 0) + 1
                ok += code == "200"

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    return summarize("serve", concurrency, latencies, ok, seconds, statuses)


def http_load(url: str, bodies: list[dict], concurrency: int, n_requests: int, headers: dict[str, str] | None = None,
              timeout_s: float = 30.0) -> LoadResult:
    """``n_requests`` POSTs of ``bodies`` (cycled) to ``url`` from ``concurrency`` closed-loop clients."""
    return asyncio.run(_http_load(url, bodies, concurrency, n_requests, headers or {}, timeout_s))


def call_load(path: str, fn: Callable[[dict], Any], bodies: list[dict], n_requests: int) -> LoadResult:
    """The same requests as plain in-process calls, one after another."""
    latencies = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n_requests):
        t = time.perf_counter()
        fn(bodies[i % len(bodies)])
        latencies.append(time.perf_counter() - t)
    res = summarize(path, 1, latencies, n_requests, time.perf_counter() - t0)
    res.cpu_ms = {"total": round((time.process_time() - c0) * 1000 / max(n_requests, 1), 2)}
    return res


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
        from adrec.ranking.encoder import mean_pool

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


# ---- inputs ----------------------------------------------------------------------------------------------
def raw_user_ids(run) -> list[str]:
    """The data owner's user ids of a run (read from the raw interactions its schema names)."""
    from adrec.data.schema import load_schema

    schema_path = run.manifest().get("stages", {}).get("prepare", {}).get("schema") or str(run.raw / "schema.yaml")
    schema, root = load_schema(schema_path)
    t = schema.interactions
    path = (root / t.path).resolve()
    df = pd.read_csv(path, sep=t.sep, header=0 if t.header else None, names=None if t.header else t.names, dtype=str,
                     usecols=[t.user], engine="python" if len(t.sep) > 1 else "c")
    return pd.unique(df[t.user]).tolist()


def request_bodies(users: list[str], n: int, k: int = 10, unknown_share: float = 0.1, seed: int = 0,
                   context: dict | None = None) -> list[dict]:
    """``n`` request bodies: mostly known users, some never-seen ones (the popularity path)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        uid = f"visitor-{i}" if rng.random() < unknown_share else str(users[rng.integers(len(users))])
        body: dict[str, Any] = {"user_id": uid, "k": k}
        if context:
            body["context"] = dict(context)
        out.append(body)
    return out


# ---- the benchmark --------------------------------------------------------------------------------------
#: The target name of Serve's floor: what the HTTP proxy, one FastAPI replica hop and the load client cost
#: with no model at all. The distance from it to a topology is what the model's work adds.
FLOOR = "floor"


# The latency target: p99 at concurrency 8 on the benchmark machine.
TARGET_P99_MS = 100.0
TARGET_CONCURRENCY = 8


def median_result(runs: list[LoadResult]) -> LoadResult:
    """Per-metric medians of repeated runs of one (path, concurrency); counts are summed."""
    if len(runs) == 1:
        return runs[0]
    med = lambda xs: round(float(np.median(xs)), 2)  # noqa: E731
    statuses: dict[str, int] = {}
    for r in runs:
        for code, n in r.statuses.items():
            statuses[code] = statuses.get(code, 0) + n
    keys = set().union(*(r.cpu_ms for r in runs))
    cpu = {k: med([r.cpu_ms.get(k, 0.0) for r in runs]) for k in sorted(keys, key=lambda k: (k == "total", k))}
    first = runs[0]
    return LoadResult(path=first.path, concurrency=first.concurrency, requests=sum(r.requests for r in runs),
                      ok=sum(r.ok for r in runs), seconds=round(sum(r.seconds for r in runs), 3),
                      rps=med([r.rps for r in runs]), p50_ms=med([r.p50_ms for r in runs]),
                      p95_ms=med([r.p95_ms for r in runs]), p99_ms=med([r.p99_ms for r in runs]),
                      mean_ms=med([r.mean_ms for r in runs]), statuses=statuses, cpu_ms=cpu)


def measure_serve(targets: dict[str, tuple[str, str | None]], bodies: list[dict], concurrency: tuple[int, ...],
                  requests: int, headers: dict[str, str], warmup: int = 50, repeats: int = 1) -> tuple[list, list]:
    """Closed-loop HTTP load on each target ({topology: (base_url, Serve app name)}).

    The targets take turns at each concurrency level (and repeat), so a change in the machine's other
    load hits them alike. Returns (per-metric medians per (target, level), every run).
    """
    runs: dict[tuple[str, int], list[LoadResult]] = {}
    raylet = local_raylet_pid()
    for name, (base, _) in targets.items():
        http_load(base.rstrip("/") + "/recommend", bodies, max(concurrency), warmup, headers)  # warm, connected
    for c in concurrency:
        for _ in range(repeats):
            for name, (base, app_name) in targets.items():
                cpu0, own0 = serve_cpu_seconds(app_name, raylet) if app_name else {}, time.process_time()
                res = http_load(base.rstrip("/") + "/recommend", bodies, c, requests, headers)
                res.path = f"serve:{name}"
                if app_name:
                    res.cpu_ms = cpu_ms_per_request(cpu0, serve_cpu_seconds(app_name, raylet), requests)
                    res.cpu_ms["client"] = round((time.process_time() - own0) * 1000 / requests, 2)
                    res.cpu_ms["total"] = round(res.cpu_ms["total"] + res.cpu_ms["client"], 2)
                log.info("%s c=%d: p50 %.1f p99 %.1f ms, %.1f req/s, CPU %s", res.path, c, res.p50_ms, res.p99_ms,
                         res.rps, res.cpu_ms)
                runs.setdefault((res.path, c), []).append(res)
    return [median_result(v) for v in runs.values()], [r for v in runs.values() for r in v]


def run_benchmark(targets: dict[str, tuple[str, str | None]], model_dir: str | Path, key: bytes, users: list[str], *,
                  requests: int = 2000, concurrency: tuple[int, ...] = (1, 8, 32), encoder_requests: int = 100,
                  k: int = 10, api_key: str | None = None, warmup: int = 50, context: dict | None = None,
                  repeats: int = 1) -> dict:
    """Measure every path; ``targets`` are running Serve apps for ``model_dir``: {topology: (url, app name)}."""
    from adrec.serving.app import single_threaded
    from adrec.serving.recommender import Recommender

    single_threaded()  # like a replica: the in-process paths get one thread too
    headers = {"x-api-key": api_key} if api_key else {}
    bodies = request_bodies(users, max(requests, 500), k=k, context=context)

    import os

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results, runs = measure_serve(targets, bodies, concurrency, requests, headers, warmup, repeats)

    from adrec.config import ServeConfig

    serve_cfg = ServeConfig()  # the served defaults: known users' two-stage lists precomputed at load
    list_len = max(serve_cfg.n_candidates, serve_cfg.max_k)
    rec = Recommender(model_dir, key)
    rec.precompute_lists(list_len, serve_cfg.precompute_max_users)

    def cached(b: dict) -> list:
        return rec.recommend(b["user_id"], b["k"], b.get("context"))

    for b in bodies[:20]:
        cached(b)
    inproc = call_load("inprocess", cached, bodies, requests)
    results.append(inproc)

    slow = Recommender(model_dir, key)
    slow.precompute_lists(list_len, serve_cfg.precompute_max_users)  # the same candidates: the ratio is the encoder's
    slow.ranker = EncoderPerRequestRanker(slow.ranker)

    def per_request(b: dict) -> list:
        return slow.recommend(b["user_id"], b["k"], b.get("context"))

    per_request(bodies[0])
    enc = call_load("encoder_per_request", per_request, bodies, min(encoder_requests, requests))
    results.append(enc)

    # Every path answers with the same top-k.
    import httpx

    agree = {f"serve:{name}_vs_inprocess": 0 for name in targets if name != FLOOR} | {"encoder_vs_cached": 0}
    checked = bodies[:20]
    with httpx.Client(headers=headers, timeout=30) as client:
        for b in checked:
            mine = [r["item"] for r in cached(b)]
            for name, (base, _) in targets.items():
                if name == FLOOR:  # answers a constant list by design
                    continue
                served = [r["item"] for r in client.post(base.rstrip("/") + "/recommend", json=b).json()["items"]]
                agree[f"serve:{name}_vs_inprocess"] += served == mine
            agree["encoder_vs_cached"] += [r["item"] for r in per_request(b)] == mine

    ratios: dict[str, Any] = {
        "encoder_per_request_over_cached_mean": round(enc.mean_ms / inproc.mean_ms, 2),
        "encoder_per_request_over_cached_cpu": round(enc.cpu_ms["total"] / inproc.cpu_ms["total"], 2),
    }
    target: dict[str, Any] = {"p99_ms_below": TARGET_P99_MS, "concurrency": TARGET_CONCURRENCY}
    for name in targets:
        mine = [r for r in results if r.path == f"serve:{name}"]
        c1 = next((r for r in mine if r.concurrency == 1), mine[0])
        ratios[f"serve:{name}_overhead_p50_c1"] = round(c1.p50_ms / inproc.p50_ms, 2)
        if c1.cpu_ms:
            serve_cpu = c1.cpu_ms["total"] - c1.cpu_ms.get("client", 0.0)
            ratios[f"serve:{name}_cpu_over_inprocess_cpu_c1"] = round(serve_cpu / inproc.cpu_ms["total"], 2)
        at = next((r for r in mine if r.concurrency == TARGET_CONCURRENCY), None)
        if at is not None and name == FLOOR:
            target["floor_p99_ms"] = at.p99_ms
        elif at is not None:
            target[f"serve:{name}"] = {"p99_ms": at.p99_ms, "met": bool(at.p99_ms < TARGET_P99_MS)}
    if {"graph", "fused"} <= set(targets):
        for c in concurrency:
            g = next(r for r in results if r.path == "serve:graph" and r.concurrency == c)
            f = next(r for r in results if r.path == "serve:fused" and r.concurrency == c)
            if g.cpu_ms and f.cpu_ms:
                ratios[f"graph_over_fused_cpu_c{c}"] = round(g.cpu_ms["total"] / f.cpu_ms["total"], 2)
            ratios[f"graph_over_fused_p99_c{c}"] = round(g.p99_ms / f.p99_ms, 2)
    return {
        "model_version": rec.version_id,
        "model_dir": str(model_dir),
        "n_items": int(rec.spec.n_items),
        "encoder": rec.ranker.cfg.encoder if hasattr(rec.ranker, "cfg") else None,
        "tiny_encoder": bool(getattr(getattr(rec.ranker, "cfg", None), "tiny_encoder", False)),
        "k": k,
        "requests": requests,
        "repeats": repeats,
        "results": [asdict(r) | {"success_rate": round(r.success_rate, 4)} for r in results],
        "runs": [asdict(r) for r in runs],
        "ratios": ratios,
        "target": target,
        "top_k_agreement": {name: f"{v}/{len(checked)}" for name, v in agree.items()},
        "load_average": {"before": load_before, "after": os.getloadavg() if load_before is not None else None},
        "cpu_count": os.cpu_count(),
    }


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
    ratios = report["ratios"]
    lines += ["", f"Medians of {report.get('repeats', 1)} run(s) per row; CPU ms/request: Serve processes + the "
              "load client (total), or this process (in-process paths)."]
    for name in [r["path"].split(":", 1)[1] for r in report["results"] if r["path"].startswith("serve:")]:
        if f"serve:{name}_overhead_p50_c1" not in ratios:
            continue
        ratios_line = (f"- {name}: cost of Serve (p50 over HTTP at concurrency 1 / in-process p50): "
                       f"**{ratios[f'serve:{name}_overhead_p50_c1']}x**")
        if f"serve:{name}_cpu_over_inprocess_cpu_c1" in ratios:
            ratios_line += f"; in CPU (Serve processes / in-process): **{ratios[f'serve:{name}_cpu_over_inprocess_cpu_c1']}x**"
        got = report.get("target", {}).get(f"serve:{name}")
        if got:
            ratios_line += (f"; p99 at concurrency {report['target']['concurrency']}: {got['p99_ms']} ms "
                            f"(target < {report['target']['p99_ms_below']:.0f} ms: {'met' if got['met'] else 'not met'})")
        if ratios_line not in lines:
            lines.append(ratios_line)
    if "floor_p99_ms" in report.get("target", {}):
        lines.append(f"- Serve's floor (`serve:floor`: the same HTTP path to one FastAPI deployment answering a constant "
                     f"list, no model): p99 at concurrency {report['target']['concurrency']}: "
                     f"{report['target']['floor_p99_ms']} ms")
    graph_fused = [f"c{k.rsplit('_c', 1)[1]} {v}x" for k, v in ratios.items() if k.startswith("graph_over_fused_cpu")]
    if graph_fused:
        lines.append("- CPU per request, graph / fused: " + ", ".join(graph_fused))
    lines += [f"- gain from cached item embeddings (encoder-per-request / cached, mean latency): "
              f"**{ratios['encoder_per_request_over_cached_mean']}x** (CPU: {ratios['encoder_per_request_over_cached_cpu']}x)",
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
    ap.add_argument("--address", help="Ray address of a running cluster (default: start Ray in-process)")
    ap.add_argument("--out", default="bench_results/serving", help="folder for serving_benchmark.json/.md")
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--encoder-requests", type=int, default=200, help="requests for the encoder-per-request path")
    ap.add_argument("--port", type=int, default=28080, help="Serve's HTTP port on 127.0.0.1")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--topologies", default="graph,fused", help="Serve topologies to measure side by side")
    ap.add_argument("--repeats", type=int, default=3, help="runs per (topology, concurrency); medians reported")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip Serve's floor (a constant-answer app on the same proxy, measured alongside)")
    ap.add_argument("--replicas", type=int, default=2,
                    help="replicas of what holds the ranker (graph: RankerDeployment, fused: Ingress); each computes "
                         "on one thread, so 2 uses both cores of a 2-core machine")
    return ap


def main(argv: list[str] | None = None) -> int:
    import sys

    from ray import serve

    from adrec import flow
    from adrec.run import RunDir
    from adrec.runtime import init_ray
    from adrec.serving.app import AppArgs
    from adrec.serving.deploy import deploy

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run = RunDir(args.run)
    run.require(run.model, "train")
    overrides = list(args.overrides) + ([f"ray.address={args.address}"] if args.address else [])
    cfg = flow.resolve_config(run, args.config, overrides)
    init_ray(cfg.ray)
    # One app per topology, side by side on one proxy (route /<topology>). Feedback goes to a scratch
    # log: the benchmark sends none, and must not touch the run's.
    topologies = [t.strip() for t in args.topologies.split(",") if t.strip()]
    apps = {t: AppArgs.from_config(cfg, run.path, host="127.0.0.1", port=args.port, app_name=f"adrec-bench-{t}",
                                   route_prefix=f"/{t}", topology=t, ranker_replicas=args.replicas,
                                   feedback_log=str(Path(args.out).resolve() / "feedback.jsonl"))
            for t in topologies}
    try:
        targets = {t: (deploy(a), a.app_name) for t, a in apps.items()}
        app = next(iter(apps.values()))
        if args.floor:
            # No CPU claim: the topologies' replicas hold all of the cluster's CPUs (a claim only schedules).
            from adrec.serving.floor import floor_app

            serve.run(floor_app(args.replicas, 0, app.max_ongoing_requests),
                      name="adrec-bench-floor", route_prefix=f"/{FLOOR}")
            targets[FLOOR] = (f"http://127.0.0.1:{args.port}/{FLOOR}", "adrec-bench-floor")
        key = app.resolved().key_bytes()
        api_key = app.api_key.get_secret_value() if app.api_key else None
        report = run_benchmark(targets, run.model, key, raw_user_ids(run), requests=args.requests,
                               concurrency=tuple(int(c) for c in args.concurrency.split(",")),
                               encoder_requests=args.encoder_requests, k=args.k, api_key=api_key,
                               repeats=args.repeats)
        report["settings"] = {"max_ongoing_requests": app.max_ongoing_requests, "max_batch_size": app.max_batch_size,
                              "replicas": args.replicas, "n_candidates": app.n_candidates,
                              "num_cpus_per_replica": app.num_cpus_per_replica, "topologies": topologies}
        report["command"] = "python pipelines/benchmark_serving.py " + " ".join(argv if argv is not None else sys.argv[1:])
        js, md = write_report(report, args.out)
        print(markdown(report))
        print(f"written: {js} {md}")
    finally:
        serve.shutdown()
    return 0
