"""Training the fusion ranker with Ray Train (``TorchTrainer``, V2).

``train_ranker(cfg, run)`` trains on split == "train", selects on "valid" (early stopping on AUC),
and writes the self-describing ranker folder ``run.ranker``. The per-worker loop:

- DDP over ``cfg.ranker.num_workers`` workers (gloo on CPU, NCCL on GPU, set up by Ray Train),
  one ``torch.set_num_threads(cfg.ranker.torch_threads)`` per worker, bf16 autocast on GPU only;
- gradient accumulation (``grad_accum`` micro-batches of ``batch_size`` rows per optimizer step);
- a checkpoint each epoch through ``ray.train.report(metrics, checkpoint=...)``;
- after a worker failure Ray Train restarts the worker group (``FailureConfig(max_failures)``) and
  the loop continues from the latest checkpoint: the epochs it holds are never redone, and each
  epoch's shuffling and dropout seeds depend only on (seed, epoch), so a resumed run matches an
  uninterrupted one.

The same loop also runs without Ray (``fit_local``), which the unit tests and quick experiments use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from adrec.config import AdrecConfig, RankerConfig
from adrec.evaluation.metrics import auc, logloss
from adrec.features.split import TRAIN, VALID
from adrec.ranking.data import rows_to_arrays, take
from adrec.ranking.fgsm import fgsm_loss
from adrec.ranking.fusion import FusionRanker, fit_platt
from adrec.run import RunDir

log = logging.getLogger(__name__)

__all__ = ["train_ranker", "fit_local", "FusionRanker", "prepare_data"]

STATE_FILE = "state.pt"
# Fields that do not change what is trained: they do not enter the resume key.
_NOT_IN_KEY = {"fail_after_epoch", "max_failures", "resume", "storage_path", "num_workers", "use_gpu", "torch_threads"}


# ---- data ------------------------------------------------------------------------------------------
def prepare_data(cfg: RankerConfig, features) -> dict:
    """Everything a training worker needs, as plain arrays (put once in the object store)."""
    spec = features.spec
    inter = features.interactions
    arch = FusionRanker.build_arch(cfg, spec)
    out = {"spec": spec, "items": features.items, "users": features.users, "arch": arch}
    for split in (TRAIN, VALID):
        rows = inter[inter["split"] == split]
        if len(rows) == 0:
            raise ValueError(f"no '{split}' rows in the features: the ranker trains on train and selects on valid")
        arrays = rows_to_arrays(rows, arch)
        arrays["label"] = rows["label"].to_numpy(dtype=np.float32)
        arrays["ts"] = pd.to_numeric(rows["ts"], errors="coerce").to_numpy(dtype=np.float64) if "ts" in rows \
            else np.arange(len(rows), dtype=np.float64)
        out[split] = arrays
    return out


def recency_weights(user: np.ndarray, ts: np.ndarray, half_life: float | None) -> np.ndarray:
    """Per-row weights halving every ``half_life`` of the user's timeline back from their latest row (mean 1)."""
    n = len(user)
    if not half_life or n == 0:
        return np.ones(n, dtype=np.float32)
    order = np.lexsort((ts, user))
    u = user[order]
    starts = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
    counts = np.diff(np.r_[starts, n])
    pos = np.arange(n) - np.repeat(starts, counts)
    span = np.maximum(np.repeat(counts, counts) - 1, 1)
    age = (np.repeat(counts, counts) - 1 - pos) / span
    w = np.empty(n, dtype=np.float64)
    w[order] = 0.5 ** (age / half_life)
    return (w / w.mean()).astype(np.float32)


_NOT_MODEL_INPUTS = {"label", "ts", "weight"}


def _to_device(arrays: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in arrays.items():
        if k not in _NOT_MODEL_INPUTS:
            v = np.ascontiguousarray(v)
            out[k] = torch.from_numpy(v if v.flags.writeable else v.copy()).to(device)
    return out


# ---- sessions: where the loop reports and checkpoints -------------------------------------------------------
class _LocalSession:
    rank, world = 0, 1

    def worker_nodes(self) -> int:
        return 1

    def __init__(self, checkpoint: dict | None = None):
        self.state = checkpoint
        self.reports: list[dict] = []
        self.device = torch.device("cpu")

    def checkpoint(self) -> dict | None:
        return self.state

    def report(self, metrics: dict, state: dict) -> None:
        self.reports.append(metrics)
        self.state = state


class _RaySession:
    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def worker_nodes(self) -> int:
        """How many distinct nodes the worker group spans (a collective: every worker calls it)."""
        import ray
        import torch.distributed as dist

        node = ray.get_runtime_context().get_node_id()
        if self.world == 1 or not dist.is_initialized():
            return 1
        nodes: list = [None] * self.world
        dist.all_gather_object(nodes, node)
        return len(set(nodes))

    def checkpoint(self) -> dict | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)

    def report(self, metrics: dict, state: dict) -> None:
        import ray.train

        if self.rank == 0:
            with tempfile.TemporaryDirectory(prefix="adrec-ckpt-") as d:
                torch.save(state, Path(d) / STATE_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


class _Step(nn.Module):
    """One forward = the whole training loss (FGSM included), so DDP sees one forward per backward."""

    def __init__(self, model, epsilon: float):
        super().__init__()
        self.model = model
        self.epsilon = epsilon

    def forward(self, batch, labels, weights=None):
        return fgsm_loss(self.model, batch, labels, self.epsilon, weights)


class _EMA:
    """Exponential moving average of the trainable weights (a cheap ensemble over training steps)."""

    _STEPS = "__ema_steps__"  # the update count, kept with the checkpointed shadow weights

    def __init__(self, model, decay: float):
        self.decay = decay
        self.steps = 0
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        # Warm-up (as tf.train.ExponentialMovingAverage's num_updates): the effective decay grows with
        # the step count, so a short fit (a few dozen steps) is not averaged back to its initial weights.
        self.steps += 1
        decay = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def reset(self) -> None:
        self.steps = 0
        for n, p in self.params.items():
            self.shadow[n].copy_(p.detach())

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live weights and the averaged ones (call twice to undo)."""
        for n, p in self.params.items():
            tmp = p.detach().clone()
            p.copy_(self.shadow[n])
            self.shadow[n].copy_(tmp)

    def state(self) -> dict:
        return {**{n: t.cpu().clone() for n, t in self.shadow.items()}, self._STEPS: torch.tensor(self.steps)}

    @torch.no_grad()
    def load(self, state: dict) -> None:
        self.steps = int(state.get(self._STEPS, 0))
        for n, t in state.items():
            if n in self.shadow:
                self.shadow[n].copy_(t)


def _predict_logits(model, arrays: dict[str, np.ndarray], device, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    out = []
    n = len(arrays["item"])
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            b = _to_device(take(arrays, slice(i, i + batch_size)), device)
            out.append(model(b).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


# ---- the per-worker loop ------------------------------------------------------------------------------
def _fit(cfg: RankerConfig, data: dict, session) -> FusionRanker:
    """The training loop of one worker: a selection phase, then (``cfg.refit``) a refit phase.

    Selection trains on train and early-stops on the valid AUC; refit retrains from the same
    initial weights on train + valid for the selected number of epochs (the test period follows the
    valid period, so its clicks are the most telling). Every epoch of both phases ends in a checkpoint.
    """
    torch.set_num_threads(cfg.torch_threads)
    _seed_all(cfg.seed)
    rank, world, device = session.rank, session.world, session.device
    on_gpu = device.type == "cuda"
    n_nodes = session.worker_nodes()
    ranker = FusionRanker.build(cfg, data["spec"], data["items"], data["users"], refresh=False)
    model = ranker.model
    train, valid = data[TRAIN], data[VALID]
    y_valid = valid["label"].astype(np.float64)
    # Start the output bias at the train click rate: calibrated from step 0.
    ctr = float(np.clip(train["label"].mean(), 1e-4, 1 - 1e-4))
    model.init_bias(math.log(ctr / (1 - ctr)))
    init_state = {k: v.clone() for k, v in model.trainable_state().items()}
    model.to(device)
    model.text.prepare_training()  # on the device: the frozen lower layers run once, where training runs

    def new_optimizer():
        groups = [{"params": model.head_parameters(), "lr": cfg.lr}]
        enc_params = model.encoder_parameters()
        if enc_params:
            groups.append({"params": enc_params, "lr": cfg.encoder_lr})
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    opt = new_optimizer()
    ema = _EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    n_members = len(model.members)
    bag = cfg.ensemble_bagging and n_members > 1
    step_module = _Step(model, cfg.fgsm_epsilon)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if on_gpu else None)

    st = {"phase": "select", "epoch": 0, "select_epochs": 0, "refit_done": 0, "best_auc": -1.0, "best_epoch": 0,
          "bad_epochs": 0, "history": [], "best_state": None, "best_pooled": None, "best_logits": None,
          "final_state": None, "final_pooled": None, "ema": None}
    state = session.checkpoint()
    resumed = state is not None
    if resumed:
        st.update({k: state[k] for k in st if k in state})
        if not (st["phase"] == "refit" and st["refit_done"] == 0):
            model.load_state_dict(state["model"], strict=False)
            opt.load_state_dict(state["optim"])
            if ema is not None and st.get("ema") is not None:
                ema.load(st["ema"])
        if rank == 0:
            log.info("resuming from the checkpoint of epoch %d (%s phase; best valid AUC %.4f at epoch %d)",
                     st["epoch"], st["phase"], st["best_auc"], st["best_epoch"])
    start_epoch = st["epoch"]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (on_gpu and cfg.bf16) else nullcontext()

    def run_epoch(epoch: int, arrays: dict) -> tuple[float, int, float]:
        """One pass over this worker's shard of ``arrays``; returns (mean loss, steps, seconds)."""
        t0 = time.perf_counter()
        y = arrays["label"]
        w_all = recency_weights(arrays["user"], arrays["ts"], cfg.recency_half_life) if cfg.recency_half_life else None
        n = len(y)
        per_rank = n // world
        steps = math.ceil(per_rank / cfg.batch_size)
        if cfg.max_steps_per_epoch:
            steps = min(steps, cfg.max_steps_per_epoch * cfg.grad_accum)
        _seed_all(cfg.seed * 1000 + epoch * 10 + rank)
        rng = np.random.default_rng([cfg.seed, epoch])
        idx = rng.permutation(n)[rank * per_rank:(rank + 1) * per_rank]
        model.train()
        total, count = 0.0, 0
        opt.zero_grad(set_to_none=True)
        for s in range(steps):
            sel = idx[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            batch = _to_device(take(arrays, sel), device)
            if model.text.trainable:
                uniq = np.unique(arrays["item"][sel])
                uniq = uniq[uniq > 0]
                if cfg.text_items_per_step and len(uniq) > cfg.text_items_per_step:
                    uniq = np.sort(rng.choice(uniq, cfg.text_items_per_step, replace=False))
                batch["fresh"] = torch.from_numpy(uniq).to(device)
            labels = torch.from_numpy(y[sel]).to(device)
            w = w_all[sel] if w_all is not None else None
            if bag:  # online bagging: each member sees each row Poisson(1) times
                counts = rng.poisson(1.0, size=(n_members, len(sel))).astype(np.float32)
                w = counts * (w if w is not None else 1.0)
            weights = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(device) if w is not None else None
            last = (s + 1) % cfg.grad_accum == 0 or s == steps - 1
            sync = step_module.no_sync() if (world > 1 and not last) else nullcontext()
            with sync, amp:
                loss = step_module(batch, labels, weights)
            (loss / cfg.grad_accum).backward()
            if last:
                opt.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update()
            total += float(loss.detach()) * len(sel)
            count += len(sel)
            if rank == 0 and steps >= 8 and (s + 1) % max(1, steps // 4) == 0 and s + 1 < steps:
                log.info("epoch %d: step %d/%d, loss %.4f, %.1f steps/s", epoch, s + 1, steps, total / count,
                         (s + 1) / (time.perf_counter() - t0))
        return total / max(count, 1), steps, time.perf_counter() - t0

    def averaged(fn):
        """Run ``fn`` with the EMA weights in place (and the text cache computed from them)."""
        if ema is not None:
            ema.swap()
        try:
            if model.text.trainable:
                model.text.refresh()
            return fn()
        finally:
            if ema is not None:
                ema.swap()

    def snapshot() -> tuple[dict, torch.Tensor]:
        return ({k: v.cpu() for k, v in model.trainable_state().items()},
                model.text.pooled.detach().cpu().clone())

    def checkpoint(metrics: dict) -> None:
        st["history"].append(metrics)
        st["ema"] = ema.state() if ema is not None else None
        full = dict(st, model={k: v.cpu() for k, v in model.trainable_state().items()}, optim=opt.state_dict())
        session.report(metrics, full if rank == 0 else None)
        if cfg.fail_after_epoch == st["epoch"] and not resumed:
            raise RuntimeError(f"fail_after_epoch={st['epoch']}: test hook, the worker fails once after this checkpoint")

    if resumed and not (st["phase"] == "refit" and st["refit_done"] == 0):
        averaged(lambda: None)  # the text cache as it was after the checkpointed epoch

    # ---- phase 1: train on train, select on valid ----
    if st["phase"] == "select":
        for epoch in range(st["epoch"] + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            loss, steps, secs = run_epoch(epoch, train)
            logits, (weights, pooled) = averaged(lambda: (_predict_logits(model, valid, device), snapshot()))
            v_auc = float(auc(y_valid, logits))
            v_loss = float(logloss(y_valid, 1 / (1 + np.exp(-np.clip(logits, -50, 50)))))
            improved = v_auc > st["best_auc"]
            if improved:
                st.update(best_auc=v_auc, best_epoch=epoch, bad_epochs=0, best_logits=logits,
                          best_state=weights, best_pooled=pooled)
            else:
                st["bad_epochs"] += 1
            stop = st["bad_epochs"] >= cfg.early_stopping_patience or epoch == cfg.epochs
            st["epoch"] = st["select_epochs"] = epoch
            if stop:
                st["phase"] = "refit" if cfg.refit else "done"
            metrics = {"epoch": epoch, "phase": "select", "train_loss": loss, "valid_auc": v_auc,
                       "valid_logloss": v_loss, "best_auc": st["best_auc"], "best_epoch": st["best_epoch"],
                       "start_epoch": start_epoch, "steps_per_s": steps / max(secs, 1e-9),
                       "seconds": time.perf_counter() - t0, "world_size": world, "worker_nodes": n_nodes}
            if rank == 0:
                log.info("epoch %d/%d: %d steps in %.1fs (%.1f steps/s), loss %.4f, valid AUC %.4f, logloss %.4f%s",
                         epoch, cfg.epochs, steps, secs, metrics["steps_per_s"], loss, v_auc, v_loss,
                         " (best)" if improved else "")
                if stop and epoch < cfg.epochs:
                    log.info("early stopping after epoch %d: best valid AUC %.4f at epoch %d",
                             epoch, st["best_auc"], st["best_epoch"])
            checkpoint(metrics)
            if stop:
                break

    # ---- phase 2: refit on train + valid for the selected number of epochs ----
    if st["phase"] == "refit":
        both = {k: np.concatenate([train[k], valid[k]]) for k in train}
        if st["refit_done"] == 0:
            model.load_state_dict(init_state, strict=False)
            opt = new_optimizer()
            if ema is not None:
                ema = _EMA(model, cfg.ema_decay)
            if model.text.trainable:
                model.text.refresh()
            if rank == 0:
                log.info("refit: training on train + valid (%d rows) for the selected %d epoch(s)",
                         len(both["label"]), st["best_epoch"])
        for r in range(st["refit_done"] + 1, st["best_epoch"] + 1):
            epoch = st["select_epochs"] + r
            loss, steps, secs = run_epoch(epoch, both)
            st["epoch"], st["refit_done"] = epoch, r
            if r == st["best_epoch"]:
                weights, pooled = averaged(snapshot)
                st.update(phase="done", final_state=weights, final_pooled=pooled)
            else:
                averaged(lambda: None)  # the next epoch reads the text cache of the averaged weights
            metrics = {"epoch": epoch, "phase": "refit", "refit_epoch": r, "train_loss": loss,
                       "best_auc": st["best_auc"], "best_epoch": st["best_epoch"], "start_epoch": start_epoch,
                       "steps_per_s": steps / max(secs, 1e-9), "seconds": secs, "world_size": world,
                       "worker_nodes": n_nodes}
            if rank == 0:
                log.info("refit epoch %d/%d: %d steps in %.1fs (%.1f steps/s), loss %.4f", r, st["best_epoch"],
                         steps, secs, metrics["steps_per_s"], loss)
            checkpoint(metrics)
    model.text.release_training()
    return ranker


# ---- turning a final state into the saved ranker ---------------------------------------------------------
def finish(cfg: RankerConfig, data: dict, state: dict, ranker: FusionRanker | None = None) -> FusionRanker:
    """The best epoch's ranker from a training state, calibrated on the validation split."""
    if state is None or state.get("best_state") is None:
        raise RuntimeError("training produced no checkpoint with a best model")
    if ranker is None:
        ranker = FusionRanker.build(cfg, data["spec"], data["items"], data["users"], refresh=False)
    ranker.model.cpu()
    refit = state.get("final_state") is not None
    weights = state["final_state"] if refit else state["best_state"]
    missing, unexpected = ranker.model.load_state_dict(weights, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: unexpected {unexpected}")
    ranker.model.text.pooled.copy_(state["final_pooled"] if refit else state["best_pooled"])
    ranker.model.eval()
    calibration = (1.0, 0.0)
    if cfg.calibrate and state.get("best_logits") is not None:
        calibration = fit_platt(state["best_logits"], data[VALID]["label"])
    ranker.calibration = calibration
    hist = state["history"]
    ranker.info = {"valid_auc": state["best_auc"], "best_epoch": state["best_epoch"], "refit": refit,
                   "epochs_run": [h["epoch"] for h in hist], "history": hist}
    return ranker


def fit_local(cfg: RankerConfig, features, checkpoint: dict | None = None) -> tuple[FusionRanker, list[dict]]:
    """Train in this process without Ray (tests, notebooks). Returns the ranker and the per-epoch metrics."""
    data = prepare_data(cfg, features)
    session = _LocalSession(checkpoint)
    _fit(cfg, data, session)
    return finish(cfg, data, session.state), session.reports


# ---- Ray Train ------------------------------------------------------------------------------------------
def _worker_logging() -> None:
    pkg = logging.getLogger("adrec")
    if not pkg.handlers or all(isinstance(h, logging.NullHandler) for h in pkg.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False


def _train_loop_per_worker(config: dict) -> None:
    import ray

    _worker_logging()
    cfg = RankerConfig.model_validate(config["ranker"])
    data = config["data"]
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)
    _fit(cfg, data, _RaySession())


def resume_key(cfg: RankerConfig, data_fingerprint: str = "") -> str:
    d = {k: v for k, v in json.loads(cfg.model_dump_json()).items() if k not in _NOT_IN_KEY}
    h = hashlib.sha256((json.dumps(d, sort_keys=True) + data_fingerprint).encode()).hexdigest()
    return "ranker-" + h[:12]


def _data_fingerprint(run: RunDir, features) -> str:
    """What the training data is: the prepare stage's run (data fingerprint, time) and the feature spec."""
    m = run.manifest().get("stages", {}).get("prepare", {})
    spec = hashlib.sha256(json.dumps(asdict(features.spec), sort_keys=True, default=str).encode()).hexdigest()
    return f"{m.get('data_fingerprint', '')}:{m.get('finished_at', '')}:{spec[:16]}:{len(features.interactions)}"


def train_ranker(cfg: AdrecConfig, run: RunDir, features=None) -> dict:
    """Train the fusion ranker on Ray Train and save it to ``run.ranker``; returns a summary."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from adrec.features.pipeline import Features
    from adrec.runtime import init_ray

    t0 = time.perf_counter()
    rc = cfg.ranker
    if features is None:
        features = Features(run)
    if rc.use_gpu:
        if not torch.cuda.is_available():
            log.warning("use_gpu is set but this process sees no CUDA device; the workers must (Ray places them)")
    data = prepare_data(rc, features)
    init_ray(cfg.ray)
    storage = Path(rc.storage_path) if rc.storage_path else run.path / "ranker_train"
    name = resume_key(rc, _data_fingerprint(run, features))
    if not rc.resume and (storage / name).exists():
        shutil.rmtree(storage / name)
    storage.mkdir(parents=True, exist_ok=True)
    log.info("training the fusion ranker on %d workers (%s): %d train / %d valid rows, storage %s/%s",
             rc.num_workers, "GPU" if rc.use_gpu else "CPU", len(data[TRAIN]["label"]), len(data[VALID]["label"]),
             storage, name)
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"ranker": json.loads(rc.model_dump_json()), "data": ray.put(data)},
        torch_config=TorchConfig(backend="nccl" if rc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=rc.num_workers, use_gpu=rc.use_gpu),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=rc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"ranker training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("ranker training reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    ranker = finish(rc, data, state)
    ranker.info.update({"num_workers": rc.num_workers, "use_gpu": rc.use_gpu, "ray_run": name})
    ranker.save(run.ranker)
    summary = {
        "path": str(run.ranker),
        "valid_auc": float(state["best_auc"]),
        "best_epoch": int(state["best_epoch"]),
        "epochs_run": [int(h["epoch"]) for h in state["history"]],
        "start_epochs": [int(h["start_epoch"]) for h in state["history"]],
        "history": state["history"],
        "calibration": list(ranker.calibration),
        "ray_run": str(storage / name),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    run.update_manifest("train", {k: v for k, v in summary.items() if k != "history"} | {
        "config": json.loads(rc.model_dump_json())})
    log.info("ranker trained in %.1fs: best valid AUC %.4f at epoch %d -> %s", summary["seconds"],
             summary["valid_auc"], summary["best_epoch"], run.ranker)
    return summary
