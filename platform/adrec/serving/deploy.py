"""Deploying the Serve app from Python: ``adrec serve``, the demo, the tests and the benchmark.

- :func:`serve_run` serves a run folder's model version (``adrec serve --run RUN [--port P]``).
- :func:`deploy` starts Serve's HTTP proxy on ``host:port`` and (re)deploys the app from :class:`AppArgs`,
  after :func:`preflight`: no API key beyond loopback, or a model version another key pseudonymized,
  refuse to start.
- :func:`rollout` points the running app at another model version through the deployments'
  ``user_config``: the replicas load it next to the live one and switch, no replica restarts and no
  dropped requests.

The same app deploys declaratively with ``serve run serve_apps/config.yaml`` or
``serve deploy serve_apps/config.yaml`` (there, a rollout is a new ``user_config`` in that file).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

from adrec import storage
from adrec.config import AdrecConfig
from adrec.data.ingest import BID
from adrec.errors import ConfigError
from adrec.run import RunDir
from adrec.serving.args import AppArgs
from adrec.serving.builder import build_app
from adrec.serving.exposure import require_api_key
from adrec.serving.strategy import EXPECTED_VALUE

log = logging.getLogger(__name__)


def base_url(args: AppArgs) -> str:
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    return f"http://{host}:{args.port}{args.route_prefix.rstrip('/')}"


def start(host: str = "127.0.0.1", port: int = 8000, proxy_location: str = "EveryNode") -> None:
    """Start Serve (its HTTP ingress, HAProxy or the proxy actor, on ``host:port`` of every node or of the head
    only) unless it already runs on this cluster."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port}, proxy_location=proxy_location)


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


def preflight(args: AppArgs) -> AppArgs:
    """The start-up checks of :func:`deploy`; returns the args resolved. :class:`ConfigError` when

    - the app has no API key and listens beyond loopback, unless ``allow_unauthenticated`` (a warning then);
    - the model version was built with another pseudonymization key than the app's (every user would be a
      cold start);
    - the version or the feedback log is a local path while the Ray cluster has several nodes (replicas
      placed on the others could not read the version, and acknowledged events would live on one disk).
    """
    from adrec.model_version import materialize, read_version

    r = args.resolved()
    require_api_key(r, r.host, r.port)
    storage.require_shared(r.feedback_log, "the feedback log (serve.feedback_log)")
    arms = [a.model_dir for a in r.ab.arms if a.model_dir] if r.ab is not None else []
    for model_dir in [r.model_dir, *arms]:  # A/B arms' own versions: the same checks
        storage.require_shared(model_dir, "the model version Serve loads (serve.model_dir / --run / serve.ab)")
        folder = materialize(model_dir)  # committed and intact (every checksum), before any replica tries it
        r.check_version_key(read_version(model_dir), model_dir)
        if r.objective == EXPECTED_VALUE:
            require_bids(folder, model_dir)
    return r


def require_bids(folder, model_dir: str) -> None:
    """A :class:`ConfigError` when the version in ``folder`` has no item bids (serve.objective=expected_value)."""
    import pyarrow.parquet as pq

    from adrec.model_version import VersionPaths

    if BID not in pq.read_schema(VersionPaths(folder).items).names:
        raise ConfigError(f"serve.objective=expected_value needs item bids, and the model version {model_dir} has "
                          "none: name the bid column in the schema YAML's items table (bid: COLUMN), prepare and "
                          "train again, or serve another objective")


def deploy(args: AppArgs, timeout_s: float = 120.0) -> str:
    """Deploy (or update) the app and wait until it answers; returns its base URL."""
    from adrec.model_version import read_version
    from ray import serve

    preflight(args)
    start(args.host, args.port, args.proxy_location)
    t = time.perf_counter()
    serve.run(build_app(args), name=args.app_name, route_prefix=args.route_prefix, blocking=False)
    url = base_url(args)
    wait_healthy(url, timeout_s)
    log.info("app %s serving version %s at %s (%.1fs)", args.app_name, read_version(args.resolved().model_dir)["version"],
             url, time.perf_counter() - t)
    return url


# The deployments whose replicas hold a model version, per topology (the ones a rollout waits for).
VERSION_HOLDERS = {"fused": ("Ingress",), "graph": ("CandidateDeployment", "RankerDeployment")}


def rollout(args: AppArgs, model_dir: str | Path, timeout_s: float = 600.0) -> str:
    """Switch the running app (deployed from ``args``) to the model version in ``model_dir``.

    Only the deployments' ``user_config`` changes, so Serve calls ``reconfigure`` on the live replicas:
    each loads the new version in the background, beside the live one, and swaps; requests keep being
    answered throughout. Returns the new version id once every replica serves it (raises if one could
    not load it: that replica goes on serving the old version).
    """
    from adrec.model_version import materialize, read_version
    from ray import serve

    new = storage.normalize(model_dir)  # a folder or a URI; every replica copies a remote one to its cache
    materialize(new)  # a damaged version is refused here, before any replica tries it
    vid = str(read_version(new)["version"])
    # The running app's own settings, not the caller's: a learner job started with other --set values
    # would otherwise redeploy every replica with its config (a new code version, not a reconfigure).
    base = running_args(args.app_name) or args.resolved()
    t = time.perf_counter()
    serve.run(build_app(base.model_copy(update={"model_dir": str(new)})), name=args.app_name,
              route_prefix=args.route_prefix, blocking=False)
    wait_version(args, vid, timeout_s)
    log.info("app %s rolled out to version %s (%.1fs)", args.app_name, vid, time.perf_counter() - t)
    return vid


def running_args(app_name: str) -> AppArgs | None:
    """The settings the running app ``app_name`` was deployed with (None when it does not run, or answers
    from an older adrec without them: the caller's own then)."""
    from ray import serve

    if app_name not in serve.status().applications:
        return None
    handle = serve.get_deployment_handle("Ingress", app_name=app_name)
    try:
        return asyncio.run_coroutine_threadsafe(_await(handle.app_settings.remote()), _handle_loop()).result(60)
    except Exception as err:  # noqa: BLE001 - a replica of another adrec version: fall back, say so
        log.warning("app %s did not report its settings (%s: %s); rolling out with this process's",
                    app_name, type(err).__name__, err)
        return None


async def _await(response):
    return await response


def wait_version(args: AppArgs, version: str, timeout_s: float = 600.0) -> None:
    """Block until every replica holding a model version in the app serves ``version``.

    Each replica answers ``loaded()`` with its id; Serve routes the calls, so they are repeated until
    every running replica of each deployment has answered with ``version``.
    """
    asyncio.run_coroutine_threadsafe(_wait_version(args, version, timeout_s), _handle_loop()).result()


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _handle_loop() -> asyncio.AbstractEventLoop:
    """One event loop, in a thread of its own, for this process's handle calls from synchronous code.

    In Serve's high-throughput mode a handle works only inside a running event loop, and keeps using
    the loop it was first called in (a fresh ``asyncio.run`` per call failed with "Event loop is closed").
    """
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="adrec-serve-handles", daemon=True).start()
        return _LOOP


async def _wait_version(args: AppArgs, version: str, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    for name in VERSION_HOLDERS[args.topology]:
        handle = serve.get_deployment_handle(name, app_name=args.app_name)
        done: set[str] = set()
        while True:
            status = serve.status().applications[args.app_name].deployments[name]
            running = sum(n for state, n in status.replica_states.items() if str(state).endswith("RUNNING"))
            if running and len(done) >= running:
                break
            state = await asyncio.wait_for(handle.loaded.remote(), max(1.0, deadline - time.monotonic()))
            if state["version"] == version:
                if state["replica"] in done:  # routed to one already counted: let the router spread
                    await asyncio.sleep(0.01)
                done.add(state["replica"])
            elif state["error"] and not state["loading"]:
                raise RuntimeError(f"{name} replica {state['replica']} could not load version {version} and still "
                                   f"serves {state['version']}: {state['error']}")
            else:
                await asyncio.sleep(0.05)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {len(done)} of {running} replicas serve version {version} after "
                                   f"{timeout_s:.0f}s")


def serve_run(cfg: AdrecConfig, run_dir: str | Path | RunDir, blocking: bool = True) -> str:
    """Serve the run's live version on ``cfg.serve.host:port``; returns the base URL (blocks until Ctrl-C if asked)."""
    from adrec.runtime import init_ray
    from ray import serve

    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    args = AppArgs.from_config(cfg, run)
    preflight(args)  # before Ray starts: a refusal costs nothing
    init_ray(cfg.ray)
    url = deploy(args)
    if not blocking:
        return url
    print(f"adrec serving {args.model_dir} at {url}  (POST /recommend, POST /feedback, GET /healthz, GET /version); "
          "Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return url
