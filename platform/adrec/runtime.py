"""Starting (or joining) Ray the same way from the CLI, the pipelines and the tests."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from adrec.config import RayConfig

log = logging.getLogger(__name__)


def ray_env_defaults() -> None:
    # Measured here: with token auth on by default, `ray job submit` / `serve deploy` get 401 unless
    # every process agrees. Local development runs without it; a cluster sets RAY_AUTH_MODE itself.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray Train V2 reports and checkpoints through ray.train.report; keep its console output short.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def free_port(lo: int = 20000, hi: int = 29999) -> int:
    """A free TCP port on 127.0.0.1 above Ray's worker port range (10002-19999), for tests and benchmarks."""
    import random
    import socket

    rng = random.Random()
    for _ in range(500):
        port = rng.randint(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {lo}-{hi}")


# Serve reads these when its controller and replicas start, so they are set for the processes of a Ray
# that adrec starts (a cluster started elsewhere is configured where it starts: see cluster.yaml).
HAPROXY_ENV = {
    # HAProxy listens on Serve's HTTP port and forwards to each ingress replica's own HTTP server:
    # no Python proxy actor on the request path (measured here: that hop cost ~4 ms of CPU per request).
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Serve's high-throughput bundle: user code on the replica's event loop, buffered request logs,
    # gRPC between deployments, the GC frozen after start-up.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
}
PROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}


def serve_ingress_env(mode: str) -> dict[str, str]:
    """Environment for the processes of a local Ray whose Serve ingress is ``mode`` ("haproxy" or "proxy")."""
    if mode == "proxy":
        return dict(PROXY_ENV)
    env = dict(HAPROXY_ENV)
    # HAProxy's stats and Prometheus listeners default to fixed ports (8404, 9101) on every interface:
    # two local Rays (tests, a benchmark, the demo) would collide, so each gets free ones, unless set.
    # Their bind address has no knob (Ray 2.x: `bind *:<stats_port>` and `bind :<metrics_port>` in
    # ray/serve/_private/haproxy_templates.py, ports only from RAY_SERVE_HAPROXY_STATS_PORT /
    # RAY_SERVE_HAPROXY_METRICS_PORT): on any machine reachable from others they must be firewalled
    # (README, "Security"); tests/unit/test_secrets.py notices when Ray adds one.
    for var in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        port = os.environ.get(var)
        while not port or port in env.values():  # two random picks may coincide
            port = str(free_port())
        env[var] = port
    # A draining ingress replica waits this long for external load balancers to notice (30 s by
    # default, which also holds up every `serve.shutdown()`); a local Ray has none besides its own HAProxy.
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = os.environ.get(
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    env["RAY_SERVE_HAPROXY_NBTHREAD"] = str(haproxy_threads())
    # Ray replays a request on another replica only when the connection failed (nothing sent), because a
    # POST may not be safe to run twice. adrec's are: /recommend only reads and /feedback keeps one line
    # per event_id. So a request in flight on a replica that dies (an empty response) is replayed too:
    # measured with a replica killed under load, 3 of 255 requests failed without this.
    env["RAY_SERVE_HAPROXY_RETRY_ON"] = os.environ.get("RAY_SERVE_HAPROXY_RETRY_ON", "conn-failure empty-response")
    return env


def haproxy_threads() -> int:
    """HAProxy's threads on a Ray adrec starts: ``RAY_SERVE_HAPROXY_NBTHREAD`` if set, else half the cores,
    at most Ray's default of 4. On 2 cores, 1 thread measured p99 50 ms against 59 ms with 4 at
    concurrency 8 (fused app, MovieLens-100k model)."""
    return int(os.environ.get("RAY_SERVE_HAPROXY_NBTHREAD") or max(1, min(4, (os.cpu_count() or 2) // 2)))


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ for the block only: the raylet (and through it every worker) inherits
    them when it starts, while this process and its later subprocesses keep their own environment."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cluster_address(cfg: RayConfig) -> str | None:
    """The Ray cluster to join: ``ray.address``, else ``$RAY_ADDRESS``; None: start a local Ray in-process.

    Inside a Ray job, Ray sets ``$RAY_ADDRESS`` to the cluster the job runs on: the driver joins it there
    (never as a local Ray on 127.0.0.1, which would register a multi-node cluster's driver at the wrong
    address and skip shipping the code, see :func:`code_runtime_env`).
    """
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def code_runtime_env() -> dict:
    """The runtime environment that makes every Ray worker import this process's ``adrec``.

    A cluster's nodes carry their own install of the package (cluster.yaml's image, an editable copy):
    without this, a job's workers would run that copy, not the code submitted. ``py_modules`` ships the
    package folder this process imported (in a job: the submitted working dir's ``platform/adrec``, put
    first on ``sys.path`` by ``pipelines/_checkout.py``) to every node, ahead of what is installed there.

    A job's own runtime environment (``ray job submit --runtime-env-json``) stays as it is: Ray merges
    ``ray.init``'s with it but refuses a field set in both, so ``py_modules`` the job already ships are
    kept in the list here (see :func:`init_ray`).
    """
    package = Path(__file__).resolve().parent  # this module's package: the adrec this process runs
    return {"py_modules": [*(job_runtime_env().get("py_modules") or []), str(package)]}


# Where the job supervisor hands a job's driver its runtime environment (ray._private.runtime_env.constants).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_runtime_env() -> dict:
    """The runtime environment of the Ray job this process is the driver of ({} outside a job)."""
    return json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}


def ray_init_options(cfg: RayConfig, **kwargs) -> tuple[dict, dict[str, str]]:
    """``ray.init``'s keyword arguments for ``cfg``, and the environment variables ``ray.init`` runs under
    (a local Ray's processes inherit them)."""
    address = cluster_address(cfg)
    opts = dict(address=address, include_dashboard=cfg.include_dashboard, log_to_driver=True,
                logging_level=logging.WARNING, configure_logging=True)
    env: dict[str, str] = {}
    if address is None:
        opts["num_cpus"] = cfg.num_cpus
        opts["_node_ip_address"] = "127.0.0.1"
        env = serve_ingress_env(cfg.serve_ingress)
    else:
        opts["runtime_env"] = code_runtime_env()
        if "py_modules" in job_runtime_env():
            # Both name py_modules: without the override Ray refuses the merge; ours holds the job's too.
            env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    opts.update(kwargs)
    return opts, env


def init_ray(cfg: RayConfig | None = None, **kwargs):
    """Join the cluster at :func:`cluster_address` (shipping this ``adrec`` to its workers) or start a local
    Ray in-process; a no-op when Ray is already up."""
    import ray

    if ray.is_initialized():
        return ray
    ray_env_defaults()
    cfg = cfg or RayConfig()
    opts, env = ray_init_options(cfg, **kwargs)
    log.info("starting Ray (%s%s)", opts["address"] or "local",
             "" if opts["address"] else f", Serve ingress: {cfg.serve_ingress}")
    with _environ(env):
        ray.init(**opts)
    return ray
