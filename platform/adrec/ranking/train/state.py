"""One worker's training state and what it does with it: an epoch, an evaluation, a checkpoint.

:class:`TrainingState` holds the model (inside its :class:`FusionRanker`), the optimizer, the
weight average and the :class:`Progress` record (phase, epoch, selection bookkeeping, the best and
final weights). A checkpoint is ``Progress`` as a dict plus the live weights, the optimizer state
and the average; :meth:`TrainingState.restore` reads one back, so a restarted worker goes on from
the epoch after it. Each epoch's shuffling and dropout seeds depend only on (seed, epoch, rank), so
a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from adrec.config import RankerConfig
from adrec.features.split import TRAIN
from adrec.metrics import auc, conversion_metrics, logloss
from adrec.ranking.data import take
from adrec.ranking.fgsm import ESMM_LOSS, EsmmTerms, fgsm_loss
from adrec.ranking.fusion import FusionRanker
from adrec.ranking.train.average import WeightAverage
from adrec.ranking.train.finish import task_probabilities
from adrec.ranking.train.data import predict_logits, predict_task_logits, recency_weights, task_labels, to_device
from adrec.ranking.train.privacy import PrivateTraining

log = logging.getLogger(__name__)

SELECT, CVR, REFIT, DONE = "select", "cvr", "refit", "done"


@dataclass
class Progress:
    """Where a run stands, checkpointed with the weights (the keys of ``state.pt`` besides them)."""

    phase: str = SELECT  # select -> cvr (a two-task model's cfg.cvr_tower_epochs) -> refit (cfg.refit) -> done
    epoch: int = 0  # the last finished epoch, counted over both phases
    select_epochs: int = 0  # epochs the selection phase ran
    refit_done: int = 0  # refit epochs finished
    best_auc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0  # selection epochs since the best one
    cvr_done: int = 0  # epochs of the CVR tower alone finished (the cvr phase)
    cvr_epochs: int = 0  # of them, those kept (the best score's): the refit trains as many after its joint epochs
    history: list[dict] = field(default_factory=list)  # the metrics of every epoch
    best_state: dict | None = None  # the averaged weights of the best selection epoch
    best_pooled: torch.Tensor | None = None  # and their text cache
    best_logits: np.ndarray | None = None  # and their valid logits (the calibration fits on them)
    best_labels: np.ndarray | None = None  # a streamed valid: its labels in those logits' order
    best_cvr_logits: np.ndarray | None = None  # a two-task model's valid CVR logits there (pCVR's calibration)
    best_conversions: np.ndarray | None = None  # a streamed valid: its conversions in those logits' order
    final_state: dict | None = None  # the averaged weights at the end of the refit
    final_pooled: torch.Tensor | None = None
    privacy: dict | None = None  # with ranker.dp: the accountant's record of the noisy steps (train/privacy.py)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict) -> "Progress":
        pr = cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})
        for name in ("best_logits", "best_labels", "best_cvr_logits", "best_conversions"):  # a checkpoint file
            # holds them as tensors (plain state)
            if isinstance(getattr(pr, name), torch.Tensor):
                setattr(pr, name, getattr(pr, name).numpy())
        return pr


def train_rates(data: dict) -> tuple[float, float | None]:
    """The train click rate and the conversion rate of clicks (None without conversions): from the
    arrays, or from ``data["rates"]`` (a streamed pass computed them: no worker holds the rows)."""
    if "rates" in data:
        return data["rates"]["ctr"], data["rates"].get("cvr")
    y = data[TRAIN]["label"]
    if "conversion" not in data[TRAIN]:
        return float(y.mean()), None
    clicked = y > 0
    return float(y.mean()), (float(data[TRAIN]["conversion"][clicked].mean()) if clicked.any() else None)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


class _Step(nn.Module):
    """One forward = the whole training loss (FGSM included), so DDP sees one forward per backward."""

    def __init__(self, model, epsilon: float, esmm: EsmmTerms = ESMM_LOSS):
        super().__init__()
        self.model = model
        self.epsilon = epsilon
        self.esmm = esmm

    def forward(self, batch, labels, weights=None):
        return fgsm_loss(self.model, batch, labels, self.epsilon, weights, self.esmm)


class TrainingState:
    """The model, optimizer and weight average of one worker, and the run's :class:`Progress`.

    ``session`` (:mod:`adrec.ranking.train.session`) gives rank, world size and device and takes
    the checkpoints. ``after_checkpoint``: functions called with each epoch's metrics once its
    checkpoint is reported (a progress display; the tests inject a worker failure with one).
    """

    def __init__(self, cfg: RankerConfig, data: dict, session,
                 after_checkpoint: Sequence[Callable[[dict], Any]] = ()):
        torch.set_num_threads(cfg.torch_threads)
        seed_all(cfg.seed)
        self.cfg, self.session = cfg, session
        self.after_checkpoint = list(after_checkpoint)
        self.rank, self.world, self.device = session.rank, session.world, session.device
        self.worker_nodes = session.worker_nodes()
        self.ranker = FusionRanker.build(cfg, data["spec"], data["items"], data["users"], refresh=False)
        model = self.model = self.ranker.model
        # Start the output bias at the train click rate: calibrated from step 0.
        ctr, cvr = train_rates(data)
        ctr = float(np.clip(ctr, 1e-4, 1 - 1e-4))
        cvr_logit = None
        if model.has_cvr:  # and the CVR tower at the train conversion rate of clicks
            cvr = float(np.clip(0.5 if cvr is None else cvr, 1e-4, 1 - 1e-4))
            cvr_logit = math.log(cvr / (1 - cvr))
        model.init_bias(math.log(ctr / (1 - ctr)), cvr_logit)
        self.init_weights = {k: v.clone() for k, v in model.trainable_state().items()}
        model.to(self.device)
        model.text.prepare_training()  # on the device: the frozen lower layers run once, where training runs
        self._new_optimizer()
        self.step_module: nn.Module = _Step(model, cfg.fgsm_epsilon, EsmmTerms.of(cfg))
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            on_gpu = self.device.type == "cuda"
            self.step_module = DistributedDataParallel(self.step_module,
                                                       device_ids=[self.device.index] if on_gpu else None)
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if (self.device.type == "cuda" and cfg.bf16) \
            else nullcontext()
        self.progress = Progress()
        self.task_metrics: dict[str, float] = {}  # a two-task model's valid AUCs of the last evaluation
        # DP-SGD (ranker.dp): its own epoch, see adrec.ranking.train.privacy
        self.private = PrivateTraining(cfg, data, self.world) if cfg.dp is not None else None
        self.start_epoch = 0  # the epoch this attempt started after (> 0 when it resumed)
        self.last_rows = 0  # the rows the last epoch trained on (this worker)
        self.valid_labels: np.ndarray | None = None  # the labels of the last evaluation, in its logits' order
        self.valid_cvr_logits: np.ndarray | None = None  # a two-task model's CVR logits of the last evaluation
        self.valid_conversions: np.ndarray | None = None  # and its conversions, in the same order

    def _new_optimizer(self, cvr_tower_only: bool = False) -> None:
        """A fresh optimizer and weight average; ``cvr_tower_only``: over the CVR tower's parameters alone
        (every other weight then stays as it is: the cvr phase, see :meth:`start_cvr_tower`)."""
        cfg, model = self.cfg, self.model
        if cvr_tower_only:
            self.opt = torch.optim.AdamW([{"params": model.cvr_tower_parameters(), "lr": cfg.lr}],
                                         weight_decay=cfg.weight_decay)
            self.average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
            return
        groups = [{"params": model.head_parameters(), "lr": cfg.lr}]
        enc_params = model.encoder_parameters()
        if enc_params:
            groups.append({"params": enc_params, "lr": cfg.lora.lr if cfg.finetune == "lora" else cfg.encoder_lr})
        self.opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None

    # ---- checkpoints ---------------------------------------------------------------------------------
    def restore(self, state: dict | None) -> bool:
        """Continue from a checkpoint (None: a fresh start). Returns whether it resumed."""
        if state is None:
            return False
        pr = self.progress = Progress.from_dict(state)
        if not self.refit_starts():
            self.model.load_state_dict(state["model"], strict=False)
            if self._cvr_tower_only_at(pr):
                self._new_optimizer(cvr_tower_only=True)
            self.opt.load_state_dict(state["optim"])
            if self.average is not None and state.get("ema") is not None:
                self.average.load(state["ema"])
            self.averaged(lambda: None)  # the text cache as it was after the checkpointed epoch
        self.start_epoch = pr.epoch
        if self.rank == 0:
            log.info("resuming from the checkpoint of epoch %d (%s phase; best valid AUC %.4f at epoch %d)",
                     pr.epoch, pr.phase, pr.best_auc, pr.best_epoch)
        return True

    def checkpoint(self, metrics: dict) -> None:
        """Record an epoch's metrics and report them with the full state (rank 0 writes it)."""
        self.progress.history.append(metrics)
        state = None
        if self.rank == 0:
            state = dict(self.progress.as_dict(), ema=self.average.state() if self.average is not None else None,
                         model={k: v.cpu() for k, v in self.model.trainable_state().items()},
                         optim=self.opt.state_dict())
        self.session.report(metrics, state)
        for fn in self.after_checkpoint:
            fn(metrics)

    @staticmethod
    def _cvr_tower_only_at(pr: Progress) -> bool:
        """Whether the checkpointed epoch trained the CVR tower alone (its optimizer holds those weights only)."""
        if pr.phase == CVR:
            return pr.cvr_done > 0
        if pr.refit_done:
            return pr.refit_done > pr.best_epoch
        return pr.phase == DONE and pr.cvr_done > 0

    def cvr_phase_wanted(self) -> bool:
        """A two-task model with ``cfg.cvr_tower_epochs`` trains its CVR tower alone after the joint epochs
        (not under DP-SGD: the accountant planned the noisy steps before training)."""
        return bool(self.model.has_cvr and self.cfg.cvr_tower_epochs > 0 and self.private is None)

    def start_cvr_tower(self, weights: dict, pooled: torch.Tensor) -> None:
        """The live model at ``weights`` (a snapshot: the selected, averaged ones) and an optimizer and weight
        average over the CVR tower alone: the shared representation and the click tower stay as they are."""
        self.model.load_state_dict(weights, strict=False)
        self.model.text.pooled.copy_(pooled.to(self.model.text.pooled.device))
        self._new_optimizer(cvr_tower_only=True)

    def refit_starts(self) -> bool:
        """The selection phase is over and no refit epoch has run yet."""
        return self.progress.phase == REFIT and self.progress.refit_done == 0

    def restart(self) -> None:
        """Back to the initial weights with a fresh optimizer and average (the refit's start)."""
        self.model.load_state_dict(self.init_weights, strict=False)
        self._new_optimizer()
        if self.model.text.trainable:
            self.model.text.refresh()

    # ---- training and evaluation -----------------------------------------------------------------------
    def run_epoch(self, epoch: int, arrays) -> tuple[float, int, float]:
        """One pass over this worker's part of the train rows; returns (mean loss, steps, seconds).

        ``arrays``: the rows as arrays (every worker holds them; each takes its slice of one permutation),
        or a :class:`~adrec.ranking.train.feed.ShardFeed` (this worker's streamed shard of a Ray Dataset,
        shuffled through a bounded buffer). Both go through the same per-batch step (:meth:`_train_batches`).
        ``self.last_rows``: the rows this worker trained on."""
        if not isinstance(arrays, dict):
            seed_all(self.cfg.seed * 1000 + epoch * 10 + self.rank)
            rng = np.random.default_rng([self.cfg.seed, epoch, self.rank])
            return self._train_batches(epoch, arrays.batches(epoch, self.rank), None, rng)
        if self.private is not None:  # sets self.last_rows itself
            return self.private.run_epoch(self, epoch, arrays)
        cfg, rank, world = self.cfg, self.rank, self.world
        y = arrays["label"]
        w_all = recency_weights(arrays["user"], arrays["ts"], cfg.recency_half_life) if cfg.recency_half_life else None
        n = len(y)
        per_rank = n // world
        steps = math.ceil(per_rank / cfg.batch_size)
        if cfg.max_steps_per_epoch:
            steps = min(steps, cfg.max_steps_per_epoch * cfg.grad_accum)
        seed_all(cfg.seed * 1000 + epoch * 10 + rank)
        rng = np.random.default_rng([cfg.seed, epoch])
        idx = rng.permutation(n)[rank * per_rank:(rank + 1) * per_rank]
        sels = (idx[s * cfg.batch_size:(s + 1) * cfg.batch_size] for s in range(steps))
        batches = ((take(arrays, sel), w_all[sel] if w_all is not None else None) for sel in sels)
        return self._train_batches(epoch, batches, steps, rng)

    def _train_batches(self, epoch: int, batches: Iterator[tuple[dict, np.ndarray | None]], steps: int | None,
                       rng: np.random.Generator) -> tuple[float, int, float]:
        """The optimizer steps of one epoch over ``batches`` ((arrays, row weights or None) per batch).

        ``steps``: how many there are when known; a streamed epoch does not know it, so each batch is
        looked ahead by one to tell the last (the end of a gradient accumulation, DDP's sync)."""
        cfg, model, rank, world, device = self.cfg, self.model, self.rank, self.world, self.device
        t0 = time.perf_counter()
        limit = cfg.max_steps_per_epoch * cfg.grad_accum if cfg.max_steps_per_epoch else None
        n_members = len(model.members)
        bag = cfg.ensemble_bagging and n_members > 1
        model.train()
        total, count, s = 0.0, 0, 0
        self.opt.zero_grad(set_to_none=True)
        it = iter(batches)
        nxt = next(it, None)
        while nxt is not None and (limit is None or s < limit):
            b, w = nxt
            nxt = next(it, None) if (limit is None or s + 1 < limit) else None
            n_rows = len(b["label"])
            batch = to_device(b, device)
            if model.text.trainable:
                uniq = np.unique(b["item"])
                uniq = uniq[uniq > 0]
                if cfg.text_items_per_step and len(uniq) > cfg.text_items_per_step:
                    uniq = np.sort(rng.choice(uniq, cfg.text_items_per_step, replace=False))
                batch["fresh"] = torch.from_numpy(uniq).to(device)
            labels = torch.from_numpy(task_labels(b, slice(None))).to(device)
            if bag:  # online bagging: each member sees each row Poisson(1) times
                counts = rng.poisson(1.0, size=(n_members, n_rows)).astype(np.float32)
                w = counts * (w if w is not None else 1.0)
            weights = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(device) if w is not None else None
            last = (s + 1) % cfg.grad_accum == 0 or nxt is None
            sync = self.step_module.no_sync() if (world > 1 and not last) else nullcontext()
            with sync, self.amp:
                loss = self.step_module(batch, labels, weights)
            (loss / cfg.grad_accum).backward()
            if last:
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                if self.average is not None:
                    self.average.update()
            total += float(loss.detach()) * n_rows
            count += n_rows
            s += 1
            if rank == 0 and steps and steps >= 8 and s % max(1, steps // 4) == 0 and s < steps:
                log.info("epoch %d: step %d/%d, loss %.4f, %.1f steps/s", epoch, s, steps, total / count,
                         s / (time.perf_counter() - t0))
        self.last_rows = count
        return total / max(count, 1), s, time.perf_counter() - t0

    def averaged(self, fn):
        """Run ``fn`` with the averaged weights in place (and the text cache computed from them)."""
        if self.average is not None:
            self.average.swap()
        try:
            if self.model.text.trainable:
                self.model.text.refresh()
            return fn()
        finally:
            if self.average is not None:
                self.average.swap()

    def snapshot(self) -> tuple[dict, torch.Tensor]:
        """The trainable weights and the text cache, on the CPU."""
        return ({k: v.cpu() for k, v in self.model.trainable_state().items()},
                self.model.text.pooled.detach().cpu().clone())

    def evaluate(self, valid) -> tuple[float, float, np.ndarray, tuple[dict, torch.Tensor]]:
        """Valid AUC, logloss and click logits of the averaged weights, and a snapshot of those weights.

        A two-task (ESMM) model is selected on the mean of its valid CTR and CTCVR AUCs (both tasks must
        hold up: the CVR tower learns from far fewer positives and may want other epochs than the click
        one); ``task_metrics`` then holds each AUC on its own."""
        self.task_metrics = {}
        cvr_logits = conversion = None
        if not isinstance(valid, dict):  # a streamed feed: the labels come with the logits, in the order read
            out, snap = self.averaged(lambda: (valid.predict(self.model, self.device), self.snapshot()))
            logits, cvr_logits, y = out["logits"], out.get("cvr_logits"), out["label"]
            conversion = out.get("conversion")
        elif not self.model.has_cvr:
            logits, snap = self.averaged(lambda: (predict_logits(self.model, valid, self.device), self.snapshot()))
            y, conversion = valid["label"], None
        else:
            (logits, cvr_logits), snap = self.averaged(
                lambda: (predict_task_logits(self.model, valid, self.device), self.snapshot()))
            y, conversion = valid["label"], valid["conversion"]
        self.valid_labels = np.asarray(y, dtype=np.float32)
        y = self.valid_labels.astype(np.float64)
        v_auc = float(auc(y, logits))
        v_loss = float(logloss(y, 1 / (1 + np.exp(-np.clip(logits, -50, 50)))))
        if self.model.has_cvr:
            conversion = np.asarray(conversion, dtype=np.float64) * y
            self.valid_cvr_logits, self.valid_conversions = cvr_logits, conversion.astype(np.float32)
            # pCTCVR as the ranker will serve it: each factor through its own Platt calibration, fitted on
            # these valid rows as finish() fits the saved ranker's (cfg.calibrate; raw sigmoids without it)
            p_ctr, p_cvr = task_probabilities(logits, cvr_logits, y, conversion, self.cfg.calibrate)
            tasks = conversion_metrics(y, conversion, p_cvr, p_ctr * p_cvr)
            self.task_metrics = {"valid_ctr_auc": v_auc, "valid_cvr_auc": tasks["cvr.auc"],
                                 "valid_ctcvr_auc": tasks["ctcvr.auc"]}
            if math.isfinite(tasks["ctcvr.auc"]):  # no valid conversion at all: the clicks alone select
                v_auc = 0.5 * (v_auc + tasks["ctcvr.auc"])
        return v_auc, v_loss, logits, snap
