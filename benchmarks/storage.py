"""Storage benchmark: the same served run on the local disk and on an S3 store, side by side in one run.

For each of ``local`` (the run folder on this machine's disk, the feedback log a local file) and ``store``
(the same run copied to an S3-compatible server: moto's, started on 127.0.0.1 by this script; the feedback
log a segment log there, group-committed), in turns, ``--repeats`` times:

- deploy the app on the run's live version (for ``store`` from an empty node cache: the replicas copy the
  version from the store and verify it) and time it until it answers;
- ``POST /recommend`` at concurrency ``--concurrency`` once the version is cached (p50/p99);
- ``POST /feedback`` at the same concurrency, batches of ``--events`` events (p50/p99; acknowledged =
  durable: fsync-ed on the disk, on the store for segments);
- a new version reaching every replica: a version published beside the live one (not live), rolled out,
  timed until every replica serves it (for ``store``: each replica copies it from the store).

Medians over the repeats, the ratio store / local, and the issue's targets on this 2-core machine
(``/recommend`` p99 < 100 ms and ``/feedback`` p99 < 150 ms with the run on the store). Writes
``storage_benchmark.json`` and ``.md`` under ``--out``; exit status 1 when a target is missed.

    python pipelines/benchmark_storage.py --out bench_results/storage --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks.loadtest import (cpu_ms_per_request, http_load, local_raylet_pid, raw_user_ids, request_bodies,
                                serve_cpu_seconds)

log = logging.getLogger(__name__)

BUCKET = "adrec-bench-storage"
TARGETS = {"recommend_p99_ms": 100.0, "feedback_p99_ms": 150.0}
TINY = ["data.dataset=synthetic", "data.synthetic.n_users=1000", "data.synthetic.n_ads=300",
        "data.synthetic.n_impressions=30000", "ranker.tiny_encoder=true", "ranker.epochs=1", "ray.num_cpus=2"]


def feedback_bodies(users: list[str], items: list[str], n: int, events: int, prefix: str) -> list[dict]:
    rng = np.random.default_rng(0)
    now = time.time()
    return [{"events": [{"event_id": f"{prefix}-{i}-{j}", "user_id": str(users[rng.integers(len(users))]),
                         "item": str(items[rng.integers(len(items))]), "type": "impression", "ts": now}
                        for j in range(events)]} for i in range(n)]


def with_store_cpu(cpu: dict[str, float], s3) -> dict[str, float]:
    """``cpu`` plus the S3 server's CPU seconds (``s3``): moto is a Python server on the same 2 cores, so
    every store request it answers takes CPU the replicas would otherwise have (a real store's is elsewhere)."""
    if s3 is None or s3.proc is None:
        return cpu
    try:
        fields = Path(f"/proc/{s3.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return {**cpu, "s3 server": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}
    except (OSError, IndexError, ValueError):
        return cpu


def measure_one(name: str, cfg, run, port: int, users: list[str], items: list[str], s, s3=None) -> dict:
    from ray import serve

    from adrec import storage
    from adrec.model_version import publish
    from adrec.serving.args import AppArgs
    from adrec.serving.deploy import deploy, rollout

    if run.remote:  # a node that has never seen the version: the replicas copy it from the store
        shutil.rmtree(storage.cache_root() / "versions", ignore_errors=True)
    args = AppArgs.from_config(cfg, run, host="127.0.0.1", port=port, app_name=f"adrec-storage-{name}",
                               route_prefix=f"/{name}", ranker_replicas=s.replicas, allow_unauthenticated=False)
    t0 = time.perf_counter()
    url = deploy(args)
    deploy_s = time.perf_counter() - t0
    bodies = request_bodies(users, s.requests, k=10)
    http_load(url + "/recommend", bodies, s.concurrency, min(50, s.requests))  # warm-up
    store0 = s3.requests_served() if s3 is not None else None
    raylet = local_raylet_pid()
    cpu0 = serve_cpu_seconds(args.app_name, raylet)
    rec = http_load(url + "/recommend", bodies, s.concurrency, s.requests)
    # CPU per request of each Serve process (the load client aside): where a latency at a concurrency that
    # keeps both cores busy comes from, and a figure that moves far less with other load than latency does.
    rec_cpu = cpu_ms_per_request(cpu0, serve_cpu_seconds(args.app_name, raylet), s.requests)
    # Requests the S3 server logged meanwhile: serving a cached version must not touch the store per request.
    store_requests = None if store0 is None else s3.requests_served() - store0
    fb_bodies = feedback_bodies(users, items, s.requests, s.events, f"{name}-{uuid.uuid4().hex[:8]}")
    cpu0 = with_store_cpu(serve_cpu_seconds(args.app_name, raylet), s3 if run.remote else None)
    fb = http_load(url + "/feedback", fb_bodies, s.concurrency, s.requests)
    fb_cpu = cpu_ms_per_request(cpu0, with_store_cpu(serve_cpu_seconds(args.app_name, raylet),
                                                      s3 if run.remote else None), s.requests)
    entry = publish(run, make_live=False)
    t0 = time.perf_counter()
    rollout(args, entry.uri)
    rollout_s = time.perf_counter() - t0
    serve.delete(args.app_name)
    return {"target": name, "deploy_s": round(deploy_s, 2), "rollout_s": round(rollout_s, 2),
            "recommend": rec.__dict__, "store_requests_during_recommend": store_requests, "feedback": fb.__dict__,
            "recommend_cpu_ms": rec_cpu, "feedback_cpu_ms": fb_cpu, "feedback_log": args.resolved().feedback_log,
            "model_dir": args.resolved().model_dir}


def summarize(rounds: list[dict]) -> dict:
    out: dict = {}
    for name in ("local", "store"):
        rs = [r for r in rounds if r["target"] == name]
        med = lambda xs: round(float(np.median(xs)), 2)  # noqa: E731
        out[name] = {"deploy_s": med([r["deploy_s"] for r in rs]), "rollout_s": med([r["rollout_s"] for r in rs]),
                     "recommend_p50_ms": med([r["recommend"]["p50_ms"] for r in rs]),
                     "recommend_p99_ms": med([r["recommend"]["p99_ms"] for r in rs]),
                     "store_requests_during_recommend": sum(r.get("store_requests_during_recommend") or 0 for r in rs),
                     "feedback_p50_ms": med([r["feedback"]["p50_ms"] for r in rs]),
                     "feedback_p99_ms": med([r["feedback"]["p99_ms"] for r in rs]),
                     "recommend_cpu_ms": med([r["recommend_cpu_ms"]["total"] for r in rs]),
                     "feedback_cpu_ms": med([r["feedback_cpu_ms"]["total"] for r in rs]),
                     "failed": sum(r["recommend"]["requests"] - r["recommend"]["ok"]
                                   + r["feedback"]["requests"] - r["feedback"]["ok"] for r in rs)}
    out["ratio_store_over_local"] = {k: round(out["store"][k] / out["local"][k], 2) if out["local"][k] else None
                                     for k in out["local"] if k not in ("failed", "store_requests_during_recommend")}
    out["targets"] = {k: {"target": v, "store": out["store"][k], "met": out["store"][k] < v}
                      for k, v in TARGETS.items()}
    return out


def markdown(report: dict) -> str:
    from adrec.evaluation.report import markdown_table

    s = report["summary"]
    cols = ["deploy_s", "rollout_s", "recommend_p50_ms", "recommend_p99_ms", "recommend_cpu_ms", "feedback_p50_ms",
            "feedback_p99_ms", "feedback_cpu_ms"]
    heads = ["deploy s (cold cache)", "new version on every replica s", "/recommend p50 ms", "/recommend p99 ms",
             "/recommend CPU ms (Serve)", "/feedback p50 ms", "/feedback p99 ms",
             "/feedback CPU ms (Serve + S3 server)"]
    rows = [{"run on": name, **{h: s[name][c] for h, c in zip(heads, cols)}, "failed": s[name]["failed"],
             "S3 requests during /recommend": s[name].get("store_requests_during_recommend", "")}
            for name in ("local", "store")]
    rows.append({"run on": "store / local", **{h: s["ratio_store_over_local"][c] for h, c in zip(heads, cols)},
                 "failed": "", "S3 requests during /recommend": ""})
    st = report["settings"]
    lines = ["# Storage: the run on the local disk vs on an S3 store (moto on 127.0.0.1)", "",
             f"Medians of {st['repeats']} rounds (local and store in turns); concurrency {st['concurrency']}, "
             f"{st['requests']} requests per measurement, {st['events']} events per /feedback request, "
             f"{st['replicas']} replicas. Load average before/after: {report['load_before']} / {report['load_after']}.",
             "", markdown_table(rows), ""]
    for k, t in s["targets"].items():
        lines.append(f"- {k} with the run on the store: {t['store']} (target < {t['target']}: "
                     f"{'met' if t['met'] else 'missed'})")
    last = {r["target"]: r for r in report["rounds"]}  # the last round of each: where the CPU went
    lines += ["", "CPU ms per request by process (last round; the load client aside): " + "; ".join(
        f"{name} /recommend {last[name]['recommend_cpu_ms']}, /feedback {last[name]['feedback_cpu_ms']}"
        for name in ("local", "store") if name in last)]
    lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def run_benchmark(out: Path, s) -> dict:
    import pandas as pd

    from adrec import flow, storage
    from adrec.config import build_config
    from adrec.run import RunDir
    from adrec.runtime import free_port, init_ray
    from tests.support.s3 import S3Server  # moto's server, as in the tests (the test extra)

    out.mkdir(parents=True, exist_ok=True)
    s3 = S3Server(bucket=BUCKET).start(out)
    os.environ.update(s3.env)
    os.environ.setdefault(storage.CACHE_ENV, str(out / "cache"))
    os.environ.setdefault("ADREC_PSEUDONYM_KEY", "bench-storage")  # the key from the environment, as on a cluster
    try:
        cfg = build_config(overrides=TINY)
        local = RunDir(out / "run")
        if not (local.path / "versions" / "LIVE.json").is_file():
            flow.prepare(cfg, local)
            flow.candidates(cfg, local, show_progress=False)
            flow.train(cfg, local)
        remote = RunDir(f"s3://{BUCKET}/runs/bench")
        t0 = time.perf_counter()
        remote.location.upload(local.path)  # the whole run, versions with their manifests included
        upload_s = time.perf_counter() - t0
        remote.pull("features", "candidates", "topk", "ranker")
        users = raw_user_ids(local)
        items = pd.read_parquet(local.features / "items.parquet", columns=["item"])["item"].astype(str).tolist()
        init_ray(cfg.ray)
        port = free_port()
        load_before = os.getloadavg()[0]
        rounds = []
        for rep in range(s.repeats):
            for name, run in (("local", local), ("store", remote)):
                log.info("round %d/%d: %s", rep + 1, s.repeats, name)
                rounds.append(measure_one(name, cfg, run, port, users, items, s, s3))
        report = {"rounds": rounds, "summary": summarize(rounds), "upload_s": round(upload_s, 2),
                  "settings": vars(s), "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
                  "command": "python pipelines/benchmark_storage.py " + " ".join(sys.argv[1:])}
    finally:
        from ray import serve

        try:
            serve.shutdown()
        except Exception:  # nothing to shut down
            pass
        s3.stop()
    (out / "storage_benchmark.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "storage_benchmark.md").write_text(markdown(report))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_results/storage")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--events", type=int, default=10, help="events per /feedback request")
    p.add_argument("--replicas", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = run_benchmark(Path(args.out), args)
    print(markdown(report))
    return 0 if all(t["met"] for t in report["summary"]["targets"].values()) else 1
