"""The run's numbered, immutable model versions on its store, and which one is live.

Layout (under ``RUN/versions/``, a local folder or an object-store prefix)::

    000001/              a version folder (see :mod:`adrec.model_version.layout`)
    000001/MANIFEST.json its file list with sizes and SHA-256 checksums: written LAST, so its presence
                         is what commits the version
    LIVE.json            {"number", "version", "previous", "set_at"}: the version Serve loads

- A version is never rewritten: publishing takes the next number. On a local disk the whole folder (with
  its manifest) is renamed into place in one step; on an object store every file is uploaded, then the
  manifest, and a folder without a manifest is invisible to readers (an interrupted upload).
- Readers (:func:`materialize`) load committed versions only and verify every checksum; a remote version
  is copied once into the local cache (``adrec.storage.cache_dir``) and verified there, so a Serve
  replica on any node loads from its own disk after the first time.
- :meth:`VersionRegistry.prune` never removes the live version or the one before it (the rollback target).
- One publisher at a time per run (training, or the run's online learner). Two racing publishers cannot
  overwrite each other's version: each manifest carries its writer's token and is read back; a publisher
  that finds another's token at its number retries at the next one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from adrec import storage
from adrec.errors import RunError
from adrec.model_version.layout import VersionPaths

log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
MANIFEST = "MANIFEST.json"
LIVE = "LIVE.json"
#: Written into a cached copy after its checksums were verified: later loads skip the hashing.
_VERIFIED = ".verified"


class VersionIntegrityError(RunError):
    """A version whose files do not match its manifest (missing, truncated or changed)."""


def _name(number: int) -> str:
    return f"{number:06d}"


def _manifest_of(folder: Path, info: dict, token: str) -> dict:
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files.append({"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size,
                          "sha256": storage.sha256_file(p)})
    return {"version": info.get("version"), "created": info.get("created"), "writer": token,
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files,
            "bytes": sum(f["size"] for f in files)}


def verify(folder: Path, manifest: dict) -> None:
    """Every file of ``manifest`` is in ``folder`` with its size and checksum (else VersionIntegrityError)."""
    for f in manifest["files"]:
        p = folder / f["path"]
        if not p.is_file():
            raise VersionIntegrityError(f"{folder}: {f['path']} is missing; the version is damaged: "
                                        "roll back (`adrec versions rollback --run R`) or publish again")
        if p.stat().st_size != f["size"] or storage.sha256_file(p) != f["sha256"]:
            raise VersionIntegrityError(f"{folder}: {f['path']} does not match its checksum; the version is "
                                        "damaged: roll back (`adrec versions rollback --run R`) or publish again")


@dataclass(frozen=True)
class VersionEntry:
    number: int
    location: storage.Location
    manifest: dict

    @property
    def version(self) -> str:
        return str(self.manifest.get("version"))

    @property
    def uri(self) -> str:
        return self.location.uri


class VersionRegistry:
    """The numbered versions under ``location`` (a run's ``versions/``)."""

    def __init__(self, location: str | storage.Location):
        self.location = storage.resolve(location)

    def __repr__(self) -> str:
        return f"VersionRegistry({self.location.uri!r})"

    # -- reading -------------------------------------------------------------------------------------

    def _numbers(self, committed: bool) -> list[int]:
        out = []
        for name in self.location.children():
            if name.isdigit() and (not committed or (self.location / name / MANIFEST).is_file()):
                out.append(int(name))
        return sorted(out)

    def numbers(self) -> list[int]:
        """The committed versions' numbers, oldest first."""
        return self._numbers(committed=True)

    def entry(self, number: int) -> VersionEntry:
        loc = self.location / _name(number)
        man = loc / MANIFEST
        if not man.is_file():
            raise RunError(f"{self.location.uri} has no committed version {number}: "
                           f"`adrec versions list --run R` shows the versions there")
        return VersionEntry(number, loc, man.read_json())

    def entries(self) -> list[VersionEntry]:
        return [self.entry(n) for n in self.numbers()]

    def live_record(self) -> dict | None:
        loc = self.location / LIVE
        return loc.read_json() if loc.is_file() else None

    def live(self) -> VersionEntry:
        rec = self.live_record()
        if rec is None:
            raise RunError(f"{self.location.uri} has no live model version: run `adrec train --run R` first")
        return self.entry(int(rec["number"]))

    def find(self, version: str) -> VersionEntry:
        """The version with id ``version`` (or number, as digits)."""
        if version.isdigit():
            return self.entry(int(version))
        for e in reversed(self.entries()):
            if e.version == version:
                return e
        raise RunError(f"{self.location.uri} has no version {version!r}: `adrec versions list --run R` shows them")

    # -- writing -------------------------------------------------------------------------------------

    def commit(self, folder: Path, make_live: bool = True) -> VersionEntry:
        """Publish the finished local version folder ``folder`` under the next number (consumed: moved or
        deleted); with ``make_live`` it becomes the live version."""
        folder = Path(folder)
        info = json.loads(VersionPaths(folder).info.read_text())
        token = uuid.uuid4().hex
        manifest = _manifest_of(folder, info, token)
        for _ in range(100):
            existing = self._numbers(committed=False)
            number = (existing[-1] if existing else 0) + 1
            dest = self.location / _name(number)
            if self.location.is_local:
                (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
                self.location.local_path.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(folder, dest.local_path)  # fails when another publisher took the number
                except OSError:
                    (folder / MANIFEST).unlink()
                    continue
                storage.fsync_tree(dest.local_path)
                storage.fsync_path(self.location.local_path)
            else:
                if dest.exists():
                    continue
                for f in manifest["files"]:
                    (dest / f["path"]).upload(folder / f["path"])
                (dest / MANIFEST).write_json(manifest)
                if (dest / MANIFEST).read_json().get("writer") != token:
                    continue  # another publisher committed this number at the same moment
                shutil.rmtree(folder, ignore_errors=True)
            entry = VersionEntry(number, dest, manifest)
            log.info("committed model version %s as %s (%d files, %.1f MB)", entry.version, dest.uri,
                     len(manifest["files"]), manifest["bytes"] / 1e6)
            if make_live:
                self.set_live(number)
            return entry
        raise RunError(f"{self.location.uri}: could not take a version number (100 tries)")

    def set_live(self, number: int) -> dict:
        """Make committed version ``number`` the live one; the old live one becomes ``previous``."""
        entry = self.entry(number)
        old = self.live_record()
        prev = old["number"] if old and int(old["number"]) != number else (old or {}).get("previous")
        rec = {"number": number, "version": entry.version, "previous": prev,
               "set_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (self.location / LIVE).write_json(rec)
        log.info("live model version: %d (%s)", number, entry.version)
        return rec

    def rollback(self, to: int | None = None) -> dict:
        """Make ``to`` (default: the previous live version) live again."""
        rec = self.live_record()
        if to is None:
            if not rec or rec.get("previous") is None:
                raise RunError(f"{self.location.uri}: no previous version to roll back to; "
                               "name one: `adrec versions rollback --run R --to N`")
            to = int(rec["previous"])
        return self.set_live(to)

    def prune(self, keep: int, also_keep: set[str] | None = None) -> list[int]:
        """Remove committed versions beyond the newest ``keep``, never the live one, the previous one, or a
        version whose id is in ``also_keep`` (one being rolled out); returns the removed numbers."""
        rec = self.live_record() or {}
        protected = {rec.get("number"), rec.get("previous")}
        numbers = self.numbers()
        newest = set(numbers[-keep:]) if keep > 0 else set()
        removed = []
        for n in numbers:
            if n in protected or n in newest:
                continue
            if also_keep and self.entry(n).version in also_keep:
                continue
            # The manifest first: a half-removed version is then an uncommitted one, invisible to readers.
            loc = self.location / _name(n)
            (loc / MANIFEST).delete()
            loc.delete()
            removed.append(n)
        return removed


def registry_of(run_location: str | storage.Location) -> VersionRegistry:
    """The version registry of a run (``RUN/versions``)."""
    return VersionRegistry(storage.resolve(run_location) / VERSIONS_DIR)


def staging_dir(registry: VersionRegistry, version: str) -> Path:
    """A local folder to write a new version into before :meth:`VersionRegistry.commit`: beside the
    versions on a local disk (so committing is one rename), in the local cache for a remote store."""
    if registry.location.is_local:
        return registry.location.local_path / f".stage-{version}"
    return storage.cache_dir("staging", registry.location) / version


def materialize(model_dir: str | os.PathLike) -> Path:
    """A committed version as a verified local folder: a local one in place, a remote one copied into the
    cache once. A local folder without a manifest (written by :func:`write_version` outside a registry)
    is returned as it is: only registry versions carry checksums."""
    loc = storage.resolve(model_dir)
    if loc.is_local:
        folder = loc.local_path
        man = folder / MANIFEST
        if man.is_file() and not (folder / _VERIFIED).exists():
            verify(folder, json.loads(man.read_text()))
        return folder
    cache = storage.cache_dir("versions", loc)
    if (cache / _VERIFIED).is_file():
        return cache
    man_loc = loc / MANIFEST
    if not man_loc.is_file():
        raise RunError(f"{loc.uri} is not a committed model version (no {MANIFEST}): "
                       "`adrec versions list --run R` shows the committed ones")
    manifest = man_loc.read_json()
    tmp = cache.with_name(cache.name + f".{uuid.uuid4().hex[:8]}.tmp")
    t0 = time.perf_counter()
    try:
        for f in manifest["files"]:
            (loc / f["path"]).download(tmp / f["path"])
        verify(tmp, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    (tmp / _VERIFIED).write_text("")
    try:
        os.rename(tmp, cache)
    except OSError:  # another process of this node cached it first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached model version %s from %s in %.1fs", manifest.get("version"), loc.uri, time.perf_counter() - t0)
    return cache


def live_entry(run) -> VersionEntry:
    """The live version of a run (an :class:`adrec.run.RunDir`), wherever the run lives."""
    return registry_of(run.location).live()


def live_dir(run) -> Path:
    """The live version of a run as a verified local folder (see :func:`materialize`)."""
    return materialize(live_entry(run).uri)
