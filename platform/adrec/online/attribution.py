"""Joining impressions with clicks within an attribution window, in event time.

- A click labels the most recent not-yet-clicked impression of the same (user, item) whose ``ts`` is
  at most ``window`` before the click's (and not after it). One impression takes one click: a second
  click on it is counted as a repeat, never learned twice.
- A click logged before its impression (clients report out of order) waits as an orphan until the
  impression arrives or can no longer arrive in time.
- The watermark is the largest event ``ts`` read so far, but never more than ``max_ahead_s`` past the
  learner's clock (``clock()``): an event stamped further ahead (a client sending nanoseconds, a log
  written before the ingress checked ``ts``, another writer) is counted as ``future_ts_clamped`` and
  moves the watermark only to that bound, so it cannot finalise pending impressions early. An impression is final (its label can no
  longer change) once the watermark passes ``ts + window + lateness``; final impressions leave the
  joiner in (deadline, arrival) order. Everything depends on the order of the log alone, so a replay
  from a checkpoint emits the same examples in the same order as the first pass.
- A click that finds its impression already final is counted as late; an orphan that expires without
  an impression is counted as unattributed. Neither is learned from.
- A conversion (issue 17: the second label of a two-task ranker) labels the most recent not-yet-converted
  impression of the same (user, item) whose ``ts`` is at most ``window`` before the conversion's, a clicked
  one first (the A/B report's rule, :mod:`adrec.evaluation.abtest`: one window from the impression). It may
  precede the click in the log; an impression that is final without a click has no conversion (ESMM's
  impression -> click -> conversion: the example's ``conversion`` is ``converted and clicked``). A conversion
  with no pending impression to label (its impression final already, or never seen) is counted as
  unattributed and learned from by no one: unlike a click it does not wait for its impression.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Example:
    """A labelled impression, ready to be scored and learned from."""

    seq: int  # arrival order of the impression in the log
    event_id: str
    user: str  # pseudonym
    item_idx: int
    ts: float
    context: dict
    hist: tuple  # the user's recent positives (item indices, oldest first) when the impression arrived
    label: int
    conversion: int = 0  # 1: converted after its click (only ever with label 1)

    def to_tuple(self) -> tuple:
        return (self.seq, self.event_id, self.user, self.item_idx, self.ts, self.context, self.hist, self.label,
                self.conversion)

    @classmethod
    def from_tuple(cls, t) -> "Example":
        return cls(*t)


COUNTERS = ("impressions", "clicks", "attributed_clicks", "repeat_clicks", "late_clicks", "unattributed_clicks",
            "examples", "positives", "future_ts_clamped", "conversions", "attributed_conversions",
            "unattributed_conversions", "converted_examples")


class AttributionJoiner:
    def __init__(self, window_s: float, lateness_s: float = 0.0, max_ahead_s: float | None = None,
                 clock: Callable[[], float] = time.time):
        self.window = float(window_s)
        self.lateness = float(lateness_s)
        self.max_ahead = max_ahead_s
        self.clock = clock
        self.watermark = -math.inf
        self.seq = 0
        # seq -> [event_id, user, item_idx, ts, context, hist, clicked, converted]
        self.pending: dict[int, list] = {}
        self.heap: list[tuple[float, int]] = []  # (deadline, seq)
        self.by_key: dict[tuple[str, int], list[int]] = {}  # (user, item) -> pending seqs, arrival order
        self.orphans: dict[tuple[str, int], list[float]] = {}  # (user, item) -> click ts not matched yet
        self.orphan_heap: list[tuple[float, str, int, float]] = []  # (expiry, user, item, click ts)
        self.counts = {k: 0 for k in COUNTERS}

    # ---- input ----------------------------------------------------------------------------------
    def _advance(self, ts: float) -> None:
        if self.max_ahead is not None:
            bound = self.clock() + self.max_ahead
            if ts > bound:
                self.counts["future_ts_clamped"] += 1
                ts = bound
        if ts > self.watermark:
            self.watermark = ts

    def impression(self, event_id: str, user: str, item_idx: int, ts: float, context: dict, hist: tuple) -> list[Example]:
        self.counts["impressions"] += 1
        seq = self.seq
        self.seq += 1
        key = (user, item_idx)
        clicked = False
        waiting = self.orphans.get(key)
        if waiting:
            for j, c in enumerate(waiting):
                if ts <= c <= ts + self.window:
                    waiting.pop(j)
                    if not waiting:
                        del self.orphans[key]
                    clicked = True
                    self.counts["attributed_clicks"] += 1
                    break
        self.pending[seq] = [event_id, user, item_idx, ts, context, hist, clicked, False]
        self.by_key.setdefault(key, []).append(seq)
        heapq.heappush(self.heap, (ts + self.window + self.lateness, seq))
        self._advance(ts)
        return self._release()

    def click(self, user: str, item_idx: int, ts: float) -> list[Example]:
        self.counts["clicks"] += 1
        key = (user, item_idx)
        best = None
        repeat = False
        for s in self.by_key.get(key, ()):
            imp = self.pending[s]
            if imp[3] <= ts <= imp[3] + self.window:
                if imp[6]:
                    repeat = True
                    continue
                if best is None or imp[3] >= self.pending[best][3]:
                    best = s
        if best is not None:
            self.pending[best][6] = True
            self.counts["attributed_clicks"] += 1
        elif repeat:
            self.counts["repeat_clicks"] += 1
        elif ts + self.lateness < self.watermark - self.window:
            # Any impression this click could belong to is final already.
            self.counts["late_clicks"] += 1
        else:
            self.orphans.setdefault(key, []).append(ts)
            heapq.heappush(self.orphan_heap, (ts + self.window + self.lateness, user, item_idx, ts))
        self._advance(ts)
        return self._release()

    def conversion(self, user: str, item_idx: int, ts: float) -> list[Example]:
        """A conversion record (see the module doc); returns the examples that became final."""
        self.counts["conversions"] += 1
        best = None
        for s in self.by_key.get((user, item_idx), ()):
            imp = self.pending[s]
            if imp[7] or not imp[3] <= ts <= imp[3] + self.window:
                continue
            # a clicked impression first, then the most recent (its click may still come)
            if best is None or (imp[6], imp[3]) >= (self.pending[best][6], self.pending[best][3]):
                best = s
        if best is None:
            self.counts["unattributed_conversions"] += 1
        else:
            self.pending[best][7] = True
            self.counts["attributed_conversions"] += 1
        self._advance(ts)
        return self._release()

    # ---- output ---------------------------------------------------------------------------------
    def _finalize(self, seq: int) -> Example:
        event_id, user, item_idx, ts, context, hist, clicked, converted = self.pending.pop(seq)
        key = (user, item_idx)
        seqs = self.by_key[key]
        seqs.remove(seq)
        if not seqs:
            del self.by_key[key]
        self.counts["examples"] += 1
        self.counts["positives"] += int(clicked)
        converted = bool(clicked and converted)  # a conversion counts behind a click only
        self.counts["converted_examples"] += int(converted)
        return Example(seq, event_id, user, item_idx, ts, context, hist, int(clicked), int(converted))

    def _expire_orphans(self, force: bool = False) -> None:
        while self.orphan_heap and (force or self.orphan_heap[0][0] < self.watermark):
            _, user, item, c = heapq.heappop(self.orphan_heap)
            waiting = self.orphans.get((user, item))
            if waiting and c in waiting:
                waiting.remove(c)
                if not waiting:
                    del self.orphans[(user, item)]
                self.counts["unattributed_clicks"] += 1

    def _release(self) -> list[Example]:
        out = []
        while self.heap and self.heap[0][0] < self.watermark:
            _, seq = heapq.heappop(self.heap)
            out.append(self._finalize(seq))
        self._expire_orphans()
        return out

    def flush(self) -> list[Example]:
        """End of stream: every pending impression is final now (in deadline order)."""
        out = []
        while self.heap:
            _, seq = heapq.heappop(self.heap)
            out.append(self._finalize(seq))
        self._expire_orphans(force=True)
        return out

    @property
    def n_pending(self) -> int:
        return len(self.pending)

    # ---- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"window": self.window, "lateness": self.lateness, "watermark": self.watermark, "seq": self.seq,
                "pending": {k: list(v) for k, v in self.pending.items()}, "heap": list(self.heap),
                "orphans": {k: list(v) for k, v in self.orphans.items()}, "orphan_heap": list(self.orphan_heap),
                "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.window, self.lateness = float(state["window"]), float(state["lateness"])
        self.watermark, self.seq = float(state["watermark"]), int(state["seq"])
        # a checkpoint from before conversions holds 7 fields per impression: not converted
        self.pending = {int(k): (list(v) + [False])[:8] for k, v in state["pending"].items()}
        self.heap = list(state["heap"])
        heapq.heapify(self.heap)
        self.by_key = {}
        for s in sorted(self.pending):
            v = self.pending[s]
            self.by_key.setdefault((v[1], v[2]), []).append(s)
        self.orphans = {tuple(k): list(v) for k, v in state["orphans"].items()}
        self.orphan_heap = list(state["orphan_heap"])
        heapq.heapify(self.orphan_heap)
        self.counts = {k: int(state["counts"].get(k, 0)) for k in COUNTERS}
