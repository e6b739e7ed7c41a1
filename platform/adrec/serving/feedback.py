"""The durable, append-only feedback log (JSON lines) behind ``POST /feedback``.

- One JSON object per line; lines are only ever appended (``O_APPEND``), never rewritten.
- :meth:`FeedbackLog.append` returns only after the new lines are written and ``fsync``-ed, so an
  acknowledged event survives a crash of the replica, of Serve or of the machine.
- **Committed mark**: after each successful write + fsync the writer records the log's acknowledged
  length in ``<log>.committed`` (see :func:`committed_size`); readers (the online learner) never read
  past it. A failed write (``ENOSPC``, ``EIO``) is cut off again and the mark does not move, so no
  reader ever sees a byte of a batch that was not acknowledged (:class:`FeedbackWriteError`: the
  ingress answers 503). The mark is rewritten in place (one page, never grown: writing it cannot
  run out of space) with a checksum, and set afresh from the recovered log whenever the log is opened.
- **One writer per log**: opening takes an exclusive ``flock`` on ``<log>.lock`` (holder pid, host and
  time written into it); a second writer, another replica or another app on the same file, is
  refused with :class:`LogLockedError` naming the log and the holder (after ``lock_wait_s``: a
  replica that replaces one still shutting down waits for it to let go).
- ``event_id`` is the idempotency key: an id already in the log (or twice in one batch) is accepted
  and reported as a duplicate, never written twice. The index of seen ids is **bounded**: it keeps
  the newest ``dedup_max_ids`` ids, and none older than ``dedup_window_s`` (by the time the writer
  received them). An event re-sent after it left the window is written again. The index is rebuilt
  from the log (within the same bounds) when the log is opened.
- A torn last line (a crash in the middle of a write, which was therefore never acknowledged) is cut
  off when the log is opened, so the next append starts on a fresh line.
- Records carry pseudonymized user ids only; raw ids never reach the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Defaults of the dedup window (ServeConfig.feedback_dedup_max_ids / feedback_dedup_window_s).
DEDUP_MAX_IDS = 1_000_000
DEDUP_WINDOW_S = 7 * 86400.0


class LogLockedError(RuntimeError):
    """Another writer holds the feedback log (one writer per log)."""


class FeedbackWriteError(OSError):
    """A batch could not be written durably; nothing of it is in the log (or visible to readers)."""


@dataclass
class AppendResult:
    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the committed mark -------------------------------------------------------------------------------
def committed_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".committed")


def _mark_bytes(size: int) -> bytes:
    body = f"{size:020d}"
    return f"{body} {zlib.crc32(body.encode()):08x}\n".encode()


def committed_size(path: str | Path, retries: int = 5) -> int | None:
    """The acknowledged length of the log at ``path``, or None for a log without a mark (written before
    marks existed, or by another writer): a reader then reads complete lines up to the file's end.

    A mark read while the writer rewrites it fails its checksum and is read again; one that stays
    unreadable (a crash of the machine mid-write) counts as 0 until the writer reopens the log.
    """
    mp = committed_path(path)
    for attempt in range(retries):
        try:
            raw = mp.read_bytes()
        except FileNotFoundError:
            return None
        parts = raw.split()
        if len(parts) == 2 and len(parts[0]) == 20 and parts[0].isdigit():
            if f"{zlib.crc32(parts[0]):08x}".encode() == parts[1]:
                return int(parts[0])
        time.sleep(0.001 * (attempt + 1))
    log.warning("feedback log %s: the committed mark %s is unreadable; reading nothing until the writer reopens "
                "the log", path, mp)
    return 0


# ---- the writer -------------------------------------------------------------------------------------------
class FeedbackLog:
    def __init__(self, path: str | Path, dedup_max_ids: int = DEDUP_MAX_IDS,
                 dedup_window_s: float | None = DEDUP_WINDOW_S, lock_wait_s: float = 0.0):
        self.path = Path(path)
        self.dedup_max_ids = int(dedup_max_ids)
        self.dedup_window_s = dedup_window_s
        self._lock = threading.Lock()
        new_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if new_dir:
            _fsync_dir(self.path.parent.parent)
        self._lock_fd = self._take_lock(lock_wait_s)
        self._fd = -1
        self._mark_fd = -1
        try:
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            if created:
                os.fsync(self._fd)
                _fsync_dir(self.path.parent)
            # event_id -> received_at (seconds), oldest first: the bounded dedup index
            self.ids: OrderedDict[str, float] = OrderedDict()
            self.n_records = 0
            self.forgotten = 0  # ids that left the dedup window
            self.committed = self._load()
            self._mark_fd = os.open(committed_path(self.path), os.O_RDWR | os.O_CREAT, 0o600)
            self._write_mark(self.committed)
        except BaseException:
            self.close()
            raise

    # ---- one writer ----------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _take_lock(self, wait_s: float) -> int:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # held by another open of the file (this process or another)
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LogLockedError(f"feedback log {self.path} is already open for writing by another writer "
                                         f"({self._holder()}; lock {self.lock_path}): one writer per log. Run one "
                                         "feedback replica per log (FeedbackDeployment num_replicas=1) and give every "
                                         "app its own serve.feedback_log") from None
            time.sleep(0.1)
        try:  # who holds it, for the message above (best effort: a full disk must not stop the writer)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(), 0)
        except OSError:
            pass
        return fd

    def _holder(self) -> str:
        try:
            return self.lock_path.read_text().strip() or "holder unknown"
        except OSError:
            return "holder unknown"

    # ---- recovery -----------------------------------------------------------------------------------
    def _remember(self, eid: str, at: float) -> None:
        self.ids[eid] = at
        self.ids.move_to_end(eid)

    def _forget_old(self, now: float) -> None:
        horizon = now - self.dedup_window_s if self.dedup_window_s is not None else None
        while self.ids and (len(self.ids) > self.dedup_max_ids
                            or (horizon is not None and next(iter(self.ids.values())) < horizon)):
            self.ids.popitem(last=False)
            self.forgotten += 1

    def _load(self) -> int:
        good = 0  # byte offset just past the last complete line
        bad = 0
        now = time.time()
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn tail: never acknowledged
                good += len(raw)
                try:
                    rec = json.loads(raw)
                    eid = str(rec["event_id"])
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                self.n_records += 1
                at = rec.get("received_at") if isinstance(rec, dict) else None
                self._remember(eid, float(at) if isinstance(at, (int, float)) else now)
                if len(self.ids) > self.dedup_max_ids:
                    self.ids.popitem(last=False)
        self._forget_old(now)
        self.forgotten = 0
        size = self.path.stat().st_size
        if size > good:
            log.warning("feedback log %s: cutting a torn last line (%d bytes, never acknowledged)", self.path, size - good)
            os.truncate(self.path, good)
            os.fsync(self._fd)
        if bad:
            log.warning("feedback log %s: %d unreadable lines kept as they are", self.path, bad)
        log.info("feedback log %s: %d events (%d ids in the dedup window)", self.path, self.n_records, len(self.ids))
        return good

    # ---- writing ------------------------------------------------------------------------------------
    def append(self, records: list[dict]) -> AppendResult:
        """Write the records whose ``event_id`` is new, fsync, and only then report them accepted.

        Raises :class:`FeedbackWriteError` when the batch could not be written: none of it is kept.
        """
        with self._lock:
            if self._fd < 0:
                raise FeedbackWriteError(errno.EBADF, f"feedback log {self.path} is closed")
            res = AppendResult()
            lines = []
            batch_ids: set[str] = set()
            for rec in records:
                eid = str(rec["event_id"])
                if eid in self.ids or eid in batch_ids:
                    res.duplicates.append(eid)
                    continue
                batch_ids.add(eid)
                lines.append(json.dumps(rec, separators=(",", ":"), ensure_ascii=True, allow_nan=False) + "\n")
                res.accepted.append(eid)
            if lines:
                self._write_durably("".join(lines).encode("utf-8"))
                now = time.time()
                for rec in records:
                    eid = str(rec["event_id"])
                    if eid in batch_ids:
                        at = rec.get("received_at")
                        self._remember(eid, float(at) if isinstance(at, (int, float)) else now)
                self._forget_old(now)
                self.n_records += len(lines)
            return res

    def _write_durably(self, data: bytes) -> None:
        start = self.committed
        try:
            if os.fstat(self._fd).st_size != start:  # an earlier rollback failed: retry it before writing
                os.ftruncate(self._fd, start)
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)
        except OSError as err:
            # Leave no partial batch behind: none of it was acknowledged, and the mark never covered it.
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                log.exception("feedback log %s: could not roll back a failed write (retried before the next one)",
                              self.path)
            log.error("feedback log %s: a batch of %d bytes could not be written (%s); nothing of it was kept",
                      self.path, len(data), os.strerror(err.errno) if err.errno else err)
            raise FeedbackWriteError(err.errno or errno.EIO, f"the feedback log could not be written "
                                     f"({os.strerror(err.errno) if err.errno else err})") from err
        self.committed = start + len(data)
        self._write_mark(self.committed)

    def _write_mark(self, size: int) -> None:
        # In place, the same 30 bytes every time: no new block, so it cannot fail for want of space. Not
        # fsync-ed: after a machine crash the log is reopened, which sets the mark from the log itself.
        os.pwrite(self._mark_fd, _mark_bytes(size), 0)

    def __len__(self) -> int:
        return self.n_records

    def close(self) -> None:
        with self._lock:
            for name in ("_fd", "_mark_fd", "_lock_fd"):
                fd = getattr(self, name, -1)
                if fd >= 0:
                    os.close(fd)  # the lock fd last: closing it releases the flock
                    setattr(self, name, -1)


def read_events(path: str | Path) -> list[dict]:
    """Every complete record of a feedback log (for tests, the online learner and audits)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    with open(p, "rb") as f:
        for raw in f:
            if raw.endswith(b"\n"):
                try:
                    out.append(json.loads(raw))
                except ValueError:
                    pass
    return out
