"""Running a search: the Tuner (ASHA, TensorBoard, progress table), resuming it, and its results."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adrec.config import AdrecConfig

from adrec.errors import ConfigError
from adrec.run import RunDir
from adrec.tuning.space import TuneSpec, ranker_max_t, to_param_space, trial_config
from adrec.tuning.trainables import TrainGroupSweeper, make_trainable, per_trial_demand

log = logging.getLogger(__name__)

MARKER = "adrec_search.json"  # in the experiment folder: which spec it runs (resume only the same search)


class SearchInterrupted(KeyboardInterrupt):
    """The search stopped before every trial finished (Ctrl-C); rerunning the same command resumes it."""


@dataclass
class SearchOutcome:
    spec: TuneSpec
    base: dict
    path: Path  # the experiment folder (RUN/tune/<name>)
    trials: list[dict]  # one row per trial, see _trial_row
    best: dict | None
    complete: bool
    restored: bool
    seconds: float
    expected_trials: int

    @property
    def metric(self) -> str:
        return self.spec.metric_name


def data_fingerprint(run: RunDir) -> str:
    prep = run.manifest().get("stages", {}).get("prepare", {})
    return f"{prep.get('data_fingerprint', '')}:{json.dumps(prep.get('counts', {}), sort_keys=True)}"


def invariant_config(spec: TuneSpec, base: dict) -> dict:
    """What every trial of the search trains with, the searched keys left out.

    Part of the search's identity: rerunning with another run config (e.g. ``--set``) is a new search,
    while a rerun after promotion (which rewrites only searched and search-fixed keys) is the same one.
    """
    cfg = trial_config(spec, base, {}).to_dict()
    for path in spec.space:
        node = cfg
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.get(p, {})
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return cfg


def _trial_dirname(trial) -> str:
    name = str(getattr(trial, "trainable_name", "trial")).removesuffix("_trial")
    return f"{name}_{trial.trial_id}"


def _scheduler(spec: TuneSpec, base: dict):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    asha = spec.asha
    if asha is None:
        return FIFOScheduler()
    if spec.trainable == "ranker":
        # A ranker trial runs at most max_t epochs (ranker_trial caps ranker.epochs) and ends on its own:
        # ASHA's own stop at max_t would end the trial while its Train run shuts down.
        max_t = ranker_max_t(spec, base)
        asha_max_t = max_t + 1
    else:
        max_t = asha_max_t = asha.max_t or 1
    return ASHAScheduler(time_attr=spec.info["time_attr"], max_t=asha_max_t,
                         grace_period=min(asha.grace_period, max_t),
                         reduction_factor=asha.reduction_factor, brackets=asha.brackets)


def check_resources(spec: TuneSpec, base: dict, local: bool = True) -> int:
    """How many trials fit the cluster at once; fails fast on a local Ray that cannot hold one trial
    (it would wait forever). A cluster with an autoscaler may grow, so there it only warns."""
    import ray

    have = ray.cluster_resources()
    need = per_trial_demand(spec, base)
    fits = []
    for res in ("CPU", "GPU"):
        if need.get(res, 0) <= 0:
            continue
        avail = float(have.get(res, 0))
        if avail + 1e-9 < need[res]:
            msg = (f"one {spec.trainable} trial needs {need[res]:g} {res} (resources_per_trial x workers) but the "
                   f"Ray cluster has {avail:g}: lower resources_per_trial or ranker.num_workers"
                   + (", or run where there is a GPU" if res == "GPU" else ""))
            if local:
                raise ConfigError(msg)
            log.warning("%s (waiting for the autoscaler)", msg)
            continue
        fits.append(int(math.floor(avail / need[res] + 1e-9)))
    return max(1, min(fits) if fits else 1)


def run_search(cfg: AdrecConfig, run: RunDir, spec: TuneSpec, base: dict, *, num_samples: int | None = None,
               max_concurrent: int | None = None, resume: bool | None = None, callbacks: list | None = None,
               verbose: int = 1) -> SearchOutcome:
    """Run (or resume) the search of ``spec`` on ``run``, results under ``run.tune / spec.name``.

    ``resume``: None resumes an interrupted search of the same spec (same space, base, counts and data)
    and starts over (archiving the old folder) otherwise; True insists on resuming; False always
    starts a new search. ``callbacks``: extra Tune callbacks (they are saved with the search).
    """
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.search import BasicVariantGenerator

    from adrec.runtime import cluster_address, init_ray

    updates = {k: v for k, v in (("num_samples", num_samples), ("max_concurrent", max_concurrent)) if v}
    if updates:
        spec = spec.model_copy(update=updates)
    init_ray(cfg.ray)
    fits = check_resources(spec, base, local=cluster_address(cfg.ray) is None)
    concurrent = spec.max_concurrent or fits
    run.tune.mkdir(parents=True, exist_ok=True)
    exp = run.tune / spec.name
    fp = spec.fingerprint(data_fingerprint(run) + json.dumps(invariant_config(spec, base), sort_keys=True))
    trainable = make_trainable(spec, base, run)
    t0 = time.perf_counter()

    tuner = None
    if resume is not False and exp.exists() and tune.Tuner.can_restore(str(exp)):
        marker = _read_marker(exp)
        if marker.get("fingerprint") == fp:
            log.info("resuming the search in %s (finished trials are kept, unfinished ones rerun)", exp)
            tuner = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True, resume_errored=True)
        elif resume:
            raise ConfigError(f"{exp} holds a different search (other space, counts or data); cannot resume it")
    elif resume is True:
        raise ConfigError(f"{exp} holds no search to resume")
    restored = tuner is not None
    if tuner is None:
        if exp.exists():
            old = exp.with_name(f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            log.info("an earlier, different search in %s was moved to %s", exp, old)
            exp.rename(old)
        tuner = tune.Tuner(
            trainable,
            param_space=to_param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric_name, mode=spec.mode, num_samples=spec.num_samples,
                scheduler=_scheduler(spec, base),
                search_alg=BasicVariantGenerator(max_concurrent=concurrent, random_state=spec.seed),
                trial_dirname_creator=_trial_dirname, reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(run.tune), verbose=verbose,
                callbacks=[TBXLoggerCallback(), *([TrainGroupSweeper()] if spec.trainable == "ranker" else []),
                           *(callbacks or [])],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        exp.mkdir(parents=True, exist_ok=True)
        _write_marker(exp, {"fingerprint": fp, "spec": spec.model_dump(), "base": base, "run": str(run.path),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    log.info("%s search '%s': %d trials, %d at a time, %s on %s, results in %s", spec.trainable, spec.name,
             spec.expected_trials(), concurrent, "ASHA" if spec.asha else "FIFO", spec.metric_name, exp)
    grid = tuner.fit()
    return collect(spec, base, exp, grid, restored=restored, seconds=time.perf_counter() - t0)


def _read_marker(exp: Path) -> dict:
    try:
        return json.loads((exp / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _write_marker(exp: Path, info: dict) -> None:
    (exp / MARKER).write_text(json.dumps(info, indent=2, default=str))


# ---- results --------------------------------------------------------------------------------------------
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _status(spec: TuneSpec, base: dict, result, params: dict, tune_status: str | None) -> str:
    m = result.metrics or {}
    if result.error is not None or tune_status == "ERROR":
        return "error"
    if tune_status is not None and tune_status != "TERMINATED":
        return "interrupted" if m else "not run"
    if not m:
        return "not run"
    if spec.trainable != "ranker":
        return "completed"
    rc = trial_config(spec, base, params).ranker
    epoch = int(m.get("epoch") or 0)
    if epoch >= rc.epochs:
        return "completed"
    if epoch - int(m.get("best_epoch") or epoch) >= rc.early_stopping_patience:
        return "early-stopped"  # the training loop's own patience on valid AUC
    return "stopped by ASHA" if spec.asha else "stopped"


def _trial_row(spec: TuneSpec, base: dict, result, tune_status: str | None = None) -> dict:
    metric = spec.metric_name
    m = dict(result.metrics or {})
    df = result.metrics_dataframe
    best = None
    if df is not None and metric in getattr(df, "columns", []):
        col = df[metric].dropna()
        if len(col):
            best = float(col.max() if spec.mode == "max" else col.min())
    params = {k: v for k, v in (result.config or {}).items() if k in spec.space}
    row = {
        "trial_id": m.get("trial_id") or Path(result.path).name,
        "status": _status(spec, base, result, params, tune_status),
        "params": params,
        f"best_{metric}": best,
        metric: m.get(metric),
        "iterations": m.get("training_iteration"),
        "seconds": m.get("time_total_s"),
        "path": str(result.path),
        "checkpoint": m.get("checkpoint_path") or (result.checkpoint.path if result.checkpoint else None),
        "last_metrics": {k: v for k, v in m.items() if isinstance(v, (int, float, str, bool)) or v is None},
        "error": None if result.error is None else str(result.error).strip().splitlines()[-1][:300],
    }
    if spec.trainable == "ranker":
        row["epochs"] = m.get("epoch")
    return row


def _tune_statuses(exp: Path) -> dict[str, str]:
    """trial id -> Tune's status (TERMINATED, ERROR, PENDING, RUNNING, ...) from the saved experiment state."""
    from ray import tune

    try:
        return {t.trial_id: t.status for t in tune.ExperimentAnalysis(str(exp)).trials}
    except Exception as err:  # no state written (nothing ran)
        log.debug("no experiment state in %s: %s", exp, err)
        return {}


def collect(spec: TuneSpec, base: dict, exp: Path, grid, restored: bool = False, seconds: float = 0.0) -> SearchOutcome:
    statuses = _tune_statuses(exp)
    rows = []
    for r in grid:
        tid = (r.metrics or {}).get("trial_id")
        rows.append(_trial_row(spec, base, r, statuses.get(tid) if tid else None))
    rows.sort(key=lambda r: r["trial_id"])
    key = f"best_{spec.metric_name}"
    ok = [r for r in rows if r["error"] is None and _finite(r[key])]
    best = None
    if ok:
        sign = -1.0 if spec.mode == "max" else 1.0
        best = min(ok, key=lambda r: (sign * r[key], r["trial_id"]))
    n_trials = max(len(grid), len(statuses))
    finished = sum(s in ("TERMINATED", "ERROR") for s in statuses.values()) if statuses else \
        grid.num_terminated + grid.num_errors
    complete = finished == n_trials and n_trials >= spec.expected_trials()
    return SearchOutcome(spec=spec, base=base, path=exp, trials=rows, best=best, complete=complete, restored=restored,
                         seconds=seconds, expected_trials=spec.expected_trials())


def load_outcome(run: RunDir, spec: TuneSpec, base: dict) -> SearchOutcome:
    """The results of a search on disk (no trial runs), e.g. to inspect or re-promote it."""
    from ray import tune

    exp = run.tune / spec.name
    trainable = make_trainable(spec, base, run)
    grid = tune.Tuner.restore(str(exp), trainable).get_results()
    return collect(spec, base, exp, grid, restored=True)
