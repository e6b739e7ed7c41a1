"""A pipeline step as a Ray job: `ray job submit --working-dir . -- python pipelines/prepare.py ...`.

The test starts its own `ray start --head` on 127.0.0.1 inside a private PID namespace
(`unshare -pf --mount-proc`, root only) with its own temp dir and ports, so it never meets another Ray
on this machine; when the namespace's first process exits, the kernel ends every process in it,
which stops exactly that cluster (no `ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(sys.platform != "linux" or shutil.which("unshare") is None or os.geteuid() != 0,
                       reason="needs Linux, root and unshare for a private PID namespace"),
]


def _free_ports(n: int, lo: int = 20000, hi: int = 29999) -> list[int]:
    import random

    rng = random.Random()
    out: list[int] = []
    while len(out) < n:
        p = rng.randint(lo, hi)
        if p in out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
        out.append(p)
    return out


def test_pipeline_step_runs_as_a_ray_job(tmp_path, request):
    step = ROOT / "pipelines" / "prepare.py"
    assert step.is_file(), "pipelines/prepare.py is the lead's entrypoint for `adrec prepare`"
    gcs, dash, client, mgr, objm, agent_grpc, agent_http, metrics, rtenv = _free_ports(9)
    wlo = _free_ports(1, 32000, 39000)[0]  # above Serve's direct-ingress ports (30000-31000)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths stay < 108 bytes
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    run = tmp_path / "run"
    bin_dir = Path(sys.executable).parent
    script = textwrap.dedent(f"""\
        set -u
        export PATH="{bin_dir}:$PATH" RAY_TMPDIR="{ray_tmp}" RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \\
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONUNBUFFERED=1
        unset RAY_ADDRESS
        cd "{ROOT}"
        timeout 120 ray start --head --node-ip-address=127.0.0.1 --port={gcs} --num-cpus=2 --temp-dir="{ray_tmp}" \\
            --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port={dash} \\
            --ray-client-server-port={client} --node-manager-port={mgr} --object-manager-port={objm} \\
            --dashboard-agent-grpc-port={agent_grpc} --dashboard-agent-listen-port={agent_http} \\
            --metrics-export-port={metrics} --runtime-env-agent-port={rtenv} \\
            --min-worker-port={wlo} --max-worker-port={wlo + 999} --disable-usage-stats || exit 90
        timeout 240 ray job submit --address=http://127.0.0.1:{dash} --working-dir . -- \\
            python pipelines/prepare.py --run "{run}" --dataset synthetic \\
            --set data.synthetic.n_users=40 --set data.synthetic.n_ads=20 --set data.synthetic.n_impressions=600 \\
            --set data.pseudonym_key=job-test
        rc=$?
        echo "JOB_EXIT=$rc"
        exit $rc
        """)
    (tmp_path / "cluster.sh").write_text(script)
    # The namespace's init is `bash`: when it exits, every process of this cluster is killed with it.
    proc = subprocess.run(["unshare", "-pf", "--mount-proc", "bash", str(tmp_path / "cluster.sh")],
                          capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 90, f"ray start failed:\n{out[-4000:]}"
    assert proc.returncode == 0 and "JOB_EXIT=0" in out, out[-6000:]
    assert "succeeded" in out.lower()
    inter = pd.read_parquet(run / "features" / "interactions.parquet")
    assert len(inter) == 600 and set(inter["split"]) <= {"train", "valid", "test"}
    # The cluster is gone with its namespace: no process of it survives.
    leftover = subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes of the test cluster still running: {leftover}"


def test_serve_deploy_config_to_a_running_cluster(tmp_path, request, tiny_run, tiny_cfg):
    """`serve deploy serve_apps/config.yaml` (model, key and port adapted) against a `ray start --head`.

    That cluster runs Serve's default ingress, the proxy actor (the session's Ray, which every test in
    test_serve.py uses, runs the HAProxy ingress): the app answers the same behind both.
    """
    import yaml

    conf = yaml.safe_load((ROOT / "serve_apps" / "config.yaml").read_text())
    gcs, dash, client, mgr, objm, agent_grpc, agent_http, metrics, rtenv, http = _free_ports(10)
    wlo = _free_ports(1, 32000, 39000)[0]  # above Serve's direct-ingress ports (30000-31000)
    conf["http_options"]["port"] = http
    app = conf["applications"][0]
    app["args"].update(model_dir=str(tiny_run.model), pseudonym_key=tiny_cfg.data.pseudonym_key,
                       feedback_log=str(tmp_path / "events.jsonl"))
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(conf))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    bin_dir = Path(sys.executable).parent
    user = pd.read_csv(tiny_run.raw / "impressions.csv", dtype=str)["user_id"].iloc[0]
    script = textwrap.dedent(f"""\
        set -u
        export PATH="{bin_dir}:$PATH" RAY_TMPDIR="{ray_tmp}" RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \\
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONUNBUFFERED=1 PYTHONPATH="{ROOT}" \\
               RAY_SERVE_ENABLE_HA_PROXY=0 RAY_SERVE_THROUGHPUT_OPTIMIZED=0
        unset RAY_ADDRESS
        cd "{ROOT}"
        timeout 120 ray start --head --node-ip-address=127.0.0.1 --port={gcs} --num-cpus=2 --temp-dir="{ray_tmp}" \\
            --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port={dash} \\
            --ray-client-server-port={client} --node-manager-port={mgr} --object-manager-port={objm} \\
            --dashboard-agent-grpc-port={agent_grpc} --dashboard-agent-listen-port={agent_http} \\
            --metrics-export-port={metrics} --runtime-env-agent-port={rtenv} \\
            --min-worker-port={wlo} --max-worker-port={wlo + 999} --disable-usage-stats || exit 90
        timeout 60 serve deploy "{tmp_path / 'serve.yaml'}" --address=http://127.0.0.1:{dash} || exit 91
        for i in $(seq 1 120); do
            curl -sf http://127.0.0.1:{http}/healthz && break
            sleep 1
        done
        echo
        curl -s -XPOST http://127.0.0.1:{http}/recommend -H 'content-type: application/json' \\
            -d '{{"user_id": "{user}", "k": 4}}' > "{tmp_path / 'answer.json'}"
        curl -s -o /dev/null -w 'BAD_K=%{{http_code}}\\n' -XPOST http://127.0.0.1:{http}/recommend \\
            -d '{{"user_id": "{user}", "k": 0}}'
        timeout 30 serve status --address=http://127.0.0.1:{dash}
        """)
    (tmp_path / "deploy.sh").write_text(script)
    proc = subprocess.run(["unshare", "-pf", "--mount-proc", "bash", str(tmp_path / "deploy.sh")],
                          capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (90, 91), out[-6000:]
    answer = (tmp_path / "answer.json").read_text()
    import json

    body = json.loads(answer) if answer.strip() else {}
    assert body.get("user_id") == user and len(body.get("items", [])) == 4, out[-6000:] + answer
    assert "BAD_K=422" in out
    assert "RUNNING" in out
