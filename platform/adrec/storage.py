"""Where the platform reads and writes: a local path or an object-store URI, one interface for both.

Every location a user gives or the platform derives (a run, data files, model versions, Ray Train's and
Tune's storage, the feedback log, the learner's state) goes through :func:`resolve`, which opens it with
``pyarrow.fs``: the layer Ray Train and Tune use, so the same URI means the same place to adrec and to
Ray. A local path is the embedded default; ``s3://bucket/prefix`` works against any S3-compatible store
(endpoint and credentials from the standard AWS environment: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), ``gs://`` against GCS.

Writes are whole-object: :meth:`Location.write_bytes` is atomic on both kinds (a local file is written
beside its target, fsync-ed and renamed over it; an object store makes an object visible only when its
upload completes), so a reader sees the old content or the new, never a torn one.

Stages compute on local files; for a run on an object store they work in a local cache of it
(:func:`cache_dir`) that is pulled before and pushed after (:class:`adrec.run.RunDir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adrec.errors import ConfigError

log = logging.getLogger(__name__)

#: Schemes handed to pyarrow; anything else with ``://`` is refused by name.
REMOTE_SCHEMES = ("s3", "gs", "gcs")
#: Where local copies of remote runs and versions live (``$ADREC_CACHE_DIR``, else ``~/.cache/adrec``).
CACHE_ENV = "ADREC_CACHE_DIR"
#: Set to 1 where local paths are a filesystem every node mounts (NFS, a cluster filesystem).
SHARED_MOUNT_ENV = "ADREC_LOCAL_IS_SHARED"

_fs_cache: dict[tuple[str, str], Any] = {}
_fs_lock = threading.Lock()


def is_remote(uri: str | os.PathLike) -> bool:
    """True for an object-store URI (``s3://``, ``gs://``), False for a local path (or ``file://``)."""
    s = os.fspath(uri)
    return "://" in s and s.split("://", 1)[0].lower() in REMOTE_SCHEMES


def normalize(uri: str | os.PathLike) -> str:
    """The canonical form of a location: an absolute local path, or ``scheme://bucket/key`` without a
    trailing slash. A relative local path is made absolute against the working directory where the user
    typed it, so it means the same folder to every process started from there."""
    s = os.fspath(uri)
    if "://" in s:
        scheme, rest = s.split("://", 1)
        scheme = scheme.lower()
        if scheme == "file":
            return str(Path(rest).expanduser().resolve())
        if scheme not in REMOTE_SCHEMES:
            raise ConfigError(f"{s!r}: unknown storage scheme {scheme!r}; use a local path, "
                              "s3://bucket/prefix or gs://bucket/prefix")
        rest = rest.strip("/")
        if not rest:
            raise ConfigError(f"{s!r} names no bucket: use {scheme}://bucket/prefix")
        return f"{'gs' if scheme == 'gcs' else scheme}://{rest}"
    return str(Path(s).expanduser().resolve())


def _filesystem(uri: str):
    """The pyarrow filesystem for ``uri`` (one per scheme and bucket: S3 clients are costly to make)."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), uri
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0]
    key = (scheme, bucket)
    with _fs_lock:
        fs = _fs_cache.get(key)
        if fs is None:
            try:
                fs = _make_remote(scheme, bucket)
            except Exception as err:  # pyarrow raises plain ArrowInvalid/OSError: say what to set
                raise ConfigError(f"{uri}: cannot open the {scheme} store ({err}); set the store's endpoint and "
                                  "credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                                  "AWS_DEFAULT_REGION for s3)") from err
            _fs_cache[key] = fs
    return fs, rest


def _make_remote(scheme: str, bucket: str):
    import pyarrow.fs as pafs

    if scheme == "s3":
        # pyarrow reads AWS_ENDPOINT_URL itself in recent releases; passing it explicitly also covers the
        # older ones and lets a plain-http endpoint (a store on 127.0.0.1) work without extra settings.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {}
        if endpoint:
            scheme_part, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme_part, scheme=scheme_part if host else "https")
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        # Credentials from the environment are passed on explicitly: the filesystem travels (pickled) to Ray
        # workers whose environment may not have them (Ray Train's checkpoints, Serve replicas).
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                          session_token=os.environ.get("AWS_SESSION_TOKEN"))
        return pafs.S3FileSystem(**kwargs)
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    return fs


@dataclass(frozen=True)
class FileEntry:
    """One file under a location: its path relative to the location, and its size in bytes."""

    name: str
    size: int


class Location:
    """A place in a filesystem (local or object store): ``uri`` (canonical), ``fs`` and ``path`` in it."""

    def __init__(self, uri: str | os.PathLike):
        self.uri = normalize(uri)
        self.fs, self.path = _filesystem(self.uri)

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def is_local(self) -> bool:
        return not is_remote(self.uri)

    @property
    def local_path(self) -> Path:
        """The folder or file itself (local locations only)."""
        assert self.is_local, self.uri
        return Path(self.uri)

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    def __truediv__(self, name: str) -> "Location":
        return Location(f"{self.uri}/{name.strip('/')}")

    # -- queries -----------------------------------------------------------------------------------

    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A folder; on an object store, a prefix with at least one object under it."""
        import pyarrow.fs as pafs

        info = self._info()
        if info.type == pafs.FileType.Directory:
            return True
        return not self.is_local and info.type == pafs.FileType.NotFound and bool(self.files(recursive=False))

    def files(self, recursive: bool = True) -> list[FileEntry]:
        """The files under this folder (names relative to it, ``/``-separated), sorted; [] when absent."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(sel)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = self.path.rstrip("/") + "/"
        out = [FileEntry(i.path[len(base):] if i.path.startswith(base) else i.path, int(i.size or 0))
               for i in infos if i.type == pafs.FileType.File]
        return sorted(out, key=lambda e: e.name)

    def children(self) -> list[str]:
        """The names directly under this folder (files and sub-folders), sorted."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(sel)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(i.base_name for i in infos if i.type in (pafs.FileType.File, pafs.FileType.Directory))

    # -- whole-object reads and writes --------------------------------------------------------------

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def write_bytes(self, data: bytes) -> None:
        """Replace the file with ``data`` atomically (readers see the old or the new content)."""
        if self.is_local:
            atomic_write(self.local_path, data)
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_json(self, obj: Any) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))

    def delete(self) -> None:
        """Remove this file or folder (nothing happens when it is absent)."""
        import pyarrow.fs as pafs

        info = self._info()
        if info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)
        elif info.type == pafs.FileType.Directory or (not self.is_local and self.files(recursive=False)):
            self.fs.delete_dir(self.path)

    # -- trees --------------------------------------------------------------------------------------

    def upload(self, local: str | os.PathLike) -> None:
        """Copy the local file or folder ``local`` to this location (a folder: its whole tree)."""
        import pyarrow.fs as pafs

        src = Path(local)
        if self.is_local:
            if src.resolve() == self.local_path:
                return
            if src.is_dir():
                shutil.copytree(src, self.local_path, dirs_exist_ok=True)
            else:
                self.local_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, self.local_path)
            return
        if src.is_dir():
            pafs.copy_files(str(src), self.path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs, use_threads=True)
        else:
            with open(src, "rb") as f, self.fs.open_output_stream(self.path) as out:
                shutil.copyfileobj(f, out, 1 << 20)

    def download(self, local: str | os.PathLike) -> Path:
        """Copy this file or folder to the local path ``local`` (a folder: its whole tree); returns it."""
        import pyarrow.fs as pafs

        dest = Path(local)
        if self.is_local:
            if self.local_path.is_dir():
                shutil.copytree(self.local_path, dest, dirs_exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.local_path, dest)
            return dest
        if self.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(dest, self.read_bytes())
            return dest
        dest.mkdir(parents=True, exist_ok=True)
        if self.files(recursive=False) or self.children():
            pafs.copy_files(self.path, str(dest), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem(), use_threads=True)
        return dest


def resolve(uri: str | os.PathLike | Location) -> Location:
    """The :class:`Location` of a local path or URI (a Location is returned as it is)."""
    return uri if isinstance(uri, Location) else Location(uri)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, fsync-ed, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: the names in it) by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder below ``root`` (and ``root``): their data and their names are on disk."""
    for dirpath, dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "adrec").expanduser()


def cache_dir(kind: str, uri: str | Location) -> Path:
    """The local cache folder of a remote location (``<cache>/<kind>/<name>-<hash of the URI>``)."""
    u = resolve(uri).uri
    digest = hashlib.sha256(u.encode()).hexdigest()[:16]
    return cache_root() / kind / f"{resolve(uri).name}-{digest}"


def cluster_nodes() -> int:
    """How many alive nodes the connected Ray cluster has (1 when Ray is not initialised here)."""
    import sys

    ray = sys.modules.get("ray")  # never start or import Ray just to ask
    if ray is None or not ray.is_initialized():
        return 1
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def require_shared(loc: str | Location, what: str) -> None:
    """Refuse a local ``loc`` for ``what`` when the Ray cluster spans several nodes (one node: fine).

    Raised before any work starts: a stage that writes where only one node can read would otherwise
    fail later, on the other node, far from its cause.
    """
    loc = resolve(loc)
    if not loc.is_local or os.environ.get(SHARED_MOUNT_ENV) == "1":
        return
    nodes = cluster_nodes()
    if nodes > 1:
        raise ConfigError(f"{what} is the local path {loc.uri}, but the Ray cluster has {nodes} nodes and the "
                          "others cannot read this machine's disk: give a shared location "
                          f"(s3://bucket/prefix or gs://bucket/prefix), or set {SHARED_MOUNT_ENV}=1 if every node mounts {loc.uri}")
