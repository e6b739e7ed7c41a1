"""What one trial runs.

- ``ranker``: the same per-worker training loop and ``TorchTrainer`` as ``adrec train``
  (``adrec.ranking.train.make_trainer``), on Ray Train (V2) inside the Tune trial. Each epoch's
  metrics (train loss, valid AUC, valid logloss, ...) and checkpoint path reach Tune through
  ``TuneReportCallback``, so ASHA can stop a poor trial after any epoch. The Train run is stored in the trial's folder
  (``RUN/tune/<search>/<trial>/train``); a trial restarted by ``Tuner.restore`` resumes from its last
  epoch checkpoint there.
- ``als``: fits the candidate stage's ALS (``ALSSource``) on the train split's positives and reports
  validation Recall@100 and NDCG@10 (users with a validation positive; every catalog item but the
  user's train items is a candidate), with the fitted source as the trial's checkpoint.

Both take the merged base config (a dict) and the trial's sampled dotted keys, and build the trial's
:class:`AdrecConfig` with :func:`adrec.tuning.space.trial_config`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune import Callback

from adrec.run import RunDir
from adrec.tuning.space import TuneSpec, trial_config

log = logging.getLogger(__name__)

# The Tune trial of a ranker only waits on its Ray Train run; the training workers hold the real
# resources (resources_per_trial). Ray needs a non-zero bundle for the trial itself.
DRIVER_CPU = 0.01
TRAIN_DIR = "train"  # the Ray Train run inside a ranker trial's folder


def _worker_resources(cpu: float, gpu: float) -> dict[str, float]:
    res = {"CPU": float(cpu)}
    if gpu > 0:
        res["GPU"] = float(gpu)
    return res


# ---- ranker ---------------------------------------------------------------------------------------------
PG_RECORD = "train_placement_groups.txt"  # in a ranker trial's folder: its Train worker groups' placement groups


def _train_worker(config: dict) -> None:
    """Ray Train worker: note this worker group's placement group, then run `adrec train`'s loop."""
    import ray
    import ray.train

    from adrec.ranking.train import train_loop_per_worker

    config = dict(config)
    record = config.pop("_pg_record", None)
    if record and ray.train.get_context().get_world_rank() == 0:
        pg = ray.util.get_current_placement_group()
        if pg is not None:
            with open(record, "a") as f:
                f.write(pg.id.hex() + "\n")
    train_loop_per_worker(config)  # the loop `adrec train` runs


def ranker_trial(config: dict, *, spec: TuneSpec, base: dict, run_path: str, exp_path: str, cpu: float = 1.0,
                 gpu: float = 0.0) -> None:
    """One ranker trial: Ray Train fine-tuning with this trial's hyperparameters, reported per epoch
    (the selection phase of `adrec train`, at most ASHA's max_t epochs: see space.trial_config)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from adrec.features.pipeline import Features
    from adrec.ranking.train import make_trainer, prepare_data

    cfg = trial_config(spec, base, config)
    rc = cfg.ranker
    # The trial's folder in the search's storage (RUN/tune/<search>/<trial>), not Tune's local staging copy.
    trial_dir = Path(exp_path) / Path(tune.get_context().get_trial_dir()).name
    trial_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(rc, Features(RunDir(run_path)))
    trainer = make_trainer(rc, data, name=TRAIN_DIR, storage_path=trial_dir, train_loop=_train_worker,
                           loop_config={"_pg_record": str(trial_dir / PG_RECORD)}, use_gpu=gpu > 0,
                           resources_per_worker=_worker_resources(cpu, gpu),
                           # The latest checkpoint carries the best epoch's weights: one is enough to promote.
                           num_to_keep=1, callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"ranker trial failed: {result.error}") from result.error


def remove_train_groups(trial_path: str | Path) -> int:
    """Remove the Train worker-group placement groups a stopped ranker trial left behind.

    When ASHA stops a trial, Tune ends the trial's actor and with it the Ray Train controller it owns,
    before the controller can remove its worker group's placement group; placement groups live as
    long as the job, and Train's own cleaner needs the State API (the dashboard), which adrec runs
    without. Returns how many were removed.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    record = Path(trial_path) / PG_RECORD
    if not record.is_file() or not ray.is_initialized():
        return 0
    removed = 0
    for line in set(record.read_text().split()):
        try:
            pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(line)))
            if placement_group_table(pg).get("state") in (None, "REMOVED"):
                continue
            remove_placement_group(pg)
            removed += 1
        except Exception as err:  # a malformed line or a group already gone: nothing to free
            log.debug("placement group %s of %s: %s", line, trial_path, err)
    if removed:
        log.info("freed %d Ray Train placement group(s) left by the stopped trial %s", removed, Path(trial_path).name)
    return removed


class TrainGroupSweeper(Callback):
    """Tune callback: frees the worker groups of ranker trials that Tune stopped (see remove_train_groups).

    A trial's groups are removed a few seconds after it ends (by then its controller is gone and
    cannot start another group); at the end of the search every ended trial is swept.
    """

    GRACE_S = 5.0

    def __init__(self):
        self._ended: dict[str, float] = {}

    def __getstate__(self):
        return {"_ended": {}}

    def _mark(self, trial) -> None:
        if trial.path:
            self._ended.setdefault(str(trial.path), time.monotonic())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._mark(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._mark(trial)

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        for path, t in list(self._ended.items()):
            if now - t >= self.GRACE_S:
                remove_train_groups(path)
                del self._ended[path]

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            self._mark(trial)
        if not self._ended:
            return
        pending = [p for p in self._ended if (Path(p) / PG_RECORD).is_file()]
        if pending:
            wait = self.GRACE_S - (time.monotonic() - max(self._ended[p] for p in pending))
            if wait > 0 and any(_has_live_group(p) for p in pending):
                time.sleep(wait)
        for path in list(self._ended):
            remove_train_groups(path)
        self._ended.clear()


def _has_live_group(trial_path: str) -> bool:
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table

    for line in set((Path(trial_path) / PG_RECORD).read_text().split()):
        try:
            pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(line)))
            if placement_group_table(pg).get("state") not in (None, "REMOVED"):
                return True
        except Exception:
            continue
    return False


def ranker_checkpoint_state(trial_path: str | Path, last_metrics: dict | None = None) -> dict:
    """The training state (``state.pt``) of a ranker trial's latest epoch checkpoint."""
    from adrec.ranking.train import STATE_FILE, load_state

    candidates: list[Path] = []
    reported = (last_metrics or {}).get("checkpoint_path")
    if reported:
        candidates.append(Path(reported))
    train_dir = Path(trial_path) / TRAIN_DIR
    candidates += sorted(train_dir.glob("checkpoint_*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for c in candidates:
        if (c / STATE_FILE).is_file():
            return load_state(c)
    raise FileNotFoundError(f"no ranker checkpoint ({STATE_FILE}) under {train_dir}")


# ---- ALS --------------------------------------------------------------------------------------------------
def als_validation_setup(run: RunDir):
    """Train positives (users x catalog items), seen train items, and per-user validation positives."""
    import scipy.sparse as sp

    from adrec.candidates.stage import positives_matrix, seen_matrix
    from adrec.features.pipeline import Features
    from adrec.features.split import TRAIN, VALID

    feats = Features(run)
    spec = feats.spec
    n_users, n_items = spec.n_users, spec.n_catalog or spec.n_items
    train = feats.rows(TRAIN)
    train = train[train["item_idx"] < n_items]
    train_pos = positives_matrix(train, n_users, n_items)
    seen = seen_matrix(train, n_users, n_items)
    valid = feats.rows(VALID)
    valid = valid[(valid["label"] == 1) & (valid["item_idx"] < n_items)]
    by_user = valid.groupby("user_idx")["item_idx"].apply(lambda s: np.unique(s.to_numpy())).to_dict()
    users = np.array(sorted(int(u) for u in by_user), dtype=np.int64)
    truth = [by_user[u] for u in users]
    return sp.csr_matrix(train_pos), seen, users, truth, n_items


def als_metrics(source, seen, users: np.ndarray, truth: list, n_items: int, k: int, n: int) -> dict:
    """Validation Recall@n and NDCG/Precision/MAP/HitRate/Coverage@k of a fitted candidate source."""
    from adrec.metrics import topk_metrics

    ids, _ = source.recommend(users, n, seen[users])
    out = {f"valid_recall@{n}": topk_metrics(ids, truth, n_items, n, prefix="valid")[f"valid.recall@{n}"]}
    for key, value in topk_metrics(ids[:, :k], truth, n_items, k, prefix="valid").items():
        out[key.replace("valid.", "valid_")] = value
    out["valid_users"] = len(users)
    return out


def als_trial(config: dict, *, spec: TuneSpec, base: dict, run_path: str, cpu: float = 1.0, gpu: float = 0.0) -> None:
    """One ALS trial: fit on the train split's positives, report validation Recall@100 / NDCG@10."""
    from ray import tune
    from threadpoolctl import threadpool_limits

    from adrec.candidates.factory import make_source, source_kwargs

    cfg = trial_config(spec, base, config)
    train_pos, seen, users, truth, n_items = als_validation_setup(RunDir(run_path))
    t0 = time.perf_counter()
    kwargs = source_kwargs("als", cfg.candidates)
    if gpu <= 0:
        kwargs["use_gpu"] = False
    src = make_source("als", num_threads=max(1, int(cpu)), **kwargs)
    src.fit(train_pos)
    fit_s = time.perf_counter() - t0
    with threadpool_limits(max(1, int(cpu)), "blas"):
        metrics = als_metrics(src, seen, users, truth, n_items, k=cfg.eval.k, n=cfg.candidates.n_candidates)
    metrics["fit_seconds"] = fit_s
    with tempfile.TemporaryDirectory(prefix="adrec-als-") as d:
        src.save(Path(d) / "als")
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


# ---- wiring --------------------------------------------------------------------------------------------------
TRIAL_FUNCTIONS = {"ranker": ranker_trial, "als": als_trial}


def make_trainable(spec: TuneSpec, base: dict, run: RunDir):
    """The Tune trainable of ``spec``: its trial function with the base config and resources bound."""
    from ray import tune

    res = spec.resources_per_trial
    fn = TRIAL_FUNCTIONS[spec.trainable]
    kwargs: dict[str, Any] = dict(spec=spec, base=base, run_path=str(run.path), cpu=res.cpu, gpu=res.gpu)
    if spec.trainable == "ranker":
        kwargs["exp_path"] = str(run.tune / spec.name)
    bound = tune.with_parameters(fn, **kwargs)
    if spec.trainable == "ranker":
        # The trial only drives Ray Train; the training workers reserve resources_per_trial each.
        trial_res: dict[str, Any] = {"CPU": DRIVER_CPU}
    else:
        trial_res = _worker_resources(res.cpu, res.gpu)
    return tune.with_resources(bound, trial_res)


def per_trial_demand(spec: TuneSpec, base: dict) -> dict[str, float]:
    """Resources one running trial holds in all (what max_concurrent defaults from)."""
    res = spec.resources_per_trial
    if spec.trainable == "ranker":
        workers = int(base["ranker"]["num_workers"])
        dom = spec.space.get("ranker.num_workers")
        if dom is not None:
            workers = int(max(next(iter(dom.values()))))
        return {"CPU": DRIVER_CPU + workers * res.cpu, "GPU": workers * res.gpu}
    return {"CPU": res.cpu, "GPU": res.gpu}

