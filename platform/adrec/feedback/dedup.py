"""The bounded index of event ids a writer has logged (``event_id`` is the idempotency key).

It keeps the newest ``max_ids`` ids, and none older than ``window_s`` (by the time the writer received
them): an event re-sent after it left the window is written again.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from adrec.feedback.base import DEDUP_MAX_IDS, DEDUP_WINDOW_S, AppendResult


def received_at(rec: dict, now: float) -> float:
    at = rec.get("received_at") if isinstance(rec, dict) else None
    return float(at) if isinstance(at, (int, float)) else now


class DedupIndex:
    def __init__(self, max_ids: int = DEDUP_MAX_IDS, window_s: float | None = DEDUP_WINDOW_S):
        self.max_ids = int(max_ids)
        self.window_s = window_s
        self.ids: OrderedDict[str, float] = OrderedDict()  # event_id -> received_at, oldest first
        self.forgotten = 0  # ids that left the window

    def __contains__(self, eid: str) -> bool:
        return eid in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, eid: str, at: float) -> None:
        self.ids[eid] = at
        self.ids.move_to_end(eid)
        if len(self.ids) > self.max_ids:
            self.ids.popitem(last=False)
            self.forgotten += 1

    def forget_old(self, now: float) -> None:
        horizon = now - self.window_s if self.window_s is not None else None
        while self.ids and (len(self.ids) > self.max_ids
                            or (horizon is not None and next(iter(self.ids.values())) < horizon)):
            self.ids.popitem(last=False)
            self.forgotten += 1

    def split(self, records: list[dict], pending: set[str], res: AppendResult) -> list[dict]:
        """The records whose id is neither logged nor in ``pending`` (ids about to be written, which
        the new ones join); the others go to ``res.duplicates``, the new ones to ``res.accepted``."""
        new = []
        for rec in records:
            eid = str(rec["event_id"])
            if eid in self.ids or eid in pending:
                res.duplicates.append(eid)
                continue
            pending.add(eid)
            new.append(rec)
            res.accepted.append(eid)
        return new

    def remember(self, records: list[dict]) -> None:
        """Index ``records``, now durably written."""
        now = time.time()
        for rec in records:
            self.add(str(rec["event_id"]), received_at(rec, now))
        self.forget_old(now)
