"""The adrec Serve application, for ``serve run`` / ``serve deploy``.

- ``serve run serve_apps/config.yaml`` / ``serve deploy serve_apps/config.yaml``: the config's
  ``import_path`` is :func:`build_app` (a typed builder: the ``args`` are validated into
  :class:`AppArgs`), so the model folder, keys and limits come from the config file.
- ``serve run serve_apps.app:app``: ``app`` is the same application built from the ``args`` in
  ``config.yaml`` next to this file.

All logic lives in :mod:`adrec.serving` (:mod:`adrec.serving.builder`).
"""

from pathlib import Path

import yaml

from adrec.serving.args import AppArgs
from adrec.serving.builder import build_app

CONFIG = Path(__file__).with_name("config.yaml")

__all__ = ["AppArgs", "build_app", "config_args", "app"]


def config_args(path: str | Path = CONFIG, name: str = "adrec") -> AppArgs:
    """The ``args`` of application ``name`` in a Serve config file, validated."""
    conf = yaml.safe_load(Path(path).read_text())
    for spec in conf.get("applications", []):
        if spec.get("name", "default") == name:
            return AppArgs.model_validate(spec.get("args") or {})
    raise KeyError(f"{path} has no application named {name!r}")


def __getattr__(name: str):
    # Built on first access only: importing this module (as `serve deploy` does for `build_app`) builds nothing.
    if name == "app":
        return build_app(config_args())
    raise AttributeError(name)
