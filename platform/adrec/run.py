"""A run folder: where each stage reads and writes, and the manifest that describes the run."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import adrec
from adrec.config import AdrecConfig, load_config
from adrec.errors import RunError

#: The run's configuration, written by prepare (and by train and tune), read by every later stage.
CONFIG_NAME = "config.yaml"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()

    # Stage folders, in flow order.
    @property
    def raw(self) -> Path:
        return self.path / "raw"

    @property
    def features(self) -> Path:
        return self.path / "features"

    @property
    def candidates(self) -> Path:
        return self.path / "candidates"

    @property
    def ranker(self) -> Path:
        return self.path / "ranker"

    @property
    def model(self) -> Path:
        """The model version Serve loads (ranker + features + candidates, self-contained)."""
        return self.path / "model"

    @property
    def report(self) -> Path:
        return self.path / "report"

    @property
    def tune(self) -> Path:
        return self.path / "tune"

    @property
    def feedback(self) -> Path:
        return self.path / "feedback"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def require(self, folder: Path, stage: str) -> Path:
        if not folder.exists():
            raise RunError(f"{folder} is missing: run `adrec {stage} --run {self.path}` first")
        return folder

    def manifest(self) -> dict[str, Any]:
        if self.manifest_path.exists():
            return json.loads(self.manifest_path.read_text())
        return {}

    def update_manifest(self, stage: str, info: dict[str, Any]) -> None:
        m = self.manifest()
        m.setdefault("code_version", code_version())
        m.setdefault("stages", {})[stage] = {**info, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(m, indent=2, default=str))
        tmp.replace(self.manifest_path)


def resolve_config(run: RunDir, config: str | Path | None = None, overrides: list[str] | None = None,
                   fresh: bool = False) -> AdrecConfig:
    """The run's own config (written by prepare), else ``config``, else defaults; then overrides.

    ``fresh`` (prepare) starts from ``config`` or defaults even when the run has one.
    """
    if config is not None:
        return load_config(config, overrides)
    if run.config_path.exists() and not fresh:
        return load_config(run.config_path, overrides)
    return load_config(None, overrides)


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{adrec.__version__}+{sha}" if sha else adrec.__version__


def fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
