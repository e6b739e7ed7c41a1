"""Reading the feedback log incrementally, from a byte offset.

The log (:mod:`adrec.serving.feedback`) is append-only JSON lines. A reader position is the byte
offset just past the last *complete* line it consumed, so:

- it reads only what the writer acknowledged: never past the log's committed mark
  (:func:`adrec.serving.feedback.committed_size`), so a batch whose write failed and was cut off
  again is never seen (a log without a mark, from an older writer, is read up to its end);
- a line still being written (no newline yet) is never consumed: the next read starts at it again;
- the only bytes the writer ever removes are such a torn tail or failed batch, which lie past every
  offset a reader can hold;
- the offset is what the learner checkpoints together with its model: resuming from it re-reads
  exactly the records after the last checkpoint, none skipped and none twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from adrec.errors import LogShrankError
from adrec.serving.feedback import committed_size

log = logging.getLogger(__name__)

IMPRESSION = "impression"
CLICK = "click"


@dataclass(frozen=True)
class Event:
    """One feedback record, as the learner needs it (``user`` is the pseudonym the ingress wrote)."""

    event_id: str
    user: str
    item: str
    type: str
    ts: float
    context: dict = field(default_factory=dict, hash=False, compare=False)


def parse_event(rec: dict) -> Event | None:
    """A log record -> :class:`Event`, or None when it lacks what the learner needs."""
    try:
        typ = str(rec["type"])
        ts = float(rec["ts"])
        if typ not in (IMPRESSION, CLICK) or not math.isfinite(ts):
            return None
        ctx = rec.get("context") or {}
        return Event(str(rec["event_id"]), str(rec["user"]), str(rec["item"]), typ, ts,
                     {str(k): v for k, v in ctx.items()} if isinstance(ctx, dict) else {})
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class ReadResult:
    # (event or None for an unreadable line, byte offset just past that line), in log order
    records: list[tuple[Event | None, int]]
    end_offset: int  # just past the last complete line read

    @property
    def events(self) -> list[Event]:
        return [e for e, _ in self.records if e is not None]

    @property
    def bad_lines(self) -> int:
        return sum(e is None for e, _ in self.records)


class FeedbackReader:
    """Reads complete records of a feedback log from a byte offset, at most ``max_records`` at a time."""

    def __init__(self, path: str | Path, chunk_bytes: int = 1 << 20):
        self.path = Path(path)
        self.chunk_bytes = int(chunk_bytes)

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

    def read(self, offset: int, max_records: int) -> ReadResult:
        end = self.file_size()
        if end < offset:
            raise LogShrankError(f"feedback log {self.path} has {end} bytes, but {offset} were already consumed: "
                                 "it was replaced or rewritten; the learner refuses to guess where to continue")
        size = self.size()
        records: list[tuple[Event | None, int]] = []
        pos = offset
        if size <= offset or max_records <= 0:
            return ReadResult(records, pos)
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
                    ev = None
                    try:
                        ev = parse_event(json.loads(line))
                    except ValueError:
                        pass
                    if ev is None:
                        log.warning("feedback log %s: unreadable record ending at byte %d skipped", self.path, pos)
                    records.append((ev, pos))
                buf = buf[start:]
        return ReadResult(records, pos)
