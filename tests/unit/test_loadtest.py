"""The serving benchmark's bookkeeping without Ray: target names, ratios, the target check, the table."""

from __future__ import annotations

from dataclasses import asdict

from benchmarks.loadtest import LoadResult, summarize
from benchmarks.serving import markdown, ratios, target_check, topology_of


def _res(name: str, c: int, p99: float, cpu: float) -> LoadResult:
    r = summarize(f"serve:{name}", c, [p99 / 1000.0] * 10, 10, 1.0)
    r.cpu_ms = {"replica": cpu - 1.0, "client": 1.0, "total": cpu}
    return r


def _fixture():
    targets = ["graph@haproxy", "fused@haproxy", "floor@haproxy", "graph@proxy", "fused@proxy", "floor@proxy"]
    cpu = {"graph@haproxy": 16.0, "fused@haproxy": 5.0, "floor@haproxy": 2.0, "graph@proxy": 24.0,
           "fused@proxy": 15.0, "floor@proxy": 9.0}
    results = [_res(t, c, p99=cpu[t] * 8 * (1 if c == 8 else 0.3), cpu=cpu[t]) for c in (1, 8) for t in targets]
    inproc = summarize("inprocess", 1, [0.004] * 10, 10, 0.04)
    inproc.cpu_ms = {"total": 4.0}
    enc = summarize("encoder_per_request", 1, [0.32] * 10, 10, 3.2)
    enc.cpu_ms = {"total": 320.0}
    return targets, results, inproc, enc


def test_topology_of_a_target_name():
    assert topology_of("fused@haproxy") == "fused" and topology_of("graph") == "graph"


def test_ratios_pair_topologies_on_one_ingress_and_ingresses_for_one_topology():
    targets, results, inproc, enc = _fixture()
    r = ratios(targets, results, inproc, enc, (1, 8))
    assert r["encoder_per_request_over_cached_cpu"] == 80.0
    assert r["graph_over_fused@haproxy_cpu_c8"] == round(16 / 5, 2)
    assert r["graph_over_fused@proxy_cpu_c8"] == round(24 / 15, 2)
    assert r["fused:proxy_over_haproxy_cpu_c8"] == 3.0
    assert r["floor:proxy_over_haproxy_cpu_c1"] == 4.5
    # graph/fused only on one ingress; proxy/haproxy only for one topology
    pairs = {k.rsplit("_", 2)[0] for k in r if "_over_" in k and not k.startswith(("encoder", "serve:"))}
    assert pairs == {"graph_over_fused@haproxy", "graph_over_fused@proxy", "graph:proxy_over_haproxy",
                     "fused:proxy_over_haproxy", "floor:proxy_over_haproxy"}
    assert r["serve:fused@haproxy_cpu_over_inprocess_cpu_c1"] == 1.0  # (5 - 1 client) / 4


def test_target_check_marks_the_floor_and_judges_each_app():
    targets, results, *_ = _fixture()
    t = target_check(targets, results)
    assert t["serve:fused@haproxy"] == {"p99_ms": 40.0, "met": True}
    assert t["serve:fused@proxy"] == {"p99_ms": 120.0, "met": False}
    assert t["serve:floor@proxy"]["floor"] is True and "met" not in t["serve:floor@proxy"]


def test_markdown_lists_every_path_and_the_verdicts():
    targets, results, inproc, enc = _fixture()
    report = {"model_version": "v", "n_items": 3, "k": 10, "repeats": 1,
              "results": [asdict(r) for r in results + [inproc, enc]],
              "ratios": ratios(targets, results, inproc, enc, (1, 8)), "target": target_check(targets, results),
              "top_k_agreement": {"serve:fused@haproxy_vs_inprocess": "20/20"}}
    md = markdown(report)
    for name in targets:
        assert f"| serve:{name} | 8 |" in md
    assert "fused@haproxy: cost of Serve" in md and "target < 100 ms: met" in md and "not met" in md
    assert "floor@proxy: cost of Serve" in md and "(no model)" in md
    assert "CPU per request, graph / fused: haproxy c1 3.2x, haproxy c8 3.2x, proxy c1 1.6x" in md
    assert "CPU per request, proxy actor / HAProxy: graph c1 1.5x, graph c8 1.5x, fused c1 3.0x" in md


def test_closed_loop_counts_every_answer_and_never_exceeds_its_clients():
    """A real HTTP server on 127.0.0.1: ``closed_loop`` sends exactly n requests, at most c at once, and
    counts each status; ``http_load`` summarizes the same run."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from benchmarks.loadtest import closed_loop, http_load

    lock = threading.Lock()
    seen = {"now": 0, "max": 0, "users": []}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the load client expects

        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                seen["now"] += 1
                seen["max"] = max(seen["max"], seen["now"])
                seen["users"].append(body["user_id"])
            threading.Event().wait(0.005)  # long enough for the clients to overlap
            with lock:
                seen["now"] -= 1
            code = 503 if body["user_id"] == "busy" else 200
            out = b"{}"
            self.send_response(code)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/recommend"
    bodies = [{"user_id": "a"}, {"user_id": "b"}, {"user_id": "busy"}]
    try:
        latencies, statuses, seconds = closed_loop(url, bodies, concurrency=3, n_requests=30)
        assert len(latencies) == 30 and all(t > 0 for t in latencies) and seconds > 0
        assert statuses == {"200": 20, "503": 10}  # bodies are cycled: every third is "busy"
        assert sorted(seen["users"]) == sorted(["a", "b", "busy"] * 10)
        assert 1 <= seen["max"] <= 3
        res = http_load(url, bodies, concurrency=2, n_requests=9)
        assert (res.requests, res.ok, res.statuses) == (9, 6, {"200": 6, "503": 3})
        assert res.p50_ms <= res.p99_ms and res.success_rate == 6 / 9
    finally:
        server.shutdown()
        server.server_close()
