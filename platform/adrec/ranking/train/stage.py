"""The train stage: ``train_ranker`` on Ray Train (what ``adrec train`` runs), ``fit_local`` without Ray.

``train_ranker(cfg, run)`` trains on split == "train", selects on "valid" (early stopping on AUC),
and writes the self-describing ranker folder ``run.ranker``. ``fit_local`` runs the same loop in
this process (the unit tests and quick experiments use it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import torch
from adrec.config import AdrecConfig, RankerConfig
from adrec.errors import ConfigError
from adrec.features.split import TRAIN, VALID
from adrec.ranking.fusion import FusionRanker
from adrec.ranking.train.data import prepare_data
from adrec.ranking.train.feed import streamed_data
from adrec.ranking.train.finish import finish
from adrec.ranking.train.loop import fit
from adrec.ranking.train.session import LocalSession, load_state
from adrec.ranking.train.trainer import data_fingerprint, make_trainer, resume_key
from adrec.run import RunDir
from adrec.storage import Location, require_shared, resolve

#: Ray Train's storage in the run (checkpoints of every epoch), unless ranker.storage_path names another.
TRAIN_STORAGE = "ranker_train"

log = logging.getLogger(__name__)


def train_storage(rc: RankerConfig, run: RunDir) -> Location:
    """Where Ray Train keeps the checkpoints: on the run's store by default, so the workers of every node
    write where the driver (and a restarted run) finds them. Several workers on a cluster of several nodes
    need it shared: a local path is refused here (call it before anything is written)."""
    storage = resolve(rc.storage_path) if rc.storage_path else run.store(TRAIN_STORAGE)
    if rc.num_workers > 1:
        require_shared(storage, "ranker.storage_path (Ray Train's checkpoints)")
    return storage


def uses_stream(rc: RankerConfig, features) -> bool:
    """Whether training streams the shards (``ranker.data_feed``; auto: when the features are shards)."""
    if rc.data_feed == "streaming" and not features.sharded:
        raise ConfigError("ranker.data_feed=streaming reads the Parquet shards of features.pipeline=streaming, and "
                          f"{features.folder} holds one interactions.parquet: prepare with "
                          "features.pipeline=streaming, or train with ranker.data_feed=auto")
    return rc.data_feed == "streaming" or (rc.data_feed == "auto" and features.sharded)


def _check_room_for_data(rc: RankerConfig) -> None:
    """The streamed feed's read tasks need a CPU the training workers do not hold; refuse a layout that
    leaves none (it would wait forever), unless the cluster may still grow (an autoscaler)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0))
    held = rc.num_workers * (rc.cpus_per_worker or 1.0)
    if cpus and held >= cpus:
        raise ConfigError(f"ranker.num_workers={rc.num_workers} training workers hold {held:g} of the cluster's "
                          f"{cpus:g} CPUs, and the streamed feed's Ray Data reads need one besides: set "
                          f"ranker.cpus_per_worker below {cpus / rc.num_workers:g} (e.g. 0.5), fewer workers, "
                          "or ranker.data_feed=in_memory")


def fit_local(cfg: RankerConfig, features, checkpoint: dict | None = None) -> tuple[FusionRanker, list[dict]]:
    """Train in this process without Ray (tests, notebooks). Returns the ranker and the per-epoch metrics."""
    data = prepare_data(cfg, features)
    session = LocalSession(checkpoint)
    fit(cfg, data, session)
    return finish(cfg, data, session.state), session.reports


def train_ranker(cfg: AdrecConfig, run: RunDir, features=None,
                 train_loop: Callable[[dict], None] | None = None) -> dict:
    """Train the fusion ranker on Ray Train and save it to ``run.ranker``; returns a summary.

    ``train_loop``: the Ray Train worker function (default
    :func:`~adrec.ranking.train.loop.train_loop_per_worker`); the tests pass a wrapper around it.
    """
    from adrec.features.pipeline import Features
    from adrec.runtime import init_ray

    t0 = time.perf_counter()
    rc = cfg.ranker
    if features is None:
        features = Features(run)
    if rc.use_gpu and not torch.cuda.is_available():
        log.warning("use_gpu is set but this process sees no CUDA device; the workers must (Ray places them)")
    init_ray(cfg.ray)
    streamed = uses_stream(rc, features)
    datasets = None
    if streamed:  # the workers stream their shards: no process holds the table (ranking/train/feed.py)
        data, datasets = streamed_data(rc, features, run)
    else:
        data = prepare_data(rc, features)
    storage = train_storage(rc, run)
    name = resume_key(rc, data_fingerprint(run, features))
    if not rc.resume:
        (storage / name).delete()
    if storage.is_local:
        storage.local_path.mkdir(parents=True, exist_ok=True)
    rows = (data[TRAIN].rows, data[VALID].rows) if streamed else (len(data[TRAIN]["label"]), len(data[VALID]["label"]))
    log.info("training the fusion ranker on %d workers (%s, %s feed): %d train / %d valid rows, storage %s/%s",
             rc.num_workers, "GPU" if rc.use_gpu else "CPU", "streamed" if streamed else "in-memory", *rows,
             storage.uri, name)
    per_worker = {"CPU": rc.cpus_per_worker} if rc.cpus_per_worker else None
    if streamed:
        _check_room_for_data(rc)
    result = make_trainer(rc, data, name=name, storage_path=storage, train_loop=train_loop, datasets=datasets,
                          resources_per_worker=per_worker).fit()
    if result.error is not None:
        raise RuntimeError(f"ranker training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("ranker training reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = load_state(d)
    ranker = finish(rc, data, state)
    ranker.info.update({"num_workers": rc.num_workers, "use_gpu": rc.use_gpu, "ray_run": name})
    ranker.save(run.ranker)
    summary = {
        "path": str(run.ranker),
        "valid_auc": float(state["best_auc"]),
        "best_epoch": int(state["best_epoch"]),
        **({"cvr_epochs": int(state.get("cvr_epochs", 0))} if rc.cvr_tower_epochs else {}),
        "epochs_run": [int(h["epoch"]) for h in state["history"]],
        "start_epochs": [int(h["start_epoch"]) for h in state["history"]],
        "history": state["history"],
        "num_workers": rc.num_workers,
        "data_feed": "streaming" if streamed else "in_memory",
        "samples_per_s": [round(float(h.get("samples_per_s", 0.0)), 1) for h in state["history"]],
        "worker_nodes": max(int(h.get("worker_nodes", 1)) for h in state["history"]),
        "calibration": list(ranker.calibration),
        **({"cvr_calibration": list(ranker.cvr_calibration)} if ranker.model.has_cvr else {}),
        "privacy": ranker.info.get("privacy"),  # ranker.dp: the epsilon spent (adrec.ranking.train.privacy)
        "ray_run": (storage / name).uri,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    run.update_manifest("train", {k: v for k, v in summary.items() if k != "history"} | {
        "config": json.loads(rc.model_dump_json())})
    log.info("ranker trained in %.1fs: best valid AUC %.4f at epoch %d -> %s", summary["seconds"],
             summary["valid_auc"], summary["best_epoch"], run.ranker)
    return summary
