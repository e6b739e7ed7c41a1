"""The durable, append-only feedback log (JSON lines) behind ``POST /feedback``.

- One JSON object per line; lines are only ever appended (``O_APPEND``), never rewritten.
- :meth:`FeedbackLog.append` returns only after the new lines are written and ``fsync``-ed, so an
  acknowledged event survives a crash of the replica, of Serve or of the machine.
- ``event_id`` is the idempotency key: an id already in the log (or twice in one batch) is accepted
  and reported as a duplicate, never written twice. The index of seen ids is rebuilt from the log
  when the log is opened.
- A torn last line (a crash in the middle of a write, which was therefore never acknowledged) is cut
  off when the log is opened, so the next append starts on a fresh line.
- Records carry pseudonymized user ids only; raw ids never reach the file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


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


class FeedbackLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        new_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if new_dir:
            _fsync_dir(self.path.parent.parent)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if created:
            os.fsync(self._fd)
            _fsync_dir(self.path.parent)
        self.ids: set[str] = set()
        self.n_records = 0
        self._load()

    # ---- recovery -----------------------------------------------------------------------------
    def _load(self) -> None:
        good = 0  # byte offset just past the last complete line
        bad = 0
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn tail: never acknowledged
                good += len(raw)
                try:
                    rec = json.loads(raw)
                    self.ids.add(str(rec["event_id"]))
                    self.n_records += 1
                except (ValueError, KeyError, TypeError):
                    bad += 1
        size = self.path.stat().st_size
        if size > good:
            log.warning("feedback log %s: cutting a torn last line (%d bytes, never acknowledged)", self.path, size - good)
            os.truncate(self.path, good)
            os.fsync(self._fd)
        if bad:
            log.warning("feedback log %s: %d unreadable lines kept as they are", self.path, bad)
        log.info("feedback log %s: %d events", self.path, self.n_records)

    # ---- writing ------------------------------------------------------------------------------
    def append(self, records: list[dict]) -> AppendResult:
        """Write the records whose ``event_id`` is new, fsync, and only then report them accepted."""
        with self._lock:
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
                self.ids |= batch_ids
                self.n_records += len(lines)
            return res

    def _write_durably(self, data: bytes) -> None:
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)
        except OSError:
            # Leave no partial batch behind: none of it was acknowledged.
            try:
                os.truncate(self.path, start)
            except OSError:
                log.exception("feedback log %s: could not roll back a failed write", self.path)
            raise

    def __len__(self) -> int:
        return self.n_records

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


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
