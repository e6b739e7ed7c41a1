"""The online learner on its own, in the foreground: ``python -m adrec.online --run RUN [options]``.

Learns from ``RUN``'s feedback log (``serve.feedback_log``, default ``RUN/feedback/events.jsonl``) starting
from the version in ``RUN/model``, keeps its state in ``online.state_dir`` (default ``RUN/online``) and
publishes versions there. ``--rollout`` also rolls every published version out to the Serve app of this run
on the Ray cluster at ``ray.address`` (the app deployed by ``adrec serve``). ``--once`` consumes what the log
holds now and exits (``--flush`` then labels the impressions still inside their attribution window).
SIGINT / SIGTERM checkpoint and exit; a SIGKILL loses nothing either: the next start resumes from the
last checkpoint (offset and model together).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adrec.online", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder (its model/ is the base version)")
    p.add_argument("--config", default=None, help="YAML config; default: the run's config.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. online.lr=0.1")
    p.add_argument("--rollout", action="store_true", help="roll published versions out to the run's Serve app")
    p.add_argument("--once", action="store_true", help="consume what the log holds now, then exit")
    p.add_argument("--flush", action="store_true", help="with --once: label every pending impression before exiting")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from adrec.flow import resolve_config
    from adrec.online.actor import lower_priority
    from adrec.online.learner import OnlineLearner
    from adrec.run import RunDir

    run = RunDir(a.run)
    cfg = resolve_config(run, a.config, a.set)
    oc = cfg.online
    base = run.require(run.model, "train")
    feedback = Path(cfg.serve.feedback_log) if cfg.serve.feedback_log else run.feedback / "events.jsonl"
    state = Path(oc.state_dir) if oc.state_dir else run.path / "online"
    on_publish = None
    if a.rollout:
        from adrec.runtime import init_ray
        from adrec.serving.args import AppArgs
        from adrec.serving.deploy import rollout

        init_ray(cfg.ray)
        args = AppArgs.from_config(cfg, run.path).resolved()

        def on_publish(path, record):
            rollout(args, path)

    import os

    lower_priority(oc, min(19, os.getpriority(os.PRIO_PROCESS, 0) + oc.nice))
    learner = OnlineLearner(oc, base, feedback, state, on_publish=on_publish, name=f"process-{run.path.name}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        n = learner.step()
        if n == 0:
            if a.once:
                break
            stop.wait(oc.poll_interval_s)
    if a.once and a.flush:
        learner.flush()
    else:
        learner.checkpoint()
    print(json.dumps({k: learner.status()[k] for k in ("serving_version", "counts", "guard", "last_decision")},
                     indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
