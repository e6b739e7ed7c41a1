"""The online learner in the foreground of one process (``adrec online --run RUN``).

Learns from the run's feedback log (``serve.feedback_log``, default ``RUN/feedback/events.jsonl``) starting
from the run's live version, keeps its state in ``online.state_dir`` (default ``RUN/online``, on the run's store) and
publishes versions there. With ``rollout`` every published version is also rolled out to the Serve app of
this run on the Ray at ``ray.address`` (the app ``adrec serve`` deployed). SIGINT / SIGTERM checkpoint and
return; a SIGKILL loses nothing either: the next start resumes from the last checkpoint (log position and model
together). A failing step restarts the learner from its checkpoint (:mod:`adrec.online.supervise`); past
``online.max_restarts`` failures in a row it raises :class:`~adrec.errors.LearnerFailedError` (the
CLI exits non-zero) with ``healthy: false`` in the status file.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from adrec.config import AdrecConfig
from adrec.model_version import live_entry
from adrec.serving.args import default_feedback_log
from adrec.run import RunDir

log = logging.getLogger(__name__)


def run_learner(cfg: AdrecConfig, run: RunDir, rollout: bool = False, once: bool = False,
                flush: bool = False) -> dict:
    """Learn until stopped (or, with ``once``, until the log holds nothing new); the learner's summary."""
    from adrec.online.actor import lower_priority
    from adrec.online.learner import OnlineLearner
    from adrec.online.supervise import Supervised

    oc = cfg.online
    base = live_entry(run).uri  # the version's own location: the learner publishes beside it
    feedback = cfg.serve.feedback_log or default_feedback_log(run.uri)
    state = oc.state_dir or run.store("online").uri  # on the run's store: it outlives this node
    on_publish = None
    if rollout:
        from adrec.runtime import init_ray
        from adrec.serving.args import AppArgs
        from adrec.serving.deploy import rollout as roll_out

        init_ray(cfg.ray)
        args = AppArgs.from_config(cfg, run).resolved()

        def on_publish(path, record):
            roll_out(args, path)

    lower_priority(oc, min(19, os.getpriority(os.PRIO_PROCESS, 0) + oc.nice))
    stop = threading.Event()
    sup = Supervised(lambda: OnlineLearner(oc, base, feedback, state, on_publish=on_publish,
                                           name=f"process-{run.name}"), oc, state)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("learning from %s (state in %s)%s", feedback, state, "; rolling versions out" if rollout else "")
    while not stop.is_set():
        if sup.step() == 0:
            if once and sup.learner is not None:  # (None: a restart is due, after its backoff)
                break
            stop.wait(oc.poll_interval_s)
    learner = sup.learner
    if learner is None:  # stopped while restarting: its checkpoint is the state
        return {"healthy": sup.healthy, "error": sup.health["error"]}
    if once and flush:
        learner.flush()
    else:
        learner.checkpoint()
    status = learner.status()
    return {k: status[k] for k in ("healthy", "serving_version", "counts", "guard", "last_decision")}
