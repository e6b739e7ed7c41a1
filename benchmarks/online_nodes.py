"""Serving while the model learns, with the learner on a Ray node of its own (``benchmark_online.py --two-node``).

The same question as :mod:`benchmarks.online` (``POST /recommend`` p99 at concurrency 8 while the online
learner learns vs while it is paused, target at most 1.2x), on the cluster layout of the two-node acceptance
test (tests/integration/test_two_nodes.py), with its harness (tests/support: moto's S3 server, Ray nodes in
private mount and PID namespaces, the README's ``ray job submit``):

1. The drift data and the initial model of :mod:`benchmarks.online`, built in this process on a local Ray
   (shut down afterwards), the run uploaded to the S3 server on 127.0.0.1: the only storage the nodes share.
2. A head node, the Serve app on it (``adrec serve --run s3://... --detach`` as a job; the proxy and every
   replica on the head: the worker node joins only after the app is up), then the worker node.
3. The feedback stream goes to ``POST /feedback`` (segments on the store) at a fixed rate during every
   phase, with closed-loop ``POST /recommend`` load, in alternating phases: learner paused (no learner
   running) and learning (``adrec online --run s3://... --rollout`` as a job whose driver is placed on the
   worker node: it reads the segments from the store, learns, publishes versions there and rolls them out;
   the head's replicas copy each new version from the store). A learning phase's load starts once the
   learner logged that it is learning; the job is stopped (SIGTERM: it checkpoints) when the load ends.
4. The p99 of each kind of phase, pooled over its rounds, and their ratio; where the replicas and the
   learner ran (Ray's state API); the load average before and after.

Both "nodes" share this machine's CPUs: the figure shows the serving cost of a learner on another Ray node
(feedback read from the store, versions published there and rolled out to replicas that copy them), with
the learner's CPU still competing for the same cores (at the learner's lowered priority); it does not show
the isolation of a learner on separate hardware.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from .loadtest import raw_user_ids, request_bodies
from .online import (
    BENCH_ONLINE,
    CONTEXT,
    Poster,
    Settings,
    drift_config,
    latency_stats,
    make_drift_data,
    recommend_load,
    train_initial,
)

log = logging.getLogger(__name__)

BUCKET = "adrec-bench-nodes"
RUN = f"s3://{BUCKET}/runs/online"
TARGET_RATIO = 1.2


def _learning_started(head, jid: str, timeout_s: float = 300) -> float:
    """Seconds until the learner job ``jid`` logged that it learns (the line adrec.online.foreground writes)."""
    from tests.support.nodes import job_command

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        r = job_command(head, "logs", jid)
        if "learning from" in r.stdout:
            return time.monotonic() - t0
        if any(s in r.stdout for s in ("Traceback", "error:")):
            raise RuntimeError(f"the learner job {jid} failed:\n{r.stdout[-4000:]}")
        time.sleep(1.0)
    raise TimeoutError(f"the learner job {jid} did not start learning within {timeout_s:.0f}s")


def _learner_status() -> dict:
    """The learner's status file on the store (counts of records read and impressions learned), {} before any."""
    from adrec import storage
    from adrec.online.publish import STATUS_CURRENT

    f = storage.resolve(f"{RUN}/online") / STATUS_CURRENT
    try:
        return f.read_json() if f.is_file() else {}
    except Exception as err:  # a status being rewritten: the next phase reads it again
        log.warning("could not read the learner status (%s)", err)
        return {}


def _placement(head) -> dict:
    """Which node ran the Serve replicas and the learner jobs' drivers (Ray's state API, on the head)."""
    from ray.util.state import list_actors, list_jobs, list_nodes

    names = {}
    for n in list_nodes(address=head.dashboard):
        res = n.resources_total or {}
        names[n.node_id] = "head" if "head_node" in res else "worker" if "worker_node" in res else n.node_id
    replicas = {}
    for a in list_actors(address=head.dashboard, filters=[("state", "=", "ALIVE")], limit=1000):
        if a.class_name and a.class_name.startswith("ServeReplica:"):
            replicas.setdefault(a.class_name.split(":")[-1], []).append(names.get(a.node_id, a.node_id))
    learners = [names.get(j.driver_node_id, j.driver_node_id) for j in list_jobs(address=head.dashboard, detail=True)
                if "pipelines/online.py" in (j.entrypoint or "")]
    return {"replicas": replicas, "learner_jobs": learners}


def run_benchmark(cfg, work: Path, s: Settings, log_dir: Path) -> dict:
    import ray
    from adrec.online.stream import feedback_events
    from adrec.run import RunDir
    from adrec.runtime import free_port, init_ray

    from tests.support.nodes import Node, job_command, job_id, submit_job
    from tests.support.s3 import S3Server

    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    s3 = S3Server(bucket=BUCKET).start(log_dir)
    os.environ.update(s3.env)
    key = os.environ.setdefault("ADREC_PSEUDONYM_KEY", "bench-online-nodes")  # from the environment, as on a cluster
    nodes: list = []
    timings: dict = {}
    try:
        # 1. data and the initial model here, then the run on the store. The app's settings go into the run's
        # config, so the serve job and the learner's rollouts (a job of its own) build the same app.
        port = s.port or free_port()
        data = make_drift_data(cfg.data.synthetic, work, s)
        cfg = drift_config(cfg, data)
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={
            "port": port, "proxy_location": "HeadOnly", "feedback_max_behind_s": None})})  # (2023's timestamps)
        local = RunDir(work / "run")
        init_ray(cfg.ray)
        train_initial(cfg, local, local=s.train_local)
        ray.shutdown()
        RunDir(RUN).location.upload(local.path)
        users = raw_user_ids(local)
        timings["build_s"] = round(time.perf_counter() - t_start, 1)

        # 2. the head, the app on it, then the worker node
        t = time.perf_counter()
        # RAY_JOB_STOP_WAIT_TIME_S: how long `ray job stop` waits after SIGTERM before SIGKILL (3 s by default,
        # less than the learner's checkpoint to the store took under load: its status then never reached it).
        env = {**s3.env, "ADREC_PSEUDONYM_KEY": key, "PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": "60"}
        head = Node("head", env, num_cpus=2, resources={"head_node": 1}).start(log_dir)
        nodes.append(head)
        submit_job(head, "serve", "--run", RUN, "--detach", log_dir=log_dir)
        url = f"http://127.0.0.1:{port}"
        worker = Node("worker", env, head_address=head.address, num_cpus=2, resources={"worker_node": 1}).start(log_dir)
        nodes.append(worker)
        timings["cluster_s"] = round(time.perf_counter() - t, 1)

        # 3. alternating phases, paused first
        events = feedback_events(data.stream, context=CONTEXT, seed=s.seed)
        bodies = request_bodies(users, 2000, k=10, seed=s.seed, context={"slot": "1", "hour": "12", "device": "mobile"})
        warm_lat, _, warm_s = recommend_load(url, bodies, s.concurrency, 200)
        phase_s = s.requests_per_phase / max(len(warm_lat) / warm_s, 1e-6)
        rate = min(s.max_feedback_rate, len(events) / (s.phases * phase_s))
        poster = Poster(url, events, s.feedback_batch)
        poster.rate = rate
        poster.start()
        load_before = os.getloadavg()[0]
        phases, pooled, placement = [], {"frozen": ([], {}), "learning": ([], {})}, {}
        for k in range(s.phases):
            mode = "frozen" if k % 2 == 0 else "learning"
            jid, start_s = None, None
            if mode == "learning":
                # A checkpoint (with the status file on the store) every 1,000 records: the phase's counts.
                out = submit_job(head, "online", "--run", RUN, "--rollout", "--set", "online.checkpoint_every_events=1000",
                                 resources={"worker_node": 1}, wait=False, log_dir=log_dir)
                jid = job_id(out)
                start_s = _learning_started(head, jid)
            before = _learner_status().get("counts", {})
            sent0 = poster.sent
            poster.active.set()
            lat, st, secs = recommend_load(url, bodies, s.concurrency, s.requests_per_phase)
            poster.active.clear()
            if jid is not None:
                try:
                    placement = _placement(head)  # while the learner job runs
                except Exception as err:  # the figure stands without it; the report says so
                    placement = {"error": repr(err)}
                job_command(head, "stop", jid, timeout_s=180)
            after = _learner_status().get("counts", {})
            phases.append({"phase": k, "mode": mode, **latency_stats(lat, st, secs),
                           "feedback_events_posted": poster.sent - sent0, "learner_start_s": start_s,
                           "learner_records_read": after.get("records", 0) - before.get("records", 0),
                           "learner_examples": after.get("examples_learned", 0) - before.get("examples_learned", 0)})
            pooled[mode][0].extend(lat)
            for code, c in st.items():
                pooled[mode][1][code] = pooled[mode][1].get(code, 0) + c
            log.info("phase %d (%s): %s", k, mode, phases[-1])
        poster.active.clear()
        status = _learner_status()
        frozen, learning = latency_stats(*pooled["frozen"]), latency_stats(*pooled["learning"])
        ratio = round(learning["p99_ms"] / frozen["p99_ms"], 3)
        report = {
            "settings": {**{k: getattr(s, k) for k in ("concurrency", "requests_per_phase", "phases", "feedback_batch",
                                                       "impressions", "train_impressions", "seed")},
                         "feedback_rate_events_per_s": round(rate, 1), "online": BENCH_ONLINE},
            "latency": {"frozen": frozen, "learning": learning, "phases": phases},
            "summary": {"p99_frozen_ms": frozen["p99_ms"], "p99_learning_ms": learning["p99_ms"], "p99_ratio": ratio,
                        "target_p99_met": bool(ratio <= TARGET_RATIO),
                        "failed_requests": sum(v for m in (frozen, learning) for c, v in m["statuses"].items()
                                               if c != "200")},
            "learner": {"counts": status.get("counts"), "published": len(status.get("published") or []),
                        "serving_version": status.get("serving_version")},
            "feedback": {"posted": poster.sent, "accepted": poster.accepted, "errors": poster.errors[:3]},
            "placement": placement, "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
            "timings": timings | {"total_s": round(time.perf_counter() - t_start, 1)},
            "command": "python pipelines/benchmark_online.py " + " ".join(sys.argv[1:]),
        }
    finally:
        for n in reversed(nodes):
            n.kill()
        s3.stop()
    return report


def markdown(report: dict) -> str:
    s, lat, st = report["summary"], report["latency"], report["settings"]
    lines = ["# Serving while the model learns, the learner on its own Ray node (two nodes, one 2-core machine)", "",
             f"`POST /recommend` at concurrency {st['concurrency']}, {st['requests_per_phase']} requests per phase, "
             f"{st['phases']} phases alternating (paused first); the feedback stream at "
             f"{st['feedback_rate_events_per_s']} events/s to `POST /feedback` in every phase. Serve (proxy and "
             "replicas) on the head node; the learner a Ray job on the worker node; the run, the feedback "
             "segments and the versions on moto's S3 server. Load average before/after: "
             f"{report['load_before']} / {report['load_after']}.", "",
             "| learner | requests | ok | p50 ms | p95 ms | p99 ms |", "|---|---:|---:|---:|---:|---:|"]
    for mode, name in (("frozen", "paused"), ("learning", "learning (worker node)")):
        x = lat[mode]
        lines.append(f"| {name} | {x['requests']} | {x['ok']} | {x['p50_ms']} | {x['p95_ms']} | {x['p99_ms']} |")
    lines += ["", "| phase | learner | p50 ms | p99 ms | feedback events | log records read | impressions learned |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for p in lat["phases"]:
        lines.append(f"| {p['phase']} | {'learning' if p['mode'] == 'learning' else 'paused'} | {p['p50_ms']} | "
                     f"{p['p99_ms']} | {p['feedback_events_posted']} | {p['learner_records_read']} | "
                     f"{p['learner_examples']} |")
    lr = report["learner"]
    lines += ["",
              f"- p99 while learning / while paused: **{s['p99_ratio']:.3f}** (target <= {TARGET_RATIO}: "
              f"{'met' if s['target_p99_met'] else 'NOT met'}); failed requests: {s['failed_requests']}",
              f"- where it ran: {json.dumps(report['placement'])}",
              f"- learner at the end: {lr['counts']}; {lr['published']} versions published (kept in its status), "
              f"serving {lr['serving_version']}",
              "- both nodes share this machine's 2 cores: the learner's CPU still competes with serving (at its "
              "lowered priority); what the other node adds is the store between them (feedback segments read, "
              "versions published and copied back by the head's replicas). It does not show a learner on hardware "
              "of its own.",
              f"- wall time: {report['timings']}", "", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "online_nodes_benchmark.json").write_text(json.dumps(report, indent=2, default=str))
    md = out / "online_nodes_benchmark.md"
    md.write_text(markdown(report))
    return md


def main(cfg, out: Path, work: Path, s: Settings) -> int:
    report = run_benchmark(cfg, work, s, out / "logs")
    md = write_report(report, out)
    print(md.read_text())
    return 0 if report["summary"]["target_p99_met"] else 1
