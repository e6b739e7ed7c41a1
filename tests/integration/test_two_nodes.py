"""The cluster walk-through on two Ray nodes that share nothing but the network and an S3 store.

- The store: moto's S3 server on 127.0.0.1, started by the test and stopped by its PID; the only storage
  the nodes share.
- The nodes: ``ray start --head`` and ``ray start --address`` on this machine, each in its own mount and
  PID namespace with a private tmpfs over /tmp (its HOME, Ray temp dir and adrec cache): nothing one
  node writes to its disk is visible to the other (tests/support/nodes.py).
- The commands: the README's cluster commands, each a ``ray job submit --working-dir .`` to the head:
  prepare -> candidates -> train on two workers (one per node) -> evaluate -> serve with the ingress
  replicas spread over both nodes -> /recommend through both -> the online learner on the worker node
  -> a retrain while serving -> the worker node is killed; the head keeps answering.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

from adrec.model_version.registry import materialize, registry_of
from adrec.runtime import free_port
from tests.support.nodes import Node, submit_job
from tests.support.s3 import S3Server

ROOT = Path(__file__).resolve().parents[2]  # the checkout the jobs submit (tests.support.nodes.ROOT)
BUCKET = "adrec-cluster"
RUN = f"s3://{BUCKET}/runs/r1"
KEY = "two-node-test-key"
API_KEY = "two-node-api-key"

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0 or not all(
        shutil.which(t) for t in ("unshare", "nsenter", "pgrep")),
        reason="needs Linux, root, unshare and nsenter for private mount and PID namespaces"),
]

# A small log and a tiny random BERT: the whole flow on two 1-CPU-per-stage nodes of a 2-core machine.
TINY = ["--set", "data.synthetic.n_users=200", "--set", "data.synthetic.n_ads=80",
        "--set", "data.synthetic.n_impressions=6000", "--set", "ranker.tiny_encoder=true",
        "--set", "ranker.epochs=1", "--set", "ranker.refit=false", "--set", "ranker.batch_size=256",
        "--set", "topk.enabled=false"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("two-nodes")
    s3 = S3Server(bucket=BUCKET).start(logs)
    env = {**s3.env, "ADREC_PSEUDONYM_KEY": KEY, "ADREC_API_KEY": API_KEY, "PYTHONUNBUFFERED": "1"}
    nodes: list[Node] = []
    try:
        head = Node("head", env, num_cpus=2, resources={"head_node": 1}).start(logs)
        nodes.append(head)
        worker = Node("worker", env, head_address=head.address, num_cpus=2, resources={"worker_node": 1}).start(logs)
        nodes.append(worker)
        yield {"s3": s3, "head": head, "worker": worker, "logs": logs}
    finally:
        for n in reversed(nodes):
            n.kill()
        s3.stop()


def _submit(cluster, step: str, *args: str, **kw) -> str:
    return submit_job(cluster["head"], step, *args, log_dir=cluster["logs"], **kw)


def _private_files(node: Node) -> list[str]:
    """Run artifacts on a node's private disk, outside its caches and Ray's own folders."""
    r = node.run("find /tmp -type f \\( -name '*.parquet' -o -name '*.npz' -o -name 'model.pt' -o -name "
                 "'version.json' -o -name 'metrics.json' -o -name 'state.pt' \\) "
                 "-not -path '/tmp/home/.cache/*' -not -path '/tmp/ray/*' 2>/dev/null")
    return [line for line in r.stdout.splitlines() if line]


def test_the_cluster_walkthrough_runs_on_two_nodes_sharing_only_the_store(cluster):
    from adrec import storage

    s3, head, worker = cluster["s3"], cluster["head"], cluster["worker"]
    os.environ.update(s3.env)  # this process reads the store too (the asserts)
    _submit(cluster, "prepare", "--run", RUN, "--dataset", "synthetic", *TINY)
    _submit(cluster, "candidates", "--run", RUN)
    # A local path where the nodes must share storage is refused before any work starts.
    out = _submit(cluster, "train_ranker", "--run", RUN, "--num-workers", "2", "--set",
                  "ranker.storage_path=/tmp/checkpoints", fails=True)
    assert "the Ray cluster has 2 nodes and the others cannot read this machine's disk" in out
    _submit(cluster, "train_ranker", "--run", RUN, "--num-workers", "2", "--set", "ranker.placement_strategy=STRICT_SPREAD")
    _submit(cluster, "evaluate", "--run", RUN)
    run = storage.resolve(RUN)
    manifest = (run / "manifest.json").read_json()
    assert set(manifest["stages"]) >= {"prepare", "candidates", "train", "evaluate"}
    train = manifest["stages"]["train"]
    assert train["num_workers"] == 2 and train["worker_nodes"] == 2, "one worker per node"
    assert train["ray_run"].startswith(f"{RUN}/ranker_train/"), "Ray Train's checkpoints on the store"
    assert (run / "report" / "metrics.json").read_json()["ctr.auc"] > 0.5
    versions = storage.resolve(f"{RUN}/versions")
    live = (versions / "LIVE.json").read_json()
    assert live["number"] == 1
    # Nothing of the run on either node's private disk (caches aside), nor in the submitted checkout.
    assert _private_files(head) == [] and _private_files(worker) == []
    assert not (ROOT / "runs" / "r1").exists() and not (ROOT / "s3:").exists()

    # Serve, the ingress replicas spread over both nodes (one per node), HTTP on the head.
    port = free_port()
    _submit(cluster, "serve", "--run", RUN, "--detach", "--set", f"serve.port={port}",
            "--set", "serve.proxy_location=HeadOnly", "--set", "serve.ranker_replicas=2",
            "--set", "serve.max_replicas_per_node=1", "--set", "serve.num_cpus_per_replica=0.3",
            "--set", "serve.feedback_replicas=2")
    url = f"http://127.0.0.1:{port}"
    headers = {"x-api-key": API_KEY}
    import io

    import pandas as pd

    raw = pd.read_csv(io.BytesIO((run / "raw" / "impressions.csv").read_bytes()), dtype=str)  # kept by prepare
    uids = raw["user_id"].drop_duplicates().head(8).tolist()
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        for _ in range(5):
            for u in uids:
                r = client.post("/recommend", json={"user_id": u, "k": 5})
                assert r.status_code == 200, r.text
                assert len(r.json()["items"]) == 5
        v = client.get("/version").json()
        assert v["version"] == live["version"]
    # Feedback through both writer replicas (one per node), the learner on the worker node.
    _submit(cluster, "online", "--run", RUN, "--rollout", "--set", "online.publish_every_events=400",
            "--set", "online.guard_min_events=50", "--set", "online.attribution_window_s=20",
            "--set", "online.guard_margin=10", resources={"worker_node": 1}, wait=False)
    events = _events(raw, n=1500)
    acked = _post_feedback(url, headers, events)
    assert len(acked) == len(events)
    served = _wait_for_new_version(url, headers, live["version"], timeout_s=420)
    writers = {k.split("/")[3] for k in s3.keys("runs/r1/feedback/") if k.endswith(".jsonl")}
    assert len(writers) == 2, f"both writer replicas wrote segments: {writers}"

    # The worker node goes away: every acknowledged event is on the store, and the head keeps answering.
    worker.kill()
    from adrec.feedback import open_log

    logged = [r["event_id"] for r in open_log(f"{RUN}/feedback").records()]
    assert set(acked) <= set(logged) and len(logged) == len(set(logged))
    ok = 0
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and ok < 10:
            r = client.post("/recommend", json={"user_id": uids[ok % len(uids)], "k": 5})
            ok = ok + 1 if r.status_code == 200 else 0
            time.sleep(0.2)
        assert client.get("/version").json()["version"] == served
    assert ok >= 10, "the head did not keep answering after the worker node was killed"

    # The learner's state is on the store: a learner on the head resumes it and reads every event once.
    _submit(cluster, "online", "--run", RUN, "--once", "--set", "online.attribution_window_s=20")
    from adrec.online.checkpoint import load_checkpoint

    state = load_checkpoint(f"{RUN}/online")
    assert state["records"] == len(logged), "each logged event consumed exactly once across the two learners"

    # Retrain while serving: a new version is committed; the served one and its files are untouched.
    reg = registry_of(RUN)
    served_entry = reg.find(served)
    before = (served_entry.location / "MANIFEST.json").read_bytes()
    _submit(cluster, "train_ranker", "--run", RUN, "--num-workers", "1", "--set", "ranker.placement_strategy=PACK",
            "--set", "ranker.seed=1")  # one node left
    assert reg.live().number > served_entry.number
    assert (served_entry.location / "MANIFEST.json").read_bytes() == before
    shutil.rmtree(storage.cache_root(), ignore_errors=True)
    materialize(served_entry.uri)  # a fresh copy: every checksum of the served version still holds
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        assert client.get("/version").json()["version"] == served
    assert _private_files(head) == []


def _events(raw, n: int) -> list[dict]:
    """Feedback events for ``n`` logged impressions, stamped over the last hour (inside Serve's window)."""
    from adrec.online.stream import feedback_events

    imp = raw.head(n).copy()
    imp["ts"] = time.time() - 3600 + (imp.reset_index().index.to_numpy() * 3000.0 / n)
    imp["clicked"] = imp["clicked"].astype(int)
    return feedback_events(imp, click_delay_s=(1.0, 5.0), prefix="two-node")


def _post_feedback(url: str, headers: dict, events: list[dict], batch: int = 25) -> list[str]:
    """POST the events at concurrency 4; the ids of every event an answer acknowledged (200)."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [events[i:i + batch] for i in range(0, len(events), batch)]

    def send(chunk):
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            for _ in range(5):
                r = client.post("/feedback", json={"events": chunk})
                if r.status_code == 200:
                    return [e["event_id"] for e in chunk]
                time.sleep(0.5)
        return []

    with ThreadPoolExecutor(4) as pool:
        return [i for ids in pool.map(send, chunks) for i in ids]


def _wait_for_new_version(url: str, headers: dict, old: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        while time.monotonic() < deadline:
            v = client.get("/version").json()["version"]
            if v != old:
                return v
            time.sleep(2)
    raise AssertionError(f"no version rolled out within {timeout_s:.0f}s (still {old})")
