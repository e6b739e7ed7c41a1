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

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from adrec.runtime import free_port
from tests.support.nodes import RAY_ENV, Node
from tests.support.s3 import S3Server

ROOT = Path(__file__).resolve().parents[2]
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


def _submit(cluster, step: str, *args: str, resources: dict | None = None, timeout_s: float = 600) -> str:
    """``ray job submit --working-dir . -- python pipelines/<step>.py ...`` against the head, as the README."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", f"--address={cluster['head'].dashboard}",
           "--working-dir", "."]
    if resources:
        cmd += ["--entrypoint-resources", json.dumps(resources)]
    cmd += ["--", "python", f"pipelines/{step}.py", *args]
    env = {**os.environ, **RAY_ENV}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    out = proc.stdout + proc.stderr
    (cluster["logs"] / f"job-{step}.log").write_text(out)
    assert proc.returncode == 0 and "succeeded" in out.lower(), f"{step} job failed:\n{out[-6000:]}"
    print(f"{step}: {time.monotonic() - t0:.0f}s")
    return out


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
    _submit(cluster, "train", "--run", RUN, "--num-workers", "2", "--set", "ranker.placement_strategy=STRICT_SPREAD")
    _submit(cluster, "evaluate", "--run", RUN)
    run = storage.resolve(RUN)
    manifest = (run / "manifest.json").read_json()
    assert set(manifest["stages"]) >= {"prepare", "candidates", "train", "evaluate"}
    train = (run / "ranker" / "ranker.json").read_json()
    assert train["info"]["num_workers"] == 2
    assert max(h.get("worker_nodes", 0) for h in train.get("history", [])) == 2, "one worker per node"
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
            "--set", "serve.max_replicas_per_node=1", "--set", "serve.num_cpus_per_replica=0.3")
    url = f"http://127.0.0.1:{port}"
    headers = {"x-api-key": API_KEY}
    users = [u for u in (run / "raw").files() if u.name.endswith(".csv")]
    assert users, "prepare keeps the raw log in the run"
    import io

    import pandas as pd

    raw = pd.read_csv(io.BytesIO((run / "raw" / users[0].name).read_bytes()), dtype=str)
    uids = raw["user_id"].drop_duplicates().head(8).tolist()
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        for _ in range(5):
            for u in uids:
                r = client.post("/recommend", json={"user_id": u, "k": 5})
                assert r.status_code == 200, r.text
                assert len(r.json()["items"]) == 5
        v = client.get("/version").json()
        assert v["version"] == live["version"]
    # Retrain while serving: a new version is committed, the live one is untouched.
    live_manifest = (versions / "000001" / "MANIFEST.json").read_bytes()
    _submit(cluster, "train", "--run", RUN, "--set", "ranker.seed=1")
    assert (versions / "000002" / "MANIFEST.json").is_file()
    assert (versions / "000001" / "MANIFEST.json").read_bytes() == live_manifest
    from adrec.model_version.registry import materialize

    materialize(f"{RUN}/versions/000001")  # every checksum of the served version still holds
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        assert client.get("/version").json()["version"] == live["version"]

    # The worker node goes away: the head keeps answering.
    worker.kill()
    ok = 0
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and ok < 10:
            r = client.post("/recommend", json={"user_id": uids[ok % len(uids)], "k": 5})
            ok = ok + 1 if r.status_code == 200 else 0
            time.sleep(0.2)
    assert ok >= 10, "the head did not keep answering after the worker node was killed"
