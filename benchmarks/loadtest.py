"""Closed-loop HTTP load and its accounting: latency percentiles, CPU time per process, request bodies.

Shared by the serving benchmark (:mod:`benchmarks.serving`) and the online-learning benchmark
(:mod:`benchmarks.online`). A closed loop: each of ``c`` clients sends its next request when the previous
one is answered, for a fixed number of requests; CPU time is read from ``/proc`` for the Serve processes
(replicas per deployment, the HTTP ingress) of the raylet this driver started, and for this process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass, field
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
    deployment) and the HTTP ingress (``proxy``: Serve's proxy actor; ``haproxy``: the HAProxy process
    and the actor that manages it). Linux only (``/proc``); empty elsewhere.

    ``raylet_pid``: count only that raylet's processes (its workers, and HAProxy below its manager).
    Other Ray clusters on the machine (tests, other benchmarks) run proxies too; one of them ending
    between two readings made a sum over every ``ProxyActor`` go negative.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, list[str]] = {}
    cmds: dict[int, str] = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stats[int(d.name)] = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmds[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue

    def below_raylet(pid: int, depth: int = 3) -> bool:
        parent = int(stats[pid][1])
        if raylet_pid is None or parent == raylet_pid:
            return True
        return depth > 1 and parent in stats and below_raylet(parent, depth - 1)

    out: dict[str, float] = {}
    for pid, cmd in cmds.items():
        if "ray::ServeReplica:" in cmd and f":{app_name}:" in cmd:
            name = cmd.split(f":{app_name}:", 1)[1].split(".", 1)[0].split()[0]
        elif "ray::ProxyActor" in cmd:
            name = "proxy"
        elif "ray::HAProxyManager" in cmd or cmd.split(" ", 1)[0].endswith("/haproxy"):
            name = "haproxy"
        else:
            continue
        try:
            if not below_raylet(pid):
                continue
            fields = stats[pid]
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        except (IndexError, ValueError, KeyError):
            continue
    return out


def cpu_ms_per_request(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    per = {k: round((after.get(k, 0.0) - before.get(k, 0.0)) * 1000 / max(n, 1), 2) for k in after}
    per["total"] = round(sum(per.values()), 2)
    return per


# ---- HTTP load ---------------------------------------------------------------------------------------
async def _closed_loop(url: str, bodies: list[dict], concurrency: int, n_requests: int, headers: dict[str, str],
                       timeout_s: float, starts: list[float] | None) -> tuple[list[float], dict[str, int], float]:
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    counter = iter(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, headers=headers) as client:
        async def worker() -> None:
            for i in counter:
                body = bodies[i % len(bodies)]
                t, wall = time.perf_counter(), time.time()
                try:
                    r = await client.post(url, json=body)
                    code = str(r.status_code)
                except httpx.HTTPError as err:
                    code = type(err).__name__
                latencies.append(time.perf_counter() - t)
                if starts is not None:
                    starts.append(wall)
                statuses[code] = statuses.get(code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    return latencies, statuses, seconds


def closed_loop(url: str, bodies: list[dict], concurrency: int, n_requests: int, headers: dict[str, str] | None = None,
                timeout_s: float = 30.0, starts: list[float] | None = None) -> tuple[list[float], dict[str, int], float]:
    """``n_requests`` POSTs of ``bodies`` (cycled) to ``url`` from ``concurrency`` closed-loop clients:
    (every latency in seconds, count per HTTP status or client error, seconds from the first request to the
    last answer). ``starts``, when given, receives each request's wall-clock start (unix seconds), in the
    order of the latencies: to line the tail up with what other processes did meanwhile."""
    return asyncio.run(_closed_loop(url, bodies, concurrency, n_requests, headers or {}, timeout_s, starts))


def http_load(url: str, bodies: list[dict], concurrency: int, n_requests: int, headers: dict[str, str] | None = None,
              timeout_s: float = 30.0) -> LoadResult:
    """:func:`closed_loop`, summarized."""
    latencies, statuses, seconds = closed_loop(url, bodies, concurrency, n_requests, headers, timeout_s)
    return summarize("serve", concurrency, latencies, statuses.get("200", 0), seconds, statuses)


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


# ---- repeated runs on several targets ------------------------------------------------------------------
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
    """Closed-loop HTTP load on each target ({name: (base_url, Serve app name)}).

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
