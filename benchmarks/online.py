"""Online-learning benchmark: frozen vs online model through a preference drift, over the real Serve app.

One run, start to finish (``pipelines/benchmark_online.py`` is the command line):

1. Data: the synthetic generator in drift mode (``drift_at``: the age/gender x category and hour x category
   affinities are redrawn at that point of the timeline). The first ``train_impressions`` impressions
   (all before the drift) are the training log; a share of users (``new_user_share``) is held out of it
   entirely, so the stream brings users the model never saw. The next ``impressions`` impressions are
   the stream: ``pre_drift_share`` of them before the drift, the rest after it.
2. The initial model: prepare -> candidates -> train (Ray Train) -> publish, on the pre-drift training
   log only.
3. Serving: the Serve app on 127.0.0.1:``port`` (>= 20000), and the online learner as a Ray actor beside
   it (reading the app's feedback log, publishing every ``online.publish_every_events`` learned
   impressions behind the guard, rolling every published version out to the app).
4. The stream goes through ``POST /feedback`` over HTTP (an impression per row, a click shortly after
   each clicked one) at a fixed rate while closed-loop ``POST /recommend`` load runs, in alternating
   phases: learner paused ("frozen") and learner running ("learning"). The p99 of each kind of phase,
   pooled over its rounds, gives the serving cost of learning.
5. Then the learner catches up, labels the last impressions (end of stream) and reports its progressive
   metrics: every impression was scored by the online model before it learned from it, by the frozen
   initial model and by the version being served, per event-time segment (before / after the drift).

Targets: after the drift, progressive AUC of the online model >= frozen + 0.03; serving p99 while
learning <= 1.2 x p99 while frozen.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .loadtest import closed_loop, raw_user_ids, request_bodies

log = logging.getLogger(__name__)

CONTEXT = ["slot", "hour", "device"]
# What the drift benchmark runs the learner with unless told otherwise (measured on this benchmark's data:
# see the report); every key can be overridden with --set online.<key>=...
BENCH_ONLINE = {"optimizer": "ftrl", "lr": 0.3, "batch_size": 32, "train_layers": ["head", "fusion", "embeddings"],
                "publish_every_events": 4000, "guard_margin": 0.01, "checkpoint_every_events": 5000}


@dataclass
class Settings:
    train_impressions: int = 30000
    impressions: int = 40000  # streamed through /feedback
    pre_drift_share: float = 0.15  # of the stream
    new_user_share: float = 0.05  # users held out of the training log
    port: int | None = None  # None: a free port >= 20000
    concurrency: int = 8
    requests_per_phase: int = 800
    phases: int = 6  # alternating frozen / learning, frozen first
    rolling_phase: bool = True  # then one phase of back-to-back rollouts under the same load
    feedback_batch: int = 50
    max_feedback_rate: float = 1500.0  # events/s while a phase runs
    train_local: bool = False  # train the initial model in-process instead of on Ray Train
    seed: int = 0


@dataclass
class DriftData:
    schema: Path
    stream: pd.DataFrame
    drift_ts: float
    new_users: list[str]
    counts: dict = field(default_factory=dict)


# ---- 1. data ---------------------------------------------------------------------------------------------
def make_drift_data(syn, out: Path, s: Settings) -> DriftData:
    """Generate the drifting log and split it into the training log (pre-drift) and the stream."""
    from adrec.data.synthetic import generate

    total = s.train_impressions + s.impressions
    drift_index = s.train_impressions + int(round(s.pre_drift_share * s.impressions))
    drift_at = drift_index / total
    syn = syn.model_copy(update={"n_impressions": total, "drift_at": drift_at})
    full = out / "generated"
    generate(syn, full)
    imp = pd.read_csv(full / "impressions.csv", dtype=str)
    users = pd.read_csv(full / "users.csv", dtype=str)
    first = int(syn.drift_at * total)  # the generator's own drift index
    drift_ts = float(imp["ts"].iloc[first])
    rng = np.random.default_rng(s.seed)
    new_users = sorted(rng.choice(users["user_id"].to_numpy(), int(round(s.new_user_share * len(users))),
                                  replace=False).tolist())
    held = set(new_users)
    train = imp.iloc[: s.train_impressions]
    if float(train["ts"].astype(float).max()) >= drift_ts:
        raise ValueError("the training log reaches the drift: lower train_impressions or raise pre_drift_share")
    train = train[~train["user_id"].isin(held)]
    stream = imp.iloc[s.train_impressions: total].reset_index(drop=True)
    data_dir = out / "train_log"
    data_dir.mkdir(parents=True, exist_ok=True)
    train.to_csv(data_dir / "impressions.csv", index=False)
    users[~users["user_id"].isin(held)].to_csv(data_dir / "users.csv", index=False)
    for name in ("ads.csv", "schema.yaml"):
        shutil.copy2(full / name, data_dir / name)
    ts = stream["ts"].astype(float)
    counts = {"generated": total, "drift_at": round(drift_at, 6), "train_impressions": len(train),
              "stream_impressions": len(stream), "stream_pre_drift": int((ts < drift_ts).sum()),
              "stream_post_drift": int((ts >= drift_ts).sum()), "stream_clicks": int(stream["clicked"].astype(int).sum()),
              "held_out_users": len(new_users),
              "stream_rows_of_held_out_users": int(stream["user_id"].isin(held).sum())}
    return DriftData(data_dir / "schema.yaml", stream, drift_ts, new_users, counts)


def drift_config(cfg, data: DriftData):
    """``cfg`` on the drift data's training log (its schema path; the synthetic crosses named explicitly,
    as the data set is now a schema path), with the drift as the learner's metrics segment boundary."""
    from adrec.config import CrossSpec
    from adrec.data.sources import DEFAULT_CROSSES

    updates = {"data": cfg.data.model_copy(update={"dataset": str(data.schema)}),
               "online": cfg.online.model_copy(update={"segments_ts": [data.drift_ts]})}
    if cfg.features.crosses is None:
        updates["features"] = cfg.features.model_copy(
            update={"crosses": [CrossSpec(fields=p) for p in DEFAULT_CROSSES["synthetic"]]})
    return cfg.model_copy(update=updates)


# ---- 2. the initial model -----------------------------------------------------------------------------------
def train_initial(cfg, run, local: bool = False) -> dict:
    from adrec import flow

    flow.prepare(cfg, run)
    flow.candidates(cfg, run, show_progress=False)
    if not local:
        return flow.train(cfg, run)
    from adrec.features.pipeline import Features
    from adrec.model_version import publish
    from adrec.ranking.train import fit_local

    ranker, reports = fit_local(cfg.ranker, Features(run))
    ranker.save(run.ranker)
    publish(run)
    return {"local": True, "valid_auc": (ranker.info or {}).get("valid_auc")}


# ---- 4. load ------------------------------------------------------------------------------------------------
def recommend_load(url: str, bodies: list[dict], concurrency: int, n: int,
                   starts: list[float] | None = None) -> tuple[list, dict, float]:
    """Closed-loop ``POST /recommend`` load: (latencies, statuses, wall seconds of the whole call)."""
    t0 = time.perf_counter()
    lat, st, _ = closed_loop(url.rstrip("/") + "/recommend", bodies, concurrency, n, starts=starts)
    return lat, st, time.perf_counter() - t0


def rolling_phase(args, url: str, bodies: list[dict], s: Settings, paths: list[str], poster: Poster) -> dict:
    """``POST /recommend`` load (and the feedback stream) while the app is rolled out between ``paths`` back
    to back (the last one last, so the app ends where it was): its latency, the overlapping requests apart."""
    from adrec.serving.deploy import rollout

    done = threading.Event()
    windows: list[tuple[float, float]] = []

    def roll() -> None:
        k = 0
        while not done.is_set():
            t0 = time.time()
            rollout(args, paths[k % len(paths)])
            windows.append((t0, time.time()))
            k += 1
        if k % len(paths):  # the last rollout was not to paths[-1]: go back to it
            rollout(args, paths[-1])

    starts: list[float] = []
    thread = threading.Thread(target=roll, name="bench-rollouts", daemon=True)
    thread.start()
    poster.active.set()  # the feedback stream goes on, as in the other phases
    lat, st, secs = recommend_load(url, bodies, s.concurrency, s.requests_per_phase, starts)
    poster.active.clear()
    done.set()
    thread.join()
    return {"versions": paths, **latency_stats(lat, st, secs), "by_rollout": split_by_windows(lat, starts, windows)}


def split_by_windows(lat_s: list[float], starts: list[float], windows: list[tuple[float, float]]) -> dict:
    """The requests that overlapped one of ``windows`` (wall-clock intervals: the rollouts) vs the others:
    where the latency tail while learning comes from."""
    inside: list[float] = []
    outside: list[float] = []
    for lat, t0 in zip(lat_s, starts):
        hit = any(t0 < b and t0 + lat > a for a, b in windows)
        (inside if hit else outside).append(lat)
    return {"rollouts": len(windows), "rollout_seconds": round(sum(b - a for a, b in windows), 2),
            "during_rollout": latency_stats(inside, {"200": len(inside)}),
            "outside_rollout": latency_stats(outside, {"200": len(outside)})}


def latency_stats(lat_s: list[float], statuses: dict, seconds: float | None = None) -> dict:
    lat = np.asarray(lat_s, dtype=np.float64) * 1000
    out = {"requests": int(len(lat)), "ok": int(statuses.get("200", 0)), "statuses": dict(statuses)}
    if len(lat):
        out.update(p50_ms=round(float(np.percentile(lat, 50)), 2), p95_ms=round(float(np.percentile(lat, 95)), 2),
                   p99_ms=round(float(np.percentile(lat, 99)), 2), mean_ms=round(float(lat.mean()), 2))
    if seconds:
        out["rps"] = round(len(lat) / seconds, 2)
    return out


class Poster(threading.Thread):
    """Posts the stream to /feedback in batches, only while ``active`` is set, at most ``rate`` events/s."""

    def __init__(self, url: str, events: list[dict], batch: int):
        super().__init__(name="feedback-poster", daemon=True)
        self.url, self.events, self.batch = url.rstrip("/"), events, batch
        self.active = threading.Event()
        self.rate: float | None = None
        self.sent = 0
        self.accepted = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        import httpx

        try:
            with httpx.Client(base_url=self.url, timeout=30) as client:
                window_start, window_sent = None, 0
                while self.sent < len(self.events):
                    if not self.active.is_set():
                        window_start = None
                        self.active.wait(0.2)
                        continue
                    if window_start is None:
                        window_start, window_sent = time.perf_counter(), 0
                    chunk = self.events[self.sent:self.sent + self.batch]
                    if self.rate:
                        wait = window_start + (window_sent + len(chunk)) / self.rate - time.perf_counter()
                        if wait > 0:
                            time.sleep(wait)
                    for attempt in range(6):
                        t = time.perf_counter()
                        r = client.post("/feedback", json={"events": chunk})
                        self.latencies.append(time.perf_counter() - t)
                        if r.status_code == 200:
                            self.accepted += r.json()["accepted"]
                            break
                        if r.status_code != 503 or attempt == 5:
                            raise RuntimeError(f"POST /feedback answered {r.status_code}: {r.text[:200]}")
                        time.sleep(0.2 * (attempt + 1))
                    self.sent += len(chunk)
                    window_sent += len(chunk)
        except Exception as err:  # reported by the benchmark
            self.errors.append(repr(err))
        finally:
            self.done.set()


# ---- the whole run ----------------------------------------------------------------------------------------------
def run_benchmark(cfg, work: Path, s: Settings) -> dict:
    """Everything in the module documentation; returns the report (also written by :func:`write_report`)."""
    import ray

    from adrec.online.actor import start_learner
    from adrec.online.stream import feedback_events
    from adrec.run import RunDir
    from adrec.runtime import free_port, init_ray
    from adrec.serving.args import AppArgs
    from adrec.serving.deploy import deploy, wait_healthy

    t_start = time.perf_counter()
    work = Path(work).resolve()
    marker = work / ".adrec-online-benchmark"
    if work.exists() and any(work.iterdir()):
        if not marker.is_file():
            raise FileExistsError(f"{work} is not empty and was not written by this benchmark: choose another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text("working folder of benchmarks.online (deleted and rewritten by the next run)\n")
    timings = {}

    # 1. data
    data = make_drift_data(cfg.data.synthetic, work, s)
    cfg = drift_config(cfg, data)
    online = cfg.online
    timings["data_s"] = round(time.perf_counter() - t_start, 1)

    # 2. the initial model, on the pre-drift training log only
    run = RunDir(work / "run")
    t = time.perf_counter()
    init_ray(cfg.ray)
    trained = train_initial(cfg, run, local=s.train_local)
    timings["train_s"] = round(time.perf_counter() - t, 1)

    # 3. serve, with the learner beside it (paused until the first learning phase)
    port = s.port or free_port()
    args = AppArgs.from_config(cfg, run.path, port=port, app_name="adrec-online-bench",
                               feedback_log=str(work / "feedback" / "events.jsonl"),
                               feedback_max_behind_s=None)  # the stream replays the synthetic log's (2023) times
    args = args.resolved()
    t = time.perf_counter()
    url = deploy(args)
    state_dir = work / "online"
    try:  # a learner of that name left by an earlier run on this cluster holds another state folder
        ray.kill(ray.get_actor("adrec-online-bench-learner"), no_restart=True)
        _wait(lambda: not _actor_exists("adrec-online-bench-learner"), 30, 0.2)
    except ValueError:
        pass
    learner = start_learner(online, args.model_dir, args.feedback_log, state_dir, app_args=args,
                            name="adrec-online-bench-learner", autostart=False)
    timings["deploy_s"] = round(time.perf_counter() - t, 1)

    events = feedback_events(data.stream, context=CONTEXT, seed=s.seed)
    users = raw_user_ids(run)
    bodies = request_bodies(users, 2000, k=10, seed=s.seed, context={"slot": "1", "hour": "12", "device": "mobile"})
    warm_lat, warm_st, warm_s = recommend_load(url, bodies, s.concurrency, 200)
    rps = len(warm_lat) / warm_s
    phase_s = s.requests_per_phase / max(rps, 1e-6)
    rate = min(s.max_feedback_rate, len(events) / (s.phases * phase_s))
    poster = Poster(url, events, s.feedback_batch)
    poster.rate = rate
    poster.start()

    # 4. alternating phases, frozen first
    phases = []
    pooled = {"frozen": ([], {}), "learning": ([], {})}
    learning_starts: list[float] = []  # wall-clock starts of the learning phases' requests (their order)
    for k in range(s.phases):
        mode = "frozen" if k % 2 == 0 else "learning"
        if mode == "learning":
            ray.get(learner.start.remote())
        t = time.perf_counter()
        sent0 = poster.sent
        poster.active.set()
        starts = learning_starts if mode == "learning" else None
        lat, st, secs = recommend_load(url, bodies, s.concurrency, s.requests_per_phase, starts)
        poster.active.clear()
        if mode == "learning":
            ray.get(learner.stop.remote())
            _wait(lambda: ray.get(learner.rollouts_idle.remote()), 120)
        status = ray.get(learner.status.remote())
        phases.append({"phase": k, "mode": mode, **latency_stats(lat, st, secs),
                       "feedback_events_posted": poster.sent - sent0, "seconds": round(time.perf_counter() - t, 2),
                       "learner_records": status["counts"]["records"],
                       "learner_examples": status["counts"]["examples_learned"],
                       "serving_version": status["serving_version"]})
        pooled[mode][0].extend(lat)
        for code, c in st.items():
            pooled[mode][1][code] = pooled[mode][1].get(code, 0) + c
        log.info("phase %d (%s): %s", k, mode, phases[-1])
    rollout_windows = [(h["started"], h["started"] + h["seconds"])
                       for h in ray.get(learner.status.remote()).get("rollouts", {}).get("history", [])]
    # 4b. what a rollout costs the requests it overlaps, whatever the learner's pace: the same load while
    # this process rolls the app back and forth between the two newest versions, back to back.
    published = [p["path"] for p in ray.get(learner.status.remote())["published"]]
    rolling = (rolling_phase(args, url, bodies, s, ([str(args.model_dir)] + published)[-2:], poster)
               if s.rolling_phase else None)

    # 5. the rest of the stream, then the learner catches up and closes the last attribution windows
    t = time.perf_counter()
    poster.rate = None
    poster.active.set()
    ray.get(learner.start.remote())
    poster.done.wait()
    if poster.errors:
        raise RuntimeError(f"posting the stream failed: {poster.errors[0]}")
    _wait(lambda: ray.get(learner.caught_up.remote()), 900)
    final = ray.get(learner.stop.remote(flush=True))
    _wait(lambda: ray.get(learner.rollouts_idle.remote()), 120)
    final = ray.get(learner.status.remote())
    timings["catch_up_s"] = round(time.perf_counter() - t, 1)
    wait_healthy(url, 30)
    import httpx

    info = httpx.get(url + "/version", timeout=30).json()  # /healthz says only ok or not
    segments = final["metrics"]["segments"]
    report = {
        "settings": asdict(s) | {"port": port, "feedback_rate_events_per_s": round(rate, 1)},
        "online_config": json.loads(online.model_dump_json()),
        "data": data.counts | {"drift_ts": data.drift_ts},
        "initial_model": {k: v for k, v in trained.items() if k in ("valid_auc", "best_epoch", "epochs_run", "local")},
        "progressive": {"pre_drift": segments[0], "post_drift": segments[1], "total": final["metrics"]["total"]},
        "latency": {"frozen": latency_stats(*pooled["frozen"]), "learning": latency_stats(*pooled["learning"]),
                    "phases": phases, "warmup": latency_stats(warm_lat, warm_st, warm_s),
                    "learning_by_rollout": split_by_windows(pooled["learning"][0], learning_starts, rollout_windows),
                    "rolling": rolling},
        "feedback": {"events": len(events), "posted": poster.sent, "accepted": poster.accepted,
                     **latency_stats(poster.latencies, {"200": len(poster.latencies)})},
        "learner": {"counts": final["counts"], "published": final["published"], "last_decision": final["last_decision"],
                    "rollouts": final.get("rollouts"), "learn_seconds": final["learn_seconds"],
                    "examples_per_learn_second": final["examples_per_learn_second"],
                    "decisions": _decisions(state_dir)},
        "served_version_at_end": info.get("version"),
        "timings": timings | {"total_s": round(time.perf_counter() - t_start, 1)},
    }
    report["summary"] = summarize(report)
    try:
        from ray import serve

        serve.delete(args.app_name)
    except Exception:  # the report is what matters here
        pass
    ray.kill(learner)
    return report


def _decisions(state_dir: Path) -> dict:
    from adrec.online.publish import StatusLog

    recs = StatusLog(state_dir).read()
    out = {"published": 0, "refused": 0}
    for r in recs:
        if r.get("event") in out:
            out[r["event"]] += 1
    return out


def _actor_exists(name: str) -> bool:
    import ray

    try:
        ray.get_actor(name)
        return True
    except ValueError:
        return False


def _wait(pred, timeout_s: float, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s:.0f}s")
        time.sleep(every)


def summarize(report: dict) -> dict:
    pre, post = report["progressive"]["pre_drift"], report["progressive"]["post_drift"]
    lat = report["latency"]
    gain = post["online"]["auc"] - post["frozen"]["auc"]
    ratio = lat["learning"]["p99_ms"] / lat["frozen"]["p99_ms"]
    return {
        "post_drift_auc_online": round(post["online"]["auc"], 4), "post_drift_auc_frozen": round(post["frozen"]["auc"], 4),
        "post_drift_auc_gain": round(gain, 4),
        "post_drift_logloss_online": round(post["online"]["logloss"], 4),
        "post_drift_logloss_frozen": round(post["frozen"]["logloss"], 4),
        "pre_drift_auc_gain": round(pre["online"]["auc"] - pre["frozen"]["auc"], 4),
        "p99_frozen_ms": lat["frozen"]["p99_ms"], "p99_learning_ms": lat["learning"]["p99_ms"],
        "p99_ratio": round(ratio, 3),
        "target_auc_gain_met": bool(gain >= 0.03), "target_p99_met": bool(ratio <= 1.2),
        "failed_requests": sum(v for k, v in lat["frozen"]["statuses"].items() if k != "200")
        + sum(v for k, v in lat["learning"]["statuses"].items() if k != "200"),
    }


def _f(v, nd=4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def markdown(report: dict) -> str:
    s = report["summary"]
    d = report["data"]
    lines = [
        "# Online learning through a preference drift (synthetic, drift mode)", "",
        f"Initial model trained on {d['train_impressions']} pre-drift impressions; {d['stream_impressions']} impressions "
        f"streamed through `POST /feedback` ({d['stream_pre_drift']} before the drift, {d['stream_post_drift']} after; "
        f"{d['stream_rows_of_held_out_users']} from {d['held_out_users']} users the model never saw). "
        "Every impression is scored before it is learned from (progressive validation).", "",
        "| segment | model | impressions | AUC | logloss | calibration |", "|---|---|---:|---:|---:|---:|"]
    for seg in ("pre_drift", "post_drift"):
        for m in ("frozen", "serving", "online"):
            x = report["progressive"][seg].get(m)
            if x:
                lines.append(f"| {seg.replace('_', '-')} | {m} | {x['n']} | {_f(x['auc'])} | {_f(x['logloss'])} | "
                             f"{_f(x['calibration'], 3)} |")
    lat = report["latency"]
    lines += ["", "| serving under load (`POST /recommend`, concurrency "
              f"{report['settings']['concurrency']}) | requests | ok | p50 ms | p95 ms | p99 ms |",
              "|---|---:|---:|---:|---:|---:|"]
    for mode in ("frozen", "learning"):
        x = lat[mode]
        lines.append(f"| learner {'paused' if mode == 'frozen' else 'learning'} | {x['requests']} | {x['ok']} | "
                     f"{x['p50_ms']} | {x['p95_ms']} | {x['p99_ms']} |")
    split = lat.get("learning_by_rollout")
    if split:  # where the tail while learning comes from: requests that overlapped a rollout, or not
        for part in ("during_rollout", "outside_rollout"):
            x = split[part]
            lines.append(f"| learning, {part.replace('_', ' ')}s | {x['requests']} | {x['ok']} | "
                         f"{x.get('p50_ms', '')} | {x.get('p95_ms', '')} | {x.get('p99_ms', '')} |")
    roll = lat.get("rolling")
    if roll:
        x = roll
        lines.append(f"| back-to-back rollouts (learner paused) | {x['requests']} | {x['ok']} | {x.get('p50_ms', '')} | "
                     f"{x.get('p95_ms', '')} | {x.get('p99_ms', '')} |")
    if split:
        lines.append(f"\nLearning phases: {split['rollouts']} rollouts had started before the catch-up ({split['rollout_seconds']} s "
                     f"in all); {split['during_rollout']['requests']} requests of the learning phases overlapped one.")
    if roll:
        b = roll["by_rollout"]
        lines.append(f"Back-to-back rollouts: {b['rollouts']} in {roll['requests'] / max(roll.get('rps', 1e-9), 1e-9):.1f} s of load; requests "
                     f"overlapping one p50 {b['during_rollout'].get('p50_ms')} / p99 {b['during_rollout'].get('p99_ms')} ms.")
    lr = report["learner"]
    lines += ["",
              f"- post-drift AUC gain, online - frozen: **{s['post_drift_auc_gain']:+.4f}** (target >= +0.03: "
              f"{'met' if s['target_auc_gain_met'] else 'NOT met'}); pre-drift: {s['pre_drift_auc_gain']:+.4f}",
              f"- serving p99 while learning / while paused: **{s['p99_ratio']:.3f}** (target <= 1.2: "
              f"{'met' if s['target_p99_met'] else 'NOT met'}); failed requests: {s['failed_requests']}",
              f"- learner: {lr['counts']['examples_learned']} impressions learned from {lr['counts']['records']} log "
              f"records, {lr['decisions']['published']} versions published, {lr['decisions']['refused']} refused by the "
              f"guard, {(lr.get('rollouts') or {}).get('done', 0)} rolled out; {lr['counts']['new_users']} new users "
              f"folded in; {lr['examples_per_learn_second']} impressions per learner-second",
              f"- feedback: {report['feedback']['posted']} events in {report['feedback']['requests']} requests "
              f"(p99 {report['feedback'].get('p99_ms')} ms); served version at the end: {report['served_version_at_end']}",
              f"- wall time: {report['timings']}"]
    return "\n".join(lines) + "\n"


def _clean(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return _clean(float(o))
    return o


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "online_benchmark.json", out / "online_benchmark.md"
    js.write_text(json.dumps(_clean(report), indent=2, default=str))
    md.write_text(markdown(report))
    return js, md


def main(argv: list[str] | None = None) -> int:
    import argparse

    from adrec.config import load_config

    p = argparse.ArgumentParser(prog="benchmark_online",
                                description="online learning benchmark: frozen vs online through a drift, over Serve")
    p.add_argument("--out", required=True, help="folder for online_benchmark.json / .md")
    p.add_argument("--work", default=None, help="working folder (data, run, feedback log, learner state); "
                                                 "default: <out>/work")
    p.add_argument("--config", default=None, help="YAML config (AdrecConfig)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. online.lr=0.1")
    for f in ("train_impressions", "impressions", "pre_drift_share", "new_user_share", "port", "concurrency",
              "requests_per_phase", "phases", "feedback_batch", "max_feedback_rate", "seed"):
        default = getattr(Settings, f)
        p.add_argument("--" + f.replace("_", "-"), type=type(default) if default is not None else int, default=default)
    p.add_argument("--train-local", action="store_true", help="train the initial model in-process (no Ray Train)")
    p.add_argument("--two-node", action="store_true",
                   help="serving p99 learning vs paused with the learner on a second Ray node, the run on an S3 "
                        "server (benchmarks/online_nodes.py; needs root and unshare)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would load the client
    base = ["data.dataset=synthetic", "ranker.tiny_encoder=true", "ranker.epochs=3", "ray.num_cpus=2"]
    base += [f"online.{k}={json.dumps(v)}" for k, v in BENCH_ONLINE.items()]
    # A config file is taken as it is (plus --set); without one, the benchmark's own settings apply.
    cfg = load_config(a.config, a.set) if a.config else load_config(None, base + a.set)
    s = Settings(**{f: getattr(a, f) for f in Settings.__dataclass_fields__ if hasattr(a, f)})
    s.train_local = a.train_local
    if a.two_node:
        from .online_nodes import main as two_node

        return two_node(cfg, Path(a.out), Path(a.work or Path(a.out) / "work").resolve(), s)
    report = run_benchmark(cfg, Path(a.work or Path(a.out) / "work"), s)
    js, md = write_report(report, a.out)
    print(md.read_text())
    print(f"wrote {js} and {md}")
    return 0 if report["summary"]["target_auc_gain_met"] and report["summary"]["target_p99_met"] else 1
