"""The online learner on the shared tiny run: progressive metrics, publication and the guard, ALS fold-in
of new users, exactly-once through a killed actor, and rollouts to the Serve app over HTTP."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from adrec.config import OnlineConfig
from adrec.model_version import registry_of
from adrec.online.learner import OnlineLearner
from adrec.online.publish import StatusLog
from adrec.online.stream import feedback_events, post_feedback, write_feedback_log
from adrec.runtime import free_port
from adrec.feedback.filelog import read_events

pytestmark = pytest.mark.ray

KEY = b"test-key"  # tiny_cfg's data.pseudonym_key
NEWCOMERS = [f"newcomer-{i}" for i in range(4)]




@pytest.fixture(scope="module")
def stream(tiny_run) -> list[dict]:
    """The last 2500 impressions of the tiny log (and their clicks), plus users the model never saw."""
    imp = pd.read_csv(tiny_run.raw / "impressions.csv", dtype=str).iloc[-2500:].reset_index(drop=True)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(imp), 120, replace=False)
    imp.loc[pick, "user_id"] = [NEWCOMERS[i % len(NEWCOMERS)] for i in range(len(pick))]
    imp.loc[pick[:40], "clicked"] = "1"  # the newcomers click, so there is something to fold in
    return feedback_events(imp, context=["slot", "hour", "device"])


@pytest.fixture(scope="module")
def log_path(stream, tmp_path_factory):
    path = tmp_path_factory.mktemp("online-log") / "events.jsonl"
    assert write_feedback_log(path, stream, KEY) == len(stream)
    return path


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cfg(**kw) -> OnlineConfig:
    base = dict(batch_size=64, publish_every_events=800, checkpoint_every_events=300, read_batch_events=250,
                guard_margin=0.05, guard_min_events=200, lr=0.05, nice=0, sched_idle=False, rollout_min_interval_s=0)
    base.update(kw)
    return OnlineConfig(**base)


def test_learner_scores_before_learning_publishes_and_folds_in(tiny_run, log_path, stream, tmp_path, one_thread):
    from adrec.data.privacy import pseudonymize
    from adrec.ranking.base import load_ranker
    from adrec.model_version import VersionPaths
    from adrec.serving.recommender import Recommender

    published = []
    learner = OnlineLearner(_cfg(), tiny_run.model, log_path, tmp_path / "online",
                            on_publish=lambda path, rec: published.append((path, rec)))
    learner.run_until_caught_up()
    learner.flush()
    c = learner.counts()
    n_imp = sum(e["type"] == "impression" for e in stream)
    n_clk = sum(e["type"] == "click" for e in stream)
    assert c["records"] == len(read_events(log_path)) == len(stream)
    assert c["position"] == log_path.stat().st_size
    assert c["impressions"] == c["examples"] == c["examples_learned"] == n_imp
    assert c["clicks"] == n_clk and c["attributed_clicks"] == c["positives"] > 0
    assert c["new_users"] == len(NEWCOMERS)
    m = learner.board.summary()["total"]
    for scorer in ("online", "serving", "frozen"):
        assert m[scorer]["n"] == n_imp and m[scorer]["clicks"] == c["positives"]
        assert 0.5 < m[scorer]["auc"] < 1 and 0 < m[scorer]["logloss"] < 1 and 0.3 < m[scorer]["calibration"] < 3
    assert m["online"]["logloss"] != m["frozen"]["logloss"]  # it did learn

    # Publication: every 800 learned impressions, each a complete version handed to the rollout hook.
    assert len(published) == n_imp // 800 == len(learner.published)
    records = StatusLog(tmp_path / "online").read()
    assert [r["version"] for r in records if r.get("event") == "published"] == [p["version"] for p in learner.published]
    latest, rec = published[-1]
    latest = Path(latest)  # a local registry here: the location is a folder
    assert rec["guard"]["online_logloss"] <= rec["guard"]["limit"]
    ranker = load_ranker(latest / "ranker")
    served = dict(ranker.model.named_parameters())
    for name, value in learner.serving.model.named_parameters():
        assert torch.equal(served[name].detach(), value.detach()), name  # the version holds what serving scored with

    # New users are in the version: indexed after the base users, folded into ALS, recommended from it.
    rec_v = Recommender(latest, KEY)
    base_users = len(Recommender(tiny_run.model, KEY, load_ranker=False).version.user_pos)
    idx = rec_v.user_index(NEWCOMERS[0])
    assert idx >= base_users and rec_v.version.seen.shape[0] == base_users + len(NEWCOMERS)
    als = rec_v.version.sources["als"]
    assert als.user_factors.shape[0] == base_users + len(NEWCOMERS) and np.abs(als.user_factors[idx]).sum() > 0
    cand = rec_v.candidates(idx, 20)
    assert len(cand.items) > 0 and any("als" in s for s in cand.sources)
    assert len(rec_v.version.history[idx]) > 0  # their clicks are their history now
    out = rec_v.recommend(NEWCOMERS[0], 5)
    assert len(out) == 5
    # The two-stage recommender travels with online versions: base users keep its order (newcomers, beyond
    # its users, took the fold-in path above), and their impressions since never come back.
    assert rec_v.version.two_stage is not None and cand.final is None
    for u in range(3):
        base_cand = rec_v.candidates(u, 20)
        assert base_cand.final is not None and len(base_cand.items) == 20
        assert not set(base_cand.items.tolist()) & set(rec_v.version.seen[u].indices.tolist())
    # Its base users' lists are stored in it (not computed by every replica at each rollout), and they are
    # this version's (its seen matrix), not the base version's.
    assert rec_v.precompute_lists(20, max_users=10**6) and VersionPaths(latest).lists.is_file()
    assert [rec_v.candidates(u, 20).items.tolist() for u in range(3)] == \
        [[i for i in rec_v.version.two_stage.rank_lists([u], 20, exclude=rec_v.version.seen)[0][0].tolist() if i >= 0]
         for u in range(3)]
    assert pseudonymize(NEWCOMERS[0], KEY) in set(pd.read_parquet(latest / "features" / "users.parquet")["user"])


def test_pruning_a_runs_registry_keeps_the_learners_base(tiny_run, log_path, tmp_path, one_thread):
    """A learner on a run's live version publishes into that run's registry and prunes it: the base it
    reads (fold-in, a restart) is kept however many versions follow (it was pruned once: every later
    step of the learner failed, and so did its restart)."""
    import shutil

    from adrec.model_version import VersionRegistry, read_version

    reg = VersionRegistry(tmp_path / "run" / "versions")
    staged = tmp_path / "staged"
    shutil.copytree(tiny_run.model, staged)
    base = reg.commit(staged)
    cfg = _cfg(publish_every_events=400, keep_versions=2, guard_margin=1.0)
    # Each version goes live as it is published (what a rollout does), so the base is neither live nor previous.
    learner = OnlineLearner(cfg, base.uri, log_path, tmp_path / "online",
                            on_publish=lambda path, rec: reg.set_live(reg.find(rec["version"]).number))
    learner.run_until_caught_up()
    assert reg.live().number == reg.numbers()[-1] != base.number
    assert len(learner.published) > cfg.keep_versions + 1  # enough versions for the base to fall out of "newest"
    kept = reg.numbers()
    assert base.number in kept and 2 not in kept  # the versions between the base and the newest went
    assert read_version(base.uri)["version"] == learner.base_version
    OnlineLearner(cfg, base.uri, log_path, tmp_path / "online").step()  # a restart resumes on its base


def test_guard_refuses_a_worse_version_and_says_so(tiny_run, log_path, tmp_path, caplog, one_thread):
    # Plain SGD with a far too large step: finite, but worse than the served model.
    cfg = _cfg(optimizer="sgd", lr=1.0, publish_every_events=500, guard_margin=0.0, train_layers=["head"])
    learner = OnlineLearner(cfg, tiny_run.model, log_path, tmp_path / "online")
    with caplog.at_level(logging.WARNING, logger="adrec.online.learner"):
        learner.run_until_caught_up()
    decisions = [r for r in StatusLog(tmp_path / "online").read() if r.get("event") in ("published", "refused")]
    refused = [r for r in decisions if r["event"] == "refused"]
    assert refused and learner.refused == len(refused) and len(refused) > len(learner.published)
    for r in refused:
        assert r["guard"]["online_logloss"] > r["guard"]["serving_logloss"] * (1 + cfg.guard_margin)
        assert np.isfinite(r["guard"]["online_logloss"])
    # A refusal leaves the serving version as it was.
    for before, after in zip(decisions, decisions[1:]):
        if before["event"] == "refused":
            assert after["serving_version"] == before["serving_version"]
    assert learner.serving_version == (learner.published[-1]["version"] if learner.published else learner.base_version)
    assert "refused version" in caplog.text
    assert len(registry_of(tmp_path / "online").numbers()) == len(learner.published)
    status = json.loads((tmp_path / "online" / "status.json").read_text())
    assert status["counts"]["refused"] == len(refused)


# make test-all: in make test exactly-once is checked through a killed learner process on a segment log
# (below) and across two learners on two nodes (test_two_nodes.py).
@pytest.mark.slow
def test_exactly_once_when_the_learner_actor_is_killed(ray_session, tiny_run, log_path, stream, tmp_path, one_thread):
    import ray

    from adrec.online.actor import start_learner

    cfg = _cfg()
    ref = OnlineLearner(cfg, tiny_run.model, log_path, tmp_path / "reference", export_metrics=False)
    ref.run_until_caught_up()
    ref.flush()

    slow = cfg.model_copy(update={"max_busy_fraction": 0.5, "read_batch_events": 100})
    handle = start_learner(slow, tiny_run.model, log_path, tmp_path / "killed", name="test-online-kill",
                           max_restarts=1)
    total = len(stream)
    deadline = time.monotonic() + 120
    while ray.get(handle.status.remote())["counts"]["records"] < total // 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = ray.get(handle.pid.remote())
    ray.kill(handle, no_restart=False)  # the process dies mid-stream; Ray starts a new one
    while True:
        try:
            st = ray.get(handle.status.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            time.sleep(0.2)
            continue
        if st["counts"]["records"] >= total:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert st["pid"] != pid
    status = ray.get(handle.stop.remote(flush=True))
    state = ray.get(handle.model_state.remote())
    ray.kill(handle, no_restart=True)

    resumed = [r for r in StatusLog(tmp_path / "killed").read() if r.get("event") == "resumed"]
    assert len(resumed) == 1 and 0 < resumed[0]["records"] < total  # restarted from a mid-stream checkpoint
    want = ref.counts()
    for k in ("records", "position", "examples_learned", "impressions", "clicks", "attributed_clicks", "positives",
              "late_clicks", "published", "refused", "new_users", "steps"):
        assert status["counts"][k] == want[k], k
    assert status["serving_version"] == ref.serving_version
    ref_state = ref.model_state()
    assert set(state) == set(ref_state)
    for name, t in ref_state.items():
        assert torch.equal(state[name], t), name
    assert status["metrics"]["total"] == ref.board.summary()["total"]


_LEARN_UNTIL_KILLED = """
import json, os, sys, time
from adrec.config import OnlineConfig
from adrec.online.learner import OnlineLearner
model, log, state, progress, cfg = sys.argv[1:]
learner = OnlineLearner(OnlineConfig.model_validate_json(cfg), model, log, state, export_metrics=False)
while True:
    learner.step()
    with open(progress + ".tmp", "w") as f:
        f.write(str(learner.last_checkpoint_records))
    os.replace(progress + ".tmp", progress)
    time.sleep(0.1)
"""


def test_exactly_once_on_a_segment_log_when_the_learner_process_is_killed(tiny_run, stream, tmp_path, s3_env,
                                                                          one_thread):
    """Two writers' interleaved segments on the S3 server; the learner's process is SIGKILLed mid-stream
    and a new one resumes from its checkpoint: the same records, counts and weights as one that never stopped."""
    import os
    import signal
    import subprocess
    import sys
    import uuid
    from pathlib import Path

    from adrec.feedback import open_log

    part = stream[:1000]
    uri = f"s3://{s3_env.bucket}/online-{uuid.uuid4().hex[:8]}/feedback"
    writers = [threading.Thread(target=write_feedback_log, args=(uri, half, KEY), kwargs={"batch": 40})
               for half in (part[0::2], part[1::2])]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    segments = open_log(uri).reader()._list()
    assert len({s.writer for s in segments}) == 2 and len(segments) >= 20
    cfg = _cfg(publish_every_events=None, track_frozen=False, checkpoint_every_events=150, read_batch_events=100)
    ref = OnlineLearner(cfg, tiny_run.model, uri, tmp_path / "reference", export_metrics=False)
    ref.run_until_caught_up()
    assert ref.records == len(part)

    repo = Path(__file__).resolve().parents[2]
    progress = tmp_path / "progress"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "platform"), str(repo)])}
    child = subprocess.Popen([sys.executable, "-c", _LEARN_UNTIL_KILLED, str(tiny_run.model), uri,
                              str(tmp_path / "killed"), str(progress), cfg.model_dump_json()], env=env)
    try:
        deadline = time.monotonic() + 300
        while not (progress.is_file() and int(progress.read_text() or 0) >= len(part) // 3):
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    resumed = OnlineLearner(cfg, tiny_run.model, uri, tmp_path / "killed", export_metrics=False)
    assert resumed.restored and 0 < resumed.records < len(part)  # from a mid-stream checkpoint
    resumed.run_until_caught_up()
    want, got = ref.counts(), resumed.counts()
    for k in ("records", "position", "examples_learned", "impressions", "clicks", "attributed_clicks", "positives",
              "late_clicks", "new_users", "steps", "bad_records"):
        assert got[k] == want[k], k
    assert got["position"] == {"writers": {w: [max(s.seq for s in segments if s.writer == w) + 1, 0]
                                           for w in {s.writer for s in segments}}}
    for name, t in ref.model_state().items():
        assert torch.equal(resumed.model_state()[name], t), name


def test_serve_app_learns_from_http_feedback_and_rolls_out_without_drops(ray_session, tiny_run, tiny_cfg, stream,
                                                                          tmp_path):
    import ray
    from ray import serve

    from adrec.online.actor import serve_with_learner
    from adrec.serving.args import AppArgs

    args = AppArgs(model_dir=str(tiny_run.model), pseudonym_key=tiny_cfg.data.pseudonym_key,
                   feedback_log=str(tmp_path / "feedback" / "events.jsonl"), port=free_port(), app_name="adrec-online",
                   num_cpus_per_replica=0.1, feedback_max_behind_s=None)  # a replay of the tiny log's (2023) events
    cfg = _cfg(publish_every_events=500, num_cpus=0.1, rollout_min_interval_s=3)
    part = stream[:1400]
    url, handle = serve_with_learner(cfg, args, state_dir=tmp_path / "online", name="test-online-serve")
    try:
        statuses: dict[int, int] = {}
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                i = 0
                while not stop.is_set():
                    r = client.post("/recommend", json={"user_id": f"user{i % 300:05d}", "k": 5})
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    i += 1

        t = threading.Thread(target=load, daemon=True)
        t.start()
        sent = post_feedback(url, part, batch=100)
        assert sent["accepted"] == len(part)
        deadline = time.monotonic() + 120
        while True:
            st = ray.get(handle.status.remote())
            live = httpx.get(url + "/version", timeout=10).json()["version"]
            if st["counts"]["records"] >= len(part) and st["published"] and live == st["serving_version"] \
                    and ray.get(handle.rollouts_idle.remote()):
                break
            assert st["error"] is None and time.monotonic() < deadline, st
            time.sleep(0.5)
        stop.set()
        t.join()
        # Read again: the snapshot above may predate the rollout that the idle check then saw finish.
        st = ray.get(handle.status.remote())
        assert st["rollouts"]["done"] >= 1 and st["rollouts"]["failed"] == 0
        # Rollouts are paced (online.rollout_min_interval_s) and the newest published version is the live one.
        hist = st["rollouts"]["history"]
        for a, b in zip(hist, hist[1:]):
            assert b["started"] >= a["started"] + a["seconds"] + 3 - 0.1, hist
        assert hist[-1]["version"] == st["published"][-1]["version"] == live
        assert live != read_version_id(tiny_run.model) and live.startswith(read_version_id(tiny_run.model))
        assert set(statuses) == {200} and sum(statuses.values()) > 20  # nothing dropped across the rollouts
        r = httpx.post(url + "/recommend", json={"user_id": NEWCOMERS[0], "k": 5}, timeout=30)
        assert r.status_code == 200 and r.json()["version"] == live and len(r.json()["items"]) == 5
        # The progressive metrics are Ray metrics: the node's metrics endpoint serves the learner's gauges.
        port = ray._private.worker.global_worker.node.metrics_export_port
        deadline = time.monotonic() + 40
        while True:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            auc_lines = [ln for ln in text.splitlines() if ln.startswith("ray_adrec_online_auc{")
                         and 'learner="test-online-serve"' in ln and 'model="online"' in ln]
            if auc_lines:
                break
            assert time.monotonic() < deadline, "the learner's gauges never reached the metrics endpoint"
            time.sleep(1)
        assert 0.5 < float(auc_lines[0].rsplit(" ", 1)[1]) < 1
    finally:
        ray.kill(handle, no_restart=True)
        serve.shutdown()


def read_version_id(model_dir) -> str:
    from adrec.model_version import read_version

    return str(read_version(model_dir)["version"])
