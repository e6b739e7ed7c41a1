"""The feedback log's interface: a writer, a reader and the reader's position, for every backend.

- :class:`LogWriter` - ``append(records) -> AppendResult``: returns only once the new records are
  durable where the log lives (acknowledged = durable); records whose ``event_id`` the writer already
  logged are reported as duplicates, never written twice. A batch that could not be stored raises
  :class:`FeedbackWriteError`, and nothing of it becomes visible to readers.
- :class:`LogReader` - ``read(position, max_records) -> ReadResult``: the committed records after
  ``position``, in the backend's defined order, each with the position just past it.
- :class:`Position` - where a reader stands: every record before it consumed, none after. Immutable;
  :meth:`Position.state` is plain data (ints, strings, lists, dicts), which the online learner
  checkpoints together with its model, and :meth:`LogReader.position` turns back into a position.
  Resuming from a checkpointed position re-reads exactly the records after it (exactly once).
- :class:`FeedbackLog` - a log at a location, opening its writers and readers (see
  :func:`adrec.feedback.open_log`, which picks the backend from the location).

A new backend (a message broker: Kafka, with a position of ``{partition: offset}``) implements these
four classes and a scheme in :func:`adrec.feedback.open_log`; the learner sees only this interface.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from adrec.feedback.records import Event

# Defaults of a writer's dedup window (ServeConfig.feedback_dedup_max_ids / feedback_dedup_window_s).
DEDUP_MAX_IDS = 1_000_000
DEDUP_WINDOW_S = 7 * 86400.0


class LogLockedError(RuntimeError):
    """Another writer holds the feedback log (a backend with one writer per log)."""


class FeedbackWriteError(OSError):
    """A batch could not be written durably; nothing of it is in the log (or visible to readers)."""


@dataclass
class AppendResult:
    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)


class Position(ABC):
    """Where a reader stands in a log (see the module documentation)."""

    @abstractmethod
    def state(self) -> Any:
        """Plain data for a checkpoint (and for status reports)."""


@dataclass
class ReadResult:
    # (event, or None for an unreadable record; the position just past that record), in log order
    records: list[tuple[Event | None, Position]]
    end: Position  # just past the last record read (the position read from when nothing was)

    @property
    def events(self) -> list[Event]:
        return [e for e, _ in self.records if e is not None]

    @property
    def bad_lines(self) -> int:
        return sum(e is None for e, _ in self.records)


class LogWriter(ABC):
    """Appends records durably; one per writer replica (see the module documentation)."""

    @abstractmethod
    def append(self, records: list[dict]) -> AppendResult:
        """Write the records whose ``event_id`` is new and return once they are durable."""

    async def append_async(self, records: list[dict]) -> AppendResult:
        """:meth:`append` for an event loop (a Serve replica): the wait never blocks the loop."""
        return await asyncio.to_thread(self.append, records)

    @abstractmethod
    def seen(self, event_id: str) -> bool:
        """Whether this writer logged ``event_id`` (within its dedup window)."""

    @abstractmethod
    def __len__(self) -> int:
        """How many records this writer wrote (the file log's single writer: all the log holds)."""

    @abstractmethod
    def close(self) -> None:
        """Finish (acknowledged records stay); appends after it raise :class:`FeedbackWriteError`."""

    def __enter__(self) -> "LogWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LogReader(ABC):
    """Reads committed records from a position (see the module documentation)."""

    @abstractmethod
    def start(self) -> Position:
        """The position before the first record."""

    @abstractmethod
    def position(self, state: Any) -> Position:
        """The position a checkpoint holds (:meth:`Position.state`); a ConfigError for another backend's."""

    @abstractmethod
    def read(self, position: Position, max_records: int) -> ReadResult:
        """At most ``max_records`` committed records after ``position``."""

    @abstractmethod
    def caught_up(self, position: Position) -> bool:
        """Whether ``position`` is past every record committed now."""

    @abstractmethod
    def size(self) -> int:
        """Bytes committed to the log (as of the last look: for status reports)."""


class FeedbackLog(ABC):
    """A feedback log at a location: opens its writers and readers."""

    uri: str

    @abstractmethod
    def writer(self, *, dedup_max_ids: int = DEDUP_MAX_IDS, dedup_window_s: float | None = DEDUP_WINDOW_S,
               handover_s: float = 0.0) -> LogWriter:
        """A writer whose dedup index keeps ``dedup_max_ids`` ids received within ``dedup_window_s`` (None:
        no time bound); ``handover_s``: how long it waits for a writer it replaces to let go (backends with
        one writer per log)."""

    @abstractmethod
    def reader(self) -> LogReader: ...

    @abstractmethod
    def records(self) -> list[dict]:
        """Every committed record, in the reader's order (for tests and audits)."""
