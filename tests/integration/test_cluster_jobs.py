"""A pipeline step as a Ray job: `ray job submit --working-dir . -- python pipelines/prepare.py ...`.

The test starts its own `ray start --head` on 127.0.0.1 inside a private PID namespace
(`unshare -pf --mount-proc`, root only) with its own temp dir and ports, so it never meets another Ray
on this machine; when the namespace's first process exits, the kernel ends every process in it,
which stops exactly that cluster (no `ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import json
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


class _Head:
    """A `ray start --head` on 127.0.0.1 with its own temp dir and ports, for a script run by :func:`_in_namespace`."""

    def __init__(self, request, prefix: str):
        (self.gcs, self.dash, self.client, self.mgr, self.objm, self.agent_grpc, self.agent_http, self.metrics,
         self.rtenv) = _free_ports(9)
        self.wlo = _free_ports(1, 32000, 39000)[0]  # above Serve's direct-ingress ports (30000-31000)
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Ray's socket paths stay < 108 bytes
        request.addfinalizer(lambda: shutil.rmtree(self.tmp, ignore_errors=True))
        self.dashboard = f"http://127.0.0.1:{self.dash}"

    def script(self, **env: str) -> str:
        """The script's start: environment (plus ``env``), cwd the checkout, the head up (exit 90 if not)."""
        extra = "".join(f' {k}="{v}"' for k, v in env.items())
        return textwrap.dedent(f"""\
            set -u
            export PATH="{Path(sys.executable).parent}:$PATH" RAY_TMPDIR="{self.tmp}" RAY_AUTH_MODE=disabled \\
                   RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONUNBUFFERED=1{extra}
            unset RAY_ADDRESS
            cd "{ROOT}"
            timeout 120 ray start --head --node-ip-address=127.0.0.1 --port={self.gcs} --num-cpus=2 \\
                --temp-dir="{self.tmp}" --include-dashboard=true --dashboard-host=127.0.0.1 \\
                --dashboard-port={self.dash} --ray-client-server-port={self.client} --node-manager-port={self.mgr} \\
                --object-manager-port={self.objm} --dashboard-agent-grpc-port={self.agent_grpc} \\
                --dashboard-agent-listen-port={self.agent_http} --metrics-export-port={self.metrics} \\
                --runtime-env-agent-port={self.rtenv} --min-worker-port={self.wlo} \\
                --max-worker-port={self.wlo + 999} --disable-usage-stats || exit 90
            """)

    def assert_gone(self) -> None:
        """The cluster is gone with its namespace: no process of it survives."""
        leftover = subprocess.run(["pgrep", "-f", str(self.tmp)], capture_output=True, text=True).stdout.split()
        assert not leftover, f"processes of the test cluster still running: {leftover}"


def _in_namespace(script: str, path: Path, timeout: int = 420) -> tuple[int, str]:
    """Run ``script`` as the first process of a private PID namespace: when it exits, the kernel ends every
    process in it (the cluster it started); returns the exit status and stdout + stderr."""
    path.write_text(script)
    proc = subprocess.run(["unshare", "-pf", "--mount-proc", "bash", str(path)], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


# make test-all: in make test every stage of the two-node acceptance test is such a job.
@pytest.mark.slow
def test_pipeline_step_runs_as_a_ray_job(tmp_path, request):
    step = ROOT / "pipelines" / "prepare.py"
    assert step.is_file(), "pipelines/prepare.py is the lead's entrypoint for `adrec prepare`"
    head = _Head(request, "rj")
    run = tmp_path / "run"
    script = head.script() + textwrap.dedent(f"""\
        timeout 240 ray job submit --address={head.dashboard} --working-dir . -- \\
            python pipelines/prepare.py --run "{run}" --dataset synthetic \\
            --set data.synthetic.n_users=40 --set data.synthetic.n_ads=20 --set data.synthetic.n_impressions=600 \\
            --set data.pseudonym_key=job-test
        rc=$?
        echo "JOB_EXIT=$rc"
        exit $rc
        """)
    rc, out = _in_namespace(script, tmp_path / "cluster.sh")
    assert rc != 90, f"ray start failed:\n{out[-4000:]}"
    assert rc == 0 and "JOB_EXIT=0" in out, out[-6000:]
    assert "succeeded" in out.lower()
    inter = pd.read_parquet(run / "features" / "interactions.parquet")
    assert len(inter) == 600 and set(inter["split"]) <= {"train", "valid", "test"}
    # The cluster is gone with its namespace: no process of it survives.
    head.assert_gone()


# In `make test-all`: the two-node walkthrough deploys through a job in the default run.
@pytest.mark.slow
def test_serve_deploy_config_to_a_running_cluster(tmp_path, request, tiny_run, tiny_cfg):
    """`serve deploy serve_apps/config.yaml` (model, key and port adapted) against a `ray start --head`.

    That cluster runs Serve's default ingress, the proxy actor (the session's Ray, which every test in
    test_serve.py uses, runs the HAProxy ingress): the app answers the same behind both.
    """
    import yaml

    conf = yaml.safe_load((ROOT / "serve_apps" / "config.yaml").read_text())
    http = _free_ports(1)[0]
    conf["http_options"]["port"] = http
    app = conf["applications"][0]
    app["args"].update(model_dir=str(tiny_run.model), pseudonym_key=tiny_cfg.data.pseudonym_key,
                       feedback_log=str(tmp_path / "events.jsonl"))
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(conf))
    head = _Head(request, "rs")
    user = pd.read_csv(tiny_run.raw / "impressions.csv", dtype=str)["user_id"].iloc[0]
    script = head.script(PYTHONPATH=str(ROOT), RAY_SERVE_ENABLE_HA_PROXY="0",
                         RAY_SERVE_THROUGHPUT_OPTIMIZED="0") + textwrap.dedent(f"""\
        timeout 60 serve deploy "{tmp_path / 'serve.yaml'}" --address={head.dashboard} || exit 91
        for i in $(seq 1 120); do
            curl -sf http://127.0.0.1:{http}/healthz && break
            sleep 1
        done
        echo
        curl -s -XPOST http://127.0.0.1:{http}/recommend -H 'content-type: application/json' \\
            -d '{{"user_id": "{user}", "k": 4}}' > "{tmp_path / 'answer.json'}"
        curl -s -o /dev/null -w 'BAD_K=%{{http_code}}\\n' -XPOST http://127.0.0.1:{http}/recommend \\
            -d '{{"user_id": "{user}", "k": 0}}'
        timeout 30 serve status --address={head.dashboard}
        """)
    rc, out = _in_namespace(script, tmp_path / "deploy.sh")
    assert rc not in (90, 91), out[-6000:]
    answer = (tmp_path / "answer.json").read_text()
    import json

    body = json.loads(answer) if answer.strip() else {}
    assert body.get("user_id") == user and len(body.get("items", [])) == 4, out[-6000:] + answer
    assert "BAD_K=422" in out
    assert "RUNNING" in out


PROBE = '''\
"""Where the job's driver and a Ray task found adrec (a forwarder's first lines, then one task)."""
import json
import sys
from pathlib import Path

import _checkout  # noqa: F401
import adrec
from adrec.cli import build_parser
from adrec.runtime import init_ray

ray = init_ray()


@ray.remote
def where():
    import adrec

    return adrec.__file__, Path(adrec.__file__).with_name("SUBMITTED").read_text()


worker, mark = ray.get(where.remote())
print("WHERE=" + json.dumps({"driver": adrec.__file__, "worker": worker, "mark": mark,
                           "run": build_parser().parse_args(["train", *sys.argv[1:]]).run}))
'''


# In `make test-all`: the two-node walkthrough's jobs run the submitted checkout in the default run.
@pytest.mark.slow
def test_a_job_runs_the_code_it_was_submitted_with(tmp_path, request):
    """`ray job submit --working-dir` of a checkout whose adrec differs from the node's: the job's driver and
    its Ray workers import the submitted adrec, although the node's PYTHONPATH names another one (as
    cluster.yaml's nodes do); and `--run '$ADREC_STORE/...'` (single quotes: `ray job submit` passes it on
    as typed) names the bucket the nodes were given, as the README's commands do."""
    work = tmp_path / "checkout"
    shutil.copytree(ROOT / "platform" / "adrec", work / "platform" / "adrec",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (work / "platform" / "adrec" / "SUBMITTED").write_text(mark := f"submitted-{os.getpid()}")
    (work / "pipelines").mkdir()
    shutil.copy(ROOT / "pipelines" / "_checkout.py", work / "pipelines")
    (work / "pipelines" / "where.py").write_text(PROBE)
    head = _Head(request, "rc")
    node_adrec = f"{ROOT / 'platform'}:{ROOT}"  # the node's own copy, first on its path
    script = head.script(PYTHONPATH=node_adrec, ADREC_STORE="s3://bucket-x/adrec") + textwrap.dedent(f"""\
        cd "{work}"
        timeout 180 ray job submit --address={head.dashboard} --working-dir . -- \\
            python pipelines/where.py --run '$ADREC_STORE/runs/r1' || exit 91
        unset ADREC_API_KEY
        timeout 60 serve deploy "{_open_serve_config(tmp_path)}" --address={head.dashboard} || exit 92
        for i in $(seq 1 60); do
            timeout 30 serve status --address={head.dashboard} > "{tmp_path / 'status.txt'}"
            grep -q DEPLOY_FAILED "{tmp_path / 'status.txt'}" && break
            sleep 1
        done
        """)
    rc, out = _in_namespace(script, tmp_path / "where.sh", timeout=300)
    assert rc not in (90, 91, 92) and rc == 0, out[-6000:]
    # Clients reach a cluster's Serve beyond loopback: without an API key the app is refused before it is built.
    status = (tmp_path / "status.txt").read_text()
    assert "DEPLOY_FAILED" in status and "without an API key" in status, status[-3000:]
    where = json.loads(next(line for line in out.splitlines() if line.startswith("WHERE="))[len("WHERE="):])
    driver, worker = Path(where["driver"]), Path(where["worker"])
    # Both inside what Ray unpacked for this job on the node, never the node's copy (nor the test's tree).
    for path in (driver, worker):
        assert path.is_relative_to(head.tmp) and "runtime_resources" in path.parts, where
        assert not path.is_relative_to(ROOT), where
    assert "working_dir_files" in driver.parts and driver.parts[-3:] == ("platform", "adrec", "__init__.py")
    assert "py_modules_files" in worker.parts and worker.parts[-2:] == ("adrec", "__init__.py")
    assert where["mark"] == mark
    assert where["run"] == "s3://bucket-x/adrec/runs/r1"
    head.assert_gone()


def _open_serve_config(tmp_path: Path) -> Path:
    """serve_apps/config.cluster.yaml (it listens on every interface) on a free port, with no API key anywhere
    (and no model: the refusal must come before the app reads one)."""
    import yaml

    conf = yaml.safe_load((ROOT / "serve_apps" / "config.cluster.yaml").read_text())
    assert conf["http_options"]["host"] == "0.0.0.0"
    conf["http_options"]["port"] = _free_ports(1)[0]
    conf["applications"][0]["args"].update(model_dir=str(tmp_path / "no-model"), pseudonym_key="k")
    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path
