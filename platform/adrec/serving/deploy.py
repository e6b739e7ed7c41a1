"""Deploying the Serve app from Python: ``adrec serve``, the demo, the tests and the benchmark.

- :func:`serve_run` serves a run folder's model version (``adrec serve --run RUN [--port P]``).
- :func:`deploy` starts Serve's HTTP proxy on ``host:port`` and (re)deploys the app from :class:`AppArgs`.
- :func:`rollout` points the running app at another model version through the deployments'
  ``user_config``: the replicas load it next to the live one and switch, no replica restarts and no
  dropped requests.

The same app deploys declaratively with ``serve run serve_apps/config.yaml`` or
``serve deploy serve_apps/config.yaml`` (there, a rollout is a new ``user_config`` in that file).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from adrec.config import AdrecConfig
from adrec.run import RunDir
from adrec.serving.app import AppArgs, build_app

log = logging.getLogger(__name__)


def base_url(args: AppArgs) -> str:
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    return f"http://{host}:{args.port}{args.route_prefix.rstrip('/')}"


def start(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start Serve (its proxy listening on ``host:port``) unless it already runs on this cluster."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})



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


def wait_healthy(url: str, timeout_s: float = 60.0, headers: dict | None = None) -> dict:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url.rstrip("/") + "/healthz", timeout=5, headers=headers)
            if r.status_code == 200:
                return r.json()
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as err:
            last = type(err).__name__
        time.sleep(0.25)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:.0f}s (last: {last})")


def deploy(args: AppArgs, timeout_s: float = 120.0) -> str:
    """Deploy (or update) the app and wait until it answers; returns its base URL."""
    from ray import serve

    start(args.host, args.port)
    t = time.perf_counter()
    serve.run(build_app(args), name=args.app_name, route_prefix=args.route_prefix, blocking=False)
    url = base_url(args)
    info = wait_healthy(url, timeout_s)
    log.info("app %s serving version %s at %s (%.1fs)", args.app_name, info.get("version"), url, time.perf_counter() - t)
    return url


def rollout(args: AppArgs, model_dir: str | Path) -> str:
    """Switch the running app (deployed from ``args``) to the model version in ``model_dir``.

    Only the deployments' ``user_config`` changes, so Serve calls ``reconfigure`` on the live replicas:
    each loads the new version beside the old one and swaps; requests in flight finish on the old one.
    Returns the new version id once :func:`serve.run` reports the app running again.
    """
    from ray import serve

    from adrec.model_version import read_version

    new = Path(model_dir).expanduser().resolve()
    vid = str(read_version(new)["version"])
    base = args.resolved()  # pin the feedback log and key file of the running app
    serve.run(build_app(base.model_copy(update={"model_dir": str(new)})), name=args.app_name,
              route_prefix=args.route_prefix, blocking=False)
    log.info("app %s rolled out to version %s", args.app_name, vid)
    return vid


def serve_run(cfg: AdrecConfig, run_dir: str | Path | RunDir, blocking: bool = True) -> str:
    """Serve ``<run>/model`` on ``cfg.serve.host:port``; returns the base URL (blocks until Ctrl-C if asked)."""
    from ray import serve

    from adrec.runtime import init_ray

    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run.require(run.model, "train")
    init_ray(cfg.ray)
    args = AppArgs.from_config(cfg, run.path)
    url = deploy(args)
    if not blocking:
        return url
    print(f"adrec serving {run.model} at {url}  (POST /recommend, POST /feedback, GET /healthz, GET /version); "
          "Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return url
