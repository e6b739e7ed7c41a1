"""The per-worker training loop: the selection phase, then the refit phase.

Selection trains on train and early-stops on the valid AUC; refit retrains from the same initial
weights on train + valid for the selected number of epochs (the test period follows the valid
period, so its clicks are the most telling). Every epoch of both phases ends in a checkpoint, and a
restarted worker picks up after the last one (:meth:`TrainingState.restore`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from adrec.config import RankerConfig
from adrec.features.split import TRAIN, VALID
from adrec.ranking.fusion import FusionRanker
from adrec.ranking.train.feed import BOTH
from adrec.ranking.train.state import CVR, DONE, REFIT, SELECT, TrainingState

log = logging.getLogger(__name__)


def select(state: TrainingState, train: dict, valid: dict) -> None:
    """Train on ``train`` until the valid AUC stops improving (or ``cfg.epochs``); keep the best epoch."""
    cfg, pr = state.cfg, state.progress
    for epoch in range(pr.epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        loss, steps, secs = state.run_epoch(epoch, train)
        v_auc, v_loss, logits, (weights, pooled) = state.evaluate(valid)
        improved = v_auc > pr.best_auc
        if improved:
            pr.best_epoch = epoch
            _keep_best(state, valid, v_auc, logits, weights, pooled)
        else:
            pr.bad_epochs += 1
        stop = pr.bad_epochs >= cfg.early_stopping_patience or epoch == cfg.epochs
        pr.epoch = pr.select_epochs = epoch
        if stop:
            pr.phase = CVR if state.cvr_phase_wanted() else REFIT if cfg.refit else DONE
        metrics = {"epoch": epoch, "phase": "select", "train_loss": loss, "valid_auc": v_auc,
                   "valid_logloss": v_loss, "best_auc": pr.best_auc, "best_epoch": pr.best_epoch,
                   "start_epoch": state.start_epoch, "steps_per_s": steps / max(secs, 1e-9),
                   "samples_per_s": samples_per_s(state, secs), "seconds": time.perf_counter() - t0,
                   "world_size": state.world, "worker_nodes": state.worker_nodes, **state.task_metrics}
        if state.rank == 0:
            if state.task_metrics:
                log.info("epoch %d: valid %s (selected on the mean of the CTR and CTCVR AUCs)", epoch,
                         {k: round(v, 4) for k, v in state.task_metrics.items()})
            log.info("epoch %d/%d: %d steps in %.1fs (%.1f steps/s, %.0f samples/s), loss %.4f, valid AUC %.4f, "
                     "logloss %.4f%s", epoch, cfg.epochs, steps, secs, metrics["steps_per_s"], metrics["samples_per_s"],
                     loss, v_auc, v_loss,
                     " (best)" if improved else "")
            if stop and epoch < cfg.epochs:
                log.info("early stopping after epoch %d: best valid AUC %.4f at epoch %d",
                         epoch, pr.best_auc, pr.best_epoch)
        state.checkpoint(metrics)
        if stop:
            break


def _keep_best(state: TrainingState, valid, v_auc: float, logits, weights, pooled) -> None:
    """The evaluated epoch is the best so far: keep its weights and its valid logits (the calibrations')."""
    pr = state.progress
    pr.best_auc, pr.bad_epochs = v_auc, 0
    pr.best_logits, pr.best_state, pr.best_pooled = logits, weights, pooled
    # Streamed rows come in no fixed order: the calibration needs the labels read with the logits.
    pr.best_labels = None if isinstance(valid, dict) else state.valid_labels
    if state.model.has_cvr:  # pCVR's calibration fits on these (and, streamed, their conversions)
        pr.best_cvr_logits = state.valid_cvr_logits
        pr.best_conversions = None if isinstance(valid, dict) else state.valid_conversions


def tune_cvr_tower(state: TrainingState, train, valid) -> None:
    """A two-task model's cvr phase (``cfg.cvr_tower_epochs``): from the selected weights, train the CVR tower
    alone, epoch by epoch, while the valid selection score (the mean of the CTR and CTCVR AUCs; pCTR no longer
    moves, so this is the CTCVR AUC's) improves; the best epoch's weights replace the selected ones."""
    cfg, pr = state.cfg, state.progress
    if pr.cvr_done == 0:
        state.start_cvr_tower(pr.best_state, pr.best_pooled)
        pr.bad_epochs = 0
        if state.rank == 0:
            log.info("cvr phase: the CVR tower alone, up to %d epoch(s), from the selected epoch %d (valid "
                     "score %.4f)", cfg.cvr_tower_epochs, pr.best_epoch, pr.best_auc)
    for r in range(pr.cvr_done + 1, cfg.cvr_tower_epochs + 1):
        t0 = time.perf_counter()
        epoch = pr.epoch + 1
        loss, steps, secs = state.run_epoch(epoch, train)
        v_auc, v_loss, logits, (weights, pooled) = state.evaluate(valid)
        improved = v_auc > pr.best_auc
        if improved:
            pr.cvr_epochs = r
            _keep_best(state, valid, v_auc, logits, weights, pooled)
        else:
            pr.bad_epochs += 1
        stop = pr.bad_epochs >= cfg.early_stopping_patience or r == cfg.cvr_tower_epochs
        pr.epoch, pr.cvr_done = epoch, r
        if stop:
            pr.phase = REFIT if cfg.refit else DONE
        metrics = {"epoch": epoch, "phase": "cvr", "cvr_epoch": r, "train_loss": loss, "valid_auc": v_auc,
                   "valid_logloss": v_loss, "best_auc": pr.best_auc, "best_epoch": pr.best_epoch,
                   "cvr_epochs": pr.cvr_epochs, "start_epoch": state.start_epoch,
                   "steps_per_s": steps / max(secs, 1e-9), "samples_per_s": samples_per_s(state, secs),
                   "seconds": time.perf_counter() - t0, "world_size": state.world,
                   "worker_nodes": state.worker_nodes, **state.task_metrics}
        if state.rank == 0:
            log.info("cvr epoch %d/%d: valid %s, score %.4f%s", r, cfg.cvr_tower_epochs,
                     {k: round(v, 4) for k, v in state.task_metrics.items()}, v_auc, " (best)" if improved else "")
        state.checkpoint(metrics)
        if stop:
            break


def samples_per_s(state: TrainingState, secs: float) -> float:
    """The epoch's training rows per second over every worker (each trains on its own part)."""
    return state.last_rows * state.world / max(secs, 1e-9)


def refit(state: TrainingState, train, valid, both=None) -> None:
    """Retrain from the initial weights on train + valid for the selected number of epochs.

    ``both``: the train + valid rows when they come as one streamed feed; arrays are concatenated here."""
    pr = state.progress
    if both is None:
        both = {k: np.concatenate([train[k], valid[k]]) for k in train}
    total = pr.best_epoch + pr.cvr_epochs  # the joint epochs, then (a cvr phase's) the CVR tower's alone
    if state.refit_starts():
        state.restart()
        if state.rank == 0:
            log.info("refit: training on train + valid (%d rows) for the selected %d epoch(s)%s",
                     len(both["label"]) if isinstance(both, dict) else both.rows, pr.best_epoch,
                     f" and {pr.cvr_epochs} of the CVR tower alone" if pr.cvr_epochs else "")
    for r in range(pr.refit_done + 1, total + 1):
        epoch = pr.select_epochs + pr.cvr_done + r
        if r == pr.best_epoch + 1:  # the CVR tower alone from here, from the averaged joint weights
            state.start_cvr_tower(*state.averaged(state.snapshot))
        loss, steps, secs = state.run_epoch(epoch, both)
        pr.epoch, pr.refit_done = epoch, r
        if r == total:
            pr.final_state, pr.final_pooled = state.averaged(state.snapshot)
            pr.phase = DONE
        else:
            state.averaged(lambda: None)  # the next epoch reads the text cache of the averaged weights
        metrics = {"epoch": epoch, "phase": "refit", "refit_epoch": r, "train_loss": loss,
                   "best_auc": pr.best_auc, "best_epoch": pr.best_epoch, "start_epoch": state.start_epoch,
                   "steps_per_s": steps / max(secs, 1e-9), "samples_per_s": samples_per_s(state, secs),
                   "seconds": secs, "world_size": state.world,
                   "worker_nodes": state.worker_nodes}
        if state.rank == 0:
            log.info("refit epoch %d/%d: %d steps in %.1fs (%.1f steps/s), loss %.4f", r, total,
                     steps, secs, metrics["steps_per_s"], loss)
        state.checkpoint(metrics)


def fit(cfg: RankerConfig, data: dict, session,
        after_checkpoint: Sequence[Callable[[dict], Any]] = ()) -> FusionRanker:
    """The training of one worker: both phases, resumed from the session's checkpoint when it has one.

    ``after_checkpoint``: see :class:`TrainingState`.
    """
    state = TrainingState(cfg, data, session, after_checkpoint)
    state.restore(session.checkpoint())
    if state.progress.phase == SELECT:
        select(state, data[TRAIN], data[VALID])
    if state.progress.phase == CVR:
        tune_cvr_tower(state, data[TRAIN], data[VALID])
    if state.progress.phase == REFIT:
        refit(state, data[TRAIN], data[VALID], data.get(BOTH))
    state.model.text.release_training()
    return state.ranker


def _worker_logging() -> None:
    """The package's INFO lines on the worker's stderr (Ray shows them), unless a handler is set."""
    pkg = logging.getLogger("adrec")
    if not pkg.handlers or all(isinstance(h, logging.NullHandler) for h in pkg.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False


def train_loop_per_worker(config: dict, after_checkpoint: Sequence[Callable[[dict], Any]] = ()) -> None:
    """The Ray Train worker function: ``config`` holds the ranker config (a dict) and the data (or its ref):
    the rows as arrays, or (a streamed run) the catalog and the feeds naming this worker's dataset shards."""
    import ray

    from adrec.ranking.train.session import RaySession

    _worker_logging()
    cfg = RankerConfig.model_validate(config["ranker"])
    data = config["data"]
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)
    fit(cfg, data, RaySession(), after_checkpoint)
