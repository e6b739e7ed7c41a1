"""A run: where each stage reads and writes, and the manifest that describes the run.

A run lives at a location (:mod:`adrec.storage`): a local folder, or a prefix on an object store
(``s3://bucket/runs/r1``) that every node of a cluster reaches. Stages compute on local files: for a local
run they are the run folder itself; for a remote one they are a local cache of it (``path``), which a stage
fills with what it reads (:meth:`RunDir.pull`) and whose outputs it uploads when it finishes
(:meth:`RunDir.push`). The manifest and the model versions are read from and written to the store itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import adrec
from adrec import storage
from adrec.config import AdrecConfig, load_config
from adrec.errors import RunError

log = logging.getLogger(__name__)

#: The run's configuration, written by prepare (and by train and tune), read by every later stage.
CONFIG_NAME = "config.yaml"
MANIFEST_NAME = "manifest.json"


class RunDir:
    """A run at ``location`` (a local path or URI): ``path`` is the local folder stages compute in."""

    def __init__(self, location: str | Path):
        self.location = storage.resolve(location)
        self.uri = self.location.uri
        self.remote = not self.location.is_local
        self.path = storage.cache_dir("runs", self.location) if self.remote else self.location.local_path

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    @property
    def name(self) -> str:
        return self.location.name

    def store(self, name: str) -> storage.Location:
        """Where ``name`` (a stage folder or file of the run) lives on the run's own storage."""
        return self.location / name

    def pull(self, *names: str) -> None:
        """Bring the named folders and files of a remote run into the local cache (replacing stale copies);
        absent ones are skipped (the stage's own checks name what is missing). A local run: nothing to do."""
        if not self.remote:
            return
        for name in names:
            src, dest = self.store(name), self.path / name
            if dest.is_dir():
                shutil.rmtree(dest)
            elif dest.exists():
                dest.unlink()
            if src.is_file() or src.is_dir():
                src.download(dest)

    def push(self, *names: str) -> None:
        """Upload the named folders and files of the local cache to a remote run, each replacing the old one
        (absent ones are skipped). A local run: nothing to do."""
        if not self.remote:
            return
        for name in names:
            src = self.path / name
            if not src.exists():
                continue
            dest = self.store(name)
            dest.delete()
            dest.upload(src)
            log.info("uploaded %s to %s", name, dest.uri)

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
        return self.path / MANIFEST_NAME

    def require(self, folder: Path, stage: str) -> Path:
        if not folder.exists():
            where = f"{self.uri}/{folder.relative_to(self.path)}" if self.remote else str(folder)
            raise RunError(f"{where} is missing: run `adrec {stage} --run {self.uri}` first")
        return folder

    def manifest(self) -> dict[str, Any]:
        loc = self.store(MANIFEST_NAME)
        return loc.read_json() if loc.is_file() else {}

    def update_manifest(self, stage: str, info: dict[str, Any]) -> None:
        m = self.manifest()
        m.setdefault("code_version", code_version())
        m.setdefault("stages", {})[stage] = {**info, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        data = json.dumps(m, indent=2, default=str).encode()
        self.store(MANIFEST_NAME).write_bytes(data)
        if self.remote:
            storage.atomic_write(self.manifest_path, data)


def resolve_config(run: RunDir, config: str | Path | None = None, overrides: list[str] | None = None,
                   fresh: bool = False) -> AdrecConfig:
    """The run's own config (written by prepare), else ``config``, else defaults; then overrides.

    ``fresh`` (prepare) starts from ``config`` or defaults even when the run has one.
    """
    if config is not None:
        return load_config(config, overrides)
    if not fresh:
        run.pull(CONFIG_NAME)
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
