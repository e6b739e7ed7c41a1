"""Starting (or joining) Ray the same way from the CLI, the pipelines and the tests."""

from __future__ import annotations

import logging
import os

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


def init_ray(cfg: RayConfig | None = None, **kwargs):
    """Connect to ``cfg.address`` or start a local Ray in-process; a no-op when Ray is already up."""
    import ray

    if ray.is_initialized():
        return ray
    ray_env_defaults()
    cfg = cfg or RayConfig()
    opts = dict(address=cfg.address, include_dashboard=cfg.include_dashboard, log_to_driver=True,
                logging_level=logging.WARNING, configure_logging=True)
    if cfg.address is None:
        opts["num_cpus"] = cfg.num_cpus
        opts["_node_ip_address"] = "127.0.0.1"
    opts.update(kwargs)
    log.info("starting Ray (%s)", cfg.address or "local")
    ray.init(**opts)
    return ray
