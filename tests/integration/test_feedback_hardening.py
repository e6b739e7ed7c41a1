"""Hardening of the feedback path on the shared tiny run: poisoned timestamps, a full disk under the
feedback log while the learner runs, a learner that fails (restarts or reports itself unhealthy), a
decision replayed after a crash, and new users bounded per version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pandas as pd
import pytest
import torch

from adrec.config import OnlineConfig
from adrec.errors import LearnerFailedError
from adrec.online.learner import OnlineLearner
from adrec.online.publish import StatusLog
from adrec.online.stream import feedback_events, write_feedback_log
from adrec.online.supervise import Supervised
from adrec.runtime import free_port
from adrec.feedback.filelog import read_events

pytestmark = pytest.mark.ray

KEY = b"test-key"  # tiny_cfg's data.pseudonym_key
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def events(tiny_run) -> list[dict]:
    """The last 1200 impressions of the tiny log (and their clicks) as /feedback events."""
    imp = pd.read_csv(tiny_run.raw / "impressions.csv", dtype=str).iloc[-1200:].reset_index(drop=True)
    return feedback_events(imp, context=["slot", "hour", "device"], prefix="hard")


def _cfg(**kw) -> OnlineConfig:
    base = dict(batch_size=64, publish_every_events=None, checkpoint_every_events=300, read_batch_events=250,
                lr=0.05, nice=0, sched_idle=False, track_frozen=False)
    base.update(kw)
    return OnlineConfig(**base)


def _now_events(events: list[dict], n: int, prefix: str) -> list[dict]:
    """``n`` events re-stamped to the last minutes before now (their order and spacing kept, squeezed)."""
    part = events[:n]
    t0, t1 = part[0]["ts"], part[-1]["ts"]
    now = time.time()
    return [{**e, "event_id": f"{prefix}-{e['event_id']}", "ts": now - 600 + 540 * (e["ts"] - t0) / max(t1 - t0, 1)}
            for e in part]


# ---- 1. event time --------------------------------------------------------------------------------------
# In `make test-all` (~35 s): by default test_serve sends a far-future ts (422) and
# tests/unit/test_online_parts.py checks the event-time attribution.
@pytest.mark.slow
def test_poisoned_timestamps_over_http_get_422_and_leave_the_labels_alone(ray_session, tiny_run, tiny_cfg, events,
                                                                          tmp_path):
    import ray
    from ray import serve

    from adrec.online.actor import serve_with_learner
    from adrec.serving.args import AppArgs

    args = AppArgs(model_dir=str(tiny_run.model), pseudonym_key=tiny_cfg.data.pseudonym_key,
                   feedback_log=str(tmp_path / "feedback" / "events.jsonl"), port=free_port(), app_name="adrec-poison",
                   num_cpus_per_replica=0.1)
    url, handle = serve_with_learner(_cfg(num_cpus=0.1), args, state_dir=tmp_path / "online", name="test-poison")
    try:
        good = _now_events(events, 300, "now")
        with httpx.Client(base_url=url, timeout=30) as c:
            for i in range(0, len(good), 100):
                r = c.post("/feedback", json={"events": good[i:i + 100]})
                assert r.status_code == 200 and r.json()["accepted"] == len(good[i:i + 100]), r.text

            def settled() -> dict:
                deadline = time.monotonic() + 120
                while not ray.get(handle.caught_up.remote()):
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
                return ray.get(handle.status.remote())

            before = settled()
            assert before["counts"]["records"] == len(good) and before["counts"]["pending"] > 0
            now = time.time()
            poisoned = {"nanoseconds": now * 1e9, "far future": 1e18, "negative": -1.0, "an hour ahead": now + 3600,
                        "a month old": now - 30 * 86400}
            for name, ts in poisoned.items():
                batch = [{**good[0], "event_id": f"poison-{name}-ok", "ts": now - 5},
                         {**good[1], "event_id": f"poison-{name}", "ts": ts}]
                r = c.post("/feedback", json={"events": batch})
                assert r.status_code == 422, (name, r.text)
                detail = r.json()["detail"]
                assert "events.1.ts:" in detail and "(allowed: 300 s ahead, 604800 s behind)" in detail, detail
                assert "events.0" not in detail
            after = settled()
        assert not any(e["event_id"].startswith("poison-") for e in read_events(args.feedback_log))
        for k in ("records", "examples", "positives", "examples_learned", "pending", "late_clicks", "future_ts_clamped"):
            assert after["counts"][k] == before["counts"][k], k  # not one label changed
        assert after["healthy"] and after["running"] and ray.get(handle.check.remote()) is True
    finally:
        ray.kill(handle, no_restart=True)
        serve.shutdown()


def test_the_learner_bounds_its_watermark_on_a_poisoned_log_and_its_new_users(tiny_run, events, tmp_path):
    """Defence in depth: a log written by another writer (or before the ingress checked ts)."""
    log = tmp_path / "events.jsonl"
    good = _now_events(events, 400, "now")
    newcomers = [{**e, "event_id": f"new-{i}", "user_id": f"newcomer-{i}", "type": "impression"}
                 for i, e in enumerate(good[:5])]
    write_feedback_log(log, good + newcomers, KEY)
    learner = OnlineLearner(_cfg(max_new_users_per_version=3), tiny_run.model, log, tmp_path / "online",
                            export_metrics=False)
    learner.run_until_caught_up()
    before = learner.counts()
    watermark = learner.joiner.watermark
    assert before["pending"] > 0 and before["future_ts_clamped"] == 0
    assert before["new_users"] == 3 and before["refused_new_users"] == 2 and before["refused_new_user_events"] == 2
    write_feedback_log(log, [{**good[0], "event_id": "poison-ns", "ts": time.time() * 1e9},
                             {**good[1], "event_id": "poison-far", "type": "click", "ts": 1e18}], KEY)
    learner.run_until_caught_up()
    after = learner.counts()
    assert after["records"] == before["records"] + 2 and after["future_ts_clamped"] == 2
    assert learner.joiner.watermark <= time.time() + 300 and learner.joiner.watermark >= watermark
    for k in ("examples", "positives", "examples_learned", "late_clicks"):
        assert after[k] == before[k], k
    assert after["pending"] == before["pending"] + 1  # the poisoned impression waits; it labels nothing
    status = learner.status()
    assert status["counts"]["refused_new_users"] == 2 and status["healthy"] is True


# ---- 2. a full disk under the log; a failing learner ----------------------------------------------------------
_ENOSPC_CHILD = r'''
import asyncio, errno, json, os, sys, threading, time
from collections import Counter
from adrec.config import OnlineConfig
from adrec.data.privacy import pseudonymize
from adrec.online.learner import OnlineLearner
from adrec.online.supervise import Supervised
from adrec.serving.args import AppArgs
from adrec.serving.deployments import FeedbackDeployment
from adrec.feedback.filelog import committed_size, read_events

model_dir, disk, state_dir, events_path, out_path = sys.argv[1:]
log_path = os.path.join(disk, "events.jsonl")
events = json.load(open(events_path))
for e in events:
    e["user"] = pseudonymize(e.pop("user_id"), b"test-key")  # what the ingress does
loop = asyncio.new_event_loop()
# The real writer deployment's code (without Serve around it): what /feedback's ingress awaits.
writer = FeedbackDeployment.func_or_class(AppArgs(model_dir=model_dir, feedback_log=log_path, pseudonym_key="test-key"))
loop.run_until_complete(writer.reconfigure({"model_dir": model_dir}))

cfg = OnlineConfig(batch_size=64, publish_every_events=None, checkpoint_every_events=200, read_batch_events=50,
                   nice=0, sched_idle=False, track_frozen=False, max_ahead_s=None)
stop = threading.Event()
sup = Supervised(lambda: OnlineLearner(cfg, model_dir, log_path, state_dir, export_metrics=False), cfg, state_dir)
seen_beyond_mark = []

def learn():
    while not stop.is_set():
        if sup.step() == 0:
            stop.wait(0.01)
        if sup.learner is not None and sup.learner.position.offset > (committed_size(log_path) or 0):
            seen_beyond_mark.append(sup.learner.position.offset)

thread = threading.Thread(target=learn, daemon=True)
thread.start()
batches = [events[i:i + 40] for i in range(0, len(events), 40)]
statuses, acked, failed = [], set(), []

def post(batch):
    out = loop.run_until_complete(writer.append(batch))
    statuses.append(out["status"])
    if out["status"] == 200:
        acked.update(e["event_id"] for e in batch)
    return out

for b in batches[:4]:
    assert post(b)["status"] == 200
filler = os.open(os.path.join(disk, "filler"), os.O_WRONLY | os.O_CREAT)
for size in (1 << 16, 1 << 12, 1 << 8, 1):  # fill the disk to the last byte
    try:
        while True:
            os.write(filler, b"\0" * size)
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
full_details = []
for b in batches[4:8]:  # the disk is full: every one of these fails, and leaves nothing behind
    out = post(b)
    if out["status"] == 503:
        failed.append(b)
        full_details.append(out["detail"])
    time.sleep(0.05)
size_while_full = os.path.getsize(log_path)
mark_while_full = committed_size(log_path)
os.close(filler)
os.remove(os.path.join(disk, "filler"))  # space is freed: the clients retry, then send the rest
for b in failed + batches[8:]:
    assert post(b)["status"] == 200
deadline = time.time() + 120
while (sup.learner is None or sup.learner.position.offset < committed_size(log_path)) and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.3)
alive = thread.is_alive()
stop.set()
thread.join(30)
c = sup.learner.counts()
ids = Counter(e["event_id"] for e in read_events(log_path))
json.dump({"statuses": statuses, "failed": len(failed), "details": full_details, "acked": sorted(acked),
           "log_ids": ids, "records": c["records"], "impressions": c["impressions"], "clicks": c["clicks"],
           "unknown_items": c["unknown_items"], "bad_records": c["bad_records"], "offset": c["position"],
           "log_size": os.path.getsize(log_path), "size_while_full": size_while_full, "mark_while_full": mark_while_full,
           "healthy": sup.healthy, "restarts": sup.health["restarts"], "alive": alive,
           "seen_beyond_mark": seen_beyond_mark}, open(out_path, "w"))
'''


def test_a_full_disk_under_the_feedback_log_while_the_learner_runs(tiny_run, events, tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (a private tmpfs mount)")
    disk = tmp_path / "disk"
    disk.mkdir()
    ev_path = tmp_path / "events.json"
    ev_path.write_text(json.dumps(events[:600]))
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)])}
    script = tmp_path / "child.py"
    script.write_text(_ENOSPC_CHILD)
    cmd = (f"mount -t tmpfs -o size=512k tmpfs {disk} && exec {sys.executable} {script} {tiny_run.model} {disk} "
           f"{tmp_path / 'online'} {ev_path} {out}")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", cmd], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["failed"] == 4 and Counter(res["statuses"])[503] == 4  # every write on the full disk: 503
    assert all("No space left on device" in d and "nothing of this batch was stored" in d for d in res["details"])
    assert res["size_while_full"] == res["mark_while_full"]  # no byte of a failed batch was left in the log
    acked = set(res["acked"])
    assert len(acked) == len(events[:600]) and set(res["log_ids"]) == acked
    assert set(res["log_ids"].values()) == {1}  # each acknowledged event in the log once
    # ... and learned exactly once: every record read once, none skipped, none beyond the mark
    assert res["records"] == res["impressions"] + res["clicks"] == len(acked) and res["unknown_items"] == 0
    assert res["bad_records"] == 0 and res["offset"] == res["log_size"] and res["seen_beyond_mark"] == []
    assert res["healthy"] and res["alive"] and res["restarts"] == 0  # the learner never stopped


def test_a_failing_learner_restarts_from_its_checkpoint_or_reports_itself_unhealthy(tiny_run, events, tmp_path):
    log = tmp_path / "events.jsonl"
    write_feedback_log(log, events, KEY)
    cfg = _cfg(max_restarts=2, restart_backoff_s=0.01, checkpoint_every_events=200)
    ref = OnlineLearner(cfg, tiny_run.model, log, tmp_path / "reference", export_metrics=False)
    ref.run_until_caught_up()

    state = tmp_path / "online"
    sup = Supervised(lambda: OnlineLearner(cfg, tiny_run.model, log, state, export_metrics=False), cfg, state)
    for _ in range(3):
        sup.step()
    assert sup.learner.records == 750 and sup.learner.last_checkpoint_records == 750
    whole = log.read_bytes()
    log.write_bytes(whole[:100])  # the log was replaced by a shorter one: a real failure of the next step
    assert sup.step() == 0 and sup.learner is None and sup.healthy
    assert "LogShrankError" in sup.health["error"] and sup.health["failures"] == 1
    log.write_bytes(whole)  # put back: the restart from the checkpoint carries on
    while sup.step() or sup.learner is None:
        pass
    assert sup.health["restarts"] == 1 and sup.health["failures"] == 0 and sup.healthy
    for k in ("records", "position", "examples_learned", "impressions", "clicks", "attributed_clicks", "steps"):
        assert sup.learner.counts()[k] == ref.counts()[k], k  # exactly once through the restart
    for name, t in ref.model_state().items():
        assert torch.equal(sup.learner.model_state()[name], t), name
    records = StatusLog(state).read()
    assert [r["event"] for r in records if r["event"] in ("step_failed", "restarted")] == ["step_failed", "restarted"]

    sup.learner.checkpoint()
    log.write_bytes(whole[:100])  # and now for good: after max_restarts it says so, and stops
    with pytest.raises(LearnerFailedError, match="failed 3 times in a row"):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            sup.step()
            time.sleep(0.01)
    assert not sup.healthy
    status = json.loads((state / "status.json").read_text())
    assert status["healthy"] is False and "LogShrankError" in status["error"] and "has 100 bytes" in status["error"]
    assert StatusLog(state).read()[-1]["event"] == "failed"
    with pytest.raises(LearnerFailedError, match="unhealthy"):
        sup.step()

    # `adrec online` exits non-zero on it (the same learner state and log, in a process of its own)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)])}
    cli = subprocess.run([sys.executable, "-m", "adrec", "online", "--run", str(tiny_run.path), "--once",
                          "--set", f"serve.feedback_log={log}", "--set", f"online.state_dir={state}",
                          "--set", "online.max_restarts=1", "--set", "online.restart_backoff_s=0.01",
                          "--set", "online.sched_idle=false"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 3, cli.stderr[-3000:]
    assert "failed 2 times in a row" in cli.stderr and "LogShrankError" in cli.stderr
    assert json.loads((state / "status.json").read_text())["healthy"] is False


# ---- 9. a decision replayed after a crash is recorded once --------------------------------------------------------
def test_a_replayed_decision_is_recorded_once(tiny_run, events, tmp_path):
    log = tmp_path / "events.jsonl"
    write_feedback_log(log, events, KEY)
    cfg = _cfg(publish_every_events=400, guard_margin=1.0, checkpoint_every_events=100000)
    state = tmp_path / "online"
    learner = OnlineLearner(cfg, tiny_run.model, log, state, export_metrics=False)
    learner.checkpoint()
    saved = (state / "checkpoint.pt").read_bytes()  # the state before the first decision
    learner.run_until_caught_up()
    decisions = [r for r in StatusLog(state).read() if r.get("event") in ("published", "refused")]
    assert len(decisions) >= 2

    # A crash after the decisions' records, before a later checkpoint: the replay makes them again.
    (state / "checkpoint.pt").write_bytes(saved)
    replay = OnlineLearner(cfg, tiny_run.model, log, state, export_metrics=False)
    replay.run_until_caught_up()
    again = [r for r in StatusLog(state).read() if r.get("event") in ("published", "refused")]
    assert [(r["event"], r["version"]) for r in again] == [(r["event"], r["version"]) for r in decisions]

    # A crash between a decision's checkpoint and its record: the restart writes the missing record, once.
    lines = (state / "status.jsonl").read_text().splitlines()
    last = max(i for i, ln in enumerate(lines) if json.loads(ln).get("event") in ("published", "refused"))
    (state / "status.jsonl").write_text("\n".join(lines[:last] + lines[last + 1:]) + "\n")
    OnlineLearner(cfg, tiny_run.model, log, state, export_metrics=False)
    final = [r for r in StatusLog(state).read() if r.get("event") in ("published", "refused")]
    assert [(r["event"], r["version"]) for r in final] == [(r["event"], r["version"]) for r in decisions]
