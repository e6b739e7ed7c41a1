"""Serving pieces without Ray: request validation, body parsing, the durable feedback log, app args."""

from __future__ import annotations

import json
import os
import time

import pytest

from adrec.config import OnlineConfig, ServeConfig
from adrec.feedback import LogLockedError
from adrec.feedback.filelog import FileWriter, committed_path, committed_size, read_events
from adrec.errors import ApiError
from adrec.serving.schemas import FeedbackRequest, RecommendRequest, decode_json, validate


# ---- request models ----------------------------------------------------------------------------------
def _status(model, data, **ctx) -> int:
    try:
        validate(model, data, **ctx)
        return 200
    except ApiError as err:
        return err.status


@pytest.mark.parametrize("body, status", [
    ({"user_id": "u1", "k": 10}, 200),
    ({"user_id": "u1", "k": 10, "context": {"slot": 3, "device": "mobile"}, "explain": True}, 200),
    ({"user_id": "ü-ñ-用户", "k": 1}, 200),
    ({"user_id": "u1", "k": 100}, 200),
    ({"user_id": "u1", "k": 101}, 422),
    ({"user_id": "u1", "k": 0}, 422),
    ({"user_id": "u1", "k": "3"}, 422),
    ({"user_id": "u1", "k": 3.0}, 422),
    ({"user_id": "u1", "k": False}, 422),
    ({"user_id": 1, "k": 3}, 422),
    ({"user_id": "", "k": 3}, 422),
    ({"k": 3}, 422),
    ({"user_id": "u1"}, 422),
    ({"user_id": "u1", "k": 3, "extra": 1}, 422),
    ({"user_id": "u1", "k": 3, "context": {"a": None}}, 422),
    ({"user_id": "u1", "k": 3, "context": {"a": True}}, 422),
    ({"user_id": "u1", "k": 3, "context": {f"c{i}": 1 for i in range(33)}}, 422),
    ({"user_id": "u1", "k": 3, "explain": "true"}, 422),
    ([{"user_id": "u1", "k": 3}], 422),
    (None, 422),
])
def test_recommend_request_validation(body, status):
    assert _status(RecommendRequest, body, max_k=100) == status


def test_messages_name_the_field_and_never_echo_the_value():
    secret = "raw-user-id-123"
    with pytest.raises(ApiError) as err:
        validate(RecommendRequest, {"user_id": secret, "k": "many", "bogus": secret})
    text = err.value.message + " ".join(err.value.details)
    assert "k:" in text and "bogus: unknown field" in text
    assert secret not in text and "many" not in text
    assert err.value.body()["detail"].startswith("invalid request")


def test_feedback_request_validation():
    ev = {"event_id": "e1", "user_id": "u", "item": "i", "type": "click", "ts": 1_700_000_000}
    assert _status(FeedbackRequest, {"events": [ev]}) == 200
    assert _status(FeedbackRequest, {"events": [{**ev, "ts": 1.5}]}) == 200
    assert _status(FeedbackRequest, {"events": [{**ev, "type": "view"}]}) == 422
    assert _status(FeedbackRequest, {"events": [{**ev, "ts": "2024-01-01"}]}) == 422
    assert _status(FeedbackRequest, {"events": []}) == 422
    assert _status(FeedbackRequest, {"events": [ev] * 1001}) == 422
    assert _status(FeedbackRequest, {"events": [ev], "more": 1}) == 422


def test_feedback_ts_must_lie_in_the_window_around_the_server_clock():
    now = 1_800_000_000.0
    ctx = {"now": now, "max_ahead_s": 300.0, "max_behind_s": 604800.0}
    ev = {"event_id": "e1", "user_id": "u", "item": "i", "type": "click", "ts": now}

    def check(ts, **over):
        return _status(FeedbackRequest, {"events": [ev, {**ev, "ts": ts}]}, **{**ctx, **over})

    assert check(now) == check(now + 299) == check(now - 604799) == 200
    for poisoned in (1e18, now * 1e9, now + 301, -1, -1e18, now - 604801, 0):  # far future, nanoseconds, negative, old
        assert check(poisoned) == 422, poisoned
    assert check(now - 10 * 365 * 86400, max_behind_s=None) == 200  # a replay of old logs, when allowed
    assert check(-1, max_behind_s=None) == 422  # never negative
    assert check(now + 301, max_behind_s=None) == 422
    with pytest.raises(ApiError) as err:
        validate(FeedbackRequest, {"events": [ev, {**ev, "ts": 1e18}]}, **ctx)
    msg = err.value.message
    assert "events.1.ts: 1e+18 is 1e+18 s ahead of the server clock (allowed: 300 s ahead, 604800 s behind)" in msg, msg
    assert "events.0" not in msg
    with pytest.raises(ApiError, match=r"events.0.ts: .* behind the server clock \(allowed: 300 s ahead, 604800 s behind\)"):
        validate(FeedbackRequest, {"events": [{**ev, "ts": 1_700_000_000}]}, **ctx)
    with pytest.raises(ApiError, match=r"events.0.ts: -5 is negative"):
        validate(FeedbackRequest, {"events": [{**ev, "ts": -5}]}, **ctx)
    defaults = ServeConfig()
    assert defaults.feedback_max_ahead_s == OnlineConfig().max_ahead_s == 300 and defaults.feedback_max_behind_s == 604800


@pytest.mark.parametrize("raw, ok", [
    (b'{"a": 1}', True),
    (b'  {"a": "\\u00fc"}  ', True),
    ("{\"a\": \"ü\"}".encode(), True),
    (b"", False),
    (b"   ", False),
    (b"{", False),
    (b"\xff\xfe{}", False),
    (b'{"a": "\xc3"}', False),
    (b'{"a": NaN}', False),
    (b'{"a": Infinity}', False),
    (b"[" * 50_000 + b"]" * 50_000, False),
    (b'{"user_id": "\\ud800", "k": 1}', False),
    (b'{"user_id": "\\ud83d\\ude00", "k": 1}', True),
])
def test_decode_json(raw, ok):
    if ok:
        decode_json(raw)
    else:
        with pytest.raises(ApiError) as err:
            decode_json(raw)
        assert err.value.status == 400 and err.value.message


# ---- the feedback log -----------------------------------------------------------------------------------
def _rec(eid: str) -> dict:
    return {"event_id": eid, "user": "u_abc", "item": "i1", "type": "click", "ts": 1.0, "context": {}}


def test_feedback_log_appends_and_deduplicates(tmp_path):
    path = tmp_path / "fb" / "events.jsonl"
    log = FileWriter(path)
    res = log.append([_rec("a"), _rec("b"), _rec("a")])
    assert res.accepted == ["a", "b"] and res.duplicates == ["a"]
    res = log.append([_rec("b"), _rec("c")])
    assert res.accepted == ["c"] and res.duplicates == ["b"]
    assert [e["event_id"] for e in read_events(path)] == ["a", "b", "c"]
    assert len(log) == 3
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    log.close()


def test_feedback_log_rebuilds_its_index_and_cuts_a_torn_tail(tmp_path):
    path = tmp_path / "events.jsonl"
    log = FileWriter(path)
    log.append([_rec("a"), _rec("b")])
    log.close()
    with open(path, "ab") as f:  # a crash in the middle of a write: never acknowledged
        f.write(b'{"event_id": "c", "us')
    log = FileWriter(path)
    assert set(log.ids) == {"a", "b"} and len(log) == 2
    assert path.read_bytes().endswith(b"\n")
    assert log.append([_rec("a"), _rec("c")]).accepted == ["c"]
    log.close()
    assert [e["event_id"] for e in read_events(path)] == ["a", "b", "c"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_feedback_log_fsyncs_before_acknowledging(tmp_path, monkeypatch):
    log = FileWriter(tmp_path / "events.jsonl")
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    log.append([_rec("x")])
    assert calls, "append must fsync the log before it returns"
    calls.clear()
    log.append([_rec("x")])  # a pure duplicate writes nothing
    assert not calls
    log.close()


def test_the_committed_mark_follows_acknowledged_appends_only(tmp_path):
    path = tmp_path / "events.jsonl"
    log = FileWriter(path)
    assert committed_size(path) == 0
    log.append([_rec("a"), _rec("b")])
    assert committed_size(path) == path.stat().st_size > 0
    acked = path.stat().st_size
    with open(path, "ab") as f:  # bytes beyond the mark (what a failed batch leaves before its rollback)
        f.write(json.dumps(_rec("ghost")).encode() + b"\n")
    assert committed_size(path) == acked
    log.append([_rec("c")])  # the next append first cuts what the mark does not cover
    assert [e["event_id"] for e in read_events(path)] == ["a", "b", "c"] and committed_size(path) == path.stat().st_size
    log.close()
    committed_path(path).write_bytes(b"00000000000000000017 deadbeef\n")  # a torn / corrupt mark reads as nothing
    assert committed_size(path, retries=2) == 0
    FileWriter(path).close()  # reopening sets the mark from the log itself
    assert committed_size(path) == path.stat().st_size
    assert committed_size(tmp_path / "never-written.jsonl") is None  # no mark: an older writer's log


_FILL = """
import errno, json, os, resource, signal, sys
from adrec.feedback import FeedbackWriteError
from adrec.feedback.filelog import FileWriter, committed_size
path = sys.argv[1]
log = FileWriter(path)
log.append([{"event_id": "ok-0", "user": "u", "item": "i", "type": "click", "ts": 1.0}])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 100, resource.RLIM_INFINITY))
try:
    log.append([{"event_id": f"big-{i}", "user": "u", "item": "i", "type": "click", "ts": 1.0, "pad": "x" * 50}
                for i in range(20)])
    print(json.dumps({"failed": False}))
except FeedbackWriteError as err:
    print(json.dumps({"failed": True, "errno": err.errno, "msg": str(err), "size": os.path.getsize(path),
                      "mark": committed_size(path)}))
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
log.append([{"event_id": "ok-1", "user": "u", "item": "i", "type": "click", "ts": 1.0}])
"""


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    """A real failing write (the file size limit, EFBIG, mid-batch) in a child process: rolled back, mark unmoved."""
    import subprocess
    import sys

    path = tmp_path / "events.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _FILL, str(path)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    first = len(json.dumps({"event_id": "ok-0", "user": "u", "item": "i", "type": "click", "ts": 1.0},
                           separators=(",", ":"))) + 1
    assert res["failed"] and res["errno"] == 27 and "could not be written" in res["msg"]  # EFBIG
    assert res["size"] == res["mark"] == first  # the partial batch was cut off; the mark never covered it
    assert [e["event_id"] for e in read_events(path)] == ["ok-0", "ok-1"]
    assert committed_size(path) == path.stat().st_size


def test_one_writer_per_log(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "events.jsonl"
    first = FileWriter(path)
    first.append([_rec("a")])
    with pytest.raises(LogLockedError, match=rf"feedback log {path} is already open for writing .*pid {os.getpid()}"):
        FileWriter(path)  # a second writer in this process (another open file description)
    code = ("import sys\nfrom adrec.feedback.filelog import FileWriter, LogLockedError\n"
            "try:\n    FileWriter(sys.argv[1])\nexcept LogLockedError as e:\n    print(e); sys.exit(3)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    other = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=60)
    assert other.returncode == 3 and f"pid {os.getpid()}" in other.stdout and str(path) in other.stdout
    first.append([_rec("b")])  # the holder goes on; nothing it acknowledged is lost
    t = time.monotonic()
    with pytest.raises(LogLockedError):
        FileWriter(path, lock_wait_s=0.3)  # a writer that waits for a handover gives up after its wait
    assert time.monotonic() - t >= 0.3
    first.close()
    second = FileWriter(path)  # released with the first writer
    assert second.append([_rec("b"), _rec("c")]).accepted == ["c"]
    second.close()
    assert [e["event_id"] for e in read_events(path)] == ["a", "b", "c"]


def test_the_dedup_index_is_bounded_and_survives_a_restart(tmp_path):
    path = tmp_path / "events.jsonl"
    log = FileWriter(path, dedup_max_ids=3, dedup_window_s=None)
    log.append([_rec(x) for x in "abcde"])
    assert list(log.ids) == ["c", "d", "e"] and log.forgotten == 2
    assert log.append([_rec("e"), _rec("a")]).accepted == ["a"]  # "a" left the window: logged again
    log.close()
    again = FileWriter(path, dedup_max_ids=3, dedup_window_s=None)  # rebuilt within the same bounds
    assert list(again.ids) == ["d", "e", "a"] and len(again) == 6
    again.close()
    # by age: ids received longer ago than the window are forgotten (received_at of the records)
    old = tmp_path / "old.jsonl"
    log = FileWriter(old, dedup_window_s=3600)
    log.append([{**_rec("old"), "received_at": 1.0}, {**_rec("new"), "received_at": 4e9}])
    assert list(log.ids) == ["new"]
    log.close()
    log = FileWriter(old, dedup_window_s=3600)
    assert list(log.ids) == ["new"] and log.append([_rec("old")]).accepted == ["old"]
    log.close()
    assert ServeConfig().feedback_dedup_max_ids == 1_000_000 and ServeConfig().feedback_dedup_window_s == 7 * 86400


# ---- app args -----------------------------------------------------------------------------------------------
def test_app_args_resolve_paths_and_keys(tmp_path, monkeypatch):
    from adrec.serving.args import AppArgs

    run = tmp_path / "run"
    (run / "secrets").mkdir(parents=True)
    (run / "secrets" / "pseudonym.key").write_text("k3y\n")
    monkeypatch.delenv("ADREC_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("ADREC_API_KEY", raising=False)
    monkeypatch.setenv("ADREC_HOME", str(tmp_path))
    args = AppArgs(model_dir="run/model").resolved()
    assert args.model_dir == str(run / "model")
    assert args.feedback_log == str(run / "feedback" / "events.jsonl")
    assert args.key_bytes() == b"k3y"
    assert args.api_key is None

    monkeypatch.setenv("ADREC_PSEUDONYM_KEY", "from-env")
    monkeypatch.setenv("ADREC_API_KEY", "api-from-env")
    env = AppArgs(model_dir="run/model").resolved()
    assert env.key_bytes() == b"from-env" and env.api_key.get_secret_value() == "api-from-env"
    assert "from-env" not in env.model_dump_json() + repr(env)  # keys are secrets in dumps and logs

    with pytest.raises(ValueError, match="unknown|extra"):
        AppArgs(model_dir="m", max_kk=3)
    with pytest.raises(ValueError):
        AppArgs(model_dir="m", max_k=0)


def test_app_fingerprint_ignores_the_model_folder_only(tmp_path):
    from adrec.serving.args import AppArgs

    a = AppArgs(model_dir=str(tmp_path / "v1"), pseudonym_key="k", feedback_log=str(tmp_path / "fb.jsonl"))
    # A new model folder is a user_config change: same code version, replicas reconfigured in place.
    assert a.fingerprint() == a.model_copy(update={"model_dir": str(tmp_path / "v2")}).fingerprint()
    assert a.fingerprint() != a.model_copy(update={"max_k": 7}).fingerprint()
    assert a.fingerprint() != AppArgs(model_dir=a.model_dir, pseudonym_key="other", feedback_log=a.feedback_log).fingerprint()


def test_serve_apps_config_args_validate():
    from serve_apps.app import config_args

    args = config_args()
    assert args.model_dir and args.max_k >= 1


# The deployments each topology's app has (a Serve config may only override those).
TOPOLOGY_DEPLOYMENTS = {"graph": {"Ingress", "CandidateDeployment", "RankerDeployment", "FeedbackDeployment"},
                        "fused": {"Ingress", "FeedbackDeployment"}}


@pytest.mark.parametrize("name,topology,scaled", [("config.yaml", "fused", "Ingress"),
                                                  ("config.graph.yaml", "graph", "RankerDeployment")])
def test_serve_apps_config_is_a_valid_serve_config(name, topology, scaled):
    """serve_apps/config*.yaml pass Serve's own schema (what `serve deploy` / `serve run` check first),
    and name exactly the deployments of the topology their args choose."""
    import importlib
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from adrec.serving.args import AppArgs
    from adrec.serving.builder import build_app

    conf = yaml.safe_load((Path(__file__).resolve().parents[2] / "serve_apps" / name).read_text())
    schema = ServeDeploySchema.model_validate(conf)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), attr) is build_app
    assert AppArgs.model_validate(app.args).topology == topology
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == TOPOLOGY_DEPLOYMENTS[topology]
    assert all(0 < d.ray_actor_options.num_cpus < 1 for d in deployments.values())
    assert deployments["FeedbackDeployment"].num_replicas == 1
    assert dict(deployments[scaled].autoscaling_config)["max_replicas"] >= 2


def test_app_args_topology_is_checked():
    from adrec.serving.args import AppArgs

    from adrec.config import build_config

    assert AppArgs(model_dir="m").topology == "fused"
    assert AppArgs(model_dir="m", topology="graph").topology == "graph"
    # The run config carries it: `adrec serve --set serve.topology=graph`.
    cfg = build_config(overrides=["serve.topology=graph"])
    assert AppArgs.from_config(cfg, "/tmp/r").topology == "graph"
    with pytest.raises(ValueError, match="topology"):
        AppArgs(model_dir="m", topology="mesh")


def test_serving_ranks_the_candidates_stage_count():
    """One candidate-count knob: a request ranks candidates.n_candidates candidates (no serve.n_candidates)."""
    from adrec.config import build_config
    from adrec.serving.args import AppArgs

    cfg = build_config(overrides=["candidates.n_candidates=37"])
    assert AppArgs.from_config(cfg, "/tmp/r").n_candidates == 37
    assert AppArgs(model_dir="m").n_candidates == build_config().candidates.n_candidates
    with pytest.raises(ValueError):
        build_config(overrides=["serve.n_candidates=5"])


def test_openapi_documents_every_endpoint_and_field():
    """The app's OpenAPI document (what /openapi.json serves, here through FastAPI's ASGI client)."""
    from fastapi.testclient import TestClient

    from adrec.serving.ingress import api

    spec = TestClient(api).get("/openapi.json").json()
    responses = {(p, m): op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                 for p, ops in spec["paths"].items() for m, op in ops.items()}
    assert responses == {("/recommend", "post"): "RecommendResponse", ("/feedback", "post"): "FeedbackResponse",
                         ("/healthz", "get"): "HealthResponse", ("/version", "get"): "VersionResponse"}
    schemas = spec["components"]["schemas"]
    for name in ("RecommendResponse", "RecommendedItem", "FeedbackResponse", "HealthResponse", "VersionResponse",
                 "RecommendRequest", "FeedbackRequest", "FeedbackEvent"):
        assert all(f.get("description") for f in schemas[name]["properties"].values()), name
    assert schemas["RecommendResponse"]["properties"]["ranked_by"]["enum"] == ["two_stage", "click_prob",
                                                                                 "expected_value"]
    props = schemas["RecommendResponse"]["properties"]
    assert {"objective", "policy", "request_id", "arm"} <= set(props)
    assert {"position", "propensity", "bid"} <= set(schemas["RecommendedItem"]["properties"])
    assert {"position", "propensity", "policy", "request_id"} <= set(schemas["FeedbackEvent"]["properties"])
    assert "arm" not in schemas["FeedbackEvent"]["properties"]  # the server decides it
