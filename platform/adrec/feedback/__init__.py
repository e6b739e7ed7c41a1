"""The feedback log behind ``POST /feedback`` and the online learner: one interface, several backends.

- :mod:`.base` - the interface: :class:`FeedbackLog` (a log at a location), :class:`LogWriter`
  (acknowledged = durable), :class:`LogReader` and its checkpointed :class:`Position`.
- :mod:`.filelog` - one local JSON-lines file, one writer (the embedded default).
- :mod:`.segments` - writers' immutable segments on a shared store (``s3://``, ``gs://``), group commit.
- :mod:`.records` - what a line holds; :mod:`.dedup` - the writers' bounded index of event ids.

:func:`open_log` picks the backend from the location: a local path is a file log, an object-store URI
a segment log (``kind`` chooses explicitly: segments in a local folder every node mounts, say).
"""

from __future__ import annotations

import os
from pathlib import Path

from adrec.errors import ConfigError
from adrec.feedback.base import (AppendResult, FeedbackLog, FeedbackWriteError, LogLockedError, LogReader, LogWriter,
                                 Position, ReadResult)
from adrec.feedback.filelog import FileLog
from adrec.feedback.records import CLICK, CONVERSION, IMPRESSION, Event, parse_event
from adrec.feedback.segments import SegmentLog
from adrec.storage import is_remote

__all__ = ["AppendResult", "CLICK", "CONVERSION", "Event", "FeedbackLog", "FeedbackWriteError", "FileLog", "IMPRESSION", "KINDS",
           "LogLockedError", "LogReader", "LogWriter", "Position", "ReadResult", "SegmentLog",
           "open_log", "parse_event"]

KINDS = ("file", "segments")


def open_log(uri: str | os.PathLike, kind: str | None = None, **options) -> FeedbackLog:
    """The feedback log at ``uri``: a local path -> the file log, ``s3://`` / ``gs://`` -> segments.

    ``options`` go to the backend (for segments: ``group_wait_s``, ``max_group_events``, ``writer_id``,
    ``seed_window_s``, ``seed_max_segments``: see :class:`~adrec.feedback.segments.SegmentWriter`).
    """
    s = os.fspath(uri)
    kind = kind or ("segments" if is_remote(s) else "file")
    if kind == "file":
        if is_remote(s):
            raise ConfigError(f"feedback log {s}: a file log lives on a local disk; an object store holds "
                              "a segment log (kind='segments', the default for it)")
        return FileLog(Path(s).expanduser(), **options)
    if kind == "segments":
        return SegmentLog(s, **options)
    raise ConfigError(f"feedback log {s}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
