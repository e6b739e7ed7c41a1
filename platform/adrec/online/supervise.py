"""Keeping the online learner alive, or saying that it is not: restarts from the checkpoint, then unhealthy.

:class:`Supervised` steps an :class:`~adrec.online.learner.OnlineLearner`. A step that raises (a log
that shrank, a full disk under the state folder, a bug) drops the learner and builds a new one from
its checkpoint after a backoff (``online.restart_backoff_s``, doubling), so exactly once holds across
the restart (log position and state come back together). After ``online.max_restarts`` failures in a row
the learner is unhealthy: ``status.json`` says ``healthy: false`` with the error, a ``failed`` record
is appended to ``status.jsonl``, and :meth:`Supervised.step` raises :class:`LearnerFailedError`
(the actor's ``check`` raises, ``adrec online`` exits non-zero). It never idles silently.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from adrec.errors import LearnerFailedError
from adrec.online.checkpoint import local_state_dir
from adrec.online.publish import StatusLog

log = logging.getLogger(__name__)


class Supervised:
    def __init__(self, make: Callable[[], object], cfg, state_dir: str | Path):
        self.make, self.cfg = make, cfg
        self.status_log = StatusLog(local_state_dir(state_dir))
        self.health = {"healthy": True, "error": None, "failures": 0, "restarts": 0}
        self.retry_at = 0.0  # monotonic time of the next restart (the backoff is waited out by the caller's loop)
        self.learner = make()  # a learner that cannot even start fails the caller at once
        self.learner.health = self.health

    @property
    def healthy(self) -> bool:
        return bool(self.health["healthy"])

    def step(self) -> int:
        """One learner step (records read); 0 while it waits to restart. Raises once it is unhealthy."""
        if not self.healthy:
            raise LearnerFailedError(f"the online learner is unhealthy: {self.health['error']}")
        if self.learner is None and time.monotonic() < self.retry_at:
            return 0
        try:
            if self.learner is None:
                self.learner = self.make()
                self.learner.health = self.health
                self.health["restarts"] += 1
                self.status_log.append({"event": "restarted", "after_error": self.health["error"],
                                        "records": self.learner.records})
                log.warning("online learner restarted from its checkpoint (record %d)", self.learner.records)
            n = self.learner.step()
        except Exception as err:
            self._failed(err)
            return 0
        self.health["failures"] = 0
        return n

    def _failed(self, err: Exception) -> None:
        self.learner = None  # its memory may be half-way through a record: start again from the checkpoint
        self.health["failures"] += 1
        self.health["error"] = f"{type(err).__name__}: {err}"
        n, limit = self.health["failures"], self.cfg.max_restarts
        if n > limit:
            self.health["healthy"] = False
            log.error("online learner failed %d times in a row; it stops and reports itself unhealthy: %s",
                      n, self.health["error"], exc_info=err)
            self._write({"event": "failed"})
            raise LearnerFailedError(f"the online learner failed {n} times in a row (at most {limit} restarts): "
                                     f"{self.health['error']}") from err
        wait = self.cfg.restart_backoff_s * 2 ** (n - 1)
        log.error("online learner step failed (%d of at most %d restarts in a row; next in %.1fs): %s", n, limit,
                  wait, self.health["error"], exc_info=err)
        self._write({"event": "step_failed", "retry_in_s": wait})
        self.retry_at = time.monotonic() + wait

    def _write(self, record: dict) -> None:
        """The failure into status.jsonl and status.json (the last summary, with the health now)."""
        try:
            self.status_log.append({**record, **self.health})
            summary = self.status_log.read_current()
            self.status_log.write({**summary, **self.health, "time": time.time()})
        except OSError as werr:  # the state folder itself may be what failed
            log.error("could not record the learner's failure in %s: %s", self.status_log.dir, werr)
