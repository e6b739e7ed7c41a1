"""The shared-store backend of the feedback log: every writer its own numbered, immutable segments.

For a log every node reaches (``s3://bucket/prefix``, ``gs://...``; any :mod:`adrec.storage` location)::

    <log>/<writer id>/<seq:012d>-<commit ms:013d>.jsonl     JSON lines, as in the file log

**Writing** (:class:`SegmentWriter`, one per writer replica, on any node):

- Each writer picks a fresh id when it opens (UTC start time, host, pid, random: :func:`new_writer_id`),
  so two writers never share a sequence, whatever the nodes' disks and clocks: a crashed writer's
  replacement is a new writer (its predecessor's segments stay and are read as they are). An explicit
  ``writer_id`` resumes that writer's sequence after its last segment; it is for one writer at a time
  (nothing on a plain object store can refuse a second).
- **Group commit**: ``append`` hands its records to the writer's commit thread and waits. The thread
  takes the first waiting request, collects what else arrives within ``group_wait_s`` (a few ms; and
  whatever queued while the previous segment was being written), writes the group's new records as ONE
  segment with one whole-object write (:meth:`adrec.storage.Location.write_bytes`: an object becomes
  visible only complete), and only then acknowledges every request of the group.
- ``event_id`` deduplication per writer, bounded, as in the file log (:class:`~adrec.feedback.dedup.DedupIndex`).
  A new writer seeds its index from every writer's segments of the last ``seed_window_s`` (15 min, by the
  commit time in their names; the newest ``seed_max_segments`` at most), so a client's retry of an event
  that a crashed writer acknowledged is still answered as a duplicate by its replacement. A retry that
  reaches another live writer replica is logged again (the learner sees it twice).
- **A failed write** fails every request of the group (:class:`FeedbackWriteError`: 503) and nothing
  of it is visible. Its sequence number is never used again: if the store took the object although the
  client saw an error, a later write with that number would replace what a reader may have read. Before
  its next write the writer looks for that object: when it is there after all, its events are in the log
  and their ids join the dedup index (the clients' retries are answered as duplicates).

**Reading** (:class:`SegmentReader`). The defined order of a log's records: segments sorted by
(commit ms, writer id, seq), the lines of each in file order. Each writer's commit times never decrease,
so this is every writer's own sequence order, and a static log reads the same however it is batched.
Segments that appear later are read when they appear (a reader's order is the order of what it found),
so exactly-once comes from the position: :class:`SegmentPosition` is, per writer, (next seq, records of
that segment consumed); a record is consumed once because every writer's part of the position only
moves forward. Sequence numbers may have gaps (failed writes); a segment that lands below a writer's
position after the reader passed it (a write that failed as far as its writer knew) is never read.

Listing the log is one (paginated) LIST per read: a log that grows for months wants a retention or
compaction of consumed segments (not done here).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from adrec.errors import ConfigError, LogShrankError
from adrec.feedback.base import (DEDUP_MAX_IDS, DEDUP_WINDOW_S, AppendResult, FeedbackLog, FeedbackWriteError,
                                 LogReader, LogWriter, Position, ReadResult)
from adrec.feedback.dedup import DedupIndex
from adrec.feedback.records import Event, decode_lines, encode, parse_line
from adrec.storage import Location, resolve

log = logging.getLogger(__name__)

GROUP_WAIT_S = 0.005  # how long a group collects requests after its first one arrived
MAX_GROUP_EVENTS = 20_000  # records of one segment at most (a larger single request is one segment still)
SEED_WINDOW_S = 900.0  # a new writer's dedup index starts with the ids of the log's segments this recent ...
SEED_MAX_SEGMENTS = 200  # ... the newest this many at most (read when the writer opens)
SEGMENT_RE = re.compile(r"^(\d{12})-(\d{13})\.jsonl$")
_WRITER_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def segment_name(seq: int, ms: int) -> str:
    return f"{seq:012d}-{ms:013d}.jsonl"


def new_writer_id() -> str:
    """A writer id no other writer has: UTC start time (ids sort by it), host, pid and 48 random bits."""
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", socket.gethostname())[:40] or "host"
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{host}-{os.getpid()}-{secrets.token_hex(6)}"


@dataclass(frozen=True, order=True)
class Segment:
    ms: int
    writer: str
    seq: int
    size: int = field(compare=False)

    @property
    def name(self) -> str:
        return f"{self.writer}/{segment_name(self.seq, self.ms)}"


def list_segments(root: Location) -> list[Segment]:
    """Every segment under the log ``root``, in the log's order (one recursive listing)."""
    out = []
    for entry in root.files(recursive=True):
        writer, _, base = entry.name.rpartition("/")
        m = SEGMENT_RE.match(base)
        if m and writer and "/" not in writer:
            out.append(Segment(int(m[2]), writer, int(m[1]), entry.size))
    return sorted(out)


def _lines(data: bytes) -> list[bytes]:
    return [ln for ln in data.splitlines(keepends=True) if ln.strip()]


# ---- the writer -------------------------------------------------------------------------------------------
@dataclass
class _Request:
    records: list[dict]
    future: Future
    arrived: float = field(default_factory=time.monotonic)


class SegmentWriter(LogWriter):
    """One writer replica's sequence of segments, written by group commit (see the module documentation)."""

    def __init__(self, root: str | Location, dedup_max_ids: int = DEDUP_MAX_IDS,
                 dedup_window_s: float | None = DEDUP_WINDOW_S, group_wait_s: float = GROUP_WAIT_S,
                 max_group_events: int = MAX_GROUP_EVENTS, writer_id: str | None = None,
                 seed_window_s: float = SEED_WINDOW_S, seed_max_segments: int = SEED_MAX_SEGMENTS):
        self.root = resolve(root)
        if writer_id is not None and not _WRITER_RE.match(writer_id):
            raise ConfigError(f"feedback writer id {writer_id!r}: use letters, digits, '.', '_' and '-' only")
        self.writer_id = writer_id or new_writer_id()
        self.dir = self.root / self.writer_id
        self.group_wait_s = float(group_wait_s)
        self.max_group_events = int(max_group_events)
        self.index = DedupIndex(dedup_max_ids, dedup_window_s)
        self.n_records = 0
        self.seq, self.last_ms = 1, 0
        self.segments_written = 0
        self._doubt: tuple[Location, list[dict]] | None = None  # a failed write that may have landed
        self._open(writer_id is not None, seed_window_s, seed_max_segments)
        self._cv = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"adrec-feedback-{self.writer_id}", daemon=True)
        self._thread.start()
        log.info("feedback writer %s on %s (group commit: %.0f ms)", self.writer_id, self.root.uri,
                 1000 * self.group_wait_s)

    def _open(self, resume: bool, seed_window_s: float, seed_max_segments: int) -> None:
        segs = list_segments(self.root)
        horizon_ms = 1000 * (time.time() - seed_window_s)
        seeded = 0
        for s in [s for s in segs if s.ms >= horizon_ms][-seed_max_segments:] if seed_max_segments > 0 else []:
            recs = decode_lines((self.root / s.name).read_bytes())
            self.index.remember(recs)
            seeded += len(recs)
        mine = [s for s in segs if s.writer == self.writer_id] if resume else []
        if mine:
            self.seq = max(s.seq for s in mine) + 1
            self.last_ms = max(s.ms for s in mine)
            log.info("feedback writer %s resumes after segment %d", self.writer_id, self.seq - 1)
        if seeded:
            log.info("feedback writer %s: %d ids of the log's recent segments in its dedup index", self.writer_id,
                     len(self.index))

    # ---- the interface ------------------------------------------------------------------------------
    def submit(self, records: list[dict]) -> Future:
        """Queue ``records`` for the next group; the future holds its :class:`AppendResult` once durable."""
        fut: Future = Future()
        with self._cv:
            if self._closed:
                fut.set_exception(FeedbackWriteError(errno.EBADF, f"feedback writer {self.writer_id} is closed"))
                return fut
            self._queue.append(_Request(list(records), fut))
            self._cv.notify()
        return fut

    def append(self, records: list[dict]) -> AppendResult:
        """Write the records whose ``event_id`` is new (with the group this request joins); returns once
        their segment is on the store. Raises :class:`FeedbackWriteError` when it could not be written."""
        return self.submit(records).result()

    async def append_async(self, records: list[dict]) -> AppendResult:
        # The request waits on its group's future, not in a thread of the loop's small pool (which would
        # hold back the requests beyond the pool's size from joining the group being collected).
        return await asyncio.wrap_future(self.submit(records))

    def seen(self, event_id: str) -> bool:
        return event_id in self.index

    def __len__(self) -> int:
        return self.n_records

    def close(self) -> None:
        """Write what is queued, then stop the commit thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    # ---- the commit thread --------------------------------------------------------------------------
    def _next_group(self) -> list[_Request] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None  # closed and drained
            deadline = self._queue[0].arrived + self.group_wait_s
            while not self._closed and sum(len(r.records) for r in self._queue) < self.max_group_events:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            group, n = [], 0
            while self._queue and (not group or n + len(self._queue[0].records) <= self.max_group_events):
                req = self._queue.popleft()
                group.append(req)
                n += len(req.records)
            return group

    def _run(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            try:
                self._commit(group)
            except BaseException as err:  # never leave a request waiting forever
                log.exception("feedback writer %s: commit failed", self.writer_id)
                for req in group:
                    if not req.future.done():
                        req.future.set_exception(err)

    def _fail(self, group: list[_Request], err: BaseException) -> None:
        msg = f"the feedback log could not be written ({type(err).__name__}: {err})"
        for req in group:
            if not req.future.done():
                req.future.set_exception(FeedbackWriteError(errno.EIO, msg))

    def _commit(self, group: list[_Request]) -> None:
        try:
            self._resolve_doubt()
        except Exception as err:  # the store is still unreachable: nothing can be written now
            self._fail(group, err)
            return
        pending: set[str] = set()
        results: list[tuple[_Request, AppendResult, bool]] = []
        lines: list[str] = []
        new_records: list[dict] = []
        for req in group:
            try:
                encoded = {id(r): encode(r) for r in req.records}
            except (TypeError, ValueError) as err:  # this request's records, not the group's, are at fault
                req.future.set_exception(err)
                continue
            before = set(pending)
            res = AppendResult()
            new = self.index.split(req.records, pending, res)
            # A request waits for the write when it adds records or repeats ones this group adds.
            results.append((req, res, bool(new) or any(d in before for d in res.duplicates)))
            lines += [encoded[id(r)] for r in new]
            new_records += new
        if new_records:
            ms = max(int(time.time() * 1000), self.last_ms)
            target = self.dir / segment_name(self.seq, ms)
            self.seq += 1  # never reused, whatever the write's outcome (see the module documentation)
            self.last_ms = ms
            try:
                target.write_bytes("".join(lines).encode("utf-8"))
            except Exception as err:
                self._doubt = (target, new_records)
                log.error("feedback writer %s: segment %s could not be written (%s); its %d requests are not "
                          "acknowledged", self.writer_id, target.uri, err, sum(w for _, _, w in results))
                self._fail([req for req, _, waits in results if waits], err)
                for req, res, waits in results:
                    if not waits:
                        req.future.set_result(res)
                return
            self.index.remember(new_records)
            self.n_records += len(new_records)
            self.segments_written += 1
        for req, res, _ in results:
            req.future.set_result(res)

    def _resolve_doubt(self) -> None:
        if self._doubt is None:
            return
        target, records = self._doubt
        if target.exists():
            log.warning("feedback writer %s: segment %s is on the store although its write reported an error: its "
                        "%d events are in the log", self.writer_id, target.uri, len(records))
            self.index.remember(records)
            self.n_records += len(records)
        self._doubt = None


# ---- the reader -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentPosition(Position):
    """Per writer: (the next segment's seq, how many of its records are consumed); absent: nothing read."""

    writers: dict[str, tuple[int, int]] = field(default_factory=dict)

    def get(self, writer: str) -> tuple[int, int]:
        return self.writers.get(writer, (0, 0))

    def moved(self, writer: str, seq: int, line: int) -> "SegmentPosition":
        return SegmentPosition({**self.writers, writer: (seq, line)})

    def state(self) -> dict:
        return {"writers": {w: [s, n] for w, (s, n) in sorted(self.writers.items())}}


class SegmentReader(LogReader):
    """Reads every writer's segments in the log's order from a :class:`SegmentPosition`."""

    def __init__(self, root: str | Location):
        self.root = resolve(root)
        self._listed_bytes = 0
        self._cached: tuple[str, list[bytes]] | None = None  # the segment read last (a read may stop inside it)

    def start(self) -> SegmentPosition:
        return SegmentPosition()

    def position(self, state: Any) -> SegmentPosition:
        try:
            if isinstance(state, dict) and set(state) == {"writers"}:
                out = {}
                for w, (s, n) in state["writers"].items():
                    if isinstance(s, bool) or isinstance(n, bool) or int(s) != s or int(n) != n or s < 0 or n < 0:
                        raise ValueError(w)
                    out[str(w)] = (int(s), int(n))
                return SegmentPosition(out)
        except (TypeError, ValueError):
            pass
        raise ConfigError(f"the checkpointed position {state!r} is not a position in a segment log: it was made "
                          f"reading another kind of log than {self.root.uri}; use another state folder")

    def _list(self) -> list[Segment]:
        segs = list_segments(self.root)
        self._listed_bytes = sum(s.size for s in segs)
        return segs

    def _segment_lines(self, seg: Segment) -> list[bytes]:
        if self._cached is None or self._cached[0] != seg.name:
            self._cached = (seg.name, _lines((self.root / seg.name).read_bytes()))
        return self._cached[1]

    def size(self) -> int:
        return self._listed_bytes

    def caught_up(self, position: Position) -> bool:
        return not any(s.seq >= position.get(s.writer)[0] for s in self._list())

    def read(self, position: Position, max_records: int) -> ReadResult:
        records: list[tuple[Event | None, Position]] = []
        pos = position
        if max_records <= 0:
            return ReadResult(records, pos)
        for seg in self._list():
            seq, done = pos.get(seg.writer)
            if seg.seq < seq:
                continue
            if len(records) >= max_records:
                break
            lines = self._segment_lines(seg)
            first = done if seg.seq == seq else 0
            if first >= len(lines) and first:
                raise LogShrankError(f"feedback segment {self.root.uri}/{seg.name} has {len(lines)} records, but "
                                     f"{first} were already consumed: it was rewritten; the learner refuses to guess "
                                     "where to continue")
            for k in range(first, len(lines)):
                if len(records) >= max_records:
                    break
                ev = parse_line(lines[k])
                if ev is None:
                    log.warning("feedback log %s: unreadable record %d of segment %s skipped", self.root.uri, k,
                                seg.name)
                pos = pos.moved(seg.writer, seg.seq, k + 1) if k + 1 < len(lines) else \
                    pos.moved(seg.writer, seg.seq + 1, 0)
                records.append((ev, pos))
        return ReadResult(records, pos)


class SegmentLog(FeedbackLog):
    """The feedback log as writers' segments on a shared store (see the module documentation)."""

    def __init__(self, uri: str | Location, group_wait_s: float = GROUP_WAIT_S,
                 max_group_events: int = MAX_GROUP_EVENTS, writer_id: str | None = None,
                 seed_window_s: float = SEED_WINDOW_S, seed_max_segments: int = SEED_MAX_SEGMENTS):
        self.root = resolve(uri)
        self.uri = self.root.uri
        self.options = {"group_wait_s": group_wait_s, "max_group_events": max_group_events, "writer_id": writer_id,
                        "seed_window_s": seed_window_s, "seed_max_segments": seed_max_segments}

    def writer(self, *, dedup_max_ids: int = DEDUP_MAX_IDS, dedup_window_s: float | None = DEDUP_WINDOW_S,
               handover_s: float = 0.0) -> SegmentWriter:
        # handover_s: no lock to wait for, every writer has its own segments.
        return SegmentWriter(self.root, dedup_max_ids, dedup_window_s, **self.options)

    def reader(self) -> SegmentReader:
        return SegmentReader(self.root)

    def records(self) -> list[dict]:
        return [rec for seg in list_segments(self.root) for rec in decode_lines((self.root / seg.name).read_bytes())]
