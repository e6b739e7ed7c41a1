"""Ray nodes on this machine that share nothing but the network and an object store, for cluster tests.

Each :class:`Node` is a real ``ray start`` in its own mount and PID namespace (``unshare``, as root): a
private tmpfs is mounted over ``/tmp`` there, and the node's ``HOME``, ``RAY_TMPDIR`` and adrec's cache
live under it, so nothing a node writes to "its disk" is visible to the other node or to the test. Killing
the namespace's first process (:meth:`Node.kill`) ends every process of the node at once, like a machine
that goes away. :meth:`Node.run` runs a command inside the node's namespaces (``nsenter``), e.g. to look
at its private disk. :func:`submit_job` runs a pipeline step as the README's ``ray job submit
--working-dir .`` against a head node (the two-node acceptance test and ``benchmarks/online_nodes.py``).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from adrec.runtime import free_port

#: The checkout a job submits as its working dir (this file is tests/support/nodes.py).
ROOT = Path(__file__).resolve().parents[2]


def node_ip() -> str:
    """This machine's address as Ray sees it with clusters enabled (what its nodes register with)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 1))  # no packet is sent: this only picks the outgoing interface
        return s.getsockname()[0]

#: What every process of a test cluster agrees on (see shared/notes: auth, usage stats). Multi-node needs
#: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 (at 0 `ray start --address` refuses a second node); Ray then resolves
#: 127.0.0.1 to the machine's own address, so the nodes use that (``NODE_IP``) to reach each other.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           # A raylet waits this long for its dashboard agent to report its ports (default 30 s here: a
           # loaded 2-core machine took longer, and the raylet then aborts the node's start).
           "RAY_agent_register_timeout_ms": "180000"}


@dataclass
class Node:
    name: str
    env: dict
    head_address: str | None = None  # None: this node is the head
    num_cpus: float = 2
    resources: dict = field(default_factory=dict)
    tmpfs_mb: int = 3072
    gcs_port: int = 0
    dashboard_port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def is_head(self) -> bool:
        return self.head_address is None

    @property
    def address(self) -> str:
        return f"{node_ip()}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, log_dir: Path, timeout_s: float = 180.0, attempts: int = 3) -> "Node":
        """Start the node; ``ray start`` gives a node 30 s (hard-coded in Ray 2.60) to register, which a loaded
        2-core machine can miss: a failed start is retried on fresh ports."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start(log_dir, timeout_s)
            except RuntimeError:
                self.kill()
                if attempt == attempts:
                    raise
                self.gcs_port = self.dashboard_port = 0
                time.sleep(5)
        return self

    def _start(self, log_dir: Path, timeout_s: float) -> "Node":
        bin_dir = Path(sys.executable).parent
        # Every port of its own: two nodes on one address would otherwise both take Ray's fixed defaults
        # (the dashboard agent's 52365, for one). Worker ports above Serve's direct-ingress range.
        wlo = free_port(40000, 59000)
        ports = {p: free_port() for p in ("node-manager-port", "object-manager-port", "dashboard-agent-grpc-port",
                                          "dashboard-agent-listen-port", "metrics-export-port",
                                          "runtime-env-agent-port")}
        args = [str(bin_dir / "ray"), "start", "--block", f"--node-ip-address={node_ip()}",
                f"--num-cpus={self.num_cpus}", f"--resources={json.dumps(self.resources)}", "--disable-usage-stats",
                *(f"--{k}={v}" for k, v in ports.items()), f"--min-worker-port={wlo}", f"--max-worker-port={wlo + 999}"]
        if self.is_head:
            self.gcs_port = self.gcs_port or free_port()
            self.dashboard_port = self.dashboard_port or free_port()
            args += ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                     f"--ray-client-server-port={free_port()}"]
        else:
            args += [f"--address={self.head_address}"]
        env = {**os.environ, **RAY_ENV, **self.env, "HOME": "/tmp/home", "RAY_TMPDIR": "/tmp/ray",
               "ADREC_CACHE_DIR": "/tmp/home/.cache/adrec", "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
        script = (f"mount -t tmpfs -o size={self.tmpfs_mb}m tmpfs /tmp && mkdir -p /tmp/home /tmp/ray && "
                  f"exec {shlex.join(args)}")
        self.log_path = Path(log_dir) / f"node-{self.name}.log"
        out = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc",
             "--kill-child=SIGKILL", "bash", "-c", script],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        marker = "Ray runtime started"
        while marker not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {self.name} did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        return self

    def _inner_pid(self) -> int:
        """The PID (outside) of the node's first process inside its namespaces (the child of unshare)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        return int(out[0])

    def run(self, command: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        """Run ``command`` (bash) inside this node's mount namespace: it sees the node's private /tmp."""
        return subprocess.run(["nsenter", "-t", str(self._inner_pid()), "-m", "bash", "-c", command],
                              capture_output=True, text=True, timeout=timeout_s)

    def kill(self) -> None:
        """End every process of the node at once (its PID namespace goes with its first process)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.kill(self._inner_pid(), signal.SIGKILL)
        except (IndexError, ProcessLookupError, ValueError):
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def submit_job(head: Node, step: str, *args: str, log_dir: Path, resources: dict | None = None,
               timeout_s: float = 600, wait: bool = True, fails: bool = False) -> str:
    """``ray job submit --working-dir . -- python pipelines/<step>.py ...`` against ``head``, as the README.

    The output is kept in ``log_dir/job-<step>.log``; it raises AssertionError when the job failed (or, with
    ``fails``, when it did not). ``wait=False`` returns once the job is submitted (its output names its id:
    :func:`job_id`); ``resources``: the job's entrypoint resources (e.g. ``{"worker_node": 1}`` puts its
    driver on the node started with that resource)."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", f"--address={head.dashboard}",
           "--working-dir", "."]
    if resources:
        cmd += ["--entrypoint-resources", json.dumps(resources)]
    if not wait:
        cmd += ["--no-wait"]
    cmd += ["--", "python", f"pipelines/{step}.py", *args]
    env = {**os.environ, **RAY_ENV}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    out = proc.stdout + proc.stderr
    (Path(log_dir) / f"job-{step}.log").write_text(out)
    if fails:
        assert proc.returncode != 0, f"{step} job should have failed:\n{out[-6000:]}"
        return out
    assert proc.returncode == 0 and (not wait or "succeeded" in out.lower()), f"{step} job failed:\n{out[-6000:]}"
    print(f"{step}: {time.monotonic() - t0:.0f}s")
    return out


def job_id(submit_output: str) -> str:
    """The id of the job a :func:`submit_job` output names (``Job 'raysubmit_...' submitted successfully``)."""
    import re

    m = re.search(r"Job '([^']+)' submitted successfully", submit_output)
    if m is None:
        raise ValueError(f"no job id in the output of ray job submit:\n{submit_output[-2000:]}")
    return m.group(1)


def job_command(head: Node, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """``ray job <args>`` (``stop ID``, ``logs ID``, ``status ID``) against ``head``."""
    env = {**os.environ, **RAY_ENV}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(Path(sys.executable).parent / "ray"), "job", args[0], f"--address={head.dashboard}",
                           *args[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
