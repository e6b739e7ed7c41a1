"""Ray Tune over ``tune_configs/*.yaml``: ASHA on the validation metric, TensorBoard, best trial promoted.

``adrec tune --run RUN --space tune_configs/ranker.yaml [--num-samples N] [--max-concurrent M]``
calls :func:`tune_from_cli`. From Python::

    from adrec.tuning import load_space, run_search, promote, write_results
    spec, base = load_space("tune_configs/ranker.yaml", cfg)     # validated; ConfigError names bad keys
    outcome = run_search(cfg, run, spec, base, num_samples=4)   # resumes an interrupted identical search
    promoted = promote(run, outcome)                            # RUN/ranker, RUN/config.yaml, RUN/model
    write_results(run, outcome, promoted)                       # RUN/tune/results.json, RUN/report/tune.md

Layout: ``RUN/tune/<name>/`` is the Tune experiment (``RunConfig(storage_path=RUN/tune, name=<name>)``),
one folder per trial with its params, ``result.json``/``progress.csv`` and TensorBoard event files
(``tensorboard --logdir RUN/tune``); a ranker trial's Ray Train run and checkpoints are in its
``train/`` subfolder.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from adrec.config import AdrecConfig
    from adrec.run import RunDir

log = logging.getLogger(__name__)

# Public names -> the submodule that defines them (imported on first use: the space loader needs no Ray).
_LAZY = {
    "load_space": "space", "parse_space": "space", "apply_params": "space", "trial_config": "space",
    "TuneSpec": "space",
    "run_search": "search", "load_outcome": "search", "SearchOutcome": "search", "SearchInterrupted": "search",
    "promote": "promote", "write_results": "promote", "results_dict": "promote", "trials_table": "promote",
}

__all__ = ["tune_from_cli", "tune", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"adrec.tuning.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'adrec.tuning' has no attribute {name!r}")


def tune(cfg: AdrecConfig, run: RunDir, space_path: str | Path, *, num_samples: int | None = None,
         max_concurrent: int | None = None, resume: bool | None = None, do_promote: bool = True,
         callbacks: list | None = None, verbose: int = 1) -> dict:
    """Search, promote the best trial, write the results; returns a summary (what the CLI prints).

    Raises :class:`SearchInterrupted` (a KeyboardInterrupt) when the search stopped before all its
    trials finished: its state is saved and the same call resumes it.
    """
    from adrec.tuning.promote import promote, trials_table, write_results
    from adrec.tuning.search import SearchInterrupted, run_search
    from adrec.tuning.space import load_space

    spec, base = load_space(space_path, cfg)
    outcome = run_search(cfg, run, spec, base, num_samples=num_samples, max_concurrent=max_concurrent,
                         resume=resume, callbacks=callbacks, verbose=verbose)
    if not outcome.complete:
        paths = write_results(run, outcome, None)
        done = sum(r["status"] != "not run" for r in outcome.trials)
        msg = (f"search '{spec.name}' interrupted after {done} of {outcome.expected_trials} trials; its state is in "
               f"{outcome.path} (partial results: {paths['results']}). Run the same command again to resume it.")
        log.warning(msg)
        raise SearchInterrupted(msg)
    promoted = promote(run, outcome) if do_promote else None
    paths = write_results(run, outcome, promoted)
    best = outcome.best
    summary = {
        "search": spec.name,
        "trainable": spec.trainable,
        "trials": len(outcome.trials),
        "resumed": outcome.restored,
        "metric": outcome.metric,
        "best_trial": best["trial_id"] if best else None,
        "best_value": best[f"best_{outcome.metric}"] if best else None,
        "best_params": best["params"] if best else None,
        "promoted": promoted,
        "results": str(paths["results"]),
        "report": str(paths["report"]),
        "tensorboard": f"tensorboard --logdir {run.tune}",
        "seconds": round(outcome.seconds, 2),
    }
    if verbose:
        print(f"\n{trials_table(outcome)}\n")
    return summary


def tune_from_cli(cfg: AdrecConfig, run: RunDir, space_path: str | Path, num_samples: int | None = None,
                  max_concurrent: int | None = None) -> dict:
    """``adrec tune``: search ``space_path`` on ``run``, resuming it when an identical one was interrupted.

    A run on an object store is searched in its local cache (pulled first, results pushed after): the
    trials read the run's features from this node's disk, so on a cluster of several nodes the search
    needs the run on a path every node mounts (checked before it starts).
    """
    from adrec.run import CONFIG_NAME
    from adrec.storage import require_shared
    from adrec.topk import TOPK_DIR

    run.pull("features", "candidates", TOPK_DIR, "ranker", "tune")
    require_shared(run.path, "the tune stage's working copy of the run")
    run.require(run.features, "prepare")
    run.require(run.candidates, "candidates")
    out = tune(cfg, run, space_path, num_samples=num_samples, max_concurrent=max_concurrent)
    run.push(CONFIG_NAME, "tune", "ranker", "candidates", TOPK_DIR, "report")
    return out
