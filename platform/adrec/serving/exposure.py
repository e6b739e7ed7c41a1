"""Who can reach the Serve app: beyond loopback, an API key is required (or explicitly waived).

One rule for every way the app is deployed: ``adrec serve`` checks it on the host it is asked for before
Ray starts (:func:`adrec.serving.deploy.preflight`), and the app's builder checks it again on the host the
running Serve instance actually listens on (``http_options.host`` of a Serve config deployed with
``serve deploy`` / ``serve run``, which the app's own ``host`` field never sees).
"""

from __future__ import annotations

import ipaddress
import logging

from adrec.errors import ConfigError
from adrec.serving.args import AppArgs

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host`` (127.0.0.0/8, ::1, localhost); "" and 0.0.0.0 are every interface."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: may resolve to anything
        return False


def require_api_key(args: AppArgs, host: str, port: int) -> None:
    """:class:`ConfigError` when the (resolved) ``args`` have no API key and ``host`` is beyond loopback,
    unless ``allow_unauthenticated`` (then a warning)."""
    api_key, _ = args.api_key_source()
    if api_key is None and not is_loopback(host):
        where = f"{host or '(every interface)'}:{port}"
        if not args.allow_unauthenticated:
            raise ConfigError(f"refusing to serve on {where} without an API key: anyone who reaches it could call "
                              f"the API. Set ${args.api_key_env} where the app is built (or serve.api_key_file; "
                              "api_key_file in a Serve config's args), listen on 127.0.0.1, or set "
                              "serve.allow_unauthenticated=true (allow_unauthenticated: true in the args) to accept it")
        log.warning("serving on %s WITHOUT authentication (serve.allow_unauthenticated): anyone who reaches "
                    "this port can call the API", where)


def serve_http_address(default_host: str, default_port: int) -> tuple[str, int]:
    """Where the running Serve instance listens: its HTTP ingress, and on a cluster each ingress replica's
    own HTTP server too (Serve binds those to the same host); the defaults where no Serve runs yet."""
    import ray

    if not ray.is_initialized():  # asking Serve would start a Ray
        return default_host, default_port
    # Private, and the only way to Serve's HTTP options from Python (the replicas ask the controller the
    # same way): a Ray that moves it fails here loudly rather than skipping the check.
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return default_host, default_port
    http = client.http_config
    return (default_host if http.host is None else http.host), (http.port or default_port)
