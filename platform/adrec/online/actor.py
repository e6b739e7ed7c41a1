"""The online learner as a Ray actor beside the Serve app, and rollouts of what it publishes.

- :class:`LearnerActor` wraps an :class:`OnlineLearner`: a background thread consumes the feedback
  log (``step`` while there is something to read, ``poll_interval_s`` sleeps otherwise) under
  ``SCHED_IDLE`` (``online.sched_idle``; else a higher nice value, ``online.nice``) and an optional duty
  cycle (``online.max_busy_fraction``), so that serving keeps its latency: the learner only gets the CPU
  time the replicas leave idle. (Ray starts its workers at nice 15 already, Serve replicas included, so
  a nice value alone barely separates the two; SCHED_IDLE does.) Its methods (``status``, ``flush``,
  ``stop``, ...) are safe to call while it runs. Started with ``max_restarts``, Ray brings a crashed learner back; the new instance
  restores the checkpoint and carries on from there (exactly once, see :mod:`adrec.online.learner`).
  A step that raises is restarted in the actor (:mod:`adrec.online.supervise`: from the checkpoint,
  bounded, with backoff); past that the actor reports itself unhealthy (``status()["healthy"]``,
  ``check()`` raises) instead of idling. Pruning never removes the version Serve serves nor its predecessor.
- :class:`Rollouts` turns every published version into a Serve rollout
  (:func:`adrec.serving.deploy.rollout`: the deployments' ``user_config`` changes, the replicas load
  the new version beside the live one and switch without dropping requests). It runs in its own
  thread and always rolls out the newest published version (an older one still waiting is skipped).
- :func:`start_learner` starts (or finds) the named actor; :func:`serve_with_learner` deploys the Serve
  app and starts its learner on the app's feedback log.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from adrec.run import RunDir

log = logging.getLogger(__name__)

DEFAULT_NAME = "adrec-online-learner"


def _logging() -> None:
    pkg = logging.getLogger("adrec")
    if not any(not isinstance(h, logging.NullHandler) for h in pkg.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False


def lower_priority(cfg, nice_target: int) -> str:
    """Make the calling thread give way to serving; returns what it now runs as.

    On Linux both the scheduling policy and the nice value belong to a thread (pid 0 = the caller).
    """
    if cfg.sched_idle and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError as err:
            log.warning("SCHED_IDLE unavailable (%s): lowering the learner's nice value instead", err)
    if cfg.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice_target)
            return f"nice {nice_target}"
        except OSError as err:
            log.warning("could not lower the learner's CPU priority: %s", err)
    return "normal"


class Rollouts:
    """Rolls published versions out to a running Serve app, newest first, one at a time."""

    def __init__(self, app_args, min_interval_s: float = 0.0):
        self.args = app_args
        self.min_interval_s = float(min_interval_s)
        self._last_end: float | None = None  # monotonic end of the previous rollout
        self._cv = threading.Condition()
        self._wanted: tuple[str, str] | None = None
        self.history: list[dict] = []
        self.live: str | None = None
        self.previous: str | None = None  # the version live before ``live`` (requests in flight may use it)
        self.busy = False
        self._thread = threading.Thread(target=self._run, name="adrec-rollouts", daemon=True)
        self._thread.start()

    def submit(self, path: str, record: dict) -> None:
        """Roll the version at ``path`` (a folder or URI) out next (replacing one not yet started)."""
        with self._cv:
            self._wanted = (str(path), str(record.get("version")))
            self._cv.notify()

    def _run(self) -> None:
        from adrec.serving.deploy import rollout

        while True:
            with self._cv:
                while self._wanted is None:
                    self._cv.wait()
                # Not before min_interval_s after the previous rollout; a newer version submitted while
                # waiting replaces this one (only the newest is rolled out).
                while self._last_end is not None and (
                        rest := self._last_end + self.min_interval_s - time.monotonic()) > 0:
                    self._cv.wait(rest)
                path, vid = self._wanted
                self._wanted = None
                self.busy = True
            t0 = time.perf_counter()
            rec = {"version": vid, "path": str(path), "started": time.time()}
            try:
                rollout(self.args, path)
                if vid != self.live:
                    self.previous, self.live = self.live, vid
                rec["ok"] = True
                log.info("rolled out %s in %.1fs", vid, time.perf_counter() - t0)
            except Exception as err:
                rec.update(ok=False, error=repr(err))
                log.error("rollout of %s failed: %s", vid, err)
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            with self._cv:
                self._last_end = time.monotonic()
                self.history.append(rec)
                self.busy = False
                self._cv.notify_all()

    def live_versions(self) -> set[str]:
        """The versions the app may serve now (the live one, the one before, and one being rolled out)."""
        with self._cv:
            return {v for v in (self.live, self.previous, self._wanted[1] if self._wanted else None) if v}

    def idle(self) -> bool:
        with self._cv:
            return self._wanted is None and not self.busy

    def status(self) -> dict:
        with self._cv:
            return {"live": self.live, "busy": self.busy, "pending": self._wanted[1] if self._wanted else None,
                    "done": len([h for h in self.history if h.get("ok")]),
                    "failed": len([h for h in self.history if not h.get("ok")]), "history": list(self.history[-100:])}


class LearnerActor:
    """The :class:`OnlineLearner` in a Ray actor (see the module documentation)."""

    def __init__(self, cfg, base_model_dir: str, feedback_log: str, state_dir: str, app_args=None,
                 name: str = DEFAULT_NAME, autostart: bool = True):
        from adrec.online.learner import OnlineLearner
        from adrec.online.supervise import Supervised

        _logging()
        self.cfg = cfg
        # The learning thread runs at this priority (on Linux a nice value belongs to a thread, so the
        # loop sets it for itself; the actor's other threads answer calls and roll out at full priority).
        self._priority = min(19, os.getpriority(os.PRIO_PROCESS, 0) + int(cfg.nice))
        self.rollouts = Rollouts(app_args, cfg.rollout_min_interval_s) if app_args is not None else None
        self._stop = threading.Event()

        def make():
            return OnlineLearner(cfg, base_model_dir, feedback_log, state_dir, name=name,
                                 on_publish=self.rollouts.submit if self.rollouts else None,
                                 live_versions=self.rollouts.live_versions if self.rollouts else None)

        self.supervised = Supervised(make, cfg, state_dir)
        self._last = self.supervised.learner
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self.priority = "normal"
        if self.rollouts is not None and self.learner.published:
            # Restarted after a crash: make sure Serve holds the version the checkpoint says it does.
            last = self.learner.published[-1]
            self.rollouts.submit(last["path"], last)
        if autostart:
            self.start()

    def start(self) -> bool:
        if self._thread is not None and self._thread.is_alive():
            return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="adrec-online-learner", daemon=True)
        self._thread.start()
        return True

    @property
    def learner(self):
        """The learner now (while a failed one restarts: the last one, for its status)."""
        if self.supervised.learner is not None:
            self._last = self.supervised.learner
        return self._last

    def _loop(self) -> None:
        from adrec.errors import LearnerFailedError

        cfg = self.cfg
        self.priority = lower_priority(cfg, self._priority)
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                with self._lock:
                    n = self.supervised.step()  # a failure restarts the learner from its checkpoint, with backoff
            except LearnerFailedError:  # the actor stays up to report it (status, check); logged by supervise
                return
            busy = time.perf_counter() - t0
            if n == 0:
                self._stop.wait(cfg.poll_interval_s)
            elif cfg.max_busy_fraction < 1.0:
                self._stop.wait(busy * (1.0 / cfg.max_busy_fraction - 1.0))

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, flush: bool = False) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            live = self.supervised.learner  # None after a failure: its checkpoint stays the last good state
            if live is not None:
                live.flush() if flush else live.checkpoint()
            return self.status()

    def flush(self) -> dict:
        with self._lock:
            self.check()
            self.learner.flush()
            return self.learner.status()

    def caught_up(self) -> bool:
        """Everything in the log now has been read (impressions may still wait for their window)."""
        with self._lock:
            return self.learner.reader.caught_up(self.learner.position)

    def status(self) -> dict:
        with self._lock:
            out = self.learner.status()
        out.update(self.supervised.health)
        out["running"] = self.running()
        out["pid"] = os.getpid()
        out["priority"] = self.priority
        if self.rollouts is not None:
            out["rollouts"] = self.rollouts.status()
        return out

    def check(self) -> bool:
        """True while the learner is healthy; raises with its error once it gave up restarting."""
        from adrec.errors import LearnerFailedError

        if not self.supervised.healthy:
            raise LearnerFailedError(f"the online learner is unhealthy: {self.supervised.health['error']}")
        return True

    def rollouts_idle(self) -> bool:
        return self.rollouts is None or self.rollouts.idle()

    def model_state(self) -> dict:
        with self._lock:
            return {k: v.clone() for k, v in self.learner.model_state().items()}

    def pid(self) -> int:
        return os.getpid()


def start_learner(cfg, base_model_dir: str | Path, feedback_log: str | Path, state_dir: str | Path, app_args=None,
                  name: str = DEFAULT_NAME, namespace: str | None = None, max_restarts: int = -1,
                  autostart: bool = True):
    """Start the learner actor (or return the running one of that name); returns its handle."""
    import ray

    cls = ray.remote(LearnerActor)
    handle = cls.options(name=name, namespace=namespace, get_if_exists=True, num_cpus=cfg.num_cpus,
                         max_restarts=max_restarts, max_concurrency=1).remote(
        cfg, str(base_model_dir), str(feedback_log), str(state_dir), app_args, name, autostart)
    ray.get(handle.pid.remote())  # constructed (checkpoint restored) before we return
    return handle


def serve_with_learner(cfg, args, state_dir: str | Path | None = None, name: str = DEFAULT_NAME):
    """Deploy the Serve app from ``args`` (:class:`AppArgs`) and start its learner; returns (url, handle).

    ``cfg`` is the :class:`OnlineConfig`. The learner reads the app's feedback log, learns from the
    version the app serves, and rolls every version it publishes out to this app.
    """
    from adrec.serving.deploy import deploy

    resolved = args.resolved()
    url = deploy(resolved)
    state = state_dir or cfg.state_dir or RunDir(resolved.run_dir).store("online").uri
    handle = start_learner(cfg, resolved.model_dir, resolved.feedback_log, state, app_args=resolved, name=name)
    return url, handle
