"""Feedback-log benchmark: durable append latency, local file log vs group-committed segments on S3.

What ``POST /feedback``'s writer replica does per request (:meth:`adrec.feedback.LogWriter.append_async`
on the replica's event loop: it returns once the events are durable), at a closed-loop concurrency
(each of ``c`` clients sends its next batch when the previous one is acknowledged), for:

- ``local``: the file log (:mod:`adrec.feedback.filelog`) on this machine's disk (write + fsync per
  request, one writer);
- ``store``: the segment log (:mod:`adrec.feedback.segments`) on an S3-compatible server: moto's, started
  on 127.0.0.1 by this script (or the store of ``AWS_ENDPOINT_URL`` with ``--bucket``); concurrent
  requests are grouped into one segment (one whole-object write) per group.

HTTP, validation and pseudonymization are not in these figures (the same for both). Reports p50 / p99 /
mean latency, events per second and, for the store, segments written per request (grouping). The
machine's load average is recorded beside them. Writes ``feedback_store_benchmark.json`` and ``.md``
under ``--out``. Exit status 1 when the store's p99 misses ``--target-p99-ms`` (the issue's 150 ms).

    python -m benchmarks.feedback_store --out runs/bench_feedback --concurrency 8 --requests 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from adrec.evaluation.report import markdown_table
from adrec.feedback import open_log

log = logging.getLogger(__name__)

TARGET_P99_MS = 150.0


def _events(client: int, request: int, n: int) -> list[dict]:
    now = time.time()
    return [{"event_id": f"c{client}-r{request}-{k}-{uuid.uuid4().hex[:6]}", "user": f"u_{client:04d}",
             "item": f"i{k}", "type": "impression", "ts": now, "context": {"slot": k % 4, "device": "mobile"},
             "received_at": now, "version": "bench"} for k in range(n)]


def measure(uri: str, concurrency: int, requests: int, batch: int, warmup: int = 2, **log_options) -> dict:
    """``concurrency`` clients on one event loop, as in the writer replica (each awaits
    :meth:`~adrec.feedback.LogWriter.append_async` and sends its next batch once acknowledged), ``requests``
    each after ``warmup``; latencies in ms."""
    writer = open_log(uri, **log_options).writer()

    async def client(c: int) -> list[float]:
        mine = []
        for r in range(requests):
            ev = _events(c, r, batch)
            t = time.perf_counter()
            res = await writer.append_async(ev)
            mine.append(1000 * (time.perf_counter() - t))
            assert len(res.accepted) == batch
        return mine

    async def run() -> tuple[list[float], float]:
        for r in range(warmup):
            await asyncio.gather(*(writer.append_async(_events(c, -1 - r, batch)) for c in range(concurrency)))
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client(c) for c in range(concurrency)))
        return [x for m in per_client for x in m], time.perf_counter() - t0

    latencies, wall = asyncio.run(run())
    out = {"concurrency": concurrency, "requests": len(latencies), "events_per_request": batch,
           "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
           "mean_ms": float(np.mean(latencies)), "max_ms": float(np.max(latencies)),
           "events_per_s": len(latencies) * batch / wall}
    if hasattr(writer, "segments_written"):  # (warm-up segments included: counted over the whole run)
        out["segments_per_request"] = writer.segments_written / ((requests + warmup) * concurrency)
    writer.close()
    return out


def run_benchmark(out: Path, concurrency: int = 8, requests: int = 50, batch: int = 10, bucket: str | None = None,
                  group_wait_s: float | None = None) -> dict:
    server = None
    if bucket is None:
        from tests.support.s3 import S3Server  # moto's server, as in the tests (the test extra)

        server = S3Server().start()
        os.environ.update(server.env)
        bucket = server.bucket
    try:
        results = []
        with tempfile.TemporaryDirectory(prefix="adrec-fb-bench-") as tmp:
            local = measure(str(Path(tmp) / "events.jsonl"), concurrency, requests, batch)
            results.append({"log": "local", "where": "file log on this machine's disk", **local})
        opts = {} if group_wait_s is None else {"group_wait_s": group_wait_s}
        store = measure(f"s3://{bucket}/bench-feedback-{uuid.uuid4().hex[:8]}", concurrency, requests, batch, **opts)
        results.append({"log": "store", "where": f"segments on {os.environ.get('AWS_ENDPOINT_URL', 's3')}", **store})
    finally:
        if server is not None:
            server.stop()
    report = {"results": results, "target_p99_ms": TARGET_P99_MS, "load_avg_1_5_15": list(os.getloadavg()),
              "cpus": os.cpu_count(), "command": f"python -m benchmarks.feedback_store --concurrency {concurrency} "
                                                 f"--requests {requests} --batch {batch}"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "feedback_store_benchmark.json").write_text(json.dumps(report, indent=2))
    cols = ["log", "concurrency", "requests", "events_per_request", "p50_ms", "p99_ms", "mean_ms", "max_ms",
            "events_per_s", "segments_per_request"]
    table = markdown_table([{c: r.get(c, "") for c in cols} for r in results], floatfmt=".1f")
    (out / "feedback_store_benchmark.md").write_text(
        f"# Feedback log: durable append latency\n\n{table}\n\n"
        f"Load average (1/5/15 min) during the run: {', '.join(f'{x:.1f}' for x in report['load_avg_1_5_15'])} "
        f"on {report['cpus']} CPUs. Command: `{report['command']}`\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench_feedback")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=50, help="requests per client")
    p.add_argument("--batch", type=int, default=10, help="events per request")
    p.add_argument("--bucket", default=None, help="a bucket on the store of AWS_ENDPOINT_URL (default: start moto)")
    p.add_argument("--group-wait-ms", type=float, default=None)
    p.add_argument("--target-p99-ms", type=float, default=TARGET_P99_MS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_benchmark(Path(args.out), args.concurrency, args.requests, args.batch, args.bucket,
                           None if args.group_wait_ms is None else args.group_wait_ms / 1000)
    print((Path(args.out) / "feedback_store_benchmark.md").read_text())
    store = next(r for r in report["results"] if r["log"] == "store")
    return 0 if store["p99_ms"] <= args.target_p99_ms else 1


if __name__ == "__main__":
    raise SystemExit(main())
