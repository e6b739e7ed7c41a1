"""DP-SGD for the fusion ranker (``ranker.dp``): per-example clipping, Gaussian noise, Opacus' accountant.

Every optimizer step of both phases (selection on train, refit on train + valid) is a noisy step:

1. Poisson sampling: each row of the phase's data joins the step's batch independently with probability
   q = batch_size / rows (a worker samples its own shard, rows ``rank::world``; together that is one
   Poisson sample of all rows).
2. The gradient of each example's loss (the mean of the ensemble members' BCE -- ESMM's two-task loss for
   ``ranker.tasks=[ctr, cvr]``, where the row's conversion label is as private as its click --, times its recency weight)
   over every trainable parameter -- the embedding tables, the towers and the head, and with
   ``finetune=lora`` the LoRA adapter; a frozen encoder and its cached item texts are no parameters -- is
   computed per example (``torch.func.vmap`` of ``grad`` over ``physical_batch`` rows at a time), clipped to
   L2 norm ``max_grad_norm`` (C) and summed. An embedding table's per-example gradient is computed on the rows
   the example looked up only (:mod:`adrec.ranking.rows`); with LoRA each example encodes its own candidate's
   text through the adapter inside its gradient (the history's text comes from the cache, recomputed from the
   already-noised adapter each epoch: post-processing).
3. The workers' sums are added up (all-reduce), rank 0 having added N(0, sigma^2 C^2) noise to each
   coordinate first, and divided by the expected batch size q * rows: the gradient the optimizer (AdamW,
   post-processing) and the weight average (post-processing) see.

sigma is chosen before training by Opacus' accountant (RDP by default, ``dp.accountant``): the smallest
noise multiplier whose planned training -- ``epochs`` selection epochs at q_train plus, with ``refit``,
``epochs`` refit epochs at q_train+valid, each of ceil(rows / batch_size) steps (at most
``max_steps_per_epoch``) -- spends at most ``target_epsilon`` at ``delta``. The accountant's record of the
steps actually taken is checkpointed with the weights (``Progress.privacy``) and the epsilon it gives is
what the ranker reports (:func:`spent`): early stopping only lowers it. Opacus computes the noise and the
accounting; the per-example gradients are computed here, because the fusion model shares item-side
embeddings across the rows of a batch (one per unique item), which Opacus' per-layer hooks cannot split
by example; each example gets its own copy of its items instead.

What it covers: (epsilon, delta) differential privacy at the level of one training row (one impression)
of the rows the noisy steps read, for the released weights. Not covered: the valid split's labels, which
pick the epoch count (early stopping) and fit the two Platt calibration parameters without noise; a
user's several rows (user-level privacy would need per-user sampling and clipping, with epsilon growing
with the rows a user may contribute); the candidate sources and the two-stage re-ranker, fitted on the
same log without noise; the online learner, which updates the ranker without noise. Noise comes from
torch's default generator (not a cryptographically secure one, as in Opacus without ``secure_mode``).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adrec.config import DPConfig, RankerConfig
from adrec.features.split import TRAIN, VALID
from adrec.ranking.data import take
from adrec.ranking.fgsm import ESMM_LOSS, EsmmTerms
from adrec.ranking.rows import RowEmbedding, reading, recording
from adrec.ranking.train.data import recency_weights, task_labels, to_device

log = logging.getLogger(__name__)

__all__ = ["PrivateTraining", "noise_multiplier", "spent"]


def _accountant(kind: str, history: list) :
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=kind)
    acc.history = [tuple(h) for h in history]
    return acc


def _epsilon(kind: str, history: list, delta: float) -> float:
    if not history:
        return 0.0
    return float(_accountant(kind, history).get_epsilon(delta=delta))


def steps_per_epoch(cfg: RankerConfig, rows: int) -> int:
    steps = math.ceil(rows / cfg.batch_size)
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def planned_phases(cfg: RankerConfig, n_train: int, n_valid: int) -> list[tuple[float, int]]:
    """(sample rate, steps) of each phase at most (``epochs`` each; the refit only with ``cfg.refit``)."""
    phases = [(min(1.0, cfg.batch_size / n_train), cfg.epochs * steps_per_epoch(cfg, n_train))]
    if cfg.refit:
        both = n_train + n_valid
        phases.append((min(1.0, cfg.batch_size / both), cfg.epochs * steps_per_epoch(cfg, both)))
    return phases


def noise_multiplier(dp: DPConfig, phases: list[tuple[float, int]], tol: float = 0.01) -> float:
    """The smallest sigma (to ``tol``) whose planned phases spend at most ``dp.target_epsilon`` (Opacus'
    accountant; the same bisection as ``opacus.accountants.utils.get_noise_multiplier``, over several
    phases with their own sample rates)."""
    def eps(sigma: float) -> float:
        return _epsilon(dp.accountant, [(sigma, q, s) for q, s in phases], dp.delta)

    lo, hi = 0.0, 10.0
    while eps(hi) > dp.target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {dp.target_epsilon} for {phases}")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > dp.target_epsilon else (lo, mid)
    return hi


def spent(privacy: dict) -> dict:
    """What a ranker reports of its privacy record (``Progress.privacy``): the epsilon spent at delta."""
    return {"epsilon": _epsilon(privacy["accountant"], privacy["history"], privacy["delta"]),
            "delta": privacy["delta"], "target_epsilon": privacy["target_epsilon"],
            "noise_multiplier": privacy["noise_multiplier"], "max_grad_norm": privacy["max_grad_norm"],
            "steps": int(sum(h[2] for h in privacy["history"])), "accountant": privacy["accountant"],
            "unit": "one training row (example-level)"}


def grad_norms(grads: dict) -> torch.Tensor:
    """(B,) L2 norm of each example's gradient over every parameter (the tables' looked-up rows included)."""
    sq = [(g[1] if isinstance(g, tuple) else g).flatten(1).pow(2).sum(1) for g in grads.values()]
    return torch.sqrt(sum(sq))


def clip_factors(grads: dict, max_norm: float) -> torch.Tensor:
    """(B,) min(1, C / norm): each example's gradient times its factor has norm at most C."""
    return (max_norm / (grad_norms(grads) + 1e-6)).clamp(max=1.0)


def add_clipped(summed: dict, grads: dict, factor: torch.Tensor) -> None:
    """``summed[name] +=`` the sum over the examples of their gradients times ``factor``."""
    for nm, g in grads.items():
        if isinstance(g, tuple):  # a table: each example's rows added where they belong
            index, values = g
            summed[nm].index_add_(0, index.reshape(-1), (values * factor[:, None, None]).flatten(0, 1))
        else:
            summed[nm] += torch.einsum("i,i...->...", factor, g)


def dense_rows(index: torch.Tensor, values: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(B, n_rows, dim): the per-example table gradients ``(index, values)`` with their zero rows."""
    out = values.new_zeros(len(index), n_rows, values.shape[-1])
    for i in range(len(index)):
        out[i].index_add_(0, index[i], values[i])
    return out


class _RowLoss(nn.Module):
    """One example's training loss: the mean of the ensemble members' BCE (a two-task model: ESMM's loss,
    ``label`` then holds the click and the conversion), times its weight."""

    def __init__(self, model, esmm: EsmmTerms = ESMM_LOSS):
        super().__init__()
        self.model = model
        self.esmm = esmm

    def forward(self, b: dict, label: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.model.has_cvr:
            ctr, cvr = self.model.member_task_logits(self.model.embed(b), b)  # (members, 1) each
            lab = label.reshape(-1)  # (click, conversion) of the one row
            clicks, conversions = lab[0].expand_as(ctr), lab[1].expand_as(ctr)
            return self.esmm(ctr.reshape(-1), cvr.reshape(-1), clicks.reshape(-1),
                             conversions.reshape(-1)) * weight
        logits = self.model.member_logits(self.model.embed(b), b).float()  # (members, 1)
        bce = F.binary_cross_entropy_with_logits(logits, label.expand_as(logits), reduction="none")
        return bce.mean() * weight


class PrivateTraining:
    """The DP-SGD epoch of :class:`~adrec.ranking.train.state.TrainingState` (see the module)."""

    def __init__(self, cfg: RankerConfig, data: dict, world: int):
        dp = cfg.dp
        self.cfg, self.dp, self.world = cfg, dp, world
        self.rows = {TRAIN: len(data[TRAIN]["label"]), VALID: len(data[VALID]["label"])}
        self.sigma = noise_multiplier(dp, planned_phases(cfg, self.rows[TRAIN], self.rows[VALID]))

    def fresh_record(self) -> dict:
        dp = self.dp
        return {"accountant": dp.accountant, "delta": dp.delta, "target_epsilon": dp.target_epsilon,
                "noise_multiplier": self.sigma, "max_grad_norm": dp.max_grad_norm, "history": []}

    def _per_example(self, model):
        """Per-example gradients and losses of a batch: ``per(params, batch, labels, weights) -> (grads, losses)``.

        ``vmap(grad_and_value)`` of :class:`_RowLoss` over the rows, each with its own item slots (its candidate
        and history, not the batch's shared unique items). ``grads[name]``: (B, *shape) for a dense parameter;
        for an embedding table (:class:`~adrec.ranking.rows.RowEmbedding`), ``(index, values)``: the sorted
        rows each example looked up (B, S) and its gradient on them (B, S, dim), zero on a repeated index's
        later copies -- the table's per-example gradient without its zero rows (:func:`dense_rows` adds them)."""
        from torch.func import functional_call, grad_and_value, vmap

        row_loss = _RowLoss(model, EsmmTerms.of(self.cfg))
        tables = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, RowEmbedding)
                  and m.weight.requires_grad}
        fixed = {f"model.{n}": t for n, t in [*model.named_buffers(), *((n, p) for n, p in model.named_parameters()
                                                                         if not p.requires_grad or n in tables)]}
        hist_len = model.hist_len
        adapter = model.text.trainable  # finetune=lora (the config admits no other trainable encoder under DP)

        def own_slots(row: dict) -> dict:
            b = {k: v.unsqueeze(0) for k, v in row.items()}
            b["_uniq"] = torch.cat([b["item"], b["hist"][0]])
            b["_inv"] = torch.arange(1 + hist_len).unsqueeze(0)
            if adapter:  # the row's own candidate text through the adapter: its gradient is the row's alone
                b["fresh"] = b["item"]
            return b

        def looked_up(row: dict) -> dict:
            with recording(tables) as seen:  # every lookup of the tables is in FusionModel.embed
                model.embed(own_slots(row))
            return {n: torch.sort(torch.cat(seen[n])).values for n in tables}

        def one(params: dict, rows: dict, index: dict, row: dict, label: torch.Tensor, weight: torch.Tensor):
            with reading(tables, index, rows):
                return functional_call(row_loss, {**fixed, **{f"model.{n}": p for n, p in params.items()}},
                                       (own_slots(row), label, weight))

        per_row = vmap(grad_and_value(one, argnums=(0, 1)), in_dims=(None, 0, 0, 0, 0, 0), randomness="different")

        def per(params: dict, batch: dict, labels: torch.Tensor, weights: torch.Tensor):
            dense = {n: p for n, p in params.items() if n not in tables}
            model.text.per_example = True
            try:
                with torch.no_grad():
                    index = vmap(looked_up, randomness="same")(batch)
                    rows = {n: tables[n].weight.detach()[index[n]] for n in tables}
                (g_dense, g_rows), losses = per_row(dense, rows, index, batch, labels, weights)
            finally:
                model.text.per_example = False
            return {**g_dense, **{n: (index[n], g_rows[n]) for n in tables}}, losses

        return per

    def run_epoch(self, state, epoch: int, arrays: dict) -> tuple[float, int, float]:
        """One epoch of noisy steps over ``arrays`` (the phase's rows); returns (mean loss, steps, seconds)."""
        cfg, dp, model, rank, world, device = self.cfg, self.dp, state.model, state.rank, state.world, state.device
        t0 = time.perf_counter()
        y = arrays["label"]
        n = len(y)
        q = min(1.0, cfg.batch_size / n)
        steps = steps_per_epoch(cfg, n)
        w_all = recency_weights(arrays["user"], arrays["ts"], cfg.recency_half_life) if cfg.recency_half_life \
            else np.ones(n, np.float32)
        shard = np.arange(rank, n, world)
        rng = np.random.default_rng([cfg.seed, epoch, rank])
        named = [(nm, p) for nm, p in model.named_parameters() if p.requires_grad]
        names = [nm for nm, _ in named]
        per_example = self._per_example(model)
        if state.progress.privacy is None:
            state.progress.privacy = self.fresh_record()
        history = state.progress.privacy["history"]
        model.train()
        total, count = 0.0, 0
        for _ in range(steps):
            sel = shard[rng.random(len(shard)) < q]
            summed = {nm: torch.zeros_like(p) for nm, p in named}
            params = {nm: p.detach() for nm, p in named}
            for start in range(0, len(sel), dp.physical_batch):
                chunk = sel[start:start + dp.physical_batch]
                batch = to_device(take(arrays, chunk), device)
                labels = torch.from_numpy(task_labels(arrays, chunk)).to(device)
                if labels.dim() == 1:
                    labels = labels.unsqueeze(1)
                weights = torch.from_numpy(np.ascontiguousarray(w_all[chunk], np.float32)).to(device)
                grads, losses = per_example(params, batch, labels, weights)
                factor = clip_factors(grads, dp.max_grad_norm)
                add_clipped(summed, grads, factor)
                total += float(losses.sum())
                count += len(chunk)
            if rank == 0:
                for nm in names:
                    summed[nm] += torch.normal(0.0, self.sigma * dp.max_grad_norm, summed[nm].shape, device=device)
            if world > 1:
                import torch.distributed as dist

                for nm in names:
                    dist.all_reduce(summed[nm], op=dist.ReduceOp.SUM)
            for nm, p in named:
                p.grad = summed[nm] / (q * n)
            state.opt.step()
            state.opt.zero_grad(set_to_none=True)
            if state.average is not None:
                state.average.update()
            if history and history[-1][0] == self.sigma and history[-1][1] == q:
                history[-1] = [self.sigma, q, history[-1][2] + 1]
            else:
                history.append([self.sigma, q, 1])
        if rank == 0:
            log.info("DP-SGD epoch %d: %d noisy steps (sigma %.3f, q %.4g), epsilon spent so far %.3f at delta %g",
                     epoch, steps, self.sigma, q, _epsilon(dp.accountant, history, dp.delta), dp.delta)
        state.last_rows = count  # the rows this worker's Poisson-sampled steps trained on (the epoch's samples/s)
        return total / max(count, 1), steps, time.perf_counter() - t0
