"""The local file backend of the feedback log: one durable, append-only JSON-lines file per log.

The embedded default (a local path as ``serve.feedback_log``); one machine's disk, so one writer.

- One JSON object per line; lines are only ever appended (``O_APPEND``), never rewritten.
- :meth:`FileWriter.append` returns only after the new lines are written and ``fsync``-ed, so an
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
- ``event_id`` is the idempotency key (:class:`~adrec.feedback.dedup.DedupIndex`, bounded); the index
  is rebuilt from the log (within the same bounds) when the log is opened.
- A torn last line (a crash in the middle of a write, which was therefore never acknowledged) is cut
  off when the log is opened, so the next append starts on a fresh line.
- Records carry pseudonymized user ids only; raw ids never reach the file.

**Reading** (:class:`FileReader`): a position is the byte offset just past the last *complete* line
consumed (:class:`FilePosition`), so a reader reads only what the writer acknowledged (never past the
committed mark; a log without a mark, from an older writer, is read up to its end), never consumes a
line still being written, and the only bytes the writer ever removes (a torn tail, a failed batch) lie
past every offset a reader can hold.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adrec.errors import ConfigError, LogShrankError
from adrec.feedback.base import (DEDUP_MAX_IDS, DEDUP_WINDOW_S, AppendResult, FeedbackLog, FeedbackWriteError,
                                 LogLockedError, LogReader, LogWriter, Position, ReadResult)
from adrec.feedback.dedup import DedupIndex, received_at
from adrec.feedback.records import Event, decode_lines, encode, parse_line

log = logging.getLogger(__name__)


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
class FileWriter(LogWriter):
    def __init__(self, path: str | Path, dedup_max_ids: int = DEDUP_MAX_IDS,
                 dedup_window_s: float | None = DEDUP_WINDOW_S, lock_wait_s: float = 0.0):
        self.path = Path(path)
        self.index = DedupIndex(dedup_max_ids, dedup_window_s)
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
            self.n_records = 0
            self.committed = self._load()
            self._mark_fd = os.open(committed_path(self.path), os.O_RDWR | os.O_CREAT, 0o600)
            self._write_mark(self.committed)
        except BaseException:
            self.close()
            raise

    @property
    def ids(self):
        """event_id -> received_at (seconds), oldest first: the bounded dedup index."""
        return self.index.ids

    @property
    def forgotten(self) -> int:
        return self.index.forgotten

    def seen(self, event_id: str) -> bool:
        return event_id in self.index

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
                                         "app its own serve.feedback_log, or put the log on a shared store "
                                         "(s3://...), where every writer has its own segments") from None
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
                self.index.add(eid, received_at(rec, now))
        self.index.forget_old(now)
        self.index.forgotten = 0
        size = self.path.stat().st_size
        if size > good:
            log.warning("feedback log %s: cutting a torn last line (%d bytes, never acknowledged)", self.path, size - good)
            os.truncate(self.path, good)
            os.fsync(self._fd)
        if bad:
            log.warning("feedback log %s: %d unreadable lines kept as they are", self.path, bad)
        log.info("feedback log %s: %d events (%d ids in the dedup window)", self.path, self.n_records, len(self.index))
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
            new = self.index.split(records, set(), res)
            if new:
                self._write_durably("".join(encode(rec) for rec in new).encode("utf-8"))
                self.index.remember(new)
                self.n_records += len(new)
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
    """Every complete record of a feedback log file (for tests, audits)."""
    p = Path(path)
    return decode_lines(p.read_bytes()) if p.exists() else []


# ---- the reader -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FilePosition(Position):
    offset: int  # just past the last complete line consumed

    def state(self) -> int:
        return self.offset


class FileReader(LogReader):
    """Reads complete records of a feedback log file from a byte offset, at most ``max_records`` at a time."""

    def __init__(self, path: str | Path, chunk_bytes: int = 1 << 20):
        self.path = Path(path)
        self.chunk_bytes = int(chunk_bytes)

    def start(self) -> FilePosition:
        return FilePosition(0)

    def position(self, state: Any) -> FilePosition:
        if isinstance(state, int) and not isinstance(state, bool) and state >= 0:
            return FilePosition(state)
        raise ConfigError(f"the checkpointed position {state!r} is not a byte offset of a feedback log file: "
                          f"it was made reading another kind of log than {self.path}; use another state folder")

    def file_size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def size(self) -> int:
        """How many bytes of the log may be read: the committed mark (capped by the file's length)."""
        size = self.file_size()
        mark = committed_size(self.path)
        return size if mark is None else min(mark, size)

    def caught_up(self, position: Position) -> bool:
        return position.offset >= self.size()

    def read(self, position: Position, max_records: int) -> ReadResult:
        offset = position.offset
        end = self.file_size()
        if end < offset:
            raise LogShrankError(f"feedback log {self.path} has {end} bytes, but {offset} were already consumed: "
                                 "it was replaced or rewritten; the learner refuses to guess where to continue")
        size = self.size()
        records: list[tuple[Event | None, Position]] = []
        pos = offset
        if size <= offset or max_records <= 0:
            return ReadResult(records, position)
        with open(self.path, "rb") as f:
            f.seek(offset)
            buf = b""
            while len(records) < max_records and f.tell() < size:
                chunk = f.read(min(self.chunk_bytes, size - f.tell()))
                if not chunk:
                    break
                buf += chunk
                start = 0
                while len(records) < max_records:
                    nl = buf.find(b"\n", start)
                    if nl < 0:
                        break
                    line = buf[start:nl + 1]
                    start = nl + 1
                    pos += len(line)
                    ev = parse_line(line)
                    if ev is None:
                        log.warning("feedback log %s: unreadable record ending at byte %d skipped", self.path, pos)
                    records.append((ev, FilePosition(pos)))
                buf = buf[start:]
        return ReadResult(records, FilePosition(pos))


class FileLog(FeedbackLog):
    """The feedback log as one local file (see the module documentation)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.uri = str(self.path)

    def writer(self, *, dedup_max_ids: int = DEDUP_MAX_IDS, dedup_window_s: float | None = DEDUP_WINDOW_S,
               handover_s: float = 0.0) -> FileWriter:
        return FileWriter(self.path, dedup_max_ids, dedup_window_s, lock_wait_s=handover_s)

    def reader(self) -> FileReader:
        return FileReader(self.path)

    def records(self) -> list[dict]:
        return read_events(self.path)
