"""What a training worker reads: the splits as plain arrays, per-row weights, batches on the device."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from adrec.config import RankerConfig
from adrec.errors import ConfigError
from adrec.features.split import TRAIN, VALID
from adrec.ranking.collab import training_features
from adrec.ranking.data import rows_to_arrays, take
from adrec.ranking.fusion import FusionRanker

# Arrays of a split that are not model inputs (the loop reads them itself).
_NOT_MODEL_INPUTS = {"label", "conversion", "ts", "weight"}


def prepare_data(cfg: RankerConfig, features) -> dict:
    """Everything a training worker needs, as plain arrays (put once in the object store)."""
    spec = features.spec
    inter = features.interactions
    if "cvr" in cfg.tasks and "conversion" not in inter.columns:
        raise ConfigError("ranker.tasks=[ctr, cvr] needs a conversion label, and these features have none: name "
                          "one in the schema (interactions.conversion: a 0/1 column or a rule such as "
                          "'rating == 5') and run prepare again, or train with ranker.tasks=[ctr]")
    arch = FusionRanker.build_arch(cfg, spec)
    out = {"spec": spec, "items": features.items, "users": features.users, "arch": arch}
    dense = None
    if cfg.collab:  # leakage-free per split; the ranker keeps the scorer fitted on train + valid
        dense, out["collab"] = training_features(inter, spec.n_users, spec.n_items, cfg.collab, cfg.seed)
    for split in (TRAIN, VALID):
        rows = inter[inter["split"] == split]
        if len(rows) == 0:
            raise ValueError(f"no '{split}' rows in the features: the ranker trains on train and selects on valid")
        arrays = rows_to_arrays(rows, arch)
        if dense is not None:
            arrays["dense"] = dense[split]
        arrays["label"] = rows["label"].to_numpy(dtype=np.float32)
        if "cvr" in cfg.tasks:
            arrays["conversion"] = rows["conversion"].to_numpy(dtype=np.float32)
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


def to_device(arrays: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    """The model inputs of a batch of arrays, as tensors on ``device``."""
    out = {}
    for k, v in arrays.items():
        if k not in _NOT_MODEL_INPUTS:
            v = np.ascontiguousarray(v)
            out[k] = torch.from_numpy(v if v.flags.writeable else v.copy()).to(device)
    return out


def task_labels(arrays: dict[str, np.ndarray], sel) -> np.ndarray:
    """The training targets of rows ``sel``: (n,) clicks, or (n, 2) clicks and conversions when the arrays
    carry conversions (a two-task ranker: the loss is ESMM's, :func:`adrec.ranking.fgsm.esmm_loss`)."""
    if "conversion" not in arrays:
        return arrays["label"][sel]
    return np.ascontiguousarray(np.stack([arrays["label"][sel], arrays["conversion"][sel]], axis=1))


def predict_task_logits(model, arrays: dict[str, np.ndarray], device, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """A two-task model's click and CVR logits for every row of ``arrays`` (eval mode, no gradients)."""
    model.eval()
    ctr, cvr = [], []
    n = len(arrays["item"])
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            a, b = model.task_logits(to_device(take(arrays, slice(i, i + batch_size)), device))
            ctr.append(a.float().cpu().numpy())
            cvr.append(b.float().cpu().numpy())
    if not ctr:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(ctr).astype(np.float64), np.concatenate(cvr).astype(np.float64)


def predict_logits(model, arrays: dict[str, np.ndarray], device, batch_size: int = 1024) -> np.ndarray:
    """The model's logits for every row of ``arrays`` (eval mode, no gradients), float64."""
    model.eval()
    out = []
    n = len(arrays["item"])
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            b = to_device(take(arrays, slice(i, i + batch_size)), device)
            out.append(model(b).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
