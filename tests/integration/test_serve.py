"""The Serve app over real HTTP on 127.0.0.1: answers, hostile input, feedback durability, rollout, faults.

Every test runs against both topologies (``graph``: Ingress -> candidates -> ranker; ``fused``: the
model in the Ingress replicas): one app per topology (Serve's HTTP ingress, HAProxy here, on a free port >= 20000),
deployed from the shared tiny run with an API key and two replicas of what holds the ranker; the
tests run in file order per topology and the last one restarts Serve.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from adrec.model_version import publish, read_version
from adrec.runtime import free_port
from adrec.serving.args import AppArgs
from adrec.serving.deploy import deploy, rollout, wait_healthy
from adrec.feedback.filelog import read_events
from benchmarks.loadtest import raw_user_ids

pytestmark = pytest.mark.ray

API_KEY = "test-api-key"
APP = "adrec-test"
SECRET_USER = "raw-user-never-logged-7f3a"




# The deployment whose replicas hold the ranker, per topology (what the fault and rollout tests watch).
RANKER_HOLDER = {"graph": "RankerDeployment", "fused": "Ingress"}


@pytest.fixture(scope="module", params=["graph", "fused"])
def served(request, ray_session, tiny_run, tiny_cfg, tmp_path_factory):
    from ray import serve

    topology = request.param
    tmp = tmp_path_factory.mktemp(f"serve-{topology}")
    v2 = publish(tiny_run, make_live=False).location.local_path  # a second version, for the rollout
    args = AppArgs(model_dir=str(tiny_run.model), pseudonym_key=tiny_cfg.data.pseudonym_key, api_key=API_KEY,
                   feedback_log=str(tmp / "feedback" / "events.jsonl"), port=free_port(), app_name=APP,
                   ranker_replicas=2, num_cpus_per_replica=0.1, max_body_bytes=8192, max_k=50, topology=topology,
                   # the shared 2-core machine: an explanation budget and a timeout that never cut a test short
                   explain_budget_ms=60_000, request_timeout_s=120)
    url = deploy(args)
    client = httpx.Client(base_url=url, headers={"x-api-key": API_KEY}, timeout=30)
    users = raw_user_ids(tiny_run)
    yield {"args": args, "url": url, "client": client, "users": users, "v2": v2, "run": tiny_run,
           "topology": topology, "holder": RANKER_HOLDER[topology]}
    client.close()
    serve.shutdown()


def _rec(client: httpx.Client, user: str, k: int = 5, **extra) -> httpx.Response:
    return client.post("/recommend", json={"user_id": user, "k": k, **extra})


def _replicas(deployment: str, app: str = APP) -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"{app}#{deployment}#" in a["name"]}


# ---- answers ---------------------------------------------------------------------------------------------
def _check_ranked(body: dict, k: int, version: str) -> None:
    items = body["items"]
    assert body["version"] == version
    assert len(items) == k
    assert [r["rank"] for r in items] == list(range(1, k + 1))
    assert all(0.0 < r["click_prob"] < 1.0 for r in items)
    # One field, one meaning: relevance is the two-stage re-ranker's score, present when it ordered the list.
    order = [r["relevance"] if body["ranked_by"] == "two_stage" else r["click_prob"] for r in items]
    assert order == sorted(order, reverse=True)
    assert all((r["relevance"] is None) == (body["ranked_by"] == "click_prob") for r in items)
    assert "score" not in items[0]
    assert len({r["item"] for r in items}) == k


def test_recommend_known_and_unknown_users(served):
    c = served["client"]
    version = read_version(served["run"].model)["version"]
    for user in served["users"][:3]:
        r = _rec(c, user, k=10)
        assert r.status_code == 200, r.text
        assert r.json()["user_id"] == user
        _check_ranked(r.json(), 10, version)
        assert r.json()["ranked_by"] == "two_stage"
    # A user the model never saw gets popular (per context) ads, ranked by their click probability.
    r = _rec(c, "someone-new", k=7, context={"slot": 1}, explain=True)
    assert r.status_code == 200, r.text
    _check_ranked(r.json(), 7, version)
    assert r.json()["ranked_by"] == "click_prob"
    assert all(item["sources"] == ["popularity"] for item in r.json()["items"])


def test_explain_returns_sources_because_and_attributions(served):
    r = _rec(served["client"], served["users"][0], k=3, explain=True, context={"slot": 2, "device": "mobile"})
    assert r.status_code == 200, r.text
    assert r.json()["explain_complete"] is True
    for item in r.json()["items"]:
        # (a) the two-stage recommender's sources (ease among them) for a known user
        assert item["sources"] and set(item["sources"]) <= {"als", "itemitem", "popularity", "text", "ease", "catalog"}
        # (b) history items by the ranker's attention (and by ALS where ALS proposed the item)
        liked = item["because_you_liked"]
        assert liked and {x["method"] for x in liked} <= {"attention", "als"}
        attention = [x["weight"] for x in liked if x["method"] == "attention"]
        assert attention == sorted(attention, reverse=True) and 0 < sum(attention) <= 1 + 1e-6
        assert ("als" in item["sources"]) == any(x["method"] == "als" for x in liked)
        # (c) Integrated Gradients by field: top 5 by |attribution|, with sign and share
        feats = item["features"]
        assert len(feats) == 5
        assert all({"feature", "kind", "attribution", "sign", "share"} <= set(f) for f in feats)
        assert all(f["sign"] == ("+" if f["attribution"] >= 0 else "-") for f in feats)
        assert [abs(f["attribution"]) for f in feats] == sorted((abs(f["attribution"]) for f in feats), reverse=True)
        assert 0 < sum(f["share"] for f in feats) <= 1 + 1e-6


def test_served_top10_is_the_in_process_two_stage_top10(served, tiny_cfg):
    from adrec.serving.recommender import Recommender

    rec = Recommender(served["run"].model, tiny_cfg.data.pseudonym_key.encode())
    assert rec.version.two_stage is not None, "the version carries the two-stage recommender"
    for user in served["users"][:4]:
        r = _rec(served["client"], user, k=10)
        assert r.status_code == 200, r.text
        local = rec.recommend(user, 10)
        assert [x["item"] for x in r.json()["items"]] == [x["item"] for x in local]
        assert [x["relevance"] for x in r.json()["items"]] == pytest.approx([x["relevance"] for x in local], rel=1e-5)
        # the order is the re-ranker's; the CTR ranker's click probability comes with it
        assert [x["click_prob"] for x in r.json()["items"]] == pytest.approx([x["click_prob"] for x in local], rel=1e-4)


def test_explain_degrades_to_sources_and_history_when_the_budget_is_spent(served, tiny_cfg):
    """In-process, the request code Serve runs: a zero budget leaves (a) and (b), without attributions."""
    from adrec.serving.recommender import Recommender
    from adrec.serving.request import Recommendation

    rec = Recommender(served["run"].model, tiny_cfg.data.pseudonym_key.encode())
    u = rec.user_index(served["users"][1])
    for budget, complete in ((0.0, False), (60_000.0, True)):
        req = Recommendation(rec, u, 4, {"slot": 1}, 100, explain=True)
        answer = req.run(lambda items: rec.rank(u, items, {"slot": 1}),
                         lambda items: rec.explain(u, items, {"slot": 1}, budget_ms=budget))
        assert answer["explain_complete"] is complete
        assert all(item["sources"] and item["because_you_liked"] for item in answer["items"])
        assert all((item["features"] is None) == (not complete) for item in answer["items"])
    # without explain, nothing of it is computed or answered
    plain = rec.recommend(served["users"][1], 4)
    assert all("features" not in item and "because_you_liked" not in item for item in plain)


def test_openapi_lists_every_endpoint_with_its_response_schema(served):
    """Serve's OpenAPI docs are on (no API key needed) and document each endpoint's answer."""
    spec = httpx.get(served["url"] + "/openapi.json", timeout=10)
    assert spec.status_code == 200, spec.text
    paths, schemas = spec.json()["paths"], spec.json()["components"]["schemas"]
    expected = {("/recommend", "post"): "RecommendResponse", ("/feedback", "post"): "FeedbackResponse",
                ("/healthz", "get"): "HealthResponse", ("/version", "get"): "VersionResponse"}
    for (path, method), model in expected.items():
        ok = paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{model}"}, (path, ok)
        assert schemas[model]["properties"], model
    assert {"click_prob", "relevance"} <= set(schemas["RecommendedItem"]["properties"])
    assert "score" not in schemas["RecommendedItem"]["properties"]
    assert all(f.get("description") for f in schemas["RecommendResponse"]["properties"].values())
    for path in ("/recommend", "/feedback"):  # the request bodies, parsed by hand, are documented too
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert body.rsplit("/", 1)[1] in schemas
    assert httpx.get(served["url"] + "/docs", timeout=10).status_code == 200


def test_health_and_version(served):
    c = served["client"]
    h = httpx.get(served["url"] + "/healthz", timeout=10)  # no API key needed for the health check
    assert h.status_code == 200 and h.json()["status"] == "ok"
    v = c.get("/version")
    assert v.status_code == 200
    assert v.json()["version"] == read_version(served["run"].model)["version"]
    assert v.json()["n_items"] > 0


# ---- hostile input ----------------------------------------------------------------------------------------
def _event(eid: str, item: str, user: str = "user00001", **kw) -> dict:
    return {"event_id": eid, "user_id": user, "item": item, "type": "click", "ts": time.time() - 60, **kw}


def _hostile_corpus(items: list[str]) -> list[tuple[str, str, str, dict, int]]:
    ok = {"user_id": "user00001", "k": 5}
    j = lambda body: {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}  # noqa: E731
    deep = b"[" * 4000 + b"]" * 4000
    big = {"user_id": "x" * 9000, "k": 5}

    def chunked():
        for _ in range(20):
            yield b" " * 1000

    return [
        # name, method, path, request kwargs, expected status
        ("missing user_id", "POST", "/recommend", j({"k": 5}), 422),
        ("missing k", "POST", "/recommend", j({"user_id": "u"}), 422),
        ("user_id is a number", "POST", "/recommend", j({"user_id": 17, "k": 5}), 422),
        ("user_id is null", "POST", "/recommend", j({"user_id": None, "k": 5}), 422),
        ("user_id empty", "POST", "/recommend", j({"user_id": "", "k": 5}), 422),
        ("user_id too long", "POST", "/recommend", j({"user_id": "u" * 300, "k": 5}), 422),
        ("k is a string", "POST", "/recommend", j({"user_id": "u", "k": "5"}), 422),
        ("k is a float", "POST", "/recommend", j({"user_id": "u", "k": 5.5}), 422),
        ("k is a bool", "POST", "/recommend", j({"user_id": "u", "k": True}), 422),
        ("k zero", "POST", "/recommend", j({"user_id": "u", "k": 0}), 422),
        ("k negative", "POST", "/recommend", j({"user_id": "u", "k": -3}), 422),
        ("k above max_k", "POST", "/recommend", j({"user_id": "u", "k": 51}), 422),
        ("k huge", "POST", "/recommend", j({"user_id": "u", "k": 10**30}), 422),
        ("extra field", "POST", "/recommend", j({**ok, "admin": True}), 422),
        ("context is a list", "POST", "/recommend", j({**ok, "context": ["a"]}), 422),
        ("context value nested", "POST", "/recommend", j({**ok, "context": {"slot": {"x": 1}}}), 422),
        ("context value float", "POST", "/recommend", j({**ok, "context": {"slot": 1.5}}), 422),
        ("explain is a string", "POST", "/recommend", j({**ok, "explain": "yes"}), 422),
        ("body is a list", "POST", "/recommend", j([ok]), 422),
        ("body is null", "POST", "/recommend", j(None), 422),
        ("body is a number", "POST", "/recommend", {"content": b"42"}, 422),
        ("empty body", "POST", "/recommend", {"content": b""}, 400),
        ("not JSON", "POST", "/recommend", {"content": b"user_id=u&k=5"}, 400),
        ("truncated JSON", "POST", "/recommend", {"content": b'{"user_id": "u", "k": '}, 400),
        ("NaN", "POST", "/recommend", {"content": b'{"user_id": "u", "k": NaN}'}, 400),
        ("not UTF-8", "POST", "/recommend", {"content": b'{"user_id": "\xff\xfe\xfa", "k": 5}'}, 400),
        ("UTF-16", "POST", "/recommend", {"content": json.dumps(ok).encode("utf-16")}, 400),
        ("lone surrogate escape", "POST", "/recommend", {"content": b'{"user_id": "\\udc80x", "k": 5}'}, 400),
        ("feedback: lone surrogate", "POST", "/feedback",
         {"content": json.dumps({"events": [_event("h-10", items[0], user="\ud800")]}).encode()}, 400),
        ("nested too deep", "POST", "/recommend", {"content": deep}, 400),
        ("oversized body", "POST", "/recommend", j(big), 413),
        ("oversized chunked body", "POST", "/recommend", {"content": chunked()}, 413),
        ("wrong method", "GET", "/recommend", {}, 405),
        ("unknown path", "POST", "/admin", j(ok), 404),
        ("feedback: unknown item", "POST", "/feedback", j({"events": [_event("h-1", "no-such-ad")]}), 422),
        ("feedback: one unknown item among known", "POST", "/feedback",
         j({"events": [_event("h-2", items[0]), _event("h-3", "no-such-ad")]}), 422),
        ("feedback: bad type", "POST", "/feedback", j({"events": [_event("h-4", items[0], type="purchase")]}), 422),
        ("feedback: missing event_id", "POST", "/feedback",
         j({"events": [{k: v for k, v in _event("h-5", items[0]).items() if k != "event_id"}]}), 422),
        ("feedback: ts a string", "POST", "/feedback", j({"events": [_event("h-6", items[0], ts="yesterday")]}), 422),
        ("feedback: ts negative", "POST", "/feedback", j({"events": [_event("h-7", items[0], ts=-1)]}), 422),
        ("feedback: ts in nanoseconds", "POST", "/feedback", j({"events": [_event("h-10", items[0], ts=time.time() * 1e9)]}), 422),
        ("feedback: ts far future", "POST", "/feedback", j({"events": [_event("h-11", items[0], ts=1e18)]}), 422),
        ("feedback: ts an hour ahead", "POST", "/feedback", j({"events": [_event("h-12", items[0], ts=time.time() + 3600)]}), 422),
        ("feedback: ts a year old", "POST", "/feedback", j({"events": [_event("h-13", items[0], ts=time.time() - 3.2e7)]}), 422),
        ("feedback: events empty", "POST", "/feedback", j({"events": []}), 422),
        ("feedback: events not a list", "POST", "/feedback", j({"events": {"a": 1}}), 422),
        ("feedback: extra field", "POST", "/feedback", j({"events": [_event("h-8", items[0], price=3)]}), 422),
        ("feedback: not JSON", "POST", "/feedback", {"content": b"click!"}, 400),
    ]


def test_hostile_corpus_gets_4xx_and_the_app_keeps_answering(served):
    c = served["client"]
    items = [r["item"] for r in _rec(c, served["users"][0], k=3).json()["items"]]
    before = {d: _replicas(d) for d in ("Ingress", "CandidateDeployment", "RankerDeployment", "FeedbackDeployment")}
    corpus = _hostile_corpus(items)
    got = {}
    for name, method, path, kwargs, _ in corpus:
        r = c.request(method, path, **kwargs)
        got[name] = r.status_code
        assert 400 <= r.status_code < 500, f"{name}: {r.status_code} {r.text[:200]}"
        detail = r.json().get("detail")
        assert isinstance(detail, str) and detail, f"{name}: no message in {r.text[:200]}"
    assert got == {name: status for name, _, _, _, status in corpus}

    # Authentication: the key is required on every endpoint but /healthz.
    anon = httpx.Client(base_url=served["url"], timeout=30)
    ok = {"user_id": "user00001", "k": 5}
    assert anon.post("/recommend", json=ok).status_code == 401
    assert anon.post("/recommend", json=ok, headers={"x-api-key": "wrong"}).status_code == 403
    assert anon.post("/recommend", json=ok, headers={"x-api-key": API_KEY + "x"}).status_code == 403
    assert anon.post("/feedback", json={"events": [_event("h-9", items[0])]}).status_code == 401
    assert anon.get("/version").status_code == 401
    assert "x-api-key" in anon.post("/recommend", json=ok).json()["detail"]
    anon.close()

    # Nothing the corpus sent reached the feedback log, no replica crashed, and the app still answers.
    assert not any(e["event_id"].startswith("h-") for e in read_events(served["args"].feedback_log))
    assert {d: _replicas(d) for d in before} == before
    assert _rec(c, served["users"][0], k=5).status_code == 200
    assert c.get("/healthz").status_code == 200


def test_raw_user_ids_never_reach_logs_or_the_feedback_log(served, ray_session):
    c = served["client"]
    item = _rec(c, served["users"][0], k=1).json()["items"][0]["item"]
    assert _rec(c, SECRET_USER, k=3).status_code == 200
    assert c.post("/recommend", json={"user_id": SECRET_USER, "k": "x"}).status_code == 422
    ack = c.post("/feedback", json={"events": [_event("priv-1", item, user=SECRET_USER)]})
    assert ack.status_code == 200 and ack.json()["accepted"] == 1
    time.sleep(1.0)  # let the replicas flush their log files
    logs = Path(ray_session._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = [p for p in logs.rglob("*") if p.is_file() and SECRET_USER.encode() in p.read_bytes()]
    assert not leaked, f"raw user id in {leaked}"
    text = Path(served["args"].feedback_log).read_text()
    assert SECRET_USER not in text
    rec = next(e for e in read_events(served["args"].feedback_log) if e["event_id"] == "priv-1")
    assert rec["user"].startswith("u_") and "user_id" not in rec


# ---- feedback --------------------------------------------------------------------------------------------
def test_feedback_is_logged_once_per_event_id(served):
    c = served["client"]
    items = [r["item"] for r in _rec(c, served["users"][1], k=3).json()["items"]]
    events = [_event(f"dup-{i}", items[i % len(items)], type="impression" if i % 2 else "click") for i in range(4)]
    first = c.post("/feedback", json={"events": events})
    assert first.status_code == 200 and first.json()["accepted"] == 4 and first.json()["duplicates"] == 0
    again = c.post("/feedback", json={"events": events[:2] + [_event("dup-4", items[0])]})
    assert again.status_code == 200
    assert again.json()["accepted"] == 1 and again.json()["duplicates"] == 2
    same_batch = c.post("/feedback", json={"events": [_event("dup-5", items[0]), _event("dup-5", items[1])]})
    assert same_batch.json()["accepted"] == 1 and same_batch.json()["duplicates"] == 1
    ids = Counter(e["event_id"] for e in read_events(served["args"].feedback_log))
    assert all(ids[f"dup-{i}"] == 1 for i in range(6))


# ---- strategy: objectives, exploration with logged propensities, A/B -----------------------------------
EXPLORE_APP = APP + "-explore"


def test_exploration_and_ab_log_propensities_and_arms(served, tiny_cfg, tmp_path):
    """A second app beside the first (same Serve, prefix /explore): expected value, exploration over a pool of
    3 (graph: epsilon-greedy, fused: Thompson) and an A/B split between the served version and v2. The
    propensities logged for a position's alternatives sum to one; every logged impression has its arm."""
    import numpy as np
    from adrec.config import ABConfig, ExplorationConfig
    from adrec.data.ids import normalize_id
    from adrec.data.privacy import pseudonymize
    from adrec.evaluation.abtest import ab_report
    from adrec.serving.abtest import ArmAssigner
    from ray import serve

    policy = "epsilon_greedy" if served["topology"] == "graph" else "thompson"
    ab = ABConfig(arms=[{"name": "control", "share": 0.5}, {"name": "treatment", "share": 0.5,
                                                             "model_dir": str(served["v2"])}], salt="it")
    log = tmp_path / "explore" / "events.jsonl"
    args = served["args"].model_copy(update={
        "app_name": EXPLORE_APP, "route_prefix": "/explore", "feedback_log": str(log), "ranker_replicas": 1,
        "objective": "expected_value", "pool": 3, "ab": ab,
        "exploration": ExplorationConfig(policy=policy, epsilon=0.5, thompson_strength=5.0, thompson_draws=100)})
    url = deploy(args)
    versions = {"control": read_version(served["run"].model)["version"], "treatment": read_version(served["v2"])["version"]}
    arm_of = ArmAssigner(ab)
    key = tiny_cfg.data.pseudonym_key.encode()
    by_arm: dict[str, str] = {}
    for user in served["users"]:
        by_arm.setdefault(arm_of(pseudonymize(normalize_id(user), key)), user)
        if len(by_arm) == 2:
            break
    try:
        with httpx.Client(base_url=url, headers={"x-api-key": API_KEY}, timeout=30) as c:
            answers = {arm: [_rec(c, user, k=2).json() for _ in range(30)] for arm, user in by_arm.items()}
            for arm, bodies in answers.items():
                for b in bodies:
                    assert (b["objective"], b["policy"], b["arm"], b["version"]) == \
                        ("expected_value", policy, arm, versions[arm]), b
                    assert b["ranked_by"] == "expected_value" and len(b["request_id"]) == 32
                    assert [it["position"] for it in b["items"]] == [0, 1]
                    assert all(0 < it["propensity"] <= 1 and it["bid"] is not None for it in b["items"])
                assert len({b["request_id"] for b in bodies}) == len(bodies)
                # Position 0 has the same 3 alternatives in every request of the user: each alternative's logged
                # propensity (its mean, for Thompson's estimates) over the alternatives sums to one.
                first: dict[str, list[float]] = {}
                for b in bodies:
                    first.setdefault(b["items"][0]["item"], []).append(b["items"][0]["propensity"])
                if policy == "epsilon_greedy":  # the best is drawn with 2/3, so 30 requests show 2+ items
                    assert 2 <= len(first) <= 3
                else:
                    # Thompson may put one item first with ~0.96: then 30 requests show it alone. What must hold
                    # is that each shown item's logged propensity matches how often it came first.
                    assert 1 <= len(first) <= 3
                    for ps in first.values():
                        assert len(ps) / len(bodies) == pytest.approx(float(np.mean(ps)), abs=0.3), first
                if len(first) == 3:
                    total = sum(float(np.mean(p)) for p in first.values())
                    assert total == pytest.approx(1.0, abs=1e-9 if policy == "epsilon_greedy" else 0.1), first
                if policy == "epsilon_greedy":  # exact: 1 - eps + eps/3 for the best, eps/3 for the others
                    assert sorted({round(p, 9) for ps in first.values() for p in ps}) in \
                        ([round(0.5 / 3, 9), round(0.5 + 0.5 / 3, 9)], [round(0.5 + 0.5 / 3, 9)])
                    # and the second position: 2 alternatives left, 1 - eps + eps/2 or eps/2
                    assert {round(b["items"][1]["propensity"], 9) for b in bodies} <= {0.25, 0.75}
            # The client reports what it showed; the server adds the arm (a client's own arm is refused).
            events = [{"event_id": f"x-{b['request_id']}-{it['position']}", "user_id": by_arm[arm], "item": it["item"],
                       "type": "impression", "ts": time.time() - 60, "position": it["position"],
                       "propensity": it["propensity"], "policy": b["policy"], "request_id": b["request_id"]}
                      for arm, bodies in answers.items() for b in bodies[:5] for it in b["items"]]
            ack = c.post("/feedback", json={"events": events})
            assert ack.status_code == 200 and ack.json()["accepted"] == len(events), ack.text
            click = {**events[0], "event_id": "x-click", "type": "click", "ts": time.time() - 30}
            for f in ("position", "propensity", "policy"):
                del click[f]
            assert c.post("/feedback", json={"events": [click]}).status_code == 200
            conversion = {**click, "event_id": "x-conv", "type": "conversion", "ts": time.time() - 20}
            assert c.post("/feedback", json={"events": [conversion]}).status_code == 200
            assert c.post("/feedback", json={"events": [{**events[0], "event_id": "x-arm", "arm": "treatment"}]}
                          ).status_code == 422
        logged = {e["event_id"]: e for e in read_events(log)}
        for e in events:
            rec = logged[e["event_id"]]
            arm = next(a for a, u in by_arm.items() if u == e["user_id"])
            assert (rec["arm"], rec["version"], rec["policy"], rec["request_id"]) == \
                (arm, versions[arm], policy, e["request_id"])
            assert rec["propensity"] == pytest.approx(e["propensity"]) and rec["position"] == e["position"]
        assert "arm" not in logged["x-click"] and "propensity" not in logged["x-click"]
        report = ab_report(read_events(log), arm_order=["control", "treatment"])
        clicked_arm = next(x for x, u in by_arm.items() if u == events[0]["user_id"])
        assert {a["arm"]: (a["impressions"], a["clicks"]) for a in report["arms"]} == \
            {a: (10, int(a == clicked_arm)) for a in by_arm}
        assert logged["x-conv"]["type"] == "conversion"  # through /feedback: the CVR of the clicked arm is 1/1
        assert {a["arm"]: a["conversions"] for a in report["arms"]} == {a: int(a == clicked_arm) for a in by_arm}
    finally:
        serve.delete(EXPLORE_APP)


def test_objective_table_orders_value_where_it_should(served, tiny_cfg):
    """In-process, the report's table on the tiny run: each greedy objective maximises its own quantity."""
    import numpy as np
    from adrec.config import ServeConfig
    from adrec.evaluation.objectives import objective_table
    from adrec.model_version import load_version

    if served["topology"] != "graph":
        pytest.skip("in-process only: checked once, with the graph app")
    version = load_version(served["run"].model)
    users = np.arange(40, dtype=np.int64)
    truth = [{int(version.seen[u].indices[0])} for u in users]  # any non-empty sets: NDCG is only reported
    metrics, body = objective_table(version, users, truth, len(version.items), 5, ServeConfig(pool=20), 100)
    m = {k.removeprefix("objective."): v for k, v in metrics.items()}
    assert m["expected_value.greedy.expected_revenue"] >= m["relevance.greedy.expected_revenue"] - 1e-9
    assert m["expected_value.greedy.expected_revenue"] >= m["expected_clicks.greedy.expected_revenue"] - 1e-9
    assert m["expected_clicks.greedy.expected_clicks"] >= m["relevance.greedy.expected_clicks"] - 1e-9
    assert m["expected_clicks.greedy.expected_clicks"] >= m["relevance.epsilon_greedy.expected_clicks"] - 1e-9
    assert m["expected_value.greedy.expected_revenue"] > m["relevance.greedy.expected_revenue"]  # bids matter
    assert {"relevance.thompson.ndcg@5", "relevance.epsilon_greedy.ndcg@5"} <= set(m)
    assert "expected revenue per list" in body


# ---- load: rollout and a killed replica ----------------------------------------------------------------
class _Load:
    """Closed-loop clients in threads, each sending requests until stopped; records every outcome."""

    def __init__(self, url: str, users: list[str], clients: int = 4):
        self.url, self.users, self.n = url, users, clients
        self.stop = threading.Event()
        # (status, version or error text, when the request was sent: time.monotonic())
        self.outcomes: list[tuple[int | str, str | None, float]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]

    def _loop(self, i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=self.url, headers={"x-api-key": API_KEY}, timeout=30) as c:
            while not self.stop.is_set():
                user = rng.choice(self.users) if rng.random() < 0.9 else f"new-{rng.random()}"
                sent = time.monotonic()
                try:
                    r = _rec(c, user, k=5)
                    out = (r.status_code, r.json().get("version") if r.status_code == 200 else r.text[:200], sent)
                except httpx.HTTPError as err:
                    out = (type(err).__name__, None, sent)
                with self.lock:
                    self.outcomes.append(out)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def count(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def wait_for(self, n: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count() < n and time.monotonic() < deadline:
            time.sleep(0.05)


def test_rollout_through_user_config_drops_no_request(served):
    old = read_version(served["run"].model)["version"]
    new = read_version(served["v2"])["version"]
    assert new != old
    rankers = _replicas(served["holder"])
    # Rolled out from a process whose own settings differ from the deployed app's (the learner's job, started
    # without the serve job's --set values): only the version changes, so no replica restarts (asserted below).
    stale = served["args"].model_copy(update={"request_timeout_s": served["args"].request_timeout_s + 1})
    with _Load(served["url"], served["users"]) as load:
        load.wait_for(20)
        assert rollout(stale, served["v2"]) == new
        done = time.monotonic()
        load.wait_for(load.count() + 30)
    outcomes = load.outcomes
    failures = [o for o in outcomes if o[0] != 200]
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed during the rollout: {failures[:5]}"
    versions = [v for _, v, _ in outcomes]
    assert versions[0] == old and versions[-1] == new
    # rollout() returns once every replica serves the new version: a request sent after that is answered by
    # the new one. (Requests sent before may still finish on the old one, however long they take under load;
    # before it returns, replicas swap one by one.)
    after = [v for _, v, sent in outcomes if sent > done]
    assert after and all(v == new for v in after), Counter(after)
    # A user_config change reconfigures the live replicas: none was restarted.
    assert _replicas(served["holder"]) == rankers
    assert served["client"].get("/version").json()["version"] == new


def test_a_version_that_fails_to_load_is_reported_and_the_live_one_keeps_serving(served, tmp_path):
    import shutil

    live = read_version(served["v2"])["version"]  # the rollout test left the app on v2
    from adrec.model_version.registry import MANIFEST, VersionIntegrityError, _manifest_of

    broken = publish(served["run"], make_live=False).location.local_path
    (broken / "ranker" / "model.pt").write_bytes(b"not a torch file")
    (broken / "features" / "items.parquet").write_bytes(b"not parquet either")  # the feedback writer reads it
    # Damaged after its commit: its checksums no longer hold, and the rollout refuses it before any replica.
    with pytest.raises(VersionIntegrityError, match="does not match its checksum"):
        rollout(served["args"], broken, timeout_s=120)
    # Committed as it is (the manifest matches the bad files): the replicas try it, fail, and keep serving.
    manifest = json.loads((broken / MANIFEST).read_text())
    (broken / MANIFEST).write_text(json.dumps(_manifest_of(broken, json.loads((broken / "version.json").read_text()),
                                                           manifest["writer"])))
    with pytest.raises(RuntimeError, match="could not load version"):
        rollout(served["args"], broken, timeout_s=120)
    r = _rec(served["client"], served["users"][0])
    assert r.status_code == 200 and r.json()["version"] == live
    # /feedback does not depend on the version: it answers, and still knows the items of the live one.
    item = r.json()["items"][0]["item"]
    fb = served["client"].post("/feedback", json={"events": [_event("broken-1", item)]})
    assert fb.status_code == 200 and fb.json()["accepted"] == 1, fb.text
    assert served["client"].post("/feedback", json={"events": [_event("broken-2", "no-such-ad")]}).status_code == 422
    # Back to the live version (replicas restarted later by the fault tests must find a loadable one).
    assert rollout(served["args"], served["v2"]) == live
    shutil.rmtree(broken)


@pytest.mark.slow_on_graph
def test_killed_ranker_replica_under_load(served):
    import ray
    from ray import serve

    holder = served["holder"]
    before = _replicas(holder)
    assert len(before) == 2
    victim = sorted(before)[0]
    with _Load(served["url"], served["users"]) as load:
        load.wait_for(40)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        n = load.count()
        load.wait_for(n + 200)
    outcomes = load.outcomes
    ok = sum(o[0] == 200 for o in outcomes)
    assert ok / len(outcomes) >= 0.99, f"only {ok}/{len(outcomes)} succeeded: {Counter(o[0] for o in outcomes)}"

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = _replicas(holder)
        status = serve.status().applications[APP].deployments[holder]
        if victim not in now and len(now) == 2 and status.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"{holder} did not come back to 2 running replicas: {_replicas(holder)}")
    assert _rec(served["client"], served["users"][0]).status_code == 200


def test_encoder_per_request_ranker_scores_like_the_cached_one(served, tiny_cfg):
    import numpy as np

    if served["topology"] != "graph":
        pytest.skip("in-process only: checked once, with the graph app")

    from adrec.serving.recommender import Recommender

    from benchmarks.serving import EncoderPerRequestRanker

    rec = Recommender(served["run"].model, tiny_cfg.data.pseudonym_key.encode())
    slow = EncoderPerRequestRanker(rec.ranker)
    for user in served["users"][:3]:
        u = rec.user_index(user)
        cand = rec.candidates(u, 50)
        rows = rec.version.rows(np.full(len(cand.items), u), cand.items)
        np.testing.assert_allclose(slow.predict(rows), rec.ranker.predict(rows), rtol=1e-4, atol=1e-6)
    assert rec.ranker.model.text.pooled.abs().sum() > 0  # the cache is back in place afterwards


def test_batched_scoring_equals_scoring_each_request(served):
    """A ranking batch (users, candidate lists and contexts mixed) scores each request as rank() alone does."""
    import numpy as np
    from adrec.serving.recommender import Recommender
    from adrec.serving.scoring import score_requests

    if served["topology"] != "graph":
        pytest.skip("in-process only: checked once, with the graph app")
    rec = Recommender(served["run"].model)
    users = [0, 1, -1, 0, 2]
    contexts = [{}, {"slot": "1"}, {"slot": "1", "device": "mobile"}, {"slot": "2"}, {}]
    items = [rec.candidates(u, 30, c).items[:n] for u, c, n in zip(users, contexts, [10, 30, 5, 10, 1])]
    res = score_requests(rec, users, items, contexts)
    assert not any("ctcvr" in r for r in res)  # a click-only ranker gives no pCTCVR
    got = [r["scores"] for r in res]
    for u, it, c, g in zip(users, items, contexts, got):
        np.testing.assert_allclose(g, rec.rank(u, it, c), rtol=1e-5, atol=1e-6)
    assert len({tuple(np.round(g[:5], 6)) for g in got[:2]}) == 2  # different users, different scores


@pytest.mark.slow_on_graph
def test_benchmark_smoke(served, tiny_cfg, tmp_path):
    from benchmarks.serving import run_benchmark, write_report

    t = served["topology"]
    report = run_benchmark({t: (served["url"], APP)}, served["v2"], tiny_cfg.data.pseudonym_key.encode(),
                           served["users"], requests=40, concurrency=(1, 4), encoder_requests=10, api_key=API_KEY,
                           warmup=8, repeats=2)
    paths = {(r["path"], r["concurrency"]) for r in report["results"]}
    assert paths == {(f"serve:{t}", 1), (f"serve:{t}", 4), ("inprocess", 1), ("encoder_per_request", 1)}
    assert len(report["runs"]) == 4  # two levels x two repeats; results hold their medians
    assert all(r["ok"] == r["requests"] for r in report["results"])
    assert report["top_k_agreement"][f"serve:{t}_vs_inprocess"] == "20/20"
    assert report["ratios"][f"serve:{t}_overhead_p50_c1"] > 0
    serve_c4 = next(r for r in report["results"] if r["path"] == f"serve:{t}" and r["concurrency"] == 4)
    assert serve_c4["requests"] == 80
    expected = {"graph": {"Ingress", "CandidateDeployment", "RankerDeployment"}, "fused": {"Ingress"}}[t]
    assert expected | {"haproxy", "client", "total"} <= set(serve_c4["cpu_ms"])  # the session Ray's ingress
    assert "CandidateDeployment" not in serve_c4["cpu_ms"] or t == "graph"
    js, md = write_report(report, tmp_path)
    assert json.loads(js.read_text())["ratios"] == report["ratios"]
    assert f"| serve:{t} | 4 |" in md.read_text()


@pytest.mark.slow_on_graph
def test_acknowledged_feedback_survives_a_serve_restart(served):
    """Runs last: it shuts Serve down and deploys the app again."""
    from ray import serve

    c = served["client"]
    item = _rec(c, served["users"][2], k=1).json()["items"][0]["item"]
    acked: set[str] = set()
    for b in range(5):
        events = [_event(f"dur-{b}-{i}", item, type="impression") for i in range(20)]
        r = c.post("/feedback", json={"events": events})
        assert r.status_code == 200
        acked |= {e["event_id"] for e in events}
    log_path = served["args"].feedback_log
    before = Counter(e["event_id"] for e in read_events(log_path))

    serve.shutdown()
    url = deploy(served["args"])
    wait_healthy(url)

    after = Counter(e["event_id"] for e in read_events(log_path))
    assert sum(1 for e in acked if after[e] == 1) == len(acked) == 100
    assert after == before
    # The index of seen ids was rebuilt from the log: a re-sent event is a duplicate, not a new line.
    with httpx.Client(base_url=url, headers={"x-api-key": API_KEY}, timeout=30) as c2:
        again = c2.post("/feedback", json={"events": [_event("dur-0-0", item, type="impression")]})
        assert again.status_code == 200 and again.json() == {"accepted": 0, "duplicates": 1, "duplicate_ids": ["dur-0-0"]}
    assert Counter(e["event_id"] for e in read_events(log_path)) == before
