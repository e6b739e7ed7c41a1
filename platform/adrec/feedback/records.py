"""What one line of a feedback log holds, for writers and readers of every backend.

A record is one JSON object per line (``event_id``, pseudonymized ``user``, ``item``, ``type``, ``ts``,
``context``, ``received_at``, ``version``). Writers encode with :func:`encode`; readers turn a line into
an :class:`Event` (what the learner needs) with :func:`parse_line`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

IMPRESSION = "impression"
CLICK = "click"
# A conversion after a click (a purchase, a sign-up); the A/B report's CVR. The online learner attributes it
# to a clicked impression; a two-task (ESMM) ranker learns its CVR tower from it, a click-only one nothing.
CONVERSION = "conversion"
TYPES = (IMPRESSION, CLICK, CONVERSION)


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
        if typ not in TYPES or not math.isfinite(ts):
            return None
        ctx = rec.get("context") or {}
        return Event(str(rec["event_id"]), str(rec["user"]), str(rec["item"]), typ, ts,
                     {str(k): v for k, v in ctx.items()} if isinstance(ctx, dict) else {})
    except (KeyError, TypeError, ValueError):
        return None


def parse_line(line: bytes) -> Event | None:
    """One log line -> :class:`Event`, or None for an unreadable one."""
    try:
        return parse_event(json.loads(line))
    except ValueError:
        return None


def encode(rec: dict) -> str:
    """One record as a log line (compact JSON, ASCII, no NaN; with its newline)."""
    return json.dumps(rec, separators=(",", ":"), ensure_ascii=True, allow_nan=False) + "\n"


def decode_lines(data: bytes) -> list[dict]:
    """Every complete, readable record in ``data`` (a torn last line and unreadable lines are left out)."""
    out = []
    for raw in data.splitlines(keepends=True):
        if raw.endswith(b"\n"):
            try:
                out.append(json.loads(raw))
            except ValueError:
                pass
    return out
